"""Batches run side by side in pieces (model_io.in_order, pieces, batch_major): the same results
as one batch at a time, in order, and never more than the allowed pieces ahead."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnx_graphsurgeon as gs
from hypothesis import given, settings, strategies as st
import onnx
from onnx import TensorProto, helper

from dfq_onnx import model_io
from dfq_onnx.model_io import batch_major, in_order, load_model, pieces, single_sample, to_graph, to_model
from dfq_onnx.passes.canonicalize import canonicalize
from dfq_onnx.passes.fold_batchnorm import fold_batchnorm
from dfq_onnx.passes.form_modules import find_modules, plan_quantization

from helpers import SHIPPED, run_ort


class _Workers:
    def __init__(self, n):
        self.dfq_workers = n


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=12), st.integers(1, 3), st.randoms(use_true_random=False))
def test_in_order_yields_in_order_and_draws_lazily(items, workers, rnd):
    """The results are fn over the items in their order, whatever order the calls finish in, and
    an item is drawn only when fewer than `workers` calls are unfinished or unconsumed."""
    drawn, consumed, ahead = [0], [0], []
    lock = threading.Lock()

    def source():
        for x in items:
            with lock:
                drawn[0] += 1
                ahead.append(drawn[0] - consumed[0])
            yield x

    def fn(x):
        time.sleep(rnd.random() * 0.002)  # finish out of order
        return x * 3 + 1

    out = []
    for y in in_order(_Workers(workers), fn, source()):
        with lock:
            consumed[0] += 1
        out.append(y)
    assert out == [x * 3 + 1 for x in items]
    assert all(a <= workers for a in ahead)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 11), min_size=1, max_size=5), st.integers(1, 6), st.booleans())
def test_pieces_are_the_batches_rows_in_order(sizes, rows, split):
    """Concatenated, the pieces give back every batch, row for row; each piece has at most `rows`
    rows when split, and batches stay whole when not."""
    batches, at = [], 0
    for n in sizes:
        batches.append({"x": np.arange(at, at + n)[:, None] * np.ones((1, 3)), "y": np.arange(at, at + n)})
        at += n
    got = list(pieces(batches, split, rows))
    for k in ("x", "y"):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in got]), np.concatenate([b[k] for b in batches]))
    if split:
        assert all(len(p["y"]) <= rows for p in got)
        assert len(got) == sum(-(-n // rows) for n in sizes)
    else:
        assert len(got) == len(batches)


def _graph(in_shape, out_shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    return gs.import_onnx(m)


def _transposed(in_shape, out_shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    node = helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])
    return gs.import_onnx(helper.make_model(helper.make_graph([node], "g", [x], [y])))


def test_batch_major_only_where_the_batch_leads_inputs_and_output():
    assert batch_major(_graph(["N", 3, 8], ["N", 3, 8]))
    assert not batch_major(_transposed(["N", 3, 8], ["T", "N", 8]))  # time-major output: its rows are not samples
    assert not batch_major(_transposed(["N", 3, 8], [None, "N", 8]))  # not proved: not assumed
    assert batch_major(_graph(["N", 3, 8], [None, 3, 8]))  # output's batch unnamed, but Relu keeps rows
    assert batch_major(_graph([None, 3, 8], ["M", 3, 8]))  # input's batch unnamed: proved the same way
    assert not batch_major(_graph([1, 3, 8], [1, 3, 8]))  # fixed: no other size runs
    assert single_sample(_graph([1, 3, 8], [1, 3, 8])) and not single_sample(_graph(["N", 3, 8], ["N", 3, 8]))


def test_calibration_side_by_side_equals_one_batch_at_a_time(monkeypatch, calib_data):
    """The shipped model calibrated with pieces run side by side (forced on, whatever this
    machine's CPUs) gives exactly the statistics of the pieces run one at a time (and those are
    the whole batches': test_calibration_statistics_are_exact_and_mergeable), and keeps the float
    model's outputs of the first batches, put back together from the pieces' rows, as
    onnxruntime computes them on whole batches."""
    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.passes import calibrate as cal

    model = load_model(SHIPPED)
    g = fold_batchnorm(canonicalize(to_graph(model)))
    assert batch_major(g)
    plan = plan_quantization(g, find_modules(g))
    x = calib_data[:40]
    data = DataSource({"input": x}, input_specs(model))
    seen = []
    real = model_io.in_order

    def spy(sess, fn, items):
        seen.append(getattr(sess, "dfq_workers", 1))
        return real(sess, fn, items)

    monkeypatch.setattr(cal, "in_order", spy)
    monkeypatch.setattr(model_io, "cpus", lambda: 2)
    runs = {}
    for side in (2, 1):
        monkeypatch.setattr(model_io, "SIDE_BY_SIDE", side)
        keep, ref = [], []
        stats = cal.calibrate(g, plan.requant, data, batch_size=16, keep=keep, keep_samples=20, reference=ref)
        runs[side] = (stats, keep, ref)
    assert seen == [2, 1]
    (a, keep2, ref2), (b, keep1, ref1) = runs[2], runs[1]
    for name in plan.requant:
        assert (a[name].count, a[name].min, a[name].max) == (b[name].count, b[name].min, b[name].max)
        np.testing.assert_array_equal(a[name].hist, b[name].hist)
    assert [len(k["input"]) for k in keep2] == [len(k["input"]) for k in keep1] == [16, 16]
    whole = to_model(g)
    for k, r2, r1 in zip(keep2, ref2, ref1):
        np.testing.assert_array_equal(r2, r1)
        np.testing.assert_allclose(r2, run_ort(whole, {"input": k["input"]})[0], rtol=1e-5, atol=1e-5)


C, H, W = 4, 3, 5  # the generated graphs' tensor [N, C, H, W] (C, H, W static, N dynamic)


def _step(kind: str, x: str, shape: list, k: int, nodes: list, inits: list) -> tuple[str, list]:
    """Append one op to a generated graph; return its output and that output's static dims (axis 0
    excluded). Kinds ending in '!' mix the samples' rows (or change their number)."""
    def const(name, value):
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), f"{name}{k}"))
        return f"{name}{k}"

    def node(op, inputs, **attrs):
        nodes.append(helper.make_node(op, inputs, [f"t{k}_{len(nodes)}"], **attrs))
        return nodes[-1].output[0]

    c = shape[0]
    rng = np.random.default_rng(k)
    if kind == "relu":
        return node("Relu", [x]), shape
    if kind == "add_bias":  # a constant of rank 3, below the batch axis
        return node("Add", [x, const("b", rng.normal(size=(c, 1, 1)).astype(np.float32))]), shape
    if kind == "mul_lead1":  # rank 4 with a leading 1
        return node("Mul", [const("m", rng.normal(size=(1, c, 1, 1)).astype(np.float32)), x]), shape
    if kind == "conv":
        return node("Conv", [x, const("w", rng.normal(size=(C, c, 3, 3)).astype(np.float32))], pads=[1, 1, 1, 1]), \
            [C] + shape[1:]
    if kind == "maxpool":
        return node("MaxPool", [x], kernel_shape=[2, 2], pads=[1, 1, 0, 0]), shape
    if kind == "softmax_c":
        return node("Softmax", [x], axis=1), shape
    if kind == "mean_hw":
        return node("ReduceMean", [x], axes=[2, 3], keepdims=1), [c, 1, 1]
    if kind == "swap_hw":
        return node("Transpose", [x], perm=[0, 1, 3, 2]), [c, shape[2], shape[1]]
    if kind == "flatten_back":  # Flatten(axis 1), then back with a constant [-1, c, h, w]
        f = node("Flatten", [x], axis=1)
        return node("Reshape", [f, const("s", np.asarray([-1] + shape, np.int64))]), shape
    if kind == "view_batch":  # x.reshape(x.shape[0], -1) as torch and Paddle export it, then back
        n = node("Gather", [node("Shape", [x]), const("i", np.asarray(0, np.int64))], axis=0)
        v = node("Concat", [node("Unsqueeze", [n, const("a", np.asarray([0], np.int64))]),
                            const("r", np.asarray([-1], np.int64))], axis=0)
        return node("Reshape", [node("Reshape", [x, v]), const("s", np.asarray([0] + shape, np.int64))]), shape
    if kind == "concat_c":
        return node("Concat", [x, x], axis=1), [2 * c] + shape[1:]
    if kind == "matmul_w":
        return node("MatMul", [x, const("w", rng.normal(size=(shape[2], 2)).astype(np.float32))]), shape[:2] + [2]
    if kind == "resize_own":  # Resize to sizes read from shapes: [N, C, H] of a wider tensor, W of its own
        full = node("Shape", [node("Concat", [x, x], axis=3)])
        sizes = node("Concat", [node("Slice", [full, const("a", np.asarray([0], np.int64)),
                                               const("b", np.asarray([3], np.int64))]),
                                node("Shape", [x], start=3)], axis=0)
        return node("Resize", [x, "", "", sizes], mode="nearest"), shape
    if kind == "resize_fixed!":  # a constant size fixes the rows (to 2)
        return node("Resize", [x, "", "", const("z", np.asarray([2] + shape, np.int64))], mode="nearest"), shape
    if kind == "transpose_mean!":  # x + the batch's mean, through transposes that move the batch axis
        t = node("ReduceMean", [node("Transpose", [x], perm=[1, 0, 2, 3])], axes=[1], keepdims=1)
        return node("Add", [x, node("Transpose", [t], perm=[1, 0, 2, 3])]), shape
    if kind == "sum_batch!":  # x + its sum over the batch
        return node("Add", [x, node("ReduceSum", [x, const("a", np.asarray([0], np.int64))], keepdims=1)]), shape
    if kind == "softmax_batch!":
        return node("Softmax", [x], axis=0), shape
    if kind == "flatten_2!":  # [N * C, H * W], back to [N, C, H, W] by -1
        f = node("Flatten", [x], axis=2)
        return node("Reshape", [f, const("s", np.asarray([-1] + shape, np.int64))]), shape
    if kind == "roll_rows!":  # the rows in another order: a Reshape that moves them, then back
        r = node("Reshape", [x, const("s", np.asarray([c, -1] + shape[1:], np.int64))])
        back = const("t", np.asarray([-1] + shape, np.int64))
        return node("Reshape", [node("Transpose", [r], perm=[1, 0, 2, 3]), back]), shape
    raise ValueError(kind)


