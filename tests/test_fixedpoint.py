"""The numerical core against plain Python integer arithmetic."""
from fractions import Fraction

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dfq_onnx.fixedpoint import (activation_fraction, abs_histogram, is_pow2, max_fraction, pow2_scale,
                                 pair_sums_exceed, qrange, quantize, rounding_divide, rounding_shift,
                                 weight_fractions)

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


FLOAT32 = st.one_of(
    st.floats(-1e3, 1e3, width=32, allow_nan=False),
    st.floats(-2.0 ** -126, 2.0 ** -126, width=32, allow_nan=False, allow_subnormal=True),  # subnormals
    st.integers(-600, 600).map(lambda k: np.float32(k / 4)),  # on a grid: ties and exact codes
    st.sampled_from([0.0, 1e30, -3e5]))


def exact_code(x: float, f: int, lo: int, hi: int) -> int:
    """x 2^f rounded half to even and clamped, in exact rationals."""
    return min(hi, max(lo, round(Fraction(x) * Fraction(2) ** f)))


@settings(max_examples=300, deadline=None)
@given(st.lists(FLOAT32, min_size=1, max_size=40), st.integers(-8, 60), st.sampled_from([2, 4, 8]), st.booleans())
def test_quantize_matches_exact_rationals(xs, f, bits, unsigned):
    """quantize on float32 (computed in float32 where the scale is a power of two >= 1, else in
    float64) equals exact round-half-to-even of x 2^f, clamped."""
    lo, hi = qrange(bits, unsigned)
    x = np.asarray(xs, np.float32)
    want = [exact_code(float(v), f, lo, hi) for v in x]
    assert quantize(x, f, bits, unsigned).tolist() == want
    assert quantize(x, f, bits, unsigned, dtype=np.int8 if bits < 8 or not unsigned else np.int16).tolist() == want


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(FLOAT32, min_size=1, max_size=24), min_size=1, max_size=6), st.sampled_from([2, 4, 8]),
       st.floats(1e-20, 1e12))
def test_weight_fractions_choose_the_least_exact_error(rows, bits, gain):
    """Per row, the "mse" fraction's squared error (exact rationals) is the least among the
    fraction that covers the row's maximum and the next three, up to float64 rounding, and it is
    never a coarser fraction than the one that covers the maximum."""
    k = min(len(r) for r in rows)
    w = (np.asarray([r[:k] for r in rows], np.float64) * gain).astype(np.float32)
    w[~np.isfinite(w)] = 0
    assume(np.max(np.abs(w)) < 2.0 ** 50)  # fractions stop at -60 (fixedpoint.MAX_ABS_FRACTION)
    lo, hi = qrange(bits)
    got = weight_fractions(w, 0, bits, "mse")
    f_max = weight_fractions(w, 0, bits, "max")
    for row, f, f0 in zip(w, got, f_max):
        if not np.any(row):
            assert f == f0
            continue
        assert f0 <= f <= f0 + 3
        assert float(np.max(np.abs(row))) * 2.0 ** int(f0) <= hi + 1  # f0 covers the maximum (127.x rounds to 127)

        def err(fr: int) -> Fraction:
            return sum((Fraction(exact_code(float(v), fr, lo, hi)) / Fraction(2) ** fr - Fraction(float(v))) ** 2
                       for v in row)

        best = min(err(int(f0) + d) for d in range(4))
        assert err(int(f)) <= best * (1 + Fraction(1, 10 ** 9))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(-128, 127), min_size=1, max_size=12), min_size=1, max_size=5))
def test_pair_sums_exceed_matches_the_kernel_bound(rows):
    """An int8 row can saturate the int16 pair sum of u8 x s8 products (inputs 0..255) iff some
    adjacent pair (2i, 2i+1) reaches past 32767 or -32768 for some input: worked out in Python
    integers from the pair's largest positive and negative sums."""
    k = min(len(r) for r in rows)
    q = np.asarray([r[:k] for r in rows], np.int8)
    want = []
    for r in q.tolist():
        r = r + [0] * (len(r) % 2)
        want.append(any(255 * (max(a, 0) + max(b, 0)) > 32767 or -255 * (max(-a, 0) + max(-b, 0)) < -32768
                        for a, b in zip(r[0::2], r[1::2])))
    assert pair_sums_exceed(q, 128).tolist() == want


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 60), st.lists(st.tuples(st.integers(0, 59), st.sampled_from([np.nan, np.inf, -np.inf])),
                                    max_size=3),
       st.sampled_from([np.float16, np.float32, np.float64]), st.integers(1, 9), st.booleans())
def test_all_finite_is_the_elementwise_test(n, bad, dtype, chunk, transposed):
    """all_finite, in slices of any length (chunk boundaries included), is numpy's elementwise
    test: NaN and either infinity anywhere are found, huge finite values are not refused."""
    from dfq_onnx import fixedpoint
    v = np.linspace(-6e4, 6e4, n).astype(dtype)
    for i, x in bad:
        if i < n:
            v[i] = x
    v = v.reshape(1, -1)
    if transposed:
        v = v.T
    old = fixedpoint.FINITE_CHUNK
    fixedpoint.FINITE_CHUNK = chunk
    try:
        assert fixedpoint.all_finite(v) == bool(np.all(np.isfinite(v)))
    finally:
        fixedpoint.FINITE_CHUNK = old
