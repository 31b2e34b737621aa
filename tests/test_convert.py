"""End to end on the shipped model: accuracy, power-of-two scales, requantization bound,
the exact bias fraction, every calibration source."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import dfq_onnx
from dfq_onnx import QuantConfig
from dfq_onnx.fixedpoint import is_pow2
from dfq_onnx.pipeline import fuse, run

from helpers import CALIB, SHIPPED, run_ort


def accuracy(model, x, y, optimize=True):
    return 100.0 * float(np.mean(run_ort(model, {"input": x}, optimize)[0].argmax(1) == y))


def test_w8a8_accuracy_within_half_a_point_at_both_optimization_levels(shipped_qdq, test_data):
    x, y = test_data
    fl = accuracy(SHIPPED, x, y)
    for optimize in (True, False):
        q = accuracy(shipped_qdq.model, x, y, optimize)
        assert q >= fl - 0.5, (optimize, q, fl)


def test_outputs_stay_close_to_float(shipped_qdq, test_data):
    x, _ = test_data
    f = run_ort(SHIPPED, {"input": x})[0]
    q = run_ort(shipped_qdq.model, {"input": x})[0]
    sqnr = 10 * np.log10(np.sum(f ** 2) / np.sum((f - q) ** 2))
    assert sqnr > 20.0
    assert np.mean(f.argmax(1) == q.argmax(1)) >= 0.98


def scales_and_zero_points(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            yield n, inits[n.input[1]], inits[n.input[2]]


def test_every_scale_is_a_power_of_two_and_every_zero_point_zero(shipped_qdq):
    """Zero point 0, or 128 on uint8 for a signed tensor written as onnxruntime's CPU kernels take
    it (the same values: code - 128 on the same grid)."""
    seen = offset = 0
    for _, s, z in scales_and_zero_points(shipped_qdq.model):
        assert s.dtype == np.float32 and is_pow2(s).all()
        assert not np.any(z) or (z.dtype == np.uint8 and np.all(z == 128))
        seen += 1
        offset += bool(np.any(z))
    assert seen > 20 and offset > 0
    for _, s, z in scales_and_zero_points(dfq_onnx.convert(SHIPPED, CALIB, QuantConfig(layout="unified"))):
        assert not np.any(z)  # the unified layout is not for onnxruntime's kernels: signed codes as int8


def test_requant_points_bound(shipped_qdq, calib_data):
    """ort layout: one requantization per module output read inside the graph, graph input and
    island boundary, plus one before each residual Add; unified layout: exactly the minimum, as the
    integer graph. The Gemm writing the logits is not requantized (accumulator precision)."""
    info = dfq_onnx.inspect(shipped_qdq.model)
    kinds = shipped_qdq.requant_by_kind
    n_inputs = len([i for i in shipped_qdq.model.graph.input])
    residual = sum(1 for m in shipped_qdq.modules if m["residual"])
    assert residual == 2 and kinds["residual"] == residual
    assert info["requant_points"] == shipped_qdq.requant_points
    assert info["modules"] == 8 and kinds["module"] == info["modules"] - 1 and kinds["input"] == n_inputs
    assert info["requant_points"] == kinds["module"] + n_inputs + kinds["island"] + residual
    unified = run(SHIPPED, {"input": calib_data}, QuantConfig(layout="unified"))
    assert dfq_onnx.inspect(unified.model)["requant_points"] == kinds["module"] + n_inputs + kinds["island"]
    # per-layer: every Conv, BN, activation, Add, pool and Gemm output plus the input
    assert shipped_qdq.per_layer_requant_points == 23


def test_ort_runs_every_linear_module_in_int8(shipped_qdq):
    """onnxruntime's optimized graph has no float Conv/Gemm left: QDQ fused to int8 kernels."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(shipped_qdq.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 6 and ops.count("QLinearAdd") == 2
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm"} & set(ops), sorted(set(ops))


def test_bias_is_int32_at_exactly_input_times_weight_scale(shipped_qdq):
    m = shipped_qdq.model
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    checked = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3:
            continue
        dq_x, dq_w, dq_b = (prod[i] for i in n.input[:3])
        assert inits[dq_b.input[0]].dtype == np.int32
        assert inits[dq_w.input[0]].dtype == np.int8
        sx, sw, sb = (inits[d.input[1]] for d in (dq_x, dq_w, dq_b))
        np.testing.assert_array_equal(sb, (sx * sw).astype(np.float32))
        checked += 1
    assert checked == 7


def test_metadata_says_who_made_it(shipped_qdq):
    meta = {p.key: p.value for p in shipped_qdq.model.metadata_props}
    assert meta["dfq.producer"].startswith("dfq-onnx")
    assert len(json.loads(meta["dfq.modules"])) == 8
    assert json.loads(meta["dfq.settings"])["weight_bits"] == 8


