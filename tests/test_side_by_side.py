"""Batches run side by side in pieces (model_io.in_order, pieces, batch_major): the same results
as one batch at a time, in order, and never more than the allowed pieces ahead."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnx_graphsurgeon as gs
from hypothesis import given, settings, strategies as st
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


def test_batch_major_only_where_the_batch_leads_inputs_and_output():
    assert batch_major(_graph(["N", 3, 8], ["N", 3, 8]))
    assert not batch_major(_graph(["N", 3, 8], ["T", "N", 8]))  # time-major output: its rows are not samples
    assert not batch_major(_graph(["N", 3, 8], [None, 3, 8]))  # unknown: not assumed
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
