"""The command line: summaries, JSON, and bad input -> one line, exit 1 (2 for usage), no output
file, input untouched."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from dfq_onnx.cli import main
from dfq_onnx.pipeline import STAGES

from helpers import CALIB, SHIPPED, TEST


def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(res, code, must_mention, out_path=None):
    assert res.exit_code == code, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    if code == 1:
        assert len(lines) == 1, res.stderr
    assert must_mention.lower() in res.stderr.lower(), res.stderr
    if out_path is not None:
        assert not out_path.exists()
        if out_path.parent.exists():
            assert not [p for p in out_path.parent.iterdir() if p.name.startswith(f".{out_path.name}")]


def test_convert_prints_summary_and_writes_model(tmp_path):
    out = tmp_path / "q.onnx"
    before = digest(SHIPPED)
    res = invoke("convert", SHIPPED, out, "--calib", CALIB)
    assert res.exit_code == 0, res.output + res.stderr
    for words in ("unified modules", "requantization points", "float islands", "W8A8", "128 samples"):
        assert words in res.stdout
    assert out.exists() and digest(SHIPPED) == before
    onnx.checker.check_model(onnx.load(str(out)))


def test_convert_json_and_inspect_json_agree(tmp_path):
    out = tmp_path / "q.onnx"
    res = invoke("convert", SHIPPED, out, "--calib", CALIB, "--json", "--num-samples", "64")
    s = json.loads(res.stdout)
    assert s["calibration_samples"] == 64 and s["modules"] == 8
    res = invoke("inspect", out, "--json")
    info = json.loads(res.stdout)
    for key in ("opset", "nodes", "op_types", "requant_points", "weight_quantizers", "modules", "scales"):
        assert key in info
    assert info["requant_points"] == s["requant_points"]
    assert info["modules"] == s["modules"]


def test_inspect_table_on_a_float_model():
    res = invoke("inspect", SHIPPED)
    assert res.exit_code == 0
    assert "BatchNormalization" in res.stdout and "per-layer scheme" in res.stdout


def test_float_only_writes_the_fused_model(tmp_path):
    out = tmp_path / "fused.onnx"
    res = invoke("convert", SHIPPED, out, "--float-only")
    assert res.exit_code == 0, res.stderr
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(out)).graph.node]


def no_linear_model(path):
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"])], "t",  # (a Relu alone is now a table)
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def bad_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["missing", "not_onnx", "no_linear", "bad_names", "bad_shape", "bad_dtype",
                                  "nan", "same_path", "no_folder", "bad_preprocess", "empty_folder", "bad_sparsity",
                                  "ml_only"])
def test_bad_input_is_one_line_and_exit_1(case, tmp_path):
    x = np.load(CALIB)["input"][:8]
    model, calib, out = SHIPPED, CALIB, tmp_path / "out.onnx"
    extra = []
    mention = {"missing": "no such file", "not_onnx": "not a readable ONNX model",
               "no_linear": "nothing to quantize", "bad_names": "missing model input",
               "bad_shape": "shape", "bad_dtype": "dtype", "nan": "NaN", "same_path": "equals the input",
               "no_folder": "does not exist", "bad_preprocess": "preprocess",
               "empty_folder": "no .npy files or images", "bad_sparsity": "sparsity must be",
               "ml_only": "imports no ONNX (ai.onnx) operator set"}[case]
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "not_onnx":
        model = tmp_path / "text.onnx"
        model.write_text("hello, I am not a model\n")
    elif case == "no_linear":
        model = no_linear_model(tmp_path / "relu.onnx")
        calib = bad_npz(tmp_path / "c.npz", x=np.ones((2, 4), np.float32))
    elif case == "bad_names":
        calib = bad_npz(tmp_path / "c.npz", image=x)
    elif case == "bad_shape":
        calib = bad_npz(tmp_path / "c.npz", input=x[:, :, :20, :20])
    elif case == "bad_dtype":
        calib = bad_npz(tmp_path / "c.npz", input=(x * 255).astype(np.int32))
    elif case == "nan":
        y = x.copy()
        y[3, 0, 5, 5] = np.nan
        calib = bad_npz(tmp_path / "c.npz", input=y)
    elif case == "same_path":
        model = tmp_path / "m.onnx"
        model.write_bytes(SHIPPED.read_bytes())
        out = model
    elif case == "no_folder":
        out = tmp_path / "no" / "such" / "out.onnx"
    elif case == "bad_preprocess":
        extra = ["--preprocess", "zoom=2"]
    elif case == "bad_sparsity":
        extra = ["--sparsity", "4:2"]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        calib = tmp_path / "empty"
    elif case == "ml_only":  # a scikit-learn export: ai.onnx.ml operators only
        g = helper.make_graph([helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")], "ml",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
        model = tmp_path / "ml.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)]), str(model))
        calib = bad_npz(tmp_path / "c.npz", x=np.ones((2, 4), np.float32))
    before = digest(model) if model.exists() else None
    res = invoke("convert", model, out, "--calib", calib, *extra)
    assert_clean_failure(res, 1, mention, None if case == "same_path" else out)
    if before is not None:
        assert digest(model) == before


def test_missing_calib_is_a_usage_error(tmp_path):
    res = invoke("convert", SHIPPED, tmp_path / "o.onnx")
    assert_clean_failure(res, 2, "--calib", tmp_path / "o.onnx")


def test_inspect_bad_input(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x00\x01garbage")
    assert_clean_failure(invoke("inspect", p), 1, "not a readable ONNX model")
    assert_clean_failure(invoke("inspect", tmp_path / "none.onnx"), 1, "no such file")


def test_console_script_runs(tmp_path):
    """The installed entry point, as a user runs it (one subprocess)."""
    exe = [sys.executable, "-m", "dfq_onnx.cli"]
    res = subprocess.run(exe + ["convert", str(SHIPPED), str(tmp_path / "q.onnx"), "--calib", str(CALIB),
                                "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "q.onnx").exists() and res.stdout == ""
    res = subprocess.run(exe + ["convert", str(tmp_path / "none.onnx"), str(tmp_path / "o.onnx"),
                                "--calib", str(CALIB)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_batch_dim_written_as_minus_one_converts_and_validates(tmp_path):
    """An exporter's [-1, 3, ?, ?] input (dim_value -1 for the batch, unknown spatial dims)
    stopped with "--batch-size must be at least 1"; both formats must convert and validate."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4, None, None])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"])], "t", [x], [y],
                          [onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])
    src = tmp_path / "minus_one.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(size=(20, 3, 16, 16)).astype(np.float32))
    for fmt in ("qdq", "int"):
        out = tmp_path / f"q_{fmt}.onnx"
        res = invoke("convert", src, out, "--calib", data, "--format", fmt)
        assert res.exit_code == 0, res.output
        res = invoke("validate", src, out, "--data", data)
        assert res.exit_code == 0, res.output


