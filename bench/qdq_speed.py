"""QDQ latency against float under onnxruntime, per model, and the reason where QDQ is slower.

  python bench/qdq_speed.py                          # every model (10-20 minutes on 2 cores)
  python bench/qdq_speed.py --models ppocr_cls,mnist
  python bench/qdq_speed.py --render-only            # re-render the section from qdq_speed.json

Models: every model of the coverage zoo (bench/coverage.py MODELS, built or located under
bench/cache/coverage/ with its calibration and evaluation arrays), plus EfficientNet-Lite0 of
bench/zoo.py (crops made the way coverage.py makes them, preprocessed (p - 127) / 128) and the
shipped MNIST model (models/mnist_resnet.onnx, models/mnist_calib.npz, models/mnist_test.npz).

Per model:
 1. convert, each conversion in a fresh process (bench/coverage.py's --convert-one: the same calls as
    the coverage bench): dfq-onnx with default settings (dfq_onnx.convert, QDQ, layout "ort") and
    onnxruntime's quantizer (dfq_onnx.baseline.ort_quantize: quant_pre_process + quantize_static,
    QDQ, per-channel int8, MinMax), on the same calibration arrays.
 2. time float, dfq-onnx QDQ and onnxruntime-quantized in this one process: sessions created once per
    thread count (intra_op_num_threads 2, then 1; inter_op 1; default optimizations), batch 1 on the
    first evaluation sample, runs interleaved (float, dfq, ort, float, dfq, ort, ...), WARMUP rounds
    then RUNS timed rounds; the 10th percentile and the median of each. The machine is shared and
    noisy: compare the p10 of interleaved runs (all three see the same load).
 3. onnxruntime's optimized graph (SessionOptions.optimized_model_filepath) of each model: QLinearConv,
    QLinearMatMul, other QLinear* / int8 kernels, and float Conv / MatMul / Gemm left; kernel time by
    op type from onnxruntime's profiler (SessionOptions.enable_profiling, PROFILE_RUNS runs after 3
    that are not counted, intra_op_num_threads 2) for float and dfq-onnx QDQ. Where dfq/float > 1.0
    (p10, 2 threads) the reason is read off that profile (`reason`).
Results: bench/cache/qdq_speed.json; the "## QDQ speed" section of BENCHMARKS.md (bench/run.py keeps
it when it re-renders).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

CACHE = HERE / "cache" / "coverage"
WORK = HERE / "cache" / "qdq_speed"  # converted models (kept: --reuse skips converting again)
RESULTS = HERE / "cache" / "qdq_speed.json"
THREADS = (2, 1)
RUNS = 100
WARMUP = 5
PROFILE_RUNS = 30
TOOLS = ("float", "dfq-qdq", "ort-minmax")
LABEL = {"float": "float", "dfq-qdq": "dfq-onnx QDQ", "ort-minmax": "onnxruntime quantizer"}
EXTRA = ("efficientnet_lite0", "mnist")  # bench/zoo.py models not in the coverage zoo
INT8 = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization"}
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
FLOAT_CONV = {"Conv", "FusedConv", "NchwcConv", "Conv_nchwc"}
FLOAT_MM = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


def _coverage():
    """bench/coverage.py, imported from its file under another name (as bench/run.py does)."""
    if "bench_coverage" in sys.modules:
        return sys.modules["bench_coverage"]
    spec = importlib.util.spec_from_file_location("bench_coverage", HERE / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_coverage"] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- models and data

def model_names() -> list[str]:
    return list(_coverage().MODELS) + list(EXTRA)


def locate(name: str) -> tuple[Path, Path, Path, int, int]:
    """(model, calibration .npz, evaluation .npz, calibration samples, calibration batch)."""
    cov = _coverage()
    import zoo

    if name == "mnist":
        path = zoo.ZOO["mnist"].path(zoo.DEFAULT_CACHE)
        return path, ROOT / "models" / "mnist_calib.npz", ROOT / "models" / "mnist_test.npz", 128, 8
    if name == "efficientnet_lite0":
        m = cov.Model("efficientnet_lite0", "torch.onnx", "classifier (ImageNet)",
                      lambda cache: zoo.ZOO["efficientnet_lite0"].path(zoo.DEFAULT_CACHE),
                      lambda x: cov._nchw((x.astype(np.float32) - 127.0) / 128.0),
                      (224, 224), (224, 224), "NCHW [N,3,224,224]", calib_n=96, eval_n=16)
    else:
        m = cov.MODELS[name]
    path = m.locate(CACHE)
    calib, ev = cov.build_data(m, path, CACHE)
    return path, calib, ev, m.calib_n, cov.fixed_batch(path) or 8


def first_sample(model: Path, ev: Path) -> dict:
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    name = [i.name for i in g.input if i.name not in inits][0]
    with np.load(ev) as z:
        key = name if name in z.files else [k for k in z.files if k != "labels"][0]
        return {name: np.ascontiguousarray(z[key][:1])}


# --------------------------------------------------------------------------- measuring

def _options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return so


def _session(path: Path, so):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def timings(paths: dict[str, Path], feed: dict, threads: int, runs: int) -> dict:
    """p10 and median (ms) of each model: sessions created once, runs interleaved model by model."""
    sessions = {k: _session(p, _options(threads)) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(WARMUP + runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            if i >= WARMUP:
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"p10_ms": float(np.percentile(v, 10)), "median_ms": float(np.median(v)), "runs": len(v)}
            for k, v in times.items()}


def _conv_kind(node, cin: dict) -> str:
    """'depthwise' (group > 1 and one input channel per group), 'grouped' or 'dense'."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group <= 1:
        return "dense"
    return "depthwise" if cin.get(node.name) == 1 else "grouped"


