"""Choose every fractional length: weights per output channel (or per tensor), activations per
tensor group."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..config import U8S8_PAIR_SUM
from ..fixedpoint import activation_fraction, qrange, weight_fractions
from ..graph_utils import out_channel_axis
from ..quantized import CHUNK_ELEMENTS, channel_fractions, channel_slices, weight_codes
from .calibrate import TensorStats
from .form_modules import Plan


@dataclass
class Exponents:
    act: dict[str, int]          # requantized tensor -> fraction (pass-through tensors: see act_of)
    weight: dict[str, np.ndarray]  # linear module name -> fraction per output channel (or 1)
    plan: Plan
    weight_bits: dict[str, int] = field(default_factory=dict)  # linear module name -> weight bits
    act_bits: dict[str, int] = field(default_factory=dict)     # requantized tensor -> code bits (8 if absent)
    grid: dict[str, np.ndarray] = field(default_factory=dict)  # linear module name -> its weight already on its
    #                                                            grid (passes/round_weights.py), quantized instead
    limit: dict[str, np.ndarray] = field(default_factory=dict)  # linear module name -> largest |code| per output
    #                                                             channel (guard_saturation's clamped channels)

    def act_of(self, tensor: str) -> int:
        return self.act[self.plan.source(tensor)]

    def bits_of(self, tensor: str) -> int:
        """Code bits of a quantized tensor (a pass-through output: its source's)."""
        return self.act_bits.get(self.plan.source(tensor), 8)


def choose_exponents(graph: gs.Graph, plan: Plan, stats: dict[str, TensorStats], *, weight_bits: int,
                     act_bits: int, per_channel: bool, method: str,
                     module_weight_bits: dict[str, int] | None = None,
                     module_act_bits: dict[str, int] | None = None) -> Exponents:
    """Fractions for every requantized tensor and every linear weight, each linear module's
    weight bits (module_weight_bits[name], else weight_bits) and each requantized tensor's code
    bits (module_act_bits[tensor], else act_bits; the widest in a group, for the whole group).

    Guarantees: tensors of one group (Concat inputs, a pooling op's input and output) get the same
    fraction, chosen from their merged statistics; an unsigned tensor's range is [0, 2^b - 1];
    per-channel weight fractions have one entry per output channel.
    """
    groups: dict[str, TensorStats] = {}
    for t in plan.requant:
        g = plan.group(t)
        groups[g] = groups[g].merge(stats[t]) if g in groups else stats[t]
    group_bits: dict[str, int] = {}
    for t in plan.requant:
        g = plan.group(t)
        group_bits[g] = max(group_bits.get(g, 0), (module_act_bits or {}).get(t, act_bits))
    act, abits = {}, {}
    for t in plan.requant:
        s = groups[plan.group(t)]
        abits[t] = group_bits[plan.group(t)]
        act[t] = activation_fraction(s.hist, s.max_abs, abits[t], t in plan.unsigned, method)
    nodes = {n.name: n for n in graph.nodes}
    weight, bits = {}, {}
    for m in plan.modules:
        if m.kind != "linear":
            continue
        node = nodes[m.name]
        w = np.asarray(node.inputs[1].values)
        bits[m.name] = (module_weight_bits or {}).get(m.name, weight_bits)
        weight[m.name] = _weight_fractions(w, out_channel_axis(node) if per_channel else None, bits[m.name], method)
    return Exponents(act, weight, plan, bits, abits)


def _weight_fractions(w: np.ndarray, axis: int | None, bits: int, method: str) -> np.ndarray:
    """fixedpoint.weight_fractions, computed a slice of output channels at a time when per channel
    (each channel's fraction depends on that channel alone, so the result is the same): its
    float64 temporaries stay small whatever the weight's size."""
    if axis is None or w.size <= CHUNK_ELEMENTS:
        return weight_fractions(w, axis, bits, method)
    return np.concatenate(channel_slices(lambda part, a, b: weight_fractions(part, axis, bits, method), w, axis))


def guard_saturation(graph: gs.Graph, exps: Exponents, per_channel: bool) -> tuple[Exponents, dict[str, int]]:
    """Exponents under which no weight pair can saturate onnxruntime's x86 u8 x s8 kernels
    without VNNI, and per module the number of output channels that needed it.

    Those kernels (vpmaddubsw) multiply u8 activation codes (0..255; signed codes are shifted to
    u8) by s8 weight codes and add each two adjacent products in int16, saturating. Which weights
    end up adjacent depends on the kernel's packing, so any two weights of an output channel may
    pair: the channel is safe for every input iff its two largest positive codes, and its two
    most negative ones, add up to at most U8S8_PAIR_SUM in magnitude (255 x 128 <= 32767).
    Guarantees: a channel that is unsafe at its chosen fraction has the fraction lowered by one
    (its codes halve) until it is safe, or (per channel, where that loses less: _clamp_where_better)
    keeps its fraction with its codes clamped to +-64 (Exponents.limit); every other channel, and every activation fraction, is unchanged. A per-tensor
    weight is lowered as a whole. Quantization is monotone, so the four extreme weights of a
    channel decide which channels are unsafe."""
    nodes = {n.name: n for n in graph.nodes}
    weight, guarded, limits = dict(exps.weight), {}, dict(exps.limit)
    for name, frac in exps.weight.items():
        node = nodes[name]
        w = np.asarray(node.inputs[1].values)
        fr, axis = channel_fractions(node, frac, per_channel)
        ext = _channel_extremes(w, axis)
        lowered = np.zeros(len(fr), dtype=bool)
        while True:
            c = weight_codes(ext, fr, exps.weight_bits[name], 1).astype(np.int64)
            pos = np.maximum(c[0], 0) + np.maximum(c[1], 0)
            neg = np.minimum(c[2], 0) + np.minimum(c[3], 0)
            risky = (pos > U8S8_PAIR_SUM) | (neg < -U8S8_PAIR_SUM)
            if not risky.any():
                break
            if not per_channel:
                risky[:] = True
            fr = fr - risky
            lowered |= risky
        if lowered.any():
            if per_channel:
                fr, lim = _clamp_where_better(w, axis, np.asarray(channel_fractions(node, frac, True)[0]), fr, lowered,
                                              exps.weight_bits[name])
                if lim is not None:
                    limits[name] = lim
            weight[name] = fr if per_channel else fr[:1].copy()
            guarded[name] = int(lowered.sum()) if per_channel else len(fr)
    return replace(exps, weight=weight, limit=limits), guarded


def _clamp_where_better(w: np.ndarray, axis: int, f0: np.ndarray, fr: np.ndarray, lowered: np.ndarray,
                        bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Per guarded channel: its lowered fraction (fr), or its own fraction f0 with codes clamped to
    +-U8S8_PAIR_SUM / 2 (then any two add up to at most U8S8_PAIR_SUM), whichever has the smaller
    squared weight error. Returns (fractions, code limit per channel, or None if none is clamped).
    Only guarded channels are quantized, a few at a time (small temporaries)."""
    lim = U8S8_PAIR_SUM // 2
    idx = np.flatnonzero(lowered)
    per = max(1, CHUNK_ELEMENTS // max(1, w.size // w.shape[axis]))
    better = np.zeros(len(fr), bool)
    for a in range(0, len(idx), per):
        ch = idx[a:a + per]
        wm = np.moveaxis(np.take(w, ch, axis=axis), axis, 0).reshape(len(ch), -1).astype(np.float64)
        low = np.ldexp(weight_codes(wm, fr[ch], bits, 0).astype(np.float64), -fr[ch][:, None])
        clamped = np.ldexp(weight_codes(wm, f0[ch], bits, 0, np.full(len(ch), lim)).astype(np.float64), -f0[ch][:, None])
        better[ch] = ((wm - clamped) ** 2).sum(1) < ((wm - low) ** 2).sum(1)
    if not better.any():
        return fr, None
    return np.where(better, f0, fr), np.where(better, lim, -qrange(bits)[0]).astype(np.int64)


def _channel_extremes(w: np.ndarray, axis: int) -> np.ndarray:
    """[4, C]: per output channel its largest, second largest, smallest and second smallest
    weight (0 where the channel has a single weight), computed a slice of channels at a time."""
    def part(sl: np.ndarray, a: int, b: int) -> np.ndarray:
        x = np.moveaxis(sl, axis, 0).reshape(b - a, -1)
        if x.shape[1] < 2:
            x = np.concatenate([x, np.zeros((b - a, 2 - x.shape[1]), x.dtype)], axis=1)
        hi = np.partition(x, x.shape[1] - 2, axis=1)[:, -2:]
        lo = np.partition(x, 1, axis=1)[:, :2]
        return np.stack([hi[:, 1], hi[:, 0], lo[:, 0], lo[:, 1]])

    return np.concatenate(channel_slices(part, w, axis), axis=1)