def test_output_file_mode_follows_the_umask(tmp_path):
    import os
    import stat

    out = tmp_path / "q.onnx"
    old = os.umask(0o022)
    try:
        assert invoke("convert", SHIPPED, out, "--calib", CALIB).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_ctrl_c_exits_130_with_one_line_and_no_output(tmp_path):
    """SIGINT at any moment (while the imports load, or during the conversion) ends with status
    130 and one line, never a traceback, and never a half-written output file."""
    codes = []
    for delay in (0.02, 0.3, 0.6, 1.0, 1.5, 2.0):
        out = tmp_path / f"q{delay}.onnx"
        # the interrupt is timed from when the interpreter is up (Python's own start-up, before any
        # of dfq-onnx's code, is not ours to handle): a timer thread raises KeyboardInterrupt in the
        # main thread, as SIGINT's default handler does
        code = ("import sys, threading, _thread, dfq_onnx_launcher\n"
                f"sys.argv = ['dfq-onnx', 'convert', {str(SHIPPED)!r}, {str(out)!r}, '--calib', {str(CALIB)!r}]\n"
                f"t = threading.Timer({delay}, _thread.interrupt_main); t.start()\n"
                "try:\n    dfq_onnx_launcher.main()\nfinally:\n    t.cancel()")
        # SIGINT restored to its default in the child: a runner started under nohup or as a background
        # job inherits it ignored, and Python keeps an inherited SIG_IGN (the simulated signal is then
        # dropped, as a real one would be: what the CLI does with an ignored SIGINT, see README)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        stdout, stderr = p.communicate(timeout=120)
        codes.append(p.returncode)
        assert p.returncode in (0, 130), (delay, p.returncode, stderr)
        assert "Traceback" not in stderr, stderr
        if p.returncode == 130:
            assert len([ln for ln in stderr.splitlines() if ln.strip()]) == 1 and "interrupted" in stderr
            # no temporary file left; the output is absent, or whole (the interrupt landed after the
            # atomic rename, while the summary was printed): never a half-written model
            assert not [q for q in tmp_path.iterdir() if q.name.startswith(f".{out.name}")]
            if out.exists():
                onnx.checker.check_model(onnx.load(str(out)))
    assert 130 in codes, codes


