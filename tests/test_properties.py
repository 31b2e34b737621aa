"""Properties of every conversion, over random small graphs (tests/graphgen.py).

For each generated float model, converted to the integer graph and to the unified-layout QDQ
graph (the same modules, so the same quantized IR):
1. the integer graph under onnxruntime equals the IR executed in numpy (fixedpoint.py), module by
   module and bit for bit, and onnx.reference (a second runtime) gives onnxruntime's outputs;
2. given the same integer inputs, the QDQ graph's float module + QuantizeLinear gives the
   integer module's codes exactly wherever float32 computes that module exactly (the IR's proven
   worst-case sum below 2^24), else within 1 LSB;
3. both graphs' SQNR against the float model is above a bound derived from the bit widths;
4. nothing is dropped: every node of the canonical float graph is in a unified module, passes
   the codes through, or is reported as a float island.

DFQ_GRAPHS sets the number of graphs (300 by default, CI; 5000 for a long local run).
"""
import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, note, settings

from dfq_onnx import DfqError, QuantConfig, fuse
from dfq_onnx.fixedpoint import module_forward
from dfq_onnx.pipeline import run

from graphgen import graphs
from helpers import run_ort
from test_integer import with_outputs

GRAPHS = int(os.environ.get("DFQ_GRAPHS", 300))
FLOAT32_EXACT = 1 << 24  # integers up to 2^24 are exact in float32


def sqnr(ref: np.ndarray, y: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - y) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def crest(t: np.ndarray, top: float | None = None) -> float:
    """max|t| / rms(t); with `top`, the largest value of the tensor's fraction group instead."""
    t = t.astype(np.float64)
    rms = np.sqrt(np.mean(t ** 2))
    return float((np.max(np.abs(t)) if top is None else top) / rms) if rms > 0 else 1.0


def sqnr_bound(crest_max: float, bits: int, roundings: int) -> float:
    """A floor for the output SQNR of a b-bit power-of-two quantization with `roundings` rounding
    stages (requantizations and weight quantizations), each at most as noisy as quantizing the
    worst-shaped tensor: uniform noise of step 2 max|t| / 2^b has SQNR 6.02 b + 4.77 -
    20 log10(crest) with crest = max|t| / rms(t) (the largest over the model's quantized tensors);
    a power-of-two scale may waste one bit (6.02 dB); noise from `roundings` stages adds in power.
    Another 6.02 dB cover the stages' noise gain through the layers (random He-scaled weights keep
    the signal power)."""
    return 6.02 * bits + 4.77 - 20 * np.log10(crest_max) - 6.02 - 10 * np.log10(roundings) - 6.02


def values(model: onnx.ModelProto, feeds: dict, names) -> dict:
    full = with_outputs(model, sorted(set(names)))
    return dict(zip([o.name for o in full.graph.output], run_ort(full, feeds, optimize=False)))


@settings(max_examples=GRAPHS, deadline=None, suppress_health_check=list(HealthCheck))
@given(graphs())
def test_integer_graph_qdq_graph_ir_and_float_agree(case):
    feeds = case.feeds_test
    try:
        ri = run(case.model, case.feeds_calib, QuantConfig(format="int"))
    except DfqError as e:  # a graph of pools and reshapes only
        assert "nothing to quantize" in str(e)
        return
    rq = run(case.model, case.feeds_calib, QuantConfig(layout="unified"))
    qm = ri.quantized
    note(f"modules: {[(m.op, m.name, m.integer) for m in qm.modules]}; facts {ri.facts}")

    # 1. integer graph == IR in numpy, module by module; onnx.reference == onnxruntime
    mods = [m for m in qm.modules if m.integer]
    res = lambda m: getattr(m, "residual", None)  # noqa: E731
    vi = values(ri.model, feeds, [ri.symbols[t.name] for m in mods for t in (m.input, res(m)) if t] +
                [ri.symbols[m.output_name] for m in mods])
    for m in mods:
        r = vi[ri.symbols[res(m).name]] if res(m) else None
        got = vi[ri.symbols[m.output_name]].astype(np.int64)
        np.testing.assert_array_equal(module_forward(m, vi[ri.symbols[m.input.name]], r), got, err_msg=m.name)
    outs = run_ort(ri.model, feeds)
    if case.reference_ok and not ri.float_ops and not ri.facts["float_modules"]:  # float islands may round differently
        from onnx.reference import ReferenceEvaluator
        for a, b in zip(outs, ReferenceEvaluator(ri.model).run(None, feeds)):
            np.testing.assert_array_equal(a, b)

    # 2. QDQ module (float32 + QuantizeLinear) == integer module, given the QDQ graph's own codes
    qmods = [m for m in rq.quantized.modules if m.integer and m.output is not None]
    vq = values(rq.model, feeds, [rq.symbols[t.name] for m in qmods for t in (m.input, res(m), m.output) if t])
    for m in qmods:
        r = vq[rq.symbols[res(m).name]] if res(m) else None
        diff = np.abs(module_forward(m, vq[rq.symbols[m.input.name]], r) - vq[rq.symbols[m.output.name]].astype(np.int64))
        assert diff.max(initial=0) <= (0 if m.acc_bound < FLOAT32_EXACT else 1), (m.name, m.acc_bound, diff.max())

    # 3. SQNR against float above the bit-width bound, for both renderings
    ref = run_ort(case.model, feeds)
    roundings = len(rq.quantized.tensors) + sum(1 for m in qm.modules if hasattr(m, "weight"))
    inner = values(fuse(case.model), feeds, list(rq.quantized.tensors))
    plan = qm.plan
    top = {}
    for t, v in inner.items():
        top[plan.group(t)] = max(top.get(plan.group(t), 0.0), float(np.max(np.abs(v))))
    worst = max([crest(v, top[plan.group(t)]) for t, v in inner.items()] + [crest(a) for a in ref])
    for fmt, y in (("qdq", run_ort(rq.model, feeds)), ("int", outs)):
        for k, (a, b) in enumerate(zip(ref, y)):
            if np.sqrt(np.mean(a.astype(np.float64) ** 2)) == 0:
                continue  # an all-zero output (a Relu of negatives): nothing to measure
            bound = sqnr_bound(worst, 8, roundings)
            assert sqnr(a, b) >= bound, (fmt, k, sqnr(a, b), bound)

    # 4. every node accounted for: module, pass-through or float island
    in_modules = {n for m in plan.modules for n in m.nodes}
    passing = set(plan.passthrough)
    seen = set()
    for node in _canonical_nodes(case.model):
        if node.name in in_modules or node.name in plan.float_nodes or any(o.name in passing for o in node.outputs):
            seen.add(node.name)
        else:
            raise AssertionError(f"{node.op} {node.name} is neither quantized nor a float island")
    assert sum(plan.float_ops.values()) == len(plan.float_nodes)


def _canonical_nodes(model):
    from dfq_onnx.model_io import load_model, to_graph
    from dfq_onnx.passes.canonicalize import canonicalize
    from dfq_onnx.passes.fold_batchnorm import fold_batchnorm

    return fold_batchnorm(canonicalize(to_graph(load_model(model)))).nodes
