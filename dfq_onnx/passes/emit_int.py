"""Write the quantized model as an integer-only graph: int8 in, int32 accumulate, one rounding
shift per module, int8 out."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..fixedpoint import code_bounds, dequantize, pow2_scale, qrange, quantize, shift_constants
from ..graph_utils import bias_of, clip_limits, new_name, out_channel_axis
from .choose_exponents import Exponents
from .form_modules import Module, Plan

DOMAIN = "dfq"
SHIFT_OP = "RoundingShift"     # floor((x + 2^(s-1)) / 2^s), then saturate and cast
DIVIDE_OP = "RoundingDivide"   # floor((x + n//2) / n), same body with another divisor
INT32 = (-(1 << 31), (1 << 31) - 1)
INTEGER_OPS = ("Conv", "Gemm", "MatMul")
INTEGER_ACTS = (None, "Relu", "Relu6", "Clip")


def rounding_functions(opset: int = 13) -> list[onnx.FunctionProto]:
    """Model-local functions for the requantizer; onnxruntime inlines them. `opset` is the model's
    default-domain version (a function must import the same one); the ops used mean the same from
    13 on.

    Y = Cast(Clip(((Cast(X, int64) + H) - ((Cast(X, int64) + H) mod D)) / D * L, lo, hi), to)
    with H = 2^(s-1) (or 0), D = 2^max(s, 0), L = 2^max(-s, 0) for a shift by s bits, and
    H = n // 2, D = n, L = 1 for a rounding division by n. `mod` is the floor modulo (fmod=0), so
    the division is exact and the result is the floor; per-channel s broadcasts.
    """
    def body():
        i64 = TensorProto.INT64
        lo = helper.make_node("Constant", [], ["lo"])
        lo.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name="lo", type=onnx.AttributeProto.INT))
        hi = helper.make_node("Constant", [], ["hi"])
        hi.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name="hi", type=onnx.AttributeProto.INT))
        cast = helper.make_node("Cast", ["c"], ["Y"])
        cast.attribute.append(onnx.AttributeProto(name="to", ref_attr_name="to", type=onnx.AttributeProto.INT))
        return [
            helper.make_node("Cast", ["X"], ["x64"], to=i64),
            helper.make_node("Add", ["x64", "H"], ["t"]),
            helper.make_node("Mod", ["t", "D"], ["m"], fmod=0),
            helper.make_node("Sub", ["t", "m"], ["e"]),
            helper.make_node("Div", ["e", "D"], ["q"]),
            helper.make_node("Mul", ["q", "L"], ["p"]),
            lo, hi,
            helper.make_node("Clip", ["p", "lo", "hi"], ["c"]),
            cast,
        ]
    imports = [helper.make_opsetid("", opset)]
    return [helper.make_function(DOMAIN, name, ["X", "H", "D", "L"], ["Y"], body(), imports, ["lo", "hi", "to"])
            for name in (SHIFT_OP, DIVIDE_OP)]


def emit_int(graph: gs.Graph, plan: Plan, exps: Exponents, *, act_bits: int,
             per_channel: bool) -> tuple[gs.Graph, dict, list[dict]]:
    """Return an integer-only copy of the graph, facts for the report, and the integer parameters
    of every module (for the numpy reference in fixedpoint.py).

    Guarantees: the graph input is quantized once (QuantizeLinear) and each output dequantized once,
    so inputs and outputs stay float. Each Conv/Gemm/MatMul module runs as ConvInteger or
    MatMulInteger on int8/uint8 with int8 weights into int32, adds its int32 bias at fraction
    f_x + f_w[c], adds a residual branch brought to that fraction by an exact left shift (a
    multiplication by 2^k), applies Relu/Relu6/Clip as the saturation bounds of its ONE
    dfq.RoundingShift (round half up, saturate to int8, or uint8 when provably non-negative).
    GlobalAveragePool (an int32 ReduceSum) and AveragePool without uncounted padding (a depthwise
    ConvInteger with a ones kernel) sum in integers, then one rounding shift (window a power of
    two) or rounding division. Pass-through ops run on the integer tensor. Every other op, and modules with
    no integer form (ConvTranspose, AveragePool, LeakyRelu), runs in float between a
    DequantizeLinear and a QuantizeLinear: a float island.
    """
    g = graph.copy()
    g.__dict__.pop("_dfq_used_names", None)
    tmap = g.tensors()
    nodes = {n.name: n for n in g.nodes}
    order = list(g.nodes)
    facts = {"bias_saturated": 0, "float_modules": {}, "residual_right_shifts": 0}
    params: list[dict] = []
    qt: dict[str, gs.Variable] = {}     # tensor name -> integer version
    dq_cache: dict[str, gs.Variable] = {}
    removed: set[str] = set()
    new_nodes: list[gs.Node] = []

    def add(op, inputs, out_dtype, attrs=None, name=None, domain=None, shape=None, out=None):
        out = out if out is not None else gs.Variable(new_name(g, f"{name or op}_out"), dtype=out_dtype, shape=shape)
        new_nodes.append(gs.Node(op, new_name(g, name or op), attrs or {}, inputs, [out], domain=domain))
        return out

    def const(base, value):
        return gs.Constant(new_name(g, base), np.asarray(value))

    def int_dtype(name):
        return np.uint8 if plan.source(name) in plan.unsigned else np.int8

    def scale_zp(name):
        return (const(f"{name}_scale", pow2_scale(exps.act_of(name)).reshape(())),
                const(f"{name}_zero_point", np.zeros((), dtype=int_dtype(name))))

    def quantize_float(name, src):
        s, z = scale_zp(name)
        qt[name] = add("QuantizeLinear", [src, s, z], int_dtype(name), name=f"{name}_QuantizeLinear",
                       shape=src.shape)

    def dequantized(name):
        if name not in dq_cache:
            s, z = scale_zp(name)
            dq_cache[name] = add("DequantizeLinear", [qt[name], s, z], np.float32,
                                 name=f"{name}_DequantizeLinear", shape=tmap[name].shape)
        return dq_cache[name]

    def requantize(acc, s_vec, shape, out_name, op=SHIFT_OP, divisor=None, bounds=None):
        lo, hi = qrange(act_bits, plan.source(out_name) in plan.unsigned)
        to = TensorProto.UINT8 if lo == 0 else TensorProto.INT8
        if bounds is not None:  # an activation clamp, applied to the codes by the saturation
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        h, d, l = shift_constants(s_vec) if divisor is None else (np.int64(divisor // 2), np.int64(divisor), np.int64(1))
        return add(op, [acc, const("half", np.asarray(h).reshape(shape)), const("divisor", np.asarray(d).reshape(shape)),
                        const("multiplier", np.asarray(l).reshape(shape))], int_dtype(out_name),
                   {"lo": lo, "hi": hi, "to": to}, name=f"{out_name}_{op}", domain=DOMAIN)

    for t in g.inputs:
        if t.name in plan.requant:
            quantize_float(t.name, t)

    modules_by_first = {m.nodes[0]: m for m in plan.modules}
    for node in order:
        m = modules_by_first.get(node.name)
        if m is not None and _integer_form(m, tmap, nodes):
            for name in (m.input, m.residual_input):
                if name and name not in qt:
                    quantize_float(name, tmap[name])
            if m.kind == "pool":
                qt[m.output] = _emit_pool(m, nodes, tmap, qt, add, const, requantize, params)
            else:
                y = _emit_linear(m, nodes, exps, qt, add, const, requantize, params, facts, per_channel,
                                 tmap[m.output] if m.output in plan.float_outputs else None)
                if y is not None:
                    qt[m.output] = y
            removed.update(m.nodes)
            continue
        if node.name in removed:
            continue
        if m is not None:  # a module with no integer form: float, on dequantized inputs
            facts["float_modules"][m.op] = facts["float_modules"].get(m.op, 0) + 1
            if m.kind == "linear":
                _dequantize_weight(node, exps, per_channel, m)
        out = node.outputs[0].name if node.outputs else None
        if out in plan.passthrough and all(t.name in qt for t in node.inputs
                                           if not isinstance(t, gs.Constant) and t.name):
            for k, t in enumerate(node.inputs):
                if t.name in qt:
                    node.inputs[k] = qt[t.name]
                elif node.op == "Pad" and k == 2 and isinstance(t, gs.Constant):
                    node.inputs[k] = const("pad_zero", np.zeros((), dtype=int_dtype(out)))
            new = gs.Variable(new_name(g, f"{out}_int"), dtype=int_dtype(out), shape=node.outputs[0].shape)
            node.outputs[0] = new
            qt[out] = new
            continue
        for k, t in enumerate(node.inputs):  # a float op
            if t.name in qt:
                node.inputs[k] = dequantized(t.name)
        for t in node.outputs:
            if t.name in plan.requant:
                quantize_float(t.name, t)

    for n in order:
        if n.name in removed:
            n.inputs.clear()
            n.outputs.clear()
    # graph outputs: dequantize integer tensors once, under the original names
    for k, t in enumerate(list(g.outputs)):
        if t.name in qt:
            name = t.name
            dq = dequantized(name)
            t.name = new_name(g, f"{name}_float")
            dq.name = name
            g.outputs[k] = dq
    g.nodes.extend(new_nodes)
    g.cleanup()
    g.toposort()
    return g, facts, params


def _integer_form(m: Module, tmap, nodes) -> bool:
    if m.kind == "pool":
        shape = tmap[m.input].shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
            return False
        if m.op == "GlobalAveragePool":
            return all(isinstance(d, int) for d in shape[2:])
        a = nodes[m.name].attrs
        padded = any(a.get("pads", [0])) or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID")
        # one divisor for every window: no padding, or padding counted
        return not padded or int(a.get("count_include_pad", 0)) == 1
    return m.op in INTEGER_OPS and m.activation in INTEGER_ACTS


def _channel_shape(node: gs.Node) -> tuple:
    """Shape that broadcasts a per-output-channel vector against the node's output."""
    if node.op == "Conv":
        rank = len(node.inputs[1].values.shape)
        return (-1,) + (1,) * (rank - 2)
    return (-1,)


