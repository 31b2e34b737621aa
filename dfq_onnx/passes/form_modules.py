"""Find unified modules and plan where tensors are quantized (an analysis: the graph is not changed).

A unified module is one linear op (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
+ its bias + an optional residual Add + an optional activation (Relu, Clip, LeakyRelu), with ONE
requantization at its output. An averaging op (GlobalAveragePool, AveragePool) is a module of
its own: it needs one rounding. A chain of elementwise ops that reads one tensor (an activation
however it is spelled: HardSwish, x*Sigmoid(x), GELU through Erf, Mish, PRelu, ...) is a table
module: on 8-bit codes it is a 256-entry lookup table, one per channel where its constants are
per channel. An Add, Sub or Mul of two activations and a MatMul of two activations are binary
modules: an integer product or aligned sum and one rounding. LayerNormalization and Softmax over
the last axis are norm modules. Pass-through ops keep their
input's fraction. Everything else runs in float between a DequantizeLinear and a
QuantizeLinear: a float island.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import functions
from ..graph_utils import (ACTIVATION_OPS, PASS_THROUGH_OPS, POOL_OPS, SHAPE_OPS, attr_str, const_value,
                           is_zero_pad, layer_norm_width, output_rank, per_channel_vector, sole_consumer, weight_of)
from ..model_io import TWIN_CAST


@dataclass(frozen=True)
class Module:
    name: str                    # name of the linear (or pooling) node; a table's or binary op's last node
    kind: str                    # "linear", "pool", "table", "binary" or "norm" (LayerNormalization, Softmax)
    op: str                      # Conv, Gemm, ..., GlobalAveragePool; a table: its ops joined by "+"; Mul, Add, Sub, MatMul
    input: str                   # activation input tensor (a binary module: its first operand)
    output: str                  # the module's output tensor: its one requantization point
    nodes: tuple[str, ...]       # every node of the module, in order
    bias_add: str | None = None  # an Add node carrying the bias (MatMul only)
    residual: str | None = None  # the residual Add node
    residual_input: str | None = None
    activation: str | None = None  # Relu, Relu6, Clip, LeakyRelu
    unsigned: bool = False       # output provably non-negative
    other: str | None = None     # a binary module's second operand
    channel_axis: int | None = None  # a table: the (negative) axis its constants vary along, None if scalar

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "op": self.op, "residual": self.residual is not None,
                "activation": self.activation, "output": self.output, "unsigned": self.unsigned}


@dataclass
class Plan:
    """Where quantization happens.

    requant: tensors rounded to low precision at run time, in graph order: graph inputs entering
        the quantized region, module outputs, float-island outputs read by quantized ops.
    passthrough: tensor -> the tensor whose fraction it keeps (outputs of pass-through ops).
    groups: tensor -> representative; tensors of one group share one fraction (Concat inputs,
        a pooling op's input and output).
    unsigned: tensors that are provably non-negative.
    float_outputs: outputs of linear modules that are graph outputs read by no node: not
        requantized, they leave at the accumulator's precision (dequantized int32).
    float_nodes: names of nodes that stay float (float islands), by op type in `float_ops`.
    shape_nodes: Shape/Size nodes (on a quantized tensor they read its codes' shape) and the
        integer arithmetic on their results (Gather, Concat, ... of int64 shapes): not float.
    """
    modules: list[Module]
    requant: list[str] = field(default_factory=list)
    requant_kind: dict[str, str] = field(default_factory=dict)  # input | module | residual | island
    passthrough: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    unsigned: set[str] = field(default_factory=set)
    float_outputs: set[str] = field(default_factory=set)
    float_nodes: list[str] = field(default_factory=list)
    shape_nodes: list[str] = field(default_factory=list)  # Shape/Size and integer shape arithmetic
    float_ops: Counter = field(default_factory=Counter)
    float_norms: int = 0  # normalizations written out in a spelling no rule knows, kept float whole

    def source(self, t: str) -> str:
        """The requantized tensor whose fraction t carries."""
        while t in self.passthrough:
            t = self.passthrough[t]
        return t

    def group(self, t: str) -> str:
        t = self.source(t)
        while self.groups.get(t, t) != t:
            t = self.groups[t]
        return t

    def union(self, a: str, b: str) -> None:
        ra, rb = self.group(a), self.group(b)
        if ra != rb:
            self.groups[rb] = ra

    def module(self, name: str) -> Module:
        return next(m for m in self.modules if m.name == name)

    def quantized(self, t: str) -> bool:
        return t in self.passthrough or t in self.requant


def activation_kind(node: gs.Node) -> str | None:
    """Relu, LeakyRelu, Relu6 (Clip(0, 6)) or Clip with constant bounds; None for anything else."""
    if node.op in ("Relu", "LeakyRelu"):
        return node.op
    if node.op == "Clip":
        lo = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        hi = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if (len(node.inputs) > 1 and node.inputs[1].name and lo is None) or \
                (len(node.inputs) > 2 and node.inputs[2].name and hi is None):
            return None  # non-constant bounds
        if lo is not None and float(lo) == 0.0 and hi is not None and float(hi) == 6.0:
            return "Relu6"
        return "Clip"
    return None


def _non_negative_activation(node: gs.Node) -> bool:
    if node.op == "Relu":
        return True
    if node.op == "Clip" and len(node.inputs) > 1 and node.inputs[1].name:
        lo = const_value(node.inputs[1])
        return lo is not None and float(lo) >= 0.0
    return False


def find_modules(graph: gs.Graph, integer_graph: bool = False) -> list[Module]:
    """Every module of a canonical graph, in graph order: each linear layer grouped with its bias,
    residual Add and activation, each averaging op, then (find_elementwise_modules) the tables,
    binary ops, LayerNorms and Softmaxes among the remaining nodes.

    integer_graph: for the integer-only graph, where every op must have an integer form. A linear
    module then takes only an activation that is a clamp of its codes (Relu, Clip), and a LeakyRelu
    after it becomes a table (there is no rounding shift with a float slope). Otherwise (QDQ) a
    table, binary op, LayerNorm or Softmax whose output only leaves the graph (perhaps through
    Reshape, Flatten, ...) stays float: rounding a model's final probabilities to 8 bits would
    only lose precision there."""
    modules = _linear_and_pool_modules(graph, ("Relu", "Clip") if integer_graph else ACTIVATION_OPS)
    extra = find_elementwise_modules(graph, modules)
    if not integer_graph:
        tensors = graph.tensors()
        outputs = {t.name for t in graph.outputs}

        def only_leaves(t: gs.Tensor) -> bool:
            """t is read by no op but a pass-through op (Reshape, Flatten, ...) on the way to the outputs."""
            return (t.name in outputs or bool(t.outputs)) and all(
                n.op in PASS_THROUGH_OPS and n.op != "Concat" and n.inputs[0] is t and all(only_leaves(o) for o in n.outputs)
                for n in t.outputs)
        extra = [m for m in extra if not only_leaves(tensors[m.output])]
    modules += extra
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(modules, key=lambda m: order[m.name])


def _linear_and_pool_modules(graph: gs.Graph, activations=ACTIVATION_OPS) -> list[Module]:
    """Group each linear layer with its bias, residual Add and activation. Graph must be canonical."""
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    claimed: set[int] = set()
    modules: list[Module] = []
    for node in graph.nodes:
        if node.op in POOL_OPS:
            if node.op == "AveragePool" and int(node.attrs.get("ceil_mode", 0)):
                continue
            modules.append(Module(node.name, "pool", node.op, node.inputs[0].name, node.outputs[0].name,
                                  (node.name,)))
            continue
        w = weight_of(node)
        if w is None:
            continue
        nodes = [node.name]
        out = node.outputs[0]
        bias_add = residual = residual_input = act = None
        nxt = sole_consumer(out, graph)
        # MatMul bias: an Add of a constant vector over the last axis
        if node.op == "MatMul" and nxt is not None and nxt.op == "Add":
            other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
            rank = output_rank(out)
            c = const_value(other)
            if c is not None and rank is not None and c.ndim <= 1 and \
                    per_channel_vector(c, w.values.shape[1], rank - 1, rank) is not None:
                bias_add = nxt.name
                nodes.append(nxt.name)
                out = nxt.outputs[0]
                nxt = sole_consumer(out, graph)
        if nxt is not None and nxt.op == "Add" and len(nxt.inputs) == 2 and id(nxt) not in claimed:
            other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
            same_shape = other.shape is not None and out.shape is not None and list(other.shape) == list(out.shape)
            if not isinstance(other, gs.Constant) and same_shape:
                prod = other.inputs[0] if other.inputs else None
                # the later of two linear branches absorbs the Add; the other one is requantized
                if prod is None or order[id(prod)] < order[id(node)]:
                    residual, residual_input = nxt.name, other.name
                    claimed.add(id(nxt))
                    nodes.append(nxt.name)
                    out = nxt.outputs[0]
                    nxt = sole_consumer(out, graph)
        unsigned = False
        if nxt is not None and nxt.op in activations:
            kind = activation_kind(nxt)
            if kind is not None:
                act = kind
                unsigned = _non_negative_activation(nxt)
                nodes.append(nxt.name)
                out = nxt.outputs[0]
        modules.append(Module(node.name, "linear", node.op, node.inputs[0].name, out.name, tuple(nodes),
                              bias_add, residual, residual_input, act, unsigned))
    return modules


def chain_spec(nodes: list[gs.Node]) -> list[tuple]:
    """The float function of a table module's nodes, for functions.evaluate: (op, attrs, input
    names, output name, constants by input name), each constant flattened to a vector (its one
    varying axis) or a scalar."""
    spec = []
    for n in nodes:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in n.attrs.items()}
        consts = {t.name: np.asarray(t.values, np.float64).reshape(-1 if t.values.size > 1 else ())
                  for t in n.inputs if isinstance(t, gs.Constant)}
        spec.append((n.op, attrs, [t.name for t in n.inputs], n.outputs[0].name, consts))
    return spec


def _float(t: gs.Tensor) -> bool:
    return t.dtype is None or np.dtype(t.dtype).kind == "f"


def _const_axis(c: gs.Constant, rank: int | None):
    """How a constant of an elementwise op broadcasts: "scalar", (negative axis, length) when it
    varies along one axis only, or None (anything else: no table)."""
    shape = [int(d) for d in np.shape(c.values)]
    if int(np.prod(shape)) == 1:
        return "scalar"
    varying = [i for i, d in enumerate(shape) if d != 1]
    if len(varying) != 1 or rank is None or len(shape) > rank:
        return None
    return varying[0] - len(shape), shape[varying[0]]


def find_elementwise_modules(graph: gs.Graph, modules: list[Module]) -> list[Module]:
    """Table and binary modules among the nodes no linear or pooling module claimed.

    A table's nodes are elementwise ops (functions.ELEMENTWISE) whose only non-constant inputs
    descend from one float tensor, the root, with constants that are scalars or vary along one
    axis (the same axis and length throughout: one table per channel). Every tensor of such a
    chain that is read outside it (or is a graph output) is a table module's output, computed from
    the root alone. A chain of constant scales and shifts only on a graph input stays float (it is
    the input's normalisation: tabling it would round the input twice). A binary module is an Add,
    Sub or Mul of two float activations of different roots, or a MatMul of two activations; a
    norm module a LayerNormalization or Softmax over the last axis (_last_axis_op)."""
    claimed = {name for m in modules for name in m.nodes}
    claimed |= normalization_nodes(graph, claimed)  # stay float, as one unit
    tensors = graph.tensors()
    graph_inputs = {t.name for t in graph.inputs}
    root_of: dict[str, str] = {}
    chains: dict[str, list[gs.Node]] = {}
    axes: dict[str, object] = {}   # root -> (axis, length) of its per-channel constants
    others: list[Module] = []     # binary ops, LayerNorms, Softmaxes
    for node in graph.nodes:
        if node.name in claimed or len(node.outputs) != 1 or not _float(node.outputs[0]):
            continue
        data = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if not data or not all(_float(t) for t in data):
            continue
        roots = {root_of.get(t.name, t.name) for t in data}
        if node.op in ("LayerNormalization", "Softmax") and len(data) == 1 and _last_axis_op(node, graph):
            others.append(Module(node.name, "norm", node.op, data[0].name, node.outputs[0].name, (node.name,)))
            continue
        if node.op in functions.ELEMENTWISE and len(roots) == 1:
            r = roots.pop()
            rank = len(tensors[r].shape) if tensors[r].shape is not None else None
            kinds = [_const_axis(t, rank) for t in node.inputs if isinstance(t, gs.Constant)]
            per = {k for k in kinds if k != "scalar"}
            if None in per or len(per | ({axes[r]} if r in axes else set())) > 1:
                continue
            if per:
                axes[r] = per.pop()
            root_of[node.outputs[0].name] = r
            chains.setdefault(r, []).append(node)
        elif len(data) == 2 and len(roots) == 2 and (node.op in ("Add", "Sub", "Mul") or
                                                      (node.op == "MatMul" and weight_of(node) is None)):
            others.append(Module(node.name, "binary", node.op, data[0].name, node.outputs[0].name, (node.name,),
                                   other=data[1].name))
    tables: list[Module] = []
    graph_outputs = {t.name for t in graph.outputs}
    for r, chain in chains.items():
        members = {id(n) for n in chain}
        nonlinear = any(n.op not in functions.AFFINE or
                        sum(1 for t in n.inputs if t.name and not isinstance(t, gs.Constant)) > 1 for n in chain)
        if r in graph_inputs and not nonlinear:
            continue
        for n in chain:
            out = n.outputs[0]
            if out.name not in graph_outputs and all(id(c) in members for c in out.outputs):
                continue  # internal to the chain
            needed, todo = set(), [n]
            while todo:
                k = todo.pop()
                if id(k) in needed:
                    continue
                needed.add(id(k))
                todo += [t.inputs[0] for t in k.inputs if t.inputs and id(t.inputs[0]) in members]
            part = [k for k in chain if id(k) in needed]
            axis = axes.get(r)
            tables.append(Module(n.name, "table", "+".join(k.op for k in part), r, out.name,
                                 tuple(k.name for k in part), channel_axis=None if axis is None else axis[0]))
    return tables + others


REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
              "ReduceMax", "ReduceMin")
_ON_STATISTICS = set(functions.ELEMENTWISE) | {"Sqrt", "Reciprocal", "Expand", "Cast", "Reshape", "Unsqueeze", "Squeeze"}


def _divides(node: gs.Node, stats: set[str]) -> bool:
    """A square root, reciprocal, division by a statistic, or a fractional or negative power."""
    if node.op in ("Sqrt", "Reciprocal"):
        return True
    if node.op == "Div":
        return node.inputs[1].name in stats
    if node.op == "Pow":
        e = const_value(node.inputs[1])
        return e is None or e.size != 1 or float(e.reshape(-1)[0]) < 0 or float(e.reshape(-1)[0]) != int(e.reshape(-1)[0])
    return False


def normalization_nodes(graph: gs.Graph, claimed: set[str]) -> set[str]:
    """The nodes of every normalization written out in a spelling no pattern rule recognised
    (RMSNorm, L2 normalization, a LayerNorm or Softmax spelled otherwise): they stay float together,
    so only the normalization's inputs and its output are rounded to low precision.

    Guarantee: no tensor computed from a reduction whose statistic reaches a division or a square
    root (through elementwise ops on statistics) is rounded on its own; nor is any tensor that
    only such a normalization reads (its squares, its centred values, ...), nor the output of the
    division before a constant affine (gamma, beta) that alone reads it. A reduction is a statistic
    (ReduceMean, ReduceSum, ReduceL2, ...); a node is on statistics when all its data inputs are;
    a node combining a statistic with another tensor (Sub, Div, Mul, Add) is the normalization's
    output. Nodes of linear and pooling modules (`claimed`) are never taken."""
    stats: set[str] = set()
    members: dict[str, list[gs.Node]] = {}  # statistic tensor -> nodes that computed it, reductions first
    dividing: dict[str, bool] = {}
    region: set[str] = set()
    for node in graph.nodes:
        if node.name in claimed or len(node.outputs) != 1:
            continue
        data = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant) and _float(t)]  # not shapes
        out = node.outputs[0].name
        if node.op in REDUCTIONS and data and _float(data[0]):
            stats.add(out)
            members[out], dividing[out] = [node], False
            continue
        on = [t.name for t in data if t.name in stats]
        if not on or node.op not in _ON_STATISTICS:
            continue
        found = [n for t in on for n in members[t]]
        div = _divides(node, stats) or any(dividing[t] for t in on)
        if len(on) == len(data):
            stats.add(out)
            members[out], dividing[out] = found + [node], div
        elif div and node.op in ("Add", "Sub", "Mul", "Div"):
            region |= {n.name for n in found} | {node.name}  # statistic meets data: a normalization
    if not region:
        return region
    nodes = {n.name: n for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    changed = True
    while changed:  # what only the normalizations read (the squares, the centred values), and
        changed = False  # the constant affine after one (gamma, beta)
        for node in graph.nodes:
            if node.name in region or node.name in claimed or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            readers = list(out.outputs)
            upstream = node.op in _ON_STATISTICS | set(REDUCTIONS) and readers and \
                all(r.name in region for r in readers)  # (a graph output too: it leaves float)
            data = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
            affine = node.op in functions.AFFINE and len(data) == 1 and data[0].inputs and \
                data[0].inputs[0].name in region and data[0].name not in outputs and \
                all(r is node for r in data[0].outputs) and _const_axis_ok(node)
            if upstream or affine:
                region.add(node.name)
                changed = True
    return {n for n in region if n in nodes}


def count_connected(graph: gs.Graph, names: set[str]) -> int:
    """How many groups the named nodes form, two nodes joined when one reads the other's output."""
    parent = {n: n for n in names}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for node in graph.nodes:
        if node.name in names:
            for t in node.inputs:
                if t.inputs and t.inputs[0].name in names:
                    parent[find(t.inputs[0].name)] = find(node.name)
    return len({find(n) for n in names})


def _const_axis_ok(node: gs.Node) -> bool:
    """Every constant input of node is a scalar or varies along its last axis only (gamma, beta)."""
    for t in node.inputs:
        if isinstance(t, gs.Constant):
            shape = np.shape(t.values)
            if any(d != 1 for d in shape[:-1]):
                return False
    return True


def _last_axis_op(node: gs.Node, graph: gs.Graph) -> bool:
    """A LayerNormalization with constant scale (and bias) over a last axis of known size (or a
    symbolic one whose size the scale's length gives: graph_utils.layer_norm_width), or a
    Softmax over the last axis (before opset 13 Softmax flattens from its axis: only its last
    axis is one axis)."""
    shape = node.inputs[0].shape
    if shape is None or (node.op == "LayerNormalization" and layer_norm_width(node) is None):
        return False
    rank = len(shape)
    axis = int(node.attrs.get("axis", -1 if node.op == "LayerNormalization" or (graph.opset or 13) >= 13 else 1))
    if axis not in (-1, rank - 1):
        return False
    return node.op == "Softmax" or all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name)


_SIGN_GRID = np.concatenate([-np.logspace(-12, 24, 2000, base=2.0), [0.0], np.logspace(-12, 24, 2000, base=2.0)])


def non_negative(m: Module, nodes: dict[str, gs.Node]) -> bool:
    """A table whose float function is non-negative on a dense grid of inputs spanning +-2^24
    (Sigmoid, HardSigmoid, Relu, Exp, Softplus, ...): its codes may be unsigned. The table is
    clamped to its code range, so the integer graph and the QDQ graph agree even where the grid
    missed a negative value."""
    spec = chain_spec([nodes[n] for n in m.nodes])
    with np.errstate(all="ignore"):
        y = functions.evaluate(spec, m.input, _SIGN_GRID[:, None])[m.output]
    y = y[np.isfinite(y)]
    return bool(y.size) and bool(np.all(y >= 0))


def plan_quantization(graph: gs.Graph, modules: list[Module], residual_requant: bool = False) -> Plan:
    """Decide which tensors are requantized, which keep a fraction, which stay float.

    residual_requant: also requantize the linear result that enters a module's residual Add (kind
    "residual"), the layout onnxruntime's int8 kernels need (QLinearConv, then QLinearAdd)."""
    plan = Plan(modules)
    plan.float_norms = count_connected(graph, normalization_nodes(
        graph, {n for m in modules if m.kind in ("linear", "pool") for n in m.nodes}))
    tensors = graph.tensors()
    by_first = {m.nodes[0]: m for m in modules if m.kind in ("linear", "pool")}
    by_last = {m.name: m for m in modules if m.kind in ("table", "binary", "norm")}  # named after their last node
    nodes = {n.name: n for n in graph.nodes}
    inside = {name for m in modules for name in (m.nodes[1:] if m.kind in ("linear", "pool") else m.nodes)}
    graph_inputs = {t.name for t in graph.inputs}
    graph_outputs = {t.name for t in graph.outputs}

    def need(t: str) -> None:
        """t is read by a quantized op: make sure it is quantized."""
        if plan.quantized(t) or isinstance(tensors[t], gs.Constant):
            return
        plan.requant.append(t)
        plan.requant_kind[t] = "input" if t in graph_inputs else "island"

    for node in graph.nodes:
        m = by_last.get(node.name)
        if m is not None:  # tables, binary ops, LayerNorm, Softmax: one rounding at the output
            need(m.input)
            if m.other:
                need(m.other)
            plan.requant.append(m.output)
            plan.requant_kind[m.output] = "table" if m.kind == "table" else "module"
            if m.kind == "table" and non_negative(m, nodes) or m.op == "Softmax" or \
                    m.kind == "binary" and m.op in ("Add", "Mul", "MatMul") and \
                    plan.source(m.input) in plan.unsigned and plan.source(m.other) in plan.unsigned:
                plan.unsigned.add(m.output)
        if node.name in inside:
            continue
        m = by_first.get(node.name)
        if m is not None:
            need(m.input)
            if m.residual_input:
                need(m.residual_input)
            if residual_requant and m.residual:
                pre = next(t.name for t in nodes[m.residual].inputs if t.name != m.residual_input)
                plan.requant.append(pre)
                plan.requant_kind[pre] = "residual"
            if m.kind == "linear" and (m.output in graph_outputs and not tensors[m.output].outputs or
                                       _to_twin_output(tensors[m.output])):
                plan.float_outputs.add(m.output)  # read by the user only, not by another op
                continue
            plan.requant.append(m.output)
            plan.requant_kind[m.output] = "module"
            if m.unsigned:
                plan.unsigned.add(m.output)
            if m.kind == "pool":
                plan.union(m.input, m.output)
                if plan.source(m.input) in plan.unsigned:
                    plan.unsigned.add(m.output)
            continue
        data = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
        if (node.op in SHAPE_OPS and data) or _integer_only(node, data):
            plan.shape_nodes.append(node.name)
            continue
        if node.op in PASS_THROUGH_OPS and data and _passes_through(node) and data[0].name in graph_inputs \
                and _float(data[0]):
            need(data[0].name)  # rounding commutes with the op: quantize the input before it, not after
        if node.op in PASS_THROUGH_OPS and data and _passes_through(node) and \
                all(plan.quantized(t.name) for t in data[:1]):
            out = node.outputs[0].name
            if node.op == "Concat":
                for t in data:
                    need(t.name)
                for t in data[1:]:
                    plan.union(data[0].name, t.name)
                if all(plan.source(t.name) in plan.unsigned for t in data):
                    plan.unsigned.add(out)
            src = data[0].name
            for t in node.outputs:  # Split: every output keeps the input's codes
                plan.passthrough[t.name] = src
                if plan.source(src) in plan.unsigned and node.op != "Concat":
                    plan.unsigned.add(t.name)
            continue
        plan.float_nodes.append(node.name)
        plan.float_ops[node.op] += 1
    # islands: float outputs read by a quantized op are requantized at the boundary (done above by
    # need()); make the unsigned set consistent per group
    for t in list(plan.unsigned):
        g = plan.group(t)
        members = [x for x in plan.requant if plan.group(x) == g]
        if not all(x in plan.unsigned for x in members):
            plan.unsigned.discard(t)
    return plan


def _to_twin_output(t: gs.Tensor) -> bool:
    """t is read only by the Cast that gives a float16 or float64 model's output back its type
    (model_io.float32_twin): a graph output as far as rounding goes."""
    return bool(t.outputs) and all(n.op == "Cast" and n.name.startswith(TWIN_CAST + "out") for n in t.outputs)


def _integer_only(node: gs.Node, data: list) -> bool:
    """A node that reads and writes only integer or bool tensors (shape arithmetic)."""
    def integer(t) -> bool:
        return t.dtype is not None and np.dtype(t.dtype).kind in "iub"
    return bool(data) and all(integer(t) for t in data) and all(integer(t) for t in node.outputs)


def _passes_through(node: gs.Node) -> bool:
    if node.op == "Pad":  # reflect/edge copy values; a constant pad must add zeros
        return attr_str(node, "mode", "constant") != "constant" or is_zero_pad(node)
    if node.op == "Resize":
        return attr_str(node, "mode", "nearest") == "nearest"
    if node.op == "Gather":  # selects elements of its data (torch's q, k, v = qkv[0], qkv[1], qkv[2]);
        return isinstance(node.inputs[1], gs.Constant)  # indices computed at run time: an embedding lookup
    return True
