"""Big-model benchmark: conversion time and peak RSS on AlexNet, ZFNet-512 and VGG-19 against
onnxruntime's quantize_static, and the memory bound they are held to.

  python bench/big.py [--models alexnet,zfnet512,vgg19,gemm23500] [--runs 3] [--tools dfq-qdq,dfq-int,ort-minmax]
                      [--samples 32] [--build-only]
  python bench/big.py --render-only      # re-render the section of BENCHMARKS.md from results.json

Results go to bench/cache/big/results.json and the "## Big models: time and memory" section of
BENCHMARKS.md (render_section; bench/run.py keeps that section when it re-renders).

Models: onnx ships structure-only copies of the ONNX model zoo's bvlc_alexnet, zfnet512 and vgg19
(onnx/backend/test/data/light/light_*.onnx) whose weights are ConstantOfShape placeholders. Each
is materialized into a full-size float model under bench/cache/big/ (not committed): every
placeholder becomes a deterministic He-initialised float32 initializer (seeded per tensor name:
weights N(0, 2 / fan_in), biases N(0, 0.01^2)), the model is raised to opset 13, the batch
dimension is made dynamic ("N", and the Reshape before the classifier takes -1). VGG-19 is
about 550 MB, ZFNet-512 about 330 MB, AlexNet about 240 MB.

Calibration: SAMPLES (default 32) 224x224 photo crops from bench/cache/data/calib (bench/data.py;
random N(0, 1) arrays if that folder is absent), ImageNet-normalized, written once to
bench/cache/big/calibSAMPLES.npz. bench/convert_one.py loads that file into memory before its clock
starts and feeds the same arrays to both tools in batches of 8.

Each conversion runs alone in its own process (bench/convert_one.py): wall time and peak RSS
(VmHWM). The bound each conversion is held to is 1.5 x (model file + one batch's activations +
onnxruntime's session), where
  * model file: the float model's size on disk;
  * one batch's activations: the bytes of every intermediate tensor of the float model for one
    calibration batch (8 samples), from onnx shape inference, all of them at once (no reuse);
  * session: the resident memory an onnxruntime CPU session of the float model adds to a fresh
    process when it is created and runs one batch (VmHWM after minus VmRSS before, measured in
    its own process).
Figures are medians of RUNS runs (time and peak RSS alike), the tools' runs interleaved (run 1 of
each tool, then run 2, ...) so that each sees the same machine load; ratios to onnxruntime come from
the same invocation. The table also gives the peak against the float weights' bytes.

gemm23500 (write_gemm): one Gemm of 23,500 x 23,500 float32 weights, 2.2 GB, over protobuf's 2 GB,
its tensors in gemm23500.onnx.data; calibrated on SAMPLES seeded N(0, 1) rows
(gemm_calib32.npz). materialize(name, path, widen=4) writes a VGG-19 whose first two classifier
layers are 4x wider (over 2 GB, saved with external data) for the >2 GB load/save path; main()
does not build it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache" / "big"
LIGHT = {"alexnet": "light_bvlc_alexnet.onnx", "zfnet512": "light_zfnet512.onnx", "vgg19": "light_vgg19.onnx"}
BATCH = 8
SAMPLES = 32
PREPROCESS = "resize=256 size=224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 scale=1 layout=NCHW color=RGB"
TOOLS = ("dfq-qdq", "dfq-int", "ort-minmax")
GEMM = "gemm23500"
GEMM_WIDTH = 23_500  # "gemm23500": one Gemm of 23,500 x 23,500 float32 weights, 2.2 GB (over protobuf's 2 GB)


def _seed(name: str) -> int:
    return int.from_bytes(name.encode(), "little") % (2 ** 32)


def materialize(name: str, out: Path, widen: int = 1) -> Path:
    """The light model `name` with real (seeded He-init) weights, opset 13, dynamic batch.
    widen > 1 multiplies the width of the first two fully connected layers (the >2 GB model)."""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / LIGHT[name]
    m = onnx.load(str(light))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    widen_of = {}
    if widen > 1:  # fc6 and fc7 outputs (and fc7/fc8 inputs) widened
        for k, g in enumerate(gemms):
            widen_of[g.input[1]] = (widen if k < 2 else 1, widen if 0 < k else 1)
            widen_of[g.input[2]] = (widen if k < 2 else 1, 1)
    keep_nodes, new_inits = [], []
    for n in m.graph.node:
        if n.op_type != "ConstantOfShape":
            keep_nodes.append(n)
            continue
        shape = [int(d) for d in inits[n.input[0]]]
        out_w, in_w = widen_of.get(n.output[0], (1, 1))
        shape[0] *= out_w
        if len(shape) > 1:
            shape[1] *= in_w
        rng = np.random.default_rng(_seed(n.output[0]))
        if len(shape) == 1:
            v = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
        else:
            fan_in = int(np.prod(shape[1:]))
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        new_inits.append(numpy_helper.from_array(v.astype(np.float32), n.output[0]))
    reshape_shapes = {n.input[1] for n in keep_nodes if n.op_type == "Reshape"}
    for i in m.graph.initializer:
        if i.name.endswith("__SHAPE"):
            continue
        a = inits[i.name]
        if i.name in reshape_shapes:
            a = np.array([-1, int(a[1])], np.int64)
        new_inits.append(numpy_helper.from_array(a, i.name))
    init_names = {i.name for i in new_inits}
    inputs = [i for i in m.graph.input if i.name not in init_names and not i.name.endswith("__SHAPE")]
    for i in inputs:
        i.type.tensor_type.shape.dim[0].dim_param = "N"
    graph = helper.make_graph(keep_nodes, m.graph.name, inputs, list(m.graph.output), new_inits)
    for o in graph.output:
        o.type.tensor_type.shape.dim[0].dim_param = "N"
    model = helper.make_model(graph, opset_imports=list(m.opset_import), producer_name="dfq-onnx bench/big.py")
    model.ir_version = 4
    # the converter serializes the model: over 2 GB it cannot, so it converts the structure only
    from dfq_onnx.model_io import light_copy

    big = {t.name: t for t in model.graph.initializer if len(t.raw_data) > 1 << 20}
    model = version_converter.convert_version(light_copy(model, set(big)), 13)
    for t in model.graph.initializer:
        if t.name in big:
            t.CopyFrom(big[t.name])
    del model.graph.value_info[:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if widen > 1:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, out)
    return out


def write_gemm(out: Path, n: int = GEMM_WIDTH, seed: int = 0) -> Path:
    """A float model y = Gemm(x, W, b) (transB) with one n x n float32 weight, its tensors in
    OUT.data beside OUT (relative location): over 2 GB for n >= 23,170. The weight is generated
    and written a block of rows at a time (He-init, seeded), so building it holds one block, not
    the weight; the bias is N(0, 0.01^2) inside the model file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    rows = max(1, (64 << 20) // (4 * n))  # 64 MB blocks
    with open(data, "wb") as f:
        for k, r0 in enumerate(range(0, n, rows)):
            rng = np.random.default_rng([seed, k])
            block = rng.standard_normal((min(rows, n - r0), n), dtype=np.float32)
            block *= np.float32(np.sqrt(2.0 / n))
            block.tofile(f)
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[n, n])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", "0"), ("length", str(4 * n * n))):
        w.external_data.add(key=key, value=value)
    b = numpy_helper.from_array((np.random.default_rng([seed, -1 % 2 ** 32]).standard_normal(n) * 0.01)
                                .astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="dfq-onnx bench/big.py")
    m.ir_version = 8
    onnx.save_model(m, str(out))
    return out


