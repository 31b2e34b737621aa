"""One conversion, alone in its own process, so that its wall time and peak RSS are its own.

  python bench/convert_one.py TOOL MODEL OUT --calib DATA [--preprocess SPEC] [--num-samples N]

TOOL: dfq-qdq | dfq-int (dfq_onnx.convert) | ort-minmax | ort-percentile (onnxruntime's
quant_pre_process + quantize_static: QDQ, per-channel, int8 weights and activations). Both tools
read the same calibration samples through the same reader (dfq_onnx.calibration_data.DataSource)
in batches of BATCH. The last line printed is JSON: {"seconds": conversion wall time, measured
from before loading the model to after writing OUT, pre-processing included; "peak_rss_mb": this
process's peak resident set (VmHWM), interpreter and imports included}. VmHWM is read here, not
with the parent's os.wait4: on Linux a child's ru_maxrss starts from its parent's peak at fork.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BATCH = 8  # dfq_onnx's default calibration batch; onnxruntime's reader yields the same batches


def convert_dfq(model: Path, out: Path, calib: str, preprocess: str | None, n: int, fmt: str) -> None:
    import dfq_onnx
    from dfq_onnx.model_io import save_model

    cfg = dfq_onnx.QuantConfig(format=fmt, num_samples=n, batch_size=BATCH)
    save_model(dfq_onnx.convert(str(model), calib, cfg, preprocess=preprocess), out)


def convert_ort(model: Path, out: Path, calib: str, preprocess: str | None, n: int, method: str) -> None:
    import onnx

    from dfq_onnx.baseline import ort_quantize

    onnx.save(ort_quantize(str(model), calib, num_samples=n, batch_size=BATCH, preprocess=preprocess,
                           method=method), str(out))


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource  # not Linux: the best available, same meaning for a fresh process
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tool", choices=["dfq-qdq", "dfq-int", "ort-minmax", "ort-percentile"])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--preprocess", default=None)
    ap.add_argument("--num-samples", type=int, default=128)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    kind, variant = args.tool.split("-")
    fn = convert_dfq if kind == "dfq" else convert_ort
    fn(args.model, args.out, args.calib, args.preprocess, args.num_samples, variant)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
