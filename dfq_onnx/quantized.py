"""The quantized model: every number that any rendering prints, computed once and range-checked.

Built from the float graph, the quantization plan and the chosen exponents (`build`). Renderers
(passes/emit_qdq.py, passes/emit_int.py, the numpy executor in fixedpoint.py, hw_report.py) only
print or execute it; none of them quantizes a weight or a bias itself. Weight and bias
quantization live here and nowhere else (`weight_codes`, `bias_codes`).

A linear module computes, per output channel c, in integers:

    acc[c] = sum(w_q * x_q) + bias_q[c]                      at fraction acc_frac[c] = f_x + f_w[c]
    sum[c] = acc[c] << acc_shift[c]  +  align(r_q, residual_shift[c])   at fraction sum_frac[c]
    y      = clamp(round_half_even(sum[c] / 2^shift[c]), code_min, code_max)     shift[c] <= 30

where align(r, k) is r << k for k >= 0 and a rounding right shift by -k for k < 0 (only where the
exact form could overflow int32; `Facts.residual_rounded` counts those channels). The worst case
|sum| + 2^(shift-1) is proven below 2^31 for every channel: where it is not, that channel's weight
fraction is lowered (`Facts.narrowed`) until it is, and until its shift is at most 30 bits. A graph output of a linear module leaves as
its int32 sum (no rounding).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from . import functions
from .errors import DfqError
from .fixedpoint import all_finite, code_bounds, qrange, quantize
from .graph_utils import attr_str, bias_of, clip_limits, layer_norm_width, out_channel_axis

INT32_MAX = (1 << 31) - 1
INTEGER_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops with an integer form (ConvInteger, MatMulInteger)
INTEGER_ACTIVATIONS = (None, "Relu", "Relu6", "Clip")  # a clamp of the codes
MAX_NARROWING = 64                                # weight-fraction steps tried before giving up
MAX_SHIFT = 30                                    # right shifts of the requantizer (int32 sums: 31 would round to 0 or +-1)


@dataclass(frozen=True)
class QTensor:
    """A tensor held as b-bit codes q with value q * 2^-frac."""
    name: str
    frac: int
    bits: int
    unsigned: bool

    @property
    def code_range(self) -> tuple[int, int]:
        return qrange(self.bits, self.unsigned)

    @property
    def max_abs_code(self) -> int:
        lo, hi = self.code_range
        return max(-lo, hi)


@dataclass(frozen=True, eq=False)
class Module:
    """What every module of the IR has: its name (a node of the float graph), op (a table: its
    float ops joined by "+"), input codes, output codes and the float graph's name of its output."""
    name: str
    op: str
    input: QTensor
    output: QTensor | None
    output_name: str


@dataclass(frozen=True, eq=False)
class LinearModule(Module):
    """Conv, ConvTranspose, Gemm or MatMul + bias + optional residual + optional activation.
    output None: a graph output, left as the dequantized int32 sum."""
    attrs: Mapping                 # Conv: strides, pads, dilations, group, kernel_shape, auto_pad; Gemm: transB
    axis: int                      # axis of `weight` that indexes output channels
    weight: np.ndarray             # int8 codes, the float weight's layout
    weight_frac: np.ndarray        # (C,) int64; equal entries when weights are per tensor
    per_channel: bool
    weight_bits: int
    bias: np.ndarray | None        # (C,) int32 at acc_frac, or None
    acc_frac: np.ndarray           # (C,) f_x + f_w[c]
    acc_shift: np.ndarray          # (C,) >= 0: left shift of acc before the residual is added
    residual: QTensor | None
    residual_shift: np.ndarray | None  # (C,) left shift of the residual codes (< 0: rounding right shift)
    sum_frac: np.ndarray           # (C,) fraction of the sum that is requantized
    shift: np.ndarray              # (C,) sum_frac - output frac: right shift (< 0: left shift)
    code_min: int                  # activation clamp on the output codes (within the code range)
    code_max: int
    activation: str | None         # Relu, Relu6, Clip, LeakyRelu
    act_limits: tuple              # (lo, hi) float limits of a Relu/Relu6/Clip, None where unbounded
    pre_add: QTensor | None        # QDQ "ort" layout: the linear result requantized before the residual Add
    acc_bound: int                 # proven max over channels of |sum| (+ rounding half)
    integer: bool                  # has an integer-only form (else a float island in the integer graph)
    kind = "linear"

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.axis])

    def weight_scale_frac(self):
        """Fraction(s) of the weight codes: a vector per channel, or one value per tensor."""
        return self.weight_frac if self.per_channel else self.weight_frac[:1].reshape(())

    def dequantized_weight(self) -> np.ndarray:
        return np.ldexp(self.weight.astype(np.float64), -_along(self.weight_frac, self.weight.ndim, self.axis))


