"""Find unified modules and plan where tensors are quantized (an analysis: the graph is not changed).

A unified module is one linear op (Conv, ConvTranspose, Gemm, MatMul with a constant weight)
+ its bias + an optional residual Add + an optional activation (Relu, Clip, LeakyRelu), with ONE
requantization at its output. An averaging op (GlobalAveragePool, AveragePool) is a module of
its own: it needs one rounding. Pass-through ops keep their input's fraction. Everything else
runs in float between a DequantizeLinear and a QuantizeLinear: a float island.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_utils import (ACTIVATION_OPS, PASS_THROUGH_OPS, POOL_OPS, SHAPE_OPS, attr_str, const_value,
                           is_zero_pad, output_rank, per_channel_vector, sole_consumer, weight_of)


@dataclass(frozen=True)
class Module:
    name: str                    # name of the linear (or pooling) node
    kind: str                    # "linear" or "pool"
    op: str                      # Conv, Gemm, ..., GlobalAveragePool
    input: str                   # activation input tensor
    output: str                  # the module's output tensor: its one requantization point
    nodes: tuple[str, ...]       # every node of the module, in order
    bias_add: str | None = None  # an Add node carrying the bias (MatMul only)
    residual: str | None = None  # the residual Add node
    residual_input: str | None = None
    activation: str | None = None  # Relu, Relu6, Clip, LeakyRelu
    unsigned: bool = False       # output provably non-negative

    def summary(self) -> dict:
        return {"name": self.name, "op": self.op, "residual": self.residual is not None,
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


def find_modules(graph: gs.Graph) -> list[Module]:
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
        if nxt is not None and nxt.op in ACTIVATION_OPS:
            kind = activation_kind(nxt)
            if kind is not None:
                act = kind
                unsigned = _non_negative_activation(nxt)
                nodes.append(nxt.name)
                out = nxt.outputs[0]
        modules.append(Module(node.name, "linear", node.op, node.inputs[0].name, out.name, tuple(nodes),
                              bias_add, residual, residual_input, act, unsigned))
    return modules


def plan_quantization(graph: gs.Graph, modules: list[Module], residual_requant: bool = False) -> Plan:
    """Decide which tensors are requantized, which keep a fraction, which stay float.

    residual_requant: also requantize the linear result that enters a module's residual Add (kind
    "residual"), the layout onnxruntime's int8 kernels need (QLinearConv, then QLinearAdd)."""
    plan = Plan(modules)
    tensors = graph.tensors()
    by_first = {m.nodes[0]: m for m in modules}
    nodes = {n.name: n for n in graph.nodes}
    inside = {name for m in modules for name in m.nodes[1:]}
    graph_inputs = {t.name for t in graph.inputs}
    graph_outputs = {t.name for t in graph.outputs}

    def need(t: str) -> None:
        """t is read by a quantized op: make sure it is quantized."""
        if plan.quantized(t) or isinstance(tensors[t], gs.Constant):
            return
        plan.requant.append(t)
        plan.requant_kind[t] = "input" if t in graph_inputs else "island"

    for node in graph.nodes:
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
            if m.kind == "linear" and m.output in graph_outputs and not tensors[m.output].outputs:
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
            plan.passthrough[out] = src
            if plan.source(src) in plan.unsigned and node.op != "Concat":
                plan.unsigned.add(out)
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
    return True
