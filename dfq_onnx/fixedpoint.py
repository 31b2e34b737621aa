"""Numerical core of the power-of-two number format. numpy only, no ONNX.

A tensor t with fractional length f is stored as q = clamp(round(t * 2^f)) and means q * 2^-f.
This module is the reference that the ONNX graphs are checked against: exponent choice,
quantization, the rounding right shift used for requantization.
"""
from __future__ import annotations

import math

import numpy as np

ERROR_BLOCK = 1 << 17  # weights weight_fractions measures at once (its buffers stay in cache)
MAX_ABS_FRACTION = 100  # 2^-100 .. 2^100 are exact float32 normals


def qrange(bits: int, unsigned: bool = False) -> tuple[int, int]:
    """Integer range of a b-bit code: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if unsigned:
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pow2_scale(f) -> np.ndarray:
    """The float32 scale 2^-f (exact) for an integer fraction f or an array of them."""
    f = np.asarray(f, dtype=np.int64)
    if np.any(np.abs(f) > MAX_ABS_FRACTION):
        raise ValueError(f"fractional length out of range: {f}")
    return np.asarray(np.ldexp(np.float32(1.0), -f), dtype=np.float32)


def is_pow2(values) -> np.ndarray:
    """Elementwise: is each value an exact positive power of two?"""
    v = np.asarray(values, dtype=np.float64)
    mant, _ = np.frexp(v)
    return (v > 0) & (mant == 0.5)


def quantize(x: np.ndarray, f, bits: int, unsigned: bool = False, axis: int | None = None,
             dtype=np.int64) -> np.ndarray:
    """q = clamp(round_half_even(x * 2^f)) as `dtype` (int64; int8 where the codes fit); f per
    tensor, or per slice along `axis`.

    Round half to even matches onnx QuantizeLinear.
    """
    f = np.asarray(f, dtype=np.int64)
    if axis is not None and f.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        f = f.reshape(shape)
    lo, hi = qrange(bits, unsigned)
    # x 2^f as a product with the power of two (exact, as ldexp, and 4x faster than ldexp with
    # int64 exponents), in float32 where that is exact too (f >= 0: half the traffic)
    ftype = np.float32 if x.dtype == np.float32 and (f.size == 0 or f.min() >= 0) else np.float64
    with np.errstate(over="ignore"):  # inf clamps to hi, as the exact product would
        y = np.asarray(np.multiply(x, np.ldexp(np.ones(f.shape, ftype), f), dtype=ftype))
    np.rint(y, out=y)
    np.clip(y, lo, hi, out=y)
    return y.astype(dtype)


def dequantize(q: np.ndarray, f, axis: int | None = None) -> np.ndarray:
    f = np.asarray(f, dtype=np.int64)
    if axis is not None and f.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        f = f.reshape(shape)
    return np.ldexp(q.astype(np.float64), -f)


def max_fraction(max_abs: float, bits: int, unsigned: bool = False) -> int:
    """Largest f such that max_abs * 2^f still fits the positive code range without clipping."""
    hi = qrange(bits, unsigned)[1]
    if not np.isfinite(max_abs) or max_abs <= 0:
        return 0
    f = int(np.floor(np.log2(hi / max_abs)))
    return int(np.clip(f, -MAX_ABS_FRACTION + 40, MAX_ABS_FRACTION - 40))


def weight_fractions(w: np.ndarray, axis: int | None, bits: int, method: str = "mse") -> np.ndarray:
    """Fractional lengths for a weight tensor: one per slice along `axis` (or one if axis is None).

    "max": the largest f that does not clip. "mse": among f_max .. f_max+3 (more resolution,
    some clipping), the one with the least squared error, computed exactly on the weights.
    """
    w = np.asarray(w)
    mat = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    m = np.max(np.abs(mat), axis=1).astype(np.float64) if mat.shape[1] else np.zeros(mat.shape[0])
    with np.errstate(divide="ignore"):
        f0 = np.floor(np.log2(qrange(bits)[1] / np.where(m > 0, m, 1.0)))
    f0 = np.where(m > 0, np.clip(f0, -MAX_ABS_FRACTION + 40, MAX_ABS_FRACTION - 40), 0).astype(np.int64)
    if method == "max":
        return f0
    lo, hi = qrange(bits)
    # float32 weights scaled up (f0 >= 0) by a power of two stay exact in float32, and so do their
    # rounding and clipping errors (each a multiple of the scaled weight's ulp, and no larger than
    # it): the squared errors below are float64 arithmetic's, in less memory traffic, a few rows
    # at a time in buffers that stay in cache (VGG-19's 144 M weights: 2.3 s -> 0.6 s). Otherwise
    # (a scale below 1 could make small weights subnormal) in float64.
    exact32 = mat.dtype == np.float32 and not (f0 < 0).any()
    mat = mat if exact32 else mat.astype(np.float64)
    n, k = mat.shape
    rows = max(1, ERROR_BLOCK // max(1, k))
    y, q, q64 = (np.empty((min(rows, n), k), t) for t in (mat.dtype, mat.dtype, np.float64))
    errs = np.zeros((4, n))
    for a in range(0, n if k else 0, rows):
        b = min(n, a + rows)
        yb, qb, q64b = y[:b - a], q[:b - a], q64[:b - a]
        for d in range(4):
            np.multiply(mat[a:b], np.ldexp(np.ones(b - a, mat.dtype), f0[a:b] + d)[:, None], out=yb)  # exact
            np.rint(yb, out=qb)
            np.clip(qb, lo, hi, out=qb)
            qb -= yb
            np.copyto(q64b, qb)
            # (q 2^-f - w)^2 = (q - w 2^f)^2 4^-f exactly (power-of-two scaling), each row summed in one order
            errs[d, a:b] = np.ldexp(np.einsum("ij,ij->i", q64b, q64b), -2 * (f0[a:b] + d))
    best = np.argmin(errs, axis=0)  # ties: the smallest f (no clipping)
    return np.where(m > 0, f0 + best, f0)


# --- activation statistics -------------------------------------------------------------------
# |x| histogram read straight off the float32 bit pattern: the bin of |x| is its 8 exponent bits
# and 3 leading mantissa bits, i.e. 8 bins per octave with edges 2^e * (1 + k/8), over the whole
# float32 range. Bin 0 holds zeros and the smallest subnormals. One shift and one bincount per
# tensor: calibration cost is dominated by onnxruntime, not by the statistics.
HIST_PER_OCTAVE = 8
_MANTISSA_DROP = 23 - 3
HIST_BINS = 1 << (31 - _MANTISSA_DROP)  # 2048


def abs_histogram(x: np.ndarray, max_samples: int | None = None) -> np.ndarray:
    """Counts of |x| per bin (HIST_BINS int64 entries; see above). With max_samples, a large
    tensor is histogrammed on an evenly strided subset of at least max_samples elements (an odd
    stride, so no single row or column of an image dominates)."""
    a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if max_samples is not None and a.size > 2 * max_samples:
        a = a[:: (a.size // max_samples) | 1]
    both = np.bincount(a.view(np.uint32) >> _MANTISSA_DROP, minlength=2 * HIST_BINS)
    return (both[:HIST_BINS] + both[HIST_BINS:]).astype(np.int64)  # fold the sign bit


def _bin_centers() -> np.ndarray:
    k = np.arange(HIST_BINS, dtype=np.int64)
    e, m = k // HIST_PER_OCTAVE, k % HIST_PER_OCTAVE
    centers = np.ldexp(1.0 + (m + 0.5) / HIST_PER_OCTAVE, e - 127)
    centers[e == 0] = 0.0  # zeros and subnormals
    centers[e == 255] = 0.0  # inf/nan cannot occur in checked data; never let them weigh
    return centers


def _expected_error(hist: np.ndarray, centers: np.ndarray, top: float, step: float) -> float:
    """Squared error of rounding to `step` with codes up to `top`: clipped values cost
    (|x| - top)^2, the rest the rounding noise min(x^2, step^2/12)."""
    err = np.where(centers > top, (centers - top) ** 2, np.minimum(centers ** 2, step * step / 12))
    return float(np.dot(hist, err))


# How far below its calibrated maximum an activation's range may be cut: at most one bit (the top
# code at least half the maximum). The least squared error on the calibration histogram often asks
# for two to four bits, which fits the calibration data and fails on data unlike it: on the
# coverage zoo (held-out data), four allowed bits against one gave PP-OCRv5 rec 15.1 vs 16.9 dB,
# PP-OCRv4 rec 8.9 vs 10.0, layout 2.3 vs 2.7, yolo_style 16.2 vs 16.5; MobileNetV2 and
# EfficientNet-Lite0 on photo crops 12.87 vs 12.93 and 18.46 vs 18.49 dB (76.2 vs 74.4 and 89.4 vs
# 90.0 % agreement).
MAX_CLIP_BITS = 1


def activation_fraction(hist: np.ndarray, max_abs: float, bits: int, unsigned: bool,
                        method: str = "mse") -> int:
    """Fractional length for an activation from its |x| histogram and maximum.

    "max": no clipping. "mse": among f_max .. f_max + MAX_CLIP_BITS, the least expected squared
    error.
    """
    f0 = max_fraction(max_abs, bits, unsigned)
    if method == "max" or max_abs <= 0:
        return f0
    centers = _bin_centers()
    hist = np.asarray(hist, dtype=np.float64)
    hi = qrange(bits, unsigned)[1]
    best, best_err = f0, np.inf
    for f in range(f0, f0 + 1 + MAX_CLIP_BITS):
        total = _expected_error(hist, centers, hi * 2.0 ** -f, 2.0 ** -f)
        if total < best_err * (1 - 1e-9):
            best, best_err = f, total
    return best


def clip_threshold(hist: np.ndarray, max_abs: float, bits: int, unsigned: bool, method: str = "mse") -> float:
    """The top of the code range with the least expected squared error when the scale may be any
    number: T = max_abs 2^(-k/16) for k = 0..16 MAX_CLIP_BITS ("mse"), or max_abs ("max")."""
    if method == "max" or max_abs <= 0:
        return float(max_abs)
    centers = _bin_centers()
    hist = np.asarray(hist, dtype=np.float64)
    hi = qrange(bits, unsigned)[1]
    tops = max_abs * 2.0 ** (-np.arange(16 * MAX_CLIP_BITS + 1) / 16)
    errs = [_expected_error(hist, centers, t, t / hi) for t in tops]
    return float(tops[int(np.argmin(errs))])


def rescale_histogram(hist: np.ndarray, c: float) -> np.ndarray:
    """The histogram of c |x| (c > 0), each bin's count moved to the bin of its centre times c."""
    centers = np.minimum(_bin_centers() * c, np.finfo(np.float32).max).astype(np.float32)
    idx = (centers.view(np.uint32) >> _MANTISSA_DROP).astype(np.int64)
    return np.bincount(idx, weights=np.asarray(hist, dtype=np.float64), minlength=HIST_BINS)[:HIST_BINS].round().astype(np.int64)


