"""Choose every fractional length: weights per output channel (or per tensor), activations per
tensor group."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..config import U8S8_SAFE_CODE
from ..fixedpoint import activation_fraction, weight_fractions
from ..graph_utils import out_channel_axis
from ..quantized import node_weight_codes
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
        weight[m.name] = weight_fractions(w, out_channel_axis(node) if per_channel else None, bits[m.name], method)
    return Exponents(act, weight, plan, bits, abits)


def saturation_risks(graph: gs.Graph, exps: Exponents, per_channel: bool) -> list[str]:
    """Linear modules whose weight codes could saturate the int16 sum of a u8 x s8 pair in
    onnxruntime's x86 kernels without VNNI (vpmaddubsw): some |code| above U8S8_SAFE_CODE, so that
    two adjacent products with 8-bit activation codes (up to 255, signed ones are shifted to u8)
    can exceed 32767. 7-bit codes (|w| <= 64) cannot."""
    nodes = {n.name: n for n in graph.nodes}
    risky = []
    for name, fw in exps.weight.items():
        codes = node_weight_codes(nodes[name], fw, exps.weight_bits[name], per_channel)[0]
        if np.abs(codes.astype(np.int64)).max() > U8S8_SAFE_CODE:
            risky.append(name)
    return risky
