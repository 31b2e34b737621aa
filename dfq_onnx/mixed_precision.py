"""--max-drop / --min-sqnr: raise the precision of the most sensitive modules until the quantized
model's top-1 agreement with float, on the calibration samples, drops by at most X points
(classifiers), or until the smallest SQNR of its outputs against float there is at least D dB
(any model: detectors, segmenters, regressors).

Order: `inspect --sensitivity`'s (each module quantized alone, lowest output SQNR first; for
--min-sqnr the smallest SQNR over the model's outputs, the figure it is judged by).
Raising a module: 8-bit weights and a 16-bit output (int16/uint16 QuantizeLinear, opset 21), so
it stays quantized; QDQ format only. The number k of raised modules is found by bisection (the
figure is taken as monotone in the modules left low; every candidate is measured, and the one
returned is one that was measured to meet the target, or all modules raised if none does).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable


from .calibration_data import DataSource, input_specs
from .config import QuantConfig
from .errors import DfqError
from .model_io import load_model
from .pipeline import ConvertResult, run
from .sensitivity import eval_batches, model_outputs, module_sensitivity, smallest_sqnr, top1_agreement


def raised_config(config: QuantConfig, names: list[str], pools: set[str]) -> QuantConfig:
    """config with `names` raised to 8-bit weights (pooling modules have none) and a 16-bit output."""
    weights = dict(config.overrides)
    weights.update({n: max(8, weights.get(n, config.weight_bits)) for n in names if n not in pools})
    acts = dict(config.act_overrides)
    acts.update({n: 16 for n in names})
    return replace(config, overrides=tuple(sorted(weights.items())), act_overrides=tuple(sorted(acts.items())))


def convert_max_drop(model, calib, config: QuantConfig, max_drop: float, *, preprocess: str | None = None,
                     on_step: Callable[[str], None] | None = None) -> tuple[ConvertResult, dict]:
    """convert_raised with a --max-drop target."""
    return convert_raised(model, calib, config, max_drop=max_drop, preprocess=preprocess, on_step=on_step)


def convert_raised(model, calib, config: QuantConfig, *, max_drop: float | None = None, min_sqnr: float | None = None,
                   preprocess: str | None = None, on_step: Callable[[str], None] | None = None
                   ) -> tuple[ConvertResult, dict]:
    """The conversion meeting --max-drop or --min-sqnr (exactly one; see the module docstring) and
    facts: the figure of each candidate measured, the raised modules, whether the target was met."""
    if max_drop is not None and min_sqnr is not None:
        raise DfqError("give --max-drop or --min-sqnr, not both")
    if max_drop is None and min_sqnr is None:
        raise DfqError("give --max-drop or --min-sqnr: the search needs a target")
    if config.integer:
        raise DfqError(f"{'--max-drop' if min_sqnr is None else '--min-sqnr'} raises modules to 16-bit outputs: "
                       "it needs --format qdq")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise DfqError(f"--max-drop must be between 0 and 100 points, got {max_drop}")
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        raise DfqError(f"--min-sqnr must be a finite number of dB, got {min_sqnr}")
    step = on_step or (lambda _: None)
    t0 = time.perf_counter()
    original = load_model(model)
    data = DataSource(calib, input_specs(original), num_samples=config.num_samples, preprocess=preprocess)
    batches = eval_batches(data, config.batch_size, config.num_samples)
    every = min_sqnr is not None
    ref = model_outputs(original.SerializeToString(), batches, every)
    tried: dict[int, tuple[float, ConvertResult]] = {}

    def figure(y) -> float:
        return smallest_sqnr(ref, y) if every else top1_agreement(ref, y)

    def met(v: float) -> bool:
        return v >= min_sqnr if every else 100.0 - v <= max_drop

    def measure(k: int, order: list[str], pools: set[str]) -> bool:
        if k not in tried:
            step(f"converting with the {k} most sensitive modules raised")
            r = run(original, calib, raised_config(config, order[:k], pools), preprocess=preprocess)
            tried[k] = (figure(model_outputs(r.model.SerializeToString(), batches, every)), r)
        return met(tried[k][0])

    step("converting")
    order: list[str] = []
    if measure(0, order, set()):
        k = 0
    else:
        step("measuring per-module sensitivity")
        rows = module_sensitivity(original, calib, config, preprocess=preprocess, every_output=every)["modules"]
        pools = {r["name"] for r in rows if r["op"] in ("GlobalAveragePool", "AveragePool")}
        order = [r["name"] for r in rows]
        lo, hi = 0, len(order)  # measure(lo) fails; find the least k that meets the target
        if not measure(hi, order, pools):
            k = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if measure(mid, order, pools):
                    hi = mid
                else:
                    lo = mid
            k = hi
    value, result = tried[k]
    result.seconds = time.perf_counter() - t0  # the whole search
    samples = len(ref[0]) if every else len(ref)
    facts = {"samples": samples, "met": met(value), "raised": order[:k], "raise_to": "W8A16",
             "candidates": {str(n): a for n, (a, _) in sorted(tried.items())}}
    facts.update({"min_sqnr": min_sqnr, "sqnr_db": value} if every else {"max_drop": max_drop, "agreement_top1": value})
    return result, facts
