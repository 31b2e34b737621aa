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
import onnx_graphsurgeon as gs
from dfq_onnx.fixedpoint import module_forward
from dfq_onnx.passes.emit_int import (DOMAIN, INT_OPSET, rounding_divide_node, rounding_functions,
                                      rounding_shift_node)
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


def module_values(result, model, feeds, optimize=True):
    """Each IR module's integer input, residual and output codes as the integer graph computes
    them under onnxruntime: {module name: (x, residual or None, y)}."""
    sym = result.symbols
    mods = [m for m in result.quantized.modules if m.integer]
    second = lambda m: getattr(m, "residual", None) or getattr(m, "other", None)  # noqa: E731  a binary op's b
    names = [sym[t] for m in mods for t in (m.input.name, m.output_name) + ((second(m).name,) if second(m) else ())]
    full = with_outputs(model, names)
    vals = dict(zip([o.name for o in full.graph.output], run_ort(full, feeds, optimize)))
    return {m.name: (vals[sym[m.input.name]], vals[sym[second(m).name]] if second(m) else None,
                     vals[sym[m.output_name]]) for m in mods}


def test_integer_graph_is_bit_exact_with_numpy_executor(shipped_int, test_data):
    """The integer graph under onnxruntime, at both optimization levels, equals the IR executed in
    numpy (fixedpoint.module_forward), module by module."""
    x, _ = test_data
    for optimize in (False, True):
        got = module_values(shipped_int, shipped_int.model, {"input": x[:200]}, optimize)
        for m in shipped_int.quantized.modules:
            xi, r, y = got[m.name]
            want = np.int32 if m.output is None else np.uint8 if m.output.unsigned else np.int8
            assert y.dtype == want, m.name
            np.testing.assert_array_equal(y.astype(np.int64), module_forward(m, xi, r), err_msg=m.name)
    assert sum(1 for m in shipped_int.quantized.modules if getattr(m, "output", 1) is None) == 1  # the logits Gemm


def test_integer_graph_equals_onnx_reference_evaluator(shipped_int, test_data):
    """A second runtime: onnx.reference runs the same integer graph (model-local functions
    included) to the same bits as onnxruntime."""
    from onnx.reference import ReferenceEvaluator

    x, _ = test_data
    ours = run_ort(shipped_int.model, {"input": x[:16]})[0]
    theirs = ReferenceEvaluator(shipped_int.model).run(None, {"input": x[:16]})[0]
    np.testing.assert_array_equal(ours, theirs)


def test_integer_accuracy_matches_float_and_qdq(shipped_int_unified_pair, test_data):
    """The integer graph against the unified QDQ graph of the same IR (8-bit weights: the integer
    graph's u8 x u8 kernels need no saturation guard)."""
    shipped_int, unified = shipped_int_unified_pair
    x, y = test_data
    acc = {}
    for name, model in (("float", SHIPPED), ("qdq", unified.model), ("int", shipped_int.model)):
        acc[name] = 100.0 * np.mean(run_ort(model, {"input": x})[0].argmax(1) == y)
    assert acc["int"] >= acc["float"] - 0.5, acc
    assert abs(acc["int"] - acc["qdq"]) <= 0.1 + 1e-9, acc
    for optimize in (False, True):
        got = 100.0 * np.mean(run_ort(shipped_int.model, {"input": x}, optimize)[0].argmax(1) == y)
        assert got == acc["int"]


@pytest.fixture(scope="module")
def shipped_unified():
    return run(SHIPPED, CALIB, QuantConfig(layout="unified", target="ort-x86-vnni"))  # 8-bit weights, as the integer graph


