"""Per-module precision: sensitivity, --keep-float, --override, --max-drop, --target."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from dfq_onnx import QuantConfig
from dfq_onnx.cli import main
from dfq_onnx.errors import DfqError
from dfq_onnx.pipeline import run
from dfq_onnx.sensitivity import EVAL_SAMPLES, module_sensitivity

from helpers import CALIB, SHIPPED, int8_weight_rows, run_ort, worst_pair_sum

MODULES = ["/stem/stem.0/Conv", "/block1/conv1/Conv", "/block1/conv2/Conv", "/down/down.0/Conv",
           "/block2/conv1/Conv", "/block2/conv2/Conv", "/GlobalAveragePool", "/head/Gemm"]


@pytest.fixture(scope="module")
def sens4():
    return module_sensitivity(SHIPPED, CALIB, QuantConfig(weight_bits=4))


def test_sensitivity_lists_every_module_sorted(sens4):
    rows = sens4["modules"]
    assert sorted(r["name"] for r in rows) == sorted(MODULES)
    sq = [r["sqnr_db"] for r in rows]
    assert sq == sorted(sq) and all(np.isfinite(sq))
    assert sens4["samples"] == EVAL_SAMPLES


def test_sensitivity_equals_converting_with_every_other_module_float(sens4, calib_data):
    """The figure for a module is what a plain conversion (no alignment, no bias correction, rounding
    to nearest) with every other module kept float measures on the same samples."""
    x = calib_data[:EVAL_SAMPLES]
    ref = run_ort(SHIPPED, {"input": x})[0].astype(np.float64)
    for row in (sens4["modules"][0], sens4["modules"][-1]):
        others = tuple(m for m in MODULES if m != row["name"])
        q = run(SHIPPED, CALIB, QuantConfig(weight_bits=4, keep_float=others, align=False, rounding="nearest",
                                            bias_correction=False)).model
        y = run_ort(q, {"input": x})[0].astype(np.float64)
        sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))
        # same model; only the batching of the runs differs (float summation order)
        assert sqnr == pytest.approx(row["sqnr_db"], abs=1e-3), row["name"]


def test_keeping_the_most_sensitive_module_float_helps(sens4, test_data):
    x, _ = test_data
    ref = run_ort(SHIPPED, {"input": x})[0].astype(np.float64)

    def sqnr(cfg):
        y = run_ort(run(SHIPPED, CALIB, cfg).model, {"input": x})[0].astype(np.float64)
        return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))

    worst = sens4["modules"][0]["name"]
    assert sqnr(QuantConfig(weight_bits=4, keep_float=(worst,))) > sqnr(QuantConfig(weight_bits=4)) + 1.0


def test_keep_float_leaves_the_module_in_float():
    r = run(SHIPPED, CALIB, QuantConfig(keep_float=("/block1/conv1/Conv",)))
    assert len(r.modules) == 7 and r.float_ops.get("Conv") == 1
    conv = next(n for n in r.model.graph.node if n.name == "/block1/conv1/Conv")
    weights = {i.name for i in r.model.graph.initializer if i.data_type == 1}  # float initializers
    assert conv.input[1] in weights


def test_keep_float_unknown_module_is_a_clear_error():
    with pytest.raises(DfqError, match="no unified module named /nope"):
        run(SHIPPED, CALIB, QuantConfig(keep_float=("/nope",)))


def test_cli_sensitivity_json():
    res = CliRunner().invoke(main, ["inspect", str(SHIPPED), "--sensitivity", "--calib", str(CALIB), "--json"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert len(r["modules"]) == len(MODULES)
    res = CliRunner().invoke(main, ["inspect", str(SHIPPED), "--sensitivity"])
    assert res.exit_code == 2 and "--calib" in res.stderr


def test_override_sets_one_modules_weight_bits():
    r = run(SHIPPED, CALIB, QuantConfig(weight_bits=4, overrides=(("/stem/stem.0/Conv", 8),)))
    spans = {name: int(np.abs(w).max()) for name, w in _weight_codes(r.model).items()}
    assert spans["/stem/stem.0/Conv"] > 7           # 8-bit codes use more than the 4-bit range
    assert all(v <= 8 for k, v in spans.items() if k != "/stem/stem.0/Conv")  # 4-bit codes: -8..7


def test_override_rejects_bad_bits_and_names():
    with pytest.raises(DfqError, match="weight bits must be 2..8"):
        QuantConfig(overrides=(("/stem/stem.0/Conv", 9),))
    with pytest.raises(DfqError, match="--override: no unified module named /x"):
        run(SHIPPED, CALIB, QuantConfig(overrides=(("/x", 8),)))
    res = CliRunner().invoke(main, ["convert", str(SHIPPED), "o.onnx", "--calib", str(CALIB), "--override", "a=w8a12"])
    assert res.exit_code == 2 and "activation bits must be 8 or 16" in res.stderr


def test_sensitivity_on_large_inputs_runs_on_fewer_samples(monkeypatch):
    """As many samples as hold EVAL_VALUES input values, at least MIN_EVAL_SAMPLES: here MNIST's
    784 values stand for a large input by lowering the budget."""
    import dfq_onnx.sensitivity as sens

    monkeypatch.setattr(sens, "EVAL_VALUES", 20 * 28 * 28)
    assert module_sensitivity(SHIPPED, CALIB, QuantConfig(batch_size=4))["samples"] == 20
    monkeypatch.setattr(sens, "EVAL_VALUES", 2 * 28 * 28)
    assert module_sensitivity(SHIPPED, CALIB, QuantConfig(batch_size=4))["samples"] == sens.MIN_EVAL_SAMPLES


def test_sensitivity_over_every_output_is_the_weakest_output(tmp_path):
    """every_output (the order --min-sqnr uses) ranks by the smallest SQNR over the outputs: with a
    second output added (the last convolution's, before the pooling that averages its errors
    down), the rows stay sorted, no module scores above its first-output figure, and that
    convolution scores below it."""
    import onnx

    m = onnx.load(str(SHIPPED))
    last = next(n for n in m.graph.node if n.name == MODULES[5])
    m.graph.output.append(onnx.helper.make_tensor_value_info(last.output[0], onnx.TensorProto.FLOAT,
                                                             ["n", None, None, None]))
    first = {r["name"]: r["sqnr_db"] for r in module_sensitivity(m, CALIB, QuantConfig(weight_bits=4))["modules"]}
    rows = module_sensitivity(m, CALIB, QuantConfig(weight_bits=4), every_output=True)["modules"]
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert all(r["sqnr_db"] <= first[r["name"]] + 1e-9 for r in rows)
    assert next(r["sqnr_db"] for r in rows if r["name"] == MODULES[5]) < first[MODULES[5]] - 1


def test_max_drop_meets_its_target_on_the_calibration_samples(calib_data):
    from dfq_onnx.mixed_precision import convert_max_drop

    cfg = QuantConfig(weight_bits=3, rounding="nearest")  # second-order rounding leaves too little to raise
    x = calib_data[:cfg.num_samples]
    ref = run_ort(SHIPPED, {"input": x})[0].argmax(1)
    plain = 100 * np.mean(run_ort(run(SHIPPED, CALIB, cfg).model, {"input": x})[0].argmax(1) == ref)
    assert plain < 99.0  # W3 alone loses agreement, so the search has work to do
    result, facts = convert_max_drop(SHIPPED, CALIB, cfg, 1.0)
    got = 100 * np.mean(run_ort(result.model, {"input": x})[0].argmax(1) == ref)
    assert facts["met"] and got >= 99.0 and got == pytest.approx(facts["agreement_top1"])
    assert 0 < len(facts["raised"]) < len(MODULES)
    settings = json.loads(next(p.value for p in result.model.metadata_props if p.key == "dfq.settings"))
    assert settings["act_overrides"] == {n: 16 for n in facts["raised"]}
    assert settings["overrides"] == {n: 8 for n in facts["raised"] if n != "/GlobalAveragePool"}


def _smallest_sqnr_db(ref: list, y: list) -> float:
    """Smallest SQNR over the outputs, computed here from onnxruntime's outputs."""
    return min(10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum((a.astype(np.float64) - b) ** 2))
               for a, b in zip(ref, y))


