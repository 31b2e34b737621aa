"""One conversion, alone in its own process, so that its wall time and peak RSS are its own.

  python bench/convert_one.py TOOL MODEL OUT --calib DATA [--preprocess SPEC] [--num-samples N]
                              [--input-name NAME] [--no-ort-pre-process]

TOOL: dfq-qdq | dfq-int (dfq_onnx.convert) | ort-minmax | ort-percentile (onnxruntime's
quantize_static: QDQ, per-channel, int8 weights and activations).

Both tools are fed the way a user feeds them: the calibration samples are first read into
in-memory numpy arrays (a .npz is np.load-ed; a folder of images is decoded with --preprocess),
before the clock starts and before the model is touched; then dfq-onnx gets that dict of arrays
(dfq_onnx.convert(model, arrays, ...)) and onnxruntime a CalibrationDataReader over the same
arrays in batches of BATCH, as onnxruntime's quantization docs and examples write it. Neither
tool's model is loaded by the other's code. onnxruntime's side runs what its docs recommend
before quantize_static, in this process and counted in its time: a model below opset 13 is first
upgraded to 13 (its per-channel QDQ output needs DequantizeLinear's axis; the quantizer writes
an invalid model otherwise), then `quant_pre_process` (shape inference and graph optimization:
BatchNorm folded; without it onnxruntime's quantized MobileNetV2 keeps 52 float BatchNorms and
falls to 52 % agreement); --no-ort-pre-process skips the latter. Both run in a scratch directory.

--input-name: the model's (single) input; the .npz's array is fed under that name, so the model
need not be read to find it (reading a 550 MB model only for its input names would raise the peak
RSS of both tools). Without it the model is read without its weights for its input specs.

The last line printed is JSON: {"seconds": conversion wall time, measured from the call with the
model path to after writing OUT; "peak_rss_mb": this process's peak resident set (VmHWM),
interpreter, imports and the in-memory calibration arrays included (the same arrays for both
tools); "data_mb": the calibration arrays' size}. VmHWM is read here, not with the parent's
os.wait4: on Linux a child's ru_maxrss starts from its parent's peak at fork.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 8  # dfq_onnx's default calibration batch; onnxruntime's reader yields the same batches


def load_arrays(calib: str, model: Path, n: int, preprocess: str | None, input_name: str | None) -> dict:
    """The first n calibration samples as a dict input name -> array (N, ...)."""
    p = Path(calib)
    if p.suffix.lower() == ".npz" and input_name:
        with np.load(p, allow_pickle=False) as z:
            keys = [k for k in z.files if k != "labels"]
            key = input_name if input_name in keys else keys[0]
            return {input_name: np.ascontiguousarray(z[key][:n])}
    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.model_io import read_model

    specs = input_specs(read_model(str(model), external_data=False))
    out: dict = {}
    at = 0
    for b in DataSource(calib, specs, num_samples=n, preprocess=preprocess).batches(BATCH):
        if not out:  # room for n samples; pages never written are never resident
            out = {k: np.empty((n,) + v.shape[1:], v.dtype) for k, v in b.items()}
        m = len(next(iter(b.values())))  # each batch copied into place as it is decoded: the peak is
        for k, v in b.items():           # the arrays plus one batch, not twice the arrays
            out[k][at:at + m] = v
        at += m
    return {k: v[:at] for k, v in out.items()}


def convert_dfq(model: Path, out: Path, arrays: dict, fmt: str, args) -> None:
    import dfq_onnx
    from dfq_onnx.model_io import save_model

    cfg = dfq_onnx.QuantConfig(format=fmt, num_samples=len(next(iter(arrays.values()))), batch_size=BATCH)
    save_model(dfq_onnx.convert(str(model), arrays, cfg), out, model)  # an input over 2 GB: OUT + OUT.data


class ArrayReader:
    """onnxruntime's CalibrationDataReader over in-memory arrays, as its docs write one."""

    def __init__(self, arrays: dict, batch: int):
        n = len(next(iter(arrays.values())))
        self.batches = [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def convert_ort(model: Path, out: Path, arrays: dict, method: str, args) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    reader = type("Reader", (ArrayReader, CalibrationDataReader), {})(arrays, BATCH)
    model, out = model.resolve(), out.resolve()  # the work below runs in a scratch directory
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # its scratch files stay in tmp
        src = model
        import onnx

        opset = next((o.version for o in onnx.load(str(model), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), 13)
        if opset < 13:  # per-channel DequantizeLinear needs axis (opset 13); its quantizer does not upgrade
            from onnx import version_converter

            src = Path(tmp) / "opset13.onnx"
            onnx.save(version_converter.convert_version(onnx.load(str(model)), 13), str(src))
        if not args.no_ort_pre_process:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre))
            src = pre
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile,
                        use_external_data_format=sum(f.stat().st_size for f in model.parent.glob(model.name + "*")) > 1_900_000_000)


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
    ap.add_argument("--input-name", default=None)
    ap.add_argument("--no-ort-pre-process", action="store_true")
    args = ap.parse_args(argv)
    arrays = load_arrays(args.calib, args.model, args.num_samples, args.preprocess, args.input_name)
    data_mb = sum(a.nbytes for a in arrays.values()) / 2 ** 20
    kind, variant = args.tool.split("-")
    fn = convert_dfq if kind == "dfq" else convert_ort
    t0 = time.perf_counter()
    fn(args.model, args.out, arrays, variant, args)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "data_mb": data_mb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
