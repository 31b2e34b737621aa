"""Choose every fractional length: weights per output channel (or per tensor), activations per
tensor group."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..config import U8S8_SAFE_CODE
from ..fixedpoint import activation_fraction, weight_fractions
from ..graph_utils import out_channel_axis
from ..quantized import channel_fractions, in_slices, weight_codes
from .calibrate import TensorStats
from .form_modules import Plan


@dataclass
class Exponents:
    act: dict[str, int]          # requantized tensor -> fraction (pass-through tensors: see act_of)
    weight: dict[str, np.ndarray]  # linear module name -> fraction per output channel (or 1)
    plan: Plan
    weight_bits: dict[str, int] = field(default_factory=dict)  # linear module name -> weight bits
    act_bits: dict[str, int] = field(default_factory=dict)     # requantized tensor -> code bits (8 if absent)

    def act_of(self, tensor: str) -> int:
        return self.act[self.plan.source(tensor)]

    def bits_of(self, tensor: str) -> int:
        """Code bits of a quantized tensor (a pass-through output: its source's)."""
        return self.act_bits.get(self.plan.source(tensor), 8)


def choose_exponents(graph: gs.Graph, plan: Plan, stats: dict[str, TensorStats], *, weight_bits: int,
                     act_bits: int, per_channel: bool, method: str,
                     module_weight_bits: dict[str, int] | None = None,
                     module_act_bits: dict[str, int] | None = None, cache: dict | None = None) -> Exponents:
    """Fractions for every requantized tensor and every linear weight, each linear module's
    weight bits (module_weight_bits[name], else weight_bits) and each requantized tensor's code
    bits (module_act_bits[tensor], else act_bits; the widest in a group, for the whole group).

    Guarantees: tensors of one group (Concat inputs, a pooling op's input and output) get the same
    fraction, chosen from their merged statistics; an unsigned tensor's range is [0, 2^b - 1];
    per-channel weight fractions have one entry per output channel. cache: a dict kept between
    calls on the same graph; a module's weight fractions are reused while its weight array and
    bits are the same (the saturation guard re-chooses with 7 bits for a few modules only).
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
        key = (m.name, bits[m.name], per_channel, method)
        if cache is not None and key in cache and cache[key][0] is w:
            weight[m.name] = cache[key][1]
            continue
        weight[m.name] = _weight_fractions(w, out_channel_axis(node) if per_channel else None, bits[m.name], method)
        if cache is not None:
            cache[key] = (w, weight[m.name])
    return Exponents(act, weight, plan, bits, abits)


CHUNK_ELEMENTS = 1 << 20  # per-channel weights are searched in slices of channels of about this size


def _weight_fractions(w: np.ndarray, axis: int | None, bits: int, method: str) -> np.ndarray:
    """fixedpoint.weight_fractions, computed a slice of output channels at a time when per channel
    (each channel's fraction depends on that channel alone, so the result is the same): its
    float64 temporaries stay small whatever the weight's size."""
    if axis is None or w.size <= CHUNK_ELEMENTS:
        return weight_fractions(w, axis, bits, method)
    channels = w.shape[axis]

    def part(a: int, b: int) -> np.ndarray:
        index = [slice(None)] * w.ndim
        index[axis] = slice(a, b)
        return weight_fractions(w[tuple(index)], axis, bits, method)

    return np.concatenate(in_slices(part, channels, max(1, CHUNK_ELEMENTS // max(1, w.size // channels))))


def certain_saturation_risks(graph: gs.Graph, plan: Plan, *, weight_bits: int, per_channel: bool,
                             module_weight_bits: dict[str, int] | None = None) -> list[str]:
    """Linear modules that saturation_risks will name whatever fractions choose_exponents picks:
    both methods pick f >= f0 = the largest fraction that does not clip ("max"), and |code| only
    grows with f (and is clipped at the top code), so a channel whose extreme weights already have
    a code above U8S8_SAFE_CODE at f0 has one at the chosen f too. Costs a max per channel, not the
    four-candidate error search; the others must be decided on the chosen fractions."""
    nodes = {n.name: n for n in graph.nodes}
    sure = []
    for m in plan.modules:
        if m.kind != "linear":
            continue
        node = nodes[m.name]
        bits = (module_weight_bits or {}).get(m.name, weight_bits)
        w = np.asarray(node.inputs[1].values)
        f0 = _weight_fractions(w, out_channel_axis(node) if per_channel else None, bits, "max")
        if _max_abs_code(node, w, f0, bits, per_channel) > U8S8_SAFE_CODE:
            sure.append(m.name)
    return sure


def _max_abs_code(node: gs.Node, w: np.ndarray, frac, bits: int, per_channel: bool) -> int:
    """max |code| of a weight at `frac`: quantization is monotone in the value, so a channel's
    extreme codes are the codes of its largest and smallest weights (2 x C values, not the tensor)."""
    fr, axis = channel_fractions(node, frac, per_channel)
    others = tuple(i for i in range(w.ndim) if i != axis)
    ends = np.stack([w.max(axis=others), w.min(axis=others)])
    return int(np.abs(weight_codes(ends, fr, bits, 1).astype(np.int64)).max())


def saturation_risks(graph: gs.Graph, exps: Exponents, per_channel: bool) -> list[str]:
    """Linear modules whose weight codes could saturate the int16 sum of a u8 x s8 pair in
    onnxruntime's x86 kernels without VNNI (vpmaddubsw): some |code| above U8S8_SAFE_CODE, so that
    two adjacent products with 8-bit activation codes (up to 255, signed ones are shifted to u8)
    can exceed 32767. 7-bit codes (|w| <= 64) cannot."""
    nodes = {n.name: n for n in graph.nodes}
    risky = []
    for name, fw in exps.weight.items():
        node = nodes[name]
        if _max_abs_code(node, np.asarray(node.inputs[1].values), fw, exps.weight_bits[name], per_channel) > U8S8_SAFE_CODE:
            risky.append(name)
    return risky
