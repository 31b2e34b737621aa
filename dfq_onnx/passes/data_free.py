"""Data-free statistics (`--calib none`): activation ranges from BatchNorm statistics.

A BatchNormalization output y_c = gamma_c (x_c - mean_c) / sqrt(var_c + eps) + beta_c has, over
the data it was trained on, mean beta_c and standard deviation |gamma_c| per channel. Taking each
pre-activation channel as Gaussian with those moments (plus the moments of a residual branch,
assumed independent), the module's activation is applied to draws from it and the draws give the
tensor's statistics (min, max, |x| histogram), as calibration would. Moments propagate from
module to module (through pass-through ops unchanged, through an average pool with the variance
divided by the window). Tensors with no BatchNorm behind them (the graph input, modules without
BatchNorm, float-island boundaries) take their statistics from the float model run on random
standard-normal inputs: that is a guess, and the pipeline says so.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration_data import DataSource, InputSpec
from ..errors import DfqError
from ..fixedpoint import abs_histogram
from ..graph_utils import clip_limits, const_value
from .calibrate import TensorStats, calibrate
from .form_modules import Plan

DRAWS = 1 << 14        # Gaussian draws per tensor, over all its channels
RANDOM_SAMPLES = 8     # random inputs for tensors without BatchNorm statistics
SEED = 0


def batchnorm_moments(graph: gs.Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per BatchNormalization output tensor: (mean, variance) per channel = (beta, gamma^2).
    Read before fold_batchnorm, which keeps the output tensor names."""
    out = {}
    for n in graph.nodes:
        if n.op != "BatchNormalization" or len(n.inputs) < 3:
            continue
        gamma, beta = const_value(n.inputs[1]), const_value(n.inputs[2])
        if gamma is not None and beta is not None:
            out[n.outputs[0].name] = (beta.astype(np.float64).ravel(), np.square(gamma.astype(np.float64).ravel()))
    return out


def data_free_stats(graph: gs.Graph, plan: Plan, moments: dict, specs: list[InputSpec],
                    batch_size: int) -> tuple[dict[str, TensorStats], dict]:
    """Statistics of every requantized tensor of the (folded) graph without data; see the module
    docstring. Returns the statistics and facts {"bn_derived": n, "random": m}."""
    rng = np.random.default_rng(SEED)
    nodes = {n.name: n for n in graph.nodes}
    tmap = graph.tensors()
    moments = dict(moments)
    draws: dict[str, np.ndarray] = {}

    def known(t: str):
        return moments.get(plan.source(t), moments.get(t))

    for m in plan.modules:
        if m.kind == "pool":
            src = known(m.input)
            window = _window(nodes[m.name], tmap[m.input])
            if src is not None and window:
                moments[m.output] = (src[0], src[1] / window)
            continue
        pre = nodes[m.name].outputs[0].name
        if pre not in moments:
            continue
        mu, var = moments[pre]
        if m.residual_input is not None:
            r = known(m.residual_input)
            if r is None or r[0].shape != mu.shape:
                continue
            mu, var = mu + r[0], var + r[1]
        per = max(64, DRAWS // len(mu))
        x = rng.standard_normal((len(mu), per)) * np.sqrt(var)[:, None] + mu[:, None]
        if m.activation is not None:
            x = _activate(nodes[m.nodes[-1]], x)
        draws[m.output] = x
        moments[m.output] = (x.mean(axis=1), x.var(axis=1))

    stats: dict[str, TensorStats] = {}
    for t in plan.requant:
        if t in draws:
            x = draws[t]
        elif t in moments:
            mu, var = moments[t]
            per = max(64, DRAWS // len(mu))
            x = rng.standard_normal((len(mu), per)) * np.sqrt(var)[:, None] + mu[:, None]
        else:
            continue
        x = x.astype(np.float32)
        stats[t] = TensorStats(x.size, float(x.min()), float(x.max()), abs_histogram(x))
    rest = [t for t in plan.requant if t not in stats]
    if rest:
        stats.update(calibrate(graph, rest, DataSource(_random_inputs(specs, rng), specs), batch_size))
    return stats, {"bn_derived": len(plan.requant) - len(rest), "random": len(rest)}


def _activate(node: gs.Node, x: np.ndarray) -> np.ndarray:
    if node.op == "LeakyRelu":
        alpha = float(node.attrs.get("alpha", 0.01))
        return np.where(x < 0, alpha * x, x)
    lo, hi = clip_limits(node)
    return np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi)


def _window(node: gs.Node, inp: gs.Tensor) -> int | None:
    if node.op == "GlobalAveragePool":
        shape = inp.shape
        if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
            return None
        return int(np.prod(shape[2:]))
    k = node.attrs.get("kernel_shape")
    return int(np.prod(k)) if k else None


def _random_inputs(specs: list[InputSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for s in specs:
        if s.dtype.kind != "f":
            raise DfqError(f"data-free mode needs float inputs; input {s.name!r} is {s.dtype}: pass --calib DATA")
        if s.shape is None or any(d is None for d in s.shape[1:]):
            raise DfqError(f"data-free mode needs static input shapes; input {s.name!r} has "
                           f"{list(s.shape or [])}: pass --calib DATA")
        n = s.fixed_batch or RANDOM_SAMPLES
        feeds[s.name] = rng.standard_normal((n, *s.shape[1:])).astype(s.dtype)
    return feeds
