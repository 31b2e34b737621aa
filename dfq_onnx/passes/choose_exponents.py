"""Choose every fractional length: weights per output channel (or per tensor), activations per
tensor group."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..config import U8S8_PAIR_SUM
from ..fixedpoint import activation_fraction, pair_sums_exceed, weight_fractions
from ..graph_utils import out_channel_axis
from ..quantized import CHUNK_ELEMENTS, channel_fractions, channel_slices, int16_pairs, kernel_rows, weight_codes
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
    u8) by s8 weight codes and add products in int16 pairs, saturating: the pairs are elements
    (2i, 2i+1) of each output channel's weights in the order the kernels reduce over
    (quantized.kernel_rows: a Conv's taps with input channels fastest, a matrix's input
    dimension). A channel is safe for every input iff no such pair holds two same-sign codes
    adding up past U8S8_PAIR_SUM (255 x 128 <= 32767). Depthwise convolutions are never paired
    (quantized.int16_pairs); where the packing is not known, any two weights of a channel may
    pair. Guarantees: a channel that is unsafe at its chosen fraction has the fraction lowered by
    one (its codes halve) until it is safe; every other channel, and every activation fraction, is
    unchanged. A per-tensor weight is lowered as a whole."""
    nodes = {n.name: n for n in graph.nodes}
    weight, guarded = dict(exps.weight), {}
    for name, frac in exps.weight.items():
        node = nodes[name]
        pairs = int16_pairs(node)
        if pairs is False:
            continue
        w = np.asarray(node.inputs[1].values)
        fr, axis = channel_fractions(node, frac, per_channel)
        bits = exps.weight_bits[name]
        if pairs is None:  # any two weights may pair: the four extremes of a channel decide
            ext = _channel_extremes(w, axis)

            def risky_of(channels: np.ndarray) -> np.ndarray:
                return pair_sums_exceed(weight_codes(ext[:, channels], fr[channels], bits, 1).T, U8S8_PAIR_SUM,
                                        adjacent=False)
        else:
            def risky_of(channels: np.ndarray) -> np.ndarray:
                part = np.take(w, channels, axis=axis)
                return pair_sums_exceed(kernel_rows(node, weight_codes(part, fr[channels], bits, axis)), U8S8_PAIR_SUM)

        lowered = np.zeros(len(fr), dtype=bool)
        todo = np.arange(len(fr))
        step = max(1, CHUNK_ELEMENTS // max(1, w.size // len(fr)))  # channels quantized at once
        while len(todo):
            risky = np.concatenate([risky_of(todo[a:a + step]) for a in range(0, len(todo), step)])
            if not risky.any():
                break
            if not per_channel:
                risky[:] = True
            todo = todo[risky]
            fr[todo] -= 1
            lowered[todo] = True
        if lowered.any():
            weight[name] = fr if per_channel else fr[:1].copy()
            guarded[name] = int(lowered.sum()) if per_channel else len(fr)
    return replace(exps, weight=weight), guarded


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
