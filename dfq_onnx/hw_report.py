"""What a model's requantization costs in silicon, under dfq-onnx's scheme and under onnxruntime's.

Steps (`dfq-onnx inspect MODEL --hw --calib DATA`):
1. Convert MODEL to dfq-onnx's integer graph (format "int") on the calibration data, run it on the
   first few calibration samples under onnxruntime and take every module's int32 accumulator.
2. Stream a slice of each module's accumulators through both synthesized requantizers
   (hardware.py): the shift unit with the module's own per-channel shifts, the multiplier unit
   with the multipliers a float-scale scheme would use for the same accumulators (output scale
   max|y| / 127, or / 255 for unsigned outputs, per tensor; multiplier 2^-s / scale per channel).
   Both circuits must match the numpy reference on every value (else the report fails).
3. Quantize MODEL with onnxruntime's quantizer (baseline.py) on the same data and count its
   requantization points (QuantizeLinear nodes that round; see report.py), their elements per
   inference and their multipliers (one per output channel after a per-channel weight).
4. Totals per inference: requantizer units (one per requantization point: a layer-pipelined
   accelerator), their transistors, parameter bits (shift: 5 bits per channel; multiplier: 32 + 5
   bits per channel), requantizations (output elements at batch 1) and the toggle proxy
   (requantizations x toggles per requantization of the unit that does them).

Graph-input quantization exists in both schemes and is left out of both. A dfq pooling module
whose window is not a power of two divides, and so do integer LayerNorm and Softmax; each is
priced as a multiplier unit. A lookup table (an activation on 8-bit codes) is a 256 x 8-bit ROM
per table row (one per channel for PRelu-like tables): Yosys synthesizes the model's first table
as a case-statement ROM and every row is priced at its transistor count; the dfq totals include
them (`dfq.tables`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from . import hardware as hw
from .baseline import ort_quantize
from .calibration_data import DataSource, input_specs
from .config import QuantConfig
from .errors import DfqError
from .fixedpoint import binary_accumulator, channel_shape, module_accumulator, multiply_requant, qrange, quantize_multiplier, rounding_shift
from .report import inspect_model, requant_nodes

PAPER = {"area": 15.0, "energy": 9.0}  # Geng et al., 2019: shift vs multiplier requantizer
RUN_SAMPLES = 4                        # calibration samples whose accumulators are captured
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _run(model: onnx.ModelProto, feeds: dict, names: list[str], optimize: bool) -> dict[str, np.ndarray]:
    """Named intermediate tensors of one onnxruntime run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
    except Exception as e:
        raise DfqError(f"onnxruntime could not run the quantized model: {str(e).splitlines()[0]}") from None
    return dict(zip([o.name for o in m.graph.output], outs))


def _first_batch(model: onnx.ModelProto, calib, preprocess) -> tuple[dict, int]:
    data = DataSource(calib, input_specs(model), num_samples=RUN_SAMPLES, preprocess=preprocess)
    batch = next(iter(data.batches(RUN_SAMPLES)), None)
    if batch is None:
        raise DfqError("calibration data is empty")
    return batch, len(next(iter(batch.values())))