# --- integer arithmetic ----------------------------------------------------------------------
def rounding_shift(acc: np.ndarray, s, bits: int | None = None, unsigned: bool = False) -> np.ndarray:
    """Requantize: acc / 2^s rounded to nearest, ties to even (as QuantizeLinear rounds), for
    s > 0; acc << -s for s < 0; acc for s = 0; then saturate to a b-bit code if `bits` is given.
    `s` is a scalar or broadcasts against acc (per-channel shifts). In integers:
    floor((acc + 2^(s-1) - 1 + bit_s(acc)) / 2^s), bit_s(acc) = floor(acc / 2^s) mod 2."""
    acc = np.asarray(acc, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    right = np.maximum(s, 0)
    left = np.maximum(-s, 0)
    odd = np.bitwise_and(np.right_shift(acc, right), 1)
    rnd = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)) - 1 + odd, 0)
    y = np.right_shift(acc + rnd, right)
    y = np.left_shift(y, left)
    if bits is not None:
        lo, hi = qrange(bits, unsigned)
        y = np.clip(y, lo, hi)
    return y


def rounding_divide(acc: np.ndarray, n: int, bits: int | None = None, unsigned: bool = False) -> np.ndarray:
    """acc / n rounded to nearest, ties to even; then saturate if `bits` is given."""
    acc = np.asarray(acc, dtype=np.int64)
    q = np.floor_divide(acc, n)
    r2 = 2 * (acc - q * n)
    y = q + ((r2 > n) | ((r2 == n) & (np.bitwise_and(q, 1) == 1)))
    if bits is not None:
        y = np.clip(y, *qrange(bits, unsigned))
    return y


