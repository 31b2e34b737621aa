"""The C library (passes/emit_c.py), compiled with the system C compiler under -std=c99 -Wall
-Wextra -Werror -pedantic and run: bit-exact with the integer ONNX graph under onnxruntime and
with the IR executed in numpy (fixedpoint.module_forward), tensor by tensor, on the shipped
model's test digits and on generated graphs (tests/graphgen.py); clean under AddressSanitizer and
UndefinedBehaviorSanitizer."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from dfq_onnx import DfqError, QuantConfig
from dfq_onnx.fixedpoint import module_forward, quantize
from dfq_onnx.passes.emit_c import render
from dfq_onnx.pipeline import run

import cbuild
from graphgen import graphs
from helpers import CALIB, SHIPPED, run_ort
from test_integer import with_outputs

pytestmark = pytest.mark.skipif(cbuild.CC is None, reason="no C compiler (cc/gcc); .ci/run installs gcc")
C_GRAPHS = int(os.environ.get("DFQ_C_GRAPHS", 40))


@pytest.fixture(scope="module")
def shipped_c():
    return run(SHIPPED, CALIB, QuantConfig(format="c", prefix="mnist"))


def input_codes(result, feeds: dict) -> dict:
    qm = result.quantized
    return {k: quantize(v, qm.tensor(k).frac, 8, qm.tensor(k).unsigned) for k, v in feeds.items()}


def graph_values(result, feeds: dict, names) -> dict:
    """Integer tensors of the integer ONNX graph under onnxruntime, by float-graph name."""
    sym = result.symbols
    model = with_outputs(result.model, [sym[n] for n in names])
    vals = dict(zip([o.name for o in model.graph.output], run_ort(model, feeds)))
    return {n: vals[sym[n]] for n in names}


def check_tensor_by_tensor(result, lib, feeds: dict, tmp_path, flags=("-O1",)) -> int:
    """Run the C program (every tensor in its own place) on each sample of `feeds`; every tensor
    equals the integer graph's, and each module's output equals module_forward on the C program's
    own inputs to it. Returns the number of tensors compared."""
    dump = render(lib.program, lib.prefix, reuse=False)
    exe = cbuild.build(dump, tmp_path / "dump", flags, dump=True)
    codes = input_codes(result, feeds)
    ins = dump.facts["inputs"]
    n = len(next(iter(feeds.values())))
    outs = cbuild.run(dump, exe, [[codes[k][i:i + 1] for k in ins] for i in range(n)], dump=True)
    names = [t for t in dump.facts["tensors"] if t in result.symbols and not dump.facts["tensors"][t]["input"]]
    compared = 0
    for i, o in enumerate(outs):  # one sample at a time: a Transpose may move the batch axis
        want = graph_values(result, {k: v[i:i + 1] for k, v in feeds.items()}, names)
        arena = o[-1]
        got = {t: cbuild.tensor_from_arena(dump, arena, t) for t in names}
        for t, info in dump.facts["tensors"].items():  # the graph inputs and their aliases: the caller's codes
            if info["input"]:
                got[t] = codes[info["root"]][i:i + 1].reshape(info["shape"])
        for t in names:
            np.testing.assert_array_equal(got[t], want[t], err_msg=t)
            compared += 1
        for m in result.quantized.modules:
            second = getattr(m, "residual", None) or getattr(m, "other", None)
            y = module_forward(m, got[m.input.name], got[second.name] if second is not None else None)
            np.testing.assert_array_equal(got[m.output_name].astype(np.int64), y, err_msg=m.name)
    return compared


def test_shipped_model_in_c_equals_integer_graph(shipped_c, test_data, tmp_path):
    """The library as generated (arena reused by lifetimes, -O2), built for each kernel family the
    machine runs (portable, AVX2, AVX512-VNNI): its output codes on 300 test digits are the integer
    graph's int32 logits exactly, and its float wrapper gives the integer graph's float logits
    exactly."""
    x, _ = test_data
    lib = shipped_c.library
    codes = input_codes(shipped_c, {"input": x[:300]})["input"]
    want = graph_values(shipped_c, {"input": x[:300]}, ["logits"])["logits"]
    for fam, (flags, simd) in cbuild.families(lib.prefix).items():  # every kernel family this machine runs
        assert cbuild.selected_family(lib, flags) == simd, fam
        exe = cbuild.build(lib, tmp_path / fam, ["-O2", *flags])
        got = np.concatenate([o[0] for o in cbuild.run(lib, exe, [[codes[i:i + 1]] for i in range(300)])])
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want, err_msg=fam)
    # float in, float out: the wrapper quantizes and dequantizes as the integer graph's Q/DQ do
    exe = cbuild.build(lib, tmp_path / "float", ["-O2"], float_io=True)
    got = np.concatenate([o[0] for o in cbuild.run(lib, exe, [[x[i:i + 1]] for i in range(300)], float_io=True)])
    np.testing.assert_array_equal(got, run_ort(shipped_c.model, {"input": x[:300]})[0])


def test_shipped_model_in_c_tensor_by_tensor(shipped_c, test_data, tmp_path):
    x, _ = test_data
    assert check_tensor_by_tensor(shipped_c, shipped_c.library, {"input": x[:20]}, tmp_path) > 0


def test_shipped_model_in_c_under_sanitizers(shipped_c, test_data, tmp_path):
    """AddressSanitizer and UndefinedBehaviorSanitizer (every report fatal) on 20 digits, the
    arena as generated, each kernel family; the results still equal the integer graph's."""
    x, _ = test_data
    lib = shipped_c.library
    codes = input_codes(shipped_c, {"input": x[:20]})["input"]
    want = graph_values(shipped_c, {"input": x[:20]}, ["logits"])["logits"]
    for fam, (flags, _) in cbuild.families(lib.prefix).items():
        exe = cbuild.build(lib, tmp_path / fam, [*cbuild.SANITIZE, *flags])
        got = np.concatenate([o[0] for o in cbuild.run(lib, exe, [[codes[i:i + 1]] for i in range(20)])])
        np.testing.assert_array_equal(got, want, err_msg=fam)


