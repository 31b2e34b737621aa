"""Each accuracy technique off and on, on MobileNetV2 and EfficientNet-Lite0; adds a section to BENCHMARKS.md.

  python bench/techniques.py          # after bench/run.py (models and data in bench/cache)

Converts in-process with dfq_onnx.pipeline.run on the benchmark's 128 calibration samples:
W8A8 plain (no range alignment, no bias correction), alignment only, bias correction only, both
(the default), and data-free (--calib none); W4A8 MobileNetV2 plain, alignment only, bias
correction only, both. Each result runs under dfq_onnx.validate on the 320 evaluation crops:
top-1 agreement with float deployed (default onnxruntime optimizations) and simulated (none), and
output SQNR. Results go to bench/cache/techniques.json; BENCHMARKS.md is re-rendered.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import data as bench_data  # noqa: E402
import run as bench_run  # noqa: E402
import zoo  # noqa: E402

SETTINGS = {  # label -> (weight bits, align, bias correction, data-free)
    "plain": (8, False, False, False),
    "alignment": (8, True, False, False),
    "bias correction": (8, False, True, False),
    "alignment + bias correction (default)": (8, True, True, False),
    "data-free (--calib none)": (8, True, False, True),
    "W4A8 plain": (4, False, False, False),
    "W4A8 alignment": (4, True, False, False),
    "W4A8 bias correction": (4, False, True, False),
    "W4A8 alignment + bias correction": (4, True, True, False),
}
MODELS = {"mobilenet_v2": list(SETTINGS), "efficientnet_lite0": [k for k in SETTINGS if not k.startswith("W4")]}


def main() -> int:
    from dfq_onnx import QuantConfig
    from dfq_onnx.pipeline import run
    from dfq_onnx.validate import validate

    cache = zoo.DEFAULT_CACHE
    paths = bench_data.build_data(cache)
    out = {"machine": bench_run.machine(), "models": {}}
    for name, labels in MODELS.items():
        entry = zoo.ZOO[name]
        model = str(entry.path(cache))
        rows = {}
        for label in labels:
            bits, align, bc, free = SETTINGS[label]
            t0 = time.perf_counter()
            cfg = QuantConfig(weight_bits=bits, align=align, bias_correction=bc, num_samples=bench_run.CALIB)
            q = run(model, "none" if free else str(paths["calib"]), cfg, preprocess=entry.preprocess).model
            v = validate(model, q, str(paths["eval"]), preprocess=entry.preprocess, threads=bench_run.THREADS, runs=1)
            rows[label] = {"agreement_top1": v["agreement_top1"], "sqnr_db": min(v["sqnr_db"].values()),
                           "simulated_agreement_top1": v["simulated"]["agreement_top1"],
                           "simulated_sqnr_db": min(v["simulated"]["sqnr_db"].values()), "samples": v["samples"]}
            print(f"{name} {label}: {rows[label]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        out["models"][name] = rows
    (cache / "techniques.json").write_text(json.dumps(out, indent=1))
    (ROOT / "BENCHMARKS.md").write_text(bench_run.render(bench_run.load_results(cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
