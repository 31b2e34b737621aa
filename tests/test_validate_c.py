"""dfq-onnx validate on a C library folder (convert --format c): the library built with the system
compiler and run through ctypes. Oracles: the integer ONNX graph the library was generated with
(NAME_int.onnx under onnxruntime), the float model under onnxruntime, the labels; and the README's
example program, compiled on its own."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx import c_runner
from dfq_onnx.cli import main

from helpers import CALIB, ROOT, SHIPPED, TEST, run_ort

CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler (cc or gcc)")
N = 200  # test digits used (of 1,000): enough to see disagreements, quick to run


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def c_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "mnist_c"
    res = invoke("convert", SHIPPED, out, "--calib", CALIB, "--format", "c", "--prefix", "mnist", "--quiet")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def cache(tmp_path):
    """A private, empty build cache (XDG_CACHE_HOME) for one test."""
    d = tmp_path / "xdg"
    d.mkdir()
    return d


def validate_json(c_folder, cache, *extra, env=None):
    res = invoke("validate", SHIPPED, c_folder, "--data", TEST, "--num-samples", N, "--runs", 3, "--threads", 1,
                 "--json", *extra, env={"XDG_CACHE_HOME": str(cache), **(env or {})})
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.stderr.count("\n") == 1, res.stderr
    for s in needles:
        assert s in res.stderr, res.stderr
    return res.stderr


def test_c_outputs_equal_the_integer_graph_and_the_figures_match(c_folder, cache, test_data, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    x, y = test_data
    x, y = x[:N], y[:N]
    r = validate_json(c_folder, cache)
    # the C library's outputs are the integer graph's dequantized outputs, bit for bit
    integer = run_ort(c_folder / "mnist_int.onnx", {"input": x})[0]
    c_out = c_runner.load(c_folder).run([x])[0]
    assert c_out.dtype == np.float32 and c_out.shape == integer.shape == (N, 10)
    assert np.array_equal(c_out.view(np.uint32), integer.view(np.uint32))
    # so every figure follows from onnxruntime's outputs alone
    f = run_ort(SHIPPED, {"input": x})[0]
    f64, e = f.astype(np.float64), f.astype(np.float64) - integer.astype(np.float64)
    assert r["samples"] == N and r["output_kind"] == "classes"
    assert r["agreement_top1"] == pytest.approx(100 * np.mean(f.argmax(1) == integer.argmax(1)))
    assert r["float"]["top1"] == pytest.approx(100 * np.mean(f.argmax(1) == y))
    assert r["quant"]["top1"] == pytest.approx(100 * np.mean(integer.argmax(1) == y))
    assert r["sqnr_db"]["logits"] == pytest.approx(10 * np.log10(np.sum(f64 ** 2) / np.sum(e ** 2)), rel=1e-9)
    assert r["max_abs_error"]["logits"] == pytest.approx(float(np.max(np.abs(e))), rel=1e-9)
    assert r["latency_ms"]["float"] > 0 and r["latency_ms"]["quant"] > 0
    assert r["simulated"] is None
    c = r["c_library"]
    assert c["prefix"] == "mnist" and c["batch"] == 1 and not c["cached"]
    assert "-std=c99" in c["command"] and "-O3" in c["command"] and "-march=native" in c["command"]
    assert c["threads"] == 1 and r["threads"] == 1


def test_table_output_and_threads_report(c_folder, cache):
    res = invoke("validate", SHIPPED, c_folder, "--data", TEST, "--num-samples", 20, "--runs", 2, "--threads", 2,
                 env={"XDG_CACHE_HOME": str(cache)})
    assert res.exit_code == 0, res.output
    assert "C library (mnist)" in res.stdout and "top-1 agreement with float" in res.stdout
    lib = c_runner.read_folder(c_folder)
    if lib.threads_option:  # the library takes a thread count: it is passed to the compiler
        assert "-DMNIST_THREADS=2" in res.stdout and "2 threads" in res.stdout
    else:  # it runs on one thread, and the report says so
        assert "ran on one thread" in res.stdout and "1 thread" in res.stdout


def test_threads_flag_reaches_the_compiler_when_the_library_has_the_option(c_folder, tmp_path):
    """A library whose source mentions NAME_THREADS gets -DNAME_THREADS=N; one that does not, none."""
    lib = c_runner.read_folder(c_folder)
    if not lib.threads_option:
        assert not any("THREADS" in f for f in c_runner.build_flags(lib, 3))
    with_option = c_runner.CFolder(lib.folder, lib.prefix, lib.source + "\n/* MNIST_THREADS */\n", lib.header,
                                   lib.inputs, lib.outputs, True)
    assert "-DMNIST_THREADS=3" in c_runner.build_flags(with_option, 3)


def test_cached_build_is_reused_without_the_compiler(c_folder, cache, tmp_path):
    """The second run takes the shared object from the cache: the compiler (a logging wrapper
    named by CC) runs once; the library's folder is never written."""
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "logcc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{CC}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    before = {p.name: p.stat().st_mtime_ns for p in c_folder.iterdir()}
    first = validate_json(c_folder, cache, env={"CC": str(wrapper)})
    assert log.read_text().count("\n") == 1
    second = validate_json(c_folder, cache, env={"CC": str(wrapper)})
    assert log.read_text().count("\n") == 1, "the compiler ran again"
    assert not first["c_library"]["cached"] and second["c_library"]["cached"]
    assert first["agreement_top1"] == second["agreement_top1"]
    assert first["sqnr_db"] == second["sqnr_db"]
    assert {p.name: p.stat().st_mtime_ns for p in c_folder.iterdir()} == before
    built = list((cache / "dfq-onnx" / "c").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary build folder left
    # other flags (another thread count where it matters) or another source: another build
    edited = tmp_path / "edited"
    shutil.copytree(c_folder, edited)
    with open(edited / "mnist.c", "a") as f:
        f.write("\n/* edited */\n")
    validate_json(edited, cache, env={"CC": str(wrapper)})
    assert log.read_text().count("\n") == 2


def test_concurrent_runs_share_one_cache(c_folder, cache):
    """Two validate processes building the same library at once into one empty cache: both get a
    whole shared object (each compiles in a private folder and renames), one object is left."""
    cmd = [sys.executable, "-m", "dfq_onnx.cli", "validate", str(SHIPPED), str(c_folder), "--data", str(TEST),
           "--num-samples", "20", "--runs", "2", "--json"]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, errs, code in results:
        assert code == 0, errs
    a, b = (json.loads(out) for out, _, _ in results)
    assert a["sqnr_db"] == b["sqnr_db"] and a["agreement_top1"] == b["agreement_top1"]
    assert [p.suffix for p in (cache / "dfq-onnx" / "c").iterdir()] == [".so"]


def test_not_a_c_folder(c_folder, cache, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"XDG_CACHE_HOME": str(cache)}
    one_line_error(invoke("validate", SHIPPED, empty, "--data", TEST, env=env), "not a dfq-onnx C library folder")
    partial = tmp_path / "partial"  # NAME.c and NAME.h but no NAME_int.onnx
    partial.mkdir()
    for name in ("mnist.c", "mnist.h"):
        shutil.copy(c_folder / name, partial / name)
    one_line_error(invoke("validate", SHIPPED, partial, "--data", TEST, env=env), "not a dfq-onnx C library folder")
    foreign = tmp_path / "foreign"  # right file names, header not written by dfq-onnx
    foreign.mkdir()
    (foreign / "lib.h").write_text("int lib_run(void);\n")
    (foreign / "lib.c").write_text("int lib_run(void) { return 0; }\n")
    shutil.copy(c_folder / "mnist_int.onnx", foreign / "lib_int.onnx")
    one_line_error(invoke("validate", SHIPPED, foreign, "--data", TEST, env=env), "not a dfq-onnx C library folder")
    assert not (cache / "dfq-onnx").exists()  # nothing was built


def test_no_compiler_and_failing_compilers(c_folder, cache, tmp_path):
    args = ("validate", SHIPPED, c_folder, "--data", TEST, "--num-samples", 5, "--runs", 1)
    nothing = tmp_path / "empty_path"
    nothing.mkdir()
    one_line_error(invoke(*args, env={"XDG_CACHE_HOME": str(cache), "CC": None, "PATH": str(nothing)}),
                   "no C compiler found", "apt-get install gcc")
    one_line_error(invoke(*args, env={"XDG_CACHE_HOME": str(cache), "CC": "no-such-cc-here"}),
                   "no C compiler", "no-such-cc-here")
    one_line_error(invoke(*args, env={"XDG_CACHE_HOME": str(cache), "CC": "/bin/false"}),
                   "building the C library with false failed", "exit code 1")
    # a compiler error: its first error line, naming the library's folder (not a temporary one)
    broken = tmp_path / "broken"
    shutil.copytree(c_folder, broken)
    with open(broken / "mnist.c", "a") as f:
        f.write("\nthis is not C;\n")
    msg = one_line_error(invoke("validate", SHIPPED, broken, "--data", TEST, env={"XDG_CACHE_HOME": str(cache)}),
                         "building the C library with", "error")
    assert str(broken / "mnist.c") in msg.replace("\n", "")
    built = cache / "dfq-onnx" / "c"
    assert not built.exists() or not any(built.iterdir())  # no half-built object or build folder left


def test_model_whose_inputs_are_not_the_librarys(c_folder, cache, tmp_path):
    """A float model with another input name than the library's is refused."""
    g = helper.make_graph([helper.make_node("Flatten", ["image"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["logits"])],
                          "t", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 28, 28])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
                          [numpy_helper.from_array(np.ones((784, 10), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "other.onnx"))
    np.savez(tmp_path / "d.npz", image=np.zeros((4, 1, 28, 28), np.float32))
    one_line_error(invoke("validate", tmp_path / "other.onnx", c_folder, "--data", tmp_path / "d.npz",
                          env={"XDG_CACHE_HOME": str(cache)}), "input 'image'", "'input'")


def dynamic_model(path):
    """Conv-Relu-GlobalAveragePool-Flatten-Gemm over an input [n, 1, h, w] (dynamic spatial dims)."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1)],
        "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
         numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "g"),
         numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "gb")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_data_of_another_shape_than_the_library_was_generated_for(cache, tmp_path):
    """Dynamic spatial dims are fixed to the calibration sample's when the library is generated:
    data of that shape runs (and equals the integer graph), another shape is refused in one line."""
    rng = np.random.default_rng(1)
    dynamic_model(tmp_path / "dyn.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(16, 1, 8, 8)).astype(np.float32))
    res = invoke("convert", tmp_path / "dyn.onnx", tmp_path / "dyn_c", "--calib", tmp_path / "calib.npz",
                 "--format", "c", "--prefix", "dyn", "--quiet")
    assert res.exit_code == 0, res.output
    env = {"XDG_CACHE_HOME": str(cache)}
    good = rng.normal(size=(10, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "good.npz", x=good)
    res = invoke("validate", tmp_path / "dyn.onnx", tmp_path / "dyn_c", "--data", tmp_path / "good.npz",
                 "--runs", 1, "--json", env=env)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    f = run_ort(tmp_path / "dyn.onnx", {"x": good})[0].astype(np.float64)
    q = run_ort(tmp_path / "dyn_c" / "dyn_int.onnx", {"x": good})[0].astype(np.float64)
    assert r["samples"] == 10
    assert r["agreement_top1"] == pytest.approx(100 * np.mean(f.argmax(1) == q.argmax(1)))
    assert r["sqnr_db"]["y"] == pytest.approx(10 * np.log10(np.sum(f ** 2) / np.sum((f - q) ** 2)), rel=1e-9)
    np.savez(tmp_path / "bad.npz", x=rng.normal(size=(4, 1, 10, 10)).astype(np.float32))
    one_line_error(invoke("validate", tmp_path / "dyn.onnx", tmp_path / "dyn_c", "--data", tmp_path / "bad.npz",
                          env=env), "samples of shape [1, 10, 10]", "generated for [1, 8, 8]")


def readme_program() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deploying without onnxruntime"):]
    section = section[:section.index("\n## ", 1)]
    programs = [p for p in re.findall(r"```c\n(.*?)```", section, re.S) if "int main" in p]
    assert len(programs) == 1, "the README's C section should hold one whole program"
    return programs[0]


def test_readme_example_program_compiles_strictly_and_classifies(c_folder, tmp_path, test_data):
    x, y = test_data
    (tmp_path / "classify.c").write_text(readme_program())
    exe = tmp_path / "classify"
    cmd = [CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-I", str(c_folder), "-o", str(exe),
           str(tmp_path / "classify.c"), str(c_folder / "mnist.c"), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f = run_ort(SHIPPED, {"input": x[:8]})[0]
    for i in range(8):
        x[i].astype("<f4").tofile(tmp_path / "digit.f32")
        r = subprocess.run([str(exe), str(tmp_path / "digit.f32")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        m = re.fullmatch(r"top class: (\d+) \(logit -?[0-9.]+\)\n", r.stdout)
        assert m, r.stdout
        assert int(m.group(1)) == f[i].argmax(), (i, r.stdout)
    assert f[:8].argmax(1).tolist() == y[:8].tolist()  # these digits are classified right by float too
    # a short file is refused
    (tmp_path / "short.f32").write_bytes(b"\0" * 100)
    r = subprocess.run([str(exe), str(tmp_path / "short.f32")], capture_output=True, text=True)
    assert r.returncode == 1 and "expected 784" in r.stderr
