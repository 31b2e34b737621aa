"""onnxruntime's x86 u8 x s8 kernels without VNNI, run for real on any x86-64 machine: under
qemu-x86_64 emulating a Haswell CPU (AVX2, no VNNI), onnxruntime dispatches to its AVX2 kernels
(vpmaddubsw: two u8 x s8 products added in int16, saturating). The saturation guard of the default
target assumes which weights those kernels pair (quantized.int16_pairs, quantized.kernel_rows);
here the kernels themselves say which pairs saturate, and the default target's QDQ model gives the
same outputs under them as on this machine. Skipped where qemu-x86_64 is missing (CI installs it)."""
from __future__ import annotations

import itertools
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx import QuantConfig
from dfq_onnx.quantized import int16_pairs, kernel_rows
from dfq_onnx.pipeline import run

from helpers import CALIB, SHIPPED, TEST, run_ort

QEMU = shutil.which("qemu-x86_64")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(QEMU is None or platform.machine() not in ("x86_64", "AMD64"),
                                 reason="needs qemu-x86_64 on an x86-64 machine")]

# Runs every model in a folder on its input and saves the outputs: the child process under qemu.
CHILD = """
import sys, glob, os, numpy as np, onnxruntime as ort
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.onnx"))):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = np.load(path[:-5] + ".in.npy")
    np.save(path[:-5] + ".out.npy", s.run(None, {s.get_inputs()[0].name: x})[0])
"""


