"""Integer LayerNorm, Softmax and attention. Oracles: the float model (onnxruntime), float64
LayerNorm / Softmax of the quantized inputs, the numpy executor (fixedpoint.py) module by module,
and onnx.reference as a second runtime of the integer graph."""
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import dfq_onnx
from dfq_onnx import QuantConfig
from dfq_onnx.fixedpoint import module_forward
from dfq_onnx.pipeline import run

from attention import attention_block
from helpers import run_ort
from test_integer import module_values

FLOAT_OPS = {"LayerNormalization", "Softmax", "MatMul", "Gemm", "Conv", "Erf", "Sigmoid", "Tanh", "Sqrt", "Exp"}


def sqnr(ref, y):
    ref = ref.astype(np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))


def data(seed, n, t=16, d=32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, t, d)) * rng.uniform(0.3, 3, (1, 1, d)) + 0.3).astype(np.float32)


@pytest.mark.parametrize("spelled, qkv_gather", [(True, False), (False, False), (True, True)],
                         ids=["layernorm_spelled_out", "LayerNormalization", "torch_qkv_gather"])
def test_attention_block_is_integer_only_bit_exact_and_close_to_float(spelled, qkv_gather):
    m = attention_block(spelled=spelled, qkv_gather=qkv_gather)
    calib, test = data(0, 64), data(1, 32)
    ref = run_ort(m, {"x": test})[0]
    rq = run(m, {"x": calib}, QuantConfig())
    ri = run(m, {"x": calib}, QuantConfig(format="int"))
    assert not ri.float_ops and not ri.facts["float_modules"], (ri.float_ops, ri.facts["float_modules"])
    ops = {n.op_type for n in ri.model.graph.node}
    assert not ops & FLOAT_OPS, ops & FLOAT_OPS
    kinds = [x.kind for x in ri.quantized.modules]
    assert kinds.count("layernorm") == 1 and kinds.count("softmax") == 1 and kinds.count("binary") == 2, kinds
    for name, (x, r, y) in module_values(ri, ri.model, {"x": test[:8]}).items():  # numpy executor == graph
        mod = ri.quantized.module(name)
        np.testing.assert_array_equal(y.astype(np.int64), module_forward(mod, x, r), err_msg=name)
    got = run_ort(ri.model, {"x": test})[0]
    np.testing.assert_array_equal(ReferenceEvaluator(ri.model).run(None, {"x": test[:4]})[0], got[:4])  # 2nd runtime
    s_int, s_qdq = sqnr(ref, got), sqnr(ref, run_ort(rq.model, {"x": test})[0])
    print(f"attention block SQNR vs float: integer {s_int:.1f} dB, QDQ {s_qdq:.1f} dB")
    assert s_int >= s_qdq - 1.0 and s_int > 25, (s_int, s_qdq)


def norm_model(op, width, rows, gamma, beta):
    inits = []
    if op == "LayerNormalization":
        inits = [numpy_helper.from_array(gamma.astype(np.float32), "g"), numpy_helper.from_array(beta.astype(np.float32), "b")]
        node = helper.make_node(op, ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)
    else:
        node = helper.make_node(op, ["x"], ["y"], axis=-1)
    g = helper.make_graph([node], "n", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", rows, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(op=st.sampled_from(["LayerNormalization", "Softmax"]), width=st.sampled_from([2, 7, 32, 100, 768]),
       scale_exp=st.integers(-4, 4), shift=st.floats(-2, 2), seed=st.integers(0, 100))
