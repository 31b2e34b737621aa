"""Exporter quirks, each a small generated model: converted to both formats, the integer graph must
keep every Conv/Gemm an integer module, and both graphs must stay close to the float model."""
import os

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import dfq_onnx
from dfq_onnx import QuantConfig
from dfq_onnx.pipeline import run

from helpers import run_ort

RNG = np.random.default_rng(21)


def init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def model(nodes, inits, in_shape, out_shape, opset=13):
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def sqnr(ref, y):
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - y) ** 2)))


def w(*shape):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return RNG.normal(size=shape) * np.sqrt(2 / fan_in)


def bn_inits(p, c):
    return [init(f"{p}_s", RNG.uniform(0.5, 1.5, c)), init(f"{p}_b", RNG.normal(size=c) * 0.1),
            init(f"{p}_m", RNG.normal(size=c) * 0.1), init(f"{p}_v", RNG.uniform(0.5, 1.5, c))]


def bn(p, x, y):
    return helper.make_node("BatchNormalization", [x, f"{p}_s", f"{p}_b", f"{p}_m", f"{p}_v"], [y])


def weights_in_constant_nodes():
    return model([helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w(6, 3, 3, 3).astype(np.float32))),
                  helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.zeros(6, np.float32))),
                  helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c"], ["r"]),
                  helper.make_node("Conv", ["r", "w2"], ["y"])], [init("w2", w(4, 6, 1, 1))],
                 ["n", 3, 8, 8], ["n", 4, 8, 8]), ["n", 3, 8, 8]


def tf2onnx_nhwc_transposes():
    """NHWC input; tf2onnx wraps each Conv in Transpose(NHWC->NCHW) ... Transpose(NCHW->NHWC)."""
    return model([helper.make_node("Transpose", ["x"], ["t0"], perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", ["t0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["r1"]),
                  helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", ["t2", "w2"], ["c2"]),
                  helper.make_node("Transpose", ["c2"], ["y"], perm=[0, 2, 3, 1])],
                 [init("w1", w(6, 3, 3, 3)), init("b1", np.zeros(6)), init("w2", w(4, 6, 1, 1))],
                 ["n", 8, 8, 3], ["n", 8, 8, 4]), ["n", 8, 8, 3]


def batchnorm_after_no_linear_layer():
    """A BatchNormalization right after the input and one after a MaxPool: nothing to fold into."""
    return model([bn("bn0", "x", "n0"),
                  helper.make_node("Conv", ["n0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["r1"]),
                  helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                  bn("bn1", "p", "n1"),
                  helper.make_node("Conv", ["n1", "w2"], ["y"])],
                 bn_inits("bn0", 3) + bn_inits("bn1", 6) + [init("w1", w(6, 3, 3, 3)), init("w2", w(4, 6, 1, 1))],
                 ["n", 3, 8, 8], ["n", 4, 4, 4]), ["n", 3, 8, 8]


def shared_weight():
    """One weight tensor read by two Convs, each followed by its own BatchNormalization."""
    return model([helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]), bn("bn1", "c1", "n1"),
                  helper.make_node("Relu", ["n1"], ["r1"]),
                  helper.make_node("Conv", ["r1", "w"], ["c2"], pads=[1, 1, 1, 1]), bn("bn2", "c2", "y")],
                 [init("w", w(4, 4, 3, 3))] + bn_inits("bn1", 4) + bn_inits("bn2", 4),
                 ["n", 4, 8, 8], ["n", 4, 8, 8]), ["n", 4, 8, 8]


def conv_without_bias():
    return model([helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c1"], ["r1"]),
                  helper.make_node("Conv", ["r1", "w2"], ["y"], group=2)],
                 [init("w1", w(6, 3, 3, 3)), init("w2", w(4, 3, 1, 1))], ["n", 3, 9, 9], ["n", 4, 5, 5]), ["n", 3, 9, 9]


def gemm_transposes():
    return model([helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
                  helper.make_node("Gemm", ["xt", "w1", "b1"], ["h"], transA=1, transB=1),
                  helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], alpha=0.5, beta=2.0)],
                 [init("w1", w(8, 12)), init("b1", RNG.normal(size=8) * 0.1), init("w2", w(8, 5)),
                  init("b2", RNG.normal(size=5) * 0.1)], ["n", 12], ["n", 5]), ["n", 12]


QUIRKS = [weights_in_constant_nodes, tf2onnx_nhwc_transposes, batchnorm_after_no_linear_layer, shared_weight,
          conv_without_bias, gemm_transposes]


