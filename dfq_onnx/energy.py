"""Signal and error energies of a model's outputs against float, and SQNR from them.

Sums are float64 and taken block by block through one reused float64 buffer, so a large output
(a text recognizer's [N, 40, 18385] class scores: 94 MB per 32 samples) is never copied whole to
float64: the copies cost more than the onnxruntime runs they judge (1 s per 94 MB here, the page
faults of a fresh allocation).
"""
from __future__ import annotations

import numpy as np

BLOCK = 1 << 18  # float64 values per block (2 MB)


def energies(ref: np.ndarray, y: np.ndarray | None = None) -> tuple[float, float]:
    """(sum of ref², sum of (ref - y)²) in float64, each element cast to float64 before it is
    subtracted and squared (as ref.astype(float64) - y.astype(float64) would); (sum of ref², 0.0)
    without y. Shapes must match."""
    a = np.ascontiguousarray(ref).reshape(-1)
    b = None if y is None else np.ascontiguousarray(y).reshape(-1)
    if b is not None and b.size != a.size:
        raise ValueError(f"energies: sizes differ ({a.size} vs {b.size})")
    buf, sq = np.empty((2, min(a.size, BLOCK)), np.float64)
    signal = noise = 0.0
    for i in range(0, a.size, BLOCK):  # numpy's own sums, not BLAS dot: its threads stall on a busy machine
        n = min(BLOCK, a.size - i)
        d, s = buf[:n], sq[:n]
        d[...] = a[i:i + n]
        signal += float(np.multiply(d, d, out=s).sum())
        if b is not None:
            np.subtract(d, b[i:i + n], out=d)
            noise += float(np.multiply(d, d, out=s).sum())
    return signal, noise


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf where the noise is 0 (identical outputs), -inf where only the
    signal is."""
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")