def _emit_linear(m, nodes, exps, qt, add, const, requantize, params, facts, per_channel, float_out=None):
    """One linear module in integers; returns its int8/uint8 output, or None when it writes the
    float tensor float_out (a graph output: the int32 accumulator dequantized, no requantization)."""
    node = nodes[m.name]
    w = np.asarray(node.inputs[1].values)
    axis = out_channel_axis(node)
    channels = w.shape[axis]
    fw = np.broadcast_to(exps.weight[m.name], (channels,)) if per_channel else \
        np.full(channels, exps.weight[m.name][0])
    wq = quantize(w, fw, exps.weight_bits[m.name], axis=axis).astype(np.int8)
    fx = exps.act_of(m.input)
    f_acc = fx + fw
    cshape = _channel_shape(node)
    x = qt[m.input]
    p = {"name": m.name, "op": node.op, "input": m.input, "output": m.output, "f_acc": f_acc.copy()}
    if node.op == "Conv":
        attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "group",
                                                               "kernel_shape", "auto_pad")}
        acc = add("ConvInteger", [x, const(f"{m.name}_weight_int8", wq)], np.int32, attrs, name=f"{m.name}_ConvInteger")
        p.update(weight=wq, strides=list(attrs.get("strides", [1] * (wq.ndim - 2))),
                 pads=list(attrs.get("pads", [0] * 2 * (wq.ndim - 2))),
                 dilations=list(attrs.get("dilations", [1] * (wq.ndim - 2))), group=int(attrs.get("group", 1)))
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            p["auto_pad"] = attrs["auto_pad"]
    else:
        wk = wq.T if (node.op == "Gemm" and int(node.attrs.get("transB", 0))) else wq
        wk = np.ascontiguousarray(wk)
        acc = add("MatMulInteger", [x, const(f"{m.name}_weight_int8", wk)], np.int32, name=f"{m.name}_MatMulInteger")
        p.update(weight=wk)
    b = bias_of(node)
    if b is None and m.bias_add is not None:
        add_node = nodes[m.bias_add]
        b = add_node.inputs[1] if isinstance(add_node.inputs[1], gs.Constant) else add_node.inputs[0]
    if b is not None:
        bv = np.broadcast_to(np.asarray(b.values, dtype=np.float64).reshape(-1), (channels,))
        raw = np.rint(np.ldexp(bv, f_acc))
        facts["bias_saturated"] += int(np.sum((raw < INT32[0]) | (raw > INT32[1])))
        bq = np.clip(raw, *INT32).astype(np.int32)
        acc = add("Add", [acc, const(f"{m.name}_bias_int32", bq.reshape(cshape))], np.int32, name=f"{m.name}_bias")
        p["bias"] = bq
    if m.residual_input:
        k = f_acc - exps.act_of(m.residual_input)
        r = add("Cast", [qt[m.residual_input]], np.int32, {"to": TensorProto.INT32}, name=f"{m.name}_residual_cast")
        if np.all(k >= 0):
            if np.any(k > 0):
                r = add("Mul", [r, const(f"{m.name}_residual_scale", (np.int64(1) << k).astype(np.int32).reshape(cshape))],
                        np.int32, name=f"{m.name}_residual_shift")
        else:
            facts["residual_right_shifts"] += 1
            r = requantize(r, -k, cshape, m.residual_input)  # rare: the branch is finer than the accumulator
            r = add("Cast", [r], np.int32, {"to": TensorProto.INT32}, name=f"{m.name}_residual_cast2")
        acc = add("Add", [acc, r], np.int32, name=f"{m.name}_residual_add")
        p["residual"] = m.residual_input
        p["residual_shift"] = k.copy()
    if float_out is not None:
        act = m.activation in ("Relu", "Relu6", "Clip")
        y = add("DequantizeLinear", [acc, const(f"{m.name}_acc_scale", pow2_scale(f_acc))], np.float32,
                {"axis": 1 if node.op == "Conv" else -1}, name=f"{m.name}_DequantizeLinear",
                out=None if act else float_out)
        if act:
            lo, hi = clip_limits(nodes[m.nodes[-1]])
            add("Clip", [y, const(f"{m.name}_min", np.float32(-3.4e38 if lo is None else lo)),
                         const(f"{m.name}_max", np.float32(3.4e38 if hi is None else hi))], np.float32,
                name=f"{m.name}_Clip", out=float_out)
        p.update(float_output=True, int_input=x.name, int_output=acc.name,
                 int_residual=qt[m.residual_input].name if m.residual_input else None)
        params.append(p)
        return None
    s = f_acc - exps.act_of(m.output)
    bounds = None
    if m.activation in ("Relu6", "Clip"):  # a Relu is the unsigned code range already
        bounds = code_bounds(*clip_limits(nodes[m.nodes[-1]]), exps.act_of(m.output), 8,
                             exps.plan.source(m.output) in exps.plan.unsigned)
        p["code_min"], p["code_max"] = bounds
    y = requantize(acc, s, cshape, m.output, bounds=bounds)
    p.update(shift=s.copy(), unsigned=y.dtype == np.uint8, int_input=x.name, int_output=y.name,
             int_residual=qt[m.residual_input].name if m.residual_input else None)
    params.append(p)
    return y


