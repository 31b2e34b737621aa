"""Small graphsurgeon helpers shared by every pass (one place for each idea)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATION_OPS = ("Relu", "Clip", "LeakyRelu")
# ops that commute with a power-of-two scale: their output keeps the input's fraction
PASS_THROUGH_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
                    "Pad", "Concat", "Resize", "Split", "Gather")  # Gather: with constant indices
# ops that read only their input's shape: they run on the integer codes as they are
SHAPE_OPS = ("Shape", "Size")
# ops that average: integer sum then one rounding, output at the input's fraction
POOL_OPS = ("GlobalAveragePool", "AveragePool")


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def sole_consumer(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The only node reading t, if t is read by exactly one node and is not a graph output."""
    if len(t.outputs) != 1 or any(o is t for o in graph.outputs):
        return None
    return t.outputs[0]


def const_value(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def weight_of(node: gs.Node) -> gs.Constant | None:
    """The constant weight input of a linear node, or None if it has none."""
    if node.op not in LINEAR_OPS or len(node.inputs) < 2:
        return None
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return None
    w = node.inputs[1]
    if not isinstance(w, gs.Constant) or w.values.dtype.kind != "f":
        return None
    if node.op == "MatMul" and w.values.ndim != 2:
        return None
    if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
        return None
    return w


def attr_str(node: gs.Node, name: str, default: str) -> str:
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def is_zero_pad(node: gs.Node) -> bool:
    """A Pad that adds zeros (constant mode, pad value absent or a constant 0)."""
    if node.op != "Pad" or attr_str(node, "mode", "constant") != "constant":
        return False
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = const_value(node.inputs[2])
        return v is not None and not np.any(v)
    return True


def clip_limits(node: gs.Node) -> tuple[float | None, float | None]:
    """(lo, hi) of a Relu (0, None) or a Clip with constant bounds (None where absent)."""
    if node.op == "Relu":
        return 0.0, None
    lo = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    hi = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def out_channel_axis(node: gs.Node) -> int:
    """Axis of the weight tensor that indexes output channels."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # MatMul with a 2-D constant right-hand side


def bias_of(node: gs.Node) -> gs.Constant | None:
    if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
        b = node.inputs[2]
        return b if isinstance(b, gs.Constant) else None
    return None


def per_channel_vector(value: np.ndarray, channels: int, channel_dim: int, out_rank: int | None) -> np.ndarray | None:
    """If a constant broadcasts against an output as one value per channel, return that vector."""
    v = np.asarray(value)
    if v.size == 1:
        return np.full(channels, v.reshape(()), dtype=np.float64)
    if out_rank is None:
        return None
    shape = list(v.shape)
    # align to the output's rank from the right, like numpy broadcasting
    if len(shape) > out_rank:
        return None
    shape = [1] * (out_rank - len(shape)) + shape
    for d, n in enumerate(shape):
        if d == channel_dim:
            if n not in (1, channels):
                return None
        elif n != 1:
            return None
    return np.broadcast_to(v.reshape(-1) if v.size == channels else v.reshape(()), (channels,)).astype(np.float64)


def layer_norm_width(node: gs.Node) -> int | None:
    """The width of a LayerNormalization over its last axis: the axis' static size, else (a
    symbolic dim) the length of its constant 1-d scale, which must match it; None if neither."""
    shape = node.inputs[0].shape
    if shape and isinstance(shape[-1], int) and shape[-1] > 0:
        return int(shape[-1])
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(scale, gs.Constant) and np.ndim(scale.values) == 1 and np.size(scale.values) > 1:
        return int(np.size(scale.values))
    return None


def output_rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def add_node(graph: gs.Graph, op: str, inputs: list, attrs: dict | None = None, base: str | None = None,
             dtype=np.float32) -> gs.Variable:
    """Append op(inputs) to the graph and return its new output tensor (node and tensor named
    after `base`, default the op)."""
    out = gs.Variable(new_name(graph, base or op), dtype=dtype)
    graph.nodes.append(gs.Node(op, new_name(graph, base or op), attrs or {}, inputs, [out]))
    return out


def new_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not yet used in the graph."""
    used = graph.__dict__.get("_dfq_used_names")
    if used is None:
        used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        graph.__dict__["_dfq_used_names"] = used
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name