def model_path(name: str) -> Path:
    p = CACHE / f"{name}.onnx"
    if not p.exists():
        print(f"building {p} ...", flush=True)
        write_gemm(p) if name == GEMM else materialize(name, p)
    return p


def model_bytes(model: Path) -> int:
    """The model file and its external data file (OUT.data or OUT.onnx.data) beside it."""
    return model.stat().st_size + sum(f.stat().st_size for f in (model.with_suffix(".data"), model.with_name(model.name + ".data"))
                                      if f.is_file())


def gemm_calib_path(samples: int = SAMPLES) -> Path:
    """SAMPLES random N(0, 1) rows for the one-Gemm model (seeded)."""
    p = CACHE / f"gemm_calib{samples}.npz"
    if not p.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(p, input=np.random.default_rng(0).standard_normal((samples, GEMM_WIDTH), dtype=np.float32))
    return p


def calib_path(samples: int = SAMPLES) -> Path:
    p = CACHE / f"calib{samples}.npz"
    if p.exists():
        return p
    sys.path.insert(0, str(ROOT))
    from dfq_onnx.calibration_data import DataSource, InputSpec

    folder = HERE / "cache" / "data" / "calib"
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= samples:
        spec = [InputSpec("input", np.dtype(np.float32), (None, 3, 224, 224))]
        x = np.concatenate([b["input"] for b in DataSource(str(folder), spec, num_samples=samples,
                                                           preprocess=PREPROCESS).batches(BATCH)])
    else:
        x = np.random.default_rng(0).standard_normal((samples, 3, 224, 224), dtype=np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(p, input=x.astype(np.float32))
    return p


def weights_bytes(model: Path) -> int:
    """The float model's initializers' bytes (from dims and types; nothing is loaded)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return sum(int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in m.graph.initializer)


def input_name(model: Path) -> str:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def activation_mb(model: Path, batch: int = BATCH) -> float:
    """Bytes of every intermediate tensor of the float model for one batch (shape inference)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    for i in m.graph.input:
        i.type.tensor_type.shape.dim[0].dim_value = batch
    m = onnx.shape_inference.infer_shapes(m)
    total = 0
    for vi in list(m.graph.value_info) + list(m.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            total += int(np.prod(dims)) * 4
    return total / 2 ** 20


SESSION_PROBE = """
import sys, numpy as np, onnxruntime as ort
def rss(k):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(k)) / 1024
x = np.load(sys.argv[2])['input'][:%d]
before = rss('VmRSS:')
s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
s.run(None, {s.get_inputs()[0].name: x})
print(rss('VmHWM:') - before)
""" % BATCH


def session_mb(model: Path, calib: Path) -> float:
    out = subprocess.run([sys.executable, "-c", SESSION_PROBE, str(model), str(calib)], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def convert(tool: str, model: Path, calib: Path, samples: int) -> dict:
    out = CACHE / f"{model.stem}.{tool}.onnx"
    cmd = [sys.executable, str(HERE / "convert_one.py"), tool, str(model), str(out), "--calib", str(calib),
           "--num-samples", str(samples), "--input-name", input_name(model),
           "--no-ort-pre-process"]  # time against quantize_static alone (its pre-processing more than doubles it)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """Date, CPU, its avx2 / avx512_vnni flags, versions and the measured commit."""
    import platform

    import onnx
    import onnxruntime

    import dfq_onnx

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
            "flags": [f for f in ("avx2", "avx512_vnni") if f in flags], "python": platform.python_version(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "dfq_onnx": dfq_onnx.__version__,
            "revision": rev or "?"}


SECTION = "## Big models: time and memory"
TOOL_NAMES = {"dfq-qdq": "dfq-onnx QDQ", "dfq-int": "dfq-onnx int", "ort-minmax": "ORT MinMax"}


def render_section(results: dict) -> list[str]:
    """The "## Big models: time and memory" section of BENCHMARKS.md, from results.json."""
    mc = results["machine"]
    data_mb = next((run["data_mb"] for r in results["models"].values() for t in r["tools"].values()
                    for run in t.get("runs", []) if "data_mb" in run), None)
    L = [SECTION, "",
         f"Generated by `{results['command'].strip()}` on {mc['date']}: {mc['cpu']}, {mc['cores']} cores "
         f"(CPU flags: {', '.join(mc['flags']) or 'neither avx2 nor avx512_vnni'}), onnx {mc['onnx']}, onnxruntime "
         f"{mc['onnxruntime']}, dfq-onnx {mc['dfq_onnx']} ({mc['revision']}); {results['seconds'] / 60:.1f} min. "
         "Models: the structures of the ONNX model zoo's AlexNet, ZFNet-512 and VGG-19 that onnx ships "
         "(light_*.onnx) with seeded He-init float weights, opset 13, dynamic batch (bench/big.py), and gemm23500: "
         "one Gemm of 23,500 x 23,500 float32 weights (2.2 GB, over protobuf's 2 GB, in external data; calibrated "
         "on seeded N(0, 1) rows). Both tools "
         f"calibrate on the same {results['samples']} photo crops (224x224, ImageNet-normalized), read into "
         "memory before the clock starts "
         + (f"({data_mb:.0f} MB) " if data_mb is not None else "")
         + f"and fed in batches of {results['batch']}: dfq-onnx `convert(model, arrays)` with default settings "
         + ("(QDQ, and `format=int`), " if any("dfq-int" in r["tools"] for r in results["models"].values()) else "(QDQ), ")
         + "onnxruntime `quantize_static` (QDQ, per-channel, int8, MinMax) with a "
         "CalibrationDataReader over the same arrays and the model file as it is (no `quant_pre_process`: with it "
         "onnxruntime takes 29 s and 4.5 GB on VGG-19, so this is the stricter comparison). Each "
         "conversion runs alone in a fresh process (bench/convert_one.py); time = the conversion from the call "
         "to the written file, peak RSS = the process's VmHWM (interpreter, imports and the calibration arrays "
         f"included); medians of {results['runs']} runs, the tools' runs interleaved. Bound = 1.5 x (model file + every intermediate tensor "
         f"of one {results['batch']}-sample batch + the memory an onnxruntime CPU session of the float model adds "
         "to a fresh process, created and run on one batch)."
         + (f" {results['note']}" if results.get("note") else ""), ""]
    for name, r in results["models"].items():
        t = r["tools"]
        ort = t.get("ort-minmax", {})
        wmb = r.get("weights_mb")
        L += [f"**{name}**: model file {r['file_mb']:.0f} MB"
              + (f" (float weights {wmb:.0f} MB)" if wmb else "")
              + f", one batch's activations {r['activations_mb']:.0f} MB, "
              f"onnxruntime session {r['session_mb']:.0f} MB; bound {r['bound_mb']:.0f} MB.", "",
              "| tool | time (s) | time / ORT MinMax | peak RSS (MB) | RSS / ORT | peak / float weights | bound (MB) | peak / bound |",
              "|---|---|---|---|---|---|---|---|"]
        for tool, x in t.items():
            label = TOOL_NAMES.get(tool, tool)
            if "error" in x:
                L.append(f"| {label} | failed: `{x['error'][:120]}` | – | – | – | – | {r['bound_mb']:.0f} | – |")
                continue
            rt = f"{x['seconds'] / ort['seconds']:.2f}x" if ort.get("seconds") else "–"
            rr = f"{x['peak_rss_mb'] / ort['peak_rss_mb']:.2f}x" if ort.get("peak_rss_mb") else "–"
            rw = f"{x['peak_rss_mb'] / wmb:.2f}x" if wmb else "–"
            L.append(f"| {label} | {x['seconds']:.1f} | {rt} | {x['peak_rss_mb']:.0f} | {rr} | {rw} | {r['bound_mb']:.0f} | "
                     f"{x['peak_rss_mb'] / r['bound_mb']:.2f}x |")
        L.append("")
    return L


def splice(text: str, section: list[str]) -> str:
    """BENCHMARKS.md text with its big-model section replaced by section (or inserted before the
    coverage section, else before the hand-written reading of the figures, else appended)."""
    ending = text[len(text.rstrip("\n")):] or "\n"
    lines = text.rstrip("\n").split("\n")
    block = section[:-1] if section and section[-1] == "" else section
    if SECTION in lines:
        i = lines.index(SECTION)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        new = lines[:i] + block + ([""] if j < len(lines) else []) + lines[j:]
    else:
        i = next((k for k, x in enumerate(lines) if x == "## Coverage"),
                 next((k for k, x in enumerate(lines) if x.startswith("## Reading the figures")), len(lines)))
        new = lines[:i] + ([""] if i == len(lines) else []) + block + [""] + lines[i:]
    return "\n".join(new).rstrip("\n") + ending


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="alexnet,zfnet512,vgg19,gemm23500")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="re-render BENCHMARKS.md's section from results.json")
    ap.add_argument("--note", default=None, help="a sentence about this run for the section (stored in results.json)")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.render_only:
        if args.note is not None:
            res = json.loads((CACHE / "results.json").read_text())
            (CACHE / "results.json").write_text(json.dumps({**res, "note": args.note}, indent=1))
        args.out.write_text(splice(args.out.read_text(), render_section(json.loads((CACHE / "results.json").read_text()))))
        return 0
    calib = calib_path(args.samples)
    results = {}
    info = {"machine": machine(), "runs": args.runs, "note": args.note, "samples": args.samples, "batch": BATCH,
            "command": "python bench/big.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    t0 = time.perf_counter()
    for name in args.models.split(","):
        model = model_path(name)
        if args.build_only:
            continue
        data = gemm_calib_path(args.samples) if name == GEMM else calib
        file_mb = model_bytes(model) / 2 ** 20
        weights_mb = weights_bytes(model) / 2 ** 20
        act, sess = activation_mb(model), session_mb(model, data)
        bound = 1.5 * (file_mb + act + sess)
        row = {"file_mb": file_mb, "weights_mb": weights_mb, "activations_mb": act, "session_mb": sess,
               "bound_mb": bound, "tools": {}}
        tools = args.tools.split(",")
        all_runs = {tool: [] for tool in tools}
        for _ in range(args.runs):  # interleaved: each run of every tool sees the same machine load
            for tool in tools:
                all_runs[tool].append(convert(tool, model, data, args.samples))
        for tool in tools:
            runs = all_runs[tool]
            ok = [r for r in runs if "error" not in r]
            row["tools"][tool] = {"seconds": statistics.median(r["seconds"] for r in ok),
                                  "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
                                  "runs": runs} if ok else runs[-1]
        ort_s = row["tools"].get("ort-minmax", {}).get("seconds")
        print(f"{name}: file {file_mb:.0f} MB, activations {act:.0f} MB, session {sess:.0f} MB, bound {bound:.0f} MB")
        for tool, r in row["tools"].items():
            if "error" in r:
                print(f"  {tool}: {r['error']}")
                continue
            ratio = f", {r['seconds'] / ort_s:.2f}x onnxruntime's time" if ort_s else ""
            print(f"  {tool}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"({r['peak_rss_mb'] / bound:.2f}x the bound){ratio}", flush=True)
        results[name] = row
        (CACHE / "results.json").write_text(json.dumps({**info, "seconds": time.perf_counter() - t0,
                                                        "models": results}, indent=1))
    if results:
        args.out.write_text(splice(args.out.read_text(), render_section(json.loads((CACHE / "results.json").read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
