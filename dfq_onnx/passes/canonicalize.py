"""Canonical form for the later passes."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph_utils import new_name
from ..model_io import with_inferred_shapes


def canonicalize(graph: gs.Graph) -> gs.Graph:
    """Return a copy in canonical form, computing the same function.

    Guarantees: no Constant, Identity or (inference-mode) Dropout nodes remain, except an Identity
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
