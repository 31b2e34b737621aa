"""Each accuracy technique off and on, on MobileNetV2, EfficientNet-Lite0 and open_nsfw; adds a section to BENCHMARKS.md.

  python bench/techniques.py          # after bench/run.py (models and data in bench/cache)

Converts in-process with dfq_onnx.pipeline.run on the benchmark's 128 calibration samples, with
the SETTINGS below (each a QuantConfig; open_nsfw, the ResNet-class model, with the rounding and
sparsity rows only). Each result runs under
dfq_onnx.validate on the 320 evaluation crops:
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

SETTINGS = {  # label -> QuantConfig fields (num_samples added), plus "calib": "none" for data-free
    "plain (--effort fast --no-align --no-bias-correction)": dict(align=False, bias_correction=False, effort="fast"),
    "alignment (--effort fast --no-bias-correction)": dict(bias_correction=False, effort="fast"),
    "bias correction (--effort fast --no-align)": dict(align=False, effort="fast"),
    "alignment + bias correction (--effort fast)": dict(effort="fast"),
    "+ fast exponent search (default, --effort default)": dict(),
    "default + second-order rounding (--rounding gptq)": dict(rounding="gptq"),
    "default + full exponent search (--search-exponents)": dict(search_exponents=True),
    "--effort max (second-order rounding in 4 stages + full search)": dict(effort="max"),
    "default + equalization (--equalize)": dict(equalize=True),
    "per-tensor weights, default": dict(per_channel=False),
    "per-tensor weights + equalization": dict(per_channel=False, equalize=True),
    "default, --max-drop 5 (raises modules to W8A16)": dict(max_drop=5.0),
    "W8A16 (--act-bits 16)": dict(act_bits=16),
    "data-free (--calib none)": dict(calib="none"),
    "W4A8 plain (--effort fast --no-align --no-bias-correction)": dict(weight_bits=4, align=False, bias_correction=False,
                                                                     effort="fast"),
    "W4A8 alignment + bias correction, rounded to nearest (--effort fast)": dict(weight_bits=4, effort="fast"),
    "W4A8 default (second-order rounding + fast search)": dict(weight_bits=4),
    "W4A8 --effort max": dict(weight_bits=4, effort="max"),
    "W4A8 equalization + alignment + bias correction (--effort fast)": dict(weight_bits=4, equalize=True, effort="fast"),
    "2:4 sparsity + W8A8, magnitude pruning then rounding (--rounding nearest)": dict(sparsity="2:4", rounding="nearest"),
    "2:4 sparsity + W8A8, joint Hessian update (default)": dict(sparsity="2:4"),
    "50 % unstructured sparsity + W8A8, joint Hessian update": dict(sparsity="0.5"),
}
MODELS = {"mobilenet_v2": list(SETTINGS),
          "efficientnet_lite0": [k for k in SETTINGS if "plain" not in k and "equalization" not in k],
          "open_nsfw": [k for k in SETTINGS if k.startswith(("alignment + bias", "+ fast", "default + second", "2:4",
                                                                 "50 %"))]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="re-run only the settings whose label contains this text; keep the others")
    args = ap.parse_args(argv)
    from dfq_onnx import QuantConfig
    from dfq_onnx.mixed_precision import convert_max_drop
    from dfq_onnx.pipeline import run
    from dfq_onnx.validate import validate

    cache = zoo.DEFAULT_CACHE
    paths = bench_data.build_data(cache)
    old = json.loads((cache / "techniques.json").read_text()) if args.only and (cache / "techniques.json").exists() else None
    out = {"machine": bench_run.machine(), "models": {}}
    for name, labels in MODELS.items():
        entry = zoo.ZOO[name]
        model = str(entry.path(cache))
        rows = {}
        for label in labels:
            if old is not None and args.only not in label and label in old["models"].get(name, {}):
                rows[label] = old["models"][name][label]
                continue
            opts = dict(SETTINGS[label])
            calib = opts.pop("calib", str(paths["calib"]))
            max_drop = opts.pop("max_drop", None)
            t0 = time.perf_counter()
            cfg = QuantConfig(num_samples=bench_run.CALIB, **opts)
            if max_drop is None:
                q = run(model, calib, cfg, preprocess=entry.preprocess).model
            else:
                q = convert_max_drop(model, calib, cfg, max_drop, preprocess=entry.preprocess)[0].model
            seconds = time.perf_counter() - t0
            v = validate(model, q, str(paths["eval"]), preprocess=entry.preprocess, threads=bench_run.THREADS, runs=1)
            rows[label] = {"seconds": seconds, "agreement_top1": v["agreement_top1"], "sqnr_db": min(v["sqnr_db"].values()),
                           "simulated_agreement_top1": v["simulated"]["agreement_top1"],
                           "simulated_sqnr_db": min(v["simulated"]["sqnr_db"].values()), "samples": v["samples"]}
            print(f"{name} {label}: {rows[label]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        out["models"][name] = rows
    (cache / "techniques.json").write_text(json.dumps(out, indent=1))
    bench_run.write_keeping(ROOT / "BENCHMARKS.md", bench_run.render(bench_run.load_results(cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