def test_integer_layernorm_and_softmax_against_float64(op, width, scale_exp, shift, seed):
    """On the quantized input codes, the integer module is within a bound of the float64 function
    rounded at the output fraction: LayerNorm 1 code (mean at extra bits, square root floored, ~21-bit
    gain), Softmax 1 code (16-bit exp table, one division)."""
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 2.0, width), rng.normal(0, 0.3, width)
    m = norm_model(op, width, 4, gamma, beta)
    x = ((rng.normal(size=(16, 4, width)) + shift) * 2.0 ** scale_exp).astype(np.float32)
    ri = run(m, {"x": x}, QuantConfig(format="int"))
    (mod,) = [q for q in ri.quantized.modules if q.kind in ("layernorm", "softmax")]
    assert mod.integer and not ri.float_ops
    xq = np.clip(np.rint(np.ldexp(x.astype(np.float64), mod.input.frac)), *mod.input.code_range)
    v = np.ldexp(xq, -mod.input.frac)
    if op == "Softmax":
        e = np.exp(v - v.max(-1, keepdims=True))
        f = e / e.sum(-1, keepdims=True)
        tol = 1
    else:
        mu = v.mean(-1, keepdims=True)
        f = (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
        tol = 1
    want = np.clip(np.rint(np.ldexp(f, mod.output.frac)), mod.code_min, mod.code_max)
    got = np.ldexp(run_ort(ri.model, {"x": x})[0].astype(np.float64), mod.output.frac)
    np.testing.assert_array_equal(got, module_forward(mod, xq))  # the numpy executor, bit for bit
    assert np.abs(got - want).max() <= tol, np.abs(got - want).max()


def test_layernorm_spellings_become_one_op():
    """The spelled-out LayerNorm fuses into one LayerNormalization computing the same function."""
    m = attention_block(spelled=True)
    fused = dfq_onnx.fuse(m)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("LayerNormalization") == 1 and not {"ReduceMean", "Sqrt", "Pow"} & set(ops), ops
    x = data(3, 8)
    np.testing.assert_allclose(run_ort(fused, {"x": x})[0], run_ort(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


def layernorm_error_bound(xq, gamma, width, mean_bits, out_frac, y_codes):
    """The integer LayerNorm's bound against float64 LayerNorm of its input codes, per element, in
    output codes: 1 (two roundings) + |gamma| 2^f_y 2^-(m+1) / sigma (the mean kept to m extra
    bits, at most half a unit off) + |y| / (2^m sqrt(N) sigma) (the square root floored), sigma
    the row's standard deviation in input codes; 10 % and 2^-12 |y| of slack for the second-order
    terms (the gain rounded to its bits, the mean error inside the variance)."""
    sig = np.sqrt(((xq - xq.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(gamma) * 2.0 ** (out_frac - mean_bits - 1) / sig + \
            np.abs(y_codes) / (2.0 ** mean_bits * np.sqrt(width) * sig)
    return np.where(sig > 0, 1 + 1.1 * t + np.abs(y_codes) * 2.0 ** -12, np.inf)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(width=st.sampled_from([2, 7, 32, 100, 768]), seed=st.integers(0, 1000))
def test_integer_layernorm_on_nearly_constant_rows_within_its_stated_bound(width, seed):
    """Rows whose codes hardly vary (standard deviation down to a fraction of a code, next to rows
    that set a wide range): the error grows as 1/sigma, as the bound above says (up to 12 codes at
    N = 768 for sigma below half a code); it is checked element by element, no row masked."""
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 2.0, width) * rng.choice([-1, 1], width), rng.normal(0, 0.3, width)
    m = norm_model("LayerNormalization", width, 4, gamma, beta)
    x = (rng.normal(size=(32, 4, width)) * np.exp(rng.uniform(np.log(0.002), 0, (32, 4, 1))) * 4 +
         rng.normal(size=(32, 4, 1))).astype(np.float32)
    ri = run(m, {"x": x}, QuantConfig(format="int"))
    (mod,) = [q for q in ri.quantized.modules if q.kind == "layernorm"]
    xq = np.clip(np.rint(np.ldexp(x.astype(np.float64), mod.input.frac)), *mod.input.code_range)
    v = np.ldexp(xq, -mod.input.frac)
    mu = v.mean(-1, keepdims=True)
    f = (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    y = np.ldexp(f, mod.output.frac)
    want = np.clip(np.rint(y), mod.code_min, mod.code_max)
    got = np.ldexp(run_ort(ri.model, {"x": x})[0].astype(np.float64), mod.output.frac)
    err = np.abs(got - want)
    bound = layernorm_error_bound(xq, gamma, width, mod.mean_bits, mod.output.frac, y)
    assert np.all(err <= bound), float(np.max(err - bound))