def _emit_pool(m, nodes, tmap, qt, add, const, requantize, params):
    """Average = integer window sum, then one rounding shift (or division) at the same fraction.
    AveragePool sums with a depthwise ConvInteger whose kernel is all ones."""
    p = {"name": m.name, "op": m.op, "input": m.input, "output": m.output, "int_input": qt[m.input].name,
         "int_residual": None}
    if m.op == "GlobalAveragePool":
        h, w = tmap[m.input].shape[2:]
        n = int(h * w)
        x = add("Cast", [qt[m.input]], np.int32, {"to": TensorProto.INT32}, name=f"{m.name}_cast")
        acc = add("ReduceSum", [x, const(f"{m.name}_axes", np.array([2, 3], dtype=np.int64))], np.int32,
                  {"keepdims": 1}, name=f"{m.name}_ReduceSum")
    else:
        a = nodes[m.name].attrs
        k = list(a["kernel_shape"])
        c = int(tmap[m.input].shape[1])
        n = int(np.prod(k))
        ones = np.ones([c, 1] + k, dtype=np.int8)
        attrs = {"group": c, "kernel_shape": k, "strides": list(a.get("strides", [1] * len(k))),
                 "pads": list(a.get("pads", [0] * 2 * len(k)))}
        acc = add("ConvInteger", [qt[m.input], const(f"{m.name}_ones", ones)], np.int32, attrs,
                  name=f"{m.name}_window_sum")
        p.update(weight=ones, strides=attrs["strides"], pads=attrs["pads"], dilations=[1] * len(k), group=c)
    if n & (n - 1) == 0:
        y = requantize(acc, np.array([n.bit_length() - 1]), (), m.output)
    else:
        y = requantize(acc, None, (), m.output, op=DIVIDE_OP, divisor=n)
    p.update(window=n, unsigned=y.dtype == np.uint8, int_output=y.name)
    params.append(p)
    return y


def _dequantize_weight(node: gs.Node, exps, per_channel, m) -> None:
    """A float module still uses the quantized weight values, so results match the QDQ graph."""
    w = np.asarray(node.inputs[1].values)
    axis = out_channel_axis(node) if per_channel else None
    fw = exps.weight[m.name] if per_channel else exps.weight[m.name][0]
    q = quantize(w, fw, exps.weight_bits[m.name], axis=axis)
    node.inputs[1] = gs.Constant(node.inputs[1].name + "_qdq", dequantize(q, fw, axis).astype(np.float32))
