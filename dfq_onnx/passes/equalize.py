"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), `--equalize`, off by default.

For a pair conv1 -> act -> conv2 (align_ranges.find_pairs: the tensor between them is read by
conv2 alone) whose activation commutes with a positive per-channel factor (Relu, LeakyRelu, none;
a zero Pad), output channel i of conv1 is divided by s_i and input channel i of conv2 multiplied
by it, with s_i = sqrt(r1_i / r2_i), r1_i = max|W1[i]| and r2_i = max|W2[:, i]| (for a depthwise
conv2, max|W2[i]|): afterwards both ranges are sqrt(r1_i r2_i). conv1's bias is divided too. The
function is unchanged up to float32 rounding.

A Relu6 or other Clip with an upper bound is left alone: Clip(x / s_i, 0, 6) is not
Clip(x, 0, 6) / s_i, and a per-channel bound does not fit a scalar Clip (the DFQ paper replaces
Relu6 by Relu, which changes the float model; measured on MobileNetV2 that lowered agreement).
With per-channel weight exponents (the default) the weight ranges are already equalized per
channel, so this matters mainly with --per-tensor.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_utils import clip_limits
from .align_ranges import find_pairs

ROUNDS = 2  # passes over the pairs (a conv can be conv2 of one pair and conv1 of the next)


def equalize(graph: gs.Graph) -> tuple[gs.Graph, dict, dict[str, np.ndarray]]:
    """Return an equalized copy (see module docstring), facts {"equalized": pairs,
    "equalize_skipped": pairs left alone because of a bounded Clip}, and for each rescaled conv1
    output tensor the per-channel factor it was divided by (all rounds combined)."""
    g = graph.copy()
    done, skipped = set(), set()
    scales: dict[str, np.ndarray] = {}
    for _ in range(ROUNDS):
        for n1, between, n2 in find_pairs(g):
            if any(op.op == "Clip" and not _lower_bound_only(op) for op in between):
                skipped.add((n1.name, n2.name))
                continue
            w1 = np.asarray(n1.inputs[1].values, dtype=np.float64)
            w2 = np.asarray(n2.inputs[1].values, dtype=np.float64)
            c = w1.shape[0]
            group = int(n2.attrs.get("group", 1))
            if group == 1 and w2.shape[1] == c:
                r2 = np.abs(w2).max(axis=tuple(i for i in range(w2.ndim) if i != 1))
                shape2 = (1, c) + (1,) * (w2.ndim - 2)
            elif group == c and w2.shape[0] == c and w2.shape[1] == 1:  # depthwise
                r2 = np.abs(w2).reshape(c, -1).max(axis=1)
                shape2 = (c,) + (1,) * (w2.ndim - 1)
            else:
                continue
            if int(n1.attrs.get("group", 1)) not in (1, c):
                continue
            r1 = np.abs(w1).reshape(c, -1).max(axis=1)
            s = np.ones(c)
            ok = (r1 > 0) & (r2 > 0)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            n1.inputs[1].values = (w1 / s.reshape((c,) + (1,) * (w1.ndim - 1))).astype(np.float32)
            if len(n1.inputs) > 2 and isinstance(n1.inputs[2], gs.Constant):
                n1.inputs[2].values = (np.asarray(n1.inputs[2].values, dtype=np.float64) / s).astype(np.float32)
            n2.inputs[1].values = (w2 * s.reshape(shape2)).astype(np.float32)
            done.add((n1.name, n2.name))
            t = n1.outputs[0].name
            scales[t] = scales.get(t, 1.0) * s
    return g, {"equalized": len(done), "equalize_skipped": len(skipped)}, scales


def _lower_bound_only(op: gs.Node) -> bool:
    """A Clip(x, 0) with no upper bound commutes with a positive factor."""
    lo, hi = clip_limits(op)
    return hi is None and (lo is None or lo == 0.0)
