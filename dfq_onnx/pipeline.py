"""The conversion, top to bottom. Read this file to know what dfq-onnx does to a model."""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from . import __version__
from .calibration_data import DataSource, first_samples, input_specs
from .config import SATURATION_SAFE_TARGETS, QuantConfig
from .errors import DfqError
from .model_io import MIN_OPSET, TWIN_CAST, check_model, load_light, to_graph, to_model
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

COLLECT_MIN_BYTES = 1 << 26  # weights of this size or more: garbage is collected after each stage (a collection costs
                             # tens of ms in a large process: not worth it for small models converted many times)
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


@dataclass
class Conversion:
    """What the stages of one conversion share: the inputs, the graph as the stages leave it, and
    the facts they add for the report (each stage adds its own keys to `facts`)."""
    model: object
    calib: object
    config: QuantConfig
    preprocess: str | None = None
    on_start: Callable[[int], None] | None = None
    on_batch: Callable[[int], None] | None = None
    on_search: Callable[[int, int], None] | None = None
    on_round: Callable[[int, int], None] | None = None
    cluster: object = None                   # distributed.Cluster: calibration runs on its workers
    started: float = field(default_factory=time.perf_counter)
    original: onnx.ModelProto | None = None  # the float model's structure (weights stubbed)
    graph: object = None                     # the graphsurgeon graph each stage leaves
    data: DataSource | None = None           # None in data-free mode
    data_free: bool = False
    bn_moments: dict = field(default_factory=dict)
    modules: list = field(default_factory=list)    # every unified module
    quantized: list = field(default_factory=list)  # those quantized (not --keep-float)
    plan: object = None
    seen: int = 0                            # calibration samples run
    kept: list = field(default_factory=list)  # calibration batches kept for the search/rounding stages
    reference: list = field(default_factory=list)  # the float model's first output on those, when calibration kept it
    stats: dict = field(default_factory=dict)
    exps: object = None
    guarded: dict = field(default_factory=dict)
    pair_safe: bool = False
    codes_cache: dict = field(default_factory=dict)
    corrected: object = None                 # the graph with biases corrected before the search
    pre_bias_facts: dict = field(default_factory=dict)
    searched_from: dict | None = None        # activation fractions the pre-search correction saw
    qm: QuantizedModel | None = None
    symbols: dict = field(default_factory=dict)
    library: CLibrary | None = None
    out: onnx.ModelProto | None = None
    facts: dict = field(default_factory=dict)
    weight_bytes: int = 0                    # the loaded weights' bytes

    def quantized_model(self, e=None) -> QuantizedModel:
        """The quantized IR of the current graph under exponents e (default: the current ones);
        bias correction changes biases only, so the weight codes are cached across builds."""
        return build_quantized(self.graph, self.plan, e or self.exps, per_channel=self.config.per_channel,
                               integer_graph=self.config.integer, codes_cache=self.codes_cache)

    def samples(self, n: int) -> list:
        """The first n kept calibration samples (whole batches for a model with a fixed batch)."""
        return first_samples(self.kept, n, whole=self.data is not None and self.data.fixed_batch is not None)

    def references(self, batches: list) -> list:
        """Per batch of self.samples(n), the float model's first output on it as calibration kept
        it, or None (not kept, or the batch was cut shorter than the kept one)."""
        rows = [len(next(iter(b.values()))) for b in batches]
        return [self.reference[i] if i < len(self.reference) and n == len(next(iter(self.kept[i].values()))) else None
                for i, n in enumerate(rows)]


