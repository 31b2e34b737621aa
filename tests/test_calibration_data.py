"""Calibration .npz files: read as np.load reads them, stored arrays mapped rather than copied."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dfq_onnx
from dfq_onnx.calibration_data import DataSource, input_specs, npz_arrays
from dfq_onnx.errors import DfqError

from helpers import CALIB, SHIPPED

DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.uint8, np.int64, np.bool_])
ARRAYS = DTYPES.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["x", "y", "labels"]), st.tuples(ARRAYS, st.booleans()), min_size=1, max_size=3),
       st.booleans())
def test_npz_arrays_equal_what_np_load_reads(tmp_path, arrays, compressed):
    """Every array (any dtype, rank 0-3, empty, C or Fortran order; np.savez or
    np.savez_compressed) comes back with np.load's dtype, shape and values. Those np.savez stored
    in C order, non-empty, are mapped: read-only, so nothing the conversion does can write to the
    user's file."""
    path = tmp_path / "d.npz"
    data = {k: np.asfortranarray(a) if fortran else a for k, (a, fortran) in arrays.items()}
    (np.savez_compressed if compressed else np.savez)(path, **data)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    got = npz_arrays(path)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(got) == sorted(z.files)
        for k in z.files:
            want = z[k]
            assert got[k].dtype == want.dtype and got[k].shape == want.shape
            assert np.array_equal(got[k], want, equal_nan=want.dtype.kind == "f")
            mapped = not compressed and want.size > 0 and not (want.ndim > 1 and np.isfortran(want))
            assert got[k].flags.writeable is not mapped, k
    del got
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_rows_past_num_samples_are_neither_read_nor_checked(tmp_path):
    """A mapped array's rows past --num-samples are not checked (a NaN there is no error) and the
    rows that are used are; the batches equal the data's first rows."""
    specs = input_specs(onnx.load(str(SHIPPED)))
    with np.load(CALIB) as z:
        x = z[z.files[0]][:40].copy()
    x[30] = np.nan
    path = tmp_path / "c.npz"
    np.savez(path, **{specs[0].name: x})
    got = np.concatenate([b[specs[0].name] for b in DataSource(path, specs, num_samples=30).batches(8)])
    np.testing.assert_array_equal(got, x[:30])
    try:
        list(DataSource(path, specs, num_samples=31).batches(8))
    except DfqError as e:
        assert "NaN or Inf" in str(e)
    else:
        raise AssertionError("a NaN in a row the conversion uses was accepted")


def test_stored_and_compressed_files_convert_alike_and_stay_unchanged(tmp_path):
    """The shipped model converted from the same samples in an np.savez file (mapped), an
    np.savez_compressed file (read) and in-memory arrays gives the same bytes; the files are
    unchanged."""
    with np.load(CALIB) as z:
        arrays = {k: z[k] for k in z.files}
    stored, packed = tmp_path / "s.npz", tmp_path / "c.npz"
    np.savez(stored, **arrays)
    np.savez_compressed(packed, **arrays)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (stored, packed)}
    cfg = dfq_onnx.QuantConfig(num_samples=64, effort="fast")
    outs = [dfq_onnx.convert(str(SHIPPED), src, cfg).SerializeToString() for src in (str(stored), str(packed), arrays)]
    assert outs[0] == outs[1] == outs[2]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (stored, packed)} == digests


def _masked_model(path):
    """y = Where(mask, Relu(x W^T), 0): a float input and a bool one (an attention mask, say)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("Where", ["mask", "r", "zero"], ["y"])], "masked",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_a_bool_input_takes_bool_data_and_a_float_input_refuses_it(tmp_path):
    """A bool model input (torch exports attention masks so) takes bool data; the conversion's
    output equals onnxruntime's float model within 8-bit rounding; bool data for a float input is
    still refused in one line."""
    from helpers import run_ort

    src = _masked_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    x, mask = rng.normal(size=(32, 4)).astype(np.float32), rng.random((32, 6)) < 0.5
    np.savez(tmp_path / "d.npz", x=x, mask=mask)
    q = dfq_onnx.convert(str(src), str(tmp_path / "d.npz"))
    f, y = run_ort(src, {"x": x, "mask": mask})[0], run_ort(q, {"x": x, "mask": mask})[0]
    assert np.all(y[~mask] == 0) and np.max(np.abs(f - y)) < 0.1 * np.max(np.abs(f))
    np.savez(tmp_path / "bad.npz", x=mask[:, :4], mask=mask)
    try:
        dfq_onnx.convert(str(src), str(tmp_path / "bad.npz"))
    except DfqError as e:
        assert "input 'x' has dtype bool, model expects float32" in str(e)
    else:
        raise AssertionError("bool data for a float input was accepted")


def _small_cnn(dtype):
    """x -> Conv -> Relu -> Mul(a Constant node's 0.5) -> Flatten -> Gemm -> y, in `dtype` throughout
    (float16: a GPU export); the float32 model has the float16 weights widened (its twin)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float16).astype(dtype)
    b = rng.normal(0, 0.1, 4).astype(np.float16).astype(dtype)
    fc = rng.normal(0, 0.2, (5, 4 * 6 * 6)).astype(np.float16).astype(dtype)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.asarray(0.5, dtype))),
                           helper.make_node("Mul", ["r", "half"], ["m"]),
                           helper.make_node("Flatten", ["m"], ["f"]),
                           helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)], "cnn",
                          [helper.make_tensor_value_info("x", t, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", t, ["N", 5])],
                          [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fc, "fc"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("fmt", ["qdq", "int", "qonnx"])
def test_a_float16_or_float64_model_is_quantized_as_its_float32_twin(fmt, dtype):
    """A model that computes in float16 (or float64) keeps those inputs and outputs, and its
    quantized outputs equal those of its float32 twin (the same weights in float32) quantized on
    the same samples, cast to that type: everything between the interface is the twin's
    computation."""
    from helpers import run_ort

    x = np.random.default_rng(5).normal(size=(32, 3, 6, 6)).astype(np.float16).astype(dtype)
    cfg = dfq_onnx.QuantConfig(format=fmt)
    q = dfq_onnx.convert(_small_cnn(dtype), {"x": x}, cfg)
    q32 = dfq_onnx.convert(_small_cnn(np.float32), {"x": x.astype(np.float32)}, cfg)
    t_io = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert [v.type.tensor_type.elem_type for v in list(q.graph.input) + list(q.graph.output)] == [t_io, t_io]
    if fmt == "qonnx":
        from dfq_onnx.validate import qonnx_as_qcdq
        q, q32 = qonnx_as_qcdq(q), qonnx_as_qcdq(q32)
    t = np.random.default_rng(6).normal(size=(16, 3, 6, 6)).astype(np.float16).astype(dtype)
    y = run_ort(q, {"x": t})[0]
    y32 = run_ort(q32, {"x": t.astype(np.float32)})[0]
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, y32.astype(dtype))


def test_a_float16_model_in_c_is_refused_with_the_reason():
    """The C library takes and returns float32: a float16 model's interface Casts are float ops it
    cannot hold, and the one-line refusal says what to do."""
    x = np.random.default_rng(5).normal(size=(8, 3, 6, 6)).astype(np.float16)
    with pytest.raises(DfqError, match="export the model in float32"):
        dfq_onnx.convert(_small_cnn(np.float16), {"x": x}, dfq_onnx.QuantConfig(format="c", prefix="m"))
