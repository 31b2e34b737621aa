"""Write the quantized model as a portable C99 library: one .c and one .h, int8/uint8 codes and
int32 sums only, no float (but for an optional wrapper), no malloc.

The generator renders the quantized IR (quantized.py): every weight code, bias, shift, clamp and
table comes from its modules, computed exactly as fixedpoint.py executes them. What the IR does
not hold is the graph around the modules: the ops that move codes without arithmetic
(plan.passthrough) and the static shape of every tensor, which come from the float graph the IR
was built on and from one onnxruntime run of it on a calibration sample (so dynamic dims are
fixed to that sample's shape, batch included).

Memory: every activation tensor lives in one static arena, laid out at generation time by the
tensors' lifetimes (first fit; a tensor is freed after its last reader), plus one scratch region
for the step being computed (accumulator blocks, padded input planes, gathered patches).
Reshape, Flatten, Squeeze and Unsqueeze alias their input; Transpose, Slice, Pad, Resize
(nearest) and Split read through an index map (which input element, or a zero, each output
element is), computed at generation time by onnxruntime on the input's flat indices. Constants
(weights, biases, shifts, tables, index maps) are `static const` arrays, so they can stay in
flash.

Kernels (each specialized to its layer's shapes, so the compiler unrolls and vectorizes them):
pointwise convolutions as blocked matrix products, convolutions with few terms per output
(depthwise, first layers) on stride-phase planes, other convolutions by gathered patch rows and
dot products; the requantizer is branch-free where a channel shifts right.

Kernel families (c_kernels.py), chosen by the preprocessor where the library is compiled:
AVX512-VNNI (vpdpbusd), AVX2 (vpmaddwd on codes widened to int16; vpdpbusd with AVX-VNNI), ARM
NEON with the dot product (sdot), and the portable C99 kernels above, which -D<PREFIX>_PORTABLE
forces. The SIMD families compute pointwise convolutions and one-group convolutions with one
shared register-tiled matrix-product kernel reading weights packed at generation time: a
one-group convolution on 3 input channels or more directly (its padded input packed once into
stride phase planes of channel quads, each K step a tap and a channel quad read at a fixed offset,
over a grid as wide as a phase plane: no patch copies), on fewer by packed patches; (x86)
depthwise convolutions with a vpmaddwd kernel; tables (activations) by byte-indexed lookups
(AVX512-VBMI permutes, NEON table lookups). Every other step, and any layer a SIMD kernel does not
take (grouped convolutions, Gemm, depthwise with a residual or a left shift, ARM depthwise), uses
the portable kernel in every family. -D<PREFIX>_THREADS=N (with -pthread) splits the SIMD matrix
products over N threads by blocks of output channels. -D<PREFIX>_SMALL (microcontrollers): the
portable family with every convolution and Gemm one call of a shared generic kernel (dfq_conv,
shapes in a constant descriptor) instead of a function specialized per layer. Every family gives
the same codes (tests/test_c_export.py, tests/test_c_families.py).

Arithmetic, all in int32 (the IR proves every sum fits):
- rounding right shift, ties to even: floor((v + 2^(s-1) - 1 + bit_s(v)) / 2^s) with an arithmetic
  right shift (what C99 leaves to the implementation and every compiler does; the library refuses
  to compile where it is not). An earlier form through uint32 with an offset of 2^31, as the
  integer ONNX graph's RoundingShift computes it, was miscompiled by gcc 12 at -O2 (its
  vectorizer narrowed the logical shift of a product of 8-bit codes to 16-bit lanes: wrong codes
  in a broadcast Mul of ppocr_det). No left shift of a negative value (left shifts are
  multiplications by 2^k);
- rounding division, ties to even: C's truncating division corrected to floor, then the remainder
  compared with half the divisor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import DfqError
from ..fixedpoint import qrange, resolve_pads
from ..graph_utils import attr_str
from ..model_io import TWIN_CAST, analysis_session
from ..quantized import QuantizedModel, conv_transpose_pads
from . import c_kernels
from .c_kernels import offset_biases, pack_weights

ALIAS_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")   # same elements in the same order
GATHER_OPS = ("Transpose", "Slice", "Pad", "Resize", "Split", "Gather")  # each output element: one input's (or 0)
ALIGN = 16                                                    # arena offsets (bytes)
FLOAT32_EXACT = 1 << 24                                       # index maps are computed in float32


@dataclass
class Tensor:
    """A tensor of the C program: its codes' C type, static shape and (once laid out) its place."""
    name: str
    ctype: str                   # int8_t, uint8_t or int32_t
    shape: tuple
    alias: str | None = None     # shares this tensor's memory
    frac: int = 0
    offset: int | None = None    # in the arena (bytes); None: a graph input (the caller's buffer)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * (4 if self.ctype == "int32_t" else 1)


@dataclass
class Step:
    """One function of the C program: reads `inputs`, writes `outputs` (tensor names)."""
    name: str
    what: str
    inputs: list
    outputs: list
    body: str                    # C statements; x0.. are the inputs, y0.. the outputs, acc the scratch
    consts: list = field(default_factory=list)   # C definitions of its constants
    scratch: int = 0             # int32 elements of scratch it needs
    const_bytes: int = 0         # constants of the portable build
    simd_const_bytes: int = 0    # constants of an x86 SIMD build


@dataclass
class CLibrary:
    source: str
    header: str
    prefix: str
    facts: dict                  # arena_bytes, const_bytes, weight_bytes, steps, tensors (offset, ctype, shape)
    program: object = field(default=None, repr=False)  # the steps (render again, e.g. with reuse=False)


# --- the C runtime: the only arithmetic the steps use ------------------------------------------
RUNTIME = {
    "dfq_rshift": r"""
/* round(v / 2^s), ties to even, for 1 <= s <= 30: floor((v + 2^(s-1) - 1 + odd) / 2^s), odd the
   parity of floor(v / 2^s); >> of a negative int32 must be arithmetic (floor), checked here */
typedef char dfq_needs_arithmetic_right_shift[(-5 >> 1) == -3 ? 1 : -1];
static inline int32_t dfq_rshift(int32_t v, int s) {
    return (v + (int32_t)((1u << (s - 1)) - 1u) + ((v >> s) & 1)) >> s;
}
""",
    "dfq_align": r"""
/* v * 2^s for s >= 0, round(v / 2^-s) for s < 0 (the exact sum is proven to fit int32) */
static inline int32_t dfq_align(int32_t v, int s) {
    return s >= 0 ? v * (int32_t)(1u << s) : dfq_rshift(v, -s);
}
""",
    "dfq_requant": r"""
/* the requantizer: round(v / 2^s) (v * 2^-s for s < 0), clamped to [lo, hi] */
static inline int32_t dfq_requant(int32_t v, int s, int32_t lo, int32_t hi) {
    if (s > 30) {  /* the IR proves |v| + 2^(s-1) < 2^31: |v| < 2^30, which rounds to 0 */
        v = 0;
    } else if (s > 0) {
        v = dfq_rshift(v, s);
    } else if (s < 0) {
        int l = -s;
        if (l > 30) {
            v = v > 0 ? hi : v < 0 ? lo : 0;
        } else {
            int32_t top = (int32_t)(0x7fffffffu >> l);  /* larger values saturate anyway */
            v = v > top ? top : v < -top ? -top : v;
            v *= (int32_t)(1u << l);
        }
    }
    return v < lo ? lo : v > hi ? hi : v;
}
""",
    "dfq_rdiv": r"""
/* round(v / n), ties to even, n > 0 */
static inline int32_t dfq_rdiv(int32_t v, int32_t n) {
    int32_t q = v / n, r = v % n;
    if (r < 0) { q -= 1; r += n; }
    if (r > n - r || (r == n - r && q % 2 != 0)) q += 1;
    return q;
}
""",
    "dfq_isqrt": r"""
/* floor(sqrt(v)), v >= 0 */
static inline int32_t dfq_isqrt(int32_t v) {
    uint32_t x = (uint32_t)v, r = 0, b = 1u << 30;
    while (b > x) b >>= 2;
    while (b) {
        if (x >= r + b) { x -= r + b; r = (r >> 1) + b; } else { r >>= 1; }
        b >>= 2;
    }
    return (int32_t)r;
}
""",
    "dfq_lo_hi": r"""
static inline int dfq_lo(int a, int s) { return a <= 0 ? 0 : (a + s - 1) / s; }
static inline int dfq_hi(int b, int s, int n) { int k = b < 0 ? 0 : b / s + 1; return k < n ? k : n; }
""",
}
RUNTIME_NEEDS = {"dfq_align": ("dfq_rshift",), "dfq_requant": ("dfq_rshift",)}


def _runtime(text: str) -> str:
    """The runtime functions `text` calls (and theirs), in definition order; then the SIMD
    families' kernels (c_kernels.py) where a step calls them."""
    simd = "dfq_mm_run(" in text or "dfq_dw(" in text
    if simd:
        text += c_kernels.SIMD_RUNTIME
    if "dfq_conv(" in text:
        text += c_kernels.SMALL_RUNTIME
    used = {n for n in RUNTIME if re.search(r"\b" + (n if n != "dfq_lo_hi" else "dfq_lo") + r"\(", text)}
    for n in list(used):
        used.update(RUNTIME_NEEDS.get(n, ()))
    small = "dfq_conv(" in text
    return ("\n".join(RUNTIME[n] for n in RUNTIME if n in used) + (c_kernels.SIMD_RUNTIME if simd else "") +
            (c_kernels.SMALL_RUNTIME if small else "") +
            (c_kernels.LUT_RUNTIME if "dfq_lut(" in text else ""))


