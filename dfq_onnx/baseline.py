"""onnxruntime's own static quantizer, run the way the benchmark and the hardware report compare
against: quant_pre_process, then quantize_static with QDQ, per-channel int8 weights, int8
activations, MinMax (or Percentile) calibration on the same samples in the same batches."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import onnx

from .calibration_data import DataSource, input_specs
from .errors import DfqError
from .model_io import load_model


def ort_quantize(model, calib, *, num_samples: int = 128, batch_size: int = 8, preprocess: str | None = None,
                 method: str = "minmax", symmetric_activations: bool = False) -> onnx.ModelProto:
    """The model quantized by onnxruntime.quantization.quantize_static (see module docstring).
    The model is upgraded to opset 13 first when older, as dfq-onnx's loader does.
    symmetric_activations: activation zero points 0 (its ActivationSymmetric option; by default
    it fits an int8 zero point to each activation's [min, max], which dfq-onnx's format does not
    have)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in ("minmax", "percentile"):
        raise DfqError(f"unknown calibration method {method!r} for onnxruntime's quantizer")
    src = load_model(model)
    data = DataSource(calib, input_specs(src), num_samples=num_samples, preprocess=preprocess)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data.batches(batch_size))

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(data.batches(batch_size))

    with tempfile.TemporaryDirectory() as tmp:
        raw, pre, out = (Path(tmp) / n for n in ("in.onnx", "pre.onnx", "out.onnx"))
        onnx.save(src, str(raw))
        del src
        try:
            # its symbolic shape inference saves sym_shape_infer_temp.onnx in the current directory
            # when it gives up: run it in the scratch directory, so nothing lands beside the user
            with contextlib.chdir(tmp):
                quant_pre_process(str(raw), str(pre))
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax if method == "minmax"
                            else CalibrationMethod.Percentile,
                            extra_options={"ActivationSymmetric": symmetric_activations})
        except DfqError:
            raise
        except Exception as e:
            raise DfqError(f"onnxruntime's quantizer failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return onnx.load(str(out))
