"""Collect activation statistics at module boundaries with onnxruntime (an analysis)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration_data import DataSource
from ..errors import DfqError
from ..fixedpoint import HIST_BINS, abs_histogram, rescale_histogram
from ..graph_utils import add_node, new_name
from ..model_io import analysis_session, batch_major, in_order, pieces, single_sample


# Per sample and tensor, the histogram sees an evenly strided subset of about this many values
# (min and max see every value). Subsampling happens inside onnxruntime, so the large activations
# are never copied out: memory stays near one forward pass and does not grow with the samples.
HIST_SAMPLES_PER_ITEM = 1 << 13


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

    def scaled(self, c: float) -> "TensorStats":
        """Statistics of c x for c > 0 (the histogram re-binned by its bin centres)."""
        return TensorStats(self.count, self.min * c, self.max * c, rescale_histogram(self.hist, c))

    def merge(self, other: "TensorStats") -> "TensorStats":
        return TensorStats(self.count + other.count, min(self.min, other.min), max(self.max, other.max),
                           self.hist + other.hist)


def calibrate(graph: gs.Graph, tensors: list[str], data: DataSource, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None, keep: list | None = None,
              keep_samples: int = 0, reference: list | None = None) -> dict[str, TensorStats]:
    """Run the float graph on the data and return statistics of `tensors` (the graph is not
    changed). The run computes only what they need, and onnxruntime reduces each tensor to its
    min, max and a strided per-sample subset before anything reaches numpy, so memory stays near
    one forward pass and does not grow with the sample count. Each sample is subsampled the same
    way whatever the batching, so statistics of shards merge into those of the whole set.
    The first batches, up to keep_samples samples, are appended to `keep` for later passes, and
    the float graph's first output on each of them to `reference` (if given): the later passes
    compare against it without running the float model again."""
    split = batch_major(graph)
    sess = analysis_session(probe_graph(graph, tensors, reference=reference is not None),
                            "onnxruntime cannot run the model", side_by_side=split or single_sample(graph))
    return run_probe(sess, tensors, data, batch_size, on_batch, keep, keep_samples, reference, split)


def probe_graph(graph: gs.Graph, tensors: list[str], reference: bool = False) -> gs.Graph:
    """A copy of the float graph whose outputs are the reductions of `tensors` (_reductions, four
    per tensor, in order), then with `reference` the float graph's first output, and which
    computes nothing else; it shares the weights."""
    g = graph.copy()
    tmap = g.tensors()
    first = g.outputs[0]
    outs = []
    for name in tensors:
        t = tmap[name]
        if t.dtype is None:
            t.dtype = np.float32
        outs += _reductions(g, t)
    g.outputs = outs + ([first] if reference else [])
    g.cleanup()
    return g


def run_probe(sess, tensors: list[str], data: DataSource, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None, keep: list | None = None,
              keep_samples: int = 0, reference: list | None = None, split: bool = False) -> dict[str, TensorStats]:
    """calibrate's loop on a session of probe_graph (also what each worker of a cluster runs on its
    shard, dfq_onnx/distributed.py); with `reference`, the session's last output (the float
    model's first) on each kept batch is appended to it. With `split` (model_io.batch_major), each
    batch is run in pieces (model_io.pieces), side by side where the session does
    (model_io.in_order): the same statistics (each sample is reduced on its own), and one batch's
    activations in flight, not several (MobileNetV2, 128 samples: calibration's peak RSS 760 MB
    with whole batches side by side, 494 MB in pieces)."""
    stats = {name: TensorStats() for name in tensors}
    kept = 0

    def marked():  # each batch's pieces, with whether the batch is kept (decided in order as it is read)
        nonlocal kept
        for batch in data.batches(batch_size):
            keeping = keep is not None and kept < keep_samples
            if keeping:
                keep.append(batch)
                kept += len(next(iter(batch.values())))
            cut = list(pieces([batch], split))
            for i, piece in enumerate(cut):
                yield piece, keeping, i == len(cut) - 1

    def probe(item):
        piece, keeping, last = item
        part, ref = probe_batch(sess, tensors, piece, data.where, with_reference=keeping and reference is not None)
        return len(next(iter(piece.values()))), part, ref, last

    refs = []
    for n, part, ref, last in in_order(sess, probe, marked()):  # merged in the batches' order
        if ref is not None:
            refs.append(ref)
            if last:
                reference.append(refs[0] if len(refs) == 1 else np.concatenate(refs))
                refs = []
        stats = merge_stats(stats, part)
        if on_batch is not None:
            on_batch(n)
    return stats


def probe_batch(sess, tensors: list[str], batch: dict, where: str,
                with_reference: bool = False) -> tuple[dict[str, TensorStats], np.ndarray | None]:
    """(statistics of `tensors` on one batch, and with_reference the float model's first output
    on it, else None), from a session of probe_graph."""
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names if with_reference else names[:4 * len(tensors)], batch)
    except Exception as e:
        raise DfqError(f"{where}: onnxruntime failed on the data: {str(e).splitlines()[0]}") from None
    stats = {name: TensorStats(int(size), float(lo), float(hi), abs_histogram(sample))
             for name, (lo, hi, sample, size) in zip(tensors, zip(*[iter(values[:4 * len(tensors)])] * 4))}
    return stats, np.array(values[-1]) if with_reference else None  # a copy: onnxruntime's buffer would keep its arena


def merge_stats(a: dict[str, TensorStats], b: dict[str, TensorStats]) -> dict[str, TensorStats]:
    """Per tensor, a merged with b (exact: counts and histograms add, minima and maxima compare)."""
    return {name: a[name].merge(b[name]) for name in a}


def _reductions(g: gs.Graph, t: gs.Variable) -> list[gs.Variable]:
    """New graph outputs for tensor t: its min, its max, per sample an evenly strided subset of
    about HIST_SAMPLES_PER_ITEM values (odd stride, so no image row or column dominates), and its
    element count. The stride is computed inside the graph from t's runtime shape, so a tensor with
    dynamic dims is subsampled exactly as the same tensor with those dims fixed."""
    def out(op: str, inputs: list, attrs: dict | None = None, dtype=np.float32) -> gs.Variable:
        return add_node(g, op, inputs, attrs, f"{t.name}/{op}", dtype=dtype)

    def const(name: str, v: int) -> gs.Constant:
        return gs.Constant(new_name(g, f"{t.name}/{name}"), np.array([v], dtype=np.int64))

    lo = out("ReduceMin", [t], {"keepdims": 0})
    hi = out("ReduceMax", [t], {"keepdims": 0})
    size = out("Size", [t], dtype=np.int64)
    if t.shape is not None and len(t.shape) < 1:
        return [lo, hi, t, size]
    flat = out("Flatten", [t], {"axis": 1})
    per = out("Slice", [out("Shape", [flat], dtype=np.int64), const("one", 1), const("two", 2)], dtype=np.int64)
    # stride (per // N) | 1, written as ((per // N) // 2) * 2 + 1 in int64 arithmetic
    half = out("Div", [out("Div", [per, const("n", HIST_SAMPLES_PER_ITEM)], dtype=np.int64), const("2", 2)],
               dtype=np.int64)
    step = out("Add", [out("Mul", [half, const("2", 2)], dtype=np.int64), const("1", 1)], dtype=np.int64)
    sample = out("Slice", [flat, const("start", 0), const("end", np.iinfo(np.int64).max), const("axis", 1), step])
    return [lo, hi, sample, size]
