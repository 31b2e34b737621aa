"""Range alignment: move the scale a power of two cannot express into the weights around a tensor.

A power-of-two scale wastes up to one bit of an activation's range against a float scale. Where a
tensor runs from one convolution to the next through ops that commute with a positive factor,
multiplying the first convolution's output by c and the second's input weights by 1/c leaves the
function unchanged and lets the tensor's best clipping threshold land exactly on the top code of a
power-of-two scale. (The same freedom per channel is cross-layer equalization; measured on
MobileNetV2 with per-channel weight exponents it lowered top-1 agreement, so only the common
factor is used.)
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..fixedpoint import clip_threshold, qrange
from ..graph_utils import clip_limits, is_zero_pad, new_name, sole_consumer, weight_of
from .calibrate import TensorStats
from .form_modules import Plan, activation_kind


def find_pairs(graph: gs.Graph) -> list[tuple[gs.Node, list[gs.Node], gs.Node]]:
    """(conv1, ops between, conv2): conv1's output reaches only conv2's data input, through at
    most one activation with act(c x) = c act(x) for c > 0 once its bounds are scaled (Relu,
    LeakyRelu, Clip with constant bounds) and a zero Pad."""
    pairs = []
    for n1 in graph.nodes:
        if _conv_weight(n1) is None:
            continue
        between: list[gs.Node] = []
        t = n1.outputs[0]
        nxt = sole_consumer(t, graph)
        if nxt is not None and activation_kind(nxt) is not None:
            between.append(nxt)
            t = nxt.outputs[0]
            nxt = sole_consumer(t, graph)
        if nxt is not None and is_zero_pad(nxt):
            between.append(nxt)
            t = nxt.outputs[0]
            nxt = sole_consumer(t, graph)
        if nxt is not None and nxt.inputs[0] is t and _conv_weight(nxt) is not None:
            pairs.append((n1, between, nxt))
    return pairs


def align_ranges(graph: gs.Graph, plan: Plan, stats: dict[str, TensorStats], *, act_bits: int,
                 method: str) -> tuple[gs.Graph, dict[str, TensorStats], dict]:
    """Return a graph with rescaled weights, the statistics of the rescaled tensors, and facts.

    Guarantees: for each pair of find_pairs whose tensor is a module output requantized on its
    own (not tied to other tensors by a Concat), conv1's weight and bias and the activation's
    bounds are multiplied by c in [1, 2) and conv2's weight divided by c, where c makes the
    tensor's best clipping threshold (fixedpoint.clip_threshold) equal to the top code of a
    power-of-two scale; the function computed is unchanged up to float32 rounding; statistics
    of every other tensor are unchanged."""
    g = graph.copy()
    stats = dict(stats)
    facts = {"aligned": 0}
    for n1, between, n2 in find_pairs(g):
        t = (between[0] if between and between[0].op != "Pad" else n1).outputs[0].name
        if plan.requant_kind.get(t) != "module" or any(plan.group(x) == plan.group(t) and x != t
                                                         for x in plan.requant):
            continue
        s = stats[t]
        unsigned = t in plan.unsigned
        top = clip_threshold(s.hist, s.max_abs, act_bits, unsigned, method)
        if top <= 0:
            continue
        hi = qrange(act_bits, unsigned)[1]
        c = hi * 2.0 ** -np.floor(np.log2(hi / top)) / top
        if not 1.0 < c < 2.0:
            continue
        _scale(n1.inputs[1], c)
        if len(n1.inputs) > 2 and isinstance(n1.inputs[2], gs.Constant):
            _scale(n1.inputs[2], c)
        w2 = n2.inputs[1]
        w2.values = (np.asarray(w2.values, dtype=np.float64) / c).astype(w2.values.dtype)
        for op in between:
            if op.op == "Clip":
                lo, hi_v = clip_limits(op)
                for k, v in ((1, lo), (2, hi_v)):
                    if v is not None:
                        op.inputs[k] = gs.Constant(new_name(g, f"{op.name}_bound"), np.array(v * c, dtype=np.float32))
        stats[t] = s.scaled(c)
        facts["aligned"] += 1
    return g, stats, facts


def _scale(t: gs.Constant, c: float) -> None:
    t.values = (np.asarray(t.values, dtype=np.float64) * c).astype(t.values.dtype)


def _conv_weight(node: gs.Node) -> gs.Constant | None:
    """The weight of a Conv whose weight (and bias) are constants read by this node alone."""
    w = weight_of(node) if node.op == "Conv" else None
    if w is None or len(w.outputs) != 1:
        return None
    if len(node.inputs) > 2 and node.inputs[2].name and \
            (not isinstance(node.inputs[2], gs.Constant) or len(node.inputs[2].outputs) != 1):
        return None
    return w