def load(c: Conversion) -> None:
    """The model's structure, and its weights as numpy arrays held once (every graph below shares
    them), at the opset the format needs (a float16 or float64 model as its float32 twin,
    model_io.float32_twin); the calibration source checked against its inputs.
    Refuses an already quantized model and missing calibration data."""
    config = c.config
    c.original, weights = load_light(c.model, INT16_QDQ_OPSET if config.uses_16bit_activations else
                                     INT_OPSET if config.integer else MIN_OPSET)
    g = c.original.graph
    io = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}
    twin = [io.get(n.input[0], io.get(n.output[0])) for n in g.node if n.name.startswith(TWIN_CAST)]
    if twin:  # a float16 / float64 model, computed in float32 between Casts at its inputs and outputs
        c.facts["float32_twin"] = {"casts": len(twin),
                                   "types": sorted({onnx.TensorProto.DataType.Name(t).lower() for t in twin})}
    done = quantized_ops(c.original)
    if done:
        raise DfqError(f"the model is already quantized ({', '.join(done[:4])}{', ...' if len(done) > 4 else ''}); "
                       "dfq-onnx quantizes float models: pass the float original")
    if c.calib is None:
        raise DfqError("calibration data is required: pass --calib DATA (a .npz keyed by input name, "
                       "a folder of .npy files or of images), or --calib none for data-free mode")
    c.data_free = isinstance(c.calib, str) and c.calib.lower() == "none"
    source = DataSource if c.cluster is None else c.cluster.source  # a cluster's: split, read by its workers
    c.data = None if c.data_free else source(c.calib, input_specs(c.original), num_samples=config.num_samples,
                                             preprocess=c.preprocess)
    c.graph = to_graph(c.original, weights)
    c.weight_bytes = sum(a.nbytes for a in weights.values())
    del weights  # the graphs hold them; what a pass replaces is freed with the graph that held it


def canonical(c: Conversion) -> None:
    """Canonical form (passes/canonicalize.py); BatchNorm statistics read for data-free mode before
    folding; BatchNorm and constant scales folded into the linear layers; cross-layer equalization
    when asked (the BatchNorm moments follow its scales)."""
    c.graph = canonicalize(c.graph)
    c.bn_moments = batchnorm_moments(c.graph) if c.data_free else {}
    c.graph = fold_batchnorm(c.graph)
    if c.config.equalize:
        c.graph, eq_facts, eq_scales = equalize(c.graph)
        c.facts.update(eq_facts)
        for t, s in eq_scales.items():  # the BatchNorm output now carries x / s per channel
            if t in c.bn_moments:
                mu, var = c.bn_moments[t]
                c.bn_moments[t] = (mu / s, var / s ** 2)


def modules(c: Conversion) -> None:
    """Unified modules and the quantization plan. Refuses a model with nothing to quantize, NaN/Inf
    weights, and --keep-float / --override names that are not modules."""
    config = c.config
    c.modules = find_modules(c.graph, integer_graph=config.integer)
    if not any(m.kind != "pool" for m in c.modules):
        raise DfqError("model has no Conv, ConvTranspose, Gemm or MatMul with a constant weight, no activation "
                       "function and no op on two activations: nothing to quantize")
    check_finite(c.graph, c.modules)
    for option, names in (("--keep-float", config.keep_float),
                          ("--override", [n for n, _ in config.overrides + config.act_overrides])):
        unknown = sorted(set(names) - {m.name for m in c.modules})
        if unknown:
            raise DfqError(f"{option}: no unified module named {', '.join(unknown)} (module names: "
                           f"{', '.join(m.name for m in c.modules[:6])}{', ...' if len(c.modules) > 6 else ''}; "
                           "`dfq-onnx inspect --sensitivity` lists them all)")
    c.quantized = [m for m in c.modules if m.name not in config.keep_float]  # the others run as float ops
    if not c.quantized:
        raise DfqError("--keep-float names every module: nothing left to quantize")
    c.plan = plan_quantization(c.graph, c.quantized, residual_requant=not config.integer and config.layout == "ort")


def calibration(c: Conversion) -> None:
    """Statistics at every requantization point: from the calibration data run by onnxruntime
    (keeping the first batches the later stages need, and for the search the float model's
    output on them), or in data-free mode from BatchNorm statistics and random inputs."""
    config = c.config

    def counted(n: int) -> None:
        c.seen += n
        if c.on_batch is not None:
            c.on_batch(n)

    if c.data_free:  # ranges from BatchNorm statistics; random inputs where there are none
        c.stats, free_facts = data_free_stats(c.graph, c.plan, c.bn_moments, input_specs(c.original), config.batch_size)
        c.facts.update(free_facts)
        return
    if c.on_start is not None:
        c.on_start(len(c.data))
    keep = max(SEARCH_SAMPLES + CONFIRM_SAMPLES if config.searches else
               LOCAL_SAMPLES if config.effort == "default" else 0,
               ROUND_SAMPLES if config.gptq else 0, BIAS_SAMPLES if config.bias_correction else 0,
               1 if config.format == "c" else 0)  # format c: one sample fixes the program's shapes
    run_on = calibrate if c.cluster is None else c.cluster.calibrate  # the same statistics, merged in order
    c.stats = run_on(c.graph, c.plan.requant, c.data, config.batch_size, counted, c.kept, keep,
                     c.reference if config.searches or config.fast_search else None)  # the searches compare with it