def test_integer_and_qdq_modules_agree_exactly_where_float32_is_exact(shipped_int, shipped_unified, test_data):
    """Given the same integer inputs (taken from the unified-layout QDQ graph: the same modules),
    the integer module and the QDQ graph's float module followed by QuantizeLinear (and a Clip of
    the codes) give the same codes: both round half to even. Where the IR's worst-case sum reaches
    2^24, float32 may round the float sum itself, so there they may differ by 1 LSB."""
    x, _ = test_data
    qdq = shipped_unified.model
    clip_of = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "Clip"}
    q_of = {n.output[0].rsplit("_quantized", 1)[0]: clip_of.get(n.output[0], n.output[0])
            for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    mods = [m for m in shipped_int.quantized.modules if m.output is not None]  # the logits have no QuantizeLinear
    names = sorted({q_of[t] for m in mods for t in (m.input.name, m.output_name) +
                    ((m.residual.name,) if getattr(m, "residual", None) else ())})
    full = with_outputs(qdq, names)
    vals = dict(zip([o.name for o in full.graph.output], run_ort(full, {"input": x[:200]}, False)))
    assert len(mods) == 7
    for m in mods:
        r = vals[q_of[m.residual.name]] if getattr(m, "residual", None) else None
        diff = np.abs(module_forward(m, vals[q_of[m.input.name]], r) - vals[q_of[m.output_name]].astype(np.int64))
        assert diff.max() <= (0 if m.acc_bound < 2 ** 24 else 1), (m.name, m.acc_bound, diff.max())


def test_one_requantization_per_module_plus_the_input(shipped_int):
    """One rounding per module, except the Gemm writing the logits (its int32 accumulator is
    dequantized: a graph output needs no requantization), plus the input's QuantizeLinear."""
    info = dfq_onnx.inspect(shipped_int.model)
    ops = info["op_types"]
    assert info["modules"] == 8
    assert sum(n for op, n in ops.items() if op.startswith(("RoundingShift", "RoundingDivide"))) == info["modules"] - 1
    assert info["requant_points"] == 8  # 7 modules + the graph input's QuantizeLinear
    assert "Conv" not in ops and "Gemm" not in ops and ops["ConvInteger"] == 6 and ops["MatMulInteger"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    assert info["scales"]["total"] == info["scales"]["power_of_two"]


def requant_model(s: np.ndarray, lo: int, hi: int, dtype, divisor: int | None = None,
                  bound: int | None = None) -> onnx.ModelProto:
    """x (int32, [n, C]) -> the emitter's requantization nodes for per-channel shifts s (or a
    rounding division), as a model."""
    g = gs.Graph(opset=INT_OPSET)
    x = gs.Variable("x", dtype=np.int32, shape=["n", len(s) if divisor is None else 1])
    g.inputs = [x]
    made = []

    def add(op, inputs, out_dtype, attrs=None, name=None, domain=None, shape=None, out=None):
        out = gs.Variable(f"t{len(made)}", dtype=out_dtype)
        made.append(gs.Node(op, f"n{len(made)}", attrs or {}, inputs, [out], domain=domain))
        return out

    def const(base, value):
        return gs.Constant(f"c{len(made)}_{base}", np.asarray(value))

    y = (rounding_divide_node(add, const, x, divisor, lo, hi, dtype, "d") if divisor is not None else
         rounding_shift_node(add, const, x, s, (-1,), lo, hi, dtype, "s", bound=bound))
    if y is x:  # nothing to do (s = 0, no clamp)
        y = add("Identity", [x], np.int32)
    g.nodes = made
    y.name = "y"
    g.outputs = [y]
    m = gs.export_onnx(g)
    m.opset_import.add(domain=DOMAIN, version=1)
    m.functions.extend(rounding_functions(INT_OPSET))
    m.ir_version = 9
    return m


INT32 = st.integers(-(2 ** 31), 2 ** 31 - 1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-8, 30), min_size=1, max_size=6), st.data(), st.sampled_from([
    (-(2 ** 31), 2 ** 31 - 1, np.int32), (-128, 127, np.int8), (0, 255, np.uint8), (0, 96, np.uint8), (-40, 127, np.int8)]))
def test_onnx_requantizer_equals_python_integers_in_two_runtimes(shifts, data, bounds):
    """The integer graph's requantizer (right shifts ties-to-even, left shifts, clamp, cast) under
    onnxruntime and onnx.reference equals exact Python rationals on every int32 value the IR
    allows (|x| + 2^(s-1) < 2^31; |x << l| < 2^31 unless the clamp saturates first)."""
    from fractions import Fraction
    from onnx.reference import ReferenceEvaluator

    s = np.array(shifts, dtype=np.int64)
    lo, hi, dtype = bounds
    rows = []
    for _ in range(data.draw(st.integers(1, 8))):
        row = []
        for sc in shifts:
            limit = (2 ** 31 - 1 - (1 << (sc - 1) if sc > 0 else 0))
            if sc < 0 and (lo, hi) == (-(2 ** 31), 2 ** 31 - 1):
                limit = (2 ** 31 - 1) >> -sc
            row.append(data.draw(st.one_of(st.integers(-limit, limit), st.sampled_from([-limit, limit, 0, 1, -1]))))
        rows.append(row)
    x = np.array(rows, dtype=np.int32)
    want = np.array([[min(max(round(Fraction(int(v), 1 << sc)) if sc > 0 else int(v) << -sc, lo), hi)
                      for v, sc in zip(row, shifts)] for row in rows], dtype=np.int64)
    model = requant_model(s, lo, hi, dtype)
    got = run_ort(model, {"x": x})[0]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.astype(np.int64), want)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.int64), want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2 ** 31) + 5000, 2 ** 31 - 5000), min_size=1, max_size=16), st.integers(1, 4096))
def test_onnx_rounding_divide_equals_python_integers(xs, n):
    """The pooling divider (a window that is not a power of two): ties to even, both runtimes."""
    from fractions import Fraction
    from onnx.reference import ReferenceEvaluator

    x = np.array(xs, dtype=np.int32).reshape(-1, 1)
    want = np.array([[min(max(round(Fraction(v, n)), -128), 127)] for v in xs])
    model = requant_model(np.zeros(1), -128, 127, np.int8, divisor=n)
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0].astype(np.int64), want)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.int64), want)


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
    pool = next(m for m in r.quantized.modules if m.op == "AveragePool")
    if count_pad == 0 and any(pads):
        assert not pool.integer and r.facts["float_modules"] == {"AveragePool": 1}
        return
    assert pool.integer and "AveragePool" not in dfq_onnx.inspect(r.model)["op_types"]
    xi, _, y = module_values(r, r.model, {"x": x})[pool.name]
    np.testing.assert_array_equal(y.astype(np.int64), module_forward(pool, xi))
    f = run_ort(model, {"x": x})[0]
    q = run_ort(r.model, {"x": x})[0]
    assert 10 * np.log10(np.sum(f ** 2) / np.sum((f - q) ** 2)) > 20


def test_the_integer_model_carries_only_the_functions_it_calls(shipped_int_unified_pair):
    """Every model-local function is called by a node, and every dfq op called has its function
    (it carried all six variants, two of them used)."""
    m = shipped_int_unified_pair[0].model
    called = {n.op_type for n in m.graph.node if n.domain == "dfq"}
    assert called and {f.name for f in m.functions} == called
