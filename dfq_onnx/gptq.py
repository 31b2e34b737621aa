"""Second-order weight rounding on the power-of-two grid (GPTQ / OBQ style), in numpy.

For a linear layer y = W x with W [C, K] (C output channels, K inputs), quantizing W column by
column and feeding each column's rounding error back into the columns not yet quantized,
weighted by the inverse Hessian of the layer's squared output error, H = sum over samples of
x x^T (Frantar et al., 2022), lowers ||W X - W_q X|| against rounding each weight to nearest on
the same grid. The grid here is dfq-onnx's: a fixed power-of-two fraction per output channel,
symmetric b-bit codes (fixedpoint.quantize), so the result is a plain code tensor the quantized IR
can hold.

Hessians are a mergeable statistic, like calibration's histograms: the Hessian of a data set is
the sum of its shards' Hessians (`Hessian.merge`). Not yet wired into the conversion pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fixedpoint import qrange

BLOCK = 128  # columns updated together (the lazy batch update of GPTQ)


@dataclass
class Hessian:
    """sum x x^T over `count` input vectors x of length K (float64)."""
    h: np.ndarray
    count: int

    @classmethod
    def of(cls, x: np.ndarray) -> "Hessian":
        """The Hessian of the rows of x [n, K]."""
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        return cls(x.T @ x, len(x))

    def merge(self, other: "Hessian") -> "Hessian":
        return Hessian(self.h + other.h, self.count + other.count)


def quantize_columns(w: np.ndarray, h: np.ndarray, frac: np.ndarray, bits: int, *, damp: float = 0.01,
                     act_order: bool = False) -> np.ndarray:
    """int64 codes of w [C, K] at fraction frac[c] per output channel (round half to even, clamped
    to the symmetric b-bit range), chosen column by column with GPTQ's error feedback through
    H^-1 (H [K, K] the input Hessian; damp: the fraction of its mean diagonal added to the
    diagonal; act_order: columns in order of decreasing H[k, k]). Inputs that never vary
    (H[k, k] = 0) are rounded to nearest."""
    w = np.array(w, np.float64)
    c, k = w.shape
    lo, hi = qrange(bits)
    scale = np.ldexp(1.0, -np.asarray(frac, np.int64)).reshape(c)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: row i carries the feedback of column i
    q = np.zeros((c, k), np.int64)
    for a in range(0, k, BLOCK):
        b = min(a + BLOCK, k)
        wb = w[:, a:b].copy()
        err = np.zeros_like(wb)
        for i in range(b - a):
            col = wb[:, i]
            qi = np.clip(np.rint(col / scale), lo, hi)
            q[:, a + i] = qi.astype(np.int64)
            e = (col - qi * scale) / hinv[a + i, a + i]
            wb[:, i:] -= np.outer(e, hinv[a + i, a + i:b])
            err[:, i] = e
        w[:, b:] -= err @ hinv[a:b, b:]
    out = np.empty_like(q)
    out[:, order] = q
    return out
