"""Canonical form for the later passes."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_utils import attr_str, const_value, is_zero_pad, new_name, sole_consumer
from ..model_io import with_inferred_shapes
from .patterns import recognize_activations


def canonicalize(graph: gs.Graph) -> gs.Graph:
    """Return a copy in canonical form, computing the same function.

    Guarantees: no Constant, Identity or (inference-mode) Dropout nodes remain; a zero Pad of the
    spatial axes read only by a Conv is folded into the Conv's pads; a Gemm has alpha = beta = 1,
    transA = 0 and a C that is absent or a constant vector over its output columns (see
    _canonical_gemm); except an Identity
    that connects a graph input straight to a graph output; a two-input Sum is an Add; every subexpression of constants is
    folded into an initializer and shapes are re-inferred from the folded values; HardSigmoid and
    HardSwish written out as Add/Clip/Mul/Div are single ops (passes/patterns.py); nodes are
    topologically sorted and every node has a unique name.
    """
    g = graph.copy()
    _name_nodes(g)  # before the rules rename what they fuse: the same names at every opset (patterns.py)
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
    recognize_activations(g)
    for node in list(g.nodes):
        _fold_pad_into_conv(g, node)
        if node.op == "Gemm":
            _canonical_gemm(g, node)
    g.cleanup()
    g = with_inferred_shapes(g)
    g.toposort()
    _name_nodes(g)
    return g


def _name_nodes(g: gs.Graph) -> None:
    """Every node named, uniquely: an unnamed one "<op>_node" (numbered), a repeated name numbered."""
    for node in g.nodes:
        if not node.name:
            node.name = new_name(g, f"{node.op}_node")
    seen: set[str] = set()
    for node in g.nodes:
        if node.name in seen:
            node.name = new_name(g, node.name)
        seen.add(node.name)


def _canonical_gemm(g: gs.Graph, gemm: gs.Node) -> None:
    """Gemm(A, B, C; alpha, beta, transA) -> Transpose(A) when transA, alpha folded into a constant
    B, beta into a constant C; a C that is computed, or a constant that is not one value per output
    column, moves to an Add after the Gemm (a computed C scaled by a Mul when beta != 1), which
    form_modules then treats as any other Add (a residual or a float op). Exactly the same
    function, up to float rounding of the folded constants."""
    a = gemm.attrs
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    b = gemm.inputs[1]
    if int(a.get("transA", 0)):
        t = gs.Variable(new_name(g, f"{gemm.name}_A_transposed"), dtype=gemm.inputs[0].dtype)
        g.nodes.append(gs.Node("Transpose", new_name(g, f"{gemm.name}_transA"), {"perm": [1, 0]}, [gemm.inputs[0]], [t]))
        gemm.inputs[0] = t
        a["transA"] = 0
    if alpha != 1.0 and isinstance(b, gs.Constant):
        gemm.inputs[1] = gs.Constant(new_name(g, f"{b.name}_alpha"), (np.asarray(b.values) * alpha).astype(b.values.dtype))
        a["alpha"] = alpha = 1.0
    c = gemm.inputs[2] if len(gemm.inputs) > 2 and gemm.inputs[2].name else None
    if c is None:
        return
    n = np.shape(b.values)[0 if int(a.get("transB", 0)) else 1] if isinstance(b, gs.Constant) else None
    cv = const_value(c)
    if cv is not None and n is not None and cv.size in (1, n) and cv.ndim <= 2 and (cv.ndim < 2 or cv.shape[0] == 1):
        if beta != 1.0 or cv.size != n or cv.ndim != 1:
            vec = np.broadcast_to(cv.reshape(-1) * beta, (n,)).astype(cv.dtype)
            gemm.inputs[2] = gs.Constant(new_name(g, f"{c.name}_bias"), np.ascontiguousarray(vec))
            a["beta"] = 1.0
        return
    if alpha != 1.0:
        return  # a computed B and a computed C: nothing to canonicalize into a module
    out = gemm.outputs[0]
    mid = gs.Variable(new_name(g, f"{gemm.name}_product"), dtype=out.dtype)
    gemm.outputs[0] = mid
    del gemm.inputs[2]
    a.pop("beta", None)
    if beta != 1.0:
        if cv is not None:
            c = gs.Constant(new_name(g, f"{c.name}_beta"), (cv * beta).astype(cv.dtype))
        else:
            scaled = gs.Variable(new_name(g, f"{gemm.name}_C_scaled"), dtype=out.dtype)
            g.nodes.append(gs.Node("Mul", new_name(g, f"{gemm.name}_beta"), {},
                                   [c, gs.Constant(new_name(g, f"{gemm.name}_beta_value"), np.array(beta, np.float32))], [scaled]))
            c = scaled
    g.nodes.append(gs.Node("Add", new_name(g, f"{gemm.name}_C"), {}, [mid, c], [out]))


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