@dataclass(frozen=True, eq=False)
class PoolModule(Module):
    """GlobalAveragePool or AveragePool: integer window sum, then one rounding at the same fraction."""
    attrs: Mapping                 # kernel_shape, strides, pads, auto_pad (AveragePool)
    window: int | None             # elements per window (one divisor for every window); None: a
                                   # GlobalAveragePool over dynamic spatial dims, H*W at run time
    shift: int | None              # log2(window) when a power of two, else None (a rounding division)
    code_min: int
    code_max: int
    acc_bound: int
    integer: bool
    kind = "pool"


@dataclass(frozen=True, eq=False)
class TableModule(Module):
    """A function of one 8-bit tensor (an activation in any spelling) as a lookup table:
    y = table[c, x - code_min(x)] with table[c, i] = clamp(round_half_even(f_c(v_i) 2^f_y)), v_i
    the i-th input code's value and f_c the float function of the module's nodes (per channel c
    where their constants are). One rounding, at the table's construction."""
    table: np.ndarray              # (channels or 1, 2^bits) int16 codes of the output
    channel_axis: int | None       # negative axis of the tensor that indexes the table's rows
    integer: bool                  # 8-bit codes in and out (else a float island in the integer graph)
    kind = "table"


@dataclass(frozen=True, eq=False)
class BinaryModule(Module):
    """Mul, Add, Sub or MatMul of two activations a and b, in integers:
        Mul / MatMul:  sum = a * b (a @ b)                             at fraction f_a + f_b
        Add / Sub:     sum = align(a, a_shift) +- align(b, b_shift)    at fraction f_a + a_shift
        y = clamp(round_half_even(sum / 2^shift), code_min, code_max)  (shift = sum's fraction - f_y)
    align(r, k) = r << k (k >= 0) or a rounding right shift by -k, as in LinearModule."""
    other: QTensor
    a_shift: int
    b_shift: int
    shift: int
    code_min: int
    code_max: int
    acc_bound: int
    integer: bool
    kind = "binary"


@dataclass(frozen=True, eq=False)
class LayerNormModule(Module):
    """LayerNormalization over the last axis (width N) of 8-bit codes x, in integers, with m =
    mean_bits extra fraction bits for the mean (as many as keep the sum of squares in int32):
        d   = (x << m) - rounding_divide(sum(x) << m, N)
        sd  = max(isqrt(sum(d * d) + eps_code), 1)          ~ sqrt(N) * sigma * 2^(f_x + m)
        y   = clamp(rounding_shift(rounding_divide(d * gain[c], sd) + offset[c], gain_shift))
    gain[c] = round(gamma[c] sqrt(N) 2^(f_y + gain_shift)), offset[c] = round(beta[c] 2^(f_y + gain_shift)),
    eps_code = round(epsilon N 2^(2 (f_x + m))). Every intermediate is proven to fit int32.
    Against float64 LayerNorm of the same codes, an output is off by at most about 1 + |gamma|
    2^(f_y - m - 1) / sigma + |y| / (2^m sqrt(N) sigma) codes (sigma: the row's standard deviation
    in input codes; the mean's rounding and the floored root): 1 code unless a row's codes hardly
    vary."""
    width: int
    mean_bits: int
    eps_code: int
    gain: np.ndarray               # (N,) int64
    gain_shift: int                # >= 0
    offset: np.ndarray             # (N,) int64, at the gain's fraction
    code_min: int
    code_max: int
    acc_bound: int
    integer: bool
    kind = "layernorm"


@dataclass(frozen=True, eq=False)
class SoftmaxModule(Module):
    """Softmax over the last axis of 8-bit codes x, in integers: with e[i] = round(exp(-i 2^-f_x)
    2^exp_bits) (i = 0 .. 2^bits - 1, a table),
        E = e[max(x) - x];   y = clamp(rounding_divide(E << f_y, sum(E)))
    sum(E) >= 2^exp_bits (the maximum's own term), so the division is defined."""
    exp_table: np.ndarray          # (2^bits,) int64
    exp_bits: int
    code_min: int
    code_max: int
    acc_bound: int
    integer: bool
    kind = "softmax"