KEEPING = ["relu", "add_bias", "mul_lead1", "conv", "maxpool", "softmax_c", "mean_hw", "swap_hw", "flatten_back",
           "view_batch", "concat_c", "matmul_w", "resize_own"]
NEEDS_DIMS = {"flatten_back"}  # a Reshape to [-1, ...]: proved from the static dims of what it reshapes
LOSES_DIMS = {"resize_own"}  # sizes computed from shapes: shape inference leaves later dims unknown
MIXING = ["transpose_mean!", "sum_batch!", "softmax_batch!", "flatten_2!", "roll_rows!", "resize_fixed!"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(KEEPING + MIXING), min_size=1, max_size=6), st.sampled_from(["M", None]))
def test_rows_are_samples_only_where_onnxruntime_keeps_each_samples_rows(kinds, out_dim):
    """Generated graphs (the output's batch dim named apart or unnamed, as tf2onnx and Paddle2ONNX
    leave it): where rows_are_samples proves the rows are the samples', onnxruntime's output on a
    batch of 3 is, row for row, its output on each sample alone; and a graph of row-keeping ops
    only is proved so (unless a Reshape to [-1, ...] follows dims that shape inference could not
    know: that one is left unproved, conservatively). The walk never runs the graph: onnxruntime
    is the oracle."""
    nodes, inits, x, shape = [], [], "x", [C, H, W]
    for k, kind in enumerate(kinds):
        x, shape = _step(kind, x, shape, k, nodes, inits)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [out_dim] + shape)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]))
    onnx.checker.check_model(model)
    proved = model_io.rows_are_samples(gs.import_onnx(model))
    declared = model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"  # shape inference may name it
    assert batch_major(gs.import_onnx(model)) == (proved or declared)
    batch = np.random.default_rng(len(kinds)).normal(size=(3, C, H, W)).astype(np.float32)
    whole = run_ort(model, {"x": batch}, optimize=False)[0]
    alone = [run_ort(model, {"x": batch[i:i + 1]}, optimize=False)[0] for i in range(3)]
    kept = whole.shape[0] == 3 and all(np.allclose(whole[i:i + 1], a, rtol=1e-5, atol=1e-5)
                                       for i, a in enumerate(alone))
    if proved:
        assert kept
    blind = any(k in NEEDS_DIMS and any(j in LOSES_DIMS for j in kinds[:i]) for i, k in enumerate(kinds))
    if not any(k.endswith("!") for k in kinds) and not blind:
        assert proved and kept
