"""The conversion, top to bottom. Read this file to know what dfq-onnx does to a model."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from . import __version__
from .calibration_data import DataSource, first_samples, input_specs
from .config import SATURATION_SAFE_TARGETS, QuantConfig
from .errors import DfqError
from .model_io import MIN_OPSET, load_light, to_graph, to_model
from .passes.calibrate import calibrate
from .passes.canonicalize import canonicalize
from .passes.data_free import batchnorm_moments, data_free_stats
from .passes.choose_exponents import choose_exponents, guard_saturation
from .passes.emit_c import CLibrary, emit_c, shape_feeds
from .passes.emit_qonnx import to_qonnx
from .passes.emit_int import DOMAIN as INT_DOMAIN, INT_OPSET, emit_int, rounding_functions
from .passes.emit_qdq import INT16_QDQ_OPSET, emit_qdq
from .passes.equalize import equalize
from .passes.search_exponents import CONFIRM_SAMPLES, LOCAL_SAMPLES, SAMPLES as SEARCH_SAMPLES, local_search, search_exponents
from .passes.align_ranges import align_ranges
from .passes.round_weights import SAMPLES as ROUND_SAMPLES, round_weights
from .gptq import Sparsity
from .config import U8S8_PAIR_SUM
from .passes.bias_correction import SAMPLES as BIAS_SAMPLES, correct_biases
from .passes.fold_batchnorm import fold_batchnorm
from .passes.form_modules import find_modules, plan_quantization
from .quantized import QuantizedModel, build as build_quantized, check_finite
from .report import per_layer_requant_points, quantized_ops

MAX_EFFORT_STAGES = 4  # --effort max: second-order rounding in this many stages, each on the inputs its predecessors left


@dataclass
class ConvertResult:
    model: onnx.ModelProto
    modules: list = field(default_factory=list)
    requant_points: int = 0
    requant_by_kind: dict = field(default_factory=dict)
    per_layer_requant_points: int = 0
    float_ops: dict = field(default_factory=dict)
    seconds: float = 0.0
    samples: int = 0
    facts: dict = field(default_factory=dict)
    quantized: QuantizedModel | None = None  # the quantized IR every format renders
    symbols: dict = field(default_factory=dict)  # float tensor name -> the tensor of its integer codes
    library: CLibrary | None = None  # format c: the C sources (model: the integer graph they were checked against)


def fuse(model) -> onnx.ModelProto:
    """The fused float model: canonical form with BatchNorm and per-channel affine ops folded."""
    original, weights = load_light(model)
    graph = fold_batchnorm(canonicalize(to_graph(original, weights)))
    del weights
    return to_model(graph, original)


def run(model, calib, config: QuantConfig | None = None, *, preprocess: str | None = None,
        on_start: Callable[[int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_search: Callable[[int, int], None] | None = None,
        on_round: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert a float model to a power-of-two quantized model (QDQ or integer-only). calib: the
    calibration data, or "none" for data-free mode (passes/data_free.py; no bias correction)."""
    config = config or QuantConfig()
    t0 = time.perf_counter()
    # the model's structure, and its weights as numpy arrays held once: every graph below shares them
    original, weights = load_light(model, INT16_QDQ_OPSET if config.uses_16bit_activations else
                                   INT_OPSET if config.integer else MIN_OPSET)
    done = quantized_ops(original)
    if done:
        raise DfqError(f"the model is already quantized ({', '.join(done[:4])}{', ...' if len(done) > 4 else ''}); "
                       "dfq-onnx quantizes float models: pass the float original")
    if calib is None:
        raise DfqError("calibration data is required: pass --calib DATA (a .npz keyed by input name, "
                       "a folder of .npy files or of images), or --calib none for data-free mode")
    data_free = isinstance(calib, str) and calib.lower() == "none"
    data = None if data_free else DataSource(calib, input_specs(original), num_samples=config.num_samples,
                                             preprocess=preprocess)

    graph = to_graph(original, weights)
    del weights  # the graphs hold them; what a pass replaces is freed with the graph that held it
    graph = canonicalize(graph)
    bn_moments = batchnorm_moments(graph) if data_free else {}
    graph = fold_batchnorm(graph)
    eq_facts = {}
    if config.equalize:
        graph, eq_facts, eq_scales = equalize(graph)
        for t, s in eq_scales.items():  # the BatchNorm output now carries x / s per channel
            if t in bn_moments:
                mu, var = bn_moments[t]
                bn_moments[t] = (mu / s, var / s ** 2)
    modules = find_modules(graph, integer_graph=config.integer)
    if not any(m.kind != "pool" for m in modules):
        raise DfqError("model has no Conv, ConvTranspose, Gemm or MatMul with a constant weight, no activation "
                       "function and no op on two activations: nothing to quantize")
    check_finite(graph, modules)
    for option, names in (("--keep-float", config.keep_float),
                          ("--override", [n for n, _ in config.overrides + config.act_overrides])):
        unknown = sorted(set(names) - {m.name for m in modules})
        if unknown:
            raise DfqError(f"{option}: no unified module named {', '.join(unknown)} (module names: "
                           f"{', '.join(m.name for m in modules[:6])}{', ...' if len(modules) > 6 else ''}; "
                           "`dfq-onnx inspect --sensitivity` lists them all)")
    quantized = [m for m in modules if m.name not in config.keep_float]  # the others run as float ops
    if not quantized:
        raise DfqError("--keep-float names every module: nothing left to quantize")
    plan = plan_quantization(graph, quantized, residual_requant=not config.integer and config.layout == "ort")
    seen = [0]

    def counted(n: int) -> None:
        seen[0] += n
        if on_batch is not None:
            on_batch(n)

    kept: list[dict] = []
    free_facts = {}
    if data_free:  # ranges from BatchNorm statistics; random inputs where there are none
        stats, free_facts = data_free_stats(graph, plan, bn_moments, input_specs(original), config.batch_size)
    else:
        if on_start is not None:
            on_start(len(data))
        keep = max(SEARCH_SAMPLES + CONFIRM_SAMPLES if config.searches else
                   LOCAL_SAMPLES if config.effort == "default" else 0,
                   ROUND_SAMPLES if config.gptq else 0, BIAS_SAMPLES if config.bias_correction else 0,
                   1 if config.format == "c" else 0)  # format c: one sample fixes the program's shapes
        stats = calibrate(graph, plan.requant, data, config.batch_size, counted, kept, keep)
    align_facts = {"aligned": 0}
    if config.align:
        graph, stats, align_facts = align_ranges(graph, plan, stats, act_bits=config.act_bits, method=config.method)
    act_bits_of = {m.output: int(b) for m in quantized for n, b in config.act_overrides if n == m.name}

    exps = choose_exponents(graph, plan, stats, weight_bits=config.weight_bits, act_bits=config.act_bits,
                            per_channel=config.per_channel, method=config.method,
                            module_weight_bits=dict(config.overrides), module_act_bits=act_bits_of)
    # the QDQ graph runs on onnxruntime's u8 x s8 kernels; the integer graph's u8 x u8 ones cannot saturate
    guarded: dict[str, int] = {}
    pair_safe = config.target in SATURATION_SAFE_TARGETS and not config.integer
    if pair_safe:
        exps, guarded = guard_saturation(graph, exps, config.per_channel)
    codes_cache: dict = {}  # bias correction changes biases only: the second build reuses the weight codes

    def quantized_model(e=None) -> QuantizedModel:
        return build_quantized(graph, plan, e or exps, per_channel=config.per_channel,
                               integer_graph=config.integer, codes_cache=codes_cache)

    search_facts = {}
    corrected, pre_bias_facts, searched_from = None, {}, None
    fast_search = config.effort == "default" and not config.searches
    if kept and (fast_search or config.searches):  # data-free mode has no samples to search on
        # the searches judge the model with its biases corrected, as it will be deployed (judged without,
        # moves that only undo clipping bias won: the shipped model's full search lost 2 dB on test digits)
        if config.bias_correction:
            corrected, pre_bias_facts = correct_biases(graph, plan, emit_qdq(graph, quantized_model())[0],
                                                       first_samples(kept, BIAS_SAMPLES, whole=data.fixed_batch is not None))
            searched_from = dict(exps.act)
        if fast_search:
            exps, search_facts = local_search(graph, plan, exps,
                                              first_samples(kept, LOCAL_SAMPLES, whole=data.fixed_batch is not None),
                                              per_channel=config.per_channel, corrected=corrected)
        else:
            exps, search_facts = search_exponents(graph, plan, exps, kept, per_channel=config.per_channel,
                                                  on_group=on_search, corrected=corrected)

    sparsity = Sparsity.parse(config.sparsity)
    round_facts = {}
    if (config.gptq and kept) or sparsity is not None:  # data-free mode: no inputs, so magnitude pruning only
        exps, round_facts = round_weights(
            graph, plan, exps, lambda e: emit_qdq(graph, quantized_model(e))[0],
            first_samples(kept, ROUND_SAMPLES, whole=data is not None and data.fixed_batch is not None),
            per_channel=config.per_channel, gptq=config.gptq and bool(kept), sparsity=sparsity,
            pair_limit=U8S8_PAIR_SUM if pair_safe else None,
            stages=MAX_EFFORT_STAGES if config.effort == "max" else 1, act_order=config.effort == "max",
            on_stage=on_round)

    bias_facts = {"bias_corrected": 0}
    if corrected is not None and exps.act == searched_from and not exps.grid:  # nothing moved since: already done
        graph, bias_facts = corrected, pre_bias_facts
    elif config.bias_correction and not data_free:  # it measures errors on data, in QDQ (same rounding as int)
        simulated = emit_qdq(graph, quantized_model())[0]
        graph, bias_facts = correct_biases(graph, plan, simulated, first_samples(kept, BIAS_SAMPLES, whole=data.fixed_batch is not None))
    qm = quantized_model()
    symbols = {}
    library = None
    if config.format == "c":  # shapes fixed by one calibration batch (a zero input in data-free mode)
        library = emit_c(graph, qm, shape_feeds(kept, original, data is not None and data.fixed_batch is not None),
                         config.prefix)
    if config.integer:
        graph, facts, symbols = emit_int(graph, qm)
    else:
        # onnxruntime's CPU int8 kernels take uint8 activations: signed codes are written offset by 128
        ort_layout = config.format == "qdq" and config.layout == "ort"
        graph, facts, symbols = emit_qdq(graph, qm, signed_as_uint8=ort_layout, shuffle_as_gather=ort_layout,
                                         prelu_split=ort_layout)

    out = to_model(graph, original)
    if config.format == "qonnx":
        out = to_qonnx(out, qm)
    if config.integer:
        opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
        used = {n.op_type for n in out.graph.node if n.domain == INT_DOMAIN}
        out.functions.extend(f for f in rounding_functions(opset) if f.name in used)  # only those it calls
        out.opset_import.add(domain=INT_DOMAIN, version=1)
    kinds = {k: sum(1 for t in plan.requant if plan.requant_kind[t] == k) for k in ("input", "module", "table", "residual", "island")}
    per_layer = per_layer_requant_points(original)
    result = ConvertResult(out, [m.summary() for m in quantized], len(plan.requant), kinds, per_layer,
                           dict(plan.float_ops), time.perf_counter() - t0,
                           seen[0], {**facts, **eq_facts, **align_facts, **bias_facts, **free_facts, **search_facts, **round_facts,
                                     "float_normalizations": plan.float_norms,
                                     "calibration_casts": dict(data.casts) if data is not None else {},
                                     "narrowed": qm.facts["narrowed"], "residual_rounded": qm.facts["residual_rounded"],
                                     "max_accumulator_bits": qm.facts["max_accumulator_bits"],
                                     "saturation_guarded": len(guarded), "saturation_guarded_modules": guarded,
                                     "saturation_guarded_channels": sum(guarded.values())},
                           qm, symbols, library)
    _stamp(out, result, config)
    onnx.checker.check_model(out)
    return result


def _stamp(model: onnx.ModelProto, result: ConvertResult, config: QuantConfig) -> None:
    """metadata_props that say who made the model and how (read back by `inspect`)."""
    meta = {
        "dfq.producer": f"dfq-onnx {__version__}",
        "dfq.format": config.format,
        "dfq.settings": json.dumps(config.as_dict(), sort_keys=True),
        "dfq.modules": json.dumps(result.modules),
        "dfq.requant_points": json.dumps(result.requant_by_kind),
        "dfq.float_islands": json.dumps(result.float_ops, sort_keys=True),
        "dfq.float_modules": json.dumps(result.facts.get("float_modules", {}), sort_keys=True),
    }
    for p in list(model.metadata_props):
        if p.key.startswith("dfq."):
            model.metadata_props.remove(p)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
