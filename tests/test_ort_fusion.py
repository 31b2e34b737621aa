"""The default QDQ model is one onnxruntime runs in int8: every convolution whose input and output
are quantized becomes a QLinearConv in onnxruntime's optimized graph, whatever the signs of its
input and output codes (onnxruntime's CPU kernels fuse only uint8 -> uint8: signed codes are
written as uint8 with zero point 128). Oracles: onnxruntime's own optimized graph, and the same
model run without optimizations (Q/DQ as float ops: the arithmetic the model means)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx import QuantConfig
from dfq_onnx.pipeline import run

from helpers import run_ort

ACTS = ["none", "Relu", "HardSwish", "Relu6", "Sigmoid"]


def chain(acts, seed):
    """Conv -> act -> Conv -> act ... -> Conv (the logits); C channels, 3x3 or 1x1 or depthwise."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, c = [], [], "x", 3
    for i, act in enumerate(list(acts) + ["last"]):
        co = 8 if act != "last" else 4
        group = c if (i % 3 == 2 and co == c) else 1
        k = 3 if i % 2 == 0 else 1
        w = (rng.normal(size=(co, c // group, k, k)) / np.sqrt(c * k * k / group)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array((0.1 * rng.normal(size=co)).astype(np.float32), f"b{i}")]
        y = f"conv{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], pads=[k // 2] * 4, group=group))
        if act == "Relu6":
            inits += [numpy_helper.from_array(np.float32(0), f"lo{i}"), numpy_helper.from_array(np.float32(6), f"hi{i}")]
            nodes.append(helper.make_node("Clip", [y, f"lo{i}", f"hi{i}"], [f"a{i}"]))
            y = f"a{i}"
        elif act not in ("none", "last"):
            nodes.append(helper.make_node(act, [y], [f"a{i}"]))
            y = f"a{i}"
        x, c = y, co
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 4, "h", "w"])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def optimized_ops(model, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.sampled_from(ACTS), min_size=1, max_size=4), st.integers(0, 1000))
def test_every_inner_convolution_runs_in_int8(tmp_path_factory, acts, seed):
    m = chain(acts, seed)
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(16, 3, 10, 10)) + 0.3).astype(np.float32)
    r = run(m, {"x": x}, QuantConfig())
    ops = optimized_ops(r.model, tmp_path_factory.mktemp("opt"))
    # the last Conv writes the logits from its int32 accumulator (no requantization): float in onnxruntime
    assert ops.count("QLinearConv") == len(acts), (acts, ops)
    np.testing.assert_allclose(run_ort(r.model, {"x": x})[0], run_ort(r.model, {"x": x}, optimize=False)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("second", ["GlobalAveragePool", "MaxPool", "Conv"])
def test_a_signed_tensor_read_twice_still_fuses(tmp_path, second):
    """A convolution output without activation (signed codes) read by two ops, as in
    squeeze-excite blocks: onnxruntime's own int8 -> uint8 rewrite gives up on such a tensor and
    every convolution stayed float (0 of 3 QLinearConv before signed codes were written as uint8)."""
    rng = np.random.default_rng(0)

    def w(n, co, ci, k):
        return numpy_helper.from_array((rng.normal(size=(co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32), n)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["y0"], pads=[1] * 4),
             helper.make_node("Conv", ["y0", "w1"], ["y1"], pads=[1] * 4)]
    inits = [w("w0", 8, 3, 3), w("w1", 8, 8, 3), w("w2", 4, 8, 1), w("w3", 8, 8, 1)]
    nodes.append({"GlobalAveragePool": helper.make_node("GlobalAveragePool", ["y0"], ["y2"]),
                  "MaxPool": helper.make_node("MaxPool", ["y0"], ["y2"], kernel_shape=[3, 3], pads=[1] * 4),
                  "Conv": helper.make_node("Conv", ["y0", "w3"], ["y2"])}[second])
    nodes += [helper.make_node("Mul", ["y1", "y2"], ["y3"]), helper.make_node("Conv", ["y3", "w2"], ["out"])]
    g = helper.make_graph(nodes, "branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 10])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 10, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    x = rng.normal(size=(16, 3, 10, 10)).astype(np.float32)
    r = run(m, {"x": x})
    ops = optimized_ops(r.model, tmp_path)
    assert ops.count("QLinearConv") == (3 if second == "Conv" else 2) and "QLinearMul" in ops, ops
    np.testing.assert_allclose(run_ort(r.model, {"x": x})[0], run_ort(r.model, {"x": x}, optimize=False)[0],
                               rtol=1e-5, atol=1e-5)
