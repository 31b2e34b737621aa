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

from dataclasses import replace

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..energy import energies, sqnr_db
from ..fixedpoint import pow2_scale
from ..quantized import quantized_weight
from ..graph_utils import add_node, attr_str, new_name
from ..model_io import analysis_session, batch_major, in_order, pieces, single_sample
from .choose_exponents import Exponents
from .emit_qdq import CODE_DTYPES
from .form_modules import Plan

MIN_GAIN_DB = 0.01
SAMPLES = 64  # calibration samples the search measures on (16 overfit: the shipped model lost 1 dB on test digits)
CONFIRM_SAMPLES = 32  # ... and the next ones, on which its moves must be confirmed
MAX_FRACTION_STEP = 1


def search_exponents(graph: gs.Graph, plan: Plan, exps: Exponents, batches: list[dict], *,
                     per_channel: bool, on_group: Callable[[int, int], None] | None = None,
                     corrected: gs.Graph | None = None, reference: list | None = None) -> tuple[Exponents, dict]:
    """Return exponents with some activation fractions moved by one, and facts
    {"exponents_moved": n, "search_sqnr_db": [before, after] on the search samples,
    "search_confirmed_db": [before, after] on the others}. The search runs on the first SAMPLES
    samples of `batches`; its moves are kept only if the output SQNR on the rest rises by more
    than LOCAL_CONFIRM_DB (greedy moves overfit the samples they were chosen on: EfficientNet-Lite0
    went from 15.8 to 9.9 dB on held-out crops). reference: per batch, the float model's first
    output on it where already known, else None (computed here). Guarantees: weight fractions
    and group structure are unchanged; the output SQNR on the search samples does not decrease."""
    search, confirm = _split(batches, SAMPLES)
    known = reference or [None] * len(batches)
    sqnr, groups, frac = _output_sqnr(graph, plan, exps, search, per_channel, known[:len(search)],
                                      corrected=corrected)
    start = best = sqnr(frac)
    base_frac = dict(frac)
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
    facts = {"exponents_moved": moved, "search_sqnr_db": [start, best]}
    if moved and confirm is not search:
        held = _output_sqnr(graph, plan, exps, confirm, per_channel, known[len(batches) - len(confirm):],
                            corrected=corrected)[0]
        before, after = held(base_frac), held(frac)
        facts["search_confirmed_db"] = [before, after]
        if after <= before + LOCAL_CONFIRM_DB:
            return exps, {**facts, "exponents_moved": 0}
    act = dict(exps.act)
    for t in plan.requant:
        act[t] = frac[plan.group(t)]
    return replace(exps, act=act), facts


def _output_sqnr(graph: gs.Graph, plan: Plan, exps: Exponents, batches: list[dict], per_channel: bool,
                 ref: list | None = None, corrected: gs.Graph | None = None):
    """(sqnr, groups, fractions): sqnr(fractions by group) is the SQNR of the model's first output
    on `batches` in the simulated quantized graph with those activation fractions (exps' weights,
    float biases), against the float graph; groups in graph order; exps' fraction of each group.
    The graph is built once, every activation scale a graph input: a call is one onnxruntime run.
    ref: the float graph's first output per batch where already known (None: computed here; the
    outputs the calibration run kept save a float run of the model). corrected: the graph
    whose biases the simulated model uses (bias-corrected: what the conversion will deploy)."""
    g = (corrected or graph).copy()
    tmap = g.tensors()
    groups = list(dict.fromkeys(plan.group(t) for t in plan.requant))
    scale_in = {grp: gs.Variable(f"dfq_search_scale_{i}", dtype=np.float32, shape=[]) for i, grp in enumerate(groups)}
    for node in g.nodes:  # weights as the quantized graph has them
        if node.name in exps.grid:  # already on its grid (second-order rounding)
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_search", exps.grid[node.name])
        elif node.name in exps.weight:
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_search",
                                         quantized_weight(node, exps.weight[node.name], exps.weight_bits[node.name],
                                                          per_channel))
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
    known = list(ref) if ref is not None else [None] * len(batches)
    split = batch_major(graph)
    if any(r is None for r in known):
        ref_graph = graph.copy()
        ref_graph.outputs = ref_graph.outputs[:1]
        ref_sess = analysis_session(ref_graph, "onnxruntime cannot run the model",
                                    side_by_side=split or single_sample(graph))
        known = [r if r is not None else np.concatenate(list(in_order(ref_sess, lambda p: ref_sess.run(None, p)[0],
                                                                    pieces([b], split))))
                 for r, b in zip(known, batches)]
    signal = sum(energies(r)[0] for r in known)
    g.inputs = list(g.inputs) + list(scale_in.values())
    g.outputs = g.outputs[:1]
    g.cleanup().toposort()
    sess = analysis_session(g, "onnxruntime cannot run the exponent-search graph", simulated="scale inputs",
                            side_by_side=split or single_sample(graph))
    act = dict(exps.act)
    frac = {grp: act[next(t for t in plan.requant if plan.group(t) == grp)] for grp in groups}
    cut = [(rp["ref"], p) for r, b in zip(known, batches)  # each piece with the float output's rows on it
           for rp, p in zip(pieces([{"ref": r}], split), pieces([b], split))]

    def sqnr(fr: dict) -> float:
        feeds = {scale_in[grp].name: np.asarray(pow2_scale(f), np.float32) for grp, f in fr.items()}
        def piece_noise(item):
            r, p = item
            return energies(r, sess.run(None, {**p, **feeds})[0])[1]
        noise = sum(in_order(sess, piece_noise, cut))  # float64 sums added in the pieces' order
        return sqnr_db(signal, noise)

    return sqnr, groups, frac


