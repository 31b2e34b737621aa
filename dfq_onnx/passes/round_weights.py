"""Second-order weight rounding and pruning (gptq.py) for every linear module, on the inputs the
quantized model feeds it.

Each module's input Hessian H = sum x x^T is accumulated in a streaming pass over calibration
samples of the simulated quantized graph (QDQ, the current weight codes and activation fractions):
im2col patches for a Conv, one H per group for a grouped or depthwise Conv, the rows of a Gemm's or
MatMul's input. Modules are taken in stages in graph order; each stage's inputs come from the graph
in which the stages before it already hold their rounded weights, so a module's rounding sees what
the modules before it did. Memory: the Hessians of a stage stay within HESSIAN_BUDGET elements
(float64); a single module whose Hessian alone exceeds MAX_MODULE_ELEMENTS keeps round-to-nearest
and is reported. The result is a weight on the grid (codes times 2^-f, float32) per module, held
by the exponents (Exponents.grid): the float graph itself is not changed, so bias correction and
the output-aware search still measure against the float model.
"""
from __future__ import annotations

from dataclasses import replace

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..gptq import Hessian, Sparsity, magnitude_mask, quantize_columns
from ..graph_utils import add_node, attr_str, new_name
from ..model_io import analysis_session, fixed_batch, in_order, pieces, single_sample
from ..fixedpoint import pair_sums_exceed
from ..quantized import channel_fractions, int16_pairs, weight_codes
from .choose_exponents import Exponents
from .form_modules import Plan

SAMPLES = 32                 # calibration samples the Hessians are measured on (MobileNetV2 W4A8: 16 gave 5.0 dB, 32 5.7)
PROBE_BATCH = 2              # samples per onnxruntime run, two side by side (their module inputs are held at once)
HESSIAN_BUDGET = 1 << 25     # float64 elements of the Hessians held at once (256 MB)
MAX_MODULE_ELEMENTS = 1 << 25  # a module whose Hessian is larger keeps round-to-nearest (VGG's K = 25,088 FC)


def round_weights(graph: gs.Graph, plan: Plan, exps: Exponents, simulate: Callable[[Exponents], gs.Graph],
                  batches: list[dict], *, per_channel: bool, gptq: bool, sparsity: Sparsity | None,
                  pair_limit: int | None = None, stages: int = 1, act_order: bool = False,
                  on_stage: Callable[[int, int], None] | None = None) -> tuple[Exponents, dict]:
    """Exponents whose `grid` holds, per rounded module, its weight on its power-of-two grid.

    gptq: second-order rounding (with sparsity: pruning in the same loop, SparseGPT); otherwise
    sparsity alone prunes by magnitude and rounds to nearest. simulate(exps) is the simulated QDQ
    graph of `graph` under exps. pair_limit: in a channel whose round-to-nearest codes keep every
    two same-sign codes within this sum (the x86 saturation guard), the rounded codes must too,
    else that channel keeps round-to-nearest.
    Guarantees: fractions (weight and activation) are unchanged; every code lies in the module's
    b-bit range and inside [min, max] of its round-to-nearest codes per channel, so the int32 range
    proof and the saturation guard see no larger codes; with sparsity, every module that can hold
    the pattern has it exactly (n:m per consecutive input channels of one kernel tap, or the
    fraction per row), and the others are listed in facts["dense"]."""
    nodes = {n.name: n for n in graph.nodes}
    todo, skipped, dense = [], {}, []
    for m in plan.modules:
        if m.kind != "linear":
            continue
        node = nodes[m.name]
        layout = _layout(node)
        if layout is None:
            skipped[m.name] = f"{node.op} is rounded to nearest"
            continue
        g, _, k = layout
        if g * k * k > MAX_MODULE_ELEMENTS:
            skipped[m.name] = f"its input Hessian would hold {g * k * k:,} values: rounded to nearest"
            continue
        if sparsity is not None and not sparsity.applies(_group_width(node)):
            dense.append(m.name)
        todo.append(m.name)
    grid = dict(exps.grid)
    facts = {"gptq_modules": 0, "gptq_skipped": skipped, "pruned_modules": 0, "dense": dense}
    if not gptq:  # magnitude pruning (with sparsity) and round to nearest
        for name in todo:
            if sparsity is not None and name not in dense:
                grid[name] = _rounded(nodes[name], exps, per_channel, None, sparsity, pair_limit, dense=False)
                facts["pruned_modules"] += 1
        return replace(exps, grid=grid), facts
    chunks = _stages(todo, nodes, stages)
    for i, chunk in enumerate(chunks):
        if on_stage is not None:
            on_stage(i, len(chunks))
        current = replace(exps, grid=grid)
        hessians = _hessians(simulate(current), [nodes[n] for n in chunk], batches)
        for name in chunk:
            grid[name] = _rounded(nodes[name], exps, per_channel, hessians.pop(name), sparsity, pair_limit,
                                  dense=name in dense, act_order=act_order)
            facts["gptq_modules"] += 1
            facts["pruned_modules"] += int(sparsity is not None and name not in dense)
    return replace(exps, grid=grid), facts