def test_an_already_quantized_model_is_refused_with_the_reason(tmp_path, shipped_qdq):
    """Converting a QDQ (or integer) model said "nothing to quantize"; it now says what it is."""
    src = tmp_path / "q.onnx"
    onnx.save(shipped_qdq.model, src)
    before = digest(src)
    out = tmp_path / "qq.onnx"
    res = invoke("convert", src, out, "--calib", CALIB)
    assert_clean_failure(res, 1, "already quantized", out)
    assert "QuantizeLinear" in res.stderr and digest(src) == before


def test_format_c_writes_a_library_folder(tmp_path):
    """--format c: OUT becomes a folder with NAME.c, NAME.h and NAME_int.onnx, and the summary
    reports the arena and constant bytes."""
    out = tmp_path / "lib"
    res = invoke("convert", SHIPPED, out, "--calib", CALIB, "--format", "c", "--prefix", "digits", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["digits.c", "digits.h", "digits_int.onnx"]
    assert s["c_library"]["arena_bytes"] > 0 and s["c_library"]["weight_bytes"] > 0
    assert "int digits_run(" in (out / "digits.h").read_text()
    onnx.checker.check_model(onnx.load(out / "digits_int.onnx"))


def test_format_c_bad_input(tmp_path):
    """A prefix that is not a C identifier, an output that is a file, or a model with float
    islands: one line, non-zero exit, nothing written."""
    res = invoke("convert", SHIPPED, tmp_path / "lib", "--calib", CALIB, "--format", "c", "--prefix", "9lives")
    assert_clean_failure(res, 2, "not a C identifier", tmp_path / "lib")
    f = tmp_path / "taken.c"
    f.write_text("x")
    res = invoke("convert", SHIPPED, f, "--calib", CALIB, "--format", "c")
    assert_clean_failure(res, 2, "writes a folder")
    assert f.read_text() == "x"
    # a ReduceL2 is no module: a float island, which C cannot hold
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("ReduceL2", ["h"], ["y"], axes=[1], keepdims=1)],
                          "island", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          [onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    model = tmp_path / "island.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    res = invoke("convert", model, tmp_path / "lib2", "--calib", tmp_path / "c.npz", "--format", "c")
    assert_clean_failure(res, 1, "integer-only", tmp_path / "lib2")


def test_format_qonnx_writes_quant_nodes(tmp_path):
    out = tmp_path / "q.onnx"
    res = invoke("convert", SHIPPED, out, "--calib", CALIB, "--format", "qonnx", "-q")
    assert res.exit_code == 0, res.output
    m = onnx.load(out)
    assert any(n.op_type == "Quant" and n.domain == "qonnx.custom_op.general" for n in m.graph.node)
    assert not any(n.op_type == "QuantizeLinear" for n in m.graph.node)


def test_an_error_message_with_brackets_keeps_them(tmp_path):
    """Error lines go through rich: a path like "scan[bold].onnx" (or "[detect]") was read as markup
    and lost its brackets."""
    missing = tmp_path / "scan[bold].onnx"
    res = invoke("convert", missing, tmp_path / "o.onnx", "--calib", CALIB)
    assert_clean_failure(res, 1, "scan[bold].onnx: no such file")


def test_piped_summary_has_no_padding_and_says_what_happened(tmp_path):
    """Piped (CliRunner's stdout is not a terminal): no line ends in padding; float64 calibration
    data is cast and the summary says so; counts agree with their nouns; the exponent search states
    its rule; the time says what it counts."""
    calib = tmp_path / "c64.npz"
    np.savez(calib, input=np.load(CALIB)["input"][:32].astype(np.float64))
    res = invoke("convert", SHIPPED, tmp_path / "o.onnx", "--calib", calib)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines and not [ln for ln in lines if ln != ln.rstrip()], [ln for ln in lines if ln != ln.rstrip()][:3]
    text = " ".join(" ".join(ln.split()) for ln in lines)
    assert "32 samples; cast to the model's input type: input float64 -> float32" in text, text
    assert not re.search(r"\b1 (modules|tensors|samples|activation groups|activation fractions)\b", text), text
    assert "kept only if it rises by more than 0.1 dB" in text or "exponent search" not in text
    assert "s converting (reading the model to the quantized model)" in text


def test_usage_errors_exit_2_and_bare_command_shows_help(tmp_path):
    """Out-of-range counts are usage errors (exit 2 with click's usage line, like --weight-bits 9);
    `dfq-onnx` alone prints the help and succeeds."""
    for args in (("convert", SHIPPED, tmp_path / "o.onnx", "--calib", CALIB, "--num-samples", 0),
                 ("convert", SHIPPED, tmp_path / "o.onnx", "--calib", CALIB, "--batch-size", 0),
                 ("convert", SHIPPED, tmp_path / "o.onnx", "--calib", CALIB, "--weight-bits", 9),
                 ("validate", SHIPPED, SHIPPED, "--data", TEST, "--num-samples", 0)):
        res = invoke(*args)
        assert res.exit_code == 2 and "Usage:" in res.output + res.stderr, (args, res.exit_code, res.output)
        assert not (tmp_path / "o.onnx").exists()
    res = invoke()
    assert res.exit_code == 0 and "Commands:" in res.output and "convert" in res.output


@pytest.mark.parametrize("stage,code", [("start", 130)] + [(st.__name__, 130) for st in STAGES] +
                         [("converted", 130), ("written", 0), ("printed", 0)])
def test_sigint_at_each_stage(tmp_path, stage, code):
    """A real SIGINT sent to the process at each stage (DFQ_TEST_SIGINT_AT): before the output is in
    place, one line and 130, no output and no temporary file; once it is renamed into place the
    run has succeeded: exit 0 and a whole model."""
    out = tmp_path / "q.onnx"
    env = {**os.environ, "DFQ_TEST_SIGINT_AT": stage}
    p = subprocess.run([sys.executable, "-c", "import sys, dfq_onnx_launcher; sys.argv = ['dfq-onnx'] + sys.argv[1:]; "
                        "dfq_onnx_launcher.main()", "convert", str(SHIPPED), str(out), "--calib", str(CALIB)],
                       capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == code, (stage, p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    assert [q.name for q in tmp_path.iterdir()] == ([] if code else ["q.onnx"])
    if code:
        assert p.stderr.strip() == "error: interrupted"
    else:
        onnx.checker.check_model(onnx.load(str(out)))