def u8s8_dot_avx2(x_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """Dot products along the last axis as onnxruntime's x86 u8 x s8 kernels compute them without
    VNNI (vpmaddubsw, then vpmaddwd with ones): products of adjacent elements are added in pairs
    and saturated to int16, the pair sums are added in int32. x_u8 [..., K] (0..255), w_s8
    [C, K] (-128..127); returns [..., C]. Equals the exact dot product whenever every pair sum
    fits int16."""
    x = np.asarray(x_u8, np.int64)
    w = np.asarray(w_s8, np.int64)
    k = x.shape[-1]
    if k % 2:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (1,), np.int64)], axis=-1)
        w = np.concatenate([w, np.zeros((w.shape[0], 1), np.int64)], axis=-1)
    prod = x[..., None, :] * w                                   # [..., C, K]
    pairs = np.clip(prod[..., 0::2] + prod[..., 1::2], -32768, 32767)
    return pairs.sum(axis=-1)


def pair_sums_exceed(rows: np.ndarray, limit: int, adjacent: bool = True) -> np.ndarray:
    """Per row (last axis) of integer weight codes, whether an x86 u8 x s8 kernel without VNNI
    (u8s8_dot_avx2) can saturate on some u8 input: whether two codes it adds in int16 are of one
    sign and add up past `limit` in magnitude (255 x 128 <= 32767, so limit 128). adjacent: the
    pairs are elements (2i, 2i+1) of the row, as the kernel packs them (rows in its K order);
    otherwise any two elements may pair, and a row's two largest same-sign codes decide."""
    q = np.asarray(rows)
    q = q.astype(np.int16 if q.dtype == np.int8 else np.int64)  # int8 codes: sums of two fit int16 (4x less traffic)
    if adjacent:
        if q.shape[-1] % 2:
            q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
        if q.dtype == np.int16 and limit >= 128:  # int8 codes: no single code passes the limit, and a
            # pair of mixed signs sums to less in magnitude than either, so a same-sign pair passes
            # it iff its sum does (one add and a compare: VGG-19's 144 M weights 2.5 -> 0.4 s)
            return (np.abs(q[..., 0::2] + q[..., 1::2]) > limit).any(axis=-1)
        pos, neg = np.maximum(q, 0), np.maximum(-q, 0)
        return ((pos[..., 0::2] + pos[..., 1::2] > limit) | (neg[..., 0::2] + neg[..., 1::2] > limit)).any(axis=-1)

    def top2(v: np.ndarray) -> np.ndarray:
        v = np.maximum(v, 0)
        return v[..., 0] if v.shape[-1] < 2 else np.partition(v, v.shape[-1] - 2, axis=-1)[..., -2:].sum(axis=-1)

    return (top2(q) > limit) | (top2(-q) > limit)


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """A real multiplier in (0, 1) as (m, s): m a Q31 integer in [2^30, 2^31), s >= 0 a right shift,
    real ~= m * 2^-31 * 2^-s (TFLite QuantizeMultiplier, right-shift case). Elementwise."""
    real = np.asarray(real, dtype=np.float64)
    if np.any(~np.isfinite(real)) or np.any(real <= 0) or np.any(real >= 1):
        raise ValueError("multiplier outside (0, 1)")
    mant, exp = np.frexp(real)                       # real = mant * 2^exp, mant in [0.5, 1)
    m = np.rint(np.ldexp(mant, 31)).astype(np.int64)
    carry = m == (1 << 31)
    m = np.where(carry, m >> 1, m)
    s = -(exp + carry.astype(np.int64))
    return m, s


