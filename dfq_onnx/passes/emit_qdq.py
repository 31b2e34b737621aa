"""Write the quantized model as a QDQ graph with power-of-two scales."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..fixedpoint import pow2_scale, qrange
from ..graph_utils import bias_of, new_name
from ..quantized import LinearModule, QuantizedModel


CODE_DTYPES = {(8, False): np.int8, (8, True): np.uint8, (16, False): np.int16, (16, True): np.uint16}
INT16_QDQ_OPSET = 21
PRELU_SPLIT_MIN_PIXELS = 1024  # prelu_split: feature maps of at least this many pixels per channel (or unknown)  # QuantizeLinear/DequantizeLinear with int16/uint16 codes


def _dims_equal(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x == y and (isinstance(x, (int, np.integer)) or (isinstance(x, str) and x)) for x, y in zip(a, b))


def _large_map(shape) -> bool:
    """A 4-D feature map of at least PRELU_SPLIT_MIN_PIXELS pixels per channel, or of unknown size."""
    if shape is None or len(shape) != 4:
        return False
    h, w = shape[2:]
    return not all(isinstance(d, (int, np.integer)) and d > 0 for d in (h, w)) or h * w >= PRELU_SPLIT_MIN_PIXELS


def channel_shuffles(g: gs.Graph) -> list[tuple[gs.Node, gs.Node, gs.Node, np.ndarray]]:
    """Channel shuffles of g: Reshape x [N,C,H,W] -> [N,G,C/G,...] -> Transpose(0,2,1,3,4) ->
    Reshape back to x's shape, the two inner tensors read by nothing else. Each with the channel
    permutation it makes: output channel k is input channel perm[k] (a Gather on axis 1)."""
    outs = {id(t) for t in g.outputs}
    found = []
    for tr in g.nodes:
        if tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3, 4] or not tr.inputs:
            continue
        y1, y2 = tr.inputs[0], tr.outputs[0]
        if len(y1.inputs) != 1 or len(y1.outputs) != 1 or len(y2.outputs) != 1 or {id(y1), id(y2)} & outs:
            continue
        a, b = y1.inputs[0], y2.outputs[0]
        if a.op != "Reshape" or b.op != "Reshape" or len(b.outputs) != 1:
            continue
        x, y = a.inputs[0], b.outputs[0]
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], (int, np.integer)) \
                or y1.shape is None or len(y1.shape) != 5 or not _dims_equal(x.shape, y.shape) \
                or not _dims_equal(x.shape[:1], y1.shape[:1]):
            continue
        groups, per_group = y1.shape[1], y1.shape[2]
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (groups, per_group)) \
                or groups * per_group != x.shape[1]:
            continue
        perm = np.arange(x.shape[1], dtype=np.int64).reshape(groups, per_group).T.reshape(-1)
        found.append((a, tr, b, perm))
    return found


def emit_qdq(graph: gs.Graph, qm: QuantizedModel, signed_as_uint8: bool = False,
             shuffle_as_gather: bool = False, prelu_split: bool = False) -> tuple[gs.Graph, dict, dict[str, str]]:
    """Return a copy of `graph` with the quantized model `qm` (quantized.py) written as
    QuantizeLinear/DequantizeLinear pairs, facts for the report, and a symbol table: requantized
    or pass-through tensor name -> the tensor holding its integer codes (after a code Clip).

    Guarantees: every linear module's weight is its int8 codes behind a DequantizeLinear (per
    output channel with `axis`, or per tensor), its bias its int32 codes at exactly
    2^-(f_x + f_w[c]); every requantized tensor of the plan gets one QuantizeLinear ->
    DequantizeLinear pair at its IR fraction; outputs of pass-through ops get a lossless pair at
    their input's scale (so onnxruntime can keep them in int8); every scale is an exact power of
    two in float32 and every zero point is 0. A module's 8-bit activation runs on the integer codes
    after its QuantizeLinear, so onnxruntime can fuse DQ -> Conv -> Q into QLinearConv: a Relu
    whose output is unsigned is dropped (the uint8 clamp of QuantizeLinear computes it), any other
    Relu/Relu6/Clip becomes a Clip of the codes to the IR's [code_min, code_max] (exact, because
    rounding is monotone). Nothing is quantized here: every code comes from `qm`. Graph input and
    output names are unchanged.

    signed_as_uint8: write each signed 8-bit activation as uint8 with zero point 128 (code + 128):
    the same values on the same power-of-two grid, stored the way onnxruntime's CPU kernels take
    them (they fuse DQ -> Conv -> Q into QLinearConv only when input and output are both uint8;
    a signed tensor next to an unsigned one left the convolution in float). Unsigned tensors keep
    zero point 0. The symbol table then points at the offset codes.

    shuffle_as_gather: write each channel shuffle of codes (channel_shuffles: Reshape -> Transpose
    -> Reshape) as one Gather on axis 1 of the input's codes with the constant channel permutation,
    its output dequantized at the same scale: the same codes in the same places (exact, no
    QuantizeLinear). onnxruntime ran the shuffle's 5-D Transpose on uint8 and, in its NHWC layout,
    a second Transpose back (ShuffleNet: 1.6x the float model's time; 0.75x with the Gather, one
    thread). The two inner tensors of the shuffle then have no Q/DQ pair and no symbol.

    prelu_split: write each PRelu between a DequantizeLinear and a QuantizeLinear (a PRelu table
    of codes, which onnxruntime runs in float) as Relu(x) + Min(x, 0) * slope: the same float
    values for every x (x > 0: x + 0; otherwise 0 + x * slope, one rounding as in PRelu; a zero's
    sign is lost in QuantizeLinear), so the same codes. onnxruntime's NHWC layout gives PRelu a
    [1,1,1,C] slope, and its PRelu kernel broadcast that in spans of C: 70 % of MTCNN P-Net's time
    (1.34x the float model; 1.02x split, one thread); its Mul broadcasts the same slope fast.
    Only on 4-D maps of PRELU_SPLIT_MIN_PIXELS pixels or more (or of unknown size): on small maps
    the three extra ops cost more than the broadcast (MTCNN R-Net, 22x22 and smaller, 2-D after
    its Gemm: 0.965x unsplit, 1.005x all split; O-Net, 46x46: 0.80x -> 0.68x split).
    """
    plan = qm.plan
    g = graph.copy()
    g.__dict__.pop("_dfq_used_names", None)
    nodes = {n.name: n for n in g.nodes}
    facts = {"relu_dropped": 0, "clip_on_codes": 0, "signed_as_uint8": 0, "shuffle_as_gather": 0,
             "prelu_split": 0}
    symbols: dict[str, str] = {}
    consts: dict[tuple, gs.Constant] = {}
    gone: set[str] = set()  # inner tensors of the shuffles written as Gather
    gathers: dict[str, gs.Node] = {}  # shuffle output -> the Gather that moves its input's codes
    coded = set(plan.requant) | set(plan.passthrough)

    def same_grid(a: str, b: str) -> bool:
        ta, tb = qm.tensor(a), qm.tensor(b)
        return (ta.frac, ta.unsigned, ta.bits) == (tb.frac, tb.unsigned, tb.bits)
    for a, tr, b, perm in (channel_shuffles(g) if shuffle_as_gather else []):
        x, y = a.inputs[0], b.outputs[0]
        if not ({x.name, a.outputs[0].name, tr.outputs[0].name, y.name} <= coded and same_grid(x.name, y.name)) \
                or y.name in plan.requant:
            continue  # not a shuffle of codes
        gone |= {a.outputs[0].name, tr.outputs[0].name}
        gathers[y.name] = gather = gs.Node("Gather", new_name(g, f"{b.name}_Gather"), {"axis": 1},
                                           [x, gs.Constant(new_name(g, f"{b.name}_permutation"), perm)], [y])
        at = next(i for i, n in enumerate(g.nodes) if n is b)
        for n in (a, tr, b):
            n.inputs.clear()
            n.outputs.clear()
        g.nodes[at] = gather
        facts["shuffle_as_gather"] += 1

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

    for n in list(g.nodes) if prelu_split else []:
        if n.op != "PRelu" or not isinstance(n.inputs[1], gs.Constant) \
                or not {n.inputs[0].name, n.outputs[0].name} <= coded or not _large_map(n.inputs[0].shape):
            continue
        x, slope, y = n.inputs[0], n.inputs[1], n.outputs[0]
        pos, neg, scaled = (gs.Variable(new_name(g, f"{n.name}_{k}"), dtype=np.float32, shape=y.shape)
                            for k in ("relu", "min", "scaled"))
        at = next(i for i, m in enumerate(g.nodes) if m is n)
        n.inputs.clear()
        n.outputs.clear()
        g.nodes[at:at + 1] = [
            gs.Node("Relu", new_name(g, f"{n.name}_Relu"), {}, [x], [pos]),
            gs.Node("Min", new_name(g, f"{n.name}_Min"), {}, [x, const("zero", np.zeros((), np.float32))], [neg]),
            gs.Node("Mul", new_name(g, f"{n.name}_Mul"), {}, [neg, slope], [scaled]),
            gs.Node("Add", new_name(g, f"{n.name}_Add"), {}, [pos, scaled], [y])]
        facts["prelu_split"] += 1
    tmap = g.tensors()

    # 1. weights and biases of linear modules
    for mod in qm.modules:
        if not isinstance(mod, LinearModule):
            continue
        node = nodes[mod.name]
        node.inputs[1] = dq_weight(node.inputs[1].name, np.asarray(mod.weight), pow2_scale(mod.weight_scale_frac()),
                                   mod.axis if mod.per_channel else None)
        if mod.bias is None:
            continue
        b = bias_of(node)
        if b is not None:
            slot = (node, 2)
        else:
            add = nodes[plan.module(mod.name).bias_add]
            slot = (add, 1 if isinstance(add.inputs[1], gs.Constant) else 0)
            b = add.inputs[slot[1]]
        fb = mod.acc_frac if mod.per_channel else mod.acc_frac[:1].reshape(())
        slot[0].inputs[slot[1]] = dq_weight(b.name, mod.bias, pow2_scale(fb), 0)

    # 2. activations: one Q/DQ pair per requantized tensor, lossless pairs after pass-throughs
    order = {}
    for i, n in enumerate(g.nodes):
        for t in n.outputs:
            order[t.name] = i
    for t in g.inputs:
        order[t.name] = -1
    todo = sorted(coded - gone, key=lambda n: order.get(n, 0))
    out_ids = {id(t) for t in g.outputs}
    module_act = {m.output: (nodes[m.nodes[-1]], qm.module(m.name)) for m in plan.modules
                  if m.activation in ("Relu", "Relu6", "Clip")}
    for name in todo:
        t = tmap[name]
        qt = qm.tensor(name)
        f, unsigned, act_bits = qt.frac, qt.unsigned, qt.bits
        offset = 128 if signed_as_uint8 and act_bits == 8 and not unsigned else 0
        zp_dtype = CODE_DTYPES[(act_bits, unsigned or offset > 0)]
        facts["signed_as_uint8"] += offset > 0
        scale = const("act_scale", pow2_scale(f).reshape(()))
        zp = const("act_zero_point", np.full((), offset, dtype=zp_dtype))
        readers = list(t.outputs)
        q_in = t
        act, mod = module_act.get(name, (None, None)) if name in plan.requant else (None, None)
        code_clip = None
        if act is not None and act_bits == 8:  # 16-bit: the activation stays float
            q_in = act.inputs[0]
            code_clip = (mod.code_min + offset, mod.code_max + offset)
            if (mod.code_min, mod.code_max) == qrange(act_bits, unsigned):
                code_clip = None  # the code range is narrower than the clip: QuantizeLinear does it
                facts["relu_dropped"] += act.op == "Relu"
            else:
                facts["clip_on_codes"] += 1
            act.inputs.clear()
            act.outputs.clear()
        q_out = gs.Variable(new_name(g, f"{name}_quantized"), dtype=zp_dtype, shape=t.shape)
        dq_out = gs.Variable(new_name(g, f"{name}_dequantized"), dtype=np.float32, shape=t.shape)
        if name in gathers:  # a shuffle: the Gather moves the codes of its input (no QuantizeLinear)
            gathers[name].outputs[0] = q_out
        else:
            g.nodes.append(gs.Node("QuantizeLinear", new_name(g, f"{name}_QuantizeLinear"), {},
                                   [q_in, scale, zp], [q_out]))
        if code_clip is not None:
            clipped = gs.Variable(new_name(g, f"{name}_clipped"), dtype=zp_dtype, shape=t.shape)
            g.nodes.append(gs.Node("Clip", new_name(g, f"{name}_Clip"), {},
                                   [q_out, const("code_min", np.array(code_clip[0], dtype=zp_dtype)),
                                    const("code_max", np.array(code_clip[1], dtype=zp_dtype))], [clipped]))
            q_out = clipped
        symbols[name] = q_out.name
        g.nodes.append(gs.Node("DequantizeLinear", new_name(g, f"{name}_DequantizeLinear"), {},
                               [q_out, scale, zp], [dq_out]))
        for r in readers:
            for k, x in enumerate(r.inputs):
                if x is t:
                    r.inputs[k] = q_out if any(r is v for v in gathers.values()) else dq_out
        if id(t) in out_ids:
            idx = [id(o) for o in g.outputs].index(id(t))
            t.name, dq_out.name = dq_out.name, name
            g.outputs[idx] = dq_out
            out_ids = {id(o) for o in g.outputs}
    g.cleanup()
    g.toposort()
    return g, facts, symbols

