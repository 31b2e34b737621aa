"""Fold BatchNormalization and constant per-channel scale/shift into the linear layer before it,
and a BatchNormalization that follows no linear layer into the one after it where that is exact."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_utils import (attr_str, bias_of, const_value, new_name, out_channel_axis, output_rank,
                           per_channel_vector, sole_consumer, weight_of)


def fold_batchnorm(graph: gs.Graph) -> gs.Graph:
    """Return a copy where affine per-channel ops are merged into the preceding linear layer.

    Guarantees: a BatchNormalization, or a Mul/Div/Add/Sub by a per-channel constant, that is the
    only reader of the output of a Conv, ConvTranspose (group 1), Gemm or MatMul with a constant
    weight is removed and its effect is carried by that layer's weight and bias (a bias is added
    when the layer had none; Gemm gets alpha = beta = 1). A MatMul with a 2-D input and a 2-D
    constant weight becomes a Gemm first. A weight tensor read by more than one layer is copied
    before it is changed, so it is never folded twice. A BatchNormalization left over (it follows
    no such layer: it normalizes the input, or follows a pool) whose only reader is a Conv or a
    Gemm is folded forward into that layer's weight (scale, per input channel) and bias (shift
    times the weight): only where that is exact, i.e. the shift is zero or the Conv pads nothing
    (a padded border would see the shift as zeros). Any other BatchNormalization stays. The
    function computed is unchanged up to float32 rounding.
    """
    g = graph.copy()
    for node in list(g.nodes):
        if node.op == "MatMul":
            _matmul_to_gemm(node)
    for node in list(g.nodes):
        if weight_of(node) is None:
            continue
        if node.op == "Gemm":
            _normalize_gemm(g, node)
        while _fold_next(g, node):
            pass
    for node in list(g.nodes):
        if node.op == "BatchNormalization":
            _fold_forward(g, node)
    g.cleanup()
    g.toposort()
    return g


def _matmul_to_gemm(node: gs.Node) -> None:
    a, w = node.inputs[0], node.inputs[1]
    if (isinstance(w, gs.Constant) and w.values.ndim == 2 and w.values.dtype.kind == "f"
            and a.shape is not None and len(a.shape) == 2):
        node.op = "Gemm"
        node.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}


def _channels(node: gs.Node) -> int:
    return int(node.inputs[1].values.shape[out_channel_axis(node)])


def _channel_dim(node: gs.Node) -> int | None:
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return 1
    r = output_rank(node.outputs[0])
    return None if r is None else r - 1


def _normalize_gemm(g: gs.Graph, node: gs.Node) -> None:
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    b = bias_of(node)
    if len(node.inputs) > 2 and b is None:
        return  # a non-constant C: leave the layer alone
    if b is not None:
        vec = per_channel_vector(b.values, _channels(node), 1, 2)
        if vec is None:
            return  # full-matrix C
        _set_bias(g, node, (vec * beta).astype(np.float32))
    if alpha != 1.0:
        _set_weight(g, node, (node.inputs[1].values.astype(np.float64) * alpha).astype(np.float32))
    node.attrs["alpha"] = 1.0
    node.attrs["beta"] = 1.0


def _affine_after(g: gs.Graph, node: gs.Node) -> tuple[gs.Node, np.ndarray, np.ndarray] | None:
    """If the sole reader of node's output is a per-channel affine op, return (op, scale, shift)."""
    out = node.outputs[0]
    nxt = sole_consumer(out, g)
    if nxt is None or len(nxt.outputs) != 1:
        return None
    n, cdim, rank = _channels(node), _channel_dim(node), output_rank(out)
    if cdim is None:
        return None
    if nxt.op == "BatchNormalization":
        if cdim != 1 or nxt.inputs[0] is not out:
            return None
        st = _batchnorm_affine(nxt)
        if st is None or st[0].size != n:
            return None
        return nxt, st[0], st[1]
    if nxt.op not in ("Mul", "Div", "Add", "Sub") or len(nxt.inputs) != 2:
        return None
    other_idx = 1 if nxt.inputs[0] is out else 0
    if nxt.inputs[1 - other_idx] is not out:
        return None
    c = const_value(nxt.inputs[other_idx])
    if c is None or c.dtype.kind != "f":
        return None
    vec = per_channel_vector(c, n, cdim, rank)
    if vec is None:
        return None
    # the output shape must stay the same (a constant of higher rank would broadcast it up)
    if rank is not None and c.ndim > rank:
        return None
    one, zero = np.ones(n), np.zeros(n)
    if nxt.op == "Mul":
        return nxt, vec, zero
    if nxt.op == "Add":
        return nxt, one, vec
    if nxt.op == "Div" and other_idx == 1 and np.all(vec != 0):
        return nxt, 1.0 / vec, zero
    if nxt.op == "Sub" and other_idx == 1:
        return nxt, one, -vec
    return None


