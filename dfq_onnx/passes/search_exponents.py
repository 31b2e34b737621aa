"""Output-aware exponent search (`--search-exponents`): move activation fractions where the
model output says so.

The histogram rule (choose_exponents) picks each tensor's fraction for the least squared error
of that tensor alone. Here, one group at a time in graph order, the neighbouring fractions f - 1
(wider range) and f + 1 (finer step, more clipping) are tried in the simulated quantized graph
and kept when the SQNR of the model's first output on the kept calibration samples improves by
more than MIN_GAIN_DB. The simulated graph is built once with every activation scale a graph
input, so a trial is one onnxruntime run (no new graph, no new session). Weights are quantized as
choose_exponents decided; biases stay float there (their int32 rounding is negligible).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..fixedpoint import pow2_scale
from ..quantized import quantized_weight
from ..model_io import analysis_session
from .choose_exponents import Exponents
from .emit_qdq import CODE_DTYPES
from .form_modules import Plan

MIN_GAIN_DB = 0.01
SAMPLES = 64  # calibration samples the search measures on (16 overfit: the shipped model lost 1 dB on test digits)
MAX_FRACTION_STEP = 1


def search_exponents(graph: gs.Graph, plan: Plan, exps: Exponents, batches: list[dict], *,
                     per_channel: bool, on_group: Callable[[int, int], None] | None = None) -> tuple[Exponents, dict]:
    """Return exponents with some activation fractions moved by one, and facts
    {"exponents_moved": n, "search_sqnr_db": [before, after]}. Guarantees: weight fractions and
    group structure are unchanged; the output SQNR on `batches` does not decrease."""
    g = graph.copy()
    tmap = g.tensors()
    groups = list(dict.fromkeys(plan.group(t) for t in plan.requant))
    scale_in = {grp: gs.Variable(f"dfq_search_scale_{i}", dtype=np.float32, shape=[]) for i, grp in enumerate(groups)}
    for node in g.nodes:  # weights as the quantized graph has them
        if node.name in exps.weight:
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_search",
                                         quantized_weight(node, exps.weight[node.name], exps.weight_bits[node.name], per_channel))
    for t in plan.requant:
        src = tmap[t]
        dtype = CODE_DTYPES[(exps.bits_of(t), t in plan.unsigned)]
        zp = gs.Constant(f"{t}_search_zp", np.zeros((), dtype))
        q = gs.Variable(f"{t}_search_q", dtype=dtype)
        dq = gs.Variable(f"{t}_search_dq", dtype=np.float32, shape=src.shape)
        readers = list(src.outputs)
        s = scale_in[plan.group(t)]
        g.nodes.append(gs.Node("QuantizeLinear", f"{t}_search_Q", inputs=[src, s, zp], outputs=[q]))
        g.nodes.append(gs.Node("DequantizeLinear", f"{t}_search_DQ", inputs=[q, s, zp], outputs=[dq]))
        for n in readers:
            n.inputs = [dq if i is src else i for i in n.inputs]
        if src in g.outputs:
            g.outputs = [dq if o is src else o for o in g.outputs]
    ref_graph = graph.copy()
    ref_graph.outputs = ref_graph.outputs[:1]
    ref = np.concatenate([analysis_session(ref_graph, "onnxruntime cannot run the model").run(None, b)[0]
                          for b in batches]).astype(np.float64)
    g.inputs = list(g.inputs) + list(scale_in.values())
    g.outputs = g.outputs[:1]
    g.cleanup().toposort()
    sess = analysis_session(g, "onnxruntime cannot run the exponent-search graph", optimize=False)
    act = dict(exps.act)
    frac = {grp: act[next(t for t in plan.requant if plan.group(t) == grp)] for grp in groups}

    def sqnr(fr: dict) -> float:
        feeds = {scale_in[grp].name: np.asarray(pow2_scale(f), np.float32) for grp, f in fr.items()}
        y = np.concatenate([sess.run(None, {**b, **feeds})[0] for b in batches]).astype(np.float64)
        noise = float(np.sum((ref - y) ** 2))
        return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))

    start = best = sqnr(frac)
    moved = 0
    for i, grp in enumerate(groups):
        if on_group is not None:
            on_group(i, len(groups))
        base = frac[grp]
        choice = base
        for d in range(1, MAX_FRACTION_STEP + 1):
            for f in (base - d, base + d):
                trial = sqnr({**frac, grp: f})
                if trial > best + MIN_GAIN_DB:
                    best, choice = trial, f
        if choice != base:
            frac[grp] = choice
            moved += 1
    for t in plan.requant:
        act[t] = frac[plan.group(t)]
    return Exponents(act, exps.weight, plan, exps.weight_bits, exps.act_bits, exps.grid), {"exponents_moved": moved,
                                                                 "search_sqnr_db": [start, best]}
