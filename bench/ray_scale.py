"""Calibration and validation on a local Ray cluster: time and peak memory per worker at 1 and 2
workers, against one process (dfq_onnx/distributed.py).

  python bench/ray_scale.py [--calib 2048] [--eval 10000] [--workers 1,2] [--markdown]

Model: bench/cache/mobilenet_v2.onnx (bench/zoo.py). Data, built once under bench/cache/ray/:
  calibN.npz   N preprocessed samples (uncompressed, so each worker reads its rows at their offset):
               the photo crops of bench/cache/data/calib (bench/data.py) and their mirror images.
  evalN/       N 224x224 PNG crops of bench/data.py's evaluation photos (seed apart from its own),
               read with the ImageNet --preprocess spec: each worker decodes its own files.
Each run is a fresh process (peak RSS of the driver is its own); workers report their model load
time, shard time and peak RSS (VmHWM). The calibrated models must be byte-identical and the
validation figures equal (latency aside): the script says so.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache"
OUT = CACHE / "ray"
MODEL = CACHE / "mobilenet_v2.onnx"
PREPROCESS = "resize=256 size=224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 scale=1 layout=NCHW color=RGB"


def write_npz_rows(path: Path, key: str, shape: tuple, rows) -> None:
    """An uncompressed .npz with one float32 array, written row block by row block (never whole
    in memory)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            for block in rows:
                f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    tmp.replace(path)


def calib_npz(n: int) -> Path:
    p = OUT / f"calib{n}.npz"
    if p.exists():
        return p
    sys.path.insert(0, str(ROOT))
    from dfq_onnx.calibration_data import DataSource, InputSpec

    spec = [InputSpec("input", np.dtype(np.float32), (None, 3, 224, 224))]
    folder = CACHE / "data" / "calib"
    have = len(list(folder.glob("*.png")))

    def rows():
        done = 0
        while done < n:  # the crops, then their mirror images, ...
            for b in DataSource(str(folder), spec, num_samples=min(have, n - done), preprocess=PREPROCESS).batches(64):
                x = b["input"]
                yield x[..., ::-1] if (done // have) % 2 else x
                done += len(x)
    OUT.mkdir(parents=True, exist_ok=True)
    write_npz_rows(p, "input", (n, 3, 224, 224), rows())
    return p


def eval_folder(n: int) -> Path:
    p = OUT / f"eval{n}"
    if p.is_dir() and len(list(p.glob("*.png"))) == n:
        return p
    sys.path.insert(0, str(HERE))
    import data

    tmp = p.with_name(p.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(data.random_crops([data.photo(x) for x in data.EVAL_PHOTOS], n, data.EVAL_SEED + 1)):
        im.save(tmp / f"{i:05d}.png")
    tmp.replace(p)
    return p


def vmhwm() -> float:
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024


def one(kind: str, workers: int, calib: Path, evald: Path, samples: int, quant: Path) -> dict:
    """One run in this (fresh) process; workers 0 = one process without Ray."""
    sys.path.insert(0, str(ROOT))
    from dfq_onnx.config import QuantConfig
    from dfq_onnx.distributed import maybe_cluster

    t0 = time.perf_counter()
    with maybe_cluster(workers or None, None) as cluster:
        started = time.perf_counter()
        if kind == "calib":
            from dfq_onnx.pipeline import run

            marks = {}
            r = run(str(MODEL), str(calib), QuantConfig(num_samples=samples),
                    on_stage=lambda name: marks.setdefault(name, time.perf_counter()), cluster=cluster)
            stage = marks["alignment"] - marks["calibration"]
            out = {"sha256": hashlib.sha256(r.model.SerializeToString()).hexdigest(), "samples": r.samples,
                   "calibration_seconds": stage, "convert_seconds": time.perf_counter() - started}
            if workers == 0:
                quant.write_bytes(r.model.SerializeToString())
        else:
            from dfq_onnx.validate import validate

            rep = validate(str(MODEL), str(quant), str(evald), num_samples=samples, preprocess=PREPROCESS,
                           runs=20, cluster=cluster)
            rep.pop("latency_ms")
            out = {"figures": json.dumps(rep, sort_keys=True), "samples": rep["samples"],
                   "validate_seconds": time.perf_counter() - started,
                   "agreement_top1": rep["agreement_top1"], "sqnr_db": rep["sqnr_db"]}
        out["cluster_start_seconds"] = started - t0
        out["driver_peak_rss_mb"] = vmhwm()
        out["report"] = cluster.report if cluster is not None else {}
    return out


def run_one(kind: str, workers: int, args) -> dict:
    cmd = [sys.executable, __file__, "--one", kind, str(workers), "--calib", str(args.calib), "--eval", str(args.eval)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        raise SystemExit(f"{kind} x{workers} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=2048)
    ap.add_argument("--eval", type=int, default=10000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--skip", default="", help="comma list: calib-single, eval-single, ...")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "WORKERS"))
    args = ap.parse_args()
    calib, evald = calib_npz(args.calib), eval_folder(args.eval)
    quant = OUT / "mobilenet_v2.q.onnx"
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), calib, evald,
                             args.calib if args.one[0] == "calib" else args.eval, quant)))
        return
    results = {}
    skip = set(args.skip.split(","))
    for kind in ("calib", "eval"):
        for w in [0] + [int(x) for x in args.workers.split(",")]:
            name = f"{kind}-{'single' if w == 0 else w}"
            if name in skip:
                continue
            results[name] = r = run_one(kind, w, args)
            print(name, json.dumps({k: v for k, v in r.items() if k != "figures"}), flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    for kind, key in (("calib", "sha256"), ("eval", "figures")):
        vals = {k: v[key] for k, v in results.items() if k.startswith(kind)}
        if vals:
            print(f"{kind}: {'all equal' if len(set(vals.values())) == 1 else 'DIFFER'} across {sorted(vals)}")


if __name__ == "__main__":
    main()