def graph_and_profile(path: Path, feed: dict, work: Path, tag: str, runs: int) -> dict:
    """onnxruntime's optimized graph (op counts) and per-op-type kernel time (ms per run, profiler)."""
    import onnx

    so = _options(2)
    so.optimized_model_filepath = str(work / f"{tag}.opt.onnx")
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"{tag}.profile")
    sess = _session(path, so)
    for _ in range(3 + runs):
        sess.run(None, feed)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    del sess
    g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    Path(so.optimized_model_filepath).unlink()
    Path(so.optimized_model_filepath + ".data").unlink(missing_ok=True)
    ops = Counter(n.op_type for n in g.node)
    inits = {t.name: t for t in g.initializer}
    cin = {}  # conv node -> weight's input channels per group (1: depthwise)
    for n in g.node:
        if "Conv" in n.op_type:
            w = n.input[3] if n.op_type == "QLinearConv" else (n.input[1] if len(n.input) > 1 else "")
            if w in inits and len(inits[w].dims) >= 2:
                cin[n.name] = inits[w].dims[1]
    kinds = {n.name: (n.op_type, _conv_kind(n, cin) if "Conv" in n.op_type else None) for n in g.node}
    runs_ev = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                     key=lambda e: e["ts"])
    cutoff = runs_ev[2]["ts"] + runs_ev[2]["dur"] if len(runs_ev) > 3 else 0
    counted = sum(1 for e in runs_ev if e["ts"] > cutoff) or 1
    by_op: dict[str, float] = defaultdict(float)
    by_conv: dict[str, float] = defaultdict(float)  # "QLinearConv depthwise" -> ms per run
    on_8bit: set[str] = set()  # op types whose first input is 8-bit (they run on quantized data, not in float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] <= cutoff:
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1e3 / counted
        first = (e.get("args", {}).get("input_type_shape") or [{}])[0]
        if any(t in ("int8", "uint8") for t in first):
            on_8bit.add(op)
        node = e["name"][: -len("_kernel_time")]
        if node in kinds and kinds[node][1]:
            by_conv[f"{kinds[node][0]} {kinds[node][1]}"] += e["dur"] / 1e3 / counted
    qconv = ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0)
    fconv = sum(v for k, v in ops.items() if k in FLOAT_CONV)
    return {
        "ops": dict(sorted(ops.items())),
        "qlinear_conv": qconv, "qlinear_matmul": ops.get("QLinearMatMul", 0) + ops.get("MatMulInteger", 0)
        + ops.get("QGemm", 0),
        "other_qlinear": sum(v for k, v in ops.items() if k.startswith("QLinear") and k not in ("QLinearConv",
                                                                                              "QLinearMatMul")),
        "float_conv": fconv, "float_matmul_gemm": sum(v for k, v in ops.items() if k in FLOAT_MM),
        "conv_kinds": dict(Counter(f"{t} {k}" for t, k in kinds.values() if k)),
        "kernel_ms_per_run": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "conv_kernel_ms_per_run": dict(sorted(by_conv.items(), key=lambda kv: -kv[1])),
        "ops_on_8bit_data": sorted(on_8bit),
        "profiled_runs": counted,
    }


