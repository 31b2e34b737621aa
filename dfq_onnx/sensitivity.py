"""Per-module sensitivity: quantize one module at a time, everything else float, and measure what
it costs at the model output (`dfq-onnx inspect MODEL --sensitivity --calib DATA`).

For each unified module, a QDQ model with only that module quantized (its input rounded at a
power-of-two scale, its weights, its output; plain power-of-two quantization: no range alignment,
no bias correction) runs under onnxruntime on the calibration samples; the report gives the
output SQNR against the float model and top-1 agreement, sorted from the most sensitive module.
One calibration run serves every module.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnxruntime as ort

from .calibration_data import DataSource, input_specs
from .config import QuantConfig
from .energy import energies, sqnr_db
from .errors import DfqError
from .model_io import load_model, to_graph, to_model
from .passes.calibrate import calibrate
from .passes.canonicalize import canonicalize
from .passes.choose_exponents import choose_exponents
from .passes.emit_qdq import emit_qdq
from .quantized import build as build_quantized
from .passes.fold_batchnorm import fold_batchnorm
from .passes.form_modules import find_modules, plan_quantization

EVAL_SAMPLES = 64  # calibration samples each single-module model runs on ...
EVAL_VALUES = EVAL_SAMPLES * 3 * 224 * 224  # ... or fewer, as many as hold this many input values (64 ImageNet crops)
MIN_EVAL_SAMPLES = 8  # ... but at least these (PicoDet layout, 800 x 608 inputs: 8 samples, a module 8x faster)


def model_outputs(model_bytes: bytes, batches: list[dict], every: bool = False) -> np.ndarray | list[np.ndarray]:
    """The first output of a model on the batches, concatenated (every: the list of all its
    outputs so)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DfqError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None
    runs = [sess.run(None, b) for b in batches]
    outs = [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]) if every else 1)]
    return outs if every else outs[0]


def smallest_sqnr(ref: list[np.ndarray], y: list[np.ndarray]) -> float:
    """The smallest SQNR (dB) over the outputs of y against those of ref (inf where equal)."""
    return min((sqnr_db(*energies(a, b)) for a, b in zip(ref, y)), default=float("inf"))


def top1_agreement(ref: np.ndarray, y: np.ndarray) -> float:
    """Percent of samples whose top-1 class is the same in both outputs."""
    return float(100.0 * np.mean(ref.reshape(len(ref), -1).argmax(1) == y.reshape(len(y), -1).argmax(1)))


def eval_batches(data: DataSource, batch_size: int, samples: int) -> list[dict]:
    """The first batches of data, up to at least `samples` samples (or all)."""
    batches, n = [], 0
    for b in data.batches(batch_size):
        batches.append(b)
        n += len(next(iter(b.values())))
        if n >= samples:
            break
    return batches


def module_sensitivity(model, calib, config: QuantConfig | None = None, *, preprocess: str | None = None,
                       on_step: Callable[[str], None] | None = None, every_output: bool = False) -> dict:
    """{"samples": n, "modules": [{"name", "op", "sqnr_db", "agreement_top1"}, ...]} sorted by
    SQNR, lowest (most sensitive) first. Measured on the first EVAL_SAMPLES calibration samples, or
    on as few as hold EVAL_VALUES input values (at least MIN_EVAL_SAMPLES; whole batches).
    every_output: sqnr_db is the smallest over the model's outputs (default: its first output's)."""
    config = config or QuantConfig()
    step = on_step or (lambda _: None)
    original = load_model(model)
    data = DataSource(calib, input_specs(original), num_samples=config.num_samples, preprocess=preprocess)
    graph = fold_batchnorm(canonicalize(to_graph(original)))
    modules = find_modules(graph)
    if not any(m.kind != "pool" for m in modules):
        raise DfqError("model has no Conv, ConvTranspose, Gemm or MatMul with a constant weight, no activation "
                       "function and no op on two activations: nothing to quantize")
    plans = [plan_quantization(graph, [m]) for m in modules]
    tensors = list(dict.fromkeys(t for p in plans for t in p.requant))
    step(f"calibrating {len(tensors)} tensors")
    stats = calibrate(graph, tensors, data, config.batch_size)
    first = next(iter(data.batches(config.batch_size)), None)  # one batch: the input values per sample
    per_sample = sum(v[0].size for v in first.values()) if first else 1
    batches = eval_batches(data, config.batch_size,
                           min(EVAL_SAMPLES, max(MIN_EVAL_SAMPLES, -(-EVAL_VALUES // max(per_sample, 1)))))

    def outputs(m) -> list[np.ndarray]:  # the outputs the figure is taken over
        y = model_outputs(to_model(m, original).SerializeToString(), batches, every_output)
        return y if every_output else [y]

    refs = outputs(graph)
    ref = refs[0]
    rows = []
    for i, (m, plan) in enumerate(zip(modules, plans)):
        step(f"module {i + 1}/{len(modules)}: {m.name}")
        exps = choose_exponents(graph, plan, stats, weight_bits=config.weight_bits, act_bits=config.act_bits,
                                per_channel=config.per_channel, method=config.method)
        q = emit_qdq(graph, build_quantized(graph, plan, exps, per_channel=config.per_channel))[0]
        ys = outputs(q)
        rows.append({"name": m.name, "op": m.op, "sqnr_db": smallest_sqnr(refs, ys),
                     "agreement_top1": top1_agreement(ref, ys[0])})
    rows.sort(key=lambda r: r["sqnr_db"])
    return {"samples": len(ref), "weight_bits": config.weight_bits, "modules": rows}
