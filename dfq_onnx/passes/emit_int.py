"""Write the quantized model as an integer-only graph: int8 in, int32 accumulate, one rounding
shift per module, int8 out."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..fixedpoint import channel_shape, pow2_scale
from ..graph_utils import bias_of, new_name
from ..quantized import LinearModule, PoolModule, QuantizedModel

DOMAIN = "dfq"
SHIFT_OP = "RoundingShift"     # round(x / 2^s), ties to even, for s >= 0; int32 in, int32 out
DIVIDE_OP = "RoundingDivide"   # round(x / n), ties to even; int32 in, int32 out
INT_OPSET = 19                 # BitwiseAnd (18: the parity bit of ties-to-even); onnx.reference runs DequantizeLinear from 19
BIAS = 1 << 31                 # int32 x as uint32 x + 2^31: order-preserving, so logical shifts floor


def rounding_functions(opset: int = INT_OPSET) -> list[onnx.FunctionProto]:
    """Model-local functions for the requantizer (onnxruntime inlines them); `opset` is the
    model's default-domain version (>= INT_OPSET), which a function must import too.

    RoundingShift(X, A, S, M, B): X int32; per channel (broadcasting) uint32 constants
    A = 2^31 + 2^(s-1) - 1, S = s, M = 1, B = 2^(31-s) for a shift s >= 1 (A = 2^31, M = 0 for s = 0):
        t = uint32(X) + A                  (x + 2^31 + 2^(s-1) - 1: non-negative, fits by the IR's bound)
        y = int32((t + (t >> S & M)) >> S) - B)
    = floor((x + 2^(s-1) - 1 + bit_s) / 2^s) with bit_s the parity of floor(x / 2^s) (bit s of t
    equals it wherever it matters): round half to even. uint32 arithmetic is modular, so the casts
    are exact. RoundingDivide(X, N, H): floor((x + H) / N) for N > 0 via Mod (floor modulo) and an
    exact Div, then the same tie fix: minus 1 where the remainder is 0, N is even and the result
    is odd (H = N / 2: a tie rounded up to an odd value). No int64 anywhere.
    """
    u32, i32 = TensorProto.UINT32, TensorProto.INT32
    shift = [
        helper.make_node("Cast", ["X"], ["u"], to=u32),
        helper.make_node("Add", ["u", "A"], ["t"]),
        helper.make_node("BitShift", ["t", "S"], ["q0"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["q0", "M"], ["p"]),
        helper.make_node("Add", ["t", "p"], ["tp"]),
        helper.make_node("BitShift", ["tp", "S"], ["q"], direction="RIGHT"),
        helper.make_node("Sub", ["q", "B"], ["yu"]),
        helper.make_node("Cast", ["yu"], ["Y"], to=i32),
    ]
    divide = [
        helper.make_node("Add", ["X", "H"], ["t"]),
        helper.make_node("Mod", ["t", "N"], ["r"], fmod=0),
        helper.make_node("Sub", ["t", "r"], ["e"]),
        helper.make_node("Div", ["e", "N"], ["q"]),
        # tie (r == 0 after adding N/2 with N even) and q odd: round down to even
        helper.make_node("Equal", ["r", "Z"], ["at_tie"]),
        helper.make_node("Cast", ["at_tie"], ["tie"], to=i32),
        helper.make_node("Mod", ["q", "TWO"], ["odd"], fmod=0),
        helper.make_node("Mul", ["tie", "odd"], ["fix0"]),
        helper.make_node("Mul", ["fix0", "EVEN"], ["fix"]),
        helper.make_node("Sub", ["q", "fix"], ["Y"]),
    ]
    imports = [helper.make_opsetid("", opset)]
    return [helper.make_function(DOMAIN, SHIFT_OP, ["X", "A", "S", "M", "B"], ["Y"], shift, imports, []),
            helper.make_function(DOMAIN, DIVIDE_OP, ["X", "N", "H", "Z", "TWO", "EVEN"], ["Y"], divide, imports, [])]


def shift_constants(s: np.ndarray) -> tuple[np.ndarray, ...]:
    """(A, S, M, B) of RoundingShift for right shifts s >= 0 (uint32, elementwise in s)."""
    s = np.asarray(s, dtype=np.int64)
    if np.any(s < 0) or np.any(s > 30):
        raise ValueError(f"RoundingShift takes shifts 0..30, got {s.min()}..{s.max()}")
    half = np.where(s > 0, np.left_shift(1, np.maximum(s - 1, 0)) - 1, 0)
    return tuple(np.asarray(v, np.int64).astype(np.uint32) for v in
                 (BIAS + half, s, (s > 0).astype(np.int64), np.left_shift(1, 31 - s)))


def rounding_shift_node(add, const, x, s: np.ndarray, cshape, lo: int, hi: int, dtype, name: str):
    """Nodes computing clamp(rounding_shift(x, s), lo, hi) as `dtype` (fixedpoint.rounding_shift):
    the RoundingShift function for the right shifts; where a channel shifts left (s < 0) the value
    is first clamped to [floor(lo / 2^l), ceil(hi / 2^l)] (so the left shift cannot overflow and the
    final clamp still sees every saturated value) and multiplied by 2^l."""
    right = np.maximum(s, 0)
    left = np.maximum(-s, 0)
    shape = cshape if np.ndim(s) else ()
    y = x
    if np.any(right > 0):
        y = add(SHIFT_OP, [y] + [const(f"{name}_{k}", v.reshape(shape)) for k, v in zip("ASMB", shift_constants(right))],
                np.int32, domain=DOMAIN, name=f"{name}_{SHIFT_OP}")
    if np.any(left > 0):
        top = np.iinfo(np.int32).max
        lo_l = np.maximum(np.floor_divide(lo, np.left_shift(1, left)), -top - 1)
        hi_l = np.minimum(-np.floor_divide(-hi, np.left_shift(1, left)), top)
        y = add("Max", [y, const(f"{name}_pre_min", lo_l.astype(np.int32).reshape(shape))], np.int32, name=f"{name}_pre_max")
        y = add("Min", [y, const(f"{name}_pre_max", hi_l.astype(np.int32).reshape(shape))], np.int32, name=f"{name}_pre_min")
        y = add("Mul", [y, const(f"{name}_left", np.left_shift(1, left).astype(np.int32).reshape(shape))], np.int32,
                name=f"{name}_left_shift")
    if (lo, hi) != (-(1 << 31), (1 << 31) - 1):
        y = add("Clip", [y, const(f"{name}_lo", np.int32(lo)), const(f"{name}_hi", np.int32(hi))], np.int32,
                name=f"{name}_clamp")
    if dtype != np.int32:
        y = add("Cast", [y], dtype, {"to": TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8},
                name=f"{name}_cast")
    return y


def rounding_divide_node(add, const, x, n: int, lo: int, hi: int, dtype, name: str):
    """clamp(rounding_divide(x, n), lo, hi) as `dtype` (fixedpoint.rounding_divide)."""
    i32 = lambda v: np.asarray(v, np.int32)  # noqa: E731
    y = add(DIVIDE_OP, [x, const(f"{name}_n", i32(n)), const(f"{name}_h", i32(n // 2)), const(f"{name}_zero", i32(0)),
                        const(f"{name}_two", i32(2)), const(f"{name}_even", i32(1 - n % 2))],
            np.int32, domain=DOMAIN, name=f"{name}_{DIVIDE_OP}")
    y = add("Clip", [y, const(f"{name}_lo", np.int32(lo)), const(f"{name}_hi", np.int32(hi))], np.int32,
            name=f"{name}_clamp")
    return add("Cast", [y], dtype, {"to": TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8},
               name=f"{name}_cast")


def emit_int(graph: gs.Graph, qm: QuantizedModel) -> tuple[gs.Graph, dict, dict[str, str]]:
    """Return an integer-only copy of `graph` rendering the quantized model `qm`, facts for the
    report, and a symbol table: float-graph tensor name -> the integer tensor holding its codes
    (module inputs, residuals and outputs; a graph-output module: its int32 sum).

    Guarantees: every number comes from `qm` (weight codes, int32 biases, shifts, clamps); the
    graph input is quantized once (QuantizeLinear) and each output dequantized once, so inputs and
    outputs stay float. Each integer module (LinearModule.integer / PoolModule.integer) runs as
    ConvInteger or MatMulInteger on int8/uint8 codes into int32, adds its int32 bias, shifts the
    accumulator and the residual codes to their common fraction, and ends in ONE dfq.RoundingShift
    (round half to even, saturate to [code_min, code_max]: the activation clamp); pools sum in
    integers (ReduceSum, or a depthwise ConvInteger with a ones kernel) and end in one
    RoundingShift or RoundingDivide. Pass-through ops run on the integer codes. Every other op,
    and each module without an integer form, runs in float between a DequantizeLinear and a
    QuantizeLinear (a float island; its weights are the IR's codes dequantized). No int64 tensor
    is created: the IR proves every sum fits in int32.
    """
    plan = qm.plan
    g = graph.copy()
    g.__dict__.pop("_dfq_used_names", None)
    tmap = g.tensors()
    nodes = {n.name: n for n in g.nodes}
    order = list(g.nodes)
    facts = {"float_modules": {}, "residual_rounded": qm.facts.get("residual_rounded", 0)}
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

    def code_dtype(name):
        return np.uint8 if qm.tensor(name).unsigned else np.int8

    def scale_zp(name):
        return (const(f"{name}_scale", pow2_scale(qm.tensor(name).frac).reshape(())),
                const(f"{name}_zero_point", np.zeros((), dtype=code_dtype(name))))

    def quantize_float(name, src):
        s, z = scale_zp(name)
        qt[name] = add("QuantizeLinear", [src, s, z], code_dtype(name), name=f"{name}_QuantizeLinear",
                       shape=src.shape)

    def dequantized(name):
        if name not in dq_cache:
            s, z = scale_zp(name)
            dq_cache[name] = add("DequantizeLinear", [qt[name], s, z], np.float32,
                                 name=f"{name}_DequantizeLinear", shape=tmap[name].shape)
        return dq_cache[name]

    def shift(x, s, cshape, lo, hi, dtype, name):
        return rounding_shift_node(add, const, x, np.asarray(s, np.int64), cshape, lo, hi, dtype, name)

    for t in g.inputs:
        if t.name in plan.requant:
            quantize_float(t.name, t)

    ir = {mod.name: mod for mod in qm.modules}
    for node in order:
        mod = ir.get(node.name)
        if mod is not None and mod.integer:
            m = plan.module(mod.name)
            for name in (m.input, m.residual_input):
                if name and name not in qt:
                    quantize_float(name, tmap[name])
            if isinstance(mod, PoolModule):
                qt[m.output] = _emit_pool(mod, tmap, qt, add, const, shift)
            else:
                y = _emit_linear(mod, qt, add, const, shift, tmap[m.output] if mod.output is None else None)
                qt[m.output] = y
            removed.update(m.nodes)
            continue
        if node.name in removed:
            continue
        if mod is not None:  # a module with no integer form: float, on dequantized inputs
            facts["float_modules"][mod.op] = facts["float_modules"].get(mod.op, 0) + 1
            if isinstance(mod, LinearModule):
                node.inputs[1] = gs.Constant(node.inputs[1].name + "_qdq", mod.dequantized_weight().astype(np.float32))
                if mod.bias is not None and bias_of(node) is not None:
                    node.inputs[2] = gs.Constant(node.inputs[2].name + "_qdq",
                                                 np.ldexp(mod.bias.astype(np.float64), -mod.acc_frac).astype(np.float32))
        out = node.outputs[0].name if node.outputs else None
        if out in plan.passthrough and all(t.name in qt for t in node.inputs
                                           if not isinstance(t, gs.Constant) and t.name):
            for k, t in enumerate(node.inputs):
                if t.name in qt:
                    node.inputs[k] = qt[t.name]
                elif node.op == "Pad" and k == 2 and isinstance(t, gs.Constant):
                    node.inputs[k] = const("pad_zero", np.zeros((), dtype=code_dtype(out)))
            new = gs.Variable(new_name(g, f"{out}_int"), dtype=code_dtype(out), shape=node.outputs[0].shape)
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
    symbols = {name: v.name for name, v in qt.items()}
    # graph outputs: dequantize integer tensors once, under the original names
    for k, t in enumerate(list(g.outputs)):
        if t.name in qt and qt[t.name].dtype != np.int32:
            name = t.name
            dq = dequantized(name)
            t.name = new_name(g, f"{name}_float")
            dq.name = name
            g.outputs[k] = dq
    g.nodes.extend(new_nodes)
    g.cleanup()
    g.toposort()
    return g, facts, symbols


def _emit_linear(mod: LinearModule, qt, add, const, shift, float_out=None):
    """One linear module in integers; returns its int8/uint8 output, or its int32 sum when it writes
    the float graph output float_out (dequantized there, no rounding)."""
    cshape = channel_shape(mod, mod.weight.ndim if mod.op == "Conv" else 2)
    x = qt[mod.input.name]
    if mod.op == "Conv":
        a = mod.attrs
        attrs = {"strides": a["strides"], "dilations": a["dilations"], "group": a["group"],
                 "kernel_shape": a["kernel_shape"]}
        if a["auto_pad"] in ("NOTSET", ""):
            attrs["pads"] = a["pads"]
        else:
            attrs["auto_pad"] = a["auto_pad"]
        acc = add("ConvInteger", [x, const(f"{mod.name}_weight_int8", mod.weight)], np.int32, attrs,
                  name=f"{mod.name}_ConvInteger")
    else:
        w = np.ascontiguousarray(mod.weight.T if mod.attrs.get("transB") else mod.weight)
        acc = add("MatMulInteger", [x, const(f"{mod.name}_weight_int8", w)], np.int32, name=f"{mod.name}_MatMulInteger")
    if mod.bias is not None:
        acc = add("Add", [acc, const(f"{mod.name}_bias_int32", mod.bias.reshape(cshape))], np.int32, name=f"{mod.name}_bias")
    if mod.residual is not None:
        if np.any(mod.acc_shift > 0):
            acc = add("Mul", [acc, const(f"{mod.name}_acc_scale", np.left_shift(1, mod.acc_shift).astype(np.int32).reshape(cshape))],
                      np.int32, name=f"{mod.name}_acc_shift")
        r = add("Cast", [qt[mod.residual.name]], np.int32, {"to": TensorProto.INT32}, name=f"{mod.name}_residual_cast")
        k = mod.residual_shift
        if np.all(k >= 0):
            if np.any(k > 0):
                r = add("Mul", [r, const(f"{mod.name}_residual_scale", np.left_shift(1, k).astype(np.int32).reshape(cshape))],
                        np.int32, name=f"{mod.name}_residual_shift")
        else:  # where the exact form could overflow: the residual is rounded to the sum's fraction
            r = shift(r, -k, cshape, -(1 << 31), (1 << 31) - 1, np.int32, f"{mod.name}_residual")
        acc = add("Add", [acc, r], np.int32, name=f"{mod.name}_residual_add")
    if float_out is not None:
        y = acc
        act = mod.activation in ("Relu", "Relu6", "Clip")
        dq = add("DequantizeLinear", [acc, const(f"{mod.name}_acc_scale", pow2_scale(mod.sum_frac))], np.float32,
                 {"axis": 1 if mod.op == "Conv" else -1}, name=f"{mod.name}_DequantizeLinear",
                 out=None if act else float_out)
        if act:
            lo, hi = mod.act_limits
            add("Clip", [dq, const(f"{mod.name}_min", np.float32(-3.4e38 if lo is None else lo)),
                         const(f"{mod.name}_max", np.float32(3.4e38 if hi is None else hi))], np.float32,
                name=f"{mod.name}_Clip", out=float_out)
        return y
    return shift(acc, mod.shift, cshape, mod.code_min, mod.code_max,
                 np.uint8 if mod.output.unsigned else np.int8, mod.output_name)


def _emit_pool(mod: PoolModule, tmap, qt, add, const, shift):
    """Average = integer window sum, then one rounding shift (or division) at the same fraction.
    AveragePool sums with a depthwise ConvInteger whose kernel is all ones."""
    dtype = np.uint8 if mod.output.unsigned else np.int8
    if mod.op == "GlobalAveragePool":
        x = add("Cast", [qt[mod.input.name]], np.int32, {"to": TensorProto.INT32}, name=f"{mod.name}_cast")
        acc = add("ReduceSum", [x, const(f"{mod.name}_axes", np.array([2, 3], dtype=np.int64))], np.int32,
                  {"keepdims": 1}, name=f"{mod.name}_ReduceSum")
    else:
        a = mod.attrs
        k = a["kernel_shape"]
        c = int(tmap[mod.input.name].shape[1])
        attrs = {"group": c, "kernel_shape": k, "strides": a["strides"]}
        if a["auto_pad"] in ("NOTSET", ""):
            attrs["pads"] = a["pads"]
        else:
            attrs["auto_pad"] = a["auto_pad"]
        acc = add("ConvInteger", [qt[mod.input.name], const(f"{mod.name}_ones", np.ones([c, 1] + k, dtype=np.int8))],
                  np.int32, attrs, name=f"{mod.name}_window_sum")
    if mod.shift is not None:
        return shift(acc, mod.shift, (), mod.code_min, mod.code_max, dtype, mod.output_name)
    return rounding_divide_node(add, const, acc, mod.window, mod.code_min, mod.code_max, dtype, mod.output_name)
