"""The random-graph generator itself: every model is valid ONNX, runs in onnxruntime with the declared
output shapes, and onnx.reference agrees with onnxruntime wherever the case says it should.

DFQ_GRAPHS sets the number of hypothesis examples (default 100); DFQ_GRAPHS_REF_SAMPLES how many
test samples onnx.reference evaluates (default 4: its pools are pure Python loops)."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from graphgen import BLOCKS, INPUT_NAME, MAX_CH, MAX_HW, N_CALIB, N_TEST, graphs

N_EXAMPLES = int(os.environ.get("DFQ_GRAPHS", 100))
REF_SAMPLES = int(os.environ.get("DFQ_GRAPHS_REF_SAMPLES", 4))
LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_ort(model_bytes, feeds, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"]).run(None, feeds)


FLOAT32_FLOOR = 16 * float(np.finfo(np.float32).eps)  # absolute: outputs that cancel to near zero keep the
# rounding of their unit-sized intermediates (found: 1.5e-7 at an output of 1e-3 after three MatMuls and a Gelu)


def assert_close(actual, expected, what, tol=1e-4):
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale + FLOAT32_FLOOR, err_msg=what)


def dims(vi):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def check_case(case):
    m = case.model
    assert m.ir_version == 9
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 19)]
    assert [i.name for i in m.graph.input] == [INPUT_NAME]
    x_c, x_t = case.feeds_calib[INPUT_NAME], case.feeds_test[INPUT_NAME]
    assert x_c.dtype == np.float32 and x_t.dtype == np.float32
    assert x_c.shape[0] == N_CALIB and x_t.shape[0] == N_TEST and x_c.shape[1:] == x_t.shape[1:]
    assert np.all(np.isfinite(x_c)) and np.abs(x_c).max() < 20 and not np.array_equal(x_c[:N_TEST], x_t)
    assert "\n" not in case.description and case.blocks

    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    for vi in inferred.graph.value_info:  # every intermediate 4-D tensor stays small
        d = dims(vi)
        if len(d) == 4:
            assert d[1] <= MAX_CH and d[2] <= MAX_HW and d[3] <= MAX_HW, (vi.name, d)

    data = m.SerializeToString()
    tol = 1e-3 if "attention" in case.blocks else 1e-4  # products of two activations cancel: float32 order shows
    names = [o.name for o in m.graph.output]
    results = {}
    for level in LEVELS:
        for tag, feeds in (("calib", case.feeds_calib), ("test", case.feeds_test)):
            outs = run_ort(data, feeds, level)
            for name, y in zip(names, outs):
                want = case.output_shapes[name]
                assert y.shape == (feeds[INPUT_NAME].shape[0],) + tuple(want[1:]), (name, y.shape, want)
                assert y.dtype == np.float32 and np.all(np.isfinite(y)), name
            results[level, tag] = outs
    for a, b in zip(results[LEVELS[1], "test"], results[LEVELS[0], "test"]):
        assert_close(a, b, "onnxruntime optimized vs unoptimized", tol)

    if case.reference_ok:
        feeds = {INPUT_NAME: x_t[:REF_SAMPLES]}
        ref = ReferenceEvaluator(m).run(None, feeds)
        for name, r, y in zip(names, ref, results[LEVELS[0], "test"]):
            assert r.shape == y[:REF_SAMPLES].shape, (name, r.shape, y.shape)
            assert_close(y[:REF_SAMPLES], r, f"onnxruntime vs onnx.reference, output {name}", tol)


@SETTINGS
@given(graphs())
def test_random_graphs_are_valid_and_agree(case):
    check_case(case)


@pytest.mark.parametrize("kind", BLOCKS)
@settings(max_examples=max(5, N_EXAMPLES // 5), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_each_block_kind_is_drawable(kind, data):
    case = data.draw(graphs(ops=[kind]))
    assert set(case.blocks) == {kind}
    check_case(case)


def test_unknown_block_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown block kinds"):
        graphs(ops=["conv", "lstm"])
