"""Hostile input files: external data that escapes the model's folder, sizes that lie, mutated
bytes. The CLI exits 0 with a valid model or 1 with one line, writes nothing else, and leaves its
input as it was."""
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx.cli import main

from helpers import CALIB, SHIPPED

CORPUS = Path(__file__).parent / "corpus"


def small_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "h",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 26, 26])],
                          [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def with_external(tmp_path: Path, location: str, length: int | None = None) -> Path:
    """A model whose weight's bytes are said to live at `location`."""
    m = small_model()
    w = m.graph.initializer[0]
    raw = numpy_helper.to_array(w).tobytes()
    w.ClearField("float_data")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length or len(raw)))):
        w.external_data.add(key=k, value=v)
    p = tmp_path / "m" / "model.onnx"
    p.parent.mkdir(exist_ok=True)
    onnx.save(m, p)
    return p


def convert(src, out):
    return CliRunner().invoke(main, ["convert", str(src), str(out), "--calib", str(CALIB)])


def one_line_failure(res, out, mention=""):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, (res.exit_code, res.stderr)
    assert mention.lower() in res.stderr.lower(), res.stderr
    assert not Path(out).exists()


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(36, np.float32).tobytes())
    if where == "absolute":
        p = with_external(tmp_path, str(secret))
    elif where == "dotdot":
        p = with_external(tmp_path, "../secret.bin")
    else:
        p = with_external(tmp_path, "link.bin")
        os.symlink(secret, p.parent / "link.bin")
    one_line_failure(convert(p, tmp_path / "out.onnx"), tmp_path / "out.onnx", "outside the model's folder")


def test_external_data_that_claims_more_bytes_than_its_file_is_refused(tmp_path):
    p = with_external(tmp_path, "w.bin", length=10 ** 12)
    (p.parent / "w.bin").write_bytes(np.zeros(36, np.float32).tobytes())
    one_line_failure(convert(p, tmp_path / "out.onnx"), tmp_path / "out.onnx", "claims bytes")


def test_external_data_inside_the_folder_is_read(tmp_path):
    p = with_external(tmp_path, "w.bin")
    (p.parent / "w.bin").write_bytes(numpy_helper.to_array(small_model().graph.initializer[0]).tobytes())
    x = tmp_path / "calib.npz"
    np.savez(x, x=np.random.default_rng(1).normal(size=(8, 1, 28, 28)).astype(np.float32))
    res = CliRunner().invoke(main, ["convert", str(p), str(tmp_path / "out.onnx"), "--calib", str(x)])
    assert res.exit_code == 0, res.output