def _batchnorm_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel of an inference-mode BatchNormalization with constant statistics."""
    if int(bn.attrs.get("training_mode", 0)) or len(bn.outputs) != 1 or len(bn.inputs) < 5:
        return None
    vals = [const_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in vals):
        return None
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in vals)
    if not gamma.size == beta.size == mean.size == var.size:
        return None
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - mean * s


def _fold_forward(g: gs.Graph, bn: gs.Node) -> bool:
    """Fold y = s x + t (per channel, axis 1) into the Conv or Gemm that alone reads y:
    W'[o, c, ...] = W[o, c, ...] s_c and b' = b + sum over c and the kernel of W[o, c, ...] t_c."""
    st = _batchnorm_affine(bn)
    nxt = sole_consumer(bn.outputs[0], g) if st is not None else None
    if nxt is None or weight_of(nxt) is None or nxt.inputs[0] is not bn.outputs[0]:
        return False
    s, t = st
    w = nxt.inputs[1].values.astype(np.float64)
    if nxt.op == "Conv":
        group = int(nxt.attrs.get("group", 1))
        if w.shape[1] * group != s.size:
            return False
        if np.any(t != 0) and (any(int(p) for p in nxt.attrs.get("pads", [])) or
                               attr_str(nxt, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            return False
        o, ig = w.shape[0], w.shape[1]
        per_group = w.reshape(group, o // group, ig, -1)  # input channel of [g, o, i] is g * ig + i
        sg, tg = s.reshape(group, 1, ig, 1), t.reshape(group, 1, ig, 1)
        w_new = (per_group * sg).reshape(w.shape)
        shift = (per_group * tg).sum(axis=(2, 3)).reshape(o)
    elif nxt.op == "Gemm":
        trans = int(nxt.attrs.get("transB", 0))
        k = w.shape[1] if trans else w.shape[0]
        if k != s.size or nxt.inputs[0].shape is None or len(nxt.inputs[0].shape) != 2:
            return False
        w_new = w * (s[None, :] if trans else s[:, None])
        shift = (w @ t) if trans else (t @ w)
    else:
        return False
    if len(nxt.inputs) > 2 and bias_of(nxt) is None:
        return False  # a computed bias: nowhere to add the shift
    _set_weight(g, nxt, w_new.astype(np.float32))
    b = bias_of(nxt)
    b0 = np.zeros(len(shift)) if b is None else np.broadcast_to(b.values.astype(np.float64).reshape(-1), shift.shape)
    _set_bias(g, nxt, (b0 + shift).astype(np.float32))
    nxt.inputs[0] = bn.inputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    return True


def _fold_next(g: gs.Graph, node: gs.Node) -> bool:
    found = _affine_after(g, node)
    if found is None:
        return False
    op, s, t = found
    has_bias_slot = node.op in ("Conv", "ConvTranspose", "Gemm")
    if not has_bias_slot and np.any(t != 0):
        return False  # a MatMul has nowhere to put a shift
    if node.op == "Gemm" and len(node.inputs) > 2 and bias_of(node) is None:
        return False
    w = node.inputs[1].values.astype(np.float64)
    axis = out_channel_axis(node)
    shape = [1] * w.ndim
    shape[axis] = -1
    _set_weight(g, node, (w * s.reshape(shape)).astype(np.float32))
    if has_bias_slot:
        b = bias_of(node)
        b0 = np.zeros(len(s)) if b is None else b.values.astype(np.float64).reshape(-1)
        _set_bias(g, node, (b0 * s + t).astype(np.float32))
    # the layer now writes the affine op's output tensor
    new_out = op.outputs[0]
    op.inputs.clear()
    op.outputs.clear()
    node.outputs[0] = new_out
    return True


def _set_weight(g: gs.Graph, node: gs.Node, values: np.ndarray) -> None:
    w = node.inputs[1]
    if len(w.outputs) > 1:  # shared: give this layer its own copy
        node.inputs[1] = gs.Constant(new_name(g, f"{w.name}_folded"), values)
    else:
        w.values = values


def _set_bias(g: gs.Graph, node: gs.Node, values: np.ndarray) -> None:
    b = bias_of(node)
    if b is not None and len(b.outputs) == 1:
        b.values = values
        return
    const = gs.Constant(new_name(g, f"{node.name}_bias"), values)
    if len(node.inputs) > 2:
        node.inputs[2] = const
    else:
        node.inputs.append(const)
