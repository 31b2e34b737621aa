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


def shufflenet_unit(groups=4, c=16, batch="n"):
    """Grouped 1x1 Conv -> Relu -> channel shuffle (Reshape [N,G,C/G,H,W] -> Transpose(0,2,1,3,4) ->
    Reshape) -> depthwise 3x3 Conv -> grouped 1x1 Conv -> Relu -> 1x1 Conv (the logits)."""
    rng = np.random.default_rng(3)

    def w(n, co, ci, k):
        return numpy_helper.from_array((rng.normal(size=(co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32), n)
    inits = [w("w0", c, 3, 3), w("w1", c, c // groups, 1), w("w2", c, 1, 3), w("w3", c, c // groups, 1), w("w4", 4, c, 1),
             numpy_helper.from_array(np.array([0, groups, c // groups, 8, 8], dtype=np.int64), "s5"),
             numpy_helper.from_array(np.array([0, c, 8, 8], dtype=np.int64), "s4")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["y0"], pads=[1] * 4),
             helper.make_node("Relu", ["y0"], ["a0"]),
             helper.make_node("Conv", ["a0", "w1"], ["y1"], group=groups),
             helper.make_node("Relu", ["y1"], ["a1"]),
             helper.make_node("Reshape", ["a1", "s5"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["r2"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["r2", "s4"], ["r3"]),
             helper.make_node("Conv", ["r3", "w2"], ["y2"], pads=[1] * 4, group=c),
             helper.make_node("Conv", ["y2", "w3"], ["y3"], group=groups),
             helper.make_node("Relu", ["y3"], ["a3"]),
             helper.make_node("Conv", ["a3", "w4"], ["out"])]
    g = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def test_channel_shuffle_is_a_gather_of_codes(tmp_path, monkeypatch):
    """The default (layout ort) QDQ model writes a channel shuffle of codes as one Gather on axis 1
    (onnxruntime ran the 5-D Transpose of the shuffle on uint8, and in NHWC it cost ShuffleNet 1.6x
    the float model's time). Oracle: the same quantized model written with the Reshape -> Transpose
    -> Reshape, under onnxruntime optimized and with every optimization off: identical outputs."""
    import dfq_onnx.pipeline as pipeline
    from dfq_onnx.passes.emit_qdq import emit_qdq

    m = shufflenet_unit()
    x = (np.random.default_rng(0).normal(size=(16, 3, 8, 8)) + 0.3).astype(np.float32)
    r = run(m, {"x": x})
    assert r.facts["shuffle_as_gather"] == 1
    ops = optimized_ops(r.model, tmp_path)
    assert "Gather" in ops and ops.count("QLinearConv") == 4, ops
    assert not any(n.op_type == "Transpose" and len(helper.get_attribute_value(n.attribute[0])) == 5
                   for n in r.model.graph.node)
    monkeypatch.setattr(pipeline, "emit_qdq", lambda g, qm, **kw: emit_qdq(g, qm, **{**kw, "shuffle_as_gather": False}))
    plain = run(m, {"x": x})
    assert plain.facts["shuffle_as_gather"] == 0 and "Transpose" in [n.op_type for n in plain.model.graph.node]
    ref = run_ort(plain.model, {"x": x}, optimize=False)[0]
    np.testing.assert_array_equal(run_ort(r.model, {"x": x}, optimize=False)[0], ref)
    np.testing.assert_array_equal(run_ort(r.model, {"x": x})[0], run_ort(plain.model, {"x": x})[0])
    np.testing.assert_allclose(run_ort(r.model, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int", "qonnx"])
def test_channel_shuffle_gather_only_for_the_ort_layout(fmt):
    r = run(shufflenet_unit(), {"x": np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)},
            QuantConfig(format=fmt))
    assert r.facts.get("shuffle_as_gather", 0) == 0
    assert "Transpose" in [n.op_type for n in r.model.graph.node]


def prelu_chain(channels=(10, 16), hw=("h", "w")):
    """Conv -> PRelu (per-channel slopes of either sign, as MTCNN's) -> MaxPool -> Conv -> PRelu -> Conv."""
    rng = np.random.default_rng(5)
    nodes, inits, x, c = [], [], "x", 3
    for i, co in enumerate(channels):
        inits += [numpy_helper.from_array((rng.normal(size=(co, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.uniform(-1.3, 1.0, size=(1, co, 1, 1)).astype(np.float32), f"s{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1] * 4),
                  helper.make_node("PRelu", [f"c{i}", f"s{i}"], [f"p{i}"])]
        x, c = f"p{i}", co
        if i == 0:
            nodes.append(helper.make_node("MaxPool", [x], ["mp"], kernel_shape=[2, 2], strides=[2, 2]))
            x = "mp"
    inits.append(numpy_helper.from_array((rng.normal(size=(4, c, 1, 1)) / np.sqrt(c)).astype(np.float32), "wl"))
    nodes.append(helper.make_node("Conv", [x, "wl"], ["out"]))
    g = helper.make_graph(nodes, "prelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, *hw])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, None, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def test_prelu_of_codes_is_split(tmp_path, monkeypatch):
    """The default QDQ model writes a PRelu between DQ and Q as Relu(x) + Min(x, 0) * slope
    (onnxruntime's PRelu with the NHWC slope [1,1,1,C] took 70 % of MTCNN P-Net's time). Oracle:
    the same quantized model with the PRelu, under onnxruntime optimized and with every
    optimization off: identical outputs."""
    import dfq_onnx.pipeline as pipeline
    from dfq_onnx.passes.emit_qdq import emit_qdq

    m = prelu_chain()
    x = (np.random.default_rng(1).normal(size=(16, 3, 12, 16))).astype(np.float32)
    r = run(m, {"x": x})
    assert r.facts["prelu_split"] == 2
    ops = optimized_ops(r.model, tmp_path)
    assert "PRelu" not in ops and ops.count("QLinearConv") == 2, ops
    monkeypatch.setattr(pipeline, "emit_qdq", lambda g, qm, **kw: emit_qdq(g, qm, **{**kw, "prelu_split": False}))
    plain = run(m, {"x": x})
    assert plain.facts["prelu_split"] == 0 and "PRelu" in [n.op_type for n in plain.model.graph.node]
    for batch in (x, x[:1], -x[:4]):
        ref = run_ort(plain.model, {"x": batch}, optimize=False)[0]
        np.testing.assert_array_equal(run_ort(r.model, {"x": batch}, optimize=False)[0], ref)
        np.testing.assert_array_equal(run_ort(r.model, {"x": batch})[0], run_ort(plain.model, {"x": batch})[0])
    # the rewrite alone, on every float32 sign/size class: PRelu and the split agree bit for bit
    v = np.concatenate([np.array([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38], np.float32),
                        np.random.default_rng(2).normal(scale=[[1e-3], [1.0], [1e3]], size=(3, 4000)).ravel().astype(np.float32)])
    v = np.resize(v, (1, 4, 1, v.size // 4 + 1)).astype(np.float32)
    s = np.array([-1.3, 0.0, 0.25, 1.0], np.float32).reshape(1, 4, 1, 1)
    g = helper.make_graph([helper.make_node("PRelu", ["v", "s"], ["a"]),
                           helper.make_node("Relu", ["v"], ["r"]), helper.make_node("Min", ["v", "z"], ["mn"]),
                           helper.make_node("Mul", ["mn", "s"], ["ms"]), helper.make_node("Add", ["r", "ms"], ["b"])],
                          "split", [helper.make_tensor_value_info("v", TensorProto.FLOAT, list(v.shape))],
                          [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k in "ab"],
                          [numpy_helper.from_array(s, "s"), numpy_helper.from_array(np.float32(0), "z")])
    a, b = run_ort(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), {"v": v})
    np.testing.assert_array_equal(a + 0.0, b + 0.0)  # + 0.0: the sign of a zero is lost in QuantizeLinear anyway


def test_prelu_on_small_maps_stays_prelu():
    """Maps under PRELU_SPLIT_MIN_PIXELS keep the PRelu (the split's extra ops cost more there)."""
    r = run(prelu_chain(hw=(12, 16)), {"x": np.random.default_rng(1).normal(size=(8, 3, 12, 16)).astype(np.float32)})
    assert r.facts["prelu_split"] == 0 and [n.op_type for n in r.model.graph.node].count("PRelu") == 2