def alignment(c: Conversion) -> None:
    """Range alignment (passes/align_ranges.py) unless --no-align."""
    facts = {"aligned": 0}
    if c.config.align:
        c.graph, c.stats, facts = align_ranges(c.graph, c.plan, c.stats, act_bits=c.config.act_bits,
                                               method=c.config.method)
    c.facts.update(facts)


def exponents(c: Conversion) -> None:
    """Every fraction (passes/choose_exponents.py); for the QDQ graph on onnxruntime's x86 u8 x s8
    kernels, weight channels that could saturate int16 pair sums are made coarser (the integer
    graph's u8 x u8 kernels cannot saturate)."""
    config = c.config
    act_bits_of = {m.output: int(b) for m in c.quantized for n, b in config.act_overrides if n == m.name}
    c.exps = choose_exponents(c.graph, c.plan, c.stats, weight_bits=config.weight_bits, act_bits=config.act_bits,
                              per_channel=config.per_channel, method=config.method,
                              module_weight_bits=dict(config.overrides), module_act_bits=act_bits_of)
    c.pair_safe = config.target in SATURATION_SAFE_TARGETS and not config.integer
    if c.pair_safe:
        c.exps, c.guarded = guard_saturation(c.graph, c.exps, config.per_channel)


def search(c: Conversion) -> None:
    """The output-aware exponent search: the fast local one at effort default, the full one when
    asked (or at effort max), judged with biases corrected as the model will be deployed (judged
    without, moves that only undo clipping bias won: the shipped model's full search lost 2 dB on
    test digits). Data-free mode has no samples to search on."""
    config = c.config
    if not (c.kept and (config.fast_search or config.searches)):
        return
    if config.bias_correction:
        c.corrected, c.pre_bias_facts = correct_biases(c.graph, c.plan, emit_qdq(c.graph, c.quantized_model())[0],
                                                       c.samples(BIAS_SAMPLES))
        c.searched_from = dict(c.exps.act)
    if config.fast_search:
        batches = c.samples(LOCAL_SAMPLES)
        c.exps, facts = local_search(c.graph, c.plan, c.exps, batches, per_channel=config.per_channel,
                                     corrected=c.corrected, reference=c.references(batches))
    else:
        c.exps, facts = search_exponents(c.graph, c.plan, c.exps, c.kept, per_channel=config.per_channel,
                                         on_group=c.on_search, corrected=c.corrected, reference=c.references(c.kept))
    c.facts.update(facts)


def rounding(c: Conversion) -> None:
    """Second-order weight rounding (GPTQ) and/or N:M sparsity (passes/round_weights.py) when the
    config asks for them; data-free mode prunes by magnitude only."""
    config = c.config
    sparsity = Sparsity.parse(config.sparsity)
    if not ((config.gptq and c.kept) or sparsity is not None):
        return
    c.exps, facts = round_weights(
        c.graph, c.plan, c.exps, lambda e: emit_qdq(c.graph, c.quantized_model(e))[0],
        c.samples(ROUND_SAMPLES), per_channel=config.per_channel, gptq=config.gptq and bool(c.kept),
        sparsity=sparsity, pair_limit=U8S8_PAIR_SUM if c.pair_safe else None,
        stages=MAX_EFFORT_STAGES if config.effort == "max" else 1, act_order=config.effort == "max",
        on_stage=c.on_round)
    c.facts.update(facts)


def bias_correction(c: Conversion) -> None:
    """Each module's mean quantization error folded into its bias (passes/bias_correction.py),
    measured in QDQ (the same rounding as the integer graph); the search stage's correction is
    reused when no fraction or weight moved since."""
    facts = {"bias_corrected": 0}
    if c.corrected is not None and c.exps.act == c.searched_from and not c.exps.grid:  # already done
        c.graph, facts = c.corrected, c.pre_bias_facts
    elif c.config.bias_correction and not c.data_free:
        simulated = emit_qdq(c.graph, c.quantized_model())[0]
        c.graph, facts = correct_biases(c.graph, c.plan, simulated, c.samples(BIAS_SAMPLES))
    c.facts.update(facts)