def multiply_requant(acc: np.ndarray, m, s, bits: int | None = None, unsigned: bool = False) -> np.ndarray:
    """The multiplier requantizer of integer-only inference (gemmlowp/TFLite
    MultiplyByQuantizedMultiplier with a right shift): saturating rounding doubling high multiply
    of acc by the Q31 multiplier m, then a rounding divide by 2^s (ties away from zero), then
    saturation to a b-bit code if `bits` is given. int32 semantics, computed in int64."""
    a = np.asarray(acc, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    ab = a * m                                        # exact: |a|, |m| <= 2^31
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    t = ab + nudge
    hm = np.floor_divide(t, 1 << 31) + ((t < 0) & (np.bitwise_and(t, (1 << 31) - 1) != 0))  # toward zero
    x = np.where((a == -(1 << 31)) & (m == -(1 << 31)), (1 << 31) - 1, hm)
    mask = np.left_shift(np.int64(1), s) - 1
    rem = np.bitwise_and(x, mask)
    thr = np.right_shift(mask, 1) + (x < 0)
    y = np.right_shift(x, s) + (rem > thr)
    if bits is not None:
        y = np.clip(y, *qrange(bits, unsigned))
    return y


def resolve_pads(auto_pad: str, pads, spatial, kernel, strides, dilations) -> list[int]:
    """Explicit [begin..., end...] pads of a Conv/pool over input spatial dims `spatial`:
    SAME_UPPER/SAME_LOWER pad to ceil(in / stride) outputs (the odd pixel at the end or the
    begin), VALID pads nothing, NOTSET keeps `pads`."""
    nd = len(spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * 2 * nd
    return list(pads) if pads else [0] * 2 * nd


def conv_int(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group: int) -> np.ndarray:
    """Integer N-d convolution (NCHW...), exact in int64. pads = [begin..., end...]."""
    x = np.asarray(x, dtype=np.int64)
    w = np.asarray(w, dtype=np.int64)
    nd = x.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    n, c = x.shape[:2]
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    out_sp = [(x.shape[2 + i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    cout_g = cout // group
    y = np.zeros((n, cout, *out_sp), dtype=np.int64)
    for gi in range(group):
        xs = x[:, gi * cin_g:(gi + 1) * cin_g]
        ws = w[gi * cout_g:(gi + 1) * cout_g]
        for idx in np.ndindex(*k):
            sl = tuple(slice(idx[i] * dilations[i], idx[i] * dilations[i] + strides[i] * (out_sp[i] - 1) + 1,
                             strides[i]) for i in range(nd))
            patch = xs[(slice(None), slice(None)) + sl]           # n, cin_g, *out
            wk = ws[(slice(None), slice(None)) + idx]             # cout_g, cin_g
            y[:, gi * cout_g:(gi + 1) * cout_g] += np.einsum("nc...,oc->no...", patch, wk)
    return y


def conv_transpose_int(x: np.ndarray, w: np.ndarray, strides, pads, dilations, output_padding) -> np.ndarray:
    """Integer N-d transposed convolution (group 1), exact in int64, from its definition: every
    input element scatters w[c_in, :, k] * x to output position i * stride + k * dilation - pad_begin;
    the output spans (in - 1) * stride + dilation * (kernel - 1) + 1 + output_padding - pads."""
    x = np.asarray(x, dtype=np.int64)
    w = np.asarray(w, dtype=np.int64)
    nd = x.ndim - 2
    k = w.shape[2:]
    full = [(x.shape[2 + i] - 1) * strides[i] + dilations[i] * (k[i] - 1) + 1 + output_padding[i] for i in range(nd)]
    y = np.zeros((x.shape[0], w.shape[1], *full), dtype=np.int64)
    for idx in np.ndindex(*k):
        sl = tuple(slice(idx[i] * dilations[i], idx[i] * dilations[i] + (x.shape[2 + i] - 1) * strides[i] + 1, strides[i])
                   for i in range(nd))
        y[(slice(None), slice(None)) + sl] += np.einsum("nc...,co->no...", x, w[(slice(None), slice(None)) + idx])
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    return y[(slice(None), slice(None)) + crop]


# --- executor of the quantized IR (quantized.py): one module at a time, in int64 ----------------
# It reads the IR's fields (duck-typed: no import of the ONNX-side package) and is the bit-exact
# oracle the integer graph is checked against.
POOL_MODULES = ("GlobalAveragePool", "AveragePool")


def _window_sum(mod, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    if mod.op == "GlobalAveragePool":
        return x.sum(axis=tuple(range(2, x.ndim)), keepdims=True)
    a = mod.attrs
    k = a["kernel_shape"]
    pads = resolve_pads(a["auto_pad"], a["pads"], x.shape[2:], k, a["strides"], [1] * len(k))
    ones = np.ones((x.shape[1], 1, *k), dtype=np.int64)
    return conv_int(x, ones, a["strides"], pads, [1] * len(k), x.shape[1])


def module_accumulator(mod, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """A module up to its requantization: the integer sum it rounds (int64; int32 in the graph,
    which the IR's bound guarantees). Linear: weights, bias, the accumulator's left shift and the
    aligned residual; pooling: the window sum."""
    if mod.op in POOL_MODULES:
        return _window_sum(mod, x)
    x = np.asarray(x, dtype=np.int64)
    if mod.op == "Conv":
        a = mod.attrs
        pads = resolve_pads(a["auto_pad"], a["pads"], x.shape[2:], a["kernel_shape"], a["strides"], a["dilations"])
        acc = conv_int(x, mod.weight, a["strides"], pads, a["dilations"], a["group"])
        cshape = (1, -1) + (1,) * (acc.ndim - 2)
    elif mod.op == "ConvTranspose":
        a = mod.attrs
        acc = conv_transpose_int(x, mod.weight, a["strides"], a["pads"], a["dilations"], a["output_padding"])
        cshape = (1, -1) + (1,) * (acc.ndim - 2)
    elif mod.op in ("Gemm", "MatMul"):
        w = mod.weight.T if mod.attrs.get("transB") else mod.weight
        acc = np.matmul(x, np.asarray(w, dtype=np.int64))
        cshape = (-1,)
    else:
        raise ValueError(f"{mod.op} has no integer form")
    if mod.bias is not None:
        acc = acc + np.asarray(mod.bias, dtype=np.int64).reshape(cshape)
    if mod.residual is not None:
        acc = np.left_shift(acc, mod.acc_shift.reshape(cshape))
        acc = acc + rounding_shift(residual, -mod.residual_shift.reshape(cshape))
    return acc


def channel_shape(mod, ndim: int) -> tuple:
    """Shape that broadcasts a per-output-channel vector of `mod` against its ndim-D output."""
    return (-1,) + (1,) * (ndim - 2) if mod.op in ("Conv", "ConvTranspose") else (-1,)


def table_index_offset(mod) -> np.ndarray:
    """What a table module adds to an input code to index its flattened table: -code_min, plus
    the row of each element's channel times the row length where the table has several rows
    (shaped to broadcast along the table's channel axis)."""
    offset = np.int64(-mod.input.code_range[0])
    rows, size = mod.table.shape
    if rows > 1:
        offset = offset + np.arange(rows, dtype=np.int64).reshape((-1,) + (1,) * (-mod.channel_axis - 1)) * size
    return np.asarray(offset)


def table_lookup(mod, x: np.ndarray) -> np.ndarray:
    """A table module: the entry of each input code (row: its channel where the table has several)."""
    return mod.table.reshape(-1).astype(np.int64)[np.asarray(x, dtype=np.int64) + table_index_offset(mod)]


def binary_forward(mod, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A binary module: the integer product (or the operands aligned and added), then ONE rounding
    (half to even) and saturation."""
    return np.clip(rounding_shift(binary_accumulator(mod, a, b), mod.shift), mod.code_min, mod.code_max)


def binary_accumulator(mod, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A binary module up to its rounding: the integer product, or the aligned sum (int64)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if mod.op == "Mul":
        return a * b
    if mod.op == "MatMul":
        return np.matmul(a, b)
    a, b = rounding_shift(a, -mod.a_shift), rounding_shift(b, -mod.b_shift)
    return a + b if mod.op == "Add" else a - b


_isqrt = np.vectorize(math.isqrt, otypes=[np.int64])


def layernorm_forward(mod, x: np.ndarray) -> np.ndarray:
    """A LayerNorm module (see quantized.LayerNormModule) in int64."""
    x = np.asarray(x, dtype=np.int64)
    d = np.left_shift(x, mod.mean_bits) - rounding_divide(np.left_shift(x.sum(axis=-1, keepdims=True), mod.mean_bits),
                                                          mod.width)
    sd = np.maximum(_isqrt((d * d).sum(axis=-1, keepdims=True) + mod.eps_code), 1)
    q = rounding_divide(d * mod.gain, sd)
    return np.clip(rounding_shift(q + mod.offset, mod.gain_shift),
                   mod.code_min, mod.code_max)


def softmax_forward(mod, x: np.ndarray) -> np.ndarray:
    """A Softmax module (see quantized.SoftmaxModule) in int64."""
    x = np.asarray(x, dtype=np.int64)
    e = mod.exp_table[x.max(axis=-1, keepdims=True) - x]
    return np.clip(rounding_divide(np.left_shift(e, mod.output.frac), e.sum(axis=-1, keepdims=True)),
                   mod.code_min, mod.code_max)


def module_forward(mod, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """One module of the quantized IR in integers: its accumulator, then ONE rounding (half to
    even) and saturation to the output codes narrowed by the activation clamp. A linear module
    writing a graph output returns its sum unrounded. A table module looks its input up; a binary
    module takes its second operand as `residual`."""
    if mod.kind == "table":
        return table_lookup(mod, x)
    if mod.kind == "binary":
        return binary_forward(mod, x, residual)
    if mod.kind == "layernorm":
        return layernorm_forward(mod, x)
    if mod.kind == "softmax":
        return softmax_forward(mod, x)
    acc = module_accumulator(mod, x, residual)
    if mod.op in POOL_MODULES:
        n = mod.window if mod.window is not None else int(np.prod(np.shape(x)[2:]))  # dynamic H*W
        y = rounding_shift(acc, mod.shift) if mod.shift is not None else rounding_divide(acc, n)
        return np.clip(y, mod.code_min, mod.code_max)
    if mod.output is None:
        return acc
    y = rounding_shift(acc, mod.shift.reshape(channel_shape(mod, acc.ndim)))
    return np.clip(y, mod.code_min, mod.code_max)


def code_bounds(lo: float | None, hi: float | None, f: int, bits: int, unsigned: bool) -> tuple[int, int]:
    """An activation clamp(x, lo, hi) applied after rounding to fraction f: bounds on the codes,
    intersected with the code range. Exact, because min/max commute with a monotone rounding
    (QuantizeLinear and the rounding shift both round ties to even)."""
    qlo, qhi = qrange(bits, unsigned)
    clo = qlo if lo is None else int(np.clip(np.rint(np.ldexp(float(lo), f)), qlo, qhi))
    chi = qhi if hi is None else int(np.clip(np.rint(np.ldexp(float(hi), f)), qlo, qhi))
    return clo, chi


FINITE_CHUNK = 1 << 20  # all_finite tests this many elements at a time


def all_finite(v: np.ndarray) -> bool:
    """No NaN or Inf in v, tested a slice at a time: the boolean temporary stays small and is
    reused (a fresh one the size of 373 MB of calibration arrays cost 0.47 s to first touch on a
    2-core VM, against 0.02 s in slices), and v is not copied."""
    flat = v.reshape(-1)
    return all(np.isfinite(flat[i:i + FINITE_CHUNK]).all() for i in range(0, flat.size, FINITE_CHUNK))