def test_min_sqnr_meets_its_target_on_the_calibration_samples(calib_data):
    from dfq_onnx.mixed_precision import convert_raised

    cfg = QuantConfig(weight_bits=3, rounding="nearest")
    x = {"input": calib_data[:cfg.num_samples]}
    ref = run_ort(SHIPPED, x)
    plain = _smallest_sqnr_db(ref, run_ort(run(SHIPPED, CALIB, cfg).model, x))
    top = _smallest_sqnr_db(ref, run_ort(run(SHIPPED, CALIB, QuantConfig(act_bits=16)).model, x))
    target = (plain + top) / 2  # above W3A8, below W8A16 everywhere: some modules must be raised, not all
    assert top - plain > 6
    result, facts = convert_raised(SHIPPED, CALIB, cfg, min_sqnr=target)
    got = _smallest_sqnr_db(ref, run_ort(result.model, x))
    assert facts["met"] and got >= target and got == pytest.approx(facts["sqnr_db"], abs=1e-6)
    assert 0 < len(facts["raised"]) < len(MODULES)
    assert facts["candidates"]["0"] == pytest.approx(plain, abs=1e-6)
    settings = json.loads(next(p.value for p in result.model.metadata_props if p.key == "dfq.settings"))
    assert settings["act_overrides"] == {n: 16 for n in facts["raised"]}
    with pytest.raises(DfqError, match="not both"):
        convert_raised(SHIPPED, CALIB, cfg, min_sqnr=target, max_drop=1.0)