def source_convs(path: Path) -> int:
    import onnx

    return sum(n.op_type in ("Conv", "ConvInteger") for n in onnx.load(str(path), load_external_data=False).graph.node)


def reason(dfq: dict, flt: dict, convs: int) -> str:
    """Why dfq-onnx QDQ is slower than float, read off the two profiles (2 threads)."""
    kd, kf = dfq["kernel_ms_per_run"], flt["kernel_ms_per_run"]
    td, tf = sum(kd.values()) or 1e-9, sum(kf.values()) or 1e-9
    parts = []
    if dfq["float_conv"]:
        t = sum(v for k, v in kd.items() if k in FLOAT_CONV)
        parts.append(f"{dfq['float_conv']} of {convs} Conv stay float ({100 * t / td:.0f} % of the time)")
    mm = sum(v for k, v in kd.items() if k in FLOAT_MM)
    if dfq["float_matmul_gemm"] and mm / td > 0.05:
        parts.append(f"{dfq['float_matmul_gemm']} MatMul/Gemm stay float ({100 * mm / td:.0f} %)")
    q = sum(v for k, v in kd.items() if k in QDQ)
    if q / td > 0.08:
        n = sum(v for k, v in dfq["ops"].items() if k in QDQ)
        parts.append(f"{n} QuantizeLinear/DequantizeLinear left take {100 * q / td:.0f} %")
    other = {k: v for k, v in kd.items() if k not in INT8 | QDQ | FLOAT_CONV | FLOAT_MM and not k.startswith("QLinear")}
    on8 = set(dfq.get("ops_on_8bit_data", []))
    for is8 in (False, True):
        big = [(k, v) for k, v in sorted(other.items(), key=lambda kv: -kv[1])
               if v / td > 0.08 and (k in on8) == is8][:3]
        if big:
            names, share = "/".join(k for k, _ in big), 100 * sum(v for _, v in big) / td
            f = flt["kernel_ms_per_run"]
            same = sum(f.get(k, 0.0) for k, _ in big)
            parts.append(f"{names} on 8-bit data take {share:.0f} % ({sum(v for _, v in big):.2f} ms per run; "
                         f"{same:.2f} ms in float)" if is8 else f"float {names} between DQ and Q take {share:.0f} %")
    cd, cf = dfq["conv_kernel_ms_per_run"], flt["conv_kernel_ms_per_run"]
    for kind in ("depthwise", "grouped", "dense"):
        a, b = cd.get(f"QLinearConv {kind}", 0.0), sum(v for k, v in cf.items() if k.endswith(" " + kind))
        n = dfq["conv_kinds"].get(f"QLinearConv {kind}", 0)
        if n and b > 0 and a > 1.1 * b and a - b > 0.05 * tf:
            parts.append(f"{n} {kind} QLinearConv {a:.2f} ms vs float {b:.2f} ms per run")
    ql = {k: v for k, v in kd.items() if k.startswith("QLinear") and k not in ("QLinearConv", "QLinearMatMul")}
    if ql and sum(ql.values()) / td > 0.1:
        top = max(ql, key=ql.get)
        parts.append(f"{'/'.join(sorted(ql))} take {100 * sum(ql.values()) / td:.0f} % (largest {top})")
    if not parts:
        parts.append(f"kernels {td:.2f} vs {tf:.2f} ms per run, no single cause (largest: "
                     + ", ".join(f"{k} {100 * v / td:.0f} %" for k, v in list(kd.items())[:3]) + ")")
    return "; ".join(parts)


