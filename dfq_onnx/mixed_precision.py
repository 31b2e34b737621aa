"""--max-drop: raise the precision of the most sensitive modules until the quantized model's
top-1 agreement with float, on the calibration samples, drops by at most X points.

Order: `inspect --sensitivity`'s (each module quantized alone, lowest output SQNR first).
Raising a module: 8-bit weights and a 16-bit output (int16/uint16 QuantizeLinear, opset 21), so
it stays quantized; QDQ format only. The number k of raised modules is found by bisection (agreement is taken as
non-increasing in the modules left low; every candidate is measured, and the one returned is
one that was measured to meet X, or all modules raised if none does).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable


from .calibration_data import DataSource, input_specs
from .config import QuantConfig
from .errors import DfqError
from .model_io import load_model
from .pipeline import ConvertResult, run
from .sensitivity import eval_batches, model_outputs, module_sensitivity, top1_agreement


def raised_config(config: QuantConfig, names: list[str], pools: set[str]) -> QuantConfig:
    """config with `names` raised to 8-bit weights (pooling modules have none) and a 16-bit output."""
    weights = dict(config.overrides)
    weights.update({n: max(8, weights.get(n, config.weight_bits)) for n in names if n not in pools})
    acts = dict(config.act_overrides)
    acts.update({n: 16 for n in names})
    return replace(config, overrides=tuple(sorted(weights.items())), act_overrides=tuple(sorted(acts.items())))


def convert_max_drop(model, calib, config: QuantConfig, max_drop: float, *, preprocess: str | None = None,
                     on_step: Callable[[str], None] | None = None) -> tuple[ConvertResult, dict]:
    """The conversion meeting --max-drop (see the module docstring) and facts: agreement of each
    candidate measured, the raised modules, whether the target was met."""
    if config.integer:
        raise DfqError("--max-drop raises modules to 16-bit outputs: it needs --format qdq")
    if not 0 <= max_drop <= 100:
        raise DfqError(f"--max-drop must be between 0 and 100 points, got {max_drop}")
    step = on_step or (lambda _: None)
    t0 = time.perf_counter()
    original = load_model(model)
    data = DataSource(calib, input_specs(original), num_samples=config.num_samples, preprocess=preprocess)
    batches = eval_batches(data, config.batch_size, config.num_samples)
    ref = model_outputs(original.SerializeToString(), batches)
    tried: dict[int, tuple[float, ConvertResult]] = {}

    def measure(k: int, order: list[str], pools: set[str]) -> float:
        if k not in tried:
            step(f"converting with the {k} most sensitive modules raised")
            r = run(original, calib, raised_config(config, order[:k], pools), preprocess=preprocess)
            y = model_outputs(r.model.SerializeToString(), batches)
            tried[k] = (top1_agreement(ref, y), r)
        return 100.0 - tried[k][0]

    step("converting")
    if measure(0, [], set()) <= max_drop:
        k = 0
        order: list[str] = []
    else:
        step("measuring per-module sensitivity")
        rows = module_sensitivity(original, calib, config, preprocess=preprocess)["modules"]
        pools = {r["name"] for r in rows if r["op"] in ("GlobalAveragePool", "AveragePool")}
        order = [r["name"] for r in rows]
        lo, hi = 0, len(order)  # drop(lo) > max_drop; find the least k with drop(k) <= max_drop
        if measure(hi, order, pools) > max_drop:
            k = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if measure(mid, order, pools) <= max_drop:
                    hi = mid
                else:
                    lo = mid
            k = hi
    agreement, result = tried[k]
    result.seconds = time.perf_counter() - t0  # the whole search
    facts = {"max_drop": max_drop, "samples": len(ref), "agreement_top1": agreement, "met": 100.0 - agreement <= max_drop,
             "raised": order[:k], "raise_to": "W8A16",
             "candidates": {str(n): a for n, (a, _) in sorted(tried.items())}}
    return result, facts