def _array(name: str, ctype: str, values) -> tuple[str, int]:
    """A static const C array definition and its size in bytes."""
    v = np.asarray(values).reshape(-1).astype(np.int64)
    body = ",\n".join(",".join(str(int(x)) for x in v[i:i + 32]) for i in range(0, max(len(v), 1), 32)) if len(v) else "0"
    width = {"int8_t": 1, "uint8_t": 1, "int16_t": 2, "int32_t": 4}[ctype]
    return f"static const {ctype} {name}[{max(len(v), 1)}] = {{\n{body}}};\n", width * max(len(v), 1)


def _code_ctype(qt) -> str:
    if qt is None:
        return "int32_t"
    if qt.bits != 8:
        raise DfqError(f"C output needs 8-bit codes; {qt.name} has {qt.bits}-bit codes")
    return "uint8_t" if qt.unsigned else "int8_t"


class _Builder:
    def __init__(self, graph: gs.Graph, qm: QuantizedModel, values: dict[str, np.ndarray]):
        self.graph, self.qm, self.plan = graph, qm, qm.plan
        self.values = values
        self.tensors: dict[str, Tensor] = {}
        self.steps: list[Step] = []

    # tensors -----------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple:
        if name not in self.values:
            raise DfqError(f"no static shape for tensor {name!r}")
        return tuple(int(d) for d in np.shape(self.values[name]))

    def add_tensor(self, name: str, ctype: str, alias: str | None = None, frac: int = 0) -> Tensor:
        t = Tensor(name, ctype, self.shape(name), alias, frac)
        self.tensors[name] = t
        return t

    def code_tensor(self, name: str, alias: str | None = None) -> Tensor:
        qt = self.qm.tensor(name)
        return self.add_tensor(name, _code_ctype(qt), alias, qt.frac)

    def step(self, what: str, inputs: list, outputs: list, body: str, consts=(), scratch: int = 0) -> None:
        """consts: (name, C type, values[, guard]): a guard (a preprocessor condition, e.g.
        "DFQ_SIMD") keeps the constant to the kernel family that reads it; the first of a name wins."""
        k = len(self.steps)
        defs, nbytes, simd_bytes, seen = [], 0, 0, set()
        for cname, ctype, v, *guard in consts:
            if cname in seen:
                continue
            seen.add(cname)
            d, b = _array(f"s{k}_{cname}", ctype, v)
            if guard:
                d = f"#if {guard[0]}\n{d}#endif\n"
            defs.append(d)
            if not guard or "!DFQ_SIMD" in guard[0]:
                nbytes += b
            if not guard or guard[0] in ("DFQ_SIMD", "DFQ_SIMD && DFQ_X86"):
                simd_bytes += b
        body = re.sub(r"\bK_(\w+)", lambda m: f"s{k}_{m.group(1)}", body)
        self.steps.append(Step(f"step{k}", what, list(inputs), list(outputs), body, defs, scratch, nbytes, simd_bytes))

    def t(self, name: str) -> Tensor:
        return self.tensors[name]

    # modules -----------------------------------------------------------------------------------
    def module(self, mod) -> None:
        if not mod.integer:
            raise DfqError(f"C output needs integer modules; {mod.op} {mod.name} has no integer form")
        kind = mod.kind
        if kind == "linear":
            out = self.add_tensor(mod.output_name, _code_ctype(mod.output),
                                  frac=int(mod.output.frac) if mod.output is not None else 0)
            if mod.op == "Conv":
                self._conv(mod, out)
            elif mod.op == "ConvTranspose":
                self._conv_transpose(mod, out)
            else:
                self._dense(mod, out)
        elif kind == "pool":
            self._pool(mod, self.code_tensor(mod.output_name))
        elif kind == "table":
            self._table(mod, self.code_tensor(mod.output_name))
        elif kind == "binary":
            self._binary(mod, self.code_tensor(mod.output_name))
        elif kind == "layernorm":
            self._layer_norm(mod, self.code_tensor(mod.output_name))
        elif kind == "softmax":
            self._softmax(mod, self.code_tensor(mod.output_name))
        else:
            raise DfqError(f"C output: no kernel for module kind {kind}")

    def _requant_tail(self, mod, out: Tensor, ch: str, at: str, consts: list) -> str:
        """C statements turning int32 `v` (channel index `ch`) into the output element y0[at]."""
        lines = []
        if mod.residual is not None:
            if np.any(mod.acc_shift > 0):
                consts.append(("acc_shift", "int8_t", mod.acc_shift))
                lines.append(f"v = v * (int32_t)(1u << K_acc_shift[{ch}]);")
            consts.append(("res_shift", "int8_t", mod.residual_shift))
            lines.append(f"v += dfq_align((int32_t)x1[{at}], K_res_shift[{ch}]);")
        if mod.output is None:  # a graph output: the int32 sum, unrounded
            lines.append(f"y0[{at}] = v;")
        else:
            consts.append(("shift", "int8_t", mod.shift))
            lines.append(f"y0[{at}] = ({out.ctype})dfq_requant(v, K_shift[{ch}], {mod.code_min}, {mod.code_max});")
        return "\n".join(lines)

    def _requant_loop(self, mod, out: Tensor, ch: str, loop: str, v: str, at: str, consts: list) -> str:
        """`loop` (a for-header) over elements of one output channel `ch`: the int32 sum `v` of each
        becomes the output y0[at]. Where the channel's shift is a right shift (and its residual, if
        any, is aligned by a left shift) the body is branch-free, so the compiler vectorizes it;
        otherwise the general requantizer (_requant_tail)."""
        generic = self._requant_tail(mod, out, ch, at, consts)
        if mod.output is None:
            return f"{loop} {{\n    int32_t v = {v};\n    {generic}\n}}"
        pre, fast, cond = [f"const int sh_ = K_shift[{ch}];"], [], "sh_ > 0"
        if mod.residual is not None:
            if np.any(mod.acc_shift > 0):
                pre.append(f"const int32_t am_ = (int32_t)(1u << K_acc_shift[{ch}]);")
                fast.append("v = v * am_;")
            pre.append(f"const int rs_ = K_res_shift[{ch}];")
            cond += " && rs_ >= 0"
            fast.append(f"v += (int32_t)x1[{at}] * (int32_t)(1u << rs_);")
        lo, hi = mod.code_min, mod.code_max
        fast += ["v = dfq_rshift(v, sh_);", f"y0[{at}] = ({out.ctype})(v < {lo} ? {lo} : v > {hi} ? {hi} : v);"]
        body = "\n    ".join(fast)
        return f"""{{
{" ".join(pre)}
if ({cond}) {{
{loop} {{
    int32_t v = {v};
    {body}
}}
}} else {{
{loop} {{
    int32_t v = {v};
    {generic}
}}
}}
}}"""

    def _requant_args(self, mod, consts: list) -> tuple:
        """The requantizer's arguments of a linear module's kernel descriptor (shift, accumulator
        shift, residual shift as constant names or NULL; the residual's signedness; code bounds),
        their constants appended to `consts`."""
        sh = acc = res = "NULL"
        if mod.output is not None:
            consts.append(("shift", "int8_t", mod.shift))
            sh = "K_shift"
        rsig = 0
        if mod.residual is not None:
            if np.any(mod.acc_shift > 0):
                consts.append(("acc_shift", "int8_t", mod.acc_shift))
                acc = "K_acc_shift"
            consts.append(("res_shift", "int8_t", mod.residual_shift))
            res = "K_res_shift"
            rsig = int(self.t(mod.residual.name).ctype == "int8_t")
        lo, hi = (mod.code_min, mod.code_max) if mod.output is not None else (0, 0)
        return sh, acc, res, rsig, lo, hi

    def _small_or(self, mod, x: Tensor, out: Tensor, xs, ys, g, k, s, d, pt, pl, wstride: int, consts: list,
                  body: str) -> str:
        """`body` for every build but the small one (-D<PREFIX>_SMALL), where the layer is one call
        of the shared kernel dfq_conv with a constant descriptor of its shapes; the weights are the
        portable kernel's K_w ([cout][wstride])."""
        n, cin, h, w = xs
        cout, oh, ow = ys
        sh, acc, res, rsig, lo, hi = self._requant_args(mod, consts)
        bias = "K_bias" if mod.bias is not None else "NULL"
        small = (f"static const dfq_conv_t L = {{{n}, {cin}, {h}, {w}, {cout}, {oh}, {ow}, {g}, {k[0]}, {k[1]}, "
                 f"{s[0]}, {s[1]}, {d[0]}, {d[1]}, {pt}, {pl}, {wstride}, K_w, {bias}, {sh}, {acc}, {res}, {lo}, "
                 f"{hi}, {int(x.ctype == 'int8_t')}, {int(out.ctype == 'int8_t')}, {rsig}}};\n"
                 f"dfq_conv(&L, x0, {'x1' if mod.residual is not None else 'NULL'}, y0);")
        return f"(void)acc;\n#if DFQ_SMALL\n{{\n{small}\n}}\n#else\n{body}\n#endif"

    def _inputs(self, mod) -> list:
        return [mod.input.name] + ([mod.residual.name] if getattr(mod, "residual", None) is not None else [])

    def _conv(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        a = mod.attrs
        nd = len(a["kernel_shape"])
        if nd not in (1, 2):
            raise DfqError(f"C output: Conv {mod.name} is {nd}-d (1-d and 2-d convolutions are supported)")
        pads = resolve_pads(a["auto_pad"], a["pads"], x.shape[2:], a["kernel_shape"], a["strides"], a["dilations"])
        xs, ys, k, s, d, pt, pl = _as_2d(x.shape, out.shape, a["kernel_shape"], a["strides"], a["dilations"], pads)
        n, cin, h, w = xs
        _, cout, oh, ow = ys
        g = a["group"]
        consts = _weight_consts(mod, mod.weight)
        pointwise = tuple(k) == (1, 1) and tuple(s) == (1, 1) and pt == 0 and pl == 0 and oh == h and ow == w
        if pointwise and g == 1:
            self._pointwise(mod, x, out, n, cin, cout, oh * ow, consts)
            return
        if cin // g * k[0] * k[1] <= self.PLANE_TERMS:
            self._planes(mod, x, out, (n, cin, h, w), (cout, oh, ow), g, k, s, d, pt, pl, consts)
        else:
            self._conv_rows(mod, x, out, (n, cin, h, w), (cout, oh, ow), g, k, s, d, pt, pl, consts)

    PLANE_TERMS = 49  # a convolution whose outputs sum at most this many terms is unrolled over them (_planes)

    def _planes(self, mod, x: Tensor, out: Tensor, xs, ys, g, k, s, d, pt, pl, consts: list) -> None:
        """A convolution whose output channels each sum few terms (cin per group x kh x kw <=
        PLANE_TERMS; depthwise convolutions, a first layer on 3 channels): the group's input planes
        copied, with their zero padding, into stride x stride phase planes (phase (qy, qx) holds
        the padded rows qy, qy + stride, ... and likewise columns), so that every term reads one
        phase plane at a fixed offset; the sums of a whole output plane are then one branch-free
        loop over a grid as wide as a phase plane (the columns past the output's are computed and
        dropped)."""
        n, cin, h, w = xs
        cout, oh, ow = ys
        cin_g, cout_g = cin // g, cout // g
        hp = max(h + pt, (oh - 1) * s[0] + (k[0] - 1) * d[0] + 1)
        wp = max(w + pl, (ow - 1) * s[1] + (k[1] - 1) * d[1] + 1)
        hq, wq = -(-hp // s[0]) + 1, -(-wp // s[1])
        plane = hq * wq
        phases = s[0] * s[1]
        bias = "K_bias[oc]" if mod.bias is not None else "0"
        kk = k[0] * k[1]
        wdefs = " ".join(f"const int32_t w{i} = wo[{i}];" for i in range(cin_g * kk))
        terms, offs = [], []
        for ic in range(cin_g):
            for ky in range(k[0]):
                for kx in range(k[1]):
                    phase = ic * phases + ((ky * d[0]) % s[0]) * s[1] + (kx * d[1]) % s[1]
                    at = phase * plane + ((ky * d[0]) // s[0]) * wq + (kx * d[1]) // s[1]
                    terms.append(f"w{(ic * k[0] + ky) * k[1] + kx} * xq[{at} + q]")
                    offs.append(at)
        copies = []
        for qy in range(s[0]):
            r0, r1 = max(0, -(-(pt - qy) // s[0])), min(hq, (h - 1 + pt - qy) // s[0] + 1)
            for qx in range(s[1]):
                c0, c1 = max(0, -(-(pl - qx) // s[1])), min(wq, (w - 1 + pl - qx) // s[1] + 1)
                if r1 <= r0 or c1 <= c0:
                    continue
                dst = f"xq + (ic * {phases} + {qy * s[1] + qx}) * {plane} + r * {wq} + {c0}"
                src = f"xc + ic * {h * w} + (r * {s[0]} + {qy - pt}) * {w} + {c0 * s[1] + qx - pl}"
                copy = f"memcpy({dst}, {src}, {c1 - c0});" if s[1] == 1 else \
                    f"{{ {x.ctype} *dp = {dst}; const {x.ctype} *sp = {src}; " \
                    f"for (int c = 0; c < {c1 - c0}; c++) dp[c] = sp[c * {s[1]}]; }}"
                copies.append(f"for (int r = {r0}; r < {r1}; r++) {copy}")
        span = (oh - 1) * wq + ow
        tail = self._requant_loop(mod, out, "oc", f"for (int ox = 0; ox < {ow}; ox++)", f"sums[oy * {wq} + ox]",
                                  f"((b * {cout} + oc) * {oh} + oy) * {ow} + ox", consts)
        planes = -(-cin_g * phases * plane // 4)
        copy_code = "\n        ".join(copies)
        body = f"""{x.ctype} *xq = ({x.ctype} *)acc;
int32_t *sums = acc + {planes};
for (int b = 0; b < {n}; b++) for (int oc = 0; oc < {cout}; oc++) {{
    if (oc % {cout_g} == 0) {{
        const {x.ctype} *xc = x0 + (b * {cin} + (oc / {cout_g}) * {cin_g}) * {h * w};
        memset(xq, 0, {cin_g * phases * plane});
        for (int ic = 0; ic < {cin_g}; ic++) {{
        {copy_code}
        }}
    }}
    const int8_t *wo = K_w + oc * {cin_g * kk};
    {wdefs}
    for (int q = 0; q < {span}; q++) sums[q] = {bias} + {" + ".join(terms)};
    for (int oy = 0; oy < {oh}; oy++) {tail}
}}"""
        what = "depthwise" if cin_g == 1 else "few terms"
        scratch = planes + span
        small = (xs, ys, g, k, s, d, pt, pl, cin_g * kk)
        if g == 1:  # one group: the SIMD families by patch rows
            simd, sc = self._simd_patches(mod, x, out, xs, ys, k, s, d, pt, pl, consts)
            body, scratch = self._simd_or(simd, body), max(scratch, sc)
        elif cin_g == 1 and mod.residual is None and mod.output is not None and np.all(mod.shift > 0):
            consts.append(("offs", "int32_t", np.array(offs), "DFQ_X86"))
            consts.append(("shift", "int8_t", mod.shift))
            dw = f"""{x.ctype} *xq = ({x.ctype} *)acc;
for (int b = 0; b < {n}; b++) for (int oc = 0; oc < {cout}; oc++) {{
    if (oc % {cout_g} == 0) {{
        const {x.ctype} *xc = x0 + (b * {cin} + (oc / {cout_g}) * {cin_g}) * {h * w};
        memset(xq, 0, {cin_g * phases * plane});
        for (int ic = 0; ic < {cin_g}; ic++) {{
        {copy_code}
        }}
    }}
    dfq_dw(xq, {int(x.ctype == "int8_t")}, K_w + oc * {kk}, K_offs, {kk}, {bias}, K_shift[oc], {mod.code_min}, {mod.code_max},
           {oh}, {ow}, {wq}, y0 + (b * {cout} + oc) * {oh * ow}, {int(out.ctype == "int8_t")});
}}"""
            body = f"#if DFQ_X86\n{dw}\n#else\n{body}\n#endif"
            scratch += 8  # the SIMD loads read up to 31 bytes past the planes
        body = self._small_or(mod, x, out, *small, consts, body)
        self.step(f"{mod.op} {mod.name} ({what})", self._inputs(mod), [out.name], body, consts, scratch)

    MM_TILE = 32          # pixels of the widest family's tile (c_kernels DFQ_PT): scratch is sized for it
    MM_PATCH_BYTES = 1 << 17  # packed patch codes of a convolution by patch rows, per block of output rows

    def _mm_desc(self, mod, x: Tensor, out: Tensor, w2d: np.ndarray, ystride: int, consts: list,
                 koff: str = "NULL", wq: int = 0, ow: int = 0) -> str:
        """The dfq_mm_t of a linear module with weights `w2d` [C, K] (c_kernels.py), its constants
        added to `consts`; the portable kernel's own weight and bias become portable-only."""
        for i, e in enumerate(consts):
            if e[0] in ("w", "bias") and len(e) == 3:
                consts[i] = e + ("!DFQ_SIMD",)
        wp, k4 = pack_weights(w2d)
        bx, ba = offset_biases(w2d, mod.bias, x.ctype == "int8_t")
        consts += [("wp", "int8_t", wp, "DFQ_SIMD"), ("bx", "int32_t", bx, "DFQ_SIMD && DFQ_X86"),
                   ("ba", "int32_t", ba, "DFQ_SIMD == 1")]
        sh, acc, res, rsig, lo, hi = self._requant_args(mod, consts)
        fast = mod.output is not None and bool(np.all(mod.shift > 0)) and \
            (mod.residual is None or bool(np.all(mod.residual_shift >= 0)))
        return (f"static const dfq_mm_t L = {{{w2d.shape[0]}, {k4}, K_wp, DFQ_MM_BIAS(K_bx, K_ba), {sh}, {acc}, "
                f"{res}, {lo}, {hi}, {int(out.ctype == 'int8_t')}, {rsig}, {ystride}, {int(fast)}, {koff}, {wq}, {ow}}};")

    DIRECT_MIN_CIN = 3    # one-group convolutions on this many input channels or more: direct (no patches)

    def _simd_direct(self, mod, x: Tensor, out: Tensor, xs, ys, k, s, d, pt, pl, consts: list) -> tuple[str, int]:
        """The SIMD families' body of a one-group convolution without patches: the padded input
        packed once into stride phase planes of channel quads (dfq_pack_planes), then dfq_mm over a
        grid as wide as a phase plane (the columns past the output's dropped), each K step (a tap
        and a channel quad, weights reordered to match) reading the planes at a fixed offset (the
        koff table); and its scratch (int32 elements)."""
        n, cin, h, w = xs
        cout, oh, ow = ys
        c4 = -(-cin // 4)
        hp = max(h + pt, (oh - 1) * s[0] + (k[0] - 1) * d[0] + 1)
        wp = max(w + pl, (ow - 1) * s[1] + (k[1] - 1) * d[1] + 1)
        hq, wq = -(-hp // s[0]), -(-wp // s[1])
        phases = s[0] * s[1]
        span = (oh - 1) * wq + ow
        taps = [(ky, kx) for ky in range(k[0]) for kx in range(k[1])]
        offs = [((ky * d[0]) // s[0]) * wq + (kx * d[1]) // s[1] for ky, kx in taps]
        q = max(hq * wq, -(-span // self.MM_TILE) * self.MM_TILE + max(offs))  # every tile's reads in the plane
        wt = np.zeros((cout, k[0], k[1], c4 * 4), np.int64)  # [C][ky][kx][cin padded]: K step = (tap, quad)
        wt[:, :, :, :cin] = np.asarray(mod.weight).reshape(cout, cin, k[0], k[1]).transpose(0, 2, 3, 1)
        koff = [((c * phases + ((ky * d[0]) % s[0]) * s[1] + (kx * d[1]) % s[1]) * q + o) * 4
                for (ky, kx), o in zip(taps, offs) for c in range(c4)]
        consts.append(("koff", "int32_t", np.array(koff), "DFQ_SIMD"))
        desc = self._mm_desc(mod, x, out, wt.reshape(cout, -1), oh * ow, consts, "K_koff", wq, ow)
        res = f"x1 + b * {cout * oh * ow}" if mod.residual is not None else "NULL"
        simd = f"""{desc}
uint8_t *xp = (uint8_t *)acc;
for (int b = 0; b < {n}; b++) {{
    dfq_pack_planes(xp, x0 + b * {cin * h * w}, {int(x.ctype == "int8_t")}, {cin}, {h}, {w}, {s[0]}, {s[1]}, {pt}, {pl}, {hq}, {wq}, {q});
    dfq_mm_run(&L, xp, {span}, {res}, y0 + b * {cout * oh * ow});
}}"""
        return simd, c4 * phases * q

    def _simd_patches(self, mod, x: Tensor, out: Tensor, xs, ys, k, s, d, pt, pl, consts: list) -> tuple[str, int]:
        """The SIMD families' body of a one-group convolution: blocks of output rows whose patches
        are packed (dfq_pack_patches) for dfq_mm; and its scratch (int32 elements). Convolutions on
        DIRECT_MIN_CIN channels or more go direct (_simd_direct)."""
        n, cin, h, w = xs
        cout, oh, ow = ys
        if cin >= self.DIRECT_MIN_CIN:
            return self._simd_direct(mod, x, out, xs, ys, k, s, d, pt, pl, consts)
        kw4 = -(-cin * k[0] * k[1] // 4) * 4
        rows = max(1, min(oh, self.MM_PATCH_BYTES // (kw4 * ow)))
        desc = self._mm_desc(mod, x, out, mod.weight.reshape(cout, -1), oh * ow, consts)
        res = f"x1 + b * {cout * oh * ow} + oy0 * {ow}" if mod.residual is not None else "NULL"
        simd = f"""{desc}
uint8_t *xp = (uint8_t *)acc;
for (int b = 0; b < {n}; b++) for (int oy0 = 0; oy0 < {oh}; oy0 += {rows}) {{
    const int nr = {oh} - oy0 < {rows} ? {oh} - oy0 : {rows};
    dfq_pack_patches(xp, x0 + b * {cin * h * w}, {int(x.ctype == "int8_t")}, {cin}, {h}, {w}, {k[0]}, {k[1]}, {s[0]}, {s[1]}, {d[0]}, {d[1]}, {pt}, {pl}, {ow}, oy0, nr);
    dfq_mm_run(&L, xp, nr * {ow}, {res}, y0 + b * {cout * oh * ow} + oy0 * {ow});
}}"""
        return simd, kw4 // 4 * -(-rows * ow // self.MM_TILE) * self.MM_TILE

    def _simd_or(self, simd: str, portable: str) -> str:
        return f"#if DFQ_SIMD\n{{\n{simd}\n}}\n#else\n{portable}\n#endif"

    def _conv_rows(self, mod, x: Tensor, out: Tensor, xs, ys, g, k, s, d, pt, pl, consts: list) -> None:
        """A convolution one output row at a time: the row's input patches gathered (zeros where
        padded) into the scratch as pixel-major rows of cin x kh x kw codes, then one contiguous
        dot product per pixel and output channel (over its group's part of the patch)."""
        n, cin, h, w = xs
        cout, oh, ow = ys
        cin_g, cout_g = cin // g, cout // g
        kk = k[0] * k[1]
        kg = -(-cin_g * kk // 16) * 16  # each group's patch padded with zero codes to whole vectors
        patch = g * kg
        if kg != cin_g * kk:  # the weights padded with zeros alike
            wpad = np.zeros((cout, kg), np.int8)
            wpad[:, :cin_g * kk] = mod.weight.reshape(cout, -1)
            consts[0] = ("w", "int8_t", wpad)
        bias = "K_bias[oc]" if mod.bias is not None else "0"
        tail = self._requant_tail(mod, out, "oc", f"((b * {cout} + oc) * {oh} + oy) * {ow} + ox", consts)
        body = f"""{x.ctype} *col = ({x.ctype} *)acc;
memset(col, 0, {ow * patch});
for (int b = 0; b < {n}; b++) for (int oy = 0; oy < {oh}; oy++) {{
    for (int ox = 0; ox < {ow}; ox++) for (int gi = 0; gi < {g}; gi++) {{
        {x.ctype} *cp = col + ox * {patch} + gi * {kg};
        for (int ic = gi * {cin_g}; ic < (gi + 1) * {cin_g}; ic++) {{
            const {x.ctype} *xc = x0 + (b * {cin} + ic) * {h * w};
            for (int ky = 0; ky < {k[0]}; ky++) {{
                const int iy = oy * {s[0]} + ky * {d[0]} - {pt};
                for (int kx = 0; kx < {k[1]}; kx++) {{
                    const int ix = ox * {s[1]} + kx * {d[1]} - {pl};
                    *cp++ = (iy >= 0 && iy < {h} && ix >= 0 && ix < {w}) ? xc[iy * {w} + ix] : 0;
                }}
            }}
        }}
    }}
    for (int oc = 0; oc < {cout}; oc++) {{
        const int8_t *wo = K_w + oc * {kg};
        const {x.ctype} *cg = col + (oc / {cout_g}) * {kg};
        for (int ox = 0; ox < {ow}; ox++) {{
            const {x.ctype} *cp = cg + ox * {patch};
            int32_t v = {bias};
            for (int i = 0; i < {kg}; i++) v += (int32_t)cp[i] * wo[i];
            {tail}
        }}
    }}
}}"""
        scratch = -(-ow * patch // 4)
        if g == 1:
            simd, sc = self._simd_patches(mod, x, out, xs, ys, k, s, d, pt, pl, consts)
            body, scratch = self._simd_or(simd, body), max(scratch, sc)
        body = self._small_or(mod, x, out, xs, ys, g, k, s, d, pt, pl, kg, consts, body)
        self.step(f"{mod.op} {mod.name} (patch rows)", self._inputs(mod), [out.name], body, consts, scratch)

    POINT_BLOCK = 64  # pixels of a pointwise convolution's accumulator block (OB channels x 64 int32 stay in L1)

    def _pointwise(self, mod, x: Tensor, out: Tensor, n: int, cin: int, cout: int, hw: int, consts: list) -> None:
        """A 1x1 stride-1 convolution as a blocked matrix product: OB output channels x POINT_BLOCK
        pixels of int32 sums, each input channel's codes read once per block."""
        if hw < self.POINT_BLOCK * 4 and cin >= 256:  # few pixels, many channels: dot products along channels
            self._pointwise_dot(mod, x, out, n, cin, cout, hw, consts)
            return
        ob = next(v for v in (4, 2, 1) if cout % v == 0)
        pb = min(self.POINT_BLOCK, hw)
        bias = "K_bias[oc + j]" if mod.bias is not None else "0"
        ws = "\n".join(f"const int32_t w{j} = K_w[(oc + {j}) * {cin} + ic];" for j in range(ob))
        adds = " ".join(f"a[{j * pb} + p] += w{j} * xv;" for j in range(ob))
        tail = self._requant_loop(mod, out, "c", "for (int p = 0; p < pn; p++)", f"a[j * {pb} + p]",
                                  f"(b * {cout} + c) * {hw} + p0 + p", consts)
        body = f"""for (int b = 0; b < {n}; b++) for (int p0 = 0; p0 < {hw}; p0 += {pb}) {{
const int pn = {hw} - p0 < {pb} ? {hw} - p0 : {pb};
for (int oc = 0; oc < {cout}; oc += {ob}) {{
    int32_t *a = acc;
    for (int j = 0; j < {ob}; j++) for (int p = 0; p < pn; p++) a[j * {pb} + p] = {bias};
    for (int ic = 0; ic < {cin}; ic++) {{
        const {x.ctype} *xr = x0 + (b * {cin} + ic) * {hw} + p0;
        {ws}
        for (int p = 0; p < pn; p++) {{ const int32_t xv = xr[p]; {adds} }}
    }}
    for (int j = 0; j < {ob}; j++) {{
        const int c = oc + j;
        {tail}
    }}
}}
}}"""
        body, scratch = self._simd_pointwise(mod, x, out, n, cin, cout, hw, consts, body, ob * pb)
        body = self._small_or(mod, x, out, (n, cin, 1, hw), (cout, 1, hw), 1, (1, 1), (1, 1), (1, 1), 0, 0, cin,
                              consts, body)
        self.step(f"{mod.op} {mod.name} (pointwise)", self._inputs(mod), [out.name], body, consts, scratch)

    def _simd_pointwise(self, mod, x: Tensor, out: Tensor, n: int, cin: int, cout: int, hw: int, consts: list,
                        portable: str, scratch: int) -> tuple[str, int]:
        """A pointwise convolution's body for every family: the SIMD ones pack the image's codes and
        run dfq_mm over all pixels; the portable one is `portable`."""
        desc = self._mm_desc(mod, x, out, mod.weight.reshape(cout, cin), hw, consts)
        res = f"x1 + b * {cout * hw}" if mod.residual is not None else "NULL"
        simd = f"""{desc}
uint8_t *xp = (uint8_t *)acc;
for (int b = 0; b < {n}; b++) {{
    dfq_pack_rows(xp, x0 + b * {cin * hw}, {int(x.ctype == "int8_t")}, {cin}, {hw});
    dfq_mm_run(&L, xp, {hw}, {res}, y0 + b * {cout * hw});
}}"""
        k4 = -(-cin // 4)
        return self._simd_or(simd, portable), max(scratch, k4 * -(-hw // self.MM_TILE) * self.MM_TILE)

    def _pointwise_dot(self, mod, x: Tensor, out: Tensor, n: int, cin: int, cout: int, hw: int, consts: list) -> None:
        """A 1x1 stride-1 convolution over few pixels: the input transposed to pixel-major codes in
        the scratch, then one dot product along the input channels per pixel and output channel."""
        bias = "K_bias[c]" if mod.bias is not None else "0"
        ob = next(v for v in (4, 2, 1) if cout % v == 0)
        decl = " ".join(f"int32_t s{j} = 0; const int8_t *w{j} = K_w + (c0 + {j}) * {cin};" for j in range(ob))
        macs = " ".join(f"s{j} += xv * w{j}[k];" for j in range(ob))
        sums = ", ".join(f"s{j}" for j in range(ob))
        tail = self._requant_tail(mod, out, "c", f"(b * {cout} + c) * {hw} + p", consts)
        body = f"""{x.ctype} *xt = ({x.ctype} *)acc;
for (int b = 0; b < {n}; b++) {{
for (int ic = 0; ic < {cin}; ic++) for (int p = 0; p < {hw}; p++) xt[p * {cin} + ic] = x0[(b * {cin} + ic) * {hw} + p];
for (int p = 0; p < {hw}; p++) {{
    const {x.ctype} *xr = xt + p * {cin};
    for (int c0 = 0; c0 < {cout}; c0 += {ob}) {{  /* {ob} dot products share each load of the codes */
        {decl}
        for (int k = 0; k < {cin}; k++) {{ const int32_t xv = xr[k]; {macs} }}
        const int32_t sj[{ob}] = {{{sums}}};
        for (int j = 0; j < {ob}; j++) {{
            const int c = c0 + j;
            int32_t v = sj[j] + {bias};
            {tail}
        }}
    }}
}}
}}"""
        body, scratch = self._simd_pointwise(mod, x, out, n, cin, cout, hw, consts, body, -(-cin * hw // 4))
        body = self._small_or(mod, x, out, (n, cin, 1, hw), (cout, 1, hw), 1, (1, 1), (1, 1), (1, 1), 0, 0, cin,
                              consts, body)
        self.step(f"{mod.op} {mod.name} (pointwise, few pixels)", self._inputs(mod), [out.name], body, consts, scratch)

    def _conv_transpose(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        a = mod.attrs
        nd = len(a["kernel_shape"])
        if nd not in (1, 2) or conv_transpose_pads(a) is None:
            raise DfqError(f"C output: ConvTranspose {mod.name} is not a 1-d or 2-d transposed convolution "
                           "with explicit pads")
        pads = [0] * 2 * nd if a["auto_pad"] == "VALID" else a["pads"]
        xs, ys, k, s, d, pt, pl = _as_2d(x.shape, out.shape, a["kernel_shape"], a["strides"], a["dilations"], pads)
        n, cin, h, w = xs
        _, cout, oh, ow = ys
        consts = _weight_consts(mod, mod.weight)  # [cin, cout, kh, kw]
        bias = "K_bias[oc]" if mod.bias is not None else "0"
        tail = self._requant_tail(mod, out, "oc", f"(b * {cout} + oc) * {oh * ow} + p", consts)
        body = f"""for (int b = 0; b < {n}; b++) {{
for (int oc = 0; oc < {cout}; oc++) for (int p = 0; p < {oh * ow}; p++) acc[oc * {oh * ow} + p] = {bias};
for (int ic = 0; ic < {cin}; ic++) for (int iy = 0; iy < {h}; iy++) for (int ix = 0; ix < {w}; ix++) {{
    const int32_t xv = x0[((b * {cin} + ic) * {h} + iy) * {w} + ix];
    if (xv == 0) continue;
    for (int oc = 0; oc < {cout}; oc++) for (int ky = 0; ky < {k[0]}; ky++) {{
        const int oy = iy * {s[0]} + ky * {d[0]} - {pt};
        if (oy < 0 || oy >= {oh}) continue;
        for (int kx = 0; kx < {k[1]}; kx++) {{
            const int ox = ix * {s[1]} + kx * {d[1]} - {pl};
            if (ox < 0 || ox >= {ow}) continue;
            acc[(oc * {oh} + oy) * {ow} + ox] += xv * K_w[((ic * {cout} + oc) * {k[0]} + ky) * {k[1]} + kx];
        }}
    }}
}}
for (int oc = 0; oc < {cout}; oc++) for (int p = 0; p < {oh * ow}; p++) {{
    int32_t v = acc[oc * {oh * ow} + p];
    {tail}
}}
}}"""
        self.step(f"{mod.op} {mod.name}", self._inputs(mod), [out.name], body, consts, cout * oh * ow)

    def _dense(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        if mod.weight.ndim != 2:
            raise DfqError(f"C output: {mod.op} {mod.name} has a {mod.weight.ndim}-d weight (2-d supported)")
        w = mod.weight if mod.attrs.get("transB") else mod.weight.T  # [C, K]: each channel's row contiguous
        c, kk = w.shape
        rows = x.size // kk
        consts = _weight_consts(mod, w)
        bias = "K_bias[c]" if mod.bias is not None else "0"
        tail = self._requant_tail(mod, out, "c", f"r * {c} + c", consts)
        body = f"""for (int r = 0; r < {rows}; r++) {{
    const {x.ctype} *xr = x0 + r * {kk};
    for (int c = 0; c < {c}; c++) {{
        const int8_t *wc = K_w + c * {kk};
        int32_t v = {bias};
        for (int k = 0; k < {kk}; k++) v += (int32_t)xr[k] * wc[k];
        {tail}
    }}
}}"""
        body = self._small_or(mod, x, out, (rows, kk, 1, 1), (c, 1, 1), 1, (1, 1), (1, 1), (1, 1), 0, 0, kk,
                              consts, body)
        self.step(f"{mod.op} {mod.name}", self._inputs(mod), [out.name], body, consts)

    def _pool(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        if len(x.shape) not in (3, 4):
            raise DfqError(f"C output: {mod.op} {mod.name} needs a 3-d or 4-d input")
        n, c = x.shape[:2]
        if mod.op == "GlobalAveragePool":
            hw = int(np.prod(x.shape[2:]))
            window = hw
            loop = f"""const {x.ctype} *xc = x0 + (b * {c} + ch) * {hw};
int32_t v = 0;
for (int p = 0; p < {hw}; p++) v += xc[p];
y0[b * {c} + ch] = ({out.ctype})FINISH;"""
        else:  # a 1-d pool as a 2-d one of height 1
            a = mod.attrs
            k, s = a["kernel_shape"], a["strides"]
            pads = resolve_pads(a["auto_pad"], a["pads"], x.shape[2:], k, s, [1] * len(k))
            xs, ys, k, s, _, pt, pl = _as_2d(x.shape, out.shape, k, s, [1] * len(k), pads)
            pads = [pt, pl]
            h, w = xs[2:]
            oh, ow = ys[2:]
            window = int(np.prod(k))
            loop = f"""const {x.ctype} *xc = x0 + (b * {c} + ch) * {h * w};
for (int oy = 0; oy < {oh}; oy++) for (int ox = 0; ox < {ow}; ox++) {{
    int32_t v = 0;
    for (int ky = 0; ky < {k[0]}; ky++) {{
        const int iy = oy * {s[0]} + ky - {pads[0]};
        if (iy < 0 || iy >= {h}) continue;
        for (int kx = 0; kx < {k[1]}; kx++) {{
            const int ix = ox * {s[1]} + kx - {pads[1]};
            if (ix >= 0 && ix < {w}) v += xc[iy * {w} + ix];
        }}
    }}
    y0[((b * {c} + ch) * {oh} + oy) * {ow} + ox] = ({out.ctype})FINISH;
}}"""
        finish = (f"dfq_requant(v, {mod.shift}, {mod.code_min}, {mod.code_max})" if mod.shift is not None else
                  f"dfq_requant(dfq_rdiv(v, {window}), 0, {mod.code_min}, {mod.code_max})")
        body = f"""for (int b = 0; b < {n}; b++) for (int ch = 0; ch < {c}; ch++) {{
{loop.replace("FINISH", finish)}
}}"""
        self.step(f"{mod.op} {mod.name}", [x.name], [out.name], body)

    def _table(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        rows, size = mod.table.shape
        lo = mod.input.code_range[0]
        # the IR's table (entry i: input code lo + i) indexed by the input code's byte instead
        byte = np.arange(256)
        code = byte - 256 * (byte >= 128) if x.ctype == "int8_t" else byte
        idx = code - lo
        ok = (idx >= 0) & (idx < size)
        t256 = np.zeros((rows, 256), np.int64)
        t256[:, ok] = np.asarray(mod.table, np.int64)[:, idx[ok]]
        consts = [("table", "uint8_t", t256 & 0xFF)]
        xb, yb = "(const uint8_t *)x0", "(uint8_t *)y0"
        if rows > 1:
            axis = len(x.shape) + mod.channel_axis
            inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
            ch = x.shape[axis]
            body = f"""for (int o = 0; o < {x.size // (inner * ch)}; o++) for (int c = 0; c < {ch}; c++)
    dfq_lut(K_table + c * 256, {xb} + (o * {ch} + c) * {inner}, {yb} + (o * {ch} + c) * {inner}, {inner});"""
        else:
            body = f"dfq_lut(K_table, {xb}, {yb}, {x.size});"
        self.step(f"table {mod.op} {mod.name}", [x.name], [out.name], body, consts)

    def _binary(self, mod, out: Tensor) -> None:
        a, b = self.t(mod.input.name), self.t(mod.other.name)
        fin = f"y0[{{o}}] = ({out.ctype})dfq_requant(v, {mod.shift}, {mod.code_min}, {mod.code_max});"
        if mod.op == "MatMul":
            if len(a.shape) < 2 or len(b.shape) < 2:
                raise DfqError(f"C output: MatMul {mod.name} needs operands of rank 2 or more")
            m, kk = a.shape[-2:]
            nn = b.shape[-1]
            lead = out.shape[:-2]
            sa = _broadcast_strides(a.shape[:-2], lead, m * kk)
            sb = _broadcast_strides(b.shape[:-2], lead, kk * nn)
            loops, ia, ib, io = _nest(lead, [sa, sb], "l")
            body = loops + f"""
for (int i = 0; i < {m}; i++) for (int j = 0; j < {nn}; j++) {{
    int32_t v = 0;
    for (int k = 0; k < {kk}; k++) v += (int32_t)x0[{ia} + i * {kk} + k] * (int32_t)x1[{ib} + k * {nn} + j];
    {fin.format(o=f"({io}) * {m * nn} + i * {nn} + j")}
}}""" + "}" * len(lead)
            self.step(f"MatMul {mod.name}", [a.name, b.name], [out.name], body)
            return
        shape = out.shape
        sa = _broadcast_strides(a.shape, shape, 1)
        sb = _broadcast_strides(b.shape, shape, 1)
        loops, ia, ib, io = _nest(shape, [sa, sb], "i")
        if mod.op == "Mul":
            v = f"(int32_t)x0[{ia}] * (int32_t)x1[{ib}]"
        else:
            v = (f"dfq_align((int32_t)x0[{ia}], {mod.a_shift}) {'+' if mod.op == 'Add' else '-'} "
                 f"dfq_align((int32_t)x1[{ib}], {mod.b_shift})")
        body = loops + f"\nint32_t v = {v};\n{fin.format(o=io)}\n" + "}" * len(shape)
        self.step(f"{mod.op} {mod.name}", [a.name, b.name], [out.name], body)

    def _layer_norm(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        n = mod.width
        consts = [("gain", "int32_t", mod.gain), ("offset", "int32_t", mod.offset)]
        m = 1 << mod.mean_bits
        body = f"""for (int r = 0; r < {x.size // n}; r++) {{
    const {x.ctype} *xr = x0 + r * {n};
    int32_t total = 0, sq = {mod.eps_code};
    for (int i = 0; i < {n}; i++) total += xr[i];
    const int32_t mean = dfq_rdiv(total * {m}, {n});
    for (int i = 0; i < {n}; i++) {{ int32_t d = xr[i] * {m} - mean; sq += d * d; }}
    int32_t sd = dfq_isqrt(sq);
    if (sd < 1) sd = 1;
    for (int i = 0; i < {n}; i++) {{
        const int32_t d = xr[i] * {m} - mean;
        const int32_t q = dfq_rdiv(d * K_gain[i], sd) + K_offset[i];
        y0[r * {n} + i] = ({out.ctype})dfq_requant(q, {mod.gain_shift}, {mod.code_min}, {mod.code_max});
    }}
}}"""
        self.step(f"LayerNormalization {mod.name}", [x.name], [out.name], body, consts)

    def _softmax(self, mod, out: Tensor) -> None:
        x = self.t(mod.input.name)
        n = x.shape[-1]
        consts = [("exp", "int32_t", mod.exp_table)]
        body = f"""for (int r = 0; r < {x.size // n}; r++) {{
    const {x.ctype} *xr = x0 + r * {n};
    int32_t top = xr[0], total = 0;
    for (int i = 1; i < {n}; i++) if (xr[i] > top) top = xr[i];
    for (int i = 0; i < {n}; i++) total += K_exp[top - xr[i]];
    for (int i = 0; i < {n}; i++) {{
        const int32_t e = K_exp[top - xr[i]] * {1 << mod.output.frac};
        y0[r * {n} + i] = ({out.ctype})dfq_requant(dfq_rdiv(e, total), 0, {mod.code_min}, {mod.code_max});
    }}
}}"""
        self.step(f"Softmax {mod.name}", [x.name], [out.name], body, consts)

    # ops that move codes -----------------------------------------------------------------------
    def passthrough(self, node: gs.Node) -> None:
        src = self.t(node.inputs[0].name)
        if node.op in ALIAS_OPS:
            out = node.outputs[0].name
            self.tensors[out] = Tensor(out, src.ctype, self.shape(out), src.name, src.frac)
            return
        outs = [self.add_tensor(t.name, src.ctype, frac=src.frac) for t in node.outputs]
        if node.op == "MaxPool":
            self._max_pool(node, src, outs[0])
        elif node.op == "Concat":
            self._concat(node, outs[0])
        elif node.op in GATHER_OPS:
            for k, out in enumerate(outs):
                idx = self._index_map(node, src, k)
                body = f"""for (int i = 0; i < {out.size}; i++) y0[i] = K_index[i] < 0 ? 0 : x0[K_index[i]];"""
                self.step(f"{node.op} {node.name}", [src.name], [out.name], body, [("index", "int32_t", idx)])
        else:
            raise DfqError(f"C output: no kernel for {node.op} {node.name}")

    def _max_pool(self, node: gs.Node, x: Tensor, out: Tensor) -> None:
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise DfqError(f"C output: MaxPool {node.name}'s indices output is read")
        if len(x.shape) not in (3, 4):
            raise DfqError(f"C output: MaxPool {node.name} needs a 3-d or 4-d input")
        xs, ys = x.shape, out.shape
        k = [int(v) for v in node.attrs["kernel_shape"]]
        nd = len(k)
        s = [int(v) for v in node.attrs.get("strides", [1] * nd)]
        d = [int(v) for v in node.attrs.get("dilations", [1] * nd)]
        pads = resolve_pads(attr_str(node, "auto_pad", "NOTSET"), [int(v) for v in node.attrs.get("pads", [])],
                            xs[2:], k, s, d)
        xs, ys, k, s, d, pt, pl = _as_2d(xs, ys, k, s, d, pads)
        pads = [pt, pl]
        n, c, h, w = xs
        oh, ow = ys[2:]
        lo = 0 if x.ctype == "uint8_t" else -128
        body = f"""for (int b = 0; b < {n}; b++) for (int ch = 0; ch < {c}; ch++) {{
const {x.ctype} *xc = x0 + (b * {c} + ch) * {h * w};
for (int oy = 0; oy < {oh}; oy++) for (int ox = 0; ox < {ow}; ox++) {{
    int32_t v = {lo};
    for (int ky = 0; ky < {k[0]}; ky++) {{
        const int iy = oy * {s[0]} + ky * {d[0]} - {pads[0]};
        if (iy < 0 || iy >= {h}) continue;
        for (int kx = 0; kx < {k[1]}; kx++) {{
            const int ix = ox * {s[1]} + kx * {d[1]} - {pads[1]};
            if (ix >= 0 && ix < {w} && xc[iy * {w} + ix] > v) v = xc[iy * {w} + ix];
        }}
    }}
    y0[((b * {c} + ch) * {oh} + oy) * {ow} + ox] = ({x.ctype})v;
}}
}}"""
        self.step(f"MaxPool {node.name}", [x.name], [out.name], body)

    def _concat(self, node: gs.Node, out: Tensor) -> None:
        axis = int(node.attrs.get("axis", 0)) % len(out.shape)
        outer = int(np.prod(out.shape[:axis], dtype=np.int64))
        ins = [self.t(t.name) for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if len(ins) != len(node.inputs):
            raise DfqError(f"C output: Concat {node.name} has a constant input")
        lines, at = [], 0
        total = out.size // max(outer, 1)
        for j, t in enumerate(ins):
            inner = t.size // max(outer, 1)
            lines.append(f"for (int i = 0; i < {inner}; i++) y0[o * {total} + {at} + i] = x{j}[o * {inner} + i];")
            at += inner
        body = f"for (int o = 0; o < {outer}; o++) {{\n" + "\n".join(lines) + "\n}"
        self.step(f"Concat {node.name}", [t.name for t in ins], [out.name], body)

    def _index_map(self, node: gs.Node, x: Tensor, k: int) -> np.ndarray:
        """Which input element each element of output k is (-1: a zero of a constant pad): the node
        run by onnxruntime on the input's flat indices + 1 (exact in float32)."""
        if x.size >= FLOAT32_EXACT:
            raise DfqError(f"C output: {node.op} {node.name}'s input has {x.size} elements (index maps need < 2^24)")
        inp = gs.Variable("dfq_index_in", np.float32, list(x.shape))
        inputs = [inp]
        for t in node.inputs[1:]:
            if not t.name:
                inputs.append(gs.Variable.empty())
            elif isinstance(t, gs.Constant):
                inputs.append(gs.Constant(t.name, np.asarray(t.values)))
            else:
                v = self.values.get(t.name)
                if v is None:
                    raise DfqError(f"C output: {node.op} {node.name}: input {t.name} is not known statically")
                inputs.append(gs.Constant(t.name, np.asarray(v)))
        if node.op == "Pad" and len(inputs) > 2 and inputs[2].name:
            inputs[2] = gs.Constant("dfq_pad_zero", np.zeros((), np.float32))
        outs = [gs.Variable(f"dfq_index_out{j}", np.float32) for j in range(len(node.outputs))]
        g = gs.Graph(nodes=[gs.Node(node.op, node.name, dict(node.attrs), inputs, outs)], inputs=[inp],
                     outputs=[outs[k]], opset=self.graph.opset)
        sess = analysis_session(g, f"C output: onnxruntime cannot run {node.op} {node.name} on indices")
        flat = np.arange(1, x.size + 1, dtype=np.float32).reshape(x.shape)
        y = sess.run(None, {inp.name: flat})[0]
        return np.rint(y).astype(np.int64).reshape(-1) - 1


def _weight_consts(mod, w: np.ndarray) -> list:
    """A linear module's constants: its weight codes `w` (in the kernel's layout) and its int32 bias."""
    return [("w", "int8_t", w)] + ([("bias", "int32_t", mod.bias)] if mod.bias is not None else [])


def _as_2d(xs: tuple, ys: tuple, kernel, strides, dilations, pads) -> tuple:
    """(input shape, output shape, kernel, strides, dilations, top pad, left pad) of a 1-d or 2-d
    window op (Conv, ConvTranspose, MaxPool) as 2-d: a 1-d op is one of height 1."""
    if len(kernel) == 1:
        return (xs[:2] + (1,) + tuple(xs[2:]), ys[:2] + (1,) + tuple(ys[2:]), (1, kernel[0]), (1, strides[0]),
                (1, dilations[0]), 0, pads[0])
    return tuple(xs), tuple(ys), tuple(kernel), tuple(strides), tuple(dilations), pads[0], pads[1]


def _broadcast_strides(shape: tuple, out: tuple, unit: int) -> list[int]:
    """Element strides of a tensor of `shape` (row-major, each step `unit` elements) read at the
    indices of the broadcast output shape `out` (0 along broadcast dims)."""
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    strides, acc = [], unit
    for d in reversed(shape):
        strides.append(0 if d == 1 else acc)
        acc *= d
    return list(reversed(strides))


def _nest(shape: tuple, operand_strides: list, var: str) -> tuple[str, str, str, str]:
    """Nested for-loops over `shape` (opened, not closed) and the index expressions of two operands
    with the given strides and of the row-major output."""
    loops = "".join(f"for (int {var}{d} = 0; {var}{d} < {n}; {var}{d}++) {{\n" for d, n in enumerate(shape))

    def expr(strides):
        terms = [f"{var}{d} * {s}" for d, s in enumerate(strides) if s]
        return " + ".join(terms) or "0"

    out_full = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
    return loops, expr(operand_strides[0]), expr(operand_strides[1]), expr(out_full)


def tensor_values(graph: gs.Graph, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The values of `names` in `graph` on `feeds` (one onnxruntime run)."""
    g = graph.copy()
    tmap = g.tensors()
    g.outputs = [tmap[n] for n in names]
    for t in g.outputs:
        if t.dtype is None:
            t.dtype = np.float32
    g.cleanup()
    sess = analysis_session(g, "C output: onnxruntime cannot run the model")
    fed = {k: v for k, v in feeds.items() if k in {i.name for i in g.inputs}}
    return dict(zip(names, sess.run(names, fed)))


def shape_feeds(kept: list, model, fixed_batch: bool) -> dict[str, np.ndarray]:
    """One input batch that fixes the C program's shapes: the first kept calibration sample (the
    first whole batch where the model's batch dim is fixed), or zeros in data-free mode (every dim
    but the batch must then be static)."""
    if kept:
        from ..calibration_data import first_samples
        return first_samples(kept, 1, whole=fixed_batch)[0]
    from ..calibration_data import input_specs
    feeds = {}
    for s in input_specs(model):
        if any(d is None for d in s.shape[1:]):
            raise DfqError(f"C output: input {s.name} has dynamic dims {list(s.shape)}; give calibration data "
                           "(--calib) to fix its shape")
        feeds[s.name] = np.zeros((s.shape[0] or 1,) + tuple(s.shape[1:]), s.dtype)
    return feeds


def program(graph: gs.Graph, qm: QuantizedModel, feeds: dict[str, np.ndarray]) -> _Builder:
    """The steps of the C program: each integer module of `qm` and each op that moves codes, in the
    graph's order, on static shapes measured on `feeds` (one batch)."""
    plan = qm.plan
    if plan.float_nodes:
        ops = ", ".join(f"{op} ({n})" for op, n in sorted(plan.float_ops.items()))
        twin = any(name.startswith(TWIN_CAST) for name in plan.float_nodes)
        raise DfqError(f"C output needs an integer-only model; these ops stay float: {ops}" +
                       (" (the Casts at a float16 / float64 model's inputs and outputs: the C library takes and "
                        "returns float32, so export the model in float32)" if twin else ""))
    ir = {m.name: m for m in qm.modules}
    inputs = [t for t in graph.inputs]
    names = sorted({t.name for n in graph.nodes for t in n.inputs + n.outputs
                    if t.name and not isinstance(t, gs.Constant)} - {t.name for t in inputs})
    values = tensor_values(graph, feeds, names)
    values.update({t.name: feeds[t.name] for t in inputs})
    b = _Builder(graph, qm, values)
    for t in inputs:
        if t.name not in plan.requant:
            raise DfqError(f"C output: graph input {t.name} is not quantized (read by no integer module)")
        b.code_tensor(t.name).offset = None
    removed = set()
    for m in plan.modules:
        removed.update(m.nodes)
    shape_nodes = set(plan.shape_nodes)
    for node in graph.nodes:
        mod = ir.get(node.name)
        if mod is not None:
            b.module(mod)
            continue
        if node.name in removed or node.name in shape_nodes:
            continue
        out = node.outputs[0].name if node.outputs else None
        if out in plan.passthrough:
            b.passthrough(node)
            continue
        raise DfqError(f"C output: {node.op} {node.name} has no integer form")
    for t in graph.outputs:
        if t.name not in b.tensors:
            raise DfqError(f"C output: graph output {t.name} is not computed in integers")
    return b


def _root(tensors: dict, name: str) -> str:
    while tensors[name].alias is not None:
        name = tensors[name].alias
    return name


def layout(b: _Builder, graph_inputs: list[str], graph_outputs: list[str], reuse: bool = True) -> tuple[int, int]:
    """Arena offsets of every tensor by first fit over lifetimes (reuse=False: every tensor its own
    place, for inspection), and the scratch offset; returns (arena bytes, scratch offset)."""
    tensors = b.tensors
    for t in tensors.values():
        t.offset = None
    last = {}
    for k, st in enumerate(b.steps):
        for n in st.inputs + st.outputs:
            last[_root(tensors, n)] = k
    for n in graph_outputs:
        last[_root(tensors, n)] = len(b.steps)
    live: list[tuple[int, int, str]] = []  # (offset, end, root)
    top = 0
    for k, st in enumerate(b.steps):
        for n in st.outputs:
            r = _root(tensors, n)
            if r in graph_inputs or tensors[r].offset is not None:
                continue
            size = -(-tensors[r].nbytes // ALIGN) * ALIGN
            spot = 0
            for off, end, _ in sorted(live):
                if off - spot >= size:
                    break
                spot = max(spot, end)
            tensors[r].offset = spot
            live.append((spot, spot + size, r))
            top = max(top, spot + size)
        if reuse:
            live = [e for e in live if last.get(e[2], -1) > k]
    scratch = max((st.scratch for st in b.steps), default=0)
    return top + scratch * 4, top


def render(b: _Builder, prefix: str, reuse: bool = True) -> CLibrary:
    """The .c and .h texts of the program (see the module docstring)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise DfqError(f"C prefix {prefix!r} is not a C identifier")
    graph_inputs = [t.name for t in b.graph.inputs]
    graph_outputs = [t.name for t in b.graph.outputs]
    arena, scratch_at = layout(b, graph_inputs, graph_outputs, reuse)
    P = prefix.upper()
    tensors = b.tensors

    def ptr(name: str, const: bool) -> str:
        r = _root(tensors, name)
        t = tensors[name]
        if r in graph_inputs:
            return in_names[graph_inputs.index(r)]
        return f"({'const ' if const else ''}{t.ctype} *)(dfq_arena_bytes + {tensors[r].offset})"

    single = len(graph_inputs) == 1 and len(graph_outputs) == 1
    in_names = ["in"] if single else [f"in{i}" for i in range(len(graph_inputs))]
    out_names = ["out"] if single else [f"out{i}" for i in range(len(graph_outputs))]
    in_macros = ["INPUT"] if len(graph_inputs) == 1 else [f"INPUT{i}" for i in range(len(graph_inputs))]
    out_macros = ["OUTPUT"] if len(graph_outputs) == 1 else [f"OUTPUT{i}" for i in range(len(graph_outputs))]
    params = [f"const {tensors[n].ctype} *{v}" for n, v in zip(graph_inputs, in_names)] + \
             [f"{tensors[n].ctype} *{v}" for n, v in zip(graph_outputs, out_names)]
    fparams = [f"const float *{v}" for v in in_names] + [f"float *{v}" for v in out_names]

    c = [f"/* {prefix}.c: generated by dfq-onnx from the quantized model; integer arithmetic only.\n"
         f"   Arena: {arena} bytes; constants: {sum(s.const_bytes for s in b.steps)} bytes (portable kernels), "
         f"{sum(s.simd_const_bytes for s in b.steps)} bytes (x86 SIMD kernels). */",
         f'#include "{prefix}.h"', "#include <string.h>", c_kernels.select(P),
         f"int32_t {prefix}_arena[{max(1, -(-arena // 4))}];",
         f"#define dfq_arena_bytes ((unsigned char *){prefix}_arena)",
         f"#ifndef {P}_STEP_DONE  /* define it to time or trace each step (k: the step's number) */",
         f"#define {P}_STEP_DONE(k) ((void)0)", "#endif", "/* RUNTIME */"]
    for k, st in enumerate(b.steps):
        # restrict: a step's inputs, outputs and scratch never overlap (the layout keeps every
        # tensor a step reads or writes live, and apart, for the whole step)
        args = [f"const {tensors[n].ctype} *restrict x{j}" for j, n in enumerate(st.inputs)] + \
               [f"{tensors[n].ctype} *restrict y{j}" for j, n in enumerate(st.outputs)] + ["int32_t *restrict acc"]
        c.append(f"/* {st.what} */")
        c.extend(st.consts)
        used = "" if re.search(r"\bacc\b", st.body) else "    (void)acc;\n"
        c.append(f"static void {st.name}({', '.join(args)}) {{\n{used}{st.body}\n}}\n")
    run = [f"int {prefix}_run({', '.join(params)}) {{",
           f"    int32_t *acc = (int32_t *)(dfq_arena_bytes + {scratch_at});"]
    for k, st in enumerate(b.steps):
        args = [ptr(n, True) for n in st.inputs] + [ptr(n, False) for n in st.outputs] + ["acc"]
        run.append(f"    {st.name}({', '.join(args)});")
        run.append(f"    {P}_STEP_DONE({k});")
    for n, v, m in zip(graph_outputs, out_names, out_macros):
        src = ptr(n, True)
        run.append(f"    memcpy({v}, {src}, sizeof({v}[0]) * {P}_{m}_SIZE);")
    run += ["    return 0;", "}", ""]
    text = "\n".join(c + run)
    text = text.replace("/* RUNTIME */", _runtime(text))
    # float wrapper
    wrap = [f"#ifndef {P}_NO_FLOAT", "#include <math.h>",
            f"int {prefix}_run_float({', '.join(fparams)}) {{"]
    for n, v, m in zip(graph_inputs, in_names, in_macros):
        t = tensors[n]
        lo, hi = qrange(8, t.ctype == "uint8_t")
        wrap += [f"    static {t.ctype} q_{v}[{P}_{m}_SIZE];",
                 f"    for (int i = 0; i < {P}_{m}_SIZE; i++) {{",
                 f"        float s = {v}[i] * {_hexfloat(t.frac)};",
                 f"        s = s != s ? 0.0f : s < {lo}.0f ? {lo}.0f : s > {hi}.0f ? {hi}.0f : rintf(s);",
                 f"        q_{v}[i] = ({t.ctype})s;", "    }"]
    for n, v, m in zip(graph_outputs, out_names, out_macros):
        wrap.append(f"    static {tensors[n].ctype} q_{v}[{P}_{m}_SIZE];")
    wrap.append(f"    int rc = {prefix}_run({', '.join([f'q_{v}' for v in in_names] + [f'q_{v}' for v in out_names])});")
    for n, v, m in zip(graph_outputs, out_names, out_macros):
        fr = _out_frac(b, n)
        if isinstance(fr, int):
            wrap.append(f"    for (int i = 0; i < {P}_{m}_SIZE; i++) {v}[i] = (float)q_{v}[i] * {_hexfloat(-fr)};")
        else:
            wrap.append(f"    for (int i = 0; i < {P}_{m}_SIZE; i++) "
                        f"{v}[i] = ldexpf((float)q_{v}[i], -{prefix}_{m.lower()}_frac[(i / {fr[1]}) % {len(fr[0])}]);")
    wrap += ["    return rc;", "}", "#endif", ""]
    text += "\n".join(wrap)

    c_fracs: list[str] = []
    h = [f"/* {prefix}.h: generated by dfq-onnx. A value is its code times 2^-FRAC. */",
         f"#ifndef {P}_H", f"#define {P}_H", "#include <stdint.h>", ""]
    for n, m in zip(graph_inputs, in_macros):
        t = tensors[n]
        h += [f"#define {P}_{m}_SIZE {t.size}  /* {t.ctype} codes, shape {list(t.shape)} ({n}) */",
              f"#define {P}_{m}_FRAC {t.frac}"]
    for n, m in zip(graph_outputs, out_macros):
        t = tensors[n]
        fr = _out_frac(b, n)
        h.append(f"#define {P}_{m}_SIZE {t.size}  /* {t.ctype} {'codes' if t.ctype != 'int32_t' else 'sums'}, "
                 f"shape {list(t.shape)} ({n}) */")
        if isinstance(fr, int):
            h.append(f"#define {P}_{m}_FRAC {fr}")
        else:  # a linear module's sums: a fraction per output channel
            h += ["/* the fraction of each output channel (axis 1): value = sum * 2^-frac[channel] */",
                  f"extern const int8_t {prefix}_{m.lower()}_frac[{len(fr[0])}];"]
            c_fracs.append(f"const int8_t {prefix}_{m.lower()}_frac[{len(fr[0])}] = {{{', '.join(str(int(x)) for x in fr[0])}}};")
    h += [f"#define {P}_ARENA_BYTES {arena}", "",
          "/* The static arena every intermediate tensor lives in. */",
          f"extern int32_t {prefix}_arena[];", "",
          "/* One inference on codes; returns 0. Not reentrant (one arena). */",
          f"int {prefix}_run({', '.join(params)});", "",
          f"#ifndef {P}_NO_FLOAT",
          "/* The same on float values: quantized (round half to even, saturated) and dequantized here. */",
          f"int {prefix}_run_float({', '.join(fparams)});", "#endif", "", f"#endif /* {P}_H */", ""]
    text += "\n".join(c_fracs) + "\n"
    consts = sum(s.const_bytes for s in b.steps)
    weights = sum(int(np.asarray(m.weight).size) for m in b.qm.modules if m.kind == "linear")
    facts = {"arena_bytes": arena, "const_bytes": consts, "const_bytes_simd": sum(s.simd_const_bytes for s in b.steps),
             "weight_bytes": weights, "steps": len(b.steps),
             "tensors": {n: {"offset": tensors[_root(tensors, n)].offset, "ctype": t.ctype, "shape": list(t.shape),
                             "input": _root(tensors, n) in graph_inputs, "root": _root(tensors, n)}
                         for n, t in tensors.items()},
             "inputs": graph_inputs, "outputs": graph_outputs}
    return CLibrary(text, "\n".join(h), prefix, facts, b)


def _out_frac(b: _Builder, name: str):
    """Fraction of a graph output's C values: its codes' (an int), or a linear module's int32 sums'
    (an int, or (fractions per channel, elements per channel step) where they differ)."""
    for m in b.qm.modules:
        if m.output_name == name and m.kind == "linear" and m.output is None:
            fr = np.asarray(m.sum_frac, np.int64)
            if len(np.unique(fr)) == 1:
                return int(fr[0])
            shape = b.tensors[name].shape
            inner = int(np.prod(shape[2:], dtype=np.int64)) if m.op in ("Conv", "ConvTranspose") else 1
            return fr, inner
    return b.tensors[name].frac


def _hexfloat(f: int) -> str:
    """2^f as an exact C float literal."""
    return f"0x1p{f:+d}f"


def emit_c(graph: gs.Graph, qm: QuantizedModel, feeds: dict[str, np.ndarray], prefix: str, reuse: bool = True) -> CLibrary:
    """The C library of the quantized model `qm` (built for the integer graph) of `graph`, with
    shapes fixed by `feeds` (one batch)."""
    return render(program(graph, qm, feeds), prefix, reuse)
