"""Empirical bias correction: remove the mean error each linear module adds by quantization.

Rounding to nearest has zero mean, but clipping an activation's tail and rounding a weight do
not: a module fed by clipped inputs sees a systematically smaller sum, and every later layer
inherits the shift. Measured on the simulated quantized graph, per module and output channel:

    e = E[ W x + b ]  -  E[ W_q Q(x) + b ]

where x is the module's input as the quantized graph computes it just before its own rounding
(so errors made upstream are not counted twice: each module removes only the error it adds),
W_q the quantized weight and Q(x) the rounded, clipped input. b + e becomes the new bias. The
float term is computed as W E_batch[x] + b (the layer is linear), one sample's work per batch.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_utils import add_node, clip_limits, new_name
from ..model_io import analysis_session, fixed_batch, in_order, piece_rows, pieces, single_sample
from .form_modules import Plan

PROBE_BATCH = 2  # rows per run, two runs side by side (EfficientNet-Lite0: 8 rows at once raised peak RSS by 150 MB);
#                 a graph too large to run side by side takes twice as many (model_io.piece_rows; VGG-19's
#                 probe 6.6 -> 5.6 s at 60 MB more peak RSS; 8 rows: +440 MB)
SAMPLES = 16  # calibration samples used to measure the mean errors (MobileNetV2: 128 gives the same); cli.py help says 16


def correct_biases(graph: gs.Graph, plan: Plan, simulated: gs.Graph, batches: list[dict]) -> tuple[gs.Graph, dict]:
    """Return a copy of the float graph with corrected biases, and facts {"bias_corrected": n}.

    `simulated` is the QDQ graph emitted from `graph` and `plan` (emit_qdq); `batches` a few
    calibration batches. Guarantees: only the bias constants of Conv/Gemm modules change (by the
    per-channel mean error measured above); modules whose input is not a plain
    QuantizeLinear/DequantizeLinear pair (after a pass-through op, say) are left alone.
    """
    g = graph.copy()
    fnodes = {n.name: n for n in g.nodes}
    act_of = {m.output: fnodes[m.nodes[-1]] for m in plan.modules if m.activation in ("Relu", "Relu6", "Clip")}
    probe = simulated.copy()
    pnodes = {n.name: n for n in probe.nodes}
    diffs, names = [], []
    one_row = single_sample(graph)
    for m in plan.modules:
        node = fnodes.get(m.name)
        if m.kind != "linear" or node is None or node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 \
                or not isinstance(node.inputs[2], gs.Constant) or m.name not in pnodes:
            continue
        q_node = pnodes[m.name]
        x = _pre_rounding_input(q_node)
        if x is None:
            continue
        act = act_of.get(m.input) if m.input in plan.requant else None  # not after a pass-through (a Concat
        if act is not None and x.name != m.input:  # of other branches): its activation runs on the codes: apply it
            lo, hi = clip_limits(act)
            x = _new(probe, "Clip", [x, _c(probe, -3.4e38 if lo is None else lo), _c(probe, 3.4e38 if hi is None else hi)])
        # the float layer is linear, so its mean over the batch is the layer applied to the batch's
        # mean input: one sample's work instead of a batch's (the difference below broadcasts); a
        # graph whose batch is one sample has nothing to average (the same values, without a copy)
        if not one_row:
            x = _mean(probe, x, [0], keepdims=True)
        ref = _new(probe, node.op, [x, gs.Constant(new_name(probe, f"{m.name}_float_w"), np.asarray(node.inputs[1].values)),
                                    gs.Constant(new_name(probe, f"{m.name}_float_b"), np.asarray(node.inputs[2].values))],
                   dict(node.attrs))
        diff = _new(probe, "Sub", [ref, q_node.outputs[0]])
        rank = len(q_node.outputs[0].shape) if q_node.outputs[0].shape is not None else (4 if node.op == "Conv" else 2)
        axes = [0] + list(range(2, rank)) if node.op == "Conv" else list(range(rank - 1))
        diffs.append(_mean(probe, diff, axes, keepdims=False))  # per channel, in onnxruntime
        names.append(m.name)
    if not names:
        return g, {"bias_corrected": 0}
    probe.outputs = diffs
    probe.cleanup()
    fixed = fixed_batch(graph)  # a fixed batch: keep it whole
    sess = analysis_session(probe, "bias correction: onnxruntime cannot run the simulated model", simulated=True,
                            side_by_side=not fixed or one_row)  # PROBE_BATCH rows at a time
    sums: list[np.ndarray] | None = None
    count = 0
    small = pieces(batches, not fixed, piece_rows(sess, PROBE_BATCH))
    wanted = [d.name for d in diffs]
    for batch, values in in_order(sess, lambda b: (b, sess.run(wanted, b)), small):
        n = len(next(iter(batch.values())))
        means = [v.astype(np.float64) * n for v in values]
        sums = means if sums is None else [a + b for a, b in zip(sums, means)]
        count += n
    for name, total in zip(names, sums):
        b = fnodes[name].inputs[2]
        old = np.asarray(b.values)
        b.values = (old.astype(np.float64) + (total / count).reshape(old.shape)).astype(old.dtype)
    return g, {"bias_corrected": len(names)}


def _pre_rounding_input(node: gs.Node) -> gs.Tensor | None:
    """The float tensor that the module's input QuantizeLinear rounds (through a Clip of the codes)."""
    dq = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if dq is None or dq.op != "DequantizeLinear":
        return None
    src = dq.inputs[0].inputs[0] if dq.inputs[0].inputs else None
    if src is not None and src.op == "Clip":
        src = src.inputs[0].inputs[0] if src.inputs[0].inputs else None
    if src is None or src.op != "QuantizeLinear":
        return None
    return src.inputs[0]


def _mean(g: gs.Graph, t: gs.Tensor, axes: list[int], keepdims: bool) -> gs.Variable:
    """ReduceMean of t over `axes` (an input from opset 18, an attribute before)."""
    if g.opset >= 18:
        return _new(g, "ReduceMean", [t, gs.Constant(new_name(g, "axes"), np.asarray(axes, np.int64))],
                    {"keepdims": int(keepdims)})
    return _new(g, "ReduceMean", [t], {"axes": axes, "keepdims": int(keepdims)})


def _c(g: gs.Graph, v: float) -> gs.Constant:
    return gs.Constant(new_name(g, "bias_correction_bound"), np.array(v, dtype=np.float32))


def _new(g: gs.Graph, op: str, inputs: list, attrs: dict | None = None) -> gs.Variable:
    return add_node(g, op, inputs, attrs, f"bias_correction_{op}")
