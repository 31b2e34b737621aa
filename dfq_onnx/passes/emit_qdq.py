"""Write the quantized model as a QDQ graph with power-of-two scales."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..fixedpoint import code_bounds, pow2_scale, qrange, quantize
from ..graph_utils import bias_of, clip_limits, new_name, out_channel_axis
from .choose_exponents import Exponents
from .form_modules import Plan

INT32 = (-(1 << 31), (1 << 31) - 1)


CODE_DTYPES = {(8, False): np.int8, (8, True): np.uint8, (16, False): np.int16, (16, True): np.uint16}
INT16_QDQ_OPSET = 21  # QuantizeLinear/DequantizeLinear with int16/uint16 codes


def emit_qdq(graph: gs.Graph, plan: Plan, exps: Exponents, *, per_channel: bool) -> tuple[gs.Graph, dict, list]:
    """Return a copy with QuantizeLinear/DequantizeLinear inserted, facts for the report, and an
    empty list (the integer emitter returns module parameters there).

    Guarantees: every linear module's weight is an int8 initializer behind a DequantizeLinear
    (per output channel with `axis`, or per tensor), its bias an int32 initializer at exactly
    2^-(f_x + f_w[c]); every requantized tensor of the plan gets one QuantizeLinear ->
    DequantizeLinear pair; outputs of pass-through ops get a lossless pair at their input's scale
    (so onnxruntime can keep them in int8); every scale is an exact power of two in float32 and
    every zero point is 0. A module's activation runs on the integer codes after its QuantizeLinear,
    so onnxruntime can fuse DQ -> Conv -> Q into QLinearConv: a Relu whose output is unsigned is
    dropped (the uint8 clamp of QuantizeLinear computes it), a Clip/Relu6 becomes a Clip of the
    codes to [round(lo 2^f), round(hi 2^f)] -- exact, because rounding is monotone. Graph input and
    output names are unchanged.
    """
    g = graph.copy()
    g.__dict__.pop("_dfq_used_names", None)
    nodes = {n.name: n for n in g.nodes}
    tmap = g.tensors()
    facts = {"bias_saturated": 0, "relu_dropped": 0, "clip_on_codes": 0}
    consts: dict[tuple, gs.Constant] = {}

    def const(kind: str, value: np.ndarray) -> gs.Constant:
        key = (kind, value.dtype.str, value.shape, value.tobytes())
        if key not in consts:
            consts[key] = gs.Constant(new_name(g, kind), value)
        return consts[key]

    def dq_weight(name: str, q: np.ndarray, scale: np.ndarray, axis: int | None) -> gs.Variable:
        zp = np.zeros(scale.shape, dtype=q.dtype)
        out = gs.Variable(new_name(g, f"{name}_dq"), dtype=np.float32, shape=list(q.shape))
        attrs = {"axis": int(axis)} if axis is not None and scale.ndim == 1 else {}
        g.nodes.append(gs.Node("DequantizeLinear", new_name(g, f"{name}_DequantizeLinear"), attrs,
                               [gs.Constant(new_name(g, f"{name}_quantized"), q),
                                gs.Constant(new_name(g, f"{name}_scale"), scale),
                                gs.Constant(new_name(g, f"{name}_zero_point"), zp)], [out]))
        return out

    # 1. weights and biases of linear modules
    for m in plan.modules:
        if m.kind != "linear":
            continue
        node = nodes[m.name]
        w = np.asarray(node.inputs[1].values)
        fw = exps.weight[m.name]
        axis = out_channel_axis(node) if per_channel else None
        fw_arg = fw if per_channel else fw[0]
        wq = quantize(w, fw_arg, exps.weight_bits[m.name], axis=axis).astype(np.int8)
        node.inputs[1] = dq_weight(node.inputs[1].name, wq, pow2_scale(fw_arg), axis)
        fx = exps.act_of(m.input)
        b = bias_of(node)
        slot = None
        if b is not None:
            slot = (node, 2)
        elif m.bias_add is not None:
            add = nodes[m.bias_add]
            k = 1 if isinstance(add.inputs[1], gs.Constant) else 0
            b, slot = add.inputs[k], (add, k)
        if b is not None:
            fb = fx + fw_arg
            bv = np.asarray(b.values, dtype=np.float64).reshape(-1)
            if np.ndim(fb) == 1 and bv.size == 1:
                bv = np.full(len(fb), bv[0])
            raw = np.rint(np.ldexp(bv, np.asarray(fb, dtype=np.int64)))
            facts["bias_saturated"] += int(np.sum((raw < INT32[0]) | (raw > INT32[1])))
            bq = np.clip(raw, *INT32).astype(np.int32)
            dq = dq_weight(b.name, bq, pow2_scale(fb), 0)
            slot[0].inputs[slot[1]] = dq
            if m.bias_add is not None and np.asarray(b.values).ndim != 1:
                dq.shape = list(bq.shape)

    # 2. activations: one Q/DQ pair per requantized tensor, lossless pairs after pass-throughs
    order = {}
    for i, n in enumerate(g.nodes):
        for t in n.outputs:
            order[t.name] = i
    for t in g.inputs:
        order[t.name] = -1
    todo = sorted(set(plan.requant) | set(plan.passthrough), key=lambda n: order.get(n, 0))
    out_ids = {id(t) for t in g.outputs}
    module_act = {m.output: nodes[m.nodes[-1]] for m in plan.modules if m.activation in ("Relu", "Relu6", "Clip")}
    for name in todo:
        t = tmap[name]
        f = exps.act_of(name)
        unsigned = plan.source(name) in plan.unsigned
        act_bits = exps.bits_of(name)
        zp_dtype = CODE_DTYPES[(act_bits, unsigned)]
        scale = const("act_scale", pow2_scale(f).reshape(()))
        zp = const("act_zero_point", np.zeros((), dtype=zp_dtype))
        readers = list(t.outputs)
        q_in = t
        act = module_act.get(name) if name in plan.requant else None
        code_clip = None
        if act is not None and act_bits == 8 and (act.op == "Clip" or unsigned):  # 16-bit: it stays float
            q_in = act.inputs[0]
            if act.op == "Clip":
                code_clip = code_bounds(*clip_limits(act), f, act_bits, unsigned)
                if code_clip == qrange(act_bits, unsigned):
                    code_clip = None  # the code range is narrower than the clip: QuantizeLinear does it
                else:
                    facts["clip_on_codes"] += 1
            else:
                facts["relu_dropped"] += 1
            act.inputs.clear()
            act.outputs.clear()
        q_out = gs.Variable(new_name(g, f"{name}_quantized"), dtype=zp_dtype, shape=t.shape)
        dq_out = gs.Variable(new_name(g, f"{name}_dequantized"), dtype=np.float32, shape=t.shape)
        g.nodes.append(gs.Node("QuantizeLinear", new_name(g, f"{name}_QuantizeLinear"), {},
                               [q_in, scale, zp], [q_out]))
        if code_clip is not None:
            clipped = gs.Variable(new_name(g, f"{name}_clipped"), dtype=zp_dtype, shape=t.shape)
            g.nodes.append(gs.Node("Clip", new_name(g, f"{name}_Clip"), {},
                                   [q_out, const("code_min", np.array(code_clip[0], dtype=zp_dtype)),
                                    const("code_max", np.array(code_clip[1], dtype=zp_dtype))], [clipped]))
            q_out = clipped
        g.nodes.append(gs.Node("DequantizeLinear", new_name(g, f"{name}_DequantizeLinear"), {},
                               [q_out, scale, zp], [dq_out]))
        for r in readers:
            for k, x in enumerate(r.inputs):
                if x is t:
                    r.inputs[k] = dq_out
        if id(t) in out_ids:
            idx = [id(o) for o in g.outputs].index(id(t))
            t.name, dq_out.name = dq_out.name, name
            g.outputs[idx] = dq_out
            out_ids = {id(o) for o in g.outputs}
    g.cleanup()
    g.toposort()
    return g, facts, []

