"""Canonical form for the later passes."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_utils import attr_str, const_value, is_zero_pad, new_name, sole_consumer
from ..model_io import with_inferred_shapes


def canonicalize(graph: gs.Graph) -> gs.Graph:
    """Return a copy in canonical form, computing the same function.

    Guarantees: no Constant, Identity or (inference-mode) Dropout nodes remain; a zero Pad of the
    spatial axes read only by a Conv is folded into the Conv's pads; except an Identity
    that connects a graph input straight to a graph output; a two-input Sum is an Add; every subexpression of constants is
    folded into an initializer and shapes are re-inferred from the folded values; nodes are topologically sorted and every node has a unique name.
    """
    g = graph.copy()
    for node in list(g.nodes):
        if node.op not in ("Identity", "Dropout"):
            continue
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # the mask is used: keep it
        src, dst = node.inputs[0], node.outputs[0]
        if any(o is dst for o in g.outputs):
            if any(i is src for i in g.inputs) or isinstance(src, gs.Constant) or any(o is src for o in g.outputs):
                continue
            # keep the graph output's name: the producer writes dst directly
            prod = src.inputs[0]
            for c in list(src.outputs):
                if c is not node:
                    c.inputs[c.inputs.index(src)] = dst
            prod.outputs[prod.outputs.index(src)] = dst
        else:
            for c in list(dst.outputs):
                for k, t in enumerate(c.inputs):
                    if t is dst:
                        c.inputs[k] = src
        node.inputs.clear()
        node.outputs.clear()
    for node in g.nodes:
        if node.op == "Sum" and len(node.inputs) == 2:
            node.op = "Add"  # old exports write residual sums as Sum
    g.cleanup()
    g.fold_constants(error_ok=True)
    g.cleanup()
    for node in list(g.nodes):
        _fold_pad_into_conv(g, node)
    g.cleanup()
    g = with_inferred_shapes(g)
    g.toposort()
    for node in g.nodes:
        if not node.name:
            node.name = new_name(g, f"{node.op}_node")
    seen: set[str] = set()
    for node in g.nodes:
        if node.name in seen:
            node.name = new_name(g, node.name)
        seen.add(node.name)
    return g


def _fold_pad_into_conv(g: gs.Graph, pad: gs.Node) -> None:
    """Pad(constant 0, spatial axes only) -> Conv becomes Conv with larger pads (exactly equal)."""
    if not is_zero_pad(pad) or not 2 <= len(pad.inputs) <= 3:
        return
    pads = const_value(pad.inputs[1])
    if pads is None:
        return
    conv = sole_consumer(pad.outputs[0], g)
    if conv is None or conv.op != "Conv" or conv.inputs[0] is not pad.outputs[0]:
        return
    if attr_str(conv, "auto_pad", "NOTSET") != "NOTSET":
        return
    pads = [int(v) for v in np.asarray(pads).reshape(-1)]
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
        return  # batch/channel padding, or cropping
    nsp = rank - 2
    old = list(conv.attrs.get("pads", [0] * 2 * nsp))
    conv.attrs["pads"] = [old[i] + begin[2 + i] for i in range(nsp)] + [old[nsp + i] + end[2 + i] for i in range(nsp)]
    conv.inputs[0] = pad.inputs[0]
    pad.inputs.clear()
    pad.outputs.clear()