LOCAL_PROPOSE = 16  # calibration samples the fast search measures its readers' errors on
LOCAL_SAMPLES = 48  # ... and those plus the next 32, on which the model's output confirms the moves
LOCAL_MIN_GAIN = 0.02  # a group is proposed when its readers' error falls by more than this share
LOCAL_CONFIRM_DB = 0.1  # the proposed moves are kept when the model's output SQNR rises by more than this


def local_search(graph: gs.Graph, plan: Plan, exps: Exponents, batches: list[dict], *,
                 per_channel: bool, corrected: gs.Graph | None = None,
                 reference: list | None = None) -> tuple[Exponents, dict]:
    """The fast output-aware search: each activation group's fraction f is compared with f - 1
    and f + 1 by the error it causes at the outputs of the modules that read it (each reader's
    float nodes run again on the rounded tensor: weights, bias, residual, activation; a Conv
    reader's on every other output row and column, _thinned_axes), not at the tensor itself. So
    a channel that feeds large weights counts more, errors that add up coherently (clipping the
    bright pixels of a whole region) count as they do, and an error a Relu discards counts for
    nothing, where the histogram rule weighs every value of the tensor alike. One onnxruntime run
    of the float graph per batch measures every candidate.

    The groups whose readers' error falls by more than LOCAL_MIN_GAIN on the first LOCAL_PROPOSE
    samples are proposed together; the proposal is kept only if the model's output SQNR on the
    remaining samples (_split) rises by more than LOCAL_CONFIRM_DB. reference: as in
    search_exponents.

    Guarantees: weight fractions are unchanged; a group moves by at most one, only when every
    tensor in it is read by modules alone (directly or through a Pad); either every proposed group
    moves or none does. Facts: {"exponents_moved", "local_search_groups" (measured),
    "local_search_proposed", "search_sqnr_db": [before, after] on the confirming samples (after None
    where before is infinite: the output equals float's there, and the proposal is not run)}."""
    half = _split(batches, LOCAL_PROPOSE)
    cost, _ = reader_errors(graph, plan, exps, half[0])
    proposal = {}
    for grp, c in cost.items():
        best = min((-1, 1), key=lambda d: c[d])
        if c[best] < (1 - LOCAL_MIN_GAIN) * c[0]:
            proposal[grp] = best
    facts = {"exponents_moved": 0, "local_search_groups": len(cost), "local_search_proposed": len(proposal)}
    if not proposal:
        return exps, facts
    known = reference or [None] * len(batches)
    sqnr, _, frac = _output_sqnr(graph, plan, exps, half[1], per_channel, known[len(batches) - len(half[1]):],
                                 corrected=corrected)
    before = sqnr(frac)
    if before == float("inf"):  # the simulated output already equals float's there (a saturated softmax, say):
        facts["search_sqnr_db"] = [before, None]  # no proposal can raise it, so it is not run
        return exps, facts
    after = sqnr({grp: f + proposal.get(grp, 0) for grp, f in frac.items()})
    facts["search_sqnr_db"] = [before, after]  # after: with the proposal, kept or not
    if after <= before + LOCAL_CONFIRM_DB:  # the model's output does not confirm it: keep the histogram rule's choice
        return exps, facts
    act = {t: f + proposal.get(plan.group(t), 0) for t, f in exps.act.items()}
    facts["exponents_moved"] = len(proposal)
    return replace(exps, act=act), facts


