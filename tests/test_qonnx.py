"""QONNX output (passes/emit_qonnx.py), checked with the qonnx package: its executor and its QCDQ
conversion (run by onnxruntime) give the outputs of dfq-onnx's QDQ model on real test digits."""
import numpy as np
import onnx
import pytest

from dfq_onnx import QuantConfig
from dfq_onnx.fixedpoint import is_pow2
from dfq_onnx.passes.emit_qonnx import QONNX_DOMAIN, to_qonnx
from dfq_onnx.pipeline import run

from helpers import CALIB, SHIPPED, run_ort

qonnx = pytest.importorskip("qonnx", reason="qonnx is a test extra (pip install '.[test]')")


@pytest.fixture(scope="module")
def shipped_pair():
    r = run(SHIPPED, CALIB, QuantConfig())
    return r, to_qonnx(r.model, r.quantized)


def _wrapped(model: onnx.ModelProto, batch: int):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return ModelWrapper(m).transform(ChangeBatchSize(batch)).transform(InferShapes())


def test_quant_nodes_are_power_of_two_and_round_half_even(shipped_pair):
    """Every quantizer is a Quant node with a power-of-two scale, zero point 0, narrow 0 and ROUND;
    no QuantizeLinear/DequantizeLinear is left; there is one per QDQ quantizer of an activation or
    weight."""
    r, q = shipped_pair
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    quants = [n for n in q.graph.node if n.op_type == "Quant"]
    assert quants and all(n.domain == QONNX_DOMAIN for n in quants)
    domains = [o.domain for o in q.opset_import]
    assert sorted(domains) == sorted(set(domains)) and QONNX_DOMAIN in domains  # each domain imported once
    assert not [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for n in quants:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["rounding_mode"] in (b"ROUND", "ROUND") and attrs["narrow"] == 0
        assert is_pow2(consts[n.input[1]]).all() and float(consts[n.input[2]]) == 0.0
        assert float(consts[n.input[3]]) in (8.0, 16.0) or 2 <= float(consts[n.input[3]]) <= 8
    qdq_quantizers = sum(1 for n in r.model.graph.node if n.op_type == "QuantizeLinear") + \
        sum(1 for n in r.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
            {t.name for t in r.model.graph.initializer} and
            onnx.numpy_helper.to_array(next(t for t in r.model.graph.initializer if t.name == n.input[0])).dtype != np.int32)
    assert len(quants) == qdq_quantizers


def test_qonnx_executor_equals_qdq_model(shipped_pair, test_data):
    """qonnx's own executor (node by node, its Quant in numpy) on 64 test digits gives the QDQ
    model's logits as onnxruntime simulates them in float (no fusions), to float32 rounding."""
    from qonnx.core.onnx_exec import execute_onnx
    r, q = shipped_pair
    x, _ = test_data
    x = x[:64]
    want = run_ort(r.model, {"input": x}, optimize=False)[0]
    got = execute_onnx(_wrapped(q, len(x)), {"input": x})[r.model.graph.output[0].name]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()


def test_qcdq_conversion_equals_qdq_model(shipped_pair, test_data):
    """qonnx's QuantToQCDQ turns the Quant nodes back into QuantizeLinear/DequantizeLinear; under
    onnxruntime with its default (fusing) optimizations it gives the deployed QDQ model's logits on
    500 test digits."""
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ
    r, q = shipped_pair
    x, _ = test_data
    x = x[:500]
    qcdq = _wrapped(q, len(x)).transform(QuantToQCDQ()).model
    assert not [n for n in qcdq.graph.node if n.op_type == "Quant"]
    got = run_ort(qcdq, {"input": x})[0]
    want = run_ort(r.model, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_inspect_counts_quant_nodes_like_the_qdq_model(shipped_pair):
    """inspect on the QONNX file: its Quant nodes count as the QDQ model's quantizers do (the same
    requantization points, the same lossless ones after pass-throughs), and every scale is a power
    of two (it reported 0 of everything)."""
    import dfq_onnx
    r, q = shipped_pair
    a, b = dfq_onnx.inspect(q), dfq_onnx.inspect(r.model)
    assert a["requant_points"] == b["requant_points"] == r.requant_points
    assert a["requant_lossless"] == b["requant_lossless"]
    weights = sum(1 for n in q.graph.node if n.op_type == "Quant" and n.input[0] in {t.name for t in q.graph.initializer})
    assert a["weight_quantizers"] == weights > 0
    assert a["scales"]["total"] > 0 and a["scales"]["power_of_two"] == a["scales"]["total"]


def test_validate_runs_a_qonnx_model_and_names_the_extra_without_qonnx(shipped_pair, tmp_path, monkeypatch):
    """validate FLOAT QONNX runs the QONNX model through qonnx's QCDQ conversion: the figures equal
    the QDQ model's (onnxruntime, same data). Without qonnx: one line naming the extra."""
    import sys as _sys
    from dfq_onnx.errors import DfqError
    from dfq_onnx.validate import validate
    from helpers import TEST
    r, q = shipped_pair
    path = tmp_path / "q.onnx"
    onnx.save(q, path)
    got = validate(SHIPPED, str(path), str(TEST), num_samples=200, runs=1)
    want = validate(SHIPPED, r.model, str(TEST), num_samples=200, runs=1)
    assert got["agreement_top1"] == want["agreement_top1"] and got["sqnr_db"] == want["sqnr_db"]
    for mod in [m for m in _sys.modules if m == "qonnx" or m.startswith("qonnx.")]:
        monkeypatch.setitem(_sys.modules, mod, None)
    monkeypatch.setitem(_sys.modules, "qonnx", None)
    with pytest.raises(DfqError, match=r"dfq-onnx\[qonnx\]"):
        validate(SHIPPED, str(path), str(TEST), num_samples=10, runs=1)
