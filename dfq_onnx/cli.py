"""Command line: parse, call the API, print. No logic of its own."""
from __future__ import annotations

import functools
import json
import sys
from collections import Counter

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import DfqError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(msg: str) -> None:
    err.print(f"[bold red]error:[/] {msg}", markup=True, highlight=False, emoji=False)
    sys.exit(1)


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
            _fail("interrupted")
        except Exception as e:  # an internal error: still one line unless --debug
            if debug:
                raise
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {text} (run with --debug for the traceback)")
    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dfq-onnx")
def main():
    """dfq-onnx: quantize ONNX models with power-of-two scales (requantization by shifts).

    Linear layers are merged with their bias, residual Add and activation into unified modules
    with one requantization each; every scale is an exact power of two.
    """


@main.command()
@click.argument("input_model", metavar="IN.onnx", type=click.Path(dir_okay=False))
@click.argument("output_model", metavar="OUT.onnx", type=click.Path(dir_okay=False))
@click.option("--calib", "calib", metavar="DATA",
              help="Calibration data: a .npz keyed by input name (N x ...), a folder of .npy files, "
                   "or a folder of images (see --preprocess). Required unless --float-only.")
@click.option("--num-samples", default=128, show_default=True, type=int, help="Calibration samples to use.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Calibration batch size.")
@click.option("--preprocess", metavar="SPEC",
              help='Image preprocessing, e.g. "resize=256 size=224 mean=0.485,0.456,0.406 '
                   'std=0.229,0.224,0.225 scale=1 layout=NCHW color=RGB". Default: resize to the '
                   "model's input size, pixels in [0, 1], layout from the input shape, RGB.")
@click.option("--method", type=click.Choice(["mse", "max"]), default="mse", show_default=True,
              help="Exponent choice: mse = least expected squared error among neighbouring "
                   "fractional lengths; max = no clipping.")
@click.option("--per-tensor", is_flag=True, help="One weight exponent per tensor (default: per output channel).")
@click.option("--weight-bits", default=8, show_default=True, type=click.IntRange(2, 8), help="Weight bits.")
@click.option("--act-bits", default=8, show_default=True, type=click.Choice(["8"]), help="Activation bits.")
@click.option("--float-only", is_flag=True,
              help="Write the fused float model (BatchNorm folded, canonical form) instead; no --calib needed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@handle_errors
def convert(input_model, output_model, calib, num_samples, batch_size, preprocess, method, per_tensor,
            weight_bits, act_bits, float_only, as_json, quiet):
    """Quantize IN.onnx to a power-of-two W8A8 QDQ model OUT.onnx."""
    from .config import QuantConfig
    from .model_io import check_output_path, save_model
    from .pipeline import fuse, run

    check_output_path(output_model, input_model)
    if float_only:
        model = fuse(input_model)
        save_model(model, output_model, input_model)
        if not quiet:
            out.print(f"wrote fused float model {output_model}")
        return
    if not calib:
        raise click.UsageError("calibration data is required: pass --calib DATA (a .npz keyed by input "
                               "name, a folder of .npy files or of images), or --float-only")
    config = QuantConfig(weight_bits=weight_bits, act_bits=int(act_bits), per_channel=not per_tensor,
                         method=method, num_samples=num_samples, batch_size=batch_size)
    show = not quiet and err.is_terminal
    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not show) as bar:
        task = bar.add_task("calibrate", total=None)
        result = run(input_model, calib, config, preprocess=preprocess,
                     on_start=lambda n: bar.update(task, total=n),
                     on_batch=lambda n: bar.advance(task, n))
    save_model(result.model, output_model, input_model)
    if quiet:
        return
    summary = _summary(result, config, input_model, output_model)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _summary(result, config, inp, outp) -> dict:
    mods = result.modules
    by_op = Counter(m["op"] for m in mods)
    return {
        "input": str(inp), "output": str(outp), "format": config.format,
        "weight_bits": config.weight_bits, "act_bits": config.act_bits,
        "per_channel": config.per_channel, "method": config.method,
        "modules": len(mods), "modules_by_op": dict(by_op),
        "residual_modules": sum(1 for m in mods if m["residual"]),
        "requant_points": result.requant_points, "requant_by_kind": result.requant_by_kind,
        "per_layer_requant_points": result.per_layer_requant_points,
        "float_islands": result.float_ops, "calibration_samples": result.samples,
        "seconds": round(result.seconds, 3), "facts": result.facts,
    }


def _print_summary(s: dict) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    ops = ", ".join(f"{n} {op}" for op, n in s["modules_by_op"].items())
    t.add_row("unified modules", f"{s['modules']} ({ops}; {s['residual_modules']} with a residual Add)")
    k = s["requant_by_kind"]
    t.add_row("requantization points", f"{s['requant_points']} ({k['input']} graph input, {k['module']} module "
                                       f"output, {k['island']} float-island boundary); a per-layer scheme needs "
                                       f"{s['per_layer_requant_points']}")
    fi = s["float_islands"]
    t.add_row("float islands", ", ".join(f"{n} {op}" for op, n in sorted(fi.items())) if fi else "none")
    t.add_row("bits", f"W{s['weight_bits']}A{s['act_bits']}, weights "
                      f"{'per channel' if s['per_channel'] else 'per tensor'}, exponents by {s['method']}")
    t.add_row("calibration", f"{s['calibration_samples']} samples")
    if s["facts"].get("bias_saturated"):
        t.add_row("warning", f"{s['facts']['bias_saturated']} bias values saturated to int32")
    t.add_row("time", f"{s['seconds']:.2f} s")
    t.add_row("output", s["output"])
    out.print(t)


@main.command()
@click.argument("model", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@handle_errors
def inspect(model, as_json):
    """Op types, requantization points, unified modules and scales of any ONNX model."""
    from .report import inspect_model

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
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
    sc = info["scales"]
    s.add_row("scales", f"{sc['total']} ({sc['power_of_two']} exact powers of two)")
    if info["float_islands"]:
        s.add_row("float islands", ", ".join(f"{n} {op}" for op, n in sorted(info["float_islands"].items())))
    out.print(s)


if __name__ == "__main__":
    main()
