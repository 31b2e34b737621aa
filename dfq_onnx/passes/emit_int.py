"""Write the quantized model as an integer-only graph: int8 in, int32 accumulate, one rounding
shift per module, int8 out."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..fixedpoint import channel_shape, pow2_scale, table_index_offset
from ..graph_utils import bias_of, new_name
from ..quantized import (BinaryModule, LayerNormModule, LinearModule, PoolModule, QuantizedModel, SoftmaxModule,
                         TableModule, conv_transpose_pads)

DOMAIN = "dfq"
SHIFT_OP = "RoundingShift"     # requantizer: int32 -> clamp(round(x / 2^s), lo, hi) as int8/uint8 (+ variants)
WIDE_SHIFT_OP = "RoundingShiftWide"  # round(x / 2^s), s >= 0, int32 -> int32 (a residual that must round)
DIVIDE_OP = "RoundingDivide"   # round(x / n), ties to even; int32 in, int32 out
INT_OPSET = 19                 # onnx.reference runs DequantizeLinear from 19 (the requantizer needs 12)
BIAS = 1 << 31                 # int32 x as uint32 x + 2^31: order-preserving, so logical shifts floor
SHIFT_RANGE = (-8, 30)         # shifts the requantizer takes; others use the wide form + Clip


def _variant_name(left: bool, sub: bool) -> str:
    return SHIFT_OP + ("" if left else "Right") + ("" if sub else "Narrow")


def _requantizer_nodes(left: bool, sub: bool) -> list[onnx.NodeProto]:
    """The body of RoundingShift[Right][Narrow](X, [L], B, P, S, LO, HI, [Z]) -> Y (see rounding_functions)."""
    n = helper.make_node
    nodes = [n("Cast", ["X"], ["xu"], to=TensorProto.UINT32)]
    x = "xu"
    if left:
        nodes.append(n("Mul", ["xu", "L"], ["xl"]))
        x = "xl"
    nodes += [n("Add", [x, "B"], ["xb"]), n("Mul", ["xb", "P"], ["v"]), n("Sign", ["v"], ["nc"]),
              n("Sub", ["xb", "nc"], ["t"]), n("BitShift", ["t", "S"], ["q"], direction="RIGHT"),
              n("Max", ["q", "LO"], ["qa"]), n("Min", ["qa", "HI"], ["qb"])]
    last = "qb"
    if sub:
        nodes.append(n("Sub", ["qb", "Z"], ["qc"]))
        last = "qc"
    cast = n("Cast", [last], ["Y"])
    cast.attribute.append(onnx.AttributeProto(name="to", ref_attr_name="to", type=onnx.AttributeProto.INT))
    return nodes + [cast]


def rounding_functions(opset: int = INT_OPSET) -> list[onnx.FunctionProto]:
    """Model-local functions for the requantizers (onnxruntime inlines them); `opset` is the
    model's default-domain version, which a function must import too.

    RoundingShift(X, L, B, P, S, LO, HI, Z), attribute `to` (INT8/UINT8): X the int32 sum; per
    channel (broadcasting) uint32 constants from requantizer_constants, for a shift s (S = max(s, 0),
    h = 2^(S-1), 0 when S = 0) and code bounds lo..hi:
        u  = uint32(X) * L                 L = 2^max(-s, 0): a left shift (modular, exact by the IR's bound)
        xb = u + B                         B = 2^31 + h (+ a folded int32 bias): x + 2^31 + h, never wraps
        nc = Sign(xb * P)                  P = 2^(31-S) (0 for S = 0): 0 exactly when xb = 0 mod 2^(S+1),
                                           i.e. x is a tie (x mod 2^S = h) whose floor is odd
        q  = (xb - nc) >> S                = round_half_even(x / 2^S) + 2^(31-S)
        q  = Min(Max(q, LO), HI) - Z       the clamp in the biased domain (unsigned order = signed order);
                                           Z = 2^(31-S)
        Y  = Cast(q, to)                   modular narrowing
    The variants drop the Mul (Right: no left shift) or the Sub (Narrow: every S <= 23, so 2^(31-S)
    is 0 mod 256 and the narrowing Cast removes it). About 10 elementwise passes, no int64, no
    Mod/Div, no float.
    RoundingShiftWide(X, A, S, M, B): X int32 -> round(x / 2^s) int32 for s >= 0 (uint32 with
    A = 2^31 + 2^(s-1) - 1, M = [s > 0], B = 2^(31-s): ((t + (t >> S & M)) >> S) - B, t = x + A).
    RoundingDivide(X, N, H, Z, TWO, EVEN): floor((x + H) / N) via Mod (floor modulo) and an exact
    Div, then minus 1 at a tie (remainder 0, N even) whose result is odd: ties to even.
    """
    u32, i32 = TensorProto.UINT32, TensorProto.INT32
    wide = [
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
    shifts = [helper.make_function(DOMAIN, _variant_name(left, sub),
                                   ["X"] + (["L"] if left else []) + ["B", "P", "S", "LO", "HI"] + (["Z"] if sub else []),
                                   ["Y"], _requantizer_nodes(left, sub), imports, ["to"])
              for left in (True, False) for sub in (True, False)]
    return shifts + [helper.make_function(DOMAIN, WIDE_SHIFT_OP, ["X", "A", "S", "M", "B"], ["Y"], wide, imports, []),
                     helper.make_function(DOMAIN, DIVIDE_OP, ["X", "N", "H", "Z", "TWO", "EVEN"], ["Y"], divide, imports, [])]


def requantizer_fits(s, lo: int, hi: int) -> bool:
    s = np.asarray(s)
    return bool(s.size == 0 or (s.min() >= SHIFT_RANGE[0] and s.max() <= SHIFT_RANGE[1])) and -128 <= lo <= hi <= 255


def requantizer_constants(s, lo: int, hi: int, bias=None) -> tuple[str, dict[str, np.ndarray]]:
    """(function name, constants) of the RoundingShift variant for shifts s (-8..30) and bounds
    lo..hi (-128..255); `bias` (int per channel, shaped like s) is folded into B."""
    one = np.int64(1)
    s = np.asarray(s, np.int64)
    S = np.maximum(s, 0)
    L = np.left_shift(one, np.maximum(-s, 0))
    z = np.left_shift(one, 31 - S)
    lo_b, hi_b = np.maximum(lo + z, 0), hi + z
    below = hi_b < 0  # hi under every reachable value (S >= 24 only): the output is hi
    lo_b, hi_b, z = np.where(below, 0, lo_b), np.where(below, 0, hi_b), np.where(below, -hi, z)
    left, sub = bool((s < 0).any()), bool((S > 23).any() or below.any())
    h = np.where(S > 0, np.left_shift(one, np.maximum(S - 1, 0)), 0)
    b = 0 if bias is None else np.asarray(bias, np.int64).reshape(s.shape) * L
    consts = {}
    if left:
        consts["L"] = L.astype(np.uint32)
    consts.update(B=((BIAS + h + b) % (1 << 32)).astype(np.uint32),
                  P=np.where(S > 0, np.left_shift(one, 31 - S), 0).astype(np.uint32), S=S.astype(np.uint32),
                  LO=lo_b.astype(np.uint32), HI=hi_b.astype(np.uint32))
    if sub:
        consts["Z"] = (z % (1 << 32)).astype(np.uint32)
    return _variant_name(left, sub), consts


def wide_shift_constants(s: np.ndarray) -> tuple[np.ndarray, ...]:
    """(A, S, M, B) of RoundingShiftWide for right shifts s >= 0 (uint32, elementwise in s)."""
    s = np.asarray(s, dtype=np.int64)
    if np.any(s < 0) or np.any(s > 30):
        raise ValueError(f"RoundingShiftWide takes shifts 0..30, got {s.min()}..{s.max()}")
    half = np.where(s > 0, np.left_shift(1, np.maximum(s - 1, 0)) - 1, 0)
    return tuple(np.asarray(v, np.int64).astype(np.uint32) for v in
                 (BIAS + half, s, (s > 0).astype(np.int64), np.left_shift(1, 31 - s)))


def rounding_shift_node(add, const, x, s: np.ndarray, cshape, lo: int, hi: int, dtype, name: str,
                        bias=None, bound: int | None = None):
    """Nodes computing clamp(rounding_shift(x + bias, s), lo, hi) as `dtype`
    (fixedpoint.rounding_shift). Within the requantizer's domain (8-bit codes, s in -8..30) one
    RoundingShift function with the bias folded in; `bound` (the IR's proven max |x + bias|) decides
    whether a left shift could overflow, in which case x is clamped first (exact: those values
    saturate anyway). Elsewhere (an int32 result, or shifts out of range): the wide rounding
    shift, Max/Min and a multiplication for left shifts, Clip and Cast. Where the bias cannot be
    folded (the clamp before a left shift, or the wide form) it is an Add before everything."""
    shape = cshape if np.ndim(s) else ()
    left = np.maximum(-s, 0)
    fits = dtype != np.int32 and requantizer_fits(s, lo, hi)
    overflow = bound is None or int(bound) << int(left.max(initial=0)) > (1 << 31) - 1
    pre_clamp = fits and bool(np.any(left > 0)) and overflow
    if bias is not None and (pre_clamp or not fits):
        x = add("Add", [x, const(f"{name}_bias_int32", np.asarray(bias, np.int32).reshape(cshape))], np.int32,
                name=f"{name}_bias")
        bias = None
    if fits:
        if pre_clamp:  # keep |x << l| in int32: clamp first (those values saturate)
            top = np.right_shift((1 << 31) - 1, left).astype(np.int32).reshape(shape)
            x = add("Max", [x, const(f"{name}_pre_lo", -top)], np.int32, name=f"{name}_pre_max")
            x = add("Min", [x, const(f"{name}_pre_hi", top)], np.int32, name=f"{name}_pre_min")
        op, consts = requantizer_constants(s, lo, hi, bias)
        to = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
        return add(op, [x] + [const(f"{name}_{k}", v.reshape(shape)) for k, v in consts.items()], dtype,
                   {"to": to}, domain=DOMAIN, name=f"{name}_{op}")
    right = np.maximum(s, 0)
    y = x
    if np.any(right > 0):
        y = add(WIDE_SHIFT_OP, [y] + [const(f"{name}_{k}", v.reshape(shape)) for k, v in zip("ASMB", wide_shift_constants(right))],
                np.int32, domain=DOMAIN, name=f"{name}_{WIDE_SHIFT_OP}")
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


def divide_node(add, const, x, n, name: str):
    """rounding_divide(x, n) as int32 (fixedpoint.rounding_divide). n: an int, or an int32 tensor
    (positive) computed in the graph that broadcasts against x (a window known only at run time,
    a divisor per row)."""
    i32 = lambda v: np.asarray(v, np.int32)  # noqa: E731
    two = const(f"{name}_two", i32(2))
    if isinstance(n, int):
        n, h, even = const(f"{name}_n", i32(n)), const(f"{name}_h", i32(n // 2)), const(f"{name}_even", i32(1 - n % 2))
    else:
        h = add("Div", [n, two], np.int32, name=f"{name}_h")
        even = add("Sub", [const(f"{name}_one", i32(1)), add("Mod", [n, two], np.int32, name=f"{name}_n_odd")],
                   np.int32, name=f"{name}_even")
    return add(DIVIDE_OP, [x, n, h, const(f"{name}_zero", i32(0)), two, even],
               np.int32, domain=DOMAIN, name=f"{name}_{DIVIDE_OP}")


def rounding_divide_node(add, const, x, n, lo: int, hi: int, dtype, name: str):
    """clamp(rounding_divide(x, n), lo, hi) as `dtype` (see divide_node)."""
    y = divide_node(add, const, x, n, name)
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

    def shift(x, s, cshape, lo, hi, dtype, name, bias=None, bound=None):
        return rounding_shift_node(add, const, x, np.asarray(s, np.int64), cshape, lo, hi, dtype, name, bias, bound)

    for t in g.inputs:
        if t.name in plan.requant:
            quantize_float(t.name, t)

    ir = {mod.name: mod for mod in qm.modules}
    shape_nodes = set(plan.shape_nodes)
    for m in plan.modules:  # the nodes of integer tables and binary ops are replaced at their last node
        if m.kind in ("table", "binary", "norm") and ir[m.name].integer:
            removed.update(m.nodes)
    for node in order:
        mod = ir.get(node.name)
        if mod is not None and mod.integer:
            m = plan.module(mod.name)
            for name in (m.input, m.residual_input, m.other):
                if name and name not in qt:
                    quantize_float(name, tmap[name])
            if isinstance(mod, PoolModule):
                qt[m.output] = _emit_pool(mod, tmap, qt, add, const, shift)
            elif isinstance(mod, TableModule):
                qt[m.output] = _emit_table(mod, qt, add, const)
            elif isinstance(mod, BinaryModule):
                qt[m.output] = _emit_binary(mod, qt, add, const, shift)
            elif isinstance(mod, LayerNormModule):
                qt[m.output] = _emit_layer_norm(mod, qt, add, const, shift)
            elif isinstance(mod, SoftmaxModule):
                qt[m.output] = _emit_softmax(mod, qt, add, const)
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
            for k, t in enumerate(list(node.outputs)):  # Split has several
                new = gs.Variable(new_name(g, f"{t.name}_int"), dtype=code_dtype(t.name), shape=t.shape)
                node.outputs[k] = new
                qt[t.name] = new
            continue
        if node.name in shape_nodes and node.inputs[0].name in qt:  # Shape/Size: the codes have the float tensor's shape
            node.inputs[0] = qt[node.inputs[0].name]
            continue
        for k, t in enumerate(node.inputs):  # a float op (a float output of a linear module is float already)
            if t.name in qt and t.name not in plan.float_outputs:
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
    cshape = channel_shape(mod, mod.weight.ndim if mod.op in ("Conv", "ConvTranspose") else 2)
    x = qt[mod.input.name]
    if mod.op == "Conv":
        a = mod.attrs
        attrs = {"strides": a["strides"], "dilations": a["dilations"], "group": a["group"],
                 "kernel_shape": a["kernel_shape"]}
        if a["auto_pad"] in ("NOTSET", ""):
            attrs["pads"] = a["pads"]
        else:
            attrs["auto_pad"] = a["auto_pad"]
        acc = _integer_product(add, const, "ConvInteger", x, mod.weight, attrs, mod.name)
    elif mod.op == "ConvTranspose":
        acc = _conv_transpose(mod, x, add, const)
    else:
        w = np.ascontiguousarray(mod.weight.T if mod.attrs.get("transB") else mod.weight)
        acc = _integer_product(add, const, "MatMulInteger", x, w, {}, mod.name)
    bias = None  # folded into the requantizer (or added there) when the module is requantized
    if mod.bias is not None and float_out is None:
        bias = mod.bias.astype(np.int64) << (mod.acc_shift if mod.residual is not None else 0)
    elif mod.bias is not None:
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
                 {"axis": 1 if mod.op in ("Conv", "ConvTranspose") else -1}, name=f"{mod.name}_DequantizeLinear",
                 out=None if act else float_out)
        if act:
            lo, hi = mod.act_limits
            add("Clip", [dq, const(f"{mod.name}_min", np.float32(-3.4e38 if lo is None else lo)),
                         const(f"{mod.name}_max", np.float32(3.4e38 if hi is None else hi))], np.float32,
                name=f"{mod.name}_Clip", out=float_out)
        return y
    return shift(acc, mod.shift, cshape, mod.code_min, mod.code_max,
                 np.uint8 if mod.output.unsigned else np.int8, mod.output_name, bias, mod.acc_bound)


ZERO_POINT = 128  # int8 codes and weights enter the integer kernels as uint8 + 128


def _integer_product(add, const, op, x, w: np.ndarray, attrs: dict, name: str):
    """ConvInteger / MatMulInteger of codes x and int8 weight codes w into int32, both operands as
    uint8 with zero points (int8 codes shifted by 128: a Cast and a BitwiseXor of the sign bit).
    onnxruntime's u8 x u8 kernels widen to 16 bits before multiplying, so they are exact on every
    CPU (its u8 x s8 kernels sum pairs in int16 and can saturate without VNNI), and they are
    several times faster than its int8-weight path; the int32 result wraps modulo 2^32 inside the
    kernel at most, and the IR proves the true sum fits."""
    x, xz = _as_uint8(add, const, x, f"{name}_x")
    wu = w.view(np.uint8) ^ np.uint8(ZERO_POINT)  # = w + 128 as uint8, without an int16 temporary
    wz = const(f"{name}_w_zero_point", np.array(ZERO_POINT, np.uint8))
    return add(op, [x, const(f"{name}_weight_uint8", wu), xz, wz], np.int32, attrs, name=f"{name}_{op}")


def _emit_table(mod: TableModule, qt, add, const):
    """A table lookup: Gather of the table's entries (flattened) at the code plus
    fixedpoint.table_index_offset (-code_min, and the channel's row for a per-channel table)."""
    dtype = np.uint8 if mod.output.unsigned else np.int8
    x = add("Cast", [qt[mod.input.name]], np.int32, {"to": TensorProto.INT32}, name=f"{mod.name}_index_cast")
    x = add("Add", [x, const(f"{mod.name}_index_offset", table_index_offset(mod).astype(np.int32))], np.int32,
            name=f"{mod.name}_index")
    return add("Gather", [const(f"{mod.name}_table", mod.table.reshape(-1).astype(dtype)), x], dtype, {"axis": 0},
               name=f"{mod.name}_table_lookup")


def _emit_binary(mod: BinaryModule, qt, add, const, shift):
    """Mul / Add / Sub of two code tensors in int32 (aligned by shifts), or MatMulInteger of two
    code tensors, then one rounding shift."""
    dtype = np.uint8 if mod.output.unsigned else np.int8
    a, b = qt[mod.input.name], qt[mod.other.name]
    if mod.op == "MatMul":
        au, az = _as_uint8(add, const, a, f"{mod.name}_a")
        bu, bz = _as_uint8(add, const, b, f"{mod.name}_b")
        acc = add("MatMulInteger", [au, bu, az, bz], np.int32, name=f"{mod.name}_MatMulInteger")
    else:
        a, b = (add("Cast", [t], np.int32, {"to": TensorProto.INT32}, name=f"{mod.name}_{k}_cast")
                for t, k in ((a, "a"), (b, "b")))
        if mod.op != "Mul":
            a, b = (t if k == 0 else
                    add("Mul", [t, const(f"{mod.name}_{n}_scale", np.int32(1 << k))], np.int32, name=f"{mod.name}_{n}_shift")
                    if k > 0 else shift(t, -k, (), -(1 << 31), (1 << 31) - 1, np.int32, f"{mod.name}_{n}")
                    for t, k, n in ((a, mod.a_shift, "a"), (b, mod.b_shift, "b")))
        acc = add(mod.op, [a, b], np.int32, name=f"{mod.name}_{mod.op}")
    return shift(acc, mod.shift, (), mod.code_min, mod.code_max, dtype, mod.output_name, None, mod.acc_bound)


ISQRT_BITS = 16  # integer square roots of int32 values are below 2^16


def _emit_layer_norm(mod: LayerNormModule, qt, add, const, shift):
    """LayerNormModule's integer steps: ReduceSum, a rounding division for the mean (at mean_bits
    extra bits), the sum of
    squares, an integer square root (ISQRT_BITS steps of binary search, c <= v / c), a rounding
    division per row, then one rounding shift with the offset folded in."""
    i32 = lambda v: np.asarray(v, np.int32)  # noqa: E731
    name = mod.name
    last = const(f"{name}_axis", np.array([-1], np.int64))
    x = add("Cast", [qt[mod.input.name]], np.int32, {"to": TensorProto.INT32}, name=f"{name}_cast")
    total = add("ReduceSum", [x, last], np.int32, {"keepdims": 1}, name=f"{name}_sum")
    if mod.mean_bits:
        scale = const(f"{name}_mean_scale", i32(1 << mod.mean_bits))
        x = add("Mul", [x, scale], np.int32, name=f"{name}_x_fine")
        total = add("Mul", [total, scale], np.int32, name=f"{name}_sum_fine")
    d = add("Sub", [x, divide_node(add, const, total, mod.width, f"{name}_mean")], np.int32, name=f"{name}_centre")
    v = add("ReduceSum", [add("Mul", [d, d], np.int32, name=f"{name}_square"), last], np.int32, {"keepdims": 1},
            name=f"{name}_sum_squares")
    v = add("Add", [v, const(f"{name}_eps", i32(mod.eps_code))], np.int32, name=f"{name}_eps_add")
    r = add("Mul", [v, const(f"{name}_zero", i32(0))], np.int32, name=f"{name}_root0")
    for b in range(ISQRT_BITS - 1, -1, -1):
        c = add("Add", [r, const(f"{name}_bit{b}", i32(1 << b))], np.int32, name=f"{name}_try{b}")
        ok = add("LessOrEqual", [c, add("Div", [v, c], np.int32, name=f"{name}_quot{b}")], np.bool_, name=f"{name}_fits{b}")
        r = add("Where", [ok, c, r], np.int32, name=f"{name}_root{b}")
    sd = add("Max", [r, const(f"{name}_one", i32(1))], np.int32, name=f"{name}_sd")
    t = add("Mul", [d, const(f"{name}_gain", i32(mod.gain))], np.int32, name=f"{name}_scale")
    q = divide_node(add, const, t, sd, f"{name}_normalize")
    dtype = np.uint8 if mod.output.unsigned else np.int8
    return shift(q, np.full(mod.width, mod.gain_shift), (mod.width,), mod.code_min, mod.code_max, dtype,
                 mod.output_name, mod.offset, mod.acc_bound)


def _emit_softmax(mod: SoftmaxModule, qt, add, const):
    """SoftmaxModule: ReduceMax, the exp table gathered at max - x, ReduceSum, one rounding division."""
    name = mod.name
    last = const(f"{name}_axis", np.array([-1], np.int64))
    x = add("Cast", [qt[mod.input.name]], np.int32, {"to": TensorProto.INT32}, name=f"{name}_cast")
    top = add("ReduceMax", [x, last], np.int32, {"keepdims": 1}, name=f"{name}_max")
    e = add("Gather", [const(f"{name}_exp", mod.exp_table.astype(np.int32)),
                       add("Sub", [top, x], np.int32, name=f"{name}_below_max")], np.int32, {"axis": 0},
            name=f"{name}_exp_lookup")
    total = add("ReduceSum", [e, last], np.int32, {"keepdims": 1}, name=f"{name}_sum")
    num = add("Mul", [e, const(f"{name}_out_scale", np.int32(1 << mod.output.frac))], np.int32, name=f"{name}_numerator")
    dtype = np.uint8 if mod.output.unsigned else np.int8
    return rounding_divide_node(add, const, num, total, mod.code_min, mod.code_max, dtype, mod.output_name)


def _conv_transpose(mod: LinearModule, x, add, const):
    """A ConvTranspose (group 1) as a ConvInteger: the input codes with stride - 1 zero codes
    inserted between neighbours (Unsqueeze, Pad with zeros, Reshape to the runtime shape times the
    strides, Slice off the trailing zeros), then a stride-1 convolution with the kernel flipped and
    its in/out axes swapped, padded by dilation (kernel - 1) - pad (quantized.conv_transpose_pads)."""
    a = mod.attrs
    nd = len(a["kernel_shape"])
    s = a["strides"]
    i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
    name = mod.name
    if any(v > 1 for v in s):
        axes = [3 + 2 * i for i in range(nd)]
        u = add("Unsqueeze", [x, const(f"{name}_axes", i64(axes))], x.dtype, name=f"{name}_unsqueeze")
        pads = [0] * (2 + 2 * nd) + [0, 0] + [v for i in range(nd) for v in (0, s[i] - 1)]
        u = add("Pad", [u, const(f"{name}_dilate_pads", i64(pads))], x.dtype, name=f"{name}_insert_zeros")
        dims = add("Shape", [x], np.int64, name=f"{name}_shape")
        head = add("Slice", [dims, const(f"{name}_s0", i64([0])), const(f"{name}_s2", i64([2]))], np.int64,
                   name=f"{name}_batch_channels")
        spatial = add("Slice", [dims, const(f"{name}_s2b", i64([2])), const(f"{name}_end", i64([2 + nd]))], np.int64,
                      name=f"{name}_spatial")
        spatial = add("Mul", [spatial, const(f"{name}_strides", i64(s))], np.int64, name=f"{name}_spatial_times_stride")
        target = add("Concat", [head, spatial], np.int64, {"axis": 0}, name=f"{name}_dilated_shape")
        u = add("Reshape", [u, target], x.dtype, name=f"{name}_dilated")
        big = np.iinfo(np.int64).max
        x = add("Slice", [u, const(f"{name}_starts", i64([0] * nd)),
                          const(f"{name}_ends", i64([-(v - 1) if v > 1 else big for v in s])),
                          const(f"{name}_slice_axes", i64(list(range(2, 2 + nd))))], x.dtype, name=f"{name}_trim")
    w = np.ascontiguousarray(np.flip(np.swapaxes(mod.weight, 0, 1), axis=tuple(range(2, 2 + nd))))
    attrs = {"strides": [1] * nd, "dilations": a["dilations"], "group": 1, "kernel_shape": a["kernel_shape"],
             "pads": conv_transpose_pads(a)}
    return _integer_product(add, const, "ConvInteger", x, w, attrs, name)


def _as_uint8(add, const, x, name: str):
    """(uint8 codes, zero point) of a code tensor: uint8 as it is (zero point 0), int8 shifted by
    128 (a Cast and a BitwiseXor of the sign bit; zero point 128)."""
    if x.dtype == np.uint8:
        return x, const(f"{name}_zero_point", np.array(0, np.uint8))
    u = add("Cast", [x], np.uint8, {"to": TensorProto.UINT8}, name=f"{name}_as_uint8")
    u = add("BitwiseXor", [u, const(f"{name}_sign_bit", np.array(ZERO_POINT, np.uint8))], np.uint8,
            name=f"{name}_offset")
    return u, const(f"{name}_zero_point", np.array(ZERO_POINT, np.uint8))


def _emit_pool(mod: PoolModule, tmap, qt, add, const, shift):
    """Average = integer window sum, then one rounding shift (or division) at the same fraction.
    AveragePool sums with a depthwise ConvInteger whose kernel is all ones."""
    dtype = np.uint8 if mod.output.unsigned else np.int8
    if mod.op == "GlobalAveragePool":
        x = add("Cast", [qt[mod.input.name]], np.int32, {"to": TensorProto.INT32}, name=f"{mod.name}_cast")
        spatial = list(range(2, len(tmap[mod.input.name].shape)))
        acc = add("ReduceSum", [x, const(f"{mod.name}_axes", np.array(spatial, dtype=np.int64))], np.int32,
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
        acc = _integer_product(add, const, "ConvInteger", qt[mod.input.name], np.ones([c, 1] + k, dtype=np.int8),
                               attrs, f"{mod.name}_window_sum")
    if mod.shift is not None:
        return shift(acc, mod.shift, (), mod.code_min, mod.code_max, dtype, mod.output_name)
    n = mod.window
    if n is None:  # dynamic spatial dims: H*W from the codes' runtime shape
        i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
        dims = add("Shape", [qt[mod.input.name]], np.int64, name=f"{mod.name}_shape")
        hw = add("Slice", [dims, const(f"{mod.name}_s2", i64([2])), const(f"{mod.name}_s4", i64([4]))], np.int64,
                 name=f"{mod.name}_spatial")
        n = add("Cast", [add("ReduceProd", [hw], np.int64, {"keepdims": 0}, name=f"{mod.name}_window")], np.int32,
                {"to": TensorProto.INT32}, name=f"{mod.name}_window_i32")
    return rounding_divide_node(add, const, acc, n, mod.code_min, mod.code_max, dtype, mod.output_name)