def converts_or_fails_cleanly(folder: Path, mutated: Path, args: list) -> None:
    """Run the CLI on a mutated input in `folder`: a valid model at folder/out.onnx and exit 0, or
    one line and exit 1 with no output; the mutated file unchanged, nothing else written there."""
    before = hashlib.sha256(mutated.read_bytes()).hexdigest()
    existing = sorted(p.name for p in folder.iterdir())
    out = folder / "out.onnx"
    res = CliRunner().invoke(main, args)
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        onnx.checker.check_model(onnx.load(out))
    else:
        one_line_failure(res, out)
    assert hashlib.sha256(mutated.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(existing + (["out.onnx"] if res.exit_code == 0 else []))


# what each corpus file must give: a phrase of its one-line error, or None for a valid model
CORPUS_OUTCOMES = {
    "absurd_dims.onnx": "is too small for the declared shape",
    "absurd_input_dim.onnx": "model expects",
    "already_quantized.onnx": "already quantized",
    "inf_weight.onnx": "holds NaN or Inf values",
    "minus_one_batch.onnx": None,
    "nan_weight.onnx": "holds NaN or Inf values",
    "truncated.onnx": "not a readable ONNX model",
}


def test_corpus_of_inputs_that_once_failed(tmp_path):
    """Every file in tests/corpus/ ends in its own one-line refusal and exit 1, or a valid model
    where it must convert (a refusal removed, or a different error, fails)."""
    files = sorted(CORPUS.glob("*.onnx"))
    assert sorted(f.name for f in files) == sorted(CORPUS_OUTCOMES)
    for f in files:
        out = tmp_path / (f.stem + "_out.onnx")
        res = convert(f, out)
        want = CORPUS_OUTCOMES[f.name]
        if want is None:
            assert res.exit_code == 0, (f.name, res.output)
            onnx.checker.check_model(onnx.load(out))
        else:
            assert res.exit_code != 0 and want in res.output, (f.name, res.output)
            one_line_failure(res, out)


SHIPPED_BYTES = Path(SHIPPED).read_bytes()


@settings(max_examples=int(os.environ.get("DFQ_FUZZ", 60)), deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=os.environ.get("CI") == "true")
@given(st.lists(st.tuples(st.integers(0, len(SHIPPED_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.one_of(st.none(), st.integers(16, len(SHIPPED_BYTES))))
def test_mutated_model_files_give_a_model_or_one_line(tmp_path_factory, flips, cut):
    """Bytes of the shipped model overwritten (and maybe the file cut short)."""
    d = tmp_path_factory.mktemp("fuzz")
    data = bytearray(SHIPPED_BYTES)
    for i, v in flips:
        data[i] = v
    src = d / "m.onnx"
    src.write_bytes(bytes(data[:cut]))
    converts_or_fails_cleanly(d, src, ["convert", str(src), str(d / "out.onnx"), "--calib", str(CALIB)])


def small_calib_bytes(save) -> bytes:
    import io
    buf = io.BytesIO()
    save(buf, x=np.random.default_rng(1).normal(size=(6, 1, 28, 28)).astype(np.float32))
    return buf.getvalue()


CALIB_BYTES = small_calib_bytes(np.savez)
CALIB_ZBYTES = small_calib_bytes(np.savez_compressed)  # deflate: flips reach zlib, not only the CRC
HOSTILE_ARRAYS = st.sampled_from([
    np.zeros((0, 1, 28, 28), np.float32), np.zeros((4, 1, 28), np.float32), np.zeros((4, 3, 28, 28), np.float32),
    np.full((4, 1, 28, 28), np.nan, np.float32), np.full((4, 1, 28, 28), np.inf, np.float32),
    np.full((4, 1, 28, 28), 3e38, np.float32), np.ones((4, 1, 28, 28), np.complex64), np.ones((4, 1, 28, 28), bool),
    np.ones((4, 1, 28, 28), np.int8), np.ones((4, 1, 28, 28), np.float64), np.array(["a", "b"]), np.float32(1.0),
    np.ones((4, 1, 1, 1), np.float32), np.ones((4, 1, 28, 28, 1), np.float32)])


@settings(max_examples=int(os.environ.get("DFQ_FUZZ", 60)), deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=os.environ.get("CI") == "true")
@given(st.one_of(
    st.tuples(st.sampled_from(["bytes", "zbytes"]),
              st.lists(st.tuples(st.integers(0, len(CALIB_ZBYTES) - 1), st.integers(0, 255)), max_size=8),
              st.one_of(st.none(), st.integers(0, len(CALIB_ZBYTES)))),
    st.tuples(st.just("arrays"), st.dictionaries(st.sampled_from(["x", "y", "input"]), HOSTILE_ARRAYS, max_size=2),
              st.none())))
def test_hostile_calibration_files_give_a_model_or_one_line(tmp_path_factory, mutation):
    """A calibration .npz with bytes overwritten or cut, or holding arrays of the wrong key, shape,
    dtype or values (NaN, Inf, 3e38, strings, scalars, no samples)."""
    kind, change, cut = mutation
    d = tmp_path_factory.mktemp("fuzzcal")
    src = d / "m.onnx"
    onnx.save(small_model(), src)
    cal = d / "c.npz"
    if kind != "arrays":
        data = bytearray(CALIB_BYTES if kind == "bytes" else CALIB_ZBYTES)
        for i, v in change:
            data[i] = v
        cal.write_bytes(bytes(data[:cut]))
    else:
        np.savez(cal, **change)
    converts_or_fails_cleanly(d, cal, ["convert", str(src), str(d / "out.onnx"), "--calib", str(cal)])
