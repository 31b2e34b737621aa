"""Activations exporters write out as arithmetic become one op (passes/patterns.py). Oracle: the
float model itself under onnxruntime; each spelling must also leave one float island, not four."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dfq_onnx
from dfq_onnx import QuantConfig
from dfq_onnx.pipeline import run

from helpers import run_ort

RNG = np.random.default_rng(13)


def c(name, v):
    return numpy_helper.from_array(np.asarray(v, np.float32), name)


def model(act_nodes, act_inits, opset=14):
    """Conv -> activation (reads "h", writes "a") -> Conv."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1])] + act_nodes + \
        [helper.make_node("Conv", ["a", "w2"], ["y"])]
    inits = [c("w1", RNG.normal(size=(6, 3, 3, 3)) * 0.6), c("w2", RNG.normal(size=(4, 6, 1, 1)) * 0.4)] + act_inits
    g = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def hardswish_div():  # x * Clip(x + 3, 0, 6) / 6, the gate divided (PyTorch's decomposition)
    return model([helper.make_node("Add", ["h", "three"], ["t"]), helper.make_node("Clip", ["t", "zero", "six"], ["r"]),
                  helper.make_node("Div", ["r", "six"], ["gate"]), helper.make_node("Mul", ["h", "gate"], ["a"])],
                 [c("three", 3.0), c("zero", 0.0), c("six", 6.0)]), "HardSwish"


def hardswish_late_div():  # Paddle: Mul(x, Clip(x + 3, 0, 6)) then Div by 6
    return model([helper.make_node("Add", ["h", "three"], ["t"]), helper.make_node("Clip", ["t", "zero", "six"], ["r"]),
                  helper.make_node("Mul", ["h", "r"], ["p"]), helper.make_node("Div", ["p", "six"], ["a"])],
                 [c("three", 3.0), c("zero", 0.0), c("six", 6.0)]), "HardSwish"


def hardswish_late_mul():  # ... then Mul by 1/6, constants on the left
    return model([helper.make_node("Add", ["three", "h"], ["t"]), helper.make_node("Clip", ["t", "zero", "six"], ["r"]),
                  helper.make_node("Mul", ["r", "h"], ["p"]), helper.make_node("Mul", ["sixth", "p"], ["a"])],
                 [c("three", 3.0), c("zero", 0.0), c("six", 6.0), c("sixth", 1 / 6)]), "HardSwish"


def hardswish_opset13():  # no HardSwish op before opset 14: x * HardSigmoid(x)
    m, _ = hardswish_div()
    m.opset_import[0].version = 13
    return m, "HardSigmoid"


def paddle_hardsigmoid():  # Paddle's slope 0.2 and offset 0.5: Clip(x * 0.2 + 0.5, 0, 1)
    return model([helper.make_node("Mul", ["h", "slope"], ["m"]), helper.make_node("Add", ["m", "half"], ["t"]),
                  helper.make_node("Clip", ["t", "zero", "one"], ["a"])],
                 [c("slope", 0.2), c("half", 0.5), c("zero", 0.0), c("one", 1.0)]), "HardSigmoid"


def onnx_hardsigmoid_spelled():  # ONNX's 1/6: Clip(x + 3, 0, 6) * (1/6)
    return model([helper.make_node("Add", ["h", "three"], ["t"]), helper.make_node("Clip", ["t", "zero", "six"], ["r"]),
                  helper.make_node("Mul", ["r", "sixth"], ["a"])],
                 [c("three", 3.0), c("zero", 0.0), c("six", 6.0), c("sixth", 1 / 6)]), "HardSigmoid"


SPELLINGS = [hardswish_div, hardswish_late_div, hardswish_late_mul, hardswish_opset13, paddle_hardsigmoid,
             onnx_hardsigmoid_spelled]


@pytest.mark.parametrize("build", SPELLINGS, ids=lambda f: f.__name__)
def test_each_spelling_becomes_one_op_computing_the_same_function(build):
    m, op = build()
    x = {"x": RNG.normal(size=(16, 3, 8, 8)).astype(np.float32) * 2}
    fused = dfq_onnx.fuse(m)
    ops = [n.op_type for n in fused.graph.node]
    assert op in ops and not {"Add", "Clip", "Div"} & set(ops), ops
    np.testing.assert_allclose(run_ort(fused, x)[0], run_ort(m, x)[0], rtol=1e-5, atol=1e-5)
    gate_mul = "+Mul" if op == "HardSigmoid" and "swish" in build.__name__ else ""  # x * HardSigmoid(x)
    for fmt in ("qdq", "int"):  # QDQ keeps the model's opset; the integer graph's is 19 (HardSwish exists)
        r = run(m, x, QuantConfig(format=fmt))
        assert not r.float_ops, r.float_ops  # the activation is one lookup table, no float island
        tables = [mod.op for mod in r.quantized.modules if mod.kind == "table"]
        assert tables in ([op + gate_mul], ["HardSwish"]), tables


def test_a_gate_read_elsewhere_is_left_alone():
    """The Clip's output is also a graph output: rewriting would drop a value someone reads."""
    m, _ = onnx_hardsigmoid_spelled()
    m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 6, 8, 8]))
    ops = [n.op_type for n in dfq_onnx.fuse(m).graph.node]
    assert "Clip" in ops and "HardSigmoid" not in ops


def test_module_names_hold_whatever_opset_the_conversion_runs_at():
    """A HardSwish written out below opset 14 stays Mul(x, HardSigmoid(x)); a conversion that
    upgrades the opset (16-bit outputs need 21, the integer graph 19) fuses it into HardSwish. The
    module keeps one name either way: the names `inspect --sensitivity` lists for the file as it
    is (--keep-float, --override) must be the ones every conversion of it takes."""
    from dfq_onnx.sensitivity import module_sensitivity

    m, _ = hardswish_opset13()
    x = {"x": RNG.normal(size=(16, 3, 8, 8)).astype(np.float32) * 2}
    rows = module_sensitivity(m, x)["modules"]
    table = [r["name"] for r in rows if r["op"] != "Conv"]
    assert len(table) == 1, rows
    raised = run(m, x, QuantConfig(act_overrides=((table[0], 16),)))  # upgraded to opset 21: fused
    assert sorted(mod.name for mod in raised.quantized.modules) == sorted(r["name"] for r in rows)
    assert [mod.op for mod in raised.quantized.modules if mod.name == table[0]] == ["HardSwish"]
    kept = run(m, x, QuantConfig(format="int", keep_float=(table[0],)))  # opset 19: fused too
    assert table[0] not in {mod.name for mod in kept.quantized.modules} and "HardSwish" in kept.float_ops