def test_arena_is_smaller_than_all_tensors(shipped_c):
    """Lifetimes let tensors share the arena: it holds less than every tensor side by side."""
    lib = shipped_c.library
    alone = render(lib.program, lib.prefix, reuse=False).facts["arena_bytes"]
    assert lib.facts["arena_bytes"] < alone


@settings(max_examples=C_GRAPHS, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("CI") == "true")
@given(case=graphs(), fam=st.sampled_from(sorted(cbuild.families("g"))))
def test_generated_graphs_in_c(case, fam, tmp_path_factory):
    """Every generated graph that converts to an integer-only model compiles, runs clean under the
    sanitizers, and equals the integer graph and the numpy IR executor tensor by tensor: the
    portable kernels sanitized, a kernel family drawn among those the machine runs sanitized, and
    -O3 -march=native (the best family here, as the compiler vectorizes it). Graphs with float
    islands are refused with a clear error."""
    try:
        r = run(case.model, case.feeds_calib, QuantConfig(format="c", prefix="g"))
    except DfqError as e:
        assert "nothing to quantize" in str(e) or "float" in str(e) or "no integer form" in str(e), str(e)
        note(str(e))
        event(f"refused: {str(e)[:60]}")
        return
    for step in r.library.program.steps:
        event(f"step: {step.what.split()[0]}")
    feeds = {k: v[:3] for k, v in case.feeds_test.items()}
    event(f"family: {fam}")
    builds = [cbuild.SANITIZE + cbuild.families("g")["portable"][0], cbuild.OPTIMIZE]
    if fam != "portable":
        builds.append(cbuild.SANITIZE + cbuild.families("g")[fam][0])
    for flags in builds:
        assert check_tensor_by_tensor(r, r.library, feeds, tmp_path_factory.mktemp("c"), flags) > 0