def _split(batches: list[dict], first: int) -> tuple[list[dict], list[dict]]:
    """The batches holding the first `first` samples, and the rest: moves chosen on the first are
    confirmed on others (chosen and confirmed on the same samples, they overfit them: open-nsfw
    +7 dB there, -2 dB on held-out crops). Whole batches (a model with a fixed batch takes no
    other size); where nothing is left, the same batches serve both."""
    seen = 0
    for k, b in enumerate(batches):
        seen += len(next(iter(b.values())))
        if seen >= first:
            break
    k += 1
    return (batches[:k], batches[k:]) if k < len(batches) else (batches, batches)


def reader_errors(graph: gs.Graph, plan: Plan, exps: Exponents, batches: list[dict]) -> tuple[dict, np.ndarray]:
    """({group: {d: energy}}, ref): for each activation group read by modules alone, the squared
    error at its readers' outputs with the group at fraction f + d (d = -1, 0, 1), summed over
    `batches` (see local_search); ref: the float graph's first output on the batches."""
    g = graph.copy()
    tmap = g.tensors()
    readers = _module_readers(g, plan)
    groups: dict[str, list[str]] = {}
    for t in plan.requant:
        groups.setdefault(plan.group(t), []).append(t)
    candidates = [grp for grp, ts in groups.items() if all(t in readers for t in ts)]
    outs, where = [], {}
    nodes = {n.name: n for n in g.nodes}  # the float graph's nodes and tensors, before the copies are added
    for grp in candidates:
        f = exps.act[groups[grp][0]]
        for t in groups[grp]:
            dtype = CODE_DTYPES[(exps.bits_of(t), t in plan.unsigned)]
            for d in (-1, 0, 1):
                where[(t, d)] = len(outs)
                outs.append(_reader_error(g, tmap, nodes, tmap[t], f + d, dtype, readers[t]))
    first = g.outputs[0]
    g.outputs = [first] + outs
    g.cleanup()
    split = batch_major(graph)
    sess = analysis_session(g, "exponent search: onnxruntime cannot run the model",
                            side_by_side=split or single_sample(graph))
    totals, ref = np.zeros(len(outs)), []
    wanted = [first.name] + [o.name for o in outs]
    for values in in_order(sess, lambda b: sess.run(wanted, b), pieces(batches, split)):
        ref.append(values[0])
        totals += np.asarray([float(v) for v in values[1:]])
    cost = {grp: {d: float(sum(totals[where[(t, d)]] for t in groups[grp])) for d in (-1, 0, 1)} for grp in candidates}
    return cost, np.concatenate(ref)


THIN = 2  # a Conv reader's error is measured on every THIN-th output row and column (whatever its
#           size: a rule on known sizes would convert a dynamic-shape export unlike its fixed twin)
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid",
               "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus", "Identity"}


