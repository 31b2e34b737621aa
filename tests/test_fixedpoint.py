"""The numerical core against plain Python integer arithmetic."""
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dfq_onnx.fixedpoint import (activation_fraction, abs_histogram, is_pow2, max_fraction, pow2_scale,
                                 qrange, quantize, rounding_divide, rounding_shift, weight_fractions)

INT32 = st.integers(-(2 ** 31), 2 ** 31 - 1)


def ref_shift(a: int, s: int) -> int:
    """a / 2^s rounded to nearest, ties to even, by Python's exact rationals (round() of a
    Fraction rounds half to even)."""
    if s > 0:
        return round(Fraction(a, 1 << s))
    return a * (1 << -s)


@settings(max_examples=500, deadline=None)
@given(INT32, st.integers(0, 31))
def test_rounding_shift_matches_integer_reference(a, s):
    assert int(rounding_shift(np.array([a]), s)[0]) == ref_shift(a, s)


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2 ** 20), 2 ** 20), st.integers(-8, 0))
def test_left_shift_for_negative_s(a, s):
    assert int(rounding_shift(np.array([a]), s)[0]) == ref_shift(a, s)


@settings(max_examples=300, deadline=None)
@given(INT32, st.integers(1, 31), st.booleans())
def test_rounding_shift_saturates_to_the_code_range(a, s, unsigned):
    lo, hi = qrange(8, unsigned)
    y = int(rounding_shift(np.array([a]), s, bits=8, unsigned=unsigned)[0])
    assert y == min(max(ref_shift(a, s), lo), hi)


def test_rounding_shift_s_zero_is_identity_and_ties_round_to_even():
    a = np.array([-(2 ** 31), -3, -2, -1, 0, 1, 2, 3, 2 ** 31 - 1])
    assert np.array_equal(rounding_shift(a, 0), a)
    # ties: -2.5 -> -2, -1.5 -> -2, -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (as QuantizeLinear rounds)
    assert rounding_shift(np.array([-5, -3, -1, 1, 3, 5]), 1).tolist() == [-2, -2, 0, 0, 2, 2]
    assert rounding_shift(np.array([-5, -3, -1, 1, 3, 5]), 1).tolist() == np.rint([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]).tolist()


@settings(max_examples=300, deadline=None)
@given(INT32, st.integers(1, 5000))
def test_rounding_divide_matches_integer_reference(a, n):
    assert int(rounding_divide(np.array([a]), n)[0]) == round(Fraction(a, n))


def test_per_channel_shift_vector():
    acc = np.arange(-12, 12).reshape(2, 3, 4)
    s = np.array([1, 2, 3]).reshape(1, 3, 1)
    y = rounding_shift(acc, s)
    for c in range(3):
        assert [int(v) for v in y[:, c].ravel()] == [ref_shift(int(v), c + 1) for v in acc[:, c].ravel()]


@given(st.integers(-100, 100))
def test_pow2_scale_is_exact(f):
    s = pow2_scale(f)
    assert s.dtype == np.float32 and float(s) == 2.0 ** -f and is_pow2(s)


def test_is_pow2_rejects_others():
    assert is_pow2([1.0, 0.5, 2.0 ** -20]).all()
    assert not is_pow2([0.0, -0.5, 0.3, 3.0, np.float32(0.1)]).any()


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-6, 1e6), st.booleans())
def test_max_fraction_never_clips_and_is_tight(m, unsigned):
    hi = qrange(8, unsigned)[1]
    f = max_fraction(m, 8, unsigned)
    assert m * 2.0 ** f <= hi
    assert m * 2.0 ** (f + 1) > hi


def test_quantize_rounds_half_to_even_and_clamps():
    x = np.array([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0])
    assert quantize(x, 0, 8).tolist() == [0, 2, 2, 0, 127, -128]
    assert quantize(x, 0, 8, unsigned=True).tolist() == [0, 2, 2, 0, 255, 0]


def test_weight_fractions_mse_is_never_worse_than_max():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(16, 8, 3, 3)).astype(np.float32)
    for method in ("max", "mse"):
        f = weight_fractions(w, 0, 8, method)
        assert f.shape == (16,)
    err = {}
    for method in ("max", "mse"):
        f = weight_fractions(w, 0, 8, method)
        q = quantize(w, f, 8, axis=0)
        err[method] = np.sum((q * 2.0 ** -f.reshape(-1, 1, 1, 1) - w) ** 2)
    assert err["mse"] <= err["max"]


def test_activation_fraction_prefers_resolution_for_heavy_tails():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 0.1, 100000), [50.0]])  # one outlier
    h = abs_histogram(x)
    f_max = activation_fraction(h, 50.0, 8, False, "max")
    f_mse = activation_fraction(h, 50.0, 8, False, "mse")
    assert f_max == max_fraction(50.0, 8)
    assert f_mse > f_max
    assert abs_histogram(x).sum() == x.size


def test_abs_histogram_bins_match_frexp():
    """Bin of |x| = 8 * biased exponent + 3 leading mantissa bits, computed independently with frexp."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, 5000) * 10.0 ** rng.integers(-6, 6, 5000), [0.0, -0.0, 1.0, -2.0]])
    x = x.astype(np.float32)
    m, e = np.frexp(np.abs(x).astype(np.float64))  # |x| = m 2^e, m in [0.5, 1)
    nz = x != 0
    idx = np.zeros(x.size, dtype=np.int64)
    idx[nz] = (e[nz] - 1 + 127) * 8 + np.floor((2 * m[nz] - 1) * 8).astype(np.int64)
    assert np.array_equal(abs_histogram(x), np.bincount(idx, minlength=len(abs_histogram(x))))
