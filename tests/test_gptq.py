"""Second-order weight rounding (dfq_onnx/gptq.py). Oracles: round-to-nearest on the same
power-of-two grid and the layer's float output on held-out inputs; exact sums for the merge."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from dfq_onnx.fixedpoint import quantize, weight_fractions
from dfq_onnx.gptq import Hessian, quantize_columns


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
