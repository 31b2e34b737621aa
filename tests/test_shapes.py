"""Input shapes as exporters write them: dynamic spatial dims, -1 batch, one size for calibration
and another for validation."""
import numpy as np
import onnx

from dfq_onnx import QuantConfig
from dfq_onnx.pipeline import run

from helpers import CALIB, SHIPPED, TEST, run_ort


def sqnr(ref, y):
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - y) ** 2)))


def dynamic_spatial(model_path) -> onnx.ModelProto:
    """The model with its batch and spatial dims made symbolic and no stored intermediate shapes,
    as a detector export with input [N, C, H, W] comes."""
    m = onnx.load(model_path)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for k, name in ((0, "N"), (2, "H"), (3, "W")):
            if k < len(dims):
                dims[k].dim_param = name
    del m.graph.value_info[:]
    return m


def test_dynamic_spatial_dims_quantize_like_fixed_ones():
    """onnx's shape inference loses H and W at the first Conv, so the residual Adds looked
    shape-mismatched and stayed float (islands: 2 Add, 2 Relu, 1 MaxPool); symbolic shape
    inference keeps both branches equal, so the modules are the fixed-shape model's."""
    cal, test = np.load(CALIB)["input"], np.load(TEST)["input"][:300]
    dyn = dynamic_spatial(SHIPPED)
    for fmt in ("qdq", "int"):
        fixed = run(SHIPPED, {"input": cal}, QuantConfig(format=fmt))
        got = run(dyn, {"input": cal}, QuantConfig(format=fmt))
        assert not got.float_ops, got.float_ops
        assert got.requant_by_kind == fixed.requant_by_kind
        ref = run_ort(SHIPPED, {"input": test})[0]
        a = sqnr(ref, run_ort(fixed.model, {"input": test})[0])
        b = sqnr(ref, run_ort(got.model, {"input": test})[0])
        assert b >= a - 0.5, (fmt, a, b)


def test_calibration_at_one_size_and_validation_at_another():
    """A fully convolutional model with dynamic spatial dims, calibrated on 28x28 digits and run on
    40x40 (padded) ones: the converted model takes the new size and stays close to float."""
    cal, test = np.load(CALIB)["input"], np.load(TEST)["input"][:200]
    dyn = dynamic_spatial(SHIPPED)
    r = run(dyn, {"input": cal}, QuantConfig())
    big = np.pad(test, [(0, 0), (0, 0), (6, 6), (6, 6)])
    ref = run_ort(dyn, {"input": big})[0]
    y = run_ort(r.model, {"input": big})[0]
    assert y.shape == ref.shape and sqnr(ref, y) > 20, sqnr(ref, y)
