"""Input shapes as exporters write them: dynamic spatial dims, -1 batch, one size for calibration
and another for validation."""
import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx import DfqError, QuantConfig
from dfq_onnx.pipeline import run

from graphgen import graphs
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


# --- every spelling of a dim: -1, dim_param, no value at all ------------------------------------

def symbolic(model: onnx.ModelProto, spelling: str) -> onnx.ModelProto:
    """A copy of the model whose inputs and outputs have every dim but the channel axis (axis 1)
    written as `spelling` ("param": a dim_param, "minus_one": dim_value -1, "unknown": neither),
    and no stored intermediate shapes: as exporters write dynamic batch and spatial dims."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if k == 1:
                continue
            d.Clear()
            if spelling == "param":
                d.dim_param = f"{vi.name}_d{k}"
            elif spelling == "minus_one":
                d.dim_value = -1
    del m.graph.value_info[:]
    return m


@settings(max_examples=int(os.environ.get("DFQ_SHAPE_GRAPHS", 40)), deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=os.environ.get("CI") == "true")
@given(graphs(), st.sampled_from(["param", "minus_one", "unknown"]))
def test_dynamic_dims_give_the_fixed_shape_models_integer_graph(case, spelling):
    """The oracle is the same graph with every dim fixed: made dynamic, it must form the same
    modules, pick the same fractions (calibration subsamples each sample the same way whatever
    its shape is known as) and give the same integer outputs, bit for bit."""
    try:
        fixed = run(case.model, case.feeds_calib, QuantConfig(format="int"))
    except DfqError as e:
        assert "nothing to quantize" in str(e)
        return
    dyn = run(symbolic(case.model, spelling), case.feeds_calib, QuantConfig(format="int"))
    assert dyn.float_ops == fixed.float_ops
    assert dyn.requant_by_kind == fixed.requant_by_kind
    assert dyn.facts["float_modules"] == fixed.facts["float_modules"]
    assert [m.integer for m in dyn.quantized.modules] == [m.integer for m in fixed.quantized.modules]
    assert dyn.quantized.tensors == fixed.quantized.tensors
    for a, b in zip(run_ort(fixed.model, case.feeds_test), run_ort(dyn.model, case.feeds_test)):
        np.testing.assert_array_equal(a, b)


def test_calibration_subsamples_a_dynamic_tensor_like_a_fixed_one():
    """The histogram of a tensor with dynamic dims sees the strided subset numpy takes of the
    float activation (stride (size // 8192) | 1), not the whole tensor."""
    from dfq_onnx.fixedpoint import abs_histogram
    from dfq_onnx.model_io import to_graph
    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.passes.calibrate import HIST_SAMPLES_PER_ITEM, calibrate

    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3, 72, 80)).astype(np.float32)  # 17,280 values per sample: stride 3
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, "h", "w"])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    y = run_ort(m, {"x": x})[0].reshape(6, -1)
    step = (y.shape[1] // HIST_SAMPLES_PER_ITEM) | 1
    assert step > 1
    stats = calibrate(to_graph(m), ["y"], DataSource({"x": x}, input_specs(m)), batch_size=4)["y"]
    assert stats.count == y.size and (stats.min, stats.max) == (y.min(), y.max())
    np.testing.assert_array_equal(stats.hist, abs_histogram(y[:, ::step]))


def test_a_fixed_batch_greater_than_one():
    """Input [4, 3, 8, 8]: calibration runs in batches of exactly 4 (10 samples: the last 2 are
    left out, never a batch the model cannot take) and the model keeps its batch."""
    rng = np.random.default_rng(4)
    w1, w2 = rng.normal(size=(6, 3, 3, 3)) * 0.3, rng.normal(size=(5, 6, 1, 1)) * 0.4
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5, 8, 8])],
                          [numpy_helper.from_array(w1.astype(np.float32), "w1"),
                           numpy_helper.from_array(w2.astype(np.float32), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    cal = rng.normal(size=(10, 3, 8, 8)).astype(np.float32)
    test = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    ref = run_ort(m, {"x": test})[0]
    for fmt in ("qdq", "int"):
        r = run(m, {"x": cal}, QuantConfig(format=fmt, batch_size=3))
        assert r.samples == 8
        assert [d.dim_value for d in r.model.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 8, 8]
        assert sqnr(ref, run_ort(r.model, {"x": test})[0]) > 25


def test_several_inputs():
    """An image and a vector input, both calibrated from one .npz, each quantized on its own."""
    rng = np.random.default_rng(5)
    inits = {"w": rng.normal(size=(4, 3, 3, 3)) * 0.3, "a": rng.normal(size=(6, 5)) * 0.4,
             "b": rng.normal(size=(9, 3)) * 0.4}
    g = helper.make_graph([helper.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("GlobalAveragePool", ["r"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["f"]),
                           helper.make_node("MatMul", ["vec", "a"], ["v"]),
                           helper.make_node("Relu", ["v"], ["vr"]),
                           helper.make_node("Concat", ["f", "vr"], ["cat"], axis=1),
                           helper.make_node("Gemm", ["cat", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, 8, 8]),
                           helper.make_tensor_value_info("vec", TensorProto.FLOAT, ["n", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    cal = {"img": rng.normal(size=(32, 3, 8, 8)).astype(np.float32), "vec": rng.normal(size=(32, 6)).astype(np.float32) * 5}
    test = {"img": rng.normal(size=(50, 3, 8, 8)).astype(np.float32), "vec": rng.normal(size=(50, 6)).astype(np.float32) * 5}
    ref = run_ort(m, test)[0]
    for fmt in ("qdq", "int"):
        r = run(m, cal, QuantConfig(format=fmt))
        assert r.requant_by_kind["input"] == 2
        assert sqnr(ref, run_ort(r.model, test)[0]) > 20


def test_shape_inference_that_fails_halfway(tmp_path, monkeypatch):
    """A Reshape whose target shape is computed from the input's Shape: onnx's inference stops
    there (the rank is all it knows), so the residual Add behind it looked unsized. Symbolic shape
    inference carries on; the model must quantize like the same model with a constant shape, the
    Shape op and the integer arithmetic on its result are no float islands, and nothing is written to the current
    directory (onnxruntime's symbolic inference saves a scratch model there when it gives up)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(6)
    w1, w2 = rng.normal(size=(4, 4, 3, 3)) * 0.3, rng.normal(size=(4, 4, 3, 3)) * 0.3

    def build(computed: bool):
        nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c1"], ["r1"])]
        if computed:
            nodes += [helper.make_node("Shape", ["x"], ["s0"]), helper.make_node("Gather", ["s0", "order"], ["s"]),
                      helper.make_node("Reshape", ["r1", "s"], ["t"])]
        else:
            nodes += [helper.make_node("Reshape", ["r1", "s"], ["t"])]
        nodes += [helper.make_node("Conv", ["t", "w2"], ["c2"], pads=[1, 1, 1, 1]),
                  helper.make_node("Add", ["c2", "r1"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
        inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")]
        if computed:  # integer arithmetic on the input's shape, before any module reads the input
            inits.append(numpy_helper.from_array(np.array([0, 1, 2, 3], np.int64), "order"))
        else:
            inits.append(numpy_helper.from_array(np.array([0, 4, -1, 6], np.int64), "s"))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "h", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", 6])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])

    cal = rng.normal(size=(16, 4, 6, 6)).astype(np.float32)
    test = rng.normal(size=(20, 4, 6, 6)).astype(np.float32)
    const, computed = run(build(False), {"x": cal}, QuantConfig(format="int")), run(build(True), {"x": cal}, QuantConfig(format="int"))
    assert computed.float_ops == const.float_ops == {}
    assert computed.requant_by_kind == const.requant_by_kind
    np.testing.assert_array_equal(run_ort(computed.model, {"x": test})[0], run_ort(const.model, {"x": test})[0])
    assert not list(tmp_path.iterdir())


def test_symbolic_shapes_equal_onnxruntimes_own_entry_point(tmp_path, monkeypatch):
    """dfq-onnx runs onnxruntime's symbolic shape inference step by step on its own copy of the
    module, with sympy.simplify remembering its results (the same few expressions recur): every
    tensor's inferred type equals what onnxruntime's public entry point gives on a detector-like
    graph with dynamic H and W (strided convs down, nearest 2x Resizes up, Adds of the two paths,
    the same dims reached several times), and its sympy is left as it was."""
    import sympy

    from dfq_onnx.model_io import _symbolic_shape_module, infer_shapes

    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    downs = []
    for i in range(4):  # stride-2 convs: H -> floor((H - 1) / 2) + 1, nested
        inits.append(numpy_helper.from_array(rng.normal(size=(4, 4 if i else 3, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"d{i}"], pads=[1, 1, 1, 1], strides=[2, 2]))
        x = f"d{i}"
        downs.append(x)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    for i in range(3, 0, -1):  # 2x up, added to the path at that resolution, twice over
        for k in range(2):
            nodes.append(helper.make_node("Resize", [x, "", "scales"], [f"u{i}{k}"], mode="nearest"))
            nodes.append(helper.make_node("Add", [f"u{i}{k}", downs[i - 1]], [f"a{i}{k}"]))
        nodes.append(helper.make_node("Add", [f"a{i}0", f"a{i}1"], [f"s{i}"]))
        x = f"s{i}"
    graph = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    ours = infer_shapes(onnx.ModelProto.FromString(model.SerializeToString()))
    module = _symbolic_shape_module()
    assert module.sympy is sympy
    monkeypatch.chdir(tmp_path)
    theirs = module.SymbolicShapeInference.infer_shapes(
        onnx.shape_inference.infer_shapes(onnx.ModelProto.FromString(model.SerializeToString())), auto_merge=True)
    types = lambda m: {v.name: str(v.type) for v in list(m.graph.value_info) + list(m.graph.output)}  # noqa: E731
    assert types(ours) == types(theirs) and len(types(ours)) == 19
    assert any(d.dim_param for v in ours.graph.value_info for d in v.type.tensor_type.shape.dim[2:])