def run_on_avx2(folder) -> None:
    """Run CHILD on `folder` in the emulated AVX2 CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP")}
    p = subprocess.run([QEMU, "-cpu", "Haswell", os.path.realpath(sys.executable), "-c", CHILD, str(folder)],
                       capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-2000:]


def _probe(op: str, wshape: tuple, attrs: dict, xshape: tuple, pairs: list) -> tuple[onnx.ModelProto, np.ndarray]:
    """A quantized op (QLinearConv or QLinearMatMul, u8 input of 255s, unit scales) whose output
    channel o holds the code 127 at the two flat positions pairs[o] of its own weights and 0
    elsewhere: its result is 255 * 254 unless the kernel adds that pair in int16 (then 32767)."""
    out_axis = 1 if op == "QLinearMatMul" else 0
    w = np.zeros(wshape, np.int8)
    per = int(np.prod(wshape)) // wshape[out_axis]
    for o, (a, b) in enumerate(pairs):
        ch = np.zeros(per, np.int8)
        ch[[a, b]] = 127
        if out_axis == 0:
            w[o] = ch.reshape(wshape[1:])
        else:
            w[:, o] = ch
    m = wshape[out_axis]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(256.0, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    if op == "QLinearConv":
        inits += [numpy_helper.from_array(np.ones(m, np.float32), "ws"), numpy_helper.from_array(np.zeros(m, np.int8), "wz")]
    else:
        inits += [numpy_helper.from_array(np.array(1.0, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz")]
    node = helper.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **attrs)
    g = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(xshape))],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), w


# (float op the guard sees, its attributes, weight shape, input shape): an odd and an even channel
# count per group, the indirect-convolution path (channels a multiple of 4), a pointwise and a
# grouped convolution, a depthwise one, and matrix products.
CASES = [("Conv", {}, (3, 3, 3), (1, 3, 3, 3)),
         ("Conv", {}, (4, 3, 3), (1, 4, 3, 3)),
         ("Conv", {}, (6, 3, 3), (1, 6, 3, 3)),
         ("Conv", {}, (8, 1, 1), (1, 8, 1, 1)),
         ("Conv", {"group": 2}, (3, 3, 3), (1, 6, 3, 3)),
         ("Conv", {"group": 48}, (1, 3, 3), (1, 48, 3, 3)),
         ("MatMul", {}, (7,), (4, 7)),
         ("MatMul", {}, (12,), (4, 12))]


def test_the_kernels_saturate_exactly_the_pairs_the_guard_assumes(tmp_path):
    """For every pair of weight positions of one output channel (two codes of 127, inputs 255):
    the emulated AVX2 kernel saturates iff quantized.int16_pairs says the op is paired and the
    two positions are adjacent ((2i, 2i+1)) in quantized.kernel_rows' order."""
    expected = {}
    for i, (op, attrs, per_shape, xshape) in enumerate(CASES):
        per = int(np.prod(per_shape))
        pairs = list(itertools.combinations(range(per), 2))
        if op == "Conv":
            g = attrs.get("group", 1)
            depthwise = per_shape[0] == 1 and g == xshape[1]
            m = g if depthwise else -(-len(pairs) // g) * g
            pairs = (pairs * (-(-m // len(pairs))))[:m]  # every output channel tests a pair
            wshape = (m,) + per_shape
            model, w = _probe("QLinearConv", wshape, attrs, xshape, pairs)
        else:
            m = len(pairs)
            wshape = (per, m)
            model, w = _probe("QLinearMatMul", wshape, {}, xshape, pairs)
        node = gs.Node(op, inputs=[gs.Variable("x"), gs.Constant("w", np.zeros(wshape, np.float32))], attrs=attrs)
        paired = int16_pairs(node)
        assert paired is not None
        rows = kernel_rows(node, np.arange(int(np.prod(wshape))).reshape(wshape))  # flat weight index, K order
        flat = np.arange(int(np.prod(wshape))).reshape(wshape)
        want = []
        for o, (a, b) in enumerate(pairs):
            own = np.take(flat, o, axis=1 if op == "MatMul" else 0).reshape(-1)  # the channel's flat indices
            pos = {int(np.where(rows[o] == own[a])[0][0]), int(np.where(rows[o] == own[b])[0][0])}
            want.append(bool(paired) and min(pos) % 2 == 0 and max(pos) == min(pos) + 1)
        expected[i] = np.array(want)
        onnx.save(model, str(tmp_path / f"case{i}.onnx"))
        np.save(tmp_path / f"case{i}.in.npy", np.full(xshape, 255, np.uint8))
    run_on_avx2(tmp_path)
    for i, want in expected.items():
        y = np.load(tmp_path / f"case{i}.out.npy").reshape(-1)[:len(want)] if CASES[i][0] == "Conv" else \
            np.load(tmp_path / f"case{i}.out.npy")[0, :len(want)]
        saturated = y.astype(np.int64) * 256 < 255 * 254 - 256
        assert want.any() == (CASES[i][1].get("group") != 48), CASES[i]  # only the depthwise case has no pair
        np.testing.assert_array_equal(saturated, want, err_msg=str(CASES[i]))


def test_default_target_gives_the_same_outputs_on_avx2(tmp_path):
    """Deployed (onnxruntime's int8 kernels) on test digits: the default target's QDQ model gives
    the same outputs, bit for bit, under the emulated AVX2 kernels as on this machine; the
    ort-x86-vnni target's model, whose pairs may saturate, does not where this machine has VNNI
    (the risk is real)."""
    x = np.load(TEST)["input"][:200]
    models = {"default": run(SHIPPED, CALIB).model, "vnni": run(SHIPPED, CALIB, QuantConfig(target="ort-x86-vnni")).model}
    for name, model in models.items():
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        np.save(tmp_path / f"{name}.in.npy", x)
    run_on_avx2(tmp_path)
    same = {name: np.array_equal(np.load(tmp_path / f"{name}.out.npy"),
                                 run_ort(model, {model.graph.input[0].name: x})[0]) for name, model in models.items()}
    assert same["default"]
    with open("/proc/cpuinfo") as f:
        vnni_here = any(flag in f.read() for flag in ("avx512_vnni", "avx_vnni"))
    if vnni_here:  # this machine's VNNI kernels are exact: the emulated AVX2 ones are not
        assert not same["vnni"]