def _thinned_axes(rerun: list[gs.Node], linear: gs.Node | None) -> list[int]:
    """The spatial axes on which a reader module's error is measured at every THIN-th position
    (passes through a Conv with strides THIN times its own: the same outputs as every THIN-th
    row and column of the Conv's), or [] where that is not exact: the module's re-run is not that
    Conv followed by elementwise ops whose constants do not vary over space, or the Conv pads
    automatically. Known shapes play no part (a model with dynamic dims is measured as its
    fixed-shape twin)."""
    if linear is None or linear.op != "Conv" or not rerun or rerun[0] is not linear:
        return []
    if attr_str(linear, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return []
    w = linear.inputs[1]
    if not isinstance(w, gs.Constant) or len(w.shape) < 3:
        return []
    spatial = len(w.shape) - 2
    for n in rerun[1:]:
        if n.op not in ELEMENTWISE:
            return []
        for i in n.inputs:
            if isinstance(i, gs.Constant) and len(i.shape) > 2 and any(d > 1 for d in i.shape[-spatial:]):
                return []
    return list(range(2, spatial + 2))


def _every_other(g: gs.Graph, t: gs.Tensor, axes: list[int]) -> gs.Variable:
    """t at every THIN-th position along `axes` (from the first)."""
    def const(v):
        return gs.Constant(new_name(g, f"{t.name}_ls_thin"), np.asarray(v, np.int64))

    big = np.iinfo(np.int64).max
    return add_node(g, "Slice", [t, const([0] * len(axes)), const([big] * len(axes)), const(axes),
                                 const([THIN] * len(axes))], None, f"{t.name}_ls_thin", dtype=t.dtype or np.float32)


def _module_readers(g: gs.Graph, plan: Plan) -> dict[str, list[tuple[list[gs.Node], object]]]:
    """tensor -> its readers as (Pad nodes between, the module that reads it), for requantized
    tensors read by modules alone (a graph output is read by the user: left out)."""
    owner = {n: m for m in plan.modules for n in m.nodes}
    tmap = g.tensors()
    out = {}
    for name in plan.requant:
        t = tmap[name]
        if not t.outputs or t in g.outputs:
            continue
        found, ok = {}, True
        for n in t.outputs:
            pads, node = [], n
            if node.op == "Pad" and node.inputs[0] is t and len(node.outputs[0].outputs) == 1:
                pads, node = [node], node.outputs[0].outputs[0]
            m = owner.get(node.name)
            if m is None or (pads and node.name != m.name):
                ok = False
                break
            found[m.name] = (pads, m)
        if ok and found:
            out[name] = list(found.values())
    return out


def _reader_error(g: gs.Graph, tmap: dict, nodes: dict, x: gs.Tensor, f: int, dtype, readers) -> gs.Variable:
    """A new scalar: the squared error that rounding x at fraction f causes at the outputs of the
    modules that read it (each module's nodes run again on the rounded x; everything else they
    read is the float graph's). tmap, nodes: the float graph's tensors and nodes by name (the
    copies this adds are not in them)."""
    if x.dtype is None:
        x.dtype = np.float32
    scale = gs.Constant(new_name(g, f"{x.name}_ls_scale"), np.asarray(pow2_scale(f), np.float32))
    zp = gs.Constant(new_name(g, f"{x.name}_ls_zp"), np.zeros((), dtype))

    def rounded(t: gs.Tensor) -> gs.Variable:
        q = add_node(g, "QuantizeLinear", [t, scale, zp], None, f"{x.name}_ls_q", dtype=dtype)
        return add_node(g, "DequantizeLinear", [q, scale, zp], None, f"{x.name}_ls_dq")

    xq = rounded(x)
    total = None
    for pads, m in readers:
        swap = {x.name: xq}
        for p in pads:
            swap[p.outputs[0].name] = add_node(g, "Pad", [xq] + list(p.inputs[1:]), dict(p.attrs), f"{x.name}_ls_pad")
        inside = [nodes[name] for name in m.nodes]
        start = next((i + 1 for i, n in enumerate(inside) if x.name in {o.name for o in n.outputs}), 0)
        rerun = inside[start:]
        axes = _thinned_axes(rerun, nodes.get(m.name))
        thin: set[str] = set()  # tensors computed on the thinned positions only
        sliced: dict[str, gs.Variable] = {}  # full-size tensors the re-run reads, thinned once each

        def read(t):  # an input of a re-run node, on the positions the re-run computes
            t = swap.get(t.name, t)
            if not axes or isinstance(t, gs.Constant) or t.name in thin:
                return t
            if t.name not in sliced:  # x is thinned, then rounded (the same values): onnxruntime's QDQ
                sliced[t.name] = rounded(_every_other(g, x, axes)) if t is xq else _every_other(g, t, axes)
            return sliced[t.name]  # propagation mistypes a Slice after a DequantizeLinear

        for n in rerun:  # the module again from where it reads x, on the rounded x
            outs = [gs.Variable(new_name(g, f"{o.name}_ls"), dtype=o.dtype, shape=None if axes else o.shape)
                    for o in n.outputs]
            attrs = dict(n.attrs)
            if axes and n.name == m.name:  # the Conv itself: every other output row and column
                attrs["strides"] = [int(v) * THIN for v in attrs.get("strides", [1] * len(axes))]
                inputs = [swap.get(i.name, i) for i in n.inputs]
            else:
                inputs = [read(i) for i in n.inputs]
            g.nodes.append(gs.Node(n.op, new_name(g, f"{n.name}_ls"), attrs, inputs, outs))
            swap.update({o.name: c for o, c in zip(n.outputs, outs)})
            thin.update(c.name for c in outs)
        reference = _every_other(g, tmap[m.output], axes) if axes else tmap[m.output]
        diff = add_node(g, "Sub", [swap[m.output], reference], None, f"{x.name}_ls_e")
        energy = add_node(g, "ReduceSumSquare", [diff], {"keepdims": 0}, f"{x.name}_ls_energy")
        total = energy if total is None else add_node(g, "Add", [total, energy], None, f"{x.name}_ls_sum")
    return total
