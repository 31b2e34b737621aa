"""Normalizations written out by exporters (LayerNorm, RMSNorm, L2 normalization, Softmax) are
whole modules at every opset: an integer LayerNorm or Softmax module where a pattern rule knows
the spelling, one float unit otherwise, never 8-bit pieces (a variance or a reciprocal square
root rounded to 8 bits on its own collapses a transformer). Oracles: the float model under
onnxruntime (the fused model computes the same function; the quantized one stays within the
noise that 8-bit rounding of the norm's input and output alone predicts), and the graph itself
(no tensor computed from a reduction is rounded)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dfq_onnx
from dfq_onnx import QuantConfig
from dfq_onnx.passes.form_modules import REDUCTIONS
from dfq_onnx.pipeline import run

from helpers import run_ort
from test_properties import noise_bound_sqnr, sqnr

T, D = 12, 32
RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(D, D)) / np.sqrt(D)
W2 = RNG.normal(size=(D, D)) / np.sqrt(D)
GAMMA = 1 + 0.2 * RNG.normal(size=D)
BETA = 0.1 * RNG.normal(size=D)


def c(name, v, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(v, dtype), name)


class Spelling:
    """Node factory for one opset: reductions take axes as an attribute or an input as the
    opset says (ReduceSum from 13, the others from 18)."""

    def __init__(self, opset):
        self.opset, self.nodes, self.inits, self.k = opset, [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def const(self, v, dtype=np.float32):
        n = self.name("c")
        self.inits.append(c(n, v, dtype))
        return n

    def op(self, op, inputs, out=None, **attrs):
        out = out or self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def reduce(self, op, x, keepdims=1):
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.op(op, [x, self.const([-1], np.int64)], keepdims=keepdims)
        return self.op(op, [x], axes=[-1], keepdims=keepdims)


def torch_layer_norm(s, x, out):  # torch.onnx below opset 17, Paddle2ONNX
    mu = s.reduce("ReduceMean", x)
    d = s.op("Sub", [x, mu])
    var = s.reduce("ReduceMean", s.op("Pow", [d, s.const(2.0)]))
    sd = s.op("Sqrt", [s.op("Add", [var, s.const(1e-5)])])
    s.op("Add", [s.op("Mul", [s.op("Div", [d, sd]), s.const(GAMMA)]), s.const(BETA)], out)


def rsqrt_layer_norm(s, x, out):  # d * d, and a Mul by the reciprocal square root
    mu = s.reduce("ReduceMean", x)
    d = s.op("Sub", [x, mu])
    var = s.reduce("ReduceMean", s.op("Mul", [d, d]))
    r = s.op("Reciprocal", [s.op("Sqrt", [s.op("Add", [var, s.const(1e-5)])])])
    s.op("Add", [s.op("Mul", [s.const(GAMMA), s.op("Mul", [r, d])]), s.const(BETA)], out)


def keras_layer_norm(s, x, out):  # tf2onnx: moments, then x * scale + (beta - mean * scale)
    mu = s.reduce("ReduceMean", x)
    d = s.op("Sub", [x, mu])
    var = s.reduce("ReduceMean", s.op("Mul", [d, d]))
    r = s.op("Reciprocal", [s.op("Sqrt", [s.op("Add", [var, s.const(1e-3)])])])
    scale = s.op("Mul", [r, s.const(GAMMA)])
    s.op("Add", [s.op("Mul", [x, scale]), s.op("Sub", [s.const(BETA), s.op("Mul", [mu, scale])])], out)


def rms_norm(s, x, out):  # T5 / LLaMA
    ms = s.reduce("ReduceMean", s.op("Pow", [x, s.const(2.0)]))
    r = s.op("Reciprocal", [s.op("Sqrt", [s.op("Add", [ms, s.const(1e-6)])])])
    s.op("Mul", [s.op("Mul", [x, r]), s.const(GAMMA)], out)


def l2_normalize(s, x, out):  # torch F.normalize: x / clamp_min(||x||, eps).expand_as(x)
    n = s.op("Clip", [s.reduce("ReduceL2", x), s.const(1e-12)])
    s.op("Div", [x, s.op("Expand", [n, s.op("Shape", [x])])], out)


def l2_sum_squares(s, x, out):  # x / sqrt(max(sum x^2, eps))
    n = s.op("Sqrt", [s.op("Max", [s.reduce("ReduceSumSquare", x), s.const(1e-12)])])
    s.op("Div", [x, n], out)


def softmax_shifted(s, x, out):
    e = s.op("Exp", [s.op("Sub", [x, s.reduce("ReduceMax", x)])])
    s.op("Div", [e, s.reduce("ReduceSum", e)], out)


def softmax_plain(s, x, out):
    e = s.op("Exp", [x])
    s.op("Div", [e, s.reduce("ReduceSum", e)], out)


# spelling -> the module it must become ("float": one float unit; the integer graph keeps it float too)
SPELLINGS = {torch_layer_norm: "layernorm", rsqrt_layer_norm: "layernorm", keras_layer_norm: "float",
             rms_norm: "float", l2_normalize: "float", l2_sum_squares: "float",
             softmax_shifted: "softmax", softmax_plain: "softmax"}


def model(spell, opset):
    """x -> MatMul -> h -> normalization -> n -> MatMul -> y."""
    s = Spelling(opset)
    s.nodes.append(helper.make_node("MatMul", ["x", "W1"], ["h"]))
    spell(s, "h", "n")
    s.nodes.append(helper.make_node("MatMul", ["n", "W2"], ["y"]))
    g = helper.make_graph(s.nodes, spell.__name__, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", T, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", T, D])],
                          [c("W1", W1), c("W2", W2)] + s.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def data(seed, n):
    rng = np.random.default_rng(seed)  # channels and tokens of very different scales, as a residual stream
    scale = rng.uniform(0.2, 4, (1, 1, D)) * np.exp(rng.uniform(np.log(0.02), 0, (n, T, 1)))
    return (rng.normal(size=(n, T, D)) * scale + 0.05).astype(np.float32)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("spell", list(SPELLINGS), ids=lambda f: f.__name__)
def test_a_normalization_is_one_module_at_every_opset(spell, opset):
    m = model(spell, opset)
    calib, test = data(0, 48), data(1, 16)
    ref = run_ort(m, {"x": test})[0]
    fused = dfq_onnx.fuse(m)
    np.testing.assert_allclose(run_ort(fused, {"x": test})[0], ref, rtol=1e-4, atol=1e-4)
    want = SPELLINGS[spell]
    for fmt in ("qdq", "int"):
        r = run(m, {"x": calib}, QuantConfig(format=fmt))
        kinds = [x.kind for x in r.quantized.modules]
        norm = [k for k in kinds if k not in ("linear",)]
        assert norm == ([] if want == "float" else [want]), (fmt, kinds)
        # nothing computed from a reduction is rounded on its own
        plan = r.quantized.plan
        reduced = _reduction_descendants(fused)
        rounded = set(plan.requant) | set(plan.passthrough)
        assert not rounded & reduced, (fmt, sorted(rounded & reduced))
        # within the noise of 8-bit rounding of the input, the norm's input and output and the weights
        bound = noise_bound_sqnr(fused, {"x": calib}, ["x", "h", "n"], lambda t: t, 8) - 6.0
        got = sqnr(run_ort(m, {"x": calib})[0], run_ort(r.model, {"x": calib})[0])
        assert got >= bound, (fmt, got, bound)


def _reduction_descendants(model) -> set:
    """Tensors computed from a reduction's output through ops on statistics only (shape [.., 1])."""
    out, grew = set(), True
    reductions = {o for n in model.graph.node if n.op_type in REDUCTIONS for o in n.output}
    out |= reductions
    while grew:
        grew = False
        for n in model.graph.node:
            if n.op_type in ("MatMul", "Gemm", "Conv"):
                continue
            data = [i for i in n.input if i and i not in {t.name for t in model.graph.initializer}]
            if data and all(i in out for i in data) and not set(n.output) <= out:
                out |= set(n.output)
                grew = True
    return out


def test_a_layernorm_read_elsewhere_is_not_rewritten_but_still_not_rounded():
    """The centred values d are also a graph output: the rule must not drop them, and the
    normalization still stays float as a unit (d is a graph output, so it leaves float)."""
    m = model(torch_layer_norm, 13)
    d = next(n.output[0] for n in m.graph.node if n.op_type == "Sub")
    m.graph.output.append(helper.make_tensor_value_info(d, TensorProto.FLOAT, ["b", T, D]))
    fused = dfq_onnx.fuse(m)
    assert "LayerNormalization" not in {n.op_type for n in fused.graph.node}
    r = run(m, {"x": data(0, 32)})
    assert [x.kind for x in r.quantized.modules] == ["linear", "linear"], [x.kind for x in r.quantized.modules]
    assert not set(r.quantized.plan.requant) & _reduction_descendants(fused)