def bench_model(name: str, runs: int, reuse: bool, log) -> dict:
    cov = _coverage()
    path, calib, ev, n, batch = locate(name)
    feed = first_sample(path, ev)
    WORK.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": path.name, "input_shape": list(next(iter(feed.values())).shape),
                 "calib_samples": n, "convs": source_convs(path), "tools": {}}
    paths = {"float": path}
    for tool in TOOLS[1:]:
        out = WORK / f"{name}.{tool}.onnx"
        if reuse and out.exists():
            r = {"reused": True}
        else:
            out.unlink(missing_ok=True)
            r = cov.convert(tool, path, out, calib, n, batch)
        res["tools"][tool] = r
        if "error" in r:
            log(f"{name}: {tool} conversion failed: {r['error']}")
            continue
        try:
            _session(out, _options(1)).run(None, feed)
        except Exception as e:  # converted, but onnxruntime cannot run it
            r["error"] = "onnxruntime: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            log(f"{name}: {tool}: {r['error']}")
            continue
        paths[tool] = out
    res["latency"] = {}
    for t in THREADS:
        res["latency"][str(t)] = timings(paths, feed, t, runs)
        lat = res["latency"][str(t)]
        log(f"{name}: {t} thread(s): " + ", ".join(f"{k} p10 {v['p10_ms']:.2f} / med {v['median_ms']:.2f} ms"
                                                    for k, v in lat.items()))
    with tempfile.TemporaryDirectory() as tmp:
        res["graph"] = {k: graph_and_profile(p, feed, Path(tmp), k, PROFILE_RUNS) for k, p in paths.items()}
    lat2 = res["latency"][str(THREADS[0])]
    if "dfq-qdq" in lat2:
        ratio = lat2["dfq-qdq"]["p10_ms"] / lat2["float"]["p10_ms"]
        res["dfq_ratio_p10"] = ratio
        if ratio > 1.0:
            res["reason"] = reason(res["graph"]["dfq-qdq"], res["graph"]["float"], res["convs"])
        g = res["graph"]["dfq-qdq"]
        log(f"{name}: dfq/float {ratio:.2f}; QLinearConv {g['qlinear_conv']} of {res['convs']} Conv, float Conv "
            f"{g['float_conv']}" + (f"; {res['reason']}" if "reason" in res else ""))
    return res


# --------------------------------------------------------------------------- rendering

def _ms(lat: dict, tool: str) -> str:
    x = lat.get(tool)
    return "–" if x is None else f"{x['p10_ms']:.2f} ({x['median_ms']:.2f})"


def _ratio(lat: dict, tool: str) -> str:
    x = lat.get(tool)
    return "–" if x is None else f"{x['p10_ms'] / lat['float']['p10_ms']:.2f}"


def _failed(r: dict, tool: str) -> str:
    e = r.get("tools", {}).get(tool, {}).get("error")
    return f"{LABEL[tool]} failed: `{e[:120]}`" if e else ""


