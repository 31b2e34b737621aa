"""Second-order weight rounding and pruning on the power-of-two grid (GPTQ / OBQ / SparseGPT style),
in numpy.

For a linear layer y = W x with W [C, K] (C output channels, K inputs), quantizing W column by
column and feeding each column's rounding error back into the columns not yet quantized,
weighted by the inverse Hessian of the layer's squared output error, H = sum over samples of
x x^T (Frantar et al., 2022), lowers ||W X - W_q X|| against rounding each weight to nearest on
the same grid. The grid here is dfq-onnx's: a fixed power-of-two fraction per output channel,
symmetric b-bit codes (fixedpoint.quantize), so the result is a plain code tensor the quantized IR
can hold. Pruning uses the same loop (SparseGPT, Frantar and Alistarh, 2023): a pruned weight is
a zero code whose error is fed back like a rounding error, the mask chosen by w^2 / [H^-1]_kk^2.

Every function takes a leading group axis as well (w [G, C, K], H [G, K, K]): a grouped or
depthwise convolution is G independent layers, quantized in one vectorized loop.

Hessians are a mergeable statistic, like calibration's histograms: the Hessian of a data set is
the sum of its shards' Hessians (`Hessian.merge`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DfqError
from .fixedpoint import qrange

BLOCK = 128  # columns updated together (the lazy batch update of GPTQ)
DAMP = 0.01  # fraction of the mean diagonal added to H's diagonal


@dataclass(frozen=True)
class Sparsity:
    """What to prune: n of every m consecutive inputs (`n:m`, e.g. 2:4), or a fraction of each row."""
    n: int = 0
    m: int = 0
    fraction: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> "Sparsity | None":
        """'2:4' (n:m, n < m), '0.5' (a fraction in (0, 1)), or None / '' / '0' (dense)."""
        if spec is None or str(spec).strip() in ("", "0", "none"):
            return None
        s = str(spec).strip()
        try:
            if ":" in s:
                n, m = (int(v) for v in s.split(":"))
                if 0 < n < m <= 64:
                    return cls(n=n, m=m)
            else:
                f = float(s)
                if 0 < f < 1:
                    return cls(fraction=f)
        except ValueError:
            pass
        raise DfqError(f"sparsity must be N:M (N < M, e.g. 2:4) or a fraction in (0, 1) (e.g. 0.5), got {spec!r}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else f"{self.fraction:g}"

    def applies(self, k_group: int) -> bool:
        """Whether a layer whose inputs come in consecutive groups of k_group (a convolution's input
        channels per tap; a matrix's inputs) can hold the pattern: n:m needs m | k_group; any
        fraction needs k_group > 1 (a depthwise filter is left dense)."""
        return k_group % self.m == 0 if self.m else k_group > 1


@dataclass
class Hessian:
    """sum x x^T over `count` input vectors x of length K (float64); h [K, K] or [G, K, K]."""
    h: np.ndarray
    count: int

    @classmethod
    def of(cls, x: np.ndarray) -> "Hessian":
        """The Hessian of the rows of x [n, K], or per group of x [G, n, K], summed in x's own
        precision (float32 rows: single-precision products, as fast as onnxruntime's), held in
        float64 so that shards add up without further loss."""
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        if x.ndim == 3:
            return cls(np.matmul(x.transpose(0, 2, 1), x).astype(np.float64), x.shape[1])
        x = x.reshape(-1, np.shape(x)[-1])
        return cls((x.T @ x).astype(np.float64), len(x))

    def merge(self, other: "Hessian") -> "Hessian":
        return Hessian(self.h + other.h, self.count + other.count)


def quantize_columns(w: np.ndarray, h: np.ndarray, frac: np.ndarray, bits: int, *, damp: float = DAMP,
                     act_order: bool = False, sparsity: Sparsity | None = None,
                     bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """int64 codes of w [C, K] (or [G, C, K]) at fraction frac[c] per output channel (round half to
    even, clamped to the symmetric b-bit range, or per channel to `bounds` (lo, hi) within it),
    chosen column by column with GPTQ's error feedback through H^-1 (H [K, K] or [G, K, K], the
    input Hessian; damp: the fraction of its mean diagonal added to the diagonal; act_order:
    columns in order of decreasing H[k, k]). sparsity: codes forced to zero in the same loop
    (SparseGPT): n of every m consecutive columns per row, or the given fraction of each row
    within each block of BLOCK columns, the weights with the least w^2 / [H^-1]_kk^2 first.
    Inputs that never vary (H[k, k] = 0) are rounded to nearest with no feedback."""
    grouped = np.ndim(w) == 3
    w = np.array(w, np.float64) if grouped else np.array(w, np.float64)[None]
    h = np.array(h, np.float64) if grouped else np.array(h, np.float64)[None]
    g, c, k = w.shape
    lo, hi = qrange(bits)
    if bounds is None:
        lo_c, hi_c = np.full((g, c), float(lo)), np.full((g, c), float(hi))
    else:
        lo_c, hi_c = (np.asarray(b, np.float64).reshape(g, c) for b in bounds)
    scale = np.ldexp(1.0, -np.asarray(frac, np.int64)).reshape(g, c)
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = diag == 0
    gi, ki = np.nonzero(dead)
    h[gi, ki, ki] = 1.0
    if act_order and not (sparsity and sparsity.m):  # n:m groups are consecutive inputs: keep their order
        order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")
    else:
        order = np.broadcast_to(np.arange(k), (g, k))
    w = np.take_along_axis(w, order[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    hinv = _inverse_cholesky(h, damp)
    q = np.zeros((g, c, k), np.int64)
    block = BLOCK - BLOCK % sparsity.m if sparsity is not None and sparsity.m else BLOCK  # n:m groups within a block
    for a in range(0, k, block):
        b = min(a + block, k)
        wb = w[:, :, a:b].copy()
        hb = hinv[:, a:b, a:b]
        d = np.diagonal(hb, axis1=1, axis2=2)[:, None, :]  # [G, 1, B]
        err = np.zeros_like(wb)
        pruned = np.zeros(wb.shape, bool)
        if sparsity is not None and sparsity.fraction:
            pruned = _smallest(wb ** 2 / d ** 2, int(round(sparsity.fraction * (b - a))))
        for i in range(b - a):
            if sparsity is not None and sparsity.m and i % sparsity.m == 0:
                j = min(i + sparsity.m, b - a)
                pruned[:, :, i:j] = _smallest(wb[:, :, i:j] ** 2 / d[:, :, i:j] ** 2, sparsity.n if j - i == sparsity.m else 0)
            col = wb[:, :, i]
            qi = np.clip(np.rint(col / scale), lo_c, hi_c)
            qi[pruned[:, :, i]] = 0
            q[:, :, a + i] = qi.astype(np.int64)
            e = (col - qi * scale) / d[:, :, i]
            wb[:, :, i:] -= e[:, :, None] * hb[:, i, i:][:, None, :]
            err[:, :, i] = e
        if b < k:
            w[:, :, b:] -= np.matmul(err, hinv[:, a:b, b:])
    out = np.empty_like(q)
    np.put_along_axis(out, np.broadcast_to(order[:, None, :], q.shape), q, axis=2)
    return out if grouped else out[0]


def magnitude_mask(w: np.ndarray, sparsity: Sparsity) -> np.ndarray:
    """True where w [..., K] is pruned by magnitude alone (no Hessian): the n smallest |w| of every
    m consecutive inputs, or the given fraction of each row. The baseline of the joint update."""
    w = np.abs(np.asarray(w, np.float64))
    if sparsity.m:
        k = w.shape[-1] - w.shape[-1] % sparsity.m
        mask = np.zeros(w.shape, bool)
        groups = w[..., :k].reshape(*w.shape[:-1], k // sparsity.m, sparsity.m)
        mask[..., :k] = _smallest(groups, sparsity.n).reshape(*w.shape[:-1], k)
        return mask
    return _smallest(w, int(round(sparsity.fraction * w.shape[-1])))


def _smallest(metric: np.ndarray, n: int) -> np.ndarray:
    """True at the n smallest entries of each row (last axis) of metric."""
    mask = np.zeros(metric.shape, bool)
    if n <= 0:
        return mask
    idx = np.argpartition(metric, n - 1, axis=-1)[..., :n]
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp mean(diag H) I)^-1 per group: row i carries the feedback
    of column i. The damping grows tenfold (up to 3 times) where float64 finds H not positive
    definite."""
    k = h.shape[-1]
    mean = np.mean(np.diagonal(h, axis1=1, axis2=2), axis=1)[:, None, None]
    for attempt in range(4):
        hd = h + (damp * 10 ** attempt) * mean * np.eye(k)
        try:
            return np.linalg.cholesky(np.linalg.inv(hd)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            continue
    raise DfqError("second-order rounding: a layer's input Hessian is not positive definite even with damping")
