"""The C library's kernel families that the x86 tests of test_c_export.py do not reach: the ARM
NEON dot-product family (cross-compiled with -march=armv8.2-a+dotprod, run under qemu-aarch64)
and the optional threads (-D<PREFIX>_THREADS=N), each compared with the integer ONNX graph under
onnxruntime, output code for output code."""
import numpy as np
import pytest

from dfq_onnx import QuantConfig
from dfq_onnx.pipeline import run

import cbuild
from test_c_export import _conv_model, graph_values, input_codes

pytestmark = pytest.mark.skipif(cbuild.CC is None, reason="no C compiler (cc/gcc); .ci/run installs gcc")
ARM = ["-O2", "-march=armv8.2-a+dotprod"]
needs_arm = pytest.mark.skipif(cbuild.AARCH64_CC is None or cbuild.QEMU is None,
                               reason="no aarch64-linux-gnu-gcc or qemu-aarch64 (.ci/run installs "
                                      "gcc-aarch64-linux-gnu and qemu-user)")
# (cin, cout, h, w, k, stride, depthwise, residual): pointwise by pixels and by channels, patch
# rows with and without stride, a residual, channel counts off the 4 / 8 blocks, pixel tails
SHAPES = [(12, 10, 9, 7, 1, 1, False, False), (300, 20, 5, 3, 1, 1, False, False), (7, 7, 11, 13, 1, 1, False, True),
          (5, 9, 10, 6, 3, 1, False, False), (16, 16, 9, 9, 3, 1, False, True), (6, 13, 12, 7, 3, 2, False, False),
          (8, 8, 7, 9, 3, 2, True, False)]


def _check(model, rng, cin, h, w, flags, cc=None, samples=2, where=None, family=None):
    calib = {"x": rng.normal(0, 1, (16, cin, h, w)).astype(np.float32)}
    r = run(model, calib, QuantConfig(format="c", prefix="k", effort="fast"))
    if family is not None:
        assert cbuild.selected_family(r.library, flags, cc) == family
    x = rng.normal(0, 1, (samples, cin, h, w)).astype(np.float32)
    codes = input_codes(r, {"x": x})["x"]
    exe = cbuild.build(r.library, where, flags, cc=cc)
    got = np.concatenate([o[0] for o in cbuild.run(r.library, exe, [[codes[i:i + 1]] for i in range(samples)])])
    np.testing.assert_array_equal(got, graph_values(r, {"x": x}, ["y"])["y"])


@needs_arm
def test_shipped_model_arm_dotprod_under_qemu(tmp_path, test_data):
    """The shipped model built for ARMv8.2 with the dot product (the NEON family is selected) and
    for ARM without it (the portable kernels), run under qemu: 40 test digits give the integer
    graph's logits exactly."""
    from helpers import CALIB, SHIPPED
    r = run(SHIPPED, CALIB, QuantConfig(format="c", prefix="mnist"))
    x, _ = test_data
    codes = input_codes(r, {"input": x[:40]})["input"]
    want = graph_values(r, {"input": x[:40]}, ["logits"])["logits"]
    for name, flags, simd in (("dotprod", ARM, 1), ("plain", ["-O2", "-march=armv8-a"], 0)):
        assert cbuild.selected_family(r.library, flags, cbuild.AARCH64_CC) == simd
        exe = cbuild.build(r.library, tmp_path / name, flags, cc=cbuild.AARCH64_CC)
        got = np.concatenate([o[0] for o in cbuild.run(r.library, exe, [[codes[i:i + 1]] for i in range(40)])])
        np.testing.assert_array_equal(got, want, err_msg=name)


@needs_arm
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[2]}x{s[3]}-k{s[4]}s{s[5]}{'dw' if s[6] else ''}"
                                                f"{'res' if s[7] else ''}" for s in SHAPES])
def test_convolutions_arm_dotprod_under_qemu(shape, tmp_path):
    cin, cout, h, w, k, stride, dw, res = shape
    model, rng = _conv_model(cin, cin if dw else cout, h, w, k, stride, cin if dw else 1, res, 5)
    _check(model, rng, cin, h, w, ARM, cbuild.AARCH64_CC, where=tmp_path, family=1)


@pytest.mark.parametrize("fam", sorted(set(cbuild.families("k")) - {"portable"}) or ["none"])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=[f"{s[0]}x{s[2]}x{s[3]}-k{s[4]}" for s in SHAPES[:5]])
def test_convolutions_threaded(shape, fam, tmp_path):
    """-DK_THREADS=3 (with no least work, so every matrix product is split over 3 threads, the
    channel blocks unevenly), under the sanitizers: the output equals the integer graph's."""
    if fam == "none":
        pytest.skip("no SIMD kernel family runs on this machine (threads split the SIMD kernels)")
    cin, cout, h, w, k, stride, dw, res = shape
    model, rng = _conv_model(cin, cout, h, w, k, stride, 1, res, 6)
    flags = [*cbuild.SANITIZE, *cbuild.families("k")[fam][0], "-DK_THREADS=3", "-DK_THREAD_WORK=0"]
    _check(model, rng, cin, h, w, flags, where=tmp_path)


