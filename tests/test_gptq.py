"""Second-order weight rounding (dfq_onnx/gptq.py). Oracles: round-to-nearest on the same
power-of-two grid and the layer's float output on held-out inputs; exact sums for the merge."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dfq_onnx.errors import DfqError
from dfq_onnx.fixedpoint import quantize, weight_fractions
from dfq_onnx.gptq import Hessian, Sparsity, magnitude_mask, quantize_columns
from dfq_onnx.passes import round_weights as rw
from helpers import run_ort


def correlated(rng, n, k, sets=2):
    """`sets` draws of n inputs from one distribution with correlated features (a random mixing of
    independent ones, per-feature scales), as activations are."""
    mix = (rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)) * rng.uniform(0.2, 3.0, k)
    return [rng.normal(size=(n, k)) @ mix for _ in range(sets)]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(c=st.integers(4, 24), k=st.integers(16, 96), bits=st.sampled_from([3, 4, 8]), seed=st.integers(0, 10 ** 6),
       act_order=st.booleans())
def test_gptq_lowers_the_held_out_output_error_against_round_to_nearest(c, k, bits, seed, act_order):
    """A statistical property: the lower calibration error must carry over to held-out inputs of the
    same distribution. It held in 600 of 600 random layers with 4+ output channels; with 1-2
    channels at 3 bits, 1 of 150 was 3.5 % worse (too few terms to average the rounding out)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c, k)) * rng.uniform(0.05, 1.0, (c, 1))
    frac = weight_fractions(w, 0, bits, "max")                       # the same grid for both
    x_cal, x_test = correlated(rng, 8 * k, k)
    rtn = quantize(w, frac[:, None], bits)
    q = quantize_columns(w, Hessian.of(x_cal).h, frac, bits, act_order=act_order)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert q.min() >= lo and q.max() <= hi                          # codes of the b-bit grid
    err = lambda codes: np.linalg.norm(x_test @ (w - np.ldexp(codes, -frac[:, None])).T)  # noqa: E731
    assert err(q) < err(rtn), (err(q), err(rtn))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(n1=st.integers(1, 40), n2=st.integers(1, 40), k=st.integers(1, 12), seed=st.integers(0, 10 ** 6))
def test_hessians_of_shards_merge_to_the_whole(n1, n2, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-50, 50, size=(n1 + n2, k)).astype(np.float32)  # integer sums: exact in float64
    merged = Hessian.of(x[:n1]).merge(Hessian.of(x[n1:]))
    whole = Hessian.of(x)
    np.testing.assert_array_equal(merged.h, whole.h)
    assert merged.count == whole.count == n1 + n2


# --- sparsity in the same loop (SparseGPT) -------------------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(c=st.integers(4, 16), groups=st.integers(4, 24), seed=st.integers(0, 10 ** 6),
       spec=st.sampled_from(["2:4", "1:4", "0.5", "0.3"]))
def test_joint_pruning_holds_the_pattern_and_beats_magnitude_pruning(c, groups, seed, spec):
    """The pattern is counted on the codes directly; the joint update is compared with pruning by
    magnitude then rounding to nearest, on held-out inputs of the same distribution."""
    rng = np.random.default_rng(seed)
    sp = Sparsity.parse(spec)
    k = 4 * groups
    w = rng.normal(size=(c, k)) * rng.uniform(0.05, 1.0, (c, 1))
    frac = weight_fractions(w, 0, 8, "max")
    x_cal, x_test = correlated(rng, 8 * k, k)
    q = quantize_columns(w, Hessian.of(x_cal).h, frac, 8, sparsity=sp)
    zeros = q == 0
    if sp.m:
        assert (zeros.reshape(c, -1, sp.m).sum(axis=2) >= sp.n).all()
    else:
        assert (zeros.sum(axis=1) >= round(sp.fraction * k)).all()
    base = np.where(magnitude_mask(w, sp), 0, quantize(w, frac[:, None], 8))
    err = lambda codes: np.linalg.norm(x_test @ (w - np.ldexp(codes, -frac[:, None])).T)  # noqa: E731
    assert err(q) < err(base), (err(q), err(base))


def test_sparsity_specs():
    assert Sparsity.parse("2:4") == Sparsity(n=2, m=4) and Sparsity.parse("0.5") == Sparsity(fraction=0.5)
    assert Sparsity.parse(None) is None and Sparsity.parse("0") is None
    for bad in ("4:2", "1.5", "half", "2:0", "-0.1"):
        with pytest.raises(DfqError, match="sparsity must be"):
            Sparsity.parse(bad)


# --- a convolution's Hessian, against onnxruntime's Conv -----------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(group=st.sampled_from([1, 2, 4]), cg=st.integers(1, 3), co=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2), size=st.integers(4, 8),
       auto=st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]), seed=st.integers(0, 10 ** 6))
def test_conv_hessian_is_the_output_energy_of_any_weight(group, cg, co, k, stride, dil, pad, size, auto, seed):
    """For any weight matrix m in the column order GPTQ uses, m_c^T H m_c must equal the energy of
    output channel c of onnxruntime's Conv with that weight, over the batch: that is what makes H
    the Hessian of the layer's squared output error (im2col, groups, padding, strides, dilations)."""
    rng = np.random.default_rng(seed)
    if auto.startswith("SAME"):
        dil = 1  # onnxruntime refuses dilation with SAME padding
    cin, cout = group * cg, group * co
    attrs = {"group": group, "strides": [stride, stride], "dilations": [dil, dil], "kernel_shape": [k, k]}
    if auto == "NOTSET":
        attrs["pads"] = [pad, pad + 1 if pad else 0, pad, pad]
    else:
        attrs["auto_pad"] = auto
    x = rng.integers(-8, 8, size=(2, cin, size, size + 1)).astype(np.float32)
    xin = gs.Variable("x", np.float32, ["N"] + list(x.shape[1:]))
    y_t = gs.Variable("y", np.float32)
    node = gs.Node("Conv", "conv", attrs=attrs, inputs=[xin, gs.Constant("w", np.zeros((cout, cg, k, k), np.float32))],
                   outputs=[y_t])
    graph = gs.Graph(nodes=[node], inputs=[xin], outputs=[y_t], opset=13)
    m = rng.integers(-4, 4, size=(group, co, cg * k * k)).astype(np.float32)
    w = rw._from_matrices(node, m, (cout, cg, k, k))
    onnx_attrs = {a: v for a, v in attrs.items() if a != "kernel_shape"}
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], **onnx_attrs)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [conv], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")]), opset_imports=[onnx.helper.make_opsetid("", 13)])
    y = run_ort(model, {"x": x})[0].astype(np.float64)
    energy = (y ** 2).sum(axis=(0, 2, 3)).reshape(group, co)
    hessian = rw._hessians(graph, [node], [{"x": x[:1]}, {"x": x[1:]}])["conv"]   # two shards, merged
    np.testing.assert_allclose(np.einsum("gck,gkl,gcl->gc", m, hessian.h, m), energy, rtol=1e-6)
    assert hessian.count == y.shape[0] * y.shape[2] * y.shape[3]
    assert np.allclose(rw._to_matrices(node, w), m)