def render_section(res: dict) -> list[str]:
    mc = res["machine"]
    t0, t1 = THREADS
    L = ["## QDQ speed", "",
         f"Generated by `{res['command']}` on {mc['date']}: {mc['cpu']}, {mc['cores']} cores (CPU flags: "
         f"{', '.join(mc['flags']) or 'neither avx2 nor avx512_vnni'}), onnxruntime {mc['onnxruntime']}, "
         f"dfq-onnx {mc['dfq_onnx']} ({mc.get('dfq_onnx_revision', '?')}); {res['seconds'] / 60:.1f} min. "
         "Float, dfq-onnx QDQ (`dfq_onnx.convert` default settings: layout `ort`) and onnxruntime's quantizer "
         "(`quant_pre_process` + `quantize_static`, QDQ, per-channel int8, MinMax) on the same calibration arrays, "
         "timed in one process: sessions created once, default optimizations, batch 1 on an evaluation sample, "
         f"runs interleaved float, dfq, ORT, float, ... ({WARMUP} warm-up rounds, {res['runs']} timed). The "
         "machine is shared (other builds ran during the measurement): the figures are the 10th percentile "
         "(median in brackets) in ms, ratios of 10th percentiles to float. *int8 convs* = QLinearConv in "
         "onnxruntime's optimized graph of the dfq-onnx model / Conv in the float model (other int8 kernels "
         "and float linear ops left in the JSON). *Reason* (dfq/float above 1.0 at "
         f"{t0} threads): onnxruntime's profiler, kernel time by op type over {PROFILE_RUNS} runs of the dfq-onnx "
         "and the float model" + (f" (graphs and profiles redone on the same converted models by "
                                   f"`{res['reprofiled']['command']}` on {res['reprofiled']['date']})"
                                   if res.get("reprofiled") else "") + ". Results: bench/cache/qdq_speed.json.", "",
         f"{t0} threads (intra_op_num_threads={t0}):", "",
         "| model | float ms | dfq QDQ ms | dfq / float | ORT-quantized ms | ORT / float | int8 convs / all convs "
         "| reason (dfq / float > 1.0) |",
         "|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        if "error" in r:
            L.append(f"| {name} | – | – | – | – | – | – | not measured: `{r['error'][:160]}` |")
            continue
        lat = r["latency"][str(t0)]
        g = r["graph"].get("dfq-qdq")
        convs = "–" if g is None else f"{g['qlinear_conv']} / {r['convs']}"
        note = "; ".join(x for x in [r.get("reason", ""), _failed(r, "dfq-qdq"), _failed(r, "ort-minmax")] if x)
        L.append("| " + " | ".join([name, _ms(lat, "float"), _ms(lat, "dfq-qdq"), _ratio(lat, "dfq-qdq"),
                                    _ms(lat, "ort-minmax"), _ratio(lat, "ort-minmax"), convs,
                                    note.replace("|", "\\|")]) + " |")
    L += ["", f"{t1} thread (intra_op_num_threads={t1}), same sessions setup:", "",
          "| model | float ms | dfq QDQ ms | dfq / float | ORT-quantized ms | ORT / float |", "|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        if "error" in r:
            continue
        lat = r["latency"][str(t1)]
        L.append("| " + " | ".join([name, _ms(lat, "float"), _ms(lat, "dfq-qdq"), _ratio(lat, "dfq-qdq"),
                                    _ms(lat, "ort-minmax"), _ratio(lat, "ort-minmax")]) + " |")
    if res.get("findings"):
        L += ["", res["findings"]]
    return L + [""]


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(model_names()))
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--reuse", action="store_true", help="reuse converted models in bench/cache/qdq_speed/")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--reprofile", action="store_true",
                    help="redo only step 3 (optimized graph, profile, reason) on the converted models of the last run")
    args = ap.parse_args(argv)
    if args.reprofile:
        res = json.loads(RESULTS.read_text())
        for name, r in res["models"].items():
            if "latency" not in r:
                continue
            path, _, ev, _, _ = locate(name)
            feed = first_sample(path, ev)
            paths = {"float": path, **{t: WORK / f"{name}.{t}.onnx" for t in TOOLS[1:] if "error" not in r["tools"][t]}}
            with tempfile.TemporaryDirectory() as tmp:
                r["graph"] = {k: graph_and_profile(p, feed, Path(tmp), k, PROFILE_RUNS) for k, p in paths.items()}
            r.pop("reason", None)
            if r.get("dfq_ratio_p10", 0) > 1.0:
                r["reason"] = reason(r["graph"]["dfq-qdq"], r["graph"]["float"], r["convs"])
                print(f"{name}: {r['reason']}", file=sys.stderr, flush=True)
        res["reprofiled"] = {"date": datetime.date.today().isoformat(), "command": "python bench/qdq_speed.py --reprofile"}
        RESULTS.write_text(json.dumps(res, indent=1))
    elif not args.render_only:
        names = [n.strip() for n in (args.models or ",".join(model_names())).split(",") if n.strip()]
        bad = [n for n in names if n not in model_names()]
        if bad:
            ap.error(f"unknown model(s) {bad}; choose from {model_names()}")
        res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
        mc = _coverage().machine()
        res.update(machine=mc, runs=args.runs, threads=list(THREADS),
                   command="python bench/qdq_speed.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                          if (argv if argv is not None else sys.argv[1:]) else ""))
        print("CPU flags:", " ".join(mc["flags"]), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        models = dict(res.get("models", {}))
        for n in names:
            t1 = time.perf_counter()
            try:
                models[n] = bench_model(n, args.runs, args.reuse, lambda s: print(s, file=sys.stderr, flush=True))
            except Exception as e:  # not built, or float does not run
                models[n] = {"error": (str(e).strip().splitlines() or [type(e).__name__])[0]}
                print(f"{n}: {models[n]['error']}", file=sys.stderr, flush=True)
            models[n]["bench_seconds"] = time.perf_counter() - t1
            res["models"] = {k: models[k] for k in model_names() if k in models}
            res["seconds"] = sum(v.get("bench_seconds", 0) for v in res["models"].values())
            RESULTS.write_text(json.dumps(res, indent=1))
        print(f"{len(names)} models in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    res = json.loads(RESULTS.read_text())
    args.out.write_text(_coverage().splice(args.out.read_text(), render_section(res), "## QDQ speed"))
    print(f"wrote {args.out} and {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