@dataclass
class QuantizedModel:
    """The quantized IR. `tensors` holds every requantized tensor of the plan; pass-through outputs
    carry their source's QTensor (`tensor()`)."""
    plan: object                   # passes.form_modules.Plan
    tensors: dict[str, QTensor]
    modules: list                  # Module subclasses (linear, pool, table, binary, LayerNorm, Softmax), in graph order
    facts: dict = field(default_factory=dict)

    def tensor(self, name: str) -> QTensor:
        """The QTensor of `name`: its own, or (a pass-through output) its source's codes under its name."""
        src = self.tensors[self.plan.source(name)]
        return src if src.name == name else replace(src, name=name)

    def module(self, name: str):
        return next(m for m in self.modules if m.name == name)


# --- the quantization arithmetic of weights and biases -------------------------------------------
CHUNK_ELEMENTS = 1 << 20  # weights are quantized in slices of about this many elements (float64 temporaries)
THREADS = min(2, os.cpu_count() or 1)  # numpy releases the GIL in its loops: slices run on two cores


def in_slices(fn, n: int, step: int) -> list:
    """[fn(i, min(i + step, n)) for i in range(0, n, step)], the slices on THREADS threads."""
    bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
    if THREADS < 2 or len(bounds) < 2:
        return [fn(a, b) for a, b in bounds]
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(lambda ab: fn(*ab), bounds))