@pytest.mark.parametrize("build", QUIRKS, ids=lambda f: f.__name__)
def test_exporter_quirk_converts_in_both_formats(build):
    m, shape = build()
    shape = [s if isinstance(s, int) else 48 for s in shape]
    x = RNG.normal(size=shape).astype(np.float32)
    cal, test = {"x": x[:32]}, {"x": x[32:]}
    ref = run_ort(m, test)[0]
    got = {}
    for fmt in ("qdq", "int"):
        r = run(m, cal, QuantConfig(format=fmt, layout="unified", target="ort-x86-vnni"))
        got[fmt] = sqnr(ref, run_ort(r.model, test)[0])
        if fmt == "int":
            ops = dfq_onnx.inspect(r.model)["op_types"]
            assert not {"Conv", "Gemm", "MatMul"} & set(ops), ops  # every linear layer in integers
    assert got["qdq"] > 25 and got["int"] > got["qdq"] - 1.0, got


@settings(max_examples=60, deadline=None, derandomize=os.environ.get("CI") == "true")
@given(st.sampled_from(["conv", "gemm", "gemm_transB"]), st.integers(1, 3), st.integers(0, 1),
       st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_batchnorm_before_a_layer_folds_forward_exactly_where_valid(kind, groups, pad, zero_shift, bias, seed):
    """A BatchNormalization read only by a Conv (any group, padded or not) or a Gemm: the fused
    model computes the float model's function, and the BatchNormalization is gone exactly where
    folding it is exact (no Conv padding, or a zero shift)."""
    rng = np.random.default_rng(seed)
    c = 2 * groups
    s, shift = rng.uniform(0.3, 2.0, c), np.zeros(c) if zero_shift else rng.normal(size=c)
    var = rng.uniform(0.5, 1.5, c)
    gamma = s * np.sqrt(var + 1e-5)
    mean = np.zeros(c) if zero_shift else rng.normal(size=c)
    bn_inits = [init("g", gamma), init("b", shift + mean * s), init("m", mean), init("v", var)]
    bn_node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"])
    if kind == "conv":
        layer = helper.make_node("Conv", ["n", "w"] + (["wb"] if bias else []), ["y"], group=groups, pads=[pad] * 4)
        inits = [init("w", w(3 * groups, 2, 3, 3))] + ([init("wb", rng.normal(size=3 * groups))] if bias else [])
        in_shape, out_shape = ["n", c, 6, 6], ["n", 3 * groups, 6 - 2 + 2 * pad, 6 - 2 + 2 * pad]
    else:
        trans = int(kind == "gemm_transB")
        layer = helper.make_node("Gemm", ["n", "w"] + (["wb"] if bias else []), ["y"], transB=trans)
        inits = [init("w", w(5, c) if trans else w(c, 5))] + ([init("wb", rng.normal(size=5))] if bias else [])
        in_shape, out_shape = ["n", c], ["n", 5]
    m = model([bn_node, layer], bn_inits + inits, in_shape, out_shape)
    fused = dfq_onnx.fuse(m)
    folds = kind != "conv" or zero_shift or pad == 0
    assert ("BatchNormalization" in {n.op_type for n in fused.graph.node}) != folds
    x = {"x": rng.normal(size=[4] + in_shape[1:]).astype(np.float32)}
    np.testing.assert_allclose(run_ort(fused, x)[0], run_ort(m, x)[0], rtol=1e-4, atol=1e-4)


def test_a_model_at_onnx_newest_opset_runs_after_conversion():
    """onnx may define opsets that onnxruntime does not implement QuantizeLinear for (onnx 1.23:
    opset 28; onnxruntime 1.32: up to 27). The quantized model must still run: it is converted
    down to the newest opset onnxruntime has Q/DQ kernels for."""
    from dfq_onnx.model_io import runtime_qdq_opset
    newest = onnx.defs.onnx_opset_version()
    m = model([helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
               helper.make_node("Conv", ["r", "w2"], ["y"])], [init("w1", w(6, 3, 3, 3)), init("w2", w(4, 6, 1, 1))],
              ["n", 3, 8, 8], ["n", 4, 8, 8], opset=newest)
    x = RNG.normal(size=(40, 3, 8, 8)).astype(np.float32)
    ref = run_ort(m, {"x": x[32:]})[0]
    for fmt in ("qdq", "int"):
        r = run(m, {"x": x[:32]}, QuantConfig(format=fmt))
        opset = next(o.version for o in r.model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == min(newest, runtime_qdq_opset())
        assert sqnr(ref, run_ort(r.model, {"x": x[32:]})[0]) > 25