def test_dynamic_batch_stays_dynamic(shipped_qdq, test_data):
    assert shipped_qdq.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x, _ = test_data
    assert run_ort(shipped_qdq.model, {"input": x[:3]})[0].shape == (3, 10)


class Reader:
    """An onnxruntime-style CalibrationDataReader."""

    def __init__(self, x):
        self.items = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


@pytest.mark.parametrize("kind", ["dict", "iterable", "reader", "npy_folder", "image_folder"])
def test_every_calibration_source_gives_the_same_model(kind, calib_data, tmp_path):
    x = calib_data[:32]
    if kind == "dict":
        src = {"input": x}
    elif kind == "iterable":
        src = [{"input": x[i:i + 4]} for i in range(0, 32, 4)]
    elif kind == "reader":
        src = Reader(x)
    elif kind == "npy_folder":
        for i in range(32):
            np.save(tmp_path / f"{i:03d}.npy", x[i])
        src = tmp_path
    else:
        from PIL import Image
        for i in range(32):
            Image.fromarray(np.rint(x[i, 0] * 255).astype(np.uint8)).save(tmp_path / f"{i:03d}_0.png")
        src = tmp_path
    cfg = QuantConfig(num_samples=32)
    ref = run(SHIPPED, {"input": x}, cfg).model
    got = run(SHIPPED, src, cfg).model
    ref_s = [s.tobytes() for _, s, _ in scales_and_zero_points(ref)]
    got_s = [s.tobytes() for _, s, _ in scales_and_zero_points(got)]
    assert got_s == ref_s


def test_num_samples_limits_calibration():
    r = run(SHIPPED, CALIB, QuantConfig(num_samples=50, batch_size=16))
    assert r.samples == 50


def test_per_tensor_and_max_method(test_data):
    x, y = test_data
    r = run(SHIPPED, CALIB, QuantConfig(per_channel=False, method="max"))
    inits = {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
    for n in r.model.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8:
            assert inits[n.input[1]].size == 1
    assert accuracy(r.model, x, y) >= accuracy(SHIPPED, x, y) - 2.0


def test_convert_accepts_a_model_proto_and_leaves_it_alone():
    m = onnx.load(str(SHIPPED))
    before = m.SerializeToString()
    out = dfq_onnx.convert(m, CALIB)
    assert m.SerializeToString() == before
    assert isinstance(out, onnx.ModelProto)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "squeezenet", "inception_v1", "shufflenet"])
def test_structure_only_zoo_models_convert_and_run(name):
    """onnx's light_* models (placeholder weights): old opsets and IR versions, Sum, LRN, Softmax."""
    from pathlib import Path
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 224, 224)).astype(np.float32)
    from dfq_onnx.calibration_data import input_specs
    (spec,) = input_specs(onnx.load(str(path)))
    inp = spec.name
    r = run(path, {inp: x}, QuantConfig(batch_size=1))
    info = dfq_onnx.inspect(r.model)
    assert info["scales"]["total"] == info["scales"]["power_of_two"] > 0
    k = r.requant_by_kind
    assert info["requant_points"] == sum(k.values()) and k["input"] == 1
    assert info["modules"] - 1 <= k["module"] + k["table"] <= info["modules"]  # the final Gemm, if any, is not requantized
    f = run_ort(path, {inp: x[:1]})[0]
    q = run_ort(r.model, {inp: x[:1]})[0]
    assert q.shape == f.shape and np.all(np.isfinite(q))


def test_bias_correction_removes_mean_error_on_held_out_data(test_data, calib_data):
    """Corrected on 16 calibration digits: at the first Conv (whose only error is its own: input
    and weight rounding) the per-channel mean error on the 1,000 held-out digits drops at least
    threefold, and accuracy does not fall."""
    x, y = test_data
    fused = fuse(SHIPPED)
    first = next(n.output[0] for n in fused.graph.node if n.op_type == "Conv")
    ref = run_ort(with_output(fused, first), {"input": x})[1]
    err, acc = {}, {}
    for bc in (False, True):
        r = run(SHIPPED, {"input": calib_data}, QuantConfig(bias_correction=bc))
        assert r.facts["bias_corrected"] == (7 if bc else 0)  # every Conv and the Gemm
        got = run_ort(with_output(r.model, first), {"input": x})[1]
        err[bc] = float(np.mean(np.abs((got - ref).mean(axis=(0, 2, 3)))))
        acc[bc] = accuracy(r.model, x, y)
    assert err[True] < err[False] / 3, err
    assert acc[True] >= acc[False] - 0.1, acc


def with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m
