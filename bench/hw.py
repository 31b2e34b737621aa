"""Hardware cost of requantization on the shipped model and MobileNetV2; adds a section to BENCHMARKS.md.

  apt-get install yosys iverilog      # Debian/Ubuntu
  python bench/hw.py                  # --models mnist,mobilenet_v2 (default)

For each model it runs the user's command, `dfq-onnx inspect MODEL --hw --calib DATA --json`
(hw_report.py: both requantizers synthesized with Yosys and simulated with Icarus Verilog on the
model's own int32 accumulators, totals over dfq-onnx's integer graph and onnxruntime's quantized
model, both calibrated on the benchmark's 128 samples), stores the JSON in
bench/cache/hardware.json and re-renders BENCHMARKS.md from bench/cache/results.json plus it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import data as bench_data  # noqa: E402
import run as bench_run  # noqa: E402
import zoo  # noqa: E402

MODELS = ("mnist", "mobilenet_v2")


def hw_model(name: str, cache: Path, paths: dict) -> dict:
    entry = zoo.ZOO[name]
    calib = str(ROOT / entry.calib) if entry.calib else str(paths["calib"])
    cmd = [sys.executable, "-m", "dfq_onnx.cli", "inspect", str(entry.path(cache)), "--hw", "--calib", calib,
           "--num-samples", str(bench_run.CALIB), "--json"] + (["--preprocess", entry.preprocess] if entry.preprocess else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"{name}: {p.stderr.strip()}")
    r = json.loads(p.stdout)
    r["seconds"] = time.perf_counter() - t0
    r["model"] = Path(r["model"]).name
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=zoo.DEFAULT_CACHE)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    paths = bench_data.build_data(args.cache)
    out = {"machine": bench_run.machine(), "models": {}}
    for n in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"{n}: inspect --hw ...", file=sys.stderr, flush=True)
        out["models"][n] = hw_model(n, args.cache, paths)
        print(f"{n}: {out['models'][n]['seconds']:.0f} s", file=sys.stderr, flush=True)
    (args.cache / "hardware.json").write_text(json.dumps(out, indent=1))
    bench_run.write_keeping(args.out, bench_run.render(bench_run.load_results(args.cache)))
    print(f"wrote {args.cache / 'hardware.json'} and {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