def render(c: Conversion) -> None:
    """The quantized IR built once and rendered: the C library (format c; its shapes from one
    calibration sample, zeros in data-free mode), the integer graph or the QDQ graph (written for
    onnxruntime's CPU kernels with layout ort), respelled as QONNX for format qonnx; the integer
    model carries the requantizer functions it calls."""
    config = c.config
    c.qm = c.quantized_model()
    if config.format == "c":
        c.library = emit_c(c.graph, c.qm, shape_feeds(c.kept, c.original, c.data is not None and c.data.fixed_batch is not None),
                           config.prefix)
    if config.integer:
        graph, facts, c.symbols = emit_int(c.graph, c.qm)
    else:
        # onnxruntime's CPU int8 kernels take uint8 activations: signed codes are written offset by 128
        ort_layout = config.format == "qdq" and config.layout == "ort"
        graph, facts, c.symbols = emit_qdq(c.graph, c.qm, signed_as_uint8=ort_layout, shuffle_as_gather=ort_layout,
                                           prelu_split=ort_layout)
    c.facts.update(facts)
    c.graph = c.corrected = None  # the float weights: the output holds codes; freed before it is serialized
    c.codes_cache.clear()
    if c.weight_bytes >= COLLECT_MIN_BYTES:
        gc.collect()
    c.out = to_model(graph, c.original)
    del graph
    if config.format == "qonnx":
        c.out = to_qonnx(c.out, c.qm)
    if config.integer:
        opset = next(o.version for o in c.out.opset_import if o.domain in ("", "ai.onnx"))
        used = {n.op_type for n in c.out.graph.node if n.domain == INT_DOMAIN}
        c.out.functions.extend(f for f in rounding_functions(opset) if f.name in used)  # only those it calls
        c.out.opset_import.add(domain=INT_DOMAIN, version=1)


# The conversion, in order. Each stage reads and extends the Conversion; run() calls them in turn.
STAGES: list[Callable[[Conversion], None]] = [
    load, canonical, modules, calibration, alignment, exponents, search, rounding, bias_correction, render,
]


def run(model, calib, config: QuantConfig | None = None, *, preprocess: str | None = None,
        on_start: Callable[[int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_search: Callable[[int, int], None] | None = None,
        on_round: Callable[[int, int], None] | None = None,
        on_stage: Callable[[str], None] | None = None, cluster=None) -> ConvertResult:
    """Convert a float model to a power-of-two quantized model (QDQ or integer-only). calib: the
    calibration data, or "none" for data-free mode (passes/data_free.py; no bias correction).
    The STAGES run in order on one Conversion; on_stage(name) is called before each. cluster: a
    distributed.Cluster (entered) to calibrate on, its workers each reading a shard of calib;
    the output is the same, byte for byte."""
    c = Conversion(model, calib, config or QuantConfig(), preprocess, on_start, on_batch, on_search, on_round,
                   cluster)
    for stage in STAGES:
        if on_stage is not None:
            on_stage(stage.__name__)
        stage(c)
        if c.weight_bytes >= COLLECT_MIN_BYTES:  # graphsurgeon graphs are reference cycles: the ones a
            gc.collect()                         # stage dropped hold weights until they are collected
    return _result(c)


def _result(c: Conversion) -> ConvertResult:
    """The report of a finished conversion, the output stamped with how it was made and checked."""
    plan, qm = c.plan, c.qm
    kinds = {k: sum(1 for t in plan.requant if plan.requant_kind[t] == k) for k in ("input", "module", "table", "residual", "island")}
    facts = {**c.facts,
             "float_normalizations": plan.float_norms,
             "calibration_casts": dict(c.data.casts) if c.data is not None else {},
             "narrowed": qm.facts["narrowed"], "residual_rounded": qm.facts["residual_rounded"],
             "max_accumulator_bits": qm.facts["max_accumulator_bits"],
             "saturation_guarded": len(c.guarded), "saturation_guarded_modules": c.guarded,
             "saturation_guarded_channels": sum(c.guarded.values())}
    result = ConvertResult(c.out, [m.summary() for m in c.quantized], len(plan.requant), kinds,
                           per_layer_requant_points(c.original), dict(plan.float_ops),
                           time.perf_counter() - c.started, c.seen, facts, qm, c.symbols, c.library)
    _stamp(c.out, result, c.config)
    check_model(c.out)
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