def _conv_model(cin: int, cout: int, h: int, w: int, k: int, stride: int, group: int, residual: bool, seed: int):
    """Conv(k x k, stride, pads k//2, group) + bias [+ the input as residual] + Relu, float, NCHW."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    wt = rng.normal(0, 1 / np.sqrt(cin // group * k * k), (cout, cin // group, k, k)).astype(np.float32)
    inits = [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), "b")]
    p = k // 2
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[p, p, p, p], group=group)]
    last = "c"
    if residual:
        nodes.append(helper.make_node("Add", ["c", "x"], ["s"]))
        last = "s"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, oh, ow])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), rng


@settings(max_examples=int(os.environ.get("DFQ_C_CONVS", 30)), deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("CI") == "true")
@given(cin=st.integers(1, 48), cout=st.integers(1, 12), h=st.integers(1, 20), w=st.integers(1, 20),
       k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), depthwise=st.booleans(), residual=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_convolution_kernels_in_c(cin, cout, h, w, k, stride, depthwise, residual, seed, tmp_path_factory):
    """Every convolution kernel of the generator (pointwise blocked by pixels, pointwise as dot
    products over channels, the general row kernel; grouped/depthwise; residual; strides), in every
    kernel family the machine runs, equals the integer graph on every output code, over channel counts and feature-map sizes that the
    generated graphs do not reach (more than 32 input channels, maps of more than 64 pixels)."""
    if depthwise:
        cout = cin
    residual = residual and cout == cin and stride == 1
    model, rng = _conv_model(cin, cout, h, w, k, stride, cin if depthwise else 1, residual, seed)
    calib = {"x": rng.normal(0, 1, (16, cin, h, w)).astype(np.float32)}
    r = run(model, calib, QuantConfig(format="c", prefix="k", effort="fast"))
    event("kernels: " + ", ".join(sorted({s.what.split("(")[-1].rstrip(")") if "(" in s.what else s.what.split()[0]
                                          for s in r.library.program.steps})))
    x = rng.normal(0, 1, (2, cin, h, w)).astype(np.float32)
    codes = input_codes(r, {"x": x})["x"]
    want = graph_values(r, {"x": x}, ["y"])["y"]
    for fam, (flags, _) in cbuild.families("k").items():
        exe = cbuild.build(r.library, tmp_path_factory.mktemp("k"), ["-O2", *flags])
        got = np.concatenate([o[0] for o in cbuild.run(r.library, exe, [[codes[i:i + 1]] for i in range(2)])])
        np.testing.assert_array_equal(got, want, err_msg=fam)


MOVERS = {  # ops that only move codes, which the generated graphs do not draw: (nodes after "c", output shape)
    "pad_reflect": ([("Pad", ["c", "pads"], ["y"], {"mode": "reflect"})], [1, 4, 9, 11]),
    "pad_edge": ([("Pad", ["c", "pads"], ["y"], {"mode": "edge"})], [1, 4, 9, 11]),
    "pad_zero": ([("Pad", ["c", "pads"], ["y"], {})], [1, 4, 9, 11]),
    "resize_nearest": ([("Resize", ["c", "", "scales"], ["y"], {"mode": "nearest"})], [1, 4, 12, 14]),
    "split_concat": ([("Split", ["c"], ["a", "b"], {"axis": 1, "num_outputs": 2}),
                      ("Concat", ["b", "a"], ["y"], {"axis": 1})], [1, 4, 6, 7]),
    "maxpool_padded": ([("MaxPool", ["c"], ["y"], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})],
                       [1, 4, 3, 4]),
    "gather_channels": ([("Gather", ["c", "gidx"], ["y"], {"axis": 1})], [1, 3, 6, 7]),  # indices [3, -4, 1]
    "gather_row": ([("Gather", ["c", "gone"], ["y"], {"axis": 2})], [1, 4, 7]),  # a scalar index drops the axis
}


@pytest.mark.parametrize("case", sorted(MOVERS))
def test_ops_that_move_codes_in_c(case, tmp_path):
    """Pad (reflect, edge, zeros), Resize (nearest), Split + Concat, a padded MaxPool and Gather
    with constant indices after a Conv: the C program's output equals the integer graph's, code
    for code."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(1)
    nodes, shape = MOVERS[case]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 2], np.int64), "pads"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([3, -4, 1], np.int64), "gidx"),
             numpy_helper.from_array(np.array(4, np.int64), "gone")]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])] +
                          [helper.make_node(op, i, o, **a) for op, i, o, a in nodes], case,
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"] + shape[1:])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    r = run(model, {"x": rng.normal(0, 1, (16, 3, 6, 7)).astype(np.float32)}, QuantConfig(format="c", prefix="m"))
    x = rng.normal(0, 1, (3, 3, 6, 7)).astype(np.float32)
    assert check_tensor_by_tensor(r, r.library, {"x": x}, tmp_path, cbuild.SANITIZE) > 0
    assert list(r.library.facts["tensors"]["y"]["shape"]) == shape