def _stages(names: list[str], nodes: dict, stages: int) -> list[list[str]]:
    """Modules in graph order cut into at least `stages` runs whose Hessians fit HESSIAN_BUDGET."""
    per = max(1, -(-len(names) // max(1, stages)))
    out, size = [[]], 0
    for name in names:
        g, _, k = _layout(nodes[name])
        if out[-1] and (len(out[-1]) >= per or size + g * k * k > HESSIAN_BUDGET):
            out.append([])
            size = 0
        out[-1].append(name)
        size += g * k * k
    return [c for c in out if c]


def _layout(node: gs.Node) -> tuple[int, int, int] | None:
    """(groups, output channels per group, inputs per group) of a linear node's weight as the
    matrices GPTQ works on, or None where it is not handled (ConvTranspose; Gemm with transA)."""
    w = np.shape(node.inputs[1].values)
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        return g, w[0] // g, int(np.prod(w[1:]))
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        return (1, w[0], w[1]) if int(node.attrs.get("transB", 0)) else (1, w[1], w[0])
    if node.op == "MatMul" and len(w) == 2:
        return 1, w[1], w[0]
    return None


def _group_width(node: gs.Node) -> int:
    """Inputs that form one consecutive run in the matrices' column order: a Conv's input channels
    per group (columns are ordered tap by tap, channels inside a tap), a matrix's whole input."""
    return int(np.shape(node.inputs[1].values)[1]) if node.op == "Conv" else _layout(node)[2]


def _to_matrices(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The weight as [G, C/G, K]; a Conv's columns ordered (kernel taps..., input channel)."""
    g, c, k = _layout(node)
    if node.op == "Conv":
        return np.moveaxis(w.reshape(g, c, w.shape[1], *w.shape[2:]), 2, -1).reshape(g, c, k)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return w.reshape(1, c, k)
    return w.T.reshape(1, c, k)


def _from_matrices(node: gs.Node, m: np.ndarray, shape: tuple) -> np.ndarray:
    if node.op == "Conv":
        g, c, _ = m.shape
        return np.moveaxis(m.reshape(g, c, *shape[2:], shape[1]), -1, 2).reshape(shape)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return m.reshape(shape)
    return m[0].T.reshape(shape)


def _rounded(node: gs.Node, exps: Exponents, per_channel: bool, hessian: Hessian | None, sparsity: Sparsity | None,
             pair_limit: int | None, *, dense: bool, act_order: bool = False) -> np.ndarray:
    """The node's weight on its grid (float32): GPTQ (hessian given) or magnitude pruning + RTN."""
    w = np.asarray(node.inputs[1].values)
    bits = exps.weight_bits[node.name]
    frac, axis = channel_fractions(node, exps.weight[node.name], per_channel)
    rtn = weight_codes(w, frac, bits, axis)
    g, c, k = _layout(node)
    fr = frac.reshape(g, c)
    rtn_m = _to_matrices(node, rtn.astype(np.int64))
    bounds = (rtn_m.min(axis=2), rtn_m.max(axis=2))
    prune = None if dense else sparsity
    if hessian is None:
        q = rtn_m.copy()
        if prune is not None:
            q[magnitude_mask(_to_matrices(node, w), prune)] = 0
    else:
        q = quantize_columns(_to_matrices(node, w), hessian.h, fr, bits, act_order=act_order, sparsity=prune,
                             bounds=bounds)
        if pair_limit is not None and int16_pairs(node):  # a channel safe under round-to-nearest stays safe
            unsafe = pair_sums_exceed(q, pair_limit) & ~pair_sums_exceed(rtn_m, pair_limit)  # columns in K order
            if unsafe.any():
                q[unsafe] = rtn_m[unsafe] if prune is None else np.where(magnitude_mask(rtn_m[unsafe], prune), 0, rtn_m[unsafe])
    codes = _from_matrices(node, q, w.shape)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.ldexp(codes.astype(np.float64), -frac.reshape(shape)).astype(np.float32)


def _hessians(simulated: gs.Graph, linear: list[gs.Node], batches: list[dict]) -> dict[str, Hessian]:
    """The input Hessian of each node of `linear` in `simulated` (matched by name), streamed over
    `batches` in runs of PROBE_BATCH samples. onnxruntime computes each one inside the graph
    (_hessian_nodes), so only [G, K, K] sums per module reach numpy, accumulated in float64."""
    probe = simulated.copy()
    pnodes = {n.name: n for n in probe.nodes}
    names = [n.name for n in linear if n.name in pnodes]
    by_name = {n.name: n for n in linear}
    outs = []
    for name in names:
        outs += _hessian_nodes(probe, by_name[name], pnodes[name].inputs[0])
    probe.outputs = outs
    probe.cleanup()
    fixed = fixed_batch(simulated)
    sess = analysis_session(probe, "weight rounding: onnxruntime cannot run the simulated model", simulated=True,
                            side_by_side=not fixed or single_sample(simulated))  # PROBE_BATCH rows at a time
    small = pieces(batches, not fixed, PROBE_BATCH)
    out: dict[str, Hessian] = {}
    wanted = [t.name for t in outs]
    for values in in_order(sess, lambda b: sess.run(wanted, b), small):
        for i, name in enumerate(names):
            hs = Hessian(values[2 * i].astype(np.float64), int(values[2 * i + 1]))
            out[name] = out[name].merge(hs) if name in out else hs
    return out


def _hessian_nodes(g: gs.Graph, node: gs.Node, x: gs.Tensor) -> list[gs.Variable]:
    """Nodes appended to g that compute, from x (what g feeds the linear node `node`), its Hessian [G, K, K] (the
    sum of x x^T over the batch's input vectors, in the column order of _to_matrices) and the
    number of those vectors. A Conv's input vectors are its im2col patches: a grouped Conv with a
    one-hot kernel writes them as channels (output channel t Cg + c of a group is its input
    channel c at kernel tap t), strides, pads and dilations included; a pointwise Conv's are its
    pixels. Gemm/MatMul: the rows of x."""
    ngroups, _, k = _layout(node)
    base = f"{node.name}/hessian"

    def op(kind: str, inputs: list, attrs: dict | None = None, dtype=np.float32) -> gs.Variable:
        return add_node(g, kind, inputs, attrs, f"{base}/{kind}", dtype=dtype)

    def const(v) -> gs.Constant:
        return gs.Constant(new_name(g, f"{base}/c"), np.asarray(v, np.int64))

    if node.op == "Conv":
        w_shape = np.shape(node.inputs[1].values)
        cg, taps = int(w_shape[1]), [int(v) for v in w_shape[2:]]
        a = node.attrs
        pointwise = all(v == 1 for v in taps + list(a.get("strides", []))) and not any(a.get("pads", [])) \
            and attr_str(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
        if not pointwise:
            t = int(np.prod(taps))
            onehot = np.zeros((ngroups, t, cg, cg, t), np.float32)  # [group, tap, channel | in channel, tap]
            onehot[:, np.arange(t)[:, None], np.arange(cg)[None, :], np.arange(cg)[None, :], np.arange(t)[:, None]] = 1
            attrs = {key: a[key] for key in ("strides", "pads", "dilations", "auto_pad") if key in a}
            x = op("Conv", [x, gs.Constant(new_name(g, f"{base}/onehot"), onehot.reshape(ngroups * k, cg, *taps))],
                   {**attrs, "group": ngroups, "kernel_shape": taps})
        cols = op("Reshape", [x, const([0, ngroups, k, -1])])               # [N, G, K, positions]
        h = op("ReduceSum", [op("MatMul", [cols, op("Transpose", [cols], {"perm": [0, 1, 3, 2]})]), const([0])],
               {"keepdims": 0})
        shape = op("Shape", [cols], dtype=np.int64)
        count = op("Mul", [op("Gather", [shape, const(0)], dtype=np.int64), op("Gather", [shape, const(3)], dtype=np.int64)],
                   dtype=np.int64)
        return [h, count]
    rows = op("Reshape", [x, const([-1, k])])                               # [n, K]
    h = op("Unsqueeze", [op("MatMul", [op("Transpose", [rows], {"perm": [1, 0]}), rows]), const([0])])
    count = op("Gather", [op("Shape", [rows], dtype=np.int64), const(0)], dtype=np.int64)
    return [h, count]
