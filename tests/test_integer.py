"""The integer-only graph: bit-exact against the numpy reference, within 1 LSB of the QDQ graph,
accuracy on real digits, one requantization per module."""
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import dfq_onnx
from dfq_onnx import QuantConfig
from dfq_onnx.fixedpoint import (module_accumulator, module_forward, rounding_divide, rounding_shift,
                                 shift_constants)
from dfq_onnx.passes.emit_int import DOMAIN, SHIFT_OP, rounding_functions
from dfq_onnx.pipeline import run

from helpers import CALIB, SHIPPED, run_ort


@pytest.fixture(scope="module")
def shipped_int():
    return run(SHIPPED, CALIB, QuantConfig(format="int"))


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def test_integer_graph_is_bit_exact_with_numpy_reference(shipped_int, test_data):
    x, _ = test_data
    params = shipped_int.int_params
    names = sorted({p[k] for p in params for k in ("int_input", "int_output", "int_residual") if p[k]})
    m = with_outputs(shipped_int.model, names)
    for optimize in (False, True):
        vals = dict(zip([o.name for o in m.graph.output], run_ort(m, {"input": x[:200]}, optimize)))
        for p in params:
            ref = module_forward(p, vals[p["int_input"]], vals[p["int_residual"]] if p["int_residual"] else None)
            got = vals[p["int_output"]]
            # a module writing a graph output hands over its int32 accumulator (then dequantized)
            want = np.int32 if p.get("float_output") else np.uint8 if p["unsigned"] else np.int8
            assert got.dtype == want
            np.testing.assert_array_equal(got.astype(np.int64), ref, err_msg=p["name"])
        assert sum(1 for p in params if p.get("float_output")) == 1  # the Gemm writing the logits


def test_integer_accuracy_matches_float_and_qdq(shipped_int, shipped_qdq, test_data):
    x, y = test_data
    acc = {}
    for name, model in (("float", SHIPPED), ("qdq", shipped_qdq.model), ("int", shipped_int.model)):
        acc[name] = 100.0 * np.mean(run_ort(model, {"input": x})[0].argmax(1) == y)
    assert acc["int"] >= acc["float"] - 0.5, acc
    assert abs(acc["int"] - acc["qdq"]) <= 0.1 + 1e-9, acc
    for optimize in (False, True):
        got = 100.0 * np.mean(run_ort(shipped_int.model, {"input": x}, optimize)[0].argmax(1) == y)
        assert got == acc["int"]


@pytest.fixture(scope="module")
def shipped_unified():
    return run(SHIPPED, CALIB, QuantConfig(layout="unified"))


def test_integer_and_qdq_agree_within_one_lsb_at_every_module_output(shipped_int, shipped_unified, test_data):
    """Given the same integer inputs (taken from the unified-layout QDQ graph: the same modules),
    the integer module computation and the QDQ graph's float module followed by QuantizeLinear
    (and a Clip of the codes for Relu6) differ by at most 1 LSB, and only where
    the accumulator lies exactly halfway (QuantizeLinear rounds half to even, the shift half up).

    On these digits ties are not rare: saturated strokes give exact multiples of 2^(s-1), so one
    module differs in about 2.7% of elements; all others stay under 0.1%."""
    x, _ = test_data
    qdq = shipped_unified.model
    clip_of = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "Clip"}
    q_of = {n.output[0].rsplit("_quantized", 1)[0]: clip_of.get(n.output[0], n.output[0])
            for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    params = [p for p in shipped_int.int_params if not p.get("float_output")]  # no QuantizeLinear
    names = sorted({q_of[p[k]] for p in params for k in ("input", "output", "residual") if p.get(k)})
    m = with_outputs(qdq, names)
    vals = dict(zip([o.name for o in m.graph.output], run_ort(m, {"input": x[:200]}, False)))
    assert len(params) == 7
    for p in params:
        ref = module_forward(p, vals[q_of[p["input"]]], vals[q_of[p["residual"]]] if p.get("residual") else None)
        got = vals[q_of[p["output"]]].astype(np.int64)
        diff = np.abs(ref - got)
        assert diff.max() <= 1, p["name"]
        if p["op"] == "GlobalAveragePool":
            assert not diff.any()  # an odd window (49) has no ties
            continue
        acc, s = module_accumulator(p, vals[q_of[p["input"]]],
                                    vals[q_of[p["residual"]]] if p.get("residual") else None)
        s = np.broadcast_to(s, acc.shape)
        tie = (s > 0) & (np.mod(acc, np.left_shift(1, s)) == np.left_shift(1, np.maximum(s - 1, 0)))
        assert np.all(tie[diff > 0]), p["name"]
        assert np.mean(diff > 0) <= 0.05, (p["name"], np.mean(diff > 0))


def test_one_requantization_per_module_plus_the_input(shipped_int):
    """One rounding per module, except the Gemm writing the logits (its int32 accumulator is
    dequantized: a graph output needs no requantization), plus the input's QuantizeLinear."""
    info = dfq_onnx.inspect(shipped_int.model)
    ops = info["op_types"]
    assert info["modules"] == 8
    assert ops.get("RoundingShift", 0) + ops.get("RoundingDivide", 0) == info["modules"] - 1
    assert info["requant_points"] == 8  # 7 modules + the graph input's QuantizeLinear
    assert "Conv" not in ops and "Gemm" not in ops and ops["ConvInteger"] == 6 and ops["MatMulInteger"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    assert info["scales"]["total"] == info["scales"]["power_of_two"]


def shift_model(shape_s):
    f_shift, f_div = rounding_functions()
    nodes = [helper.make_node(SHIFT_OP, ["x", "h", "d", "l"], ["y"], domain=DOMAIN,
                              lo=-(2 ** 31), hi=2 ** 31 - 1, to=TensorProto.INT32)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "x" else TensorProto.INT64, None)
                                       for n in ("x", "h", "d", "l")],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)],
                             functions=[f_shift, f_div])


