"""Command line: parse, call the API, print. No logic of its own."""
from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import click
from rich.markup import escape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import QuantConfig
from .errors import DfqError

class _Out:
    """stdout for tables: rich on a terminal; for pipes and files, the same text rendered at 120
    columns (no wrap at 80) with every line's trailing padding removed."""

    def __init__(self):
        self.console = Console(highlight=False, soft_wrap=True)

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal

    def print(self, *objects, **kw) -> None:
        if self.console.is_terminal:
            self.console.print(*objects, **kw)
            return
        render = Console(highlight=False, soft_wrap=True, width=120, record=True, file=io.StringIO(),
                         color_system=None)
        render.print(*objects, **kw)
        click.echo("\n".join(line.rstrip() for line in render.export_text().splitlines()))


out = _Out()
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _n(count: int, word: str, plural: str | None = None) -> str:
    """'1 module', '2 modules' (plural: the plural form where it is not word + s)."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _fail(msg: str, code: int = 1) -> None:
    """One line on stderr: the message as written (escaped: "[detect]" or a path in brackets is
    text, not rich markup)."""
    err.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False, emoji=False)
    sys.exit(code)


def _maybe_json(obj: dict, as_json: bool) -> bool:
    """Print obj as one JSON object if asked; say whether it was printed."""
    if as_json:
        click.echo(json.dumps(obj, indent=2))
    return as_json


_state = {"output_written": False}  # set once the output is renamed into place (interrupts then exit 0)


def _checkpoint(stage: str) -> None:
    """Tests interrupt the command at named stages: with DFQ_TEST_SIGINT_AT=stage, send SIGINT to
    this process here (start, each of pipeline.STAGES by name as it begins, converted, written,
    printed)."""
    if os.environ.get("DFQ_TEST_SIGINT_AT") == stage:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs at the next bytecode boundary


def _restore_sigint() -> None:
    """Python's KeyboardInterrupt handler for SIGINT again, after the heavy imports (a library may
    have reset it to the default action, which ends the process without a word); an ignored SIGINT
    (nohup, background job) stays ignored."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _write(save, *args) -> None:
    """Run save(*args) (temporary file, then rename) with SIGINT held off until the output is in
    place and marked written: an interrupt during the write takes effect after it, as a success."""
    mask = hasattr(signal, "pthread_sigmask")
    if mask:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        save(*args)
        _state["output_written"] = True
    finally:
        if mask:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def handle_errors(fn):
    """One-line message and exit 1 for any failure; the traceback only with --debug."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DfqError as e:
            if debug:
                raise
            _fail(str(e).splitlines()[0] if str(e) else "failed")
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if _state["output_written"]:  # the output is in place: the run has succeeded
                sys.exit(0)
            _fail("interrupted", 130)  # the shell's code for SIGINT
        except Exception as e:  # an internal error: still one line unless --debug
            if debug:
                raise
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {text} (run with --debug for the traceback)")
    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


def _cluster_options(fn):
    """--workers N and --ray ADDRESS (convert and validate): see dfq_onnx/distributed.py."""
    fn = click.option("--ray", "ray_address", metavar="ADDRESS", default=None,
                      help="Join the Ray cluster at ADDRESS (`ray start --head` on one node) instead; with "
                           "--workers, that many workers (default: one per CPU of the cluster).")(fn)
    return click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Run on a local Ray cluster of N worker processes, each reading its share of the "
                             "data (pip install 'dfq-onnx[ray]'); the result is the same as in one process.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="dfq-onnx")
@click.pass_context
def main(ctx):
    """dfq-onnx: quantize ONNX models with power-of-two scales (requantization by shifts).

    Linear layers are merged with their bias, residual Add and activation into unified modules
    with one requantization each; activations (in any spelling) become 256-entry lookup tables,
    ops on two activations an integer product or sum with one rounding; every scale is an exact
    power of two.
    """
    if ctx.invoked_subcommand is None:  # bare `dfq-onnx`: the help, and success
        click.echo(ctx.get_help())


@main.command()
@click.argument("input_model", metavar="IN.onnx", type=click.Path(dir_okay=False))
@click.argument("output_model", metavar="OUT.onnx", type=click.Path())
@click.option("--calib", "calib", metavar="DATA",
              help="Calibration data: a .npz keyed by input name (N x ...), a folder of .npy files, "
                   "or a folder of images (see --preprocess); or `none` for data-free mode (ranges "
                   "from BatchNorm statistics, random inputs where there are none; no bias "
                   "correction; check the result with validate). Required unless --float-only.")
@click.option("--num-samples", default=128, show_default=True, type=click.IntRange(min=1), help="Calibration samples to use.")
@click.option("--batch-size", default=QuantConfig.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Calibration batch size (memory grows with it; speed barely does).")
@click.option("--preprocess", metavar="SPEC",
              help='Image preprocessing, e.g. "resize=256 size=224 mean=0.485,0.456,0.406 '
                   'std=0.229,0.224,0.225 scale=1 layout=NCHW color=RGB". Default: resize to the '
                   "model's input size, pixels in [0, 1], layout from the input shape, RGB.")
@click.option("--method", type=click.Choice(["mse", "max"]), default="mse", show_default=True,
              help="Exponent choice: mse = least expected squared error among the fractional length "
                   "that covers the calibrated maximum and the next one (an activation is clipped by at most "
                   "one bit); max = no clipping.")
@click.option("--per-tensor", is_flag=True, help="One weight exponent per tensor (default: per output channel).")
@click.option("--weight-bits", default=8, show_default=True, type=click.IntRange(2, 8), help="Weight bits.")
@click.option("--act-bits", default="8", show_default=True, type=click.Choice(["8", "16"]),
              help="Activation bits (16: int16/uint16 QuantizeLinear, opset 21, QDQ only; onnxruntime then runs "
                   "those layers in float between the Q/DQ pairs).")
@click.option("--target", type=click.Choice(["ort", "ort-x86-vnni", "ort-x86", "ort-arm", "hw"]), default="ort",
              show_default=True,
              help="Where the model will run. ort: onnxruntime on any CPU, safe everywhere: on x86 without "
                   "VNNI (AVX2) its u8 x s8 kernels sum pairs of products in int16 (adjacent input channels of one "
                   "kernel tap; depthwise convolutions are exact), so each output channel with a pair of same-sign "
                   "weight codes that could saturate that gets a fraction one bit lower (repeated until none can); "
                   "ort-x86 does the same. "
                   "ort-x86-vnni, ort-arm: no limit (wrong results on AVX2-only x86 possible). hw: "
                   "integer hardware, the integer-only graph (--format int, whose u8 x u8 kernels need no limit).")
@click.option("--format", "fmt", type=click.Choice(["qdq", "int", "c", "qonnx"]), default=None,
              help="[default: qdq; int for --target hw] qdq: QuantizeLinear/DequantizeLinear around float ops, for onnxruntime's int8 kernels; "
                   "int: integer-only graph at opset 19 (u8 x u8 ConvInteger/MatMulInteger into int32, int32 "
                   "bias, one dfq.RoundingShift per module: round half to even like QuantizeLinear, so it "
                   "equals the QDQ graph of --layout unified wherever float32 is exact; activations as table "
                   "Gathers, integer LayerNorm and Softmax), float input and output. "
                   "c: OUT is a folder that gets a C99 library NAME.c + NAME.h (int8/int32 arithmetic, no "
                   "malloc: a static arena; NAME_run on codes, NAME_run_float on floats; shapes fixed by the "
                   "first calibration sample, batch 1) and NAME_int.onnx, the integer graph it equals bit "
                   "for bit; every op must have an integer form. "
                   "qonnx: the QDQ graph with QONNX Quant nodes (FINN, hls4ml, Concrete ML).")
@click.option("--prefix", default="model", show_default=True, metavar="NAME",
              help="--format c: the library's name (NAME.c, NAME.h, NAME_run); a C identifier.")
@click.option("--layout", type=click.Choice(["ort", "unified"]), default="ort", show_default=True,
              help="QDQ only. ort: the linear result entering a residual Add gets its own QuantizeLinear, "
                   "so onnxruntime can run that convolution as QLinearConv (and the Add as QLinearAdd "
                   "where its kernels allow; one more requantization point per residual module); unified: one requantization per module, as in the integer graph "
                   "(onnxruntime then runs residual convs in float).")
@click.option("--no-align", is_flag=True,
              help="Do not align ranges: by default a tensor between two convolutions is scaled by a "
                   "factor in [1, 2) folded into their weights, so its best clipping threshold falls "
                   "exactly on a power-of-two scale.")
@click.option("--no-bias-correction", is_flag=True,
              help="Do not correct biases: by default the mean error each module adds by quantization "
                   "(measured per output channel on 16 calibration samples, simulated) is folded into "
                   "its bias.")
@click.option("--equalize", is_flag=True,
              help="Cross-layer equalization of Conv -> Relu/LeakyRelu/none -> Conv pairs (per-channel factors "
                   "moved between the two weights; Relu6 pairs are left alone). Mostly useful with --per-tensor.")
@click.option("--search-exponents", is_flag=True,
              help="The full output-aware search instead of the fast one: try each activation group's "
                   "neighbouring fractions in the simulated model and keep those that raise the output SQNR on "
                   "64 calibration samples (slow: one onnxruntime run per trial; about a minute on MobileNetV2).")
@click.option("--effort", type=click.Choice(["fast", "default", "max"]), default="default", show_default=True,
              help="fast: histogram exponents, weights rounded to nearest. default: the fast output-aware "
                   "exponent search (each activation fraction judged at the outputs of the modules that read it, "
                   "kept if the model output on 32 other calibration samples confirms it) and second-order (GPTQ) "
                   "rounding below 8 weight bits or with --sparsity. max: second-order rounding at every width (in "
                   "4 stages, columns in activation order) plus the full --search-exponents (minutes on ImageNet "
                   "models).")
@click.option("--rounding", type=click.Choice(["auto", "gptq", "nearest"]), default="auto", show_default=True,
              help="Weight rounding: gptq (error feedback through each layer's input Hessian, measured on 32 "
                   "calibration samples of the simulated model), nearest, or auto (what --effort says).")
@click.option("--sparsity", metavar="N:M|FRACTION",
              help="Prune weights to zero: N of every M consecutive input channels (e.g. 2:4) or a fraction of "
                   "each output channel (e.g. 0.5); jointly with rounding under gptq (SparseGPT), by magnitude "
                   "under nearest. Depthwise convolutions, and layers whose input channels are not a multiple of "
                   "M, stay dense.")
@click.option("--keep-float", "keep_float", multiple=True, metavar="NAME",
              help="Leave this unified module (named by its Conv/Gemm/pool node; see inspect --sensitivity) "
                   "in float; repeatable. It is reported as a float island.")
@click.option("--override", "overrides", multiple=True, metavar="NAME=wB[aA]",
              help="Precision of one unified module: weight bits B (2..8) and optionally the bits A (8 or 16) "
                   "of its output, e.g. /conv1/Conv=w8a16; repeatable.")
@click.option("--max-drop", type=float, metavar="X",
              help="Raise the most sensitive modules to 8-bit weights and 16-bit outputs until top-1 agreement "
                   "with float on the calibration samples drops by at most X points (QDQ only).")
@click.option("--min-sqnr", type=float, metavar="DB",
              help="As --max-drop, for any model (detectors, segmenters, regressors): raise modules until the "
                   "smallest SQNR of the model's outputs against float on the calibration samples is at least "
                   "DB (QDQ only).")
@click.option("--float-only", is_flag=True,
              help="Write the fused float model (BatchNorm folded, canonical form) instead; no --calib needed.")
@_cluster_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@handle_errors
def convert(input_model, output_model, calib, num_samples, batch_size, preprocess, method, per_tensor,
            weight_bits, act_bits, target, fmt, layout, no_align, no_bias_correction, equalize, search_exponents,
            effort, rounding, sparsity, keep_float, overrides, max_drop, min_sqnr,
            float_only, as_json, quiet, prefix, workers, ray_address):
    """Quantize IN.onnx to a power-of-two model OUT.onnx (W8A8 by default; QDQ, integer-only, QONNX,
    or with --format c a folder OUT holding a C99 library)."""
    from .distributed import maybe_cluster
    from .model_io import check_output_path, save_library, save_model
    from .pipeline import fuse, run

    _restore_sigint()
    _checkpoint("start")

    if fmt == "c":
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
            raise click.UsageError(f"--prefix {prefix!r}: not a C identifier")
        if Path(output_model).exists() and not Path(output_model).is_dir():
            raise click.UsageError(f"{output_model}: --format c writes a folder, and this is a file")
        if max_drop is not None or min_sqnr is not None:
            raise click.UsageError(f"{'--max-drop' if max_drop is not None else '--min-sqnr'} raises modules to "
                                   "16-bit outputs: it needs --format qdq")
    else:
        check_output_path(output_model, input_model)
    if float_only:
        model = fuse(input_model)
        _write(save_model, model, output_model, input_model)
        if not quiet:
            out.print(f"wrote fused float model {output_model}")
        return
    if not calib:
        raise click.UsageError("calibration data is required: pass --calib DATA (a .npz keyed by input "
                               "name, a folder of .npy files or of images), --calib none (data-free), "
                               "or --float-only")
    fmt = fmt or ("int" if target == "hw" else "qdq")
    weight_overrides, act_overrides = _parse_overrides(overrides)
    config = QuantConfig(weight_bits=weight_bits, act_bits=int(act_bits), per_channel=not per_tensor,
                         method=method, num_samples=num_samples, batch_size=batch_size, format=fmt, target=target,
                         layout=layout, align=not no_align, bias_correction=not no_bias_correction,
                         keep_float=tuple(keep_float), overrides=weight_overrides, act_overrides=act_overrides,
                         search_exponents=search_exponents, equalize=equalize, effort=effort, rounding=rounding,
                         sparsity=sparsity, prefix=prefix)
    if max_drop is not None and min_sqnr is not None:
        raise click.UsageError("give --max-drop or --min-sqnr, not both")
    raising = "--max-drop" if max_drop is not None else "--min-sqnr" if min_sqnr is not None else None
    if raising and (workers or ray_address):
        raise click.UsageError(f"{raising} runs in one process: drop --workers / --ray")
    show = not quiet and err.is_terminal
    with maybe_cluster(workers, ray_address) as cluster, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=err, transient=True, disable=not show) as bar:
        task = bar.add_task("calibrating", total=None)

        def searching(i: int, n: int) -> None:
            bar.update(task, description="searching exponents", completed=i, total=n)

        def rounding_stage(i: int, n: int) -> None:
            bar.update(task, description="rounding weights", completed=i, total=n)

        def staged(name: str) -> None:  # pipeline.STAGES, by name
            bar.update(task, description=name.replace("_", " "))
            _checkpoint(name)
        if raising is None:
            result = run(input_model, calib, config, preprocess=preprocess,
                         on_start=lambda n: bar.update(task, total=n),
                         on_batch=lambda n: bar.advance(task, n), on_search=searching,
                         on_round=rounding_stage, on_stage=lambda name: staged(name), cluster=cluster)
        else:
            from .mixed_precision import convert_raised

            result, search = convert_raised(input_model, calib, config, max_drop=max_drop, min_sqnr=min_sqnr,
                                            preprocess=preprocess, on_step=lambda msg: bar.update(task, description=msg))
            result.facts["max_drop_search" if max_drop is not None else "min_sqnr_search"] = search
    _checkpoint("converted")
    if result.library is not None:
        _write(save_library, result.library, result.model, output_model, input_model)
    else:
        _write(save_model, result.model, output_model, input_model)
    _checkpoint("written")
    if "bn_derived" in result.facts:
        err.print("[bold yellow]warning:[/] data-free mode: activation ranges are estimated from BatchNorm "
                  f"statistics ({result.facts['bn_derived']} tensors) and random N(0, 1) inputs "
                  f"({result.facts['random']} tensors), not measured; check accuracy with `dfq-onnx validate` "
                  "on real data", markup=True, highlight=False)
    if quiet:
        return
    summary = _summary(result, config, input_model, output_model)
    if not _maybe_json(summary, as_json):
        _print_summary(summary)
    _checkpoint("printed")


def _parse_overrides(items) -> tuple[tuple, tuple]:
    """NAME=wB or NAME=wBaA -> (((NAME, B), ...), ((NAME, A), ...))."""
    weights, acts = [], []
    for item in items:
        m = re.fullmatch(r"(.+)=w(\d+)(?:a(\d+))?", item)
        if m is None:
            raise click.UsageError(f"--override {item!r}: expected NAME=wB or NAME=wBaA, e.g. /conv1/Conv=w4a8")
        if m.group(3) is not None and m.group(3) not in ("8", "16"):
            raise click.UsageError(f"--override {item!r}: activation bits must be 8 or 16")
        weights.append((m.group(1), int(m.group(2))))
        if m.group(3) is not None:
            acts.append((m.group(1), int(m.group(3))))
    return tuple(weights), tuple(acts)


def _summary(result, config, inp, outp) -> dict:
    mods = [m for m in result.modules if m["kind"] in ("linear", "pool")]
    by_op = Counter(m["op"] for m in mods)
    tables = Counter(m["op"] for m in result.modules if m["kind"] == "table")
    others = Counter(m["op"] for m in result.modules if m["kind"] not in ("linear", "pool", "table"))
    return {
        "input": str(inp), "output": str(outp), "format": config.format, "target": config.target,
        "weight_bits": config.weight_bits, "act_bits": config.act_bits,
        "per_channel": config.per_channel, "method": config.method, "effort": config.effort,
        "rounding": "gptq" if config.gptq else "nearest", "sparsity": config.sparsity,
        "overrides": {n: f"W{b}" + "".join(f"A{a}" for m, a in config.act_overrides if m == n)
                      for n, b in config.overrides},
        "modules": len(mods), "modules_by_op": dict(by_op),
        "tables": sum(tables.values()), "tables_by_function": dict(tables),
        "activation_modules": dict(others),
        "residual_modules": sum(1 for m in mods if m["residual"]),
        "requant_points": result.requant_points, "requant_by_kind": result.requant_by_kind,
        "per_layer_requant_points": result.per_layer_requant_points,
        "float_islands": result.float_ops, "calibration_samples": result.samples,
        "seconds": round(result.seconds, 3), "facts": result.facts,
        "c_library": None if result.library is None else {
            "files": f"{result.library.prefix}.c, {result.library.prefix}.h", "prefix": result.library.prefix,
            **{k: result.library.facts[k] for k in ("steps", "arena_bytes", "const_bytes", "weight_bytes")}},
    }


def _print_summary(s: dict) -> None:
    from .passes.search_exponents import LOCAL_CONFIRM_DB

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    ops = ", ".join(f"{n} {op}" for op, n in s["modules_by_op"].items())
    t.add_row("unified modules", f"{s['modules']} ({ops}; {s['residual_modules']} with a residual Add)" if s["modules"]
              else "0 (no Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
    if s["tables"]:
        top = sorted(s["tables_by_function"].items(), key=lambda kv: -kv[1])
        t.add_row("lookup tables", f"{s['tables']} (" + ", ".join(f"{n} {op}" for op, n in top[:4]) +
                  (", ..." if len(top) > 4 else "") + ")")
    if s["activation_modules"]:
        t.add_row("two-activation / norm modules",
                  ", ".join(f"{n} {op}" for op, n in sorted(s["activation_modules"].items())))
    k = s["requant_by_kind"]
    t.add_row("requantization points", f"{s['requant_points']} ({k['input']} graph input, {k['module']} module "
                                       f"output, {k['table']} table, {k['residual']} before a residual Add, "
                                       f"{k['island']} float-island boundary); a per-layer scheme needs "
                                       f"{s['per_layer_requant_points']}")
    fi = s["float_islands"]
    norms = s["facts"].get("float_normalizations", 0)
    t.add_row("float islands", (", ".join(f"{n} {op}" for op, n in sorted(fi.items())) if fi else "none") +
              (f" ({norms} normalization{'s' if norms != 1 else ''} written out in a spelling with no integer form, "
               "kept float whole: only its input and output are rounded)" if norms else ""))
    if s["facts"].get("float32_twin"):
        tw = s["facts"]["float32_twin"]
        kinds = " and ".join(tw["types"])
        t.add_row("float types", f"the model computes in {kinds}: quantized as its float32 twin, with "
                                 f"{tw['casts']} Casts keeping its {kinds} inputs and outputs")
    t.add_row("format", {"int": "integer-only (dfq.RoundingShift requantization)", "qonnx": "QONNX (Quant nodes)",
                         "c": "C99 library"}.get(s["format"], "QDQ"))
    lib = s.get("c_library")
    if lib:
        t.add_row("C library", f"{lib['files']}: {lib['steps']} steps; arena {lib['arena_bytes']:,} bytes (static, "
                               f"every activation), constants {lib['const_bytes']:,} bytes of which "
                               f"{lib['weight_bytes']:,} weight bytes; {lib['prefix']}_int.onnx beside it is the integer "
                               "graph it equals bit for bit")
    fm = s["facts"].get("float_modules")
    if fm:
        t.add_row("float modules", ", ".join(f"{n} {op}" for op, n in sorted(fm.items())) + " (no integer form)")
    t.add_row("bits", f"W{s['weight_bits']}A{s['act_bits']}, weights "
                      f"{'per channel' if s['per_channel'] else 'per tensor'}, exponents by {s['method']}")
    f = s["facts"]
    if "bn_derived" in f:
        t.add_row("calibration", f"none (data-free): {f['bn_derived']} tensors from BatchNorm statistics, "
                                 f"{f['random']} from random N(0, 1) inputs")
    else:
        casts = f.get("calibration_casts") or {}
        t.add_row("calibration", _n(s['calibration_samples'], 'sample') +
                  ("; cast to the model's input type: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in casts.items())
                   if casts else ""))
    md = f.get("max_drop_search")
    if md:
        t.add_row("max drop", f"top-1 agreement {md['agreement_top1']:.1f} % on {md['samples']} calibration samples "
                              f"(drop {100 - md['agreement_top1']:.1f} points, target {md['max_drop']:g}: "
                              f"{'met' if md['met'] else 'NOT met'}); {len(md['raised'])} modules raised to "
                              f"{md['raise_to']}" + (f": {', '.join(md['raised'])}" if md["raised"] else ""))
    ms = f.get("min_sqnr_search")
    if ms:
        t.add_row("min SQNR", f"smallest output SQNR {ms['sqnr_db']:.1f} dB on {ms['samples']} calibration samples "
                              f"(target {ms['min_sqnr']:g}: {'met' if ms['met'] else 'NOT met'}); "
                              f"{len(ms['raised'])} modules raised to {ms['raise_to']}"
                              + (f": {', '.join(ms['raised'])}" if ms["raised"] else ""))
    if s["overrides"]:
        t.add_row("overrides", ", ".join(f"{n} {p}" for n, p in s["overrides"].items()))
    if f.get("saturation_guarded"):
        per = f.get("saturation_guarded_modules", {})
        t.add_row(f"target {s['target']}",
                  f"{f['saturation_guarded_channels']} weight channels in {f['saturation_guarded']} modules one bit "
                  "coarser (no pair of same-sign codes the kernels add adds up past 128) so that int16 pair sums cannot saturate on x86 "
                  "without VNNI" + (f": {', '.join(f'{n} {c}' for n, c in per.items())}" if len(per) <= 6 else "") +
                  "; --target ort-x86-vnni or ort-arm keeps every channel's fraction")
    if "equalized" in f:
        t.add_row("equalization", f"{f['equalized']} convolution pairs ({f['equalize_skipped']} left alone: Relu6/Clip "
                                  "between them)")
    if "local_search_groups" in f:
        sq = f.get("search_sqnr_db")
        t.add_row("exponent search", f"fast: {f['local_search_proposed']} of {_n(f['local_search_groups'], 'activation group')} "
                  "do better at their readers' outputs one fraction off" +
                  ("; not kept: the model output already equals float's on the search samples" if sq and sq[1] is None
                   else f"; {'kept' if f['exponents_moved'] else 'not kept'}: model output SQNR on the search samples "
                   f"{sq[0]:.2f} -> {sq[1]:.2f} dB (the moves are kept only if it rises by more than "
                   f"{LOCAL_CONFIRM_DB:g} dB)" if sq else ""))
    elif "exponents_moved" in f:
        a, b = f["search_sqnr_db"]
        held = f.get("search_confirmed_db")
        t.add_row("exponent search", f"full: {_n(f['exponents_moved'], 'activation fraction')} moved (output SQNR on the "
                  f"search samples {a:.2f} -> {b:.2f} dB" +
                  (f"; on the confirming samples {held[0]:.2f} -> {held[1]:.2f} dB"
                   + ("" if f["exponents_moved"] else ": not confirmed, none kept") if held else "") + ")")
    if f.get("gptq_modules") or f.get("pruned_modules") or f.get("gptq_skipped"):
        skipped = f.get("gptq_skipped", {})
        t.add_row("weight rounding", (f"second order (GPTQ) in {f['gptq_modules']} modules" if f.get("gptq_modules")
                                      else "to nearest") +
                  (f"; to nearest in {len(skipped)}: " + "; ".join(f"{n} ({why})" for n, why in list(skipped.items())[:4])
                   if skipped else ""))
    if s["sparsity"]:
        dense = f.get("dense", [])
        t.add_row("sparsity", f"{s['sparsity']} in {f.get('pruned_modules', 0)} modules"
                  f" ({'jointly with rounding' if f.get('gptq_modules') else 'by magnitude'})"
                  + (f"; {len(dense)} dense (depthwise, or input channels not a multiple of the group)" if dense else ""))
    t.add_row("range alignment", f"{_n(s['facts'].get('aligned', 0), 'tensor')} between convolutions")
    t.add_row("bias correction", "off (it needs data)" if "bn_derived" in f else _n(f.get('bias_corrected', 0), 'module'))
    if f.get("narrowed"):
        t.add_row("int32 range", f"weight fractions lowered in {sum(f['narrowed'].values())} channels of "
                                 f"{len(f['narrowed'])} modules so that no accumulator can overflow int32 and no "
                                 "shift exceeds 30 bits")
    if f.get("residual_rounded"):
        t.add_row("int32 range", f"{f['residual_rounded']} residual channels rounded to the accumulator's fraction "
                                 "(the exact alignment could overflow int32)")
    started = getattr(sys.modules.get("dfq_onnx_launcher"), "STARTED", None)
    t.add_row("time", f"{s['seconds']:.2f} s converting (reading the model to the quantized model)" +
              (f"; {time.perf_counter() - started:.2f} s since the command started (imports and writing included)"
               if started is not None else ""))
    t.add_row("output", s["output"])
    out.print(t)


@main.command()
@click.argument("float_model", metavar="FLOAT.onnx", type=click.Path(dir_okay=False))
@click.argument("quant_model", metavar="QUANT.onnx|CDIR", type=click.Path())
@click.option("--data", required=True, metavar="DATA",
              help="Evaluation data, as for convert --calib: .npz (an optional `labels` array is used), "
                   "a folder of .npy files, or a folder of images named NAME_LABEL.jpg.")
@click.option("--labels", metavar="FILE|DIR",
              help="Class labels (.npy or text, one integer per sample; overrides the data's), or with --decode / "
                   "--postprocess box labels: a COCO JSON file (sample i = the i-th entry of \"images\"; class k = "
                   "the k-th category by id) or a folder of KITTI label files (one .txt per sample, sorted by "
                   "name). Boxes in model-input pixels.")
@click.option("--decode", type=click.Choice(["yolo", "picodet", "dbnet"]), default=None,
              help="Decode both models' outputs to boxes and report COCO mAP@0.5 and mAP@[.5:.95] of the "
                   "quantized model against the float model's detections (and against --labels): YOLOv5/v8 "
                   "heads (with NMS), PicoDet raw heads (with NMS), DBNet maps (connected components). "
                   "Needs pip install 'dfq-onnx[detect]'.")
@click.option("--postprocess", metavar="MODULE:FUNCTION",
              help="Instead of --decode: a function taking the list of output arrays of one batch and returning "
                   "per sample (boxes [K,4] xyxy, scores [K], classes [K]).")
@click.option("--conf", type=click.FloatRange(0, 1), default=None,
              help="Box score threshold of --decode [default: 0.25 yolo/picodet, 0.5 dbnet (mean map value in "
                   "a component)].")
@click.option("--iou", type=click.FloatRange(0, 1), default=0.45, show_default=True,
              help="NMS IoU threshold of --decode yolo/picodet.")
@click.option("--label-classes", metavar="NAMES",
              help="Comma-separated class names in the model's class order, matched to COCO category names "
                   "or KITTI types [KITTI default: Car,Van,Truck,Pedestrian,Person_sitting,Cyclist,Tram,Misc].")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N samples (default: all).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Samples per onnxruntime run of the models (memory grows with it); a model with a fixed "
                   "batch dim gets its own size, and a C library is fed one sample at a time.")
@click.option("--preprocess", metavar="SPEC", help="Image preprocessing, as for convert.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Threads for both sides: onnxruntime intra-op threads; for a C library CDIR, its "
                   "NAME_THREADS compile option where it has one (else it runs on one thread, and the "
                   "report says so).")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1, 100000),
              help="Timed batch-1 runs per model (median reported), after a warm-up.")
@click.option("--threshold", default=0.5, show_default=True, type=float,
              help="For a map output (probability, segmentation or detection map: two or more axes "
                   "longer than 1), report the percentage of elements on the same side of this value "
                   "in both models, the IoU of the masks above it (pooled over all samples) and the share "
                   "of elements each model marks; top-1 figures are only given for class scores.")
@_cluster_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def validate(float_model, quant_model, data, labels, decode, postprocess, conf, iou, label_classes, num_samples,
             batch_size, preprocess, threads, runs, threshold, as_json, workers, ray_address):
    """Run FLOAT and QUANT (or the C library in CDIR) on the same inputs and compare them.

    FLOAT runs under onnxruntime. QUANT runs deployed (default optimizations: onnxruntime's int8 kernels) and simulated (no
    optimizations: the QDQ graph's float arithmetic); a gap between the two means the deployed
    kernels do not compute what the graph says.

    CDIR, a folder written by `convert --format c`, is built with the system C compiler ($CC, else
    cc; -std=c99 -O3 -march=native, cached in ~/.cache/dfq-onnx) and its NAME_run_float runs on
    the same inputs, one sample at a time, loaded with ctypes.

    With --decode or --postprocess both models' outputs become boxes, and the report adds COCO
    mAP@0.5 and mAP@[.5:.95] of the quantized model against the float model's detections (and of
    both against --labels) and the detections per image of each."""
    from .distributed import maybe_cluster
    from .validate import validate as run_validate

    names = [c.strip() for c in label_classes.split(",") if c.strip()] if label_classes else None
    with maybe_cluster(workers, ray_address) as cluster, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=err, transient=True, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("running both models", total=None)
        r = run_validate(float_model, quant_model, data, labels=labels, num_samples=num_samples,
                         batch_size=batch_size, threads=threads, runs=runs, preprocess=preprocess,
                         threshold=threshold, decode=decode, postprocess=postprocess, conf=conf, iou=iou,
                         label_classes=names, on_start=lambda n: bar.update(task, total=n),
                         on_batch=lambda n: bar.advance(task, n), cluster=cluster)
    if _maybe_json(r, as_json):
        return
    if r.get("c_library"):
        _print_validate_c(r)
        return _print_detection(r["detection"], c_library=True)
    t = Table(title=f"{r['samples']} samples", title_justify="left")
    t.add_column("")
    t.add_column("float", justify="right")
    t.add_column("quantized, deployed", justify="right")
    t.add_column("quantized, simulated", justify="right")

    def pct(v):
        return "n/a" if v is None else f"{v:.2f} %"

    sim = r["simulated"]
    if r["output_kind"] == "classes":
        t.add_row("top-1 accuracy", pct(r["float"]["top1"]), pct(r["quant"]["top1"]), pct(sim["top1"]))
        t.add_row("top-5 accuracy", pct(r["float"]["top5"]), pct(r["quant"]["top5"]), pct(sim["top5"]))
        t.add_row("top-1 agreement with float", "", pct(r["agreement_top1"]), pct(sim["agreement_top1"]))
    elif r["output_kind"] == "map":
        t.add_row(f"elements on the same side of {r['threshold']:g}", "", pct(r["map_agreement"]),
                  pct(sim["map_agreement"]))
        for label, key, fmt in _MAP_ROWS:
            t.add_row(label.format(th=r["threshold"]), fmt(r["map"][key.replace("quant", "float")]) if "marked" in key else "",
                      fmt(r["map"][key]), fmt(sim["map"][key]))
    for name, db in r["sqnr_db"].items():
        t.add_row(f"SQNR {name} (pooled)", "", f"{db:.2f} dB", f"{sim['sqnr_db'][name]:.2f} dB")
        t.add_row(f"max abs error {name}", "", f"{r['max_abs_error'][name]:.4g}", f"{sim['max_abs_error'][name]:.4g}")
    t.add_row("requantization points", str(r["requant_points"]["float"]), str(r["requant_points"]["quant"]), "")
    t.add_row("nodes", str(r["nodes"]["float"]), str(r["nodes"]["quant"]), "")
    t.add_row(f"latency, batch {r.get('latency_batch', 1)}, {r['threads']} threads (median)",
              f"{r['latency_ms']['float']:.3f} ms", f"{r['latency_ms']['quant']:.3f} ms", "")
    out.print(t)
    _print_detection(r["detection"])


def _print_detection(d: dict | None, c_library: bool = False) -> None:
    if d is None:
        return
    how = d["decoder"] + ("" if d["conf"] is None else f", score > {d['conf']:g}") + \
        ("" if d["iou"] is None else f", NMS IoU {d['iou']:g}")
    t = Table(title=f"boxes ({how}; COCO mAP)", title_justify="left")
    t.add_column("")
    t.add_column("float", justify="right")
    t.add_column("C library" if c_library else "quantized, deployed", justify="right")
    sim = d.get("simulated")
    if sim:
        t.add_column("quantized, simulated", justify="right")

    def f3(v):
        return "n/a" if v is None else f"{v:.3f}"

    def row(label, fl, key):
        t.add_row(label, fl, *[key(x) for x in [d] + ([sim] if sim else [])])

    row("mAP@0.5 vs float detections", "", lambda x: f3(x["vs_float"]["map50"]))
    row("mAP@[.5:.95] vs float detections", "", lambda x: f3(x["vs_float"]["map"]))
    if d["vs_labels"] is not None:
        row("mAP@0.5 vs labels", f3(d["vs_labels"]["float"]["map50"]), lambda x: f3(x["vs_labels"]["quant"]["map50"]))
        row("mAP@[.5:.95] vs labels", f3(d["vs_labels"]["float"]["map"]), lambda x: f3(x["vs_labels"]["quant"]["map"]))
    row("detections per image", f"{d['detections_per_image']['float']:.2f}",
        lambda x: f"{x['detections_per_image']['quant']:.2f}")
    out.print(t)


def _opt(fmt):
    return lambda v: "n/a" if v is None else fmt(v)


_MAP_ROWS = [("mask IoU at {th:g} (pooled)", "mask_iou", _opt(lambda v: f"{v:.3f}")),
             ("elements above {th:g}", "marked_quant", _opt(lambda v: f"{v:.2f} %")),
             ("SQNR per sample (median)", "sqnr_per_sample_median_db", _opt(lambda v: f"{v:.2f} dB"))]


def _print_validate_c(r: dict) -> None:
    c = r["c_library"]
    t = Table(title=f"{r['samples']} samples", title_justify="left")
    t.add_column("")
    t.add_column("float (onnxruntime)", justify="right")
    t.add_column(f"C library ({c['prefix']})", justify="right")

    def pct(v):
        return "n/a" if v is None else f"{v:.2f} %"

    if r["output_kind"] == "classes":
        t.add_row("top-1 accuracy", pct(r["float"]["top1"]), pct(r["quant"]["top1"]))
        t.add_row("top-5 accuracy", pct(r["float"]["top5"]), pct(r["quant"]["top5"]))
        t.add_row("top-1 agreement with float", "", pct(r["agreement_top1"]))
    elif r["output_kind"] == "map":
        t.add_row(f"elements on the same side of {r['threshold']:g}", "", pct(r["map_agreement"]))
        for label, key, fmt in _MAP_ROWS:
            t.add_row(label.format(th=r["threshold"]), fmt(r["map"][key.replace("quant", "float")]) if "marked" in key else "",
                      fmt(r["map"][key]))
    for name, db in r["sqnr_db"].items():
        t.add_row(f"SQNR {name} (pooled)", "", f"{db:.2f} dB")
        t.add_row(f"max abs error {name}", "", f"{r['max_abs_error'][name]:.4g}")
    t.add_row("requantization points", str(r["requant_points"]["float"]),
              f"{r['requant_points']['quant']} (in {c['prefix']}_int.onnx)")

    def threads(n):
        return f"{n} thread{'s' if n != 1 else ''}"

    t.add_row(f"latency, batch {c['batch']} (median)", f"{r['latency_ms']['float']:.3f} ms, {threads(r['threads'])}",
              f"{r['latency_ms']['quant']:.3f} ms, {threads(c['threads'])}")
    out.print(t)
    how = "cached build" if c["cached"] else f"built in {c['build_seconds']:.1f} s"
    out.print(f"C library: {how}: {c['command']}")
    if not c["threads_option"] and r["threads"] != 1:
        out.print(f"The C library has no {c['prefix'].upper()}_THREADS option: it ran on one thread "
                  f"(--threads {r['threads']} applied to onnxruntime only).")


@main.command()
@click.argument("model", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--hw", is_flag=True,
              help="Hardware cost of requantization (needs --calib, yosys and iverilog): synthesize a "
                   "rounding-shift and a multiplier requantizer, simulate both on this model's int32 "
                   "accumulators, and total them over dfq-onnx's integer graph and onnxruntime's "
                   "quantized model. MODEL must be the float model.")
@click.option("--sensitivity", is_flag=True,
              help="Quantize one unified module at a time (the rest float; plain power-of-two, no "
                   "alignment or bias correction) and report each one's output SQNR and top-1 agreement "
                   "with float on the first 64 calibration samples (large inputs: as many as hold 64 x 3 x "
                   "224 x 224 values, at least 8), most sensitive first (needs --calib).")
@click.option("--calib", metavar="DATA", help="With --hw/--sensitivity: calibration data, as for convert --calib.")
@click.option("--num-samples", default=128, show_default=True, type=click.IntRange(min=1),
              help="With --hw/--sensitivity: calibration samples.")
@click.option("--preprocess", metavar="SPEC", help="With --hw/--sensitivity: image preprocessing, as for convert.")
@click.option("--weight-bits", default=8, show_default=True, type=click.IntRange(2, 8),
              help="With --sensitivity: weight bits of the quantized module.")
@click.option("--values", default=4096, show_default=True, type=click.IntRange(2, 1_000_000),
              help="With --hw: accumulators streamed through each simulated circuit.")
@click.option("--sparsity", metavar="N:M|FRACTION",
              help="With --hw: convert with this weight sparsity (as convert --sparsity) and report the "
                   "multiplications an accelerator that skips zero weights saves.")
@handle_errors
def inspect(model, as_json, hw, sensitivity, calib, num_samples, preprocess, weight_bits, values, sparsity):
    """Op types, requantization points, unified modules and scales of any ONNX model; with --hw,
    what its requantization costs in silicon; with --sensitivity, what quantizing each module costs."""
    from .report import inspect_model

    if hw and sensitivity:
        raise click.UsageError("--hw and --sensitivity are separate reports: pass one")
    if sparsity and not hw:
        raise click.UsageError("--sparsity applies only with --hw (convert --sparsity prunes a model)")
    if hw:
        return _inspect_hw(model, calib, num_samples, preprocess, values, as_json, sparsity)
    if sensitivity:
        return _inspect_sensitivity(model, calib, num_samples, preprocess, weight_bits, as_json)
    if calib or preprocess:
        raise click.UsageError("--calib and --preprocess apply only with --hw or --sensitivity")
    info = inspect_model(model)
    if _maybe_json(info, as_json):
        return
    t = Table(title=f"{model}  (opset {info['opset']}, {info['nodes']} nodes)", title_justify="left")
    t.add_column("op type")
    t.add_column("count", justify="right")
    for op, n in info["op_types"].items():
        t.add_row(op, str(n))
    out.print(t)
    s = Table(show_header=False, box=None, pad_edge=False)
    s.add_column(style="bold")
    s.add_column()
    s.add_row("requantization points", f"{info['requant_points']} (+{info['requant_lossless']} lossless "
                                       f"re-quantizations after pass-through ops)")
    if info["per_layer_requant_points"] is not None:
        s.add_row("per-layer scheme would need", str(info["per_layer_requant_points"]))
    s.add_row("weight quantizers", str(info["weight_quantizers"]))
    s.add_row("unified modules", "n/a (not made by dfq-onnx)" if info["modules"] is None else str(info["modules"]))
    if info["tables"]:
        s.add_row("lookup tables", f"{info['tables']} (256 entries each, one requantization point each)")
    sc = info["scales"]
    s.add_row("scales", f"{sc['total']} ({sc['power_of_two']} exact powers of two)")
    if info["float_islands"]:
        s.add_row("float islands", ", ".join(f"{n} {op}" for op, n in sorted(info["float_islands"].items())))
    sp = info["weight_sparsity"]
    if sp:
        zeros, size = sum(w["zeros"] for w in sp), sum(w["size"] for w in sp)
        sparse = [w for w in sp if w["zeros"] >= SPARSE_LAYER * w["size"]]
        s.add_row("weight sparsity", f"{100 * zeros / size:.1f} % of {size:,} integer weights are zero; "
                                     f"{len(sparse)} of {len(sp)} weight tensors at least {SPARSE_LAYER:.0%} zero")
    out.print(s)
    if sp and sparse:
        z = Table(title="zero weights per layer", title_justify="left")
        for c in ("weight", "zeros", "weights", "sparsity"):
            z.add_column(c, justify="left" if c == "weight" else "right")
        for w in sp:
            z.add_row(w["weight"], f"{w['zeros']:,}", f"{w['size']:,}", f"{100 * w['zeros'] / w['size']:.1f} %")
        out.print(z)


def _inspect_sensitivity(model, calib, num_samples, preprocess, weight_bits, as_json) -> None:
    from .sensitivity import module_sensitivity

    if calib is None:
        raise click.UsageError("--sensitivity needs --calib DATA")
    config = QuantConfig(num_samples=num_samples, weight_bits=weight_bits)
    with err.status("sensitivity", spinner="dots") as status:
        r = module_sensitivity(model, calib, config, preprocess=preprocess, on_step=lambda msg: status.update(msg))
    if _maybe_json(r, as_json):
        return
    t = Table(title=f"{model}: one module quantized at a time (W{r['weight_bits']}A8, {r['samples']} samples), "
                    "most sensitive first", title_justify="left")
    for c in ("module", "op", "output SQNR", "top-1 agreement"):
        t.add_column(c, justify="left" if c in ("module", "op") else "right")
    for row in r["modules"]:
        t.add_row(row["name"], row["op"], f"{row['sqnr_db']:.2f} dB", f"{row['agreement_top1']:.1f} %")
    out.print(t)


SPARSE_LAYER = 0.25  # inspect lists zeros per layer when some weight tensor has at least this share of zeros


def _inspect_hw(model, calib, num_samples, preprocess, values, as_json, sparsity=None) -> None:
    from .hw_report import hardware_report

    with err.status("hardware report", spinner="dots") as status:
        r = hardware_report(model, calib, num_samples=num_samples, preprocess=preprocess, values=values,
                            sparsity=sparsity, on_step=lambda msg: status.update(msg))
    if _maybe_json(r, as_json):
        return
    u, ur = r["units"], r["unit_ratios"]
    t = Table(title=f"one requantizer: int32 in, int8/uint8 out (yosys generic gates; {u['shift']['values']} "
                    f"accumulators of {r['stream']['modules']} modules, bit-exact)", title_justify="left")
    for c in ("", "rounding shift (dfq-onnx)", "multiplier (float scales)", "multiplier / shift", "paper"):
        t.add_column(c, justify="left" if not c else "right")
    t.add_row("cells", f"{u['shift']['cells']:,}", f"{u['multiplier']['cells']:,}", f"{ur['area_cells']:.1f}x", "")
    t.add_row("transistors (CMOS estimate)", f"{u['shift']['transistors']:,}", f"{u['multiplier']['transistors']:,}",
              f"{ur['area_transistors']:.1f}x", f"~{r['paper_ratios']['area']:.0f}x area")
    t.add_row("toggles per requantization", f"{u['shift']['toggles_per_op']:.1f}",
              f"{u['multiplier']['toggles_per_op']:.1f}", f"{ur['energy_proxy']:.1f}x",
              f"~{r['paper_ratios']['energy']:.0f}x energy")
    out.print(t)
    d, o, k = r["dfq"], r["ort"], r["ratios"]

    def units(x):
        return ", ".join(f"{n} {name}" for name, n in x["by_unit"].items())

    m = Table(title=f"{model}: requantization per inference (batch 1; graph-input quantization left out)",
              title_justify="left")
    for c in ("", "dfq-onnx integer graph", "onnxruntime quantizer", "onnxruntime / dfq-onnx"):
        m.add_column(c, justify="left" if not c else "right")
    m.add_row("requantizer units", f"{d['requantizers']} ({units(d)})", f"{o['requantizers']} ({units(o)})",
              f"{k['requantizers']:.2f}x")
    m.add_row("their transistors", f"{d['transistors']:,}", f"{o['transistors']:,}", f"{k['transistors']:.1f}x")
    m.add_row("parameter bits (shifts, multipliers)", f"{d['parameter_bits']:,}", f"{o['parameter_bits']:,}",
              f"{k['parameter_bits']:.1f}x")
    m.add_row("requantizations", f"{d['requantizations']:,}", f"{o['requantizations']:,}", f"{k['requantizations']:.2f}x")
    m.add_row("toggles (energy proxy)", f"{d['toggles']:,.0f}", f"{o['toggles']:,.0f}", f"{k['toggles']:.1f}x")
    tb = d.get("tables") or {}
    if tb.get("modules"):
        m.add_row("lookup tables (256 x 8-bit ROMs)", f"{tb['modules']} ({tb['roms']} ROMs, {tb['bits']:,} bits, "
                  f"{tb['rom_transistors']:,} transistors each; in the total above)", "float ops", "")
    zs = r["zero_skipping"]
    m.add_row("multiplications (integer linear modules)", f"{zs['macs']:,}, {zs['zero_weight_macs']:,} by a zero weight "
              f"({100 * zs['fraction']:.1f} %: what a zero-skipping accelerator saves)", "", "")
    out.print(m)
    out.print("The proxy counts 0/1 changes on every net of the synthesized netlist in a zero-delay simulation: "
              "no process library, wire load, glitches or leakage. One unit per requantization point.")


if __name__ == "__main__":
    main()
