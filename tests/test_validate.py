"""dfq-onnx validate: figures computed independently here from onnxruntime outputs, and clean
errors on bad input."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx.cli import main
from dfq_onnx.validate import validate

from helpers import SHIPPED, TEST, run_ort


@pytest.fixture(scope="module")
def quant_path(tmp_path_factory, shipped_qdq):
    p = tmp_path_factory.mktemp("v") / "q.onnx"
    onnx.save(shipped_qdq.model, str(p))
    return p


def test_validate_figures_match_a_direct_computation(quant_path, test_data):
    x, y = test_data
    r = validate(SHIPPED, quant_path, TEST, num_samples=300, runs=3)
    f = run_ort(SHIPPED, {"input": x[:300]})[0]
    q = run_ort(quant_path, {"input": x[:300]})[0]
    assert r["samples"] == 300
    assert r["float"]["top1"] == pytest.approx(100 * np.mean(f.argmax(1) == y[:300]))
    assert r["quant"]["top1"] == pytest.approx(100 * np.mean(q.argmax(1) == y[:300]))
    assert r["agreement_top1"] == pytest.approx(100 * np.mean(f.argmax(1) == q.argmax(1)))
    sq = 10 * np.log10(np.sum(f.astype(np.float64) ** 2) / np.sum((f.astype(np.float64) - q) ** 2))
    assert r["sqnr_db"]["logits"] == pytest.approx(sq, rel=1e-6)
    assert r["max_abs_error"]["logits"] == pytest.approx(float(np.max(np.abs(f - q))), rel=1e-6)
    assert r["requant_points"] == {"float": 0, "quant": 10}  # 7 module outputs (not the logits), the input, 2 before residual Adds
    assert r["latency_ms"]["float"] > 0 and r["latency_ms"]["quant"] > 0
    # simulated: the same model without graph optimizations (float arithmetic between Q/DQ)
    s = run_ort(quant_path, {"input": x[:300]}, optimize=False)[0]
    assert r["simulated"]["top1"] == pytest.approx(100 * np.mean(s.argmax(1) == y[:300]))
    assert r["simulated"]["agreement_top1"] == pytest.approx(100 * np.mean(f.argmax(1) == s.argmax(1)))
    sq_s = 10 * np.log10(np.sum(f.astype(np.float64) ** 2) / np.sum((f.astype(np.float64) - s) ** 2))
    assert r["simulated"]["sqnr_db"]["logits"] == pytest.approx(sq_s, rel=1e-6)
    assert r["deployed_minus_simulated_agreement"] == pytest.approx(r["agreement_top1"] - r["simulated"]["agreement_top1"])


def test_validate_json_cli_without_labels(quant_path, tmp_path, test_data):
    x, _ = test_data
    np.savez(tmp_path / "d.npz", input=x[:50])
    res = CliRunner().invoke(main, ["validate", str(SHIPPED), str(quant_path), "--data", str(tmp_path / "d.npz"),
                                    "--json", "--runs", "2"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["float"]["top1"] is None and r["quant"]["top1"] is None
    for key in ("agreement_top1", "sqnr_db", "latency_ms", "requant_points"):
        assert key in r


def test_validate_onnxruntime_quantized_model(tmp_path, calib_data, test_data):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_data[i:i + 1]} for i in range(32)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(SHIPPED), str(tmp_path / "ort.onnx"), R(), quant_format=QuantFormat.QDQ, per_channel=True)
    r = validate(SHIPPED, tmp_path / "ort.onnx", TEST, num_samples=200, runs=2)
    assert r["agreement_top1"] > 90 and r["requant_points"]["quant"] > 0


def other_model(path):
    g = helper.make_graph([helper.make_node("Flatten", ["image"], ["f"]),
                           helper.make_node("Gemm", ["f", "w"], ["logits"])], "t",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 28, 28])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
                          [numpy_helper.from_array(np.ones((784, 10), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("case", ["inputs_differ", "data_does_not_fit", "labels_wrong_length", "missing_model"])
def test_validate_bad_input(case, quant_path, tmp_path, test_data):
    x, y = test_data
    fl, q, data, extra = SHIPPED, quant_path, TEST, []
    if case == "inputs_differ":
        q, mention = other_model(tmp_path / "o.onnx"), "different inputs"
    elif case == "data_does_not_fit":
        np.savez(tmp_path / "d.npz", input=x[:10, :, :14, :14])
        data, mention = tmp_path / "d.npz", "shape"
    elif case == "labels_wrong_length":
        np.save(tmp_path / "l.npy", y[:7])
        extra, mention = ["--labels", str(tmp_path / "l.npy")], "7 labels for 1000 samples"
    else:
        fl, mention = tmp_path / "none.onnx", "no such file"
    res = CliRunner().invoke(main, ["validate", str(fl), str(q), "--data", str(data), "--runs", "1", *extra])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert mention in res.stderr


def test_a_probability_map_gets_thresholded_agreement_not_top1(tmp_path):
    """A detector's probability map ([N, 1, H, W] after a Sigmoid) has no classes: validate reports
    the elements on the same side of --threshold (checked against numpy on both models' outputs),
    SQNR and max error, and no top-1 figures, not even with labels in the data."""
    from onnx import TensorProto, helper, numpy_helper

    from dfq_onnx import QuantConfig, convert

    rng = np.random.default_rng(5)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Sigmoid", ["c"], ["y"])], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 12, 12])],
                          [numpy_helper.from_array(rng.normal(size=(1, 3, 3, 3)).astype(np.float32), "w")])
    fm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.normal(size=(40, 3, 12, 12)).astype(np.float32)
    qm = convert(fm, {"x": x}, QuantConfig())
    data = tmp_path / "d.npz"
    np.savez(data, x=x, labels=np.zeros(40, np.int64))
    r = validate(fm, qm, str(data), threshold=0.3, runs=1)
    f, q = run_ort(fm, {"x": x})[0], run_ort(qm, {"x": x})[0]
    assert r["output_kind"] == "map" and r["agreement_top1"] is None and r["quant"]["top1"] is None
    assert r["map_agreement"] == pytest.approx(100 * np.mean((f > 0.3) == (q > 0.3)))
    mf, mq = f > 0.3, q > 0.3
    assert r["map"]["mask_iou"] == pytest.approx(np.sum(mf & mq) / np.sum(mf | mq))
    assert (r["map"]["marked_float"], r["map"]["marked_quant"]) == pytest.approx((100 * mf.mean(), 100 * mq.mean()))
    per = [10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(f, q)]
    assert r["map"]["sqnr_per_sample_median_db"] == pytest.approx(np.median(per), rel=1e-6)
    assert r["sqnr_db"]["y"] > 20


def test_validate_reports_progress_over_every_sample(shipped_qdq):
    """The progress callbacks (the CLI's bar on a terminal) see the sample count first and then
    batches adding up to exactly the samples the figures are computed on."""
    seen, total = [], []
    r = validate(SHIPPED, shipped_qdq.model, str(TEST), num_samples=70, batch_size=32, runs=1,
                 on_start=total.append, on_batch=seen.append)
    assert total == [70] and sum(seen) == r["samples"] == 70 and seen == [32, 32, 6]


@pytest.mark.parametrize("fixed", [1, 4])
def test_a_fixed_batch_model_is_timed_on_its_own_batch(tmp_path, fixed):
    """A model whose batch dim is fixed at 4 takes no batch of 1: validate times it on its batch of
    4 (it used to feed one row and fail inside onnxruntime), and its figures equal onnxruntime's
    outputs on those batches computed here."""
    import dfq_onnx

    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
                          "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [fixed, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [fixed, 10])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src, q = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(m, str(src))
    x = rng.normal(size=(16, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    onnx.save(dfq_onnx.convert(str(src), str(tmp_path / "d.npz")), str(q))
    r = validate(src, q, tmp_path / "d.npz", runs=2)
    assert r["samples"] == 16 and r["latency_batch"] == fixed and r["latency_ms"]["quant"] > 0
    f = np.concatenate([run_ort(src, {"x": x[i:i + fixed]})[0] for i in range(0, 16, fixed)]).astype(np.float64)
    y = np.concatenate([run_ort(q, {"x": x[i:i + fixed]})[0] for i in range(0, 16, fixed)]).astype(np.float64)
    assert r["sqnr_db"]["y"] == pytest.approx(10 * np.log10(np.sum(f ** 2) / np.sum((f - y) ** 2)), rel=1e-6)
    out = CliRunner().invoke(main, ["validate", str(src), str(q), "--data", str(tmp_path / "d.npz"), "--runs", "2"])
    assert out.exit_code == 0 and f"latency, batch {fixed}," in out.output, out.output