_SHIFT_MODEL = shift_model(None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), min_size=1, max_size=64), st.integers(-4, 31))
def test_onnx_rounding_shift_equals_reference_over_int32(xs, s):
    """The ONNX function under onnxruntime, whole int32 range, negative values, s = 0 included."""
    x = np.array(xs, dtype=np.int32)
    if s < 0:
        x = np.clip(x, -(2 ** 26), 2 ** 26).astype(np.int32)  # left shifts must not overflow int32
    h, d, l = shift_constants(s)
    y = run_ort(_SHIFT_MODEL, {"x": x, "h": np.asarray(h), "d": np.asarray(d), "l": np.asarray(l)})[0]
    np.testing.assert_array_equal(y.astype(np.int64), rounding_shift(x, s))


def test_rounding_divide_reference():
    acc = np.arange(-200, 200)
    got = rounding_divide(acc, 49)
    want = [int(np.floor(a / 49 + 0.5)) for a in acc]
    assert got.tolist() == want


@pytest.mark.parametrize("kernel,pads,count_pad", [((2, 2), (0, 0, 0, 0), 0), ((3, 3), (1, 1, 1, 1), 1),
                                                   ((3, 3), (1, 1, 1, 1), 0)])
def test_average_pool_in_integers(kernel, pads, count_pad, tmp_path):
    """Conv -> Relu -> AveragePool -> Conv: the pool is a window sum and one rounding, bit-exact with
    the reference; padding that is not counted has no single divisor and stays float."""
    from onnx import numpy_helper
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=list(kernel), pads=list(pads),
                              count_include_pad=count_pad),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w2")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, None, None])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.normal(size=(16, 3, 12, 12)).astype(np.float32)
    r = run(model, {"x": x}, QuantConfig(format="int"))
    pools = [p for p in r.int_params if p["op"] == "AveragePool"]
    if count_pad == 0 and any(pads):
        assert not pools and r.facts["float_modules"] == {"AveragePool": 1}
        return
    assert len(pools) == 1 and "AveragePool" not in dfq_onnx.inspect(r.model)["op_types"]
    p = pools[0]
    m = with_outputs(r.model, [p["int_input"], p["int_output"]])
    vals = dict(zip([o.name for o in m.graph.output], run_ort(m, {"x": x})))
    np.testing.assert_array_equal(vals[p["int_output"]].astype(np.int64), module_forward(p, vals[p["int_input"]]))
    f = run_ort(model, {"x": x})[0]
    q = run_ort(r.model, {"x": x})[0]
    assert 10 * np.log10(np.sum(f ** 2) / np.sum((f - q) ** 2)) > 20
