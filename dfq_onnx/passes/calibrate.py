"""Collect activation statistics at module boundaries with onnxruntime (an analysis)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..calibration_data import DataSource
from ..errors import DfqError
from ..fixedpoint import HIST_BINS, abs_histogram
from ..model_io import to_model


@dataclass
class TensorStats:
    """Streaming statistics of one tensor. A mergeable value: merge(a, b) equals the statistics
    of the concatenated data, so shards of a calibration set can be computed apart."""
    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    @property
    def max_abs(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @classmethod
    def of(cls, x: np.ndarray) -> "TensorStats":
        x = np.asarray(x)
        if x.size == 0:
            return cls()
        return cls(int(x.size), float(x.min()), float(x.max()), abs_histogram(x))

    def merge(self, other: "TensorStats") -> "TensorStats":
        return TensorStats(self.count + other.count, min(self.min, other.min), max(self.max, other.max),
                           self.hist + other.hist)


def calibrate(graph: gs.Graph, tensors: list[str], data: DataSource, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None) -> dict[str, TensorStats]:
    """Run the float graph on the data and return statistics of `tensors` (the graph is not
    changed). Only the requested tensors are made outputs, so onnxruntime computes just what
    they need; statistics stream batch by batch, so memory does not grow with the sample count."""
    g = graph.copy()
    tmap = g.tensors()
    outs = []
    for name in tensors:
        t = tmap[name]
        if t.dtype is None:
            t.dtype = np.float32
        outs.append(t)
    g.outputs = outs
    g.cleanup()
    model = to_model(g)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DfqError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None
    fixed = [s.fixed_batch for s in data.specs if s.fixed_batch is not None]
    if fixed:
        batch_size = fixed[0]
    stats = {name: TensorStats() for name in tensors}
    names = [o.name for o in sess.get_outputs()]
    for batch in data.batches(batch_size):
        try:
            values = sess.run(names, batch)
        except Exception as e:
            raise DfqError(f"{data.where}: onnxruntime failed on the data: {str(e).splitlines()[0]}") from None
        for name, v in zip(names, values):
            stats[name] = stats[name].merge(TensorStats.of(v))
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
    return stats