def channel_slices(fn, w: np.ndarray, axis: int) -> list:
    """[fn(w[..., a:b, ...], a, b)] over consecutive slices of output channels (along `axis`) of
    about CHUNK_ELEMENTS elements each, on THREADS threads: per-channel work whose temporaries
    stay small whatever the weight's size."""
    channels = w.shape[axis]
    per = max(1, w.size // max(1, channels))

    def part(a: int, b: int):
        index = [slice(None)] * w.ndim
        index[axis] = slice(a, b)
        return fn(w[tuple(index)], a, b)

    return in_slices(part, channels, max(1, CHUNK_ELEMENTS // per))


def weight_codes(w: np.ndarray, frac: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int8 codes of a float weight at a fraction per slice along `axis` (round half to even).
    Elementwise, so computed in slices along the first axis: the float64 and int64 temporaries
    of the arithmetic stay small whatever the weight's size."""
    w = np.asarray(w)
    f = _along(frac, np.ndim(w), axis)
    if w.size <= CHUNK_ELEMENTS or w.ndim == 0:
        return quantize(w, f, bits, dtype=np.int8)
    out = np.empty(w.shape, np.int8)

    def part(a: int, b: int) -> None:
        out[a:b] = quantize(w[a:b], f[a:b] if f.shape[0] > 1 else f, bits, dtype=np.int8)

    in_slices(part, w.shape[0], max(1, CHUNK_ELEMENTS // max(1, w.size // w.shape[0])))
    return out


def cached_weight_codes(w: np.ndarray, frac: np.ndarray, bits: int, axis: int, cache: dict | None) -> np.ndarray:
    """weight_codes, looked up in `cache` (kept by the caller across builds of one graph) by the
    weight array itself, the fractions, bits and axis. The codes are read-only."""
    key = (id(w), np.asarray(frac, np.int64).tobytes(), bits, axis)
    if cache is not None and key in cache and cache[key][0] is w:
        return cache[key][1]
    q = weight_codes(w, frac, bits, axis)
    q.setflags(write=False)
    if cache is not None:
        cache[key] = (w, q)
    return q


def bias_codes(b: np.ndarray, acc_frac: np.ndarray) -> np.ndarray:
    """A float bias per output channel at the accumulator's fraction, as int64 (the caller
    proves the int32 range). Beyond +-2^62 (an all-zero weight channel's huge fraction) the codes are
    clamped there, not wrapped: the caller's int32 check then narrows the fraction."""
    scaled = np.ldexp(np.asarray(b, dtype=np.float64), np.asarray(acc_frac, dtype=np.int64))
    return np.rint(np.clip(scaled, -2.0 ** 62, 2.0 ** 62)).astype(np.int64)


def int16_pairs(node: gs.Node) -> bool | None:
    """Whether onnxruntime's x86 u8 x s8 kernels without VNNI add this linear node's products in
    int16 pairs (fixedpoint.u8s8_dot_avx2), along the rows kernel_rows gives: True for a Conv
    (but a depthwise one), a Gemm and a MatMul with a 2-D weight, whose weights the kernels pack
    as [K, N] with K in that order; False for a depthwise Conv (one input channel and one output
    channel per group: its kernels widen every product to int32); None where the packing is not
    known (any two weights of a channel may then pair)."""
    shape = np.shape(node.inputs[1].values)
    if node.op == "Conv":
        return not (int(node.attrs.get("group", 1)) > 1 and shape[1] == 1
                    and shape[0] == int(node.attrs.get("group", 1)))
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        return True
    if node.op == "MatMul" and len(shape) == 2:
        return True
    return None


def kernel_rows(node: gs.Node, part: np.ndarray) -> np.ndarray:
    """A slice of a linear node's weight along its output-channel axis as [channels, K] rows in
    the order onnxruntime's kernels reduce over: a Conv's kernel taps, input channels fastest (its
    filter reordered to [taps, C/group, M]); a Gemm's or MatMul's input dimension."""
    if node.op == "Conv":
        return np.moveaxis(part, 1, -1).reshape(part.shape[0], -1)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return part.reshape(part.shape[0], -1)
    return part.T


def channel_fractions(node: gs.Node, frac, per_channel: bool) -> tuple[np.ndarray, int]:
    """(fraction per output channel, channel axis) of a linear node's weight: `frac` per channel,
    or its first entry for every channel of a per-tensor weight."""
    axis = out_channel_axis(node)
    channels = np.shape(node.inputs[1].values)[axis]
    fr = np.broadcast_to(np.asarray(frac, np.int64), (channels,)).copy() if per_channel else \
        np.full(channels, int(np.asarray(frac).reshape(-1)[0]), np.int64)
    return fr, axis


def node_weight_codes(node: gs.Node, frac, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(codes, fraction per output channel, channel axis) of a linear node's weight at `frac`."""
    fr, axis = channel_fractions(node, frac, per_channel)
    return weight_codes(np.asarray(node.inputs[1].values), fr, bits, axis), fr, axis


def quantized_weight(node: gs.Node, frac, bits: int, per_channel: bool) -> np.ndarray:
    """The float values of a node's weight after quantization: what every simulation uses."""
    q, fr, axis = node_weight_codes(node, frac, bits, per_channel)
    return np.ldexp(q.astype(np.float64), -_along(fr, q.ndim, axis)).astype(np.float32)


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.int64).reshape(shape)


def _sum_abs_per_channel(q: np.ndarray, axis: int) -> np.ndarray:
    # |int8| wraps only at -128, whose bits read as uint8 are 128: exact, with no wider copy; the
    # sums are int64 (exact, so the order of summation is irrelevant)
    # computed over slices of channels: the |q| temporary stays small whatever the weight's size
    def part(s: np.ndarray, a: int, b: int) -> np.ndarray:
        m = np.abs(s).view(np.uint8) if s.dtype == np.int8 else np.abs(s.astype(np.int64))
        return m.sum(axis=tuple(i for i in range(s.ndim) if i != axis), dtype=np.int64)

    if q.size <= CHUNK_ELEMENTS or q.ndim == 0:
        return part(q, 0, 0)
    return np.concatenate(channel_slices(part, q, axis))


def check_finite(graph: gs.Graph, modules) -> None:
    """Refuse a linear module whose weight or bias holds NaN or Inf: no fraction represents it."""
    nodes = {n.name: n for n in graph.nodes}
    for m in modules:
        if m.kind != "linear":
            continue
        node = nodes[m.name]
        for what, t in (("weight", node.inputs[1]), ("bias", bias_of(node))):
            if t is not None and not all_finite(np.asarray(t.values)):
                raise DfqError(f"{m.op} {m.name}: its {what} {t.name!r} holds NaN or Inf values; "
                               "no power-of-two fraction represents them")


# --- construction --------------------------------------------------------------------------------
def build(graph: gs.Graph, plan, exps, *, per_channel: bool, integer_graph: bool = False,
          codes_cache: dict | None = None) -> QuantizedModel:
    """The quantized model of `graph` under `plan` and `exps` (passes/choose_exponents.py).

    Guarantees: every module's worst-case accumulator (sum |w_q| * max|x_q| + |bias_q| + aligned
    residual, plus the rounding half) is below 2^31 in every channel, so no rendering can wrap;
    biases are int32 at exactly f_x + f_w[c]; activation clamps are code bounds inside the output's
    code range (a Relu clamps at code 0 even when its output shares a signed fraction group).
    integer_graph: the plan is the integer graph's (unified modules), so a residual is never
    requantized before its Add. codes_cache: see cached_weight_codes (a build after bias
    correction reuses the codes of the build before it: the weights did not change).
    """
    nodes = {n.name: n for n in graph.nodes}
    tmap = graph.tensors()
    tensors = {t: QTensor(t, int(exps.act[t]), int(exps.act_bits.get(t, 8)), t in plan.unsigned) for t in plan.requant}
    facts = {"narrowed": {}, "residual_rounded": 0, "max_accumulator_bits": 0}
    qm = QuantizedModel(plan, tensors, [], facts)
    for m in plan.modules:
        if m.kind == "pool":
            mod = _pool(m, nodes[m.name], tmap, qm)
        elif m.kind == "table":
            mod = _table(m, nodes, qm)
        elif m.kind == "binary":
            mod = _binary(m, tmap, qm)
        elif m.op == "LayerNormalization":
            mod = _layer_norm(m, nodes[m.name], tmap, qm)
        elif m.op == "Softmax":
            mod = _softmax(m, tmap, qm)
        else:
            mod = _linear(m, nodes, qm, exps, per_channel, integer_graph, codes_cache)
        qm.modules.append(mod)
        if getattr(mod, "acc_bound", 0) > 0:
            facts["max_accumulator_bits"] = max(facts["max_accumulator_bits"], int(mod.acc_bound).bit_length() + 1)
    return qm


def _linear(m, nodes, qm: QuantizedModel, exps, per_channel: bool, integer_graph: bool,
            codes_cache: dict | None = None) -> LinearModule:
    node = nodes[m.name]
    plan = qm.plan
    w = exps.grid.get(m.name)  # second-order rounding or pruning put it on its grid: quantizing is exact
    w = np.asarray(node.inputs[1].values) if w is None else w
    bits = exps.weight_bits[m.name]
    frac, axis = channel_fractions(node, exps.weight[m.name], per_channel)
    channels = w.shape[axis]
    x = qm.tensor(m.input)
    out = None if m.output in plan.float_outputs else qm.tensor(m.output)
    res = qm.tensor(m.residual_input) if m.residual_input else None
    pre_add = None
    if m.residual and not integer_graph:
        pre = next((t for t in plan.requant if plan.requant_kind.get(t) == "residual"
                    and t in {i.name for i in nodes[m.residual].inputs}), None)
        pre_add = qm.tensors.get(pre) if pre else None
    b = bias_of(node)
    if b is None and m.bias_add is not None:
        add = nodes[m.bias_add]
        b = add.inputs[1] if isinstance(add.inputs[1], gs.Constant) else add.inputs[0]
    bias_f = None if b is None else np.broadcast_to(np.asarray(b.values, np.float64).reshape(-1), (channels,))
    act_node = nodes[m.nodes[-1]] if m.activation else None
    attrs = _linear_attrs(node)
    integer = node.op in INTEGER_LINEAR and m.activation in INTEGER_ACTIVATIONS and pre_add is None and \
        (node.op != "ConvTranspose" or conv_transpose_pads(attrs) is not None)

    rounded = np.zeros(channels, bool)  # channels whose residual is right-shifted (the exact form overflows)
    lowered = np.zeros(channels, bool)  # channels whose weight fraction was lowered
    for _ in range(MAX_NARROWING):
        q = cached_weight_codes(w, frac, bits, axis, codes_cache)
        acc_frac = x.frac + frac
        bq = None if bias_f is None else bias_codes(bias_f, acc_frac)
        bound = _sum_abs_per_channel(q, axis) * x.max_abs_code + (0 if bq is None else np.abs(bq))
        if res is not None:
            k = acc_frac - res.frac
            acc_shift = np.where(rounded, 0, np.maximum(-k, 0))
            sum_frac = acc_frac + acc_shift
            rshift = np.maximum(sum_frac - res.frac, -MAX_SHIFT)  # exact: |r| <= 255 rounds to 0 from 9 bits on
            r_part = np.where(rshift >= 0, res.max_abs_code * np.ldexp(1.0, np.maximum(rshift, 0)),
                              np.ceil(res.max_abs_code * np.ldexp(1.0, np.minimum(rshift, 0))))
            total = bound * np.ldexp(1.0, acc_shift) + r_part
        else:
            acc_shift, sum_frac, rshift = np.zeros(channels, np.int64), acc_frac, None
            total = bound.astype(np.float64)
        shift = sum_frac - (out.frac if out is not None else sum_frac)
        half = np.where(shift > 0, np.ldexp(1.0, np.maximum(shift - 1, 0)), 0.0)
        over = (total + half > INT32_MAX) | (shift > MAX_SHIFT)
        if bq is not None:
            over |= np.abs(bq) > INT32_MAX
        if not over.any():
            break
        if res is not None and np.any(over & (acc_shift > 0)):
            rounded |= over & (acc_shift > 0)  # keep the weights, round the residual instead
            continue
        step = over if per_channel else np.ones(channels, bool)
        frac = frac - step.astype(np.int64)
        lowered |= step
    else:
        raise DfqError(f"module {m.name}: no weight fraction keeps its accumulator within int32")
    if lowered.any():  # channels, however many steps each took
        qm.facts["narrowed"][m.name] = int(lowered.sum())
    qm.facts["residual_rounded"] += int(rounded.sum())
    lo, hi = clip_limits(act_node) if m.activation in ("Relu", "Relu6", "Clip") else (None, None)
    if out is not None:
        code_min, code_max = code_bounds(lo, hi, out.frac, out.bits, out.unsigned)
    else:
        code_min, code_max = -(1 << 31), INT32_MAX
    q.setflags(write=False)
    return LinearModule(
        name=m.name, op=node.op, input=x, output=out, output_name=m.output, attrs=attrs, axis=axis,
        weight=q, weight_frac=frac, per_channel=per_channel, weight_bits=bits,
        bias=None if bq is None else bq.astype(np.int32), acc_frac=acc_frac, acc_shift=acc_shift.astype(np.int64),
        residual=res, residual_shift=None if rshift is None else rshift.astype(np.int64),
        sum_frac=sum_frac.astype(np.int64), shift=shift.astype(np.int64), code_min=code_min, code_max=code_max,
        activation=m.activation, act_limits=(lo, hi), pre_add=pre_add, acc_bound=int(np.max(total + half)) if total.size else 0,
        integer=integer)


def _linear_attrs(node: gs.Node) -> dict:
    if node.op in ("Conv", "ConvTranspose"):
        nd = np.ndim(node.inputs[1].values) - 2
        a = node.attrs
        return {"strides": [int(v) for v in a.get("strides", [1] * nd)],
                "pads": [int(v) for v in a.get("pads", [0] * 2 * nd)],
                "dilations": [int(v) for v in a.get("dilations", [1] * nd)],
                "group": int(a.get("group", 1)),
                "kernel_shape": list(np.shape(node.inputs[1].values)[2:]),
                "auto_pad": attr_str(node, "auto_pad", "NOTSET"),
                "output_padding": [int(v) for v in a.get("output_padding", [0] * nd)],
                "output_shape": [int(v) for v in a.get("output_shape", [])]}
    if node.op == "Gemm":
        return {"transB": int(node.attrs.get("transB", 0))}
    return {}


def conv_transpose_pads(attrs: dict) -> list[int] | None:
    """The pads of the stride-1 convolution (flipped kernel, input dilated by the stride) that
    computes a ConvTranspose: dilation (kernel - 1) - pad at the begin, and the same + output_padding
    at the end. None where that needs a negative pad, an output_shape or an auto_pad."""
    if attrs.get("output_shape") or attrs["auto_pad"] not in ("NOTSET", "", "VALID"):
        return None
    k, d, p, op = attrs["kernel_shape"], attrs["dilations"], attrs["pads"], attrs["output_padding"]
    nd = len(k)
    if attrs["auto_pad"] == "VALID":
        p = [0] * 2 * nd
    pads = [d[i] * (k[i] - 1) - p[i] for i in range(nd)] + [d[i] * (k[i] - 1) - p[nd + i] + op[i] for i in range(nd)]
    return pads if min(pads) >= 0 else None


# A MatMul of two activations or a Softmax over a dim known only at run time: the int32 sums are
# proven for dims of up to this many elements.
DYNAMIC_WIDTH_MAX = 1 << 15
ADD_ALIGN_MAX = 22  # an Add aligns its operands by left shifts of at most this many bits (8-bit codes stay in int32)


def table_entries(m, nodes: dict, x: QTensor, out: QTensor) -> np.ndarray:
    """(channels or 1, 2^bits) codes of a table module: its float function (functions.py, float64)
    at every input code's value, rounded half to even at the output's fraction and clamped to its
    code range (NaN becomes 0)."""
    from .passes.form_modules import chain_spec  # (passes import this module)
    lo, hi = x.code_range
    v = np.ldexp(np.arange(lo, hi + 1, dtype=np.float64), -x.frac)[:, None]
    y = functions.evaluate(chain_spec([nodes[n] for n in m.nodes]), m.input, v)[m.output]
    y = np.broadcast_to(y, (v.shape[0], y.shape[1] if y.ndim == 2 else 1))
    y = np.where(np.isnan(y), 0.0, np.clip(y, -2.0 ** 62, 2.0 ** 62))
    return quantize(y, out.frac, out.bits, out.unsigned).T.astype(np.int16)


def _table(m, nodes: dict, qm: QuantizedModel) -> TableModule:
    x, out = qm.tensor(m.input), qm.tensor(m.output)
    table = table_entries(m, nodes, x, out)
    table.setflags(write=False)
    return TableModule(m.name, m.op, x, out, m.output, table, m.channel_axis if table.shape[0] > 1 else None,
                       x.bits == 8 and out.bits == 8)


def _binary(m, tmap, qm: QuantizedModel) -> BinaryModule:
    a, b, out = qm.tensor(m.input), qm.tensor(m.other), qm.tensor(m.output)
    ma, mb = a.max_abs_code, b.max_abs_code
    ka = kb = 0
    if m.op in ("Mul", "MatMul"):
        frac = a.frac + b.frac
        k = tmap[m.input].shape[-1] if m.op == "MatMul" and tmap[m.input].shape else None
        terms = ma * mb * (k if isinstance(k, int) and k > 0 else DYNAMIC_WIDTH_MAX if m.op == "MatMul" else 1)
    else:  # align to the finer fraction by left shifts; round the finer operand where that would not fit
        frac = min(max(a.frac, b.frac), min(a.frac, b.frac) + ADD_ALIGN_MAX)
        # an operand more than MAX_SHIFT bits finer rounds to 0 whatever the shift: its codes are
        # below 2^16 < 2^(MAX_SHIFT - 1), so a right shift of MAX_SHIFT computes the same zeros
        ka, kb = max(frac - a.frac, -MAX_SHIFT), max(frac - b.frac, -MAX_SHIFT)
        terms = (ma << max(ka, 0)) + (mb << max(kb, 0))
    shift = frac - out.frac
    if shift > MAX_SHIFT and terms < 1 << (MAX_SHIFT - 1):
        shift = MAX_SHIFT  # every sum rounds to 0 either way
    bound = terms + ((1 << (shift - 1)) if shift > 0 else 0)
    lo, hi = out.code_range
    return BinaryModule(m.name, m.op, a, out, m.output, b, ka, kb, shift, lo, hi, bound,
                        bound <= INT32_MAX and -MAX_SHIFT <= shift <= MAX_SHIFT and max(a.bits, b.bits, out.bits) == 8)


def _layer_norm(m, node: gs.Node, tmap, qm: QuantizedModel) -> LayerNormModule:
    x, out = qm.tensor(m.input), qm.tensor(m.output)
    n = layer_norm_width(node)
    gamma = np.broadcast_to(np.asarray(node.inputs[1].values, np.float64).reshape(-1), (n,))
    has_beta = len(node.inputs) > 2 and node.inputs[2].name
    beta = np.broadcast_to(np.asarray(node.inputs[2].values, np.float64).reshape(-1), (n,)) if has_beta else np.zeros(n)
    eps = float(node.attrs.get("epsilon", 1e-5))
    span = x.code_range[1] - x.code_range[0]  # |x - mean| <= span
    mean_bits = max(0, (30 - (n * span * span).bit_length()) // 2)
    dmax = span << mean_bits
    eps_code = int(np.rint(np.ldexp(eps * n, 2 * (x.frac + mean_bits))))
    g = gamma * np.sqrt(n) * 2.0 ** out.frac
    top = float(np.max(np.abs(g))) if n else 0.0
    k = max(0, 30 - dmax.bit_length() - int(np.ceil(np.log2(top)))) if top > 0 else 0
    gain = np.rint(np.ldexp(g, k)).astype(np.int64)
    offset = np.clip(np.rint(np.ldexp(beta, out.frac + k)), -(1 << 40), 1 << 40).astype(np.int64)
    lo, hi = out.code_range
    quotient = dmax * int(np.max(np.abs(gain), initial=0))  # |d gain|; divided by sd >= 1
    bound = max(n * dmax * dmax + eps_code, quotient + int(np.max(np.abs(offset), initial=0)) + (1 << k))
    integer = x.bits == 8 and out.bits == 8 and bound <= INT32_MAX and k <= MAX_SHIFT
    return LayerNormModule(m.name, m.op, x, out, m.output, n, mean_bits, eps_code, gain, k, offset, lo, hi, bound,
                           integer)


def _softmax(m, tmap, qm: QuantizedModel) -> SoftmaxModule:
    x, out = qm.tensor(m.input), qm.tensor(m.output)
    n = tmap[m.input].shape[-1]
    n = n if isinstance(n, int) and n > 0 else DYNAMIC_WIDTH_MAX
    p = min(15, 30 - max(out.frac, 0))  # the same for a static and a dynamic width
    span = x.code_range[1] - x.code_range[0] + 1
    e = np.rint(np.ldexp(np.exp(-np.ldexp(np.arange(span, dtype=np.float64), -x.frac)), p)).astype(np.int64)
    lo, hi = out.code_range
    bound = max(n << p, int(e[0]) << max(out.frac, 0))
    integer = x.bits == 8 and out.bits == 8 and 0 <= out.frac and p >= 8 and bound <= INT32_MAX
    return SoftmaxModule(m.name, m.op, x, out, m.output, e, p, lo, hi, bound, integer)


# A GlobalAveragePool over dynamic spatial dims divides by H*W computed at run time; its int32 sum is
# proven for feature maps of up to this many pixels (2896 x 2896) at 8-bit codes.
DYNAMIC_WINDOW_MAX = 1 << 23


def _pool(m, node: gs.Node, tmap, qm: QuantizedModel) -> PoolModule:
    x = qm.tensor(m.input)
    out = qm.tensor(m.output)
    shape = tmap[m.input].shape
    attrs: dict = {}
    integer = shape is not None and len(shape) in (3, 4) and isinstance(shape[1], int)  # 1-d or 2-d
    if m.op == "GlobalAveragePool":
        spatial = list(shape[2:]) if integer else []
        window = int(np.prod(spatial)) if all(isinstance(d, int) and d > 0 for d in spatial) else None
    else:
        a = node.attrs
        k = [int(v) for v in a["kernel_shape"]]
        auto_pad = attr_str(node, "auto_pad", "NOTSET")
        pads = [int(v) for v in a.get("pads", [0] * 2 * len(k))]
        padded = any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
        # one divisor for every window: no padding, or padding counted; ceil_mode windows may run past it
        integer = integer and (not padded or int(a.get("count_include_pad", 0)) == 1) \
            and not int(a.get("ceil_mode", 0)) and all(int(d) == 1 for d in a.get("dilations", [1] * len(k)))
        window = int(np.prod(k))
        attrs = {"kernel_shape": k, "strides": [int(v) for v in a.get("strides", [1] * len(k))], "pads": pads,
                 "auto_pad": auto_pad}
    if window is None:  # dynamic H*W: the sum and the rounding hold for windows up to DYNAMIC_WINDOW_MAX
        shift = None
        bound = DYNAMIC_WINDOW_MAX * x.max_abs_code + DYNAMIC_WINDOW_MAX // 2
    else:
        shift = window.bit_length() - 1 if window & (window - 1) == 0 else None
        bound = window * x.max_abs_code + ((1 << (shift - 1)) if shift else window // 2)
    if bound > INT32_MAX:
        integer = False
    code_min, code_max = out.code_range
    return PoolModule(m.name, m.op, x, out, m.output, attrs, window, shift, code_min, code_max, bound, integer)