def _general_conv_model(cin, cout, h, w, kernel, strides, dilations, pads, residual, seed):
    """Conv(any kernel, strides, dilations, pads) + bias [+ the input as residual] + Relu, float, NCHW."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    wt = rng.normal(0, 1 / np.sqrt(cin * kernel[0] * kernel[1]), (cout, cin, *kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(kernel), strides=list(strides),
                              dilations=list(dilations), pads=list(pads))]
    last = "c"
    if residual:
        nodes.append(helper.make_node("Add", ["c", "x"], ["s"]))
        last = "s"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    oh, ow = ((n + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
              for i, n in enumerate((h, w)))
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, oh, ow])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), rng


# direct convolutions (one group, 4 input channels or more: phase planes, no patches) over what
# SHAPES does not reach: dilations, asymmetric pads, rectangular kernels, strides that differ by
# axis, a strided pointwise convolution, a dilated one with a residual, channels past a quad
DIRECT = [(8, 8, 13, 11, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), True),
          (5, 12, 15, 9, (3, 5), (2, 1), (1, 1), (0, 2, 1, 2), False),
          (9, 7, 10, 10, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0), False),
          (33, 16, 6, 5, (3, 3), (2, 2), (1, 2), (1, 1, 1, 1), False),
          (6, 4, 3, 40, (1, 7), (1, 3), (1, 1), (0, 3, 0, 3), False)]
DIRECT_IDS = [f"{s[0]}x{s[2]}x{s[3]}-k{s[4][0]}{s[4][1]}s{s[5][0]}{s[5][1]}d{s[6][0]}{s[6][1]}" for s in DIRECT]


@pytest.mark.parametrize("shape", DIRECT, ids=DIRECT_IDS)
def test_direct_convolutions(shape, tmp_path):
    """Every x86 family the machine runs (under the sanitizers, and -O3 -march=native) and the
    portable one: output codes equal the integer graph's."""
    cin, cout, h, w, kernel, strides, dil, pads, res = shape
    model, rng = _general_conv_model(cin, cout, h, w, kernel, strides, dil, pads, res, 7)
    for fam, (flags, _) in cbuild.families("k").items():
        _check(model, rng, cin, h, w, [*cbuild.SANITIZE, *flags], where=tmp_path / fam)
    _check(model, rng, cin, h, w, cbuild.OPTIMIZE, where=tmp_path / "native")


@needs_arm
@pytest.mark.parametrize("shape", DIRECT, ids=DIRECT_IDS)
def test_direct_convolutions_arm_dotprod_under_qemu(shape, tmp_path):
    cin, cout, h, w, kernel, strides, dil, pads, res = shape
    model, rng = _general_conv_model(cin, cout, h, w, kernel, strides, dil, pads, res, 8)
    _check(model, rng, cin, h, w, ARM, cbuild.AARCH64_CC, where=tmp_path, family=1)


def test_lookup_tables_in_every_family(tmp_path):
    """Activations as tables (dfq_lut: AVX512-VBMI permutes, NEON table lookups, a loop elsewhere)
    on maps of more than 64 codes, signed and unsigned inputs, one table and a table per channel
    (PRelu): every family, sanitized, and ARM under qemu, equals the integer graph."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.4, (5, 6, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, (6, 1, 1)).astype(np.float32), "slope")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "slope"], ["p"]),
             helper.make_node("Conv", ["p", "w2"], ["c2"]),
             helper.make_node("Tanh", ["c2"], ["t"]),
             helper.make_node("HardSwish", ["t"], ["y"])]
    g = helper.make_graph(nodes, "tables", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 13, 17])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 13, 17])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    lib = run(model, {"x": rng.normal(0, 1, (16, 3, 13, 17)).astype(np.float32)},
              QuantConfig(format="c", prefix="k", effort="fast")).library
    tables = [s for s in lib.program.steps if s.what.startswith("table")]
    assert len(tables) >= 2 and any("c * 256" in s.body for s in tables), [s.what for s in lib.program.steps]
    for fam, (flags, _) in cbuild.families("k").items():
        _check(model, rng, 3, 13, 17, [*cbuild.SANITIZE, *flags], where=tmp_path / fam)
    _check(model, rng, 3, 13, 17, cbuild.OPTIMIZE, where=tmp_path / "native")
    if cbuild.AARCH64_CC is not None and cbuild.QEMU is not None:
        _check(model, rng, 3, 13, 17, ARM, cbuild.AARCH64_CC, where=tmp_path / "arm", family=1)