def test_one_dimensional_convolution_and_pool_in_c(tmp_path):
    """Conv1d (stride 2, pads), its depthwise twin and MaxPool1d, as 2-d ops of height 1."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (6, 4, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.4, (6, 1, 3)).astype(np.float32), "wd")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2], pads=[2, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "wd"], ["dw"], group=6, pads=[1, 1]),
             helper.make_node("MaxPool", ["dw"], ["y"], kernel_shape=[3], strides=[2], pads=[1, 1])]
    g = helper.make_graph(nodes, "c1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 23])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    r = run(model, {"x": rng.normal(0, 1, (16, 4, 23)).astype(np.float32)}, QuantConfig(format="c", prefix="m"))
    assert check_tensor_by_tensor(r, r.library, {"x": rng.normal(0, 1, (3, 4, 23)).astype(np.float32)}, tmp_path,
                                  cbuild.SANITIZE) > 0


def test_one_dimensional_average_pools_are_integer_and_in_c(tmp_path):
    """AveragePool1d (padding counted) and the global average of a 1-d signal (an audio or sensor
    model's head): integer modules in the integer graph (no float module), the C program equal to
    it tensor by tensor, and the output near float's (onnxruntime)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (6, 2, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.4, (3, 6)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["a"], kernel_shape=[3], strides=[2], pads=[1, 1],
                              count_include_pad=1),
             helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "avg1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 37])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    calib = rng.normal(0, 1, (16, 2, 37)).astype(np.float32)
    ri = run(model, {"x": calib}, QuantConfig(format="int"))
    assert not ri.facts["float_modules"] and not ri.float_ops, (ri.facts["float_modules"], ri.float_ops)
    x = rng.normal(0, 1, (8, 2, 37)).astype(np.float32)
    f = run_ort(model, {"x": x})[0].astype(np.float64)
    y = run_ort(ri.model, {"x": x})[0].astype(np.float64)
    assert 10 * np.log10(np.sum(f ** 2) / np.sum((f - y) ** 2)) > 25
    r = run(model, {"x": calib}, QuantConfig(format="c", prefix="m"))
    assert check_tensor_by_tensor(r, r.library, {"x": x[:3]}, tmp_path, cbuild.SANITIZE) > 0


def test_shapes_from_a_one_shot_iterable_and_from_data_free_mode(test_data):
    """The program's shapes come from a calibration sample kept during calibration (a generator
    of batches can be read only once), or, data-free, from the input's static shape."""
    calib = np.load(CALIB)
    x = calib[calib.files[0]]
    gen = ({"input": x[i:i + 8]} for i in range(0, 64, 8))
    a = run(SHIPPED, gen, QuantConfig(format="c", effort="fast", bias_correction=False)).library
    b = run(SHIPPED, "none", QuantConfig(format="c")).library
    assert a.facts["tensors"]["input"]["shape"] == b.facts["tensors"]["input"]["shape"] == [1, 1, 28, 28]


def test_broadcast_gate_multiplication_vectorized(tmp_path):
    """Conv -> GlobalAveragePool -> Sigmoid gate -> Mul broadcast over the map (a squeeze-excite
    gate, as in PP-OCR's detector), built with -O3 -march=native: gcc 12's vectorizer miscompiled
    the earlier uint32 form of the rounding shift here (codes 223 off), which -O0/-O1 ran right."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (16, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Sigmoid", ["p"], ["gate"]),
             helper.make_node("Mul", ["c", "gate"], ["y"])]
    g = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 32, 32])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    r = run(model, {"x": rng.normal(0, 1, (16, 3, 32, 32)).astype(np.float32)}, QuantConfig(format="c", prefix="m"))
    assert any(s.what.startswith("Mul") for s in r.library.program.steps)
    x = rng.normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    assert check_tensor_by_tensor(r, r.library, {"x": x}, tmp_path, cbuild.OPTIMIZE) > 0