@pytest.mark.parametrize("args, message", [
    (["--min-sqnr", "20", "--max-drop", "1"], "give --max-drop or --min-sqnr, not both"),
    (["--min-sqnr", "20", "--format", "int"], "--min-sqnr raises modules to 16-bit outputs: it needs --format qdq"),
    (["--min-sqnr", "nan"], "--min-sqnr must be a finite number of dB"),
])
def test_min_sqnr_bad_use_is_one_line(tmp_path, args, message):
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", str(SHIPPED), str(out), "--calib", str(CALIB), "-q"] + args)
    assert res.exit_code != 0 and message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_keeping_every_module_float_is_a_clear_error():
    with pytest.raises(DfqError, match="nothing left to quantize"):
        run(SHIPPED, CALIB, QuantConfig(keep_float=tuple(MODULES)))


def _weight_codes(model):
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_of = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: consts[dq_of[n.input[1]].input[0]].astype(np.int64)
            for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dq_of}


def test_target_ort_x86_keeps_int16_pair_sums_from_saturating(test_data):
    """Without VNNI, onnxruntime's u8 x s8 kernels add two products in int16: with activation
    codes up to 255, every pair the kernels add (helpers.int8_weight_rows) must satisfy
    255 * (|a| + |b|) <= 32767 for same-sign codes a, b. Channels that already do keep their
    full-precision codes."""
    full = int8_weight_rows(run(SHIPPED, CALIB, QuantConfig(target="ort-x86-vnni")).model)
    assert max(int(worst_pair_sum(w, s).max()) for w in full.values() for s in (1, -1)) * 255 > 32767  # the risk exists
    r = run(SHIPPED, CALIB, QuantConfig(target="ort-x86"))
    codes = int8_weight_rows(r.model)
    assert all(255 * worst_pair_sum(w, s).max() <= 32767 for w in codes.values() for s in (1, -1))
    assert r.facts["saturation_guarded"] > 0
    kept = sum(int(np.sum(np.all(full[n] == codes[n], axis=1))) for n in codes)
    assert kept > 0  # the guard works per channel: some channels' codes are untouched
    x, y = test_data
    assert 100 * np.mean(run_ort(r.model, {"input": x})[0].argmax(1) == y) >= 97.7  # float: 98.2


def test_target_checks():
    with pytest.raises(DfqError, match="target must be one of"):
        QuantConfig(target="gpu")
    with pytest.raises(DfqError, match="needs the integer-only format"):
        QuantConfig(target="hw")
    assert QuantConfig(target="hw", format="int").format == "int"


def test_exponent_search_improves_held_out_w4(calib_data, test_data):
    """The search measures on 64 calibration samples; its starting point is the fast conversion's
    own output SQNR there, and its gain holds on the test digits."""
    x, _ = test_data
    ref = run_ort(SHIPPED, {"input": x})[0].astype(np.float64)

    def sqnr(model, inp, r=ref):
        y = run_ort(model, {"input": inp})[0].astype(np.float64)
        return 10 * np.log10(np.sum(r ** 2) / np.sum((r - y) ** 2))

    searched = run(SHIPPED, CALIB, QuantConfig(weight_bits=4, search_exponents=True, rounding="nearest"))
    before, after = searched.facts["search_sqnr_db"]
    assert after >= before and searched.facts["exponents_moved"] >= 1
    c = calib_data[:64]
    # the search judges the model as it will be deployed, biases corrected (on the first 16 samples, before
    # any move); its graph keeps those biases in float (measured 0.7 dB above the int32-bias model at W4)
    plain = run(SHIPPED, CALIB, QuantConfig(weight_bits=4, rounding="nearest", effort="fast")).model
    assert sqnr(plain, c, run_ort(SHIPPED, {"input": c})[0].astype(np.float64)) == pytest.approx(before, abs=1.0)
    assert sqnr(searched.model, x) > sqnr(run(SHIPPED, CALIB, QuantConfig(weight_bits=4, rounding="nearest")).model, x) + 0.5


def _zero_point_dtypes(model):
    """Element type of the zero point of every activation QuantizeLinear, by quantized tensor."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: consts[n.input[2]].dtype for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in consts}


def test_16_bit_activations(test_data):
    x, _ = test_data
    ref = run_ort(SHIPPED, {"input": x})[0].astype(np.float64)

    def sqnr(model):
        y = run_ort(model, {"input": x})[0].astype(np.float64)
        return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))

    full = "ort-x86-vnni"  # 8-bit weights everywhere: the comparison is about activations
    a8, a16 = (run(SHIPPED, CALIB, QuantConfig(target=full)).model,
               run(SHIPPED, CALIB, QuantConfig(act_bits=16, target=full)).model)
    assert next(o.version for o in a16.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert {d.itemsize for d in _zero_point_dtypes(a16).values()} == {2}
    assert sqnr(a16) > sqnr(a8) + 6.0
    one = run(SHIPPED, CALIB, QuantConfig(act_overrides=(("/block1/conv1/Conv", 16),))).model
    wide = [t for t, d in _zero_point_dtypes(one).items() if d.itemsize == 2]
    assert wide == ["/block1/Relu_output_0"]  # that module's output only
    with pytest.raises(DfqError, match="need --format qdq"):
        QuantConfig(act_bits=16, format="int")
