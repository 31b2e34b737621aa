"""Hypothesis strategy for small random *float* ONNX models plus input data.

    from graphgen import graphs, BLOCKS

    @given(graphs())                 # or graphs(ops=["conv", "pool"])
    def test_something(case):
        case.model, case.feeds_calib, case.feeds_test, case.description, case.reference_ok

Each model: opset 19 (default domain only), ir_version 9, one float32 input "input" with a
dynamic batch dimension "N" ([N, C, H, W] with C in 1..6 and H, W in 5..12, or [N, K] / [N, T, K]
when the first block is of the matmul family), a chain of 1..4 blocks (some with internal
branches: residual, concat, Gemm with a computed C), and one or two graph outputs whose static
shapes are declared. Every tensor keeps <= 8 channels and spatial dims <= 12.

Structure (block kinds, attributes, channel counts) is drawn through hypothesis; the numbers
(weights, biases, input samples) come from numpy's default_rng seeded by one drawn integer, so
cases shrink well.

Validity: every generated model passes onnx.checker.check_model(full_check=True), runs under
onnxruntime 1.32 CPU at every optimization level, and has the output shapes declared in the
graph. onnx.reference (onnx 1.23) agrees with onnxruntime except for the attribute combinations
listed in `Case.reference_gaps` (then `Case.reference_ok` is False); see `_maxpool_reference_gaps`
and `_avgpool_reference_gaps` for the exact rules.

Combinations that are NOT generated (onnxruntime or onnx itself rejects / disagrees):
  * Conv with auto_pad SAME_UPPER/SAME_LOWER and any dilation != 1: onnxruntime fails
    ("Dilation not supported for AutoPadType::SAME_UPPER or AutoPadType::SAME_LOWER").
  * MaxPool/AveragePool with ceil_mode=1 and explicit pads where the extra ceil window would
    start in the tail padding ((ceil_out - 1) * stride >= in + pad_begin): onnxruntime drops that
    window, onnx 1.23 shape inference keeps it, so shapes disagree (check_model fails when the pool
    output is declared). Controlled by GENERATE_CEIL_WINDOW_IN_TAIL_PAD (default False).
  * ConvTranspose with auto_pad SAME_* and output_padding != 0 (onnx shape inference and
    onnxruntime disagree), kernel 1 (with SAME_* and stride 2 onnx.reference gets the shape
    wrong) and group != 1.
  * A Gemm output as an extra graph output in Transpose -> Gemm(transA=1) -> Transpose ->
    Gemm(transA=1): onnxruntime bug, see AVOID_ORT_GEMM_TRANSPOSE_OUTPUT_BUG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import note
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 19
IR_VERSION = 9
INPUT_NAME = "input"
BLOCKS = ("conv", "convtranspose", "gemm", "matmul", "residual", "concat", "pool", "reshape", "table", "gate",
          "attention")
RANK4_ONLY = frozenset({"conv", "convtranspose", "residual", "concat", "pool", "gate"})
# elementwise activations as exporters spell them (each a table module)
TABLE_SPELLINGS = ("Sigmoid", "Tanh", "HardSwish", "HardSigmoid(0.2)", "Elu", "LeakyRelu(0.2)", "Softplus",
                   "x*Sigmoid(x)", "gelu_erf", "gelu_tanh", "mish", "PRelu")
ACTIVATIONS = ("none", "relu", "relu6", "clip", "leakyrelu")
MAX_CH = 8
MAX_HW = 12
N_CALIB = 32
N_TEST = 16

# onnxruntime 1.32 bug (a basic-level graph optimization, likely GemmTransposeFusion; fine with
# ORT_DISABLE_ALL, fails with ORT_ENABLE_BASIC and above): in
#   Transpose -> Gemm(transA=1) -> Transpose -> Gemm(transA=1)
# when the first Gemm's output is also a graph output, session creation fails with "Failed to
# find node output or a constant initializer producing output: <first Gemm output>".
# True: such a Gemm output is never chosen as an extra graph output.
AVOID_ORT_GEMM_TRANSPOSE_OUTPUT_BUG = True

# Pools with ceil_mode=1 whose last (ceil) window would start inside the tail padding:
# onnxruntime 1.32 drops that window, onnx 1.23 shape inference does not, so the model's shapes
# are inconsistent. False: such pads are repaired (pad_end reduced) before emitting the node.
GENERATE_CEIL_WINDOW_IN_TAIL_PAD = False


@dataclass(repr=False)
class Case:
    model: onnx.ModelProto
    feeds_calib: dict  # input name -> float32 array, N_CALIB samples along the batch axis
    feeds_test: dict  # input name -> float32 array, N_TEST other samples
    description: str  # one line: the blocks and their attributes
    reference_ok: bool = True  # False: onnx.reference is known to disagree with onnxruntime
    reference_gaps: tuple = ()  # why reference_ok is False (one string per offending node)
    blocks: tuple = ()  # the block kinds drawn, in order
    output_shapes: dict = field(default_factory=dict)  # output name -> shape, None for batch

    def __repr__(self):
        ref = "" if self.reference_ok else f" reference_gaps={list(self.reference_gaps)}"
        return f"Case({self.description}{ref})"

    def _repr_pretty_(self, p, cycle):  # hypothesis' pretty printer: no model or array dumps
        p.text(repr(self))


@dataclass(frozen=True)
class _T:
    """A tensor in the graph being built. shape[0] is None: the dynamic batch "N"."""
    name: str
    shape: tuple

    @property
    def rank(self):
        return len(self.shape)


class _Builder:
    def __init__(self, rng):
        self.rng = rng
        self.nodes, self.inits = [], []
        self.gaps = []
        self._count = {}

    def uniq(self, base):
        i = self._count.get(base, 0)
        self._count[base] = i + 1
        return f"{base}_{i}"

    def const(self, base, arr):
        name = self.uniq(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op_type, inputs, shape, **attrs):
        name = self.uniq(op_type)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return _T(out, tuple(shape))

    def he(self, shape, fan_in, gain=1.0):
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in) * gain).astype(np.float32)

    def bias(self, n, gain=1.0):
        return (self.rng.standard_normal(n) * 0.1 * gain).astype(np.float32)


def _pick(lo, hi):
    """Uniform choice of an integer in [lo, hi], shrinking to lo. (st.integers favours its lower
    bound: ceil_mode=1 or count_include_pad=1 came up about 1 time in 7.)"""
    return st.sampled_from(range(lo, hi + 1))


def _note(text):
    try:
        note(text)
    except Exception:  # outside a test (e.g. .example())
        pass


# ---------------------------------------------------------------------------------------------
# activations

def _activation(draw, b, t, choices=ACTIVATIONS):
    act = draw(st.sampled_from(choices))
    if act == "none":
        return t, ""
    if act == "relu":
        return b.node("Relu", [t.name], t.shape), "+relu"
    if act == "leakyrelu":
        return b.node("LeakyRelu", [t.name], t.shape, alpha=0.1), "+leakyrelu(0.1)"
    if act == "relu6":
        lo, hi = 0.0, 6.0
    else:
        lo = draw(st.sampled_from([-1.0, 0.0, -0.5, 0.25]))
        hi = draw(st.sampled_from([2.0, 1.0, 0.5, 4.0]))
        if hi <= lo:
            hi = lo + 1.0
    mn = b.const("clip_min", np.array(lo, np.float32))
    mx = b.const("clip_max", np.array(hi, np.float32))
    out = b.node("Clip", [t.name, mn, mx], t.shape)
    return out, ("+relu6" if act == "relu6" else f"+clip({lo:g},{hi:g})")


# ---------------------------------------------------------------------------------------------
# Conv

def _conv_dim(draw, n_lo, n_hi, mode, stride=None):
    """Kernel, stride, dilation, pads for one spatial dim valid for sizes n_lo..n_hi."""
    k = draw(_pick(1, min(3, n_lo)))
    s = draw(_pick(1, 2)) if stride is None else stride
    d = 1
    if mode in ("explicit", "VALID") and k > 1 and 2 * (k - 1) + 1 <= n_lo:
        d = draw(_pick(1, 2))  # SAME_* with dilation != 1 fails in onnxruntime
    return k, s, d


def _set_pads(attrs: dict, mode: str, pads: list) -> str:
    """Explicit pads or an auto_pad mode into attrs; returns its text for the description."""
    if mode == "explicit":
        attrs["pads"] = pads
        return f"pads={pads}"
    attrs["auto_pad"] = mode
    return mode


def _conv_out(n, k, s, d, mode, pb, pe):
    dk = (k - 1) * d + 1
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return -(-n // s)
    if mode == "VALID":
        return (n - dk) // s + 1
    return (n + pb + pe - dk) // s + 1


def _draw_pads(draw, dk, n_hi, s, sym):
    """Explicit (pb, pe), each < effective kernel, output <= MAX_HW."""
    pmax = min(2 * (dk - 1), MAX_HW * s - 1 - n_hi + dk)
    if sym:
        pb = draw(_pick(0, max(0, min(dk - 1, pmax // 2))))
        return pb, pb
    pb = draw(_pick(0, max(0, min(dk - 1, pmax))))
    pe = draw(_pick(0, max(0, min(dk - 1, pmax - pb))))
    return pb, pe


def _draw_conv_geometry(draw, h, w):
    """General Conv geometry. Returns (attrs, (ho, wo), text)."""
    mode = draw(st.sampled_from(["explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    square = draw(st.booleans())
    sym = draw(st.booleans()) if mode == "explicit" else True
    dims = []
    if square:
        k, s, d = _conv_dim(draw, min(h, w), max(h, w), mode)
        dims = [(k, s, d), (k, s, d)]
    else:
        dims = [_conv_dim(draw, n, n, mode) for n in (h, w)]
    pads_b, pads_e, outs = [], [], []
    for (k, s, d), n in zip(dims, (h, w)):
        pb = pe = 0
        if mode == "explicit":
            pb, pe = _draw_pads(draw, (k - 1) * d + 1, max(h, w) if square else n, s, sym)
        pads_b.append(pb)
        pads_e.append(pe)
        outs.append(_conv_out(n, k, s, d, mode, pb, pe))
    attrs = dict(kernel_shape=[x[0] for x in dims], strides=[x[1] for x in dims],
                 dilations=[x[2] for x in dims])
    ptxt = _set_pads(attrs, mode, pads_b + pads_e)
    text = (f"k={attrs['kernel_shape']} s={attrs['strides']} d={attrs['dilations']} {ptxt}")
    return attrs, tuple(outs), text


def _draw_same_geometry(draw, h, w, stride):
    """Conv geometry keeping the spatial size (stride 1) or giving ceil(n/2) (stride 2); the
    output size depends only on (h, w, stride), so two such convs can be added."""
    k = draw(st.sampled_from([3, 1]))
    mode = draw(st.sampled_from(["explicit", "SAME_UPPER", "SAME_LOWER"]))
    d = 1
    if k == 3 and mode == "explicit" and min(h, w) >= 3:
        d = draw(_pick(1, 2))
    attrs = dict(kernel_shape=[k, k], strides=[stride, stride], dilations=[d, d])
    if mode == "explicit":
        p = (k - 1) * d // 2
        attrs["pads"] = [p, p, p, p]
        ptxt = f"pads={attrs['pads']}"
    else:
        attrs["auto_pad"] = mode
        ptxt = mode
    outs = (-(-h // stride), -(-w // stride))
    return attrs, outs, f"k={k} s={stride} d={d} {ptxt}"


def _draw_group(draw, cin, cout=None):
    """(group, cout): group 1, depthwise, or a proper divisor of cin."""
    divs = [g for g in range(2, cin) if cin % g == 0]
    kinds = ["1"]
    if cin > 1 and (cout is None or cout % cin == 0):
        kinds.append("depthwise")
    if divs and (cout is None or any(cout % g == 0 for g in divs)):
        kinds.append("grouped")
    kind = draw(st.sampled_from(kinds))
    if kind == "1":
        return 1, (cout if cout is not None else draw(_pick(1, MAX_CH)))
    if kind == "depthwise":
        if cout is None:
            cout = cin * draw(_pick(1, max(1, MAX_CH // cin)))
        return cin, cout
    if cout is not None:
        divs = [g for g in divs if cout % g == 0]
    g = draw(st.sampled_from(divs))
    if cout is None:
        cout = g * draw(_pick(1, MAX_CH // g))
    return g, cout


def _emit_conv(draw, b, t, attrs, group, cout, gain=1.0, ch_exps=None, bias=None):
    cin = t.shape[1]
    k = attrs["kernel_shape"]
    fan_in = cin // group * k[0] * k[1]
    wt = b.he((cout, cin // group, k[0], k[1]), fan_in, gain)
    scale = np.ones(cout, np.float32)
    if ch_exps is not None:
        scale = np.array([2.0 ** e for e in ch_exps], np.float32)
        wt = wt * scale[:, None, None, None]
    inputs = [t.name, b.const("W", wt)]
    if bias is None:
        bias = draw(st.booleans())
    if bias:
        inputs.append(b.const("B", b.bias(cout, gain) * scale))
    return inputs, bias


def _conv_node(b, t, inputs, attrs, group, cout, outs):
    return b.node("Conv", inputs, (None, cout) + tuple(outs), group=group, **attrs)


def _block_conv(draw, b, t, act_choices=ACTIVATIONS):
    attrs, outs, gtxt = _draw_conv_geometry(draw, t.shape[2], t.shape[3])
    group, cout = _draw_group(draw, t.shape[1])
    inputs, has_bias = _emit_conv(draw, b, t, attrs, group, cout)
    y = _conv_node(b, t, inputs, attrs, group, cout, outs)
    y, atxt = _activation(draw, b, y, act_choices)
    return y, f"conv({gtxt} g={group} c={t.shape[1]}->{cout}{' bias' if has_bias else ''}){atxt}"


# ---------------------------------------------------------------------------------------------
# ConvTranspose

def _block_convtranspose(draw, b, t):
    h, w = t.shape[2], t.shape[3]
    modes = ["explicit", "SAME_UPPER", "SAME_LOWER"] + (["VALID"] if max(h, w) <= MAX_HW - 1 else [])
    mode = draw(st.sampled_from(modes))
    ks, ss, pb_, pe_, ops_, outs = [], [], [], [], [], []
    for n in (h, w):
        if mode == "VALID":
            k = draw(_pick(2, min(3, MAX_HW + 1 - n)))
        else:
            k = draw(_pick(2, 3))
        s2_ok = {"explicit": 2 * n - k <= MAX_HW, "VALID": 2 * (n - 1) + k <= MAX_HW}.get(mode, 2 * n <= MAX_HW)
        s = draw(_pick(1, 2)) if s2_ok else 1
        op = 0
        if mode == "explicit":  # smallest output (full pads, no output_padding) is s*(n-1)-k+2
            op = draw(_pick(0, min(s - 1, MAX_HW - (s * (n - 1) - k + 2))))
        pb = pe = 0
        if mode == "explicit":
            full = s * (n - 1) + op + k  # output without pads
            pmin, pmax = max(0, full - MAX_HW), min(2 * (k - 1), full - 1)
            pb = draw(_pick(max(0, pmin - (k - 1)), min(k - 1, pmax)))
            pe = draw(_pick(max(0, pmin - pb), min(k - 1, pmax - pb)))
            out = full - pb - pe
        elif mode == "VALID":
            out = s * (n - 1) + k
        else:
            out = n * s
        ks.append(k); ss.append(s); pb_.append(pb); pe_.append(pe); ops_.append(op); outs.append(out)
    cin = t.shape[1]
    cout = draw(_pick(1, MAX_CH))
    attrs = dict(kernel_shape=ks, strides=ss)
    if mode == "explicit":
        attrs["pads"] = pb_ + pe_
        if any(ops_):
            attrs["output_padding"] = ops_
        ptxt = f"pads={attrs['pads']} output_padding={ops_}"
    else:
        attrs["auto_pad"] = mode
        ptxt = mode
    # weight [cin, cout, kh, kw]; each output sees about cin*kh*kw/(sh*sw) taps
    fan_in = max(1, cin * ks[0] * ks[1] // (ss[0] * ss[1]))
    inputs = [t.name, b.const("W", b.he((cin, cout, ks[0], ks[1]), fan_in))]
    has_bias = draw(st.booleans())
    if has_bias:
        inputs.append(b.const("B", b.bias(cout)))
    y = b.node("ConvTranspose", inputs, (None, cout, outs[0], outs[1]), **attrs)
    y, atxt = _activation(draw, b, y, ("none", "relu"))
    return y, (f"convtranspose(k={ks} s={ss} {ptxt} c={cin}->{cout}"
               f"{' bias' if has_bias else ''}){atxt}")


# ---------------------------------------------------------------------------------------------
# Gemm / MatMul

def _flatten(b, t):
    k = int(np.prod(t.shape[1:]))
    return b.node("Flatten", [t.name], (None, k), axis=1)


def _block_gemm(draw, b, t):
    pre = ""
    if t.rank != 2:
        t = _flatten(b, t)
        pre = "flatten+"
    k = t.shape[1]
    nout = draw(_pick(1, MAX_CH))
    trans_a = draw(_pick(0, 1))
    trans_b = draw(_pick(0, 1))
    alpha = draw(st.sampled_from([1.0, 0.5, 2.0]))
    beta = draw(st.sampled_from([1.0, 0.5, 2.0]))
    c_kind = draw(st.sampled_from(["none", "vector", "matrix", "computed"]))
    wt = b.he((k, nout), k, 1.0 / alpha)
    if trans_b:
        wt = np.ascontiguousarray(wt.T)
    a = t
    if trans_a:
        a = b.node("Transpose", [t.name], (k, None), perm=[1, 0])
    inputs = [a.name, b.const("W", wt)]
    ctxt = c_kind
    if c_kind == "vector":
        inputs.append(b.const("C", b.bias(nout)))
    elif c_kind == "matrix":
        inputs.append(b.const("C", b.bias((1, nout))))
    elif c_kind == "computed":
        via = draw(st.sampled_from(["MatMul", "Gemm"]))
        w2 = b.const("W", b.he((k, nout), k, 0.5 / beta))
        if via == "MatMul":
            c = b.node("MatMul", [t.name, w2], (None, nout))
        else:
            c = b.node("Gemm", [t.name, w2, b.const("C", b.bias(nout))], (None, nout))
        inputs.append(c.name)
        ctxt = f"computed by {via}"
    y = b.node("Gemm", inputs, (None, nout), transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    y, atxt = _activation(draw, b, y, ("none", "relu", "leakyrelu"))
    return y, (f"{pre}{'transpose+' if trans_a else ''}gemm(transA={trans_a} transB={trans_b} "
               f"alpha={alpha:g} beta={beta:g} C={ctxt} {k}->{nout}){atxt}")


def _block_matmul(draw, b, t, act_choices=("none", "relu", "relu6")):
    pre = ""
    if t.rank == 4:
        if draw(st.booleans()):
            t = _flatten(b, t)
            pre = "flatten+"
        else:
            c, h, w = t.shape[1:]
            shape = b.const("shape", np.array([0, c, h * w], np.int64))
            t = b.node("Reshape", [t.name, shape], (None, c, h * w))
            pre = f"reshape[N,{c},{h * w}]+"
    k = t.shape[-1]
    nout = draw(_pick(1, MAX_CH))
    y = b.node("MatMul", [t.name, b.const("W", b.he((k, nout), k))], t.shape[:-1] + (nout,))
    has_bias = draw(st.booleans())
    if has_bias:
        y = b.node("Add", [y.name, b.const("B", b.bias(nout))], y.shape)
    y, atxt = _activation(draw, b, y, act_choices)
    return y, f"{pre}matmul(rank{t.rank} {k}->{nout}{' +bias' if has_bias else ''}){atxt}"


# ---------------------------------------------------------------------------------------------
# Residual / Concat

def _block_residual(draw, b, t):
    c, h, w = t.shape[1:]
    variant = draw(st.sampled_from(["identity", "projection"]))
    stride = 1 if variant == "identity" else draw(_pick(1, 2))
    cout = c if variant == "identity" else draw(_pick(1, MAX_CH))
    two = draw(st.booleans())
    k_a = draw(st.integers(-6, 6))
    per_ch = draw(st.booleans())
    exps = draw(st.lists(st.integers(-6, 6), min_size=cout, max_size=cout)) if per_ch else None
    parts = []
    # branch A: conv [act conv], the last conv scaled by 2^k_a (and per channel)
    attrs, outs, gtxt = _draw_same_geometry(draw, h, w, stride)
    if two:
        group, cmid = _draw_group(draw, c)
        inputs, _ = _emit_conv(draw, b, t, attrs, group, cmid)
        a = _conv_node(b, t, inputs, attrs, group, cmid, outs)
        a, atxt = _activation(draw, b, a, ("relu", "none", "relu6", "leakyrelu"))
        parts.append(f"conv({gtxt} g={group} {c}->{cmid}){atxt}")
        attrs, outs, gtxt = _draw_same_geometry(draw, outs[0], outs[1], 1)
    else:
        a = t
    cin_last = a.shape[1]
    group, _ = _draw_group(draw, cin_last, cout)
    inputs, _ = _emit_conv(draw, b, a, attrs, group, cout, gain=2.0 ** k_a, ch_exps=exps)
    a = _conv_node(b, a, inputs, attrs, group, cout, outs)
    parts.append(f"conv({gtxt} g={group} {cin_last}->{cout} x2^{k_a}"
                 f"{' per-ch 2^' + str(exps) if per_ch else ''})")
    # branch B: identity or projection conv scaled by 2^k_b
    if variant == "identity":
        bb = t
        btxt = "identity"
    else:
        k_b = draw(st.integers(-6, 6))
        battrs, bouts, bgtxt = _draw_same_geometry(draw, h, w, stride)
        inputs, _ = _emit_conv(draw, b, t, battrs, 1, cout, gain=2.0 ** k_b)
        bb = _conv_node(b, t, inputs, battrs, 1, cout, bouts)
        btxt = f"conv({bgtxt} {c}->{cout} x2^{k_b})"
        assert bouts == outs
    first, second = (a, bb) if draw(st.booleans()) else (bb, a)
    y = b.node("Add", [first.name, second.name], a.shape)
    y, atxt = _activation(draw, b, y, ("none", "relu"))
    return y, f"residual[{' '.join(parts)} | {btxt}]{atxt}"


def _block_concat(draw, b, t):
    c, h, w = t.shape[1:]
    c1 = draw(_pick(1, MAX_CH // 2))
    c2 = draw(_pick(1, MAX_CH // 2))
    k_s = draw(st.integers(-4, 4))
    a1, o1, g1 = _draw_same_geometry(draw, h, w, 1)
    inputs, _ = _emit_conv(draw, b, t, a1, 1, c1)
    u = b.node("Relu", [_conv_node(b, t, inputs, a1, 1, c1, o1).name], (None, c1) + o1)
    a2, o2, g2 = _draw_same_geometry(draw, h, w, 1)
    inputs, _ = _emit_conv(draw, b, t, a2, 1, c2, gain=2.0 ** k_s)
    s = _conv_node(b, t, inputs, a2, 1, c2, o2)
    unsigned_first = draw(st.booleans())
    pair = (u, s) if unsigned_first else (s, u)
    cat = b.node("Concat", [pair[0].name, pair[1].name], (None, c1 + c2, h, w), axis=1)
    y, ctxt = _block_conv(draw, b, cat)
    order = (f"conv({g1} {c}->{c1})+relu, conv({g2} {c}->{c2} x2^{k_s})")
    if not unsigned_first:
        order = f"conv({g2} {c}->{c2} x2^{k_s}), conv({g1} {c}->{c1})+relu"
    return y, f"concat[{order}] -> {ctxt}"


# ---------------------------------------------------------------------------------------------
# Pools

def _pool_out(n, k, s, mode, ceil, pb, pe):
    """Output size as computed by onnxruntime 1.32."""
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return -(-n // s)
    if mode == "VALID":
        pb = pe = 0
    span = n + pb + pe - k
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + pb:
        out -= 1
    return out


def _ceil_tail_window(n, k, s, pb, pe):
    out = -(-(n + pb + pe - k) // s) + 1
    return (out - 1) * s >= n + pb


def _maxpool_reference_gaps(shape, k, s, mode, ceil, pb, pe):
    """Why onnx.reference 1.23 MaxPool disagrees with onnxruntime, or [] (see module doc).

    onnx.reference has two MaxPool implementations: all strides 1 -> _op_common_pool.CommonPool,
    otherwise MaxPool._max_pool."""
    n = shape[2:]
    gaps = []
    if all(x == 1 for x in s):
        if mode == "explicit":
            # reads pads [x1_begin, x2_begin, x1_end, x2_end] as [top, bottom, left, right]
            if pb[1] != pe[0]:
                gaps.append("MaxPool strides=1 explicit pads with pads[1] != pads[2]: reference "
                            "reads pads as [top, bottom, left, right]")
            # with ceil_mode=1 the pads are counted twice in the output size
            if ceil and sum(pb) + sum(pe) > 0:
                gaps.append("MaxPool strides=1 ceil_mode=1 with nonzero pads: reference counts "
                            "the pads twice (output too large)")
    else:
        if mode == "SAME_LOWER":
            for i in range(2):
                out = -(-n[i] // s[i])
                pad = (out - 1) * s[i] + k[i] - n[i]
                if n[i] % s[i]:
                    gaps.append(f"MaxPool strides={list(s)} SAME_LOWER, dim {i} size {n[i]} not a "
                                "multiple of the stride: reference output size floor(n/s)")
                elif pad % 2:
                    gaps.append(f"MaxPool strides={list(s)} SAME_LOWER, dim {i} odd total pad "
                                f"{pad}: reference puts the extra pad at the end (SAME_UPPER)")
        if mode == "VALID" and ceil:
            for i in range(2):
                if (n[i] - k[i]) % s[i]:
                    gaps.append(f"MaxPool strides={list(s)} VALID ceil_mode=1, dim {i} "
                                f"(n-k)={n[i] - k[i]} not a multiple of the stride: reference "
                                "ignores ceil_mode")
    return gaps


def _avgpool_reference_gaps(mode, ceil):
    if mode != "explicit" and ceil:
        return [f"AveragePool auto_pad={mode} ceil_mode=1: reference raises "
                "AssertionError('ceil_mode is not supported with auto_pad')"]
    return []


def _block_pool(draw, b, t):
    c, h, w = t.shape[1:]
    # GlobalAveragePool less often: after it only 1x1 maps are left to pool
    kinds = ["MaxPool", "AveragePool"] * 2 + ["GlobalAveragePool"] if min(h, w) >= 2 else ["GlobalAveragePool"]
    op = draw(st.sampled_from(kinds))
    if op == "GlobalAveragePool":
        return b.node(op, [t.name], (None, c, 1, 1)), "globalaveragepool"
    mode = draw(st.sampled_from(["explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    ceil = draw(_pick(0, 1))
    square = draw(st.booleans())
    sym = draw(st.booleans()) if mode == "explicit" else True
    ks, ss = [], []
    if square:
        k, s = draw(_pick(2, min(3, h, w))), draw(_pick(1, 2))
        ks, ss = [k, k], [s, s]
    else:
        for n in (h, w):
            ks.append(draw(_pick(2, min(3, n))))
            ss.append(draw(_pick(1, 2)))
    pbs, pes, outs = [0, 0], [0, 0], []
    for i, n in enumerate((h, w)):
        if mode == "explicit":
            pb, pe = _draw_pads(draw, ks[i], max(h, w) if square else n, ss[i], sym)
            if ceil and not GENERATE_CEIL_WINDOW_IN_TAIL_PAD:
                while pe > 0 and _ceil_tail_window(n, ks[i], ss[i], pb, pe):
                    pe -= 1
            pbs[i], pes[i] = pb, pe
        outs.append(_pool_out(n, ks[i], ss[i], mode, ceil, pbs[i], pes[i]))
    attrs = dict(kernel_shape=ks, strides=ss, ceil_mode=ceil)
    ptxt = _set_pads(attrs, mode, pbs + pes)
    if op == "AveragePool":
        attrs["count_include_pad"] = draw(_pick(0, 1))
        gaps = _avgpool_reference_gaps(mode, ceil)
    else:
        gaps = _maxpool_reference_gaps(t.shape, ks, ss, mode, ceil, pbs, pes)
    y = b.node(op, [t.name], (None, c, outs[0], outs[1]), **attrs)
    cip = f" count_include_pad={attrs['count_include_pad']}" if op == "AveragePool" else ""
    text = f"{op.lower()}(k={ks} s={ss} {ptxt} ceil_mode={ceil}{cip})"
    b.gaps.extend(f"{b.nodes[-1].name}: {g}" for g in gaps)
    return y, text


# ---------------------------------------------------------------------------------------------
# Reshape-like

def _block_reshape(draw, b, t):
    if t.rank == 4:
        variants = ["reshape", "flatten", "transpose", "slice", "pad"]
    elif t.rank == 3:
        variants = ["reshape", "flatten", "transpose", "slice"]
    else:
        variants = ["reshape", "slice"]
    v = draw(st.sampled_from(variants))
    dims = t.shape[1:]
    if v == "flatten":
        return _flatten(b, t), f"flatten[N,{int(np.prod(dims))}]"
    if v == "reshape":
        if t.rank == 4:
            c, h, w = dims
            targets = [(c, w, h), (c, h * w), (c * h * w,)]
            if h % 2 == 0 and 2 * c <= MAX_CH:
                targets.append((2 * c, h // 2, w))
        elif t.rank == 3:
            targets = [(dims[0] * dims[1],), (dims[1], dims[0])]
        else:
            kk = dims[0]
            targets = [(d, kk // d) for d in range(1, kk + 1) if kk % d == 0]
        target = draw(st.sampled_from(targets))
        shape = b.const("shape", np.array((0,) + target, np.int64))
        return b.node("Reshape", [t.name, shape], (None,) + target), f"reshape[N,{','.join(map(str, target))}]"
    if v == "transpose":
        if t.rank == 3:
            perm = (0, 2, 1)
        else:
            perms = [p for p in [(0, 1, 3, 2), (0, 2, 3, 1), (0, 3, 1, 2), (0, 2, 1, 3), (0, 3, 2, 1)]
                     if t.shape[p[1]] <= MAX_CH]
            if not perms:
                perms = [(0, 1, 3, 2)]
            perm = draw(st.sampled_from(perms))
        shape = tuple(t.shape[p] for p in perm)
        return b.node("Transpose", [t.name], shape, perm=list(perm)), f"transpose{list(perm)}"
    if v == "slice":
        axes = [a for a in range(1, t.rank) if t.shape[a] >= 2] or [1]
        axis = draw(st.sampled_from(axes))
        n = t.shape[axis]
        start = draw(_pick(0, n - 1))
        end = draw(_pick(start + 1, n))
        step = draw(st.sampled_from([1, 2])) if end - start >= 3 else 1
        size = len(range(start, end, step))
        ins = [t.name] + [b.const(nm, np.array([x], np.int64))
                          for nm, x in (("starts", start), ("ends", end), ("axes", axis), ("steps", step))]
        shape = list(t.shape)
        shape[axis] = size
        return b.node("Slice", ins, tuple(shape)), f"slice(axis={axis} {start}:{end}:{step})"
    # pad: constant zero on H, W
    c, h, w = dims
    p = []
    for n in (h, w):
        room = MAX_HW - n
        pb = draw(_pick(0, min(2, room)))
        pe = draw(_pick(0, min(2, room - pb)))
        p.append((pb, pe))
    pads = [0, 0, p[0][0], p[1][0], 0, 0, p[0][1], p[1][1]]
    y = b.node("Pad", [t.name, b.const("pads", np.array(pads, np.int64))],
               (None, c, h + p[0][0] + p[0][1], w + p[1][0] + p[1][1]), mode="constant")
    return y, f"pad({pads})"


# ---------------------------------------------------------------------------------------------
# Tables, two-activation ops

def _table_activation(draw, b, t):
    """One elementwise activation of t, in one of TABLE_SPELLINGS."""
    kind = draw(st.sampled_from(TABLE_SPELLINGS))
    c = lambda base, v: b.const(base, np.asarray(v, np.float32))  # noqa: E731
    if kind in ("Sigmoid", "Tanh", "HardSwish", "Elu", "Softplus"):
        y = b.node(kind, [t.name], t.shape)
    elif kind == "HardSigmoid(0.2)":
        y = b.node("HardSigmoid", [t.name], t.shape, alpha=0.2, beta=0.5)
    elif kind == "LeakyRelu(0.2)":
        y = b.node("LeakyRelu", [t.name], t.shape, alpha=0.2)
    elif kind == "x*Sigmoid(x)":
        y = b.node("Mul", [t.name, b.node("Sigmoid", [t.name], t.shape).name], t.shape)
    elif kind == "gelu_erf":  # torch's GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
        e = b.node("Erf", [b.node("Div", [t.name, c("sqrt2", 1.4142135)], t.shape).name], t.shape)
        y = b.node("Mul", [b.node("Mul", [t.name, b.node("Add", [e.name, c("one", 1.0)], t.shape).name],
                                  t.shape).name, c("half", 0.5)], t.shape)
    elif kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.node("Pow", [t.name, c("three", 3.0)], t.shape)
        inner = b.node("Add", [t.name, b.node("Mul", [cube.name, c("k", 0.044715)], t.shape).name], t.shape)
        th = b.node("Tanh", [b.node("Mul", [inner.name, c("s", 0.7978846)], t.shape).name], t.shape)
        y = b.node("Mul", [b.node("Mul", [t.name, c("half", 0.5)], t.shape).name,
                           b.node("Add", [th.name, c("one", 1.0)], t.shape).name], t.shape)
    elif kind == "mish":
        y = b.node("Mul", [t.name, b.node("Tanh", [b.node("Softplus", [t.name], t.shape).name], t.shape).name], t.shape)
    else:  # PRelu, one slope per channel (axis 1)
        ch = t.shape[1]
        slope = b.rng.uniform(-0.5, 0.5, (ch,) + (1,) * (t.rank - 2)).astype(np.float32)
        y = b.node("PRelu", [t.name, b.const("slope", slope)], t.shape)
    return y, f"+{kind}"


def _block_table(draw, b, t):
    """A linear layer (conv or matmul, no activation) followed by a table activation."""
    if t.rank == 4:
        y, text = _block_conv(draw, b, t, ("none",))
    else:
        y, text = _block_matmul(draw, b, t, ("none",))
    y, atxt = _table_activation(draw, b, y)
    return y, text + atxt


def _block_gate(draw, b, t):
    """Squeeze-excite: x * gate(GlobalAveragePool(x) -> 1x1 conv -> Relu -> 1x1 conv -> Sigmoid /
    HardSigmoid), or the Sub of two conv branches."""
    c, h, w = t.shape[1:]
    if draw(st.booleans()):
        p = b.node("GlobalAveragePool", [t.name], (None, c, 1, 1))
        mid = draw(_pick(1, MAX_CH))
        r = b.node("Relu", [b.node("Conv", [p.name, b.const("W", b.he((mid, c, 1, 1), c)), b.const("B", b.bias(mid))],
                                   (None, mid, 1, 1)).name], (None, mid, 1, 1))
        z = b.node("Conv", [r.name, b.const("W", b.he((c, mid, 1, 1), mid)), b.const("B", b.bias(c))], (None, c, 1, 1))
        hard = draw(st.booleans())
        g = b.node("HardSigmoid", [z.name], z.shape, alpha=1 / 6, beta=0.5) if hard else b.node("Sigmoid", [z.name], z.shape)
        first, second = (t, g) if draw(st.booleans()) else (g, t)
        y = b.node("Mul", [first.name, second.name], t.shape)
        return y, f"se({c}->{mid}->{c} {'hardsigmoid' if hard else 'sigmoid'})*x"
    y1, t1 = _block_conv(draw, b, t, ("none", "relu"))
    a, o, g = _draw_same_geometry(draw, h, w, 1)
    cout = y1.shape[1]
    inputs, _ = _emit_conv(draw, b, t, a, 1, cout, gain=2.0 ** draw(st.integers(-4, 4)))
    y2 = _conv_node(b, t, inputs, a, 1, cout, o)
    if y2.shape != y1.shape:
        return y1, t1
    return b.node("Sub", [y1.name, y2.name], y1.shape), f"sub[{t1}, conv({g})]"


def _block_attention(draw, b, t):
    """Attention on [N, T, D] (a rank-2 input [N, K] as [N, K, 1], a rank-4 one as [N, C*H, W]):
    optionally LayerNormalization,
    then scores MatMul(q, Transpose(k)) (1/sqrt(e) folded into Wq), Softmax or a bounded table
    activation, and a MatMul with the values."""
    if t.rank == 2:  # [N, K] -> [N, K, 1]: K positions of one feature (not one position: T = 1 attends to itself)
        t = b.node("Reshape", [t.name, b.const("shape", np.array([0, -1, 1], np.int64))], (None, t.shape[1], 1))
    elif t.rank != 3:
        t = b.node("Reshape", [t.name, b.const("shape", np.array([0, -1, t.shape[-1]], np.int64))],
                   (None, int(np.prod(t.shape[1:-1])), t.shape[-1]))
    d = t.shape[-1]
    text = "attention("
    if d > 1 and draw(st.booleans()):  # (over one element a LayerNorm is the constant beta)
        gamma = b.rng.uniform(0.5, 1.5, d).astype(np.float32)
        beta = (b.rng.standard_normal(d) * 0.2).astype(np.float32)
        t = b.node("LayerNormalization", [t.name, b.const("gamma", gamma), b.const("beta", beta)], t.shape,
                   axis=-1, epsilon=1e-5)
        text += "layernorm "
    e = draw(_pick(1, MAX_CH))
    q = b.node("MatMul", [t.name, b.const("Wq", b.he((d, e), d, gain=e ** -0.5))], t.shape[:-1] + (e,))
    k = b.node("MatMul", [t.name, b.const("Wk", b.he((d, e), d))], t.shape[:-1] + (e,))
    kt = b.node("Transpose", [k.name], (None, e, t.shape[1]), perm=[0, 2, 1])
    s = b.node("MatMul", [q.name, kt.name], (None, t.shape[1], t.shape[1]))
    act = draw(st.sampled_from(["Softmax", "Sigmoid", "Tanh"]))
    s = b.node(act, [s.name], s.shape, **({"axis": -1} if act == "Softmax" else {}))
    v = b.node("MatMul", [t.name, b.const("Wv", b.he((d, e), d))], t.shape[:-1] + (e,))
    y = b.node("MatMul", [s.name, v.name], t.shape[:-1] + (e,))
    return y, text + f"T={t.shape[1]} {d}->{e} {act.lower()})"


def _feasible(kind, t):
    if kind not in RANK4_ONLY:
        return True
    return t.rank == 4 and (kind != "pool" or t.shape[2] * t.shape[3] > 1)


_BLOCK_FNS = {"conv": _block_conv, "convtranspose": _block_convtranspose, "gemm": _block_gemm,
              "matmul": _block_matmul, "residual": _block_residual, "concat": _block_concat,
              "pool": _block_pool, "reshape": _block_reshape, "table": _block_table, "gate": _block_gate,
              "attention": _block_attention}


def _tail(draw, b, t):
    """A linear module after a trailing reshape block."""
    if t.rank == 4:
        cout = draw(_pick(1, MAX_CH))
        attrs = dict(kernel_shape=[1, 1])
        inputs, _ = _emit_conv(draw, b, t, attrs, 1, cout, bias=True)
        return b.node("Conv", inputs, (None, cout) + t.shape[2:], **attrs), f"tail conv1x1({t.shape[1]}->{cout})"
    k = t.shape[-1]
    nout = draw(_pick(1, MAX_CH))
    y = b.node("MatMul", [t.name, b.const("W", b.he((k, nout), k))], t.shape[:-1] + (nout,))
    y = b.node("Add", [y.name, b.const("B", b.bias(nout))], y.shape)
    return y, f"tail matmul({k}->{nout})+bias"


# ---------------------------------------------------------------------------------------------
# input data

def _draw_data(draw, rng, shape):
    kind = draw(st.sampled_from(["normal", "shifted", "mixture", "uniform"]))
    n = N_CALIB + N_TEST
    full = (n,) + tuple(shape[1:])
    if kind == "normal":
        x = rng.standard_normal(full)
    elif kind == "shifted":
        x = rng.uniform(0.3, 1.5) + rng.uniform(0.3, 1.0) * rng.standard_normal(full)
    elif kind == "mixture":
        comp = rng.integers(0, 2, size=(n,) + (1,) * (len(shape) - 1))
        x = np.where(comp == 0, rng.standard_normal(full), 1.0 + 0.5 * rng.standard_normal(full))
    else:
        x = rng.uniform(0.0, 1.0, full)
    if len(shape) == 4 and draw(st.booleans()):  # per-channel scale, as in real images/features
        x = x * rng.uniform(0.5, 2.0, (1, shape[1], 1, 1))
    x = x.astype(np.float32)
    return x[:N_CALIB], x[N_CALIB:], kind


def _hits_gemm_transpose_bug(nodes, name):
    producer = {o: n for n in nodes for o in n.output}
    n = producer.get(name)
    if n is None or n.op_type != "Gemm":
        return False
    a = producer.get(n.input[0])
    return (a is not None and a.op_type == "Transpose"
            and any(c.op_type == "Transpose" and name in c.input for c in nodes))


def _vi(t):
    return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["N"] + list(t.shape[1:]))


def graphs(ops=None) -> st.SearchStrategy[Case]:
    """Strategy: a small random float ONNX model (opset 19, ir 9) with calibration and test inputs.

    ops: optional iterable of block kinds (see BLOCKS) to draw from; unknown names raise
    ValueError at once. A trailing "reshape" block is followed by a 1x1 Conv or a MatMul+Add (so
    every graph ends with a linear module or a pool), and Flatten/Transpose/Reshape may be
    inserted to feed Gemm/MatMul."""
    allowed = tuple(BLOCKS if ops is None else ops)
    unknown = set(allowed) - set(BLOCKS)
    if unknown or not allowed:
        raise ValueError(f"unknown block kinds {sorted(unknown)}; choose from {BLOCKS}")
    return _graphs(allowed)


@st.composite
def _graphs(draw, allowed) -> Case:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    n_blocks = draw(_pick(1, 4))

    first = draw(st.sampled_from(allowed))
    rank = 4 if first in RANK4_ONLY else draw(st.sampled_from([4, 2, 3]))
    if rank == 4:
        in_shape = (None, draw(_pick(1, 6)), draw(_pick(5, MAX_HW)), draw(_pick(5, MAX_HW)))
    elif rank == 2:
        in_shape = (None, draw(_pick(1, MAX_HW)))
    else:
        in_shape = (None, draw(_pick(1, 6)), draw(_pick(1, MAX_HW)))
    x = _T(INPUT_NAME, in_shape)
    t = x
    texts = [f"in[N,{','.join(map(str, in_shape[1:]))}]"]
    kinds, block_outs = [], []
    for i in range(n_blocks):
        if i == 0:
            kind = first
        else:
            feasible = [k for k in allowed if _feasible(k, t)]
            if not feasible:
                break
            kind = draw(st.sampled_from(feasible))
        t, text = _BLOCK_FNS[kind](draw, b, t)
        kinds.append(kind)
        texts.append(text)
        if kind != "reshape":
            block_outs.append(t)
    if kinds[-1] == "reshape":
        t, text = _tail(draw, b, t)
        texts.append(text)
    outputs = [t]
    extra = [o for o in block_outs if o.name != t.name]
    if AVOID_ORT_GEMM_TRANSPOSE_OUTPUT_BUG:
        extra = [o for o in extra if not _hits_gemm_transpose_bug(b.nodes, o.name)]
    if extra and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(extra)))
    texts.append("out " + ", ".join(f"[N,{','.join(map(str, o.shape[1:]))}]" for o in outputs))

    graph = helper.make_graph(b.nodes, "graphgen", [_vi(x)], [_vi(o) for o in outputs], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="graphgen")
    calib, test, data_kind = _draw_data(draw, rng, in_shape)
    description = f"seed={seed} data={data_kind} " + " -> ".join(texts)
    if b.gaps:
        description += f" [reference unreliable: {'; '.join(b.gaps)}]"
    _note(description)
    return Case(model=model, feeds_calib={INPUT_NAME: calib}, feeds_test={INPUT_NAME: test},
                description=description, reference_ok=not b.gaps, reference_gaps=tuple(b.gaps),
                blocks=tuple(kinds), output_shapes={o.name: o.shape for o in outputs})