def dfq_requantizers(qm, vals: dict, symbols: dict, batch: int) -> list[dict]:
    """Each requantization of dfq-onnx's integer graph (the quantized IR's integer modules): unit
    ("shift" or "divide"), accumulators of the captured batch (the IR executed in numpy on the
    integer graph's own module inputs), per-element shift, output signedness, elements per
    inference, channels."""
    out = []
    for m in qm.modules:
        if not m.integer or m.output is None or m.kind == "table":
            continue  # a float island, a graph output (its int32 sum leaves unrounded), a table (a ROM)
        x = vals[symbols[m.input.name]]
        if m.kind in ("layernorm", "softmax"):  # a rounding division per element
            n = int(np.prod(np.shape(x))) // batch
            out.append({"name": m.name, "unit": "divide", "acc": None, "shift": None,
                        "unsigned": bool(m.output.unsigned), "elements": n, "channels": 1})
            continue
        if m.kind == "binary":
            acc = binary_accumulator(m, x, vals[symbols[m.other.name]])
            out.append({"name": m.name, "unit": "shift", "acc": acc, "shift": np.broadcast_to(np.int64(m.shift), acc.shape),
                        "unsigned": bool(m.output.unsigned), "elements": acc.size // batch, "channels": 1})
            continue
        res = getattr(m, "residual", None)
        acc = module_accumulator(m, x, vals[symbols[res.name]] if res else None)
        s = None if m.shift is None else np.asarray(m.shift).reshape(
            () if np.ndim(m.shift) == 0 else channel_shape(m, acc.ndim))
        out.append({"name": m.name, "unit": "divide" if s is None else "shift", "acc": acc,
                    "shift": None if s is None else np.broadcast_to(s, acc.shape),
                    "unsigned": bool(m.output.unsigned), "elements": acc.size // batch,
                    "channels": 1 if s is None else int(np.asarray(m.shift).size)})
    return out


def stream(requantizers: list[dict], values: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The input stream both units are simulated on: from each shift-requantized module, a
    contiguous run (NCHW order, as a layer streams out) of its accumulators, `values` in all,
    with the module's shifts and the multipliers a float-scale scheme would use instead."""
    rng = np.random.default_rng(seed)
    mods = [r for r in requantizers if r["unit"] == "shift"]
    if not mods:
        raise DfqError("the model has no shift-requantized module to measure")
    take = max(1, values // len(mods))
    parts: dict[str, list] = {k: [] for k in ("acc", "s", "unsigned", "m", "ms")}
    for r in mods:
        acc, s = r["acc"].ravel(), r["shift"].ravel()
        qmax = qrange(hw.OUT_BITS, r["unsigned"])[1]
        scale = np.max(np.abs(np.ldexp(acc.astype(np.float64), -s))) / qmax
        if scale == 0:
            continue
        real = np.clip(np.ldexp(1.0, -s) / scale, 2.0 ** -60, 1 - 2.0 ** -40)
        m, ms = quantize_multiplier(real)
        k = min(take, acc.size)
        i = int(rng.integers(0, acc.size - k + 1))
        sl = slice(i, i + k)
        parts["acc"].append(acc[sl])
        parts["s"].append(s[sl])
        parts["unsigned"].append(np.full(k, r["unsigned"]))
        parts["m"].append(m[sl])
        parts["ms"].append(np.minimum(ms[sl], (1 << hw.SHIFT_BITS) - 1))
    return {k: np.concatenate(v) for k, v in parts.items()}


def characterize(st: dict[str, np.ndarray], on_step: Callable[[str], None] | None = None) -> dict:
    """Synthesize both units, simulate them on the stream, check every output against the numpy
    reference. Raises DfqError on any mismatch."""
    acc, s, uns = st["acc"], st["s"], st["unsigned"]
    if np.any((acc < -(1 << (hw.ACC_BITS - 1))) | (acc >= 1 << (hw.ACC_BITS - 1))):
        raise DfqError("an accumulator does not fit in int32")
    if np.any(s >= 1 << hw.SHIFT_BITS) or np.any(s < 0):
        raise DfqError(f"a shift outside 0..{(1 << hw.SHIFT_BITS) - 1}: the shift unit does right shifts only")
    lo, hi = np.where(uns, 0, qrange(hw.OUT_BITS)[0]), np.where(uns, qrange(hw.OUT_BITS, True)[1], qrange(hw.OUT_BITS)[1])
    ref = {"shift": np.clip(rounding_shift(acc, s), lo, hi),
           "multiplier": np.clip(multiply_requant(acc, st["m"], st["ms"]), lo, hi)}
    units = {}
    for unit in hw.UNITS:
        if on_step:
            on_step(f"synthesizing the {unit} requantizer (yosys)")
        syn = hw.synthesize(unit)
        if on_step:
            on_step(f"simulating the {unit} netlist on {len(acc)} accumulators (iverilog)")
        if unit == "shift":
            y, toggles = hw.simulate(syn, acc, s, uns)
        else:
            y, toggles = hw.simulate(syn, acc, st["ms"], uns, st["m"])
        bad = int(np.sum(y != ref[unit]))
        if bad:
            raise DfqError(f"the {unit} netlist differs from the numpy reference on {bad} of {len(acc)} values")
        units[unit] = {"cells": syn.cells, "transistors": syn.transistors, "cell_types": syn.cell_types,
                       "values": int(len(acc)), "bit_exact": True,
                       "toggles_per_op": toggles / max(1, len(acc) - 1)}
    return units


def ort_requantizers(qmodel: onnx.ModelProto, feeds: dict, batch: int) -> list[dict]:
    """Requantization points of an onnxruntime-quantized model (graph inputs excluded), with
    elements per inference and multipliers (channels of a per-channel weight feeding them)."""
    g = qmodel.graph
    inputs = {i.name for i in g.input}
    nodes = [n for n in requant_nodes(qmodel) if n.input[0] not in inputs]
    vals = _run(qmodel, feeds, [n.output[0] for n in nodes], optimize=False)
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out = []
    for n in nodes:
        out.append({"name": n.name or n.output[0], "unit": "multiplier", "elements": vals[n.output[0]].size // batch,
                    "channels": _weight_channels(n.input[0], producer, inits)})
    return out


def _weight_channels(t: str, producer, inits) -> int:
    """Output channels of the per-channel weight of the linear op whose result reaches tensor t
    through single-input ops (Relu, Clip, ...), else 1 (a per-tensor multiplier)."""
    for _ in range(8):
        n = producer.get(t)
        if n is None:
            return 1
        if n.op_type in LINEAR_OPS:
            w = producer.get(n.input[1]) if len(n.input) > 1 else None
            if w is not None and w.op_type == "DequantizeLinear" and w.input[1] in inits:
                return int(inits[w.input[1]].size)
            return 1
        data = [i for i in n.input if i and i not in inits and (producer.get(i) is None or producer[i].op_type != "Constant")]
        if len(data) != 1:
            return 1
        t = data[0]
    return 1


def totals(requantizers: list[dict], units: dict) -> dict:
    """Units, transistors, parameter bits, requantizations and toggle proxy per inference."""
    cost = {"shift": units["shift"], "divide": units["multiplier"], "multiplier": units["multiplier"]}
    param_bits = {"shift": hw.SHIFT_BITS, "divide": hw.MULTIPLIER_BITS + hw.SHIFT_BITS,
                  "multiplier": hw.MULTIPLIER_BITS + hw.SHIFT_BITS}
    by_unit = {u: sum(1 for r in requantizers if r["unit"] == u) for u in ("shift", "divide", "multiplier")}
    return {
        "requantizers": len(requantizers),
        "by_unit": {k: v for k, v in by_unit.items() if v},
        "transistors": sum(cost[r["unit"]]["transistors"] for r in requantizers),
        "parameter_bits": sum(param_bits[r["unit"]] * r["channels"] for r in requantizers),
        "requantizations": sum(r["elements"] for r in requantizers),
        "toggles": sum(r["elements"] * cost[r["unit"]]["toggles_per_op"] for r in requantizers),
    }


def zero_skipping(qm, points: list[dict]) -> dict:
    """Multiplications per inference of the integer linear modules, and how many of them have a
    zero weight (what an accelerator that skips zero weights saves): per output channel, its output
    elements per inference times its zero codes."""
    elements = {r["name"]: r["elements"] for r in points}
    macs = zero = 0
    for m in qm.modules:
        if m.kind != "linear" or not m.integer or m.name not in elements:
            continue
        q = np.moveaxis(np.asarray(m.weight), m.axis, 0).reshape(m.weight.shape[m.axis], -1)
        per_channel = elements[m.name] // q.shape[0]
        macs += per_channel * q.size
        zero += per_channel * int(np.count_nonzero(q == 0))
    return {"macs": macs, "zero_weight_macs": zero, "fraction": zero / macs if macs else 0.0}


def hardware_report(model, calib, *, num_samples: int = 128, preprocess: str | None = None, values: int = 4096,
                    sparsity: str | None = None, on_step: Callable[[str], None] | None = None) -> dict:
    """The report described in the module docstring, as a JSON-able dict."""
    from .pipeline import run

    if calib is None:
        raise DfqError("--hw needs --calib DATA: the circuits are simulated on the model's own accumulators")
    if inspect_model(model)["per_layer_requant_points"] is None:
        raise DfqError(f"{model}: already quantized; the hardware report compares two quantizations of the "
                       "float model: pass that")
    hw.require_tools()
    if values < 2:
        raise DfqError("--values must be at least 2")
    step = on_step or (lambda _: None)
    step("converting to dfq-onnx's integer graph")
    result = run(model, calib, QuantConfig(format="int", num_samples=num_samples, sparsity=sparsity), preprocess=preprocess)
    feeds, batch = _first_batch(result.model, calib, preprocess)  # same inputs as the float model
    step(f"capturing accumulators on {batch} calibration samples")
    qm, sym = result.quantized, result.symbols
    names = [sym[t.name] for m in qm.modules if m.integer
             for t in (m.input, getattr(m, "residual", None), getattr(m, "other", None)) if t]
    vals = _run(result.model, feeds, names, optimize=True)
    dfq = dfq_requantizers(qm, vals, sym, batch)
    units = characterize(stream(dfq, values), step)
    step("quantizing with onnxruntime's quantizer")
    ort_model = ort_quantize(model, calib, num_samples=num_samples, preprocess=preprocess)
    base = ort_requantizers(ort_model, feeds, batch)
    t_dfq, t_ort = totals(dfq, units), totals(base, units)
    tables = [m for m in qm.modules if m.integer and m.kind == "table"]
    rows = sum(int(m.table.shape[0]) for m in tables)
    rom = hw.synthesize_rom(tables[0].table[0]) if tables else None  # priced on the first table's contents
    t_dfq["tables"] = {"modules": len(tables), "roms": rows, "bits": rows * 256 * hw.OUT_BITS,
                       "rom_transistors": None if rom is None else rom.transistors,
                       "transistors": 0 if rom is None else rows * rom.transistors}
    t_dfq["transistors"] += t_dfq["tables"]["transistors"]

    def ratio(k):
        return t_ort[k] / t_dfq[k] if t_dfq[k] else None

    return {
        "model": str(model) if not isinstance(model, onnx.ModelProto) else "model",
        "units": units,
        "unit_ratios": {"area_transistors": units["multiplier"]["transistors"] / units["shift"]["transistors"],
                        "area_cells": units["multiplier"]["cells"] / units["shift"]["cells"],
                        "energy_proxy": units["multiplier"]["toggles_per_op"] / units["shift"]["toggles_per_op"]},
        "paper_ratios": PAPER,
        "stream": {"values": units["shift"]["values"], "modules": sum(1 for r in dfq if r["unit"] == "shift"),
                   "samples": batch},
        "dfq": t_dfq,
        "ort": t_ort,
        "ratios": {k: ratio(k) for k in ("requantizers", "transistors", "parameter_bits", "requantizations", "toggles")},
        "zero_skipping": zero_skipping(qm, dfq),
        "dfq_points": [{k: r[k] for k in ("name", "unit", "elements", "channels")} for r in dfq],
        "ort_points": base,
    }
