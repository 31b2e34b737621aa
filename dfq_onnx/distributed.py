"""Calibration and validation on many processes or machines, with Ray (the [ray] extra).

`convert --workers N` / `validate --workers N` start a local Ray cluster of N worker processes;
`--ray ADDRESS` joins one started with `ray start --head` (and `ray start --address ...` on the
other nodes). Sharded, not copied:

- The data source (a .npz file, or a folder of .npy files or images) is split into shards of
  whole batches: shard k is a range of sample indices, rows of the .npz or files of the folder in
  name order. Each worker reads only its own rows or files, from the same path (on several
  machines the data must be at that path on each: a shared or copied folder).
- Each worker is a Ray actor that builds its onnxruntime session once (one intra-op thread: an
  actor owns one CPU). For calibration the driver puts the probe graph (the float graph with
  its reductions, passes/calibrate.probe_graph) in Ray's object store once, its weights as numpy
  arrays that the workers of a node map from shared memory; for validation each worker loads
  the two model files.
- A worker returns mergeable values only: calibration TensorStats (integer counts and
  histograms, float32 minima and maxima) and validation partial_figures per batch (float64
  energies, maxima, counts, top-5 classes). The driver merges them in shard order, which is the
  order of the batches in one process, so `convert --workers N` writes the same bytes as one
  process and `validate --workers N` reports the same figures (latency aside).
- The stages after calibration (exponent search, GPTQ rounding, bias correction) run on the
  driver, on the first calibration batches, which the driver reads itself (at most a few hundred
  samples; see pipeline.Conversion.samples).

A worker that dies (killed, out of memory) ends the run with one line; nothing is written.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .calibration_data import (IMAGE_SUFFIXES, DataSource, InputSpec, Preprocess, label_from_name, load_image,
                               npy_header, npz_member, stored_data_start)
from .errors import DfqError

INSTALL = "pip install 'dfq-onnx[ray]'"
# Tests: with DFQ_TEST_KILL_WORKER=K, worker K ends its process (os._exit) after its first batch.
KILL_HOOK = "DFQ_TEST_KILL_WORKER"


def require_ray():
    """The ray module, or a one-line DfqError that says what to install."""
    try:
        import ray
    except ImportError:
        raise DfqError(f"--workers and --ray need Ray, which is not installed: {INSTALL}") from None
    return ray


# --- shards ------------------------------------------------------------------------------------
def npz_shape(path: Path, key: str) -> tuple | None:
    """The shape of array `key` of an .npz, from its header only (None: no such array)."""
    m = npz_member(path, key)
    if m is None:
        return None
    z, info = m
    with z, z.open(info) as f:
        return npy_header(f)[0]


@contextlib.contextmanager
def _npz_at(path: Path, key: str, lo: int):
    """(shape, dtype, row bytes, a file positioned at row lo) of array `key` of an .npz: a stored
    (np.savez) member is the .npz file itself at the row's offset; a compressed one
    (np.savez_compressed) is decompressed up to it. Fortran-ordered arrays: row bytes None."""
    z, info = npz_member(path, key)
    with z, z.open(info) as f:
        shape, fortran, dtype = npy_header(f)
        row = None if fortran or dtype.hasobject or not shape else \
            int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if row is None:
            yield shape, dtype, None, f
        elif info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as raw:
                raw.seek(stored_data_start(raw, info) + f.tell() + lo * row)
                yield shape, dtype, row, raw
        else:
            f.seek(lo * row, 1)
            yield shape, dtype, row, f


def _rows_from(f, shape: tuple, dtype: np.dtype, row: int, count: int) -> np.ndarray:
    buf = f.read(count * row)
    return np.frombuffer(buf, dtype=dtype).reshape((len(buf) // row,) + tuple(shape[1:])).copy()


def npz_rows(path: Path, key: str, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi-1 of array `key` of an .npz, reading only those (and, compressed, what precedes)."""
    with _npz_at(path, key, lo) as (shape, dtype, row, f):
        if row is None:
            return np.load(f, allow_pickle=False)[lo:hi]
        return _rows_from(f, shape, dtype, row, max(min(hi, shape[0]) - lo, 0))


class _NpzRows:
    """Re-iterable samples lo..hi-1 of an .npz, read BLOCK rows at a time (npz_rows): a shard is
    never whole in memory."""
    BLOCK = 64

    def __init__(self, path: Path, names: list[str], lo: int, hi: int):
        self.path, self.names, self.lo, self.hi = path, names, lo, hi

    def __iter__(self) -> Iterator[dict]:
        with contextlib.ExitStack() as stack:  # one reader per array, each read front to back
            readers = {k: stack.enter_context(_npz_at(self.path, k, self.lo)) for k in self.names}
            if any(r[2] is None for r in readers.values()):  # Fortran order: whole arrays
                yield {k: npz_rows(self.path, k, self.lo, self.hi) for k in self.names}
                return
            for a in range(self.lo, self.hi, self.BLOCK):
                n = min(self.BLOCK, self.hi - a)
                yield {k: _rows_from(f, shape, dtype, row, n) for k, (shape, dtype, row, f) in readers.items()}


class _FolderRows:
    """Re-iterable samples lo..hi-1 of a folder of .npy files or images (name order), as the items
    DataSource reads: one dict per file (a slice of it, for a file holding a batch)."""

    def __init__(self, files: list[tuple[Path, int]], kind: str, spec: InputSpec, pre: Preprocess, lo: int, hi: int):
        self.files, self.kind, self.spec, self.pre, self.lo, self.hi = files, kind, spec, pre, lo, hi

    def __iter__(self) -> Iterator[dict]:
        start = 0
        for f, rows in self.files:
            a, b = max(self.lo - start, 0), min(self.hi - start, rows)
            start += rows
            if a >= b:
                if start >= self.hi:
                    return
                continue
            if self.kind == "images":
                yield {self.spec.name: load_image(f, self.spec, self.pre)[None]}
                continue
            try:
                x = np.load(f, mmap_mode="r", allow_pickle=False)
            except Exception as e:
                raise DfqError(f"{f}: not a readable .npy file ({e})") from None
            x = x[None] if x.ndim == len(self.spec.shape) - 1 else x
            yield {self.spec.name: np.array(x[a:b])}


class ShardedSource:
    """A data source split by sample index without reading it: a .npz file (rows; sizes from the
    array headers) or a folder of .npy files or images (files in name order; rows of a .npy from
    its header). Stands in for DataSource on the driver (len, fixed_batch, labels, casts, where,
    batches of the first samples); `read(lo, hi)` is the DataSource of one shard, in a worker."""

    def __init__(self, src, specs: list[InputSpec], *, num_samples: int | None = None, preprocess=None):
        if not isinstance(src, (str, Path)) or not Path(src).exists() or \
                (Path(src).is_file() and Path(src).suffix.lower() != ".npz"):
            if isinstance(src, (str, Path)) and not Path(src).exists():
                raise DfqError(f"{src}: no such file or folder")
            raise DfqError("--workers / --ray split a .npz file or a folder of .npy files or images by sample; "
                           "this data is neither")
        if num_samples is not None and num_samples < 1:
            raise DfqError("--num-samples must be at least 1")
        self.path, self.specs, self.num_samples = Path(src), specs, num_samples
        self.pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.parse(preprocess)
        self.where = str(self.path)
        self.casts: dict[str, tuple[str, str]] = {}
        if self.path.is_file():
            self.kind = "npz"
            try:
                shapes = {s.name: npz_shape(self.path, s.name) for s in specs}
            except Exception as e:
                raise DfqError(f"{self.path}: not a readable .npz file ({e})") from None
            missing = [k for k, v in shapes.items() if v is None]
            if missing:
                raise DfqError(f"{self.path}: missing model input(s) {missing}")
            self.rows = min((v[0] if v else 1) for v in shapes.values())
            self.files = []
        else:
            files = sorted(f for f in self.path.iterdir() if f.is_file())
            npys = [f for f in files if f.suffix.lower() == ".npy"]
            imgs = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            if not (npys or imgs):
                raise DfqError(f"{self.path}: folder has no .npy files or images")
            if len(specs) != 1:
                raise DfqError(f"{self.path}: a folder of files only works for single-input models; use .npz")
            self.kind = "npy" if npys else "images"
            self.files = [(f, self._file_rows(f)) for f in (npys or imgs)]
            self.rows = sum(r for _, r in self.files)

    def _file_rows(self, f: Path) -> int:
        if self.kind == "images":
            return 1
        try:
            x = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DfqError(f"{f}: not a readable .npy file ({e})") from None
        return 1 if x.ndim == len(self.specs[0].shape) - 1 else int(x.shape[0])

    def __len__(self) -> int:
        return min(self.rows, self.num_samples) if self.num_samples else self.rows

    @property
    def fixed_batch(self) -> int | None:
        return next((s.fixed_batch for s in self.specs if s.fixed_batch is not None), None)

    @property
    def labels(self) -> np.ndarray | None:
        n = len(self)
        if self.kind == "npz":
            shape = npz_shape(self.path, "labels")
            return None if shape is None else npz_rows(self.path, "labels", 0, n).reshape(-1)[:n]
        if self.kind == "images":
            labels = [label_from_name(f) for f, _ in self.files[:n]]
            return None if any(x is None for x in labels) else np.asarray(labels)
        return None

    def shards(self, workers: int, batch_size: int) -> list[tuple[int, int]]:
        """(lo, hi) sample ranges, at most `workers`, each of whole batches (a model with a fixed
        batch drops the samples that do not fill one, as DataSource.batches does)."""
        bs = self.fixed_batch or batch_size
        n = len(self)
        usable = n - n % bs if self.fixed_batch and n >= bs else n
        batches = math.ceil(usable / bs)
        cuts = [min(usable, (k * batches // workers) * bs) for k in range(workers + 1)]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, n)]

    def read(self, lo: int, hi: int) -> DataSource:
        """The DataSource of samples lo..hi-1 (reads only those)."""
        if self.kind == "npz":
            ds = DataSource(_NpzRows(self.path, [s.name for s in self.specs], lo, hi), self.specs,
                            preprocess=self.pre)
        else:
            ds = DataSource(_FolderRows(self.files, self.kind, self.specs[0], self.pre, lo, hi), self.specs,
                            preprocess=self.pre)
        ds.where = self.where
        return ds

    def batches(self, batch_size: int, samples: int | None = None) -> Iterator[dict]:
        """Batches of the first `samples` (default all) samples, read here (the driver's kept batches)."""
        bs = self.fixed_batch or batch_size
        hi = len(self) if samples is None else min(len(self), math.ceil(max(samples, 1) / bs) * bs)
        return self.read(0, hi).batches(batch_size)


# --- the cluster -------------------------------------------------------------------------------
def _actor_classes(ray):
    """The two worker classes (defined here: Ray is imported only when a cluster is asked for)."""

    @ray.remote(num_cpus=1)
    class Calibrator:
        """Holds one onnxruntime session of the probe graph; calibrates shards of the data."""

        def __init__(self, probe: tuple, source: ShardedSource, die_after: int | None):
            from .model_io import analysis_session, to_graph
            import onnx

            started = time.perf_counter()
            structure, arrays = probe
            self.source, self.die_after = source, die_after
            self.sess = analysis_session(to_graph(onnx.load_from_string(structure), arrays),
                                         "onnxruntime cannot run the model", threads=1)
            self.load_seconds = time.perf_counter() - started

        def run(self, tensors: list[str], lo: int, hi: int, batch_size: int):
            """A stream: ("batch", samples) per batch, then ("result", {stats, casts}) or ("error", line)."""
            from .passes.calibrate import TensorStats, merge_stats, probe_batch

            started = time.perf_counter()
            data = self.source.read(lo, hi)
            stats = {name: TensorStats() for name in tensors}
            try:
                for i, batch in enumerate(data.batches(batch_size)):
                    stats = merge_stats(stats, probe_batch(self.sess, tensors, batch, data.where)[0])
                    if self.die_after is not None and i + 1 >= self.die_after:
                        os._exit(3)
                    yield ("batch", len(next(iter(batch.values()))))
            except DfqError as e:
                yield ("error", str(e))
                return
            yield ("result", {"stats": stats, "casts": data.casts,
                              "worker": _measures(self.load_seconds, started, hi - lo)})

    @ray.remote(num_cpus=1)
    class Evaluator:
        """Holds onnxruntime sessions of the float model and the quantized one (deployed and
        simulated); returns partial_figures per batch of its shards."""

        def __init__(self, float_model, quant_model, source: ShardedSource, die_after: int | None):
            from .validate import _session

            started = time.perf_counter()
            self.fsess, self.qsess = _session(float_model, 1), _session(quant_model, 1)
            self.ssess = _session(quant_model, 1, simulated=True)
            self.source, self.die_after = source, die_after
            self.load_seconds = time.perf_counter() - started

        def run(self, names: list[str], lo: int, hi: int, batch_size: int, threshold: float):
            from .validate import output_kind, partial_figures

            started = time.perf_counter()
            data = self.source.read(lo, hi)
            parts, kind = [], None
            try:
                for batch in data.batches(batch_size):
                    try:
                        yf = self.fsess.run(None, batch)
                        yq, ys = self.qsess.run(None, batch), self.ssess.run(None, batch)
                    except Exception as e:
                        raise DfqError(f"{data.where}: onnxruntime failed on the data: "
                                       f"{str(e).strip().splitlines()[0]}") from None
                    kind = output_kind(yf[0])
                    parts.append((partial_figures(names, yf, yq, kind, threshold),
                                  partial_figures(names, yf, ys, kind, threshold)))
                    if self.die_after is not None and len(parts) >= self.die_after:
                        os._exit(3)
                    yield ("batch", len(yf[0]))
            except DfqError as e:
                yield ("error", str(e))
                return
            yield ("result", {"parts": parts, "kind": kind, "worker": _measures(self.load_seconds, started, hi - lo)})

    return Calibrator, Evaluator


def _measures(load_seconds: float, started: float, samples: int) -> dict:
    """What a worker reports beside its result: model load time, shard time, samples, peak RSS."""
    try:
        peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"load_seconds": load_seconds, "seconds": time.perf_counter() - started, "samples": samples,
            "peak_rss_mb": peak}


def _quiet(ray) -> None:
    """Ray's driver prints the cluster's error messages (a worker that died, with its ids and
    advice) on stdout from a background thread; the run reports such a failure itself, in one
    line, and stdout carries only the command's own output (JSON included)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is not None and hasattr(worker, "print_to_stdstream"):
        worker.print_to_stdstream = lambda data, ignore_prefix=False: None


class Cluster:
    """A Ray cluster for the duration of a `with` block: a local one of `workers` CPUs, or the one
    at `address` (then `workers` actors, default one per CPU of the cluster). Ray must be
    installed (require_ray); the driver is this process."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        if workers is not None and workers < 1:
            raise DfqError("--workers must be at least 1")
        self.ray = require_ray()
        self.workers, self.address = workers, address
        self.started = False
        self.report: dict = {}  # the last run: per worker load/shard seconds and peak RSS; the merge's cost

    def __enter__(self) -> "Cluster":
        ray = self.ray
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
        try:
            if self.address is not None:
                ray.init(address=self.address, **kw)
            else:
                ray.init(num_cpus=self.workers, **kw)
        except Exception as e:
            raise DfqError(f"cannot {'join the Ray cluster at ' + self.address if self.address else 'start Ray'}: "
                           f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        self.started = True
        _quiet(ray)
        if self.workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def source(self, src, specs: list[InputSpec], *, num_samples=None, preprocess=None) -> ShardedSource:
        return ShardedSource(src, specs, num_samples=num_samples, preprocess=preprocess)

    def _die_after(self, rank: int) -> int | None:
        return 1 if os.environ.get(KILL_HOOK) == str(rank) else None

    def _gather(self, what: str, calls: list, on_batch: Callable[[int], None] | None) -> list:
        """Drain the workers' streams (progress as it comes), return their results in shard order.
        A worker's own error, or its death, ends the run with one line."""
        ray = self.ray
        index = {g: k for k, g in enumerate(calls)}
        results: list = [None] * len(calls)
        pending = list(calls)
        try:
            while pending:
                ready, _ = ray.wait(pending, num_returns=1, timeout=0.5)  # back in Python twice a second
                if not ready:  # (so that a Ctrl-C is seen)
                    continue
                g = ready[0]
                try:
                    tag, value = ray.get(next(g))
                except StopIteration:
                    pending.remove(g)
                    continue
                if tag == "batch":
                    if on_batch is not None:
                        on_batch(value)
                elif tag == "error":
                    raise DfqError(value)
                else:
                    results[index[g]] = value
        except DfqError:
            raise
        except Exception as e:  # RayActorError (a worker died), ObjectLostError, ...
            k = index.get(g, "?") if "g" in locals() else "?"
            raise DfqError(f"Ray worker {k} failed during {what} ({type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0]}); nothing was written") from None
        return results

    def _note(self, results: list, merge_started: float, result_bytes: int) -> None:
        self.report = {"workers": [r["worker"] for r in results], "result_bytes": result_bytes,
                       "merge_seconds": time.perf_counter() - merge_started}

    def calibrate(self, graph, tensors: list[str], data: ShardedSource, batch_size: int = 32,
                  on_batch: Callable[[int], None] | None = None, keep: list | None = None,
                  keep_samples: int = 0, reference: list | None = None) -> dict:
        """passes/calibrate.calibrate on the cluster: the same statistics, merged in shard order.
        The kept batches are read here, and with `reference` run here through the same probe
        session one process uses (its values, byte for byte), while the workers calibrate."""
        from .model_io import analysis_session, stubbed, to_model
        from .passes.calibrate import TensorStats, merge_stats, probe_batch, probe_graph
        from onnx_graphsurgeon.ir.tensor import LazyValues

        probe = probe_graph(graph, tensors, reference=reference is not None)
        with stubbed(probe) as (values, _):
            structure = to_model(probe).SerializeToString()
        arrays = {k: np.ascontiguousarray(v.load() if isinstance(v, LazyValues) else v) for k, v in values.items()}
        ref = self.ray.put((structure, arrays))
        del arrays
        Calibrator, _ = _actor_classes(self.ray)
        shards = data.shards(self.workers, batch_size)
        actors = [Calibrator.remote(ref, data, self._die_after(k)) for k in range(len(shards))]
        calls = [a.run.remote(tensors, lo, hi, batch_size) for a, (lo, hi) in zip(actors, shards)]
        if keep is not None and keep_samples > 0:  # the later stages' samples, read here
            sess = None if reference is None else analysis_session(probe, "onnxruntime cannot run the model")
            kept = 0
            for batch in data.batches(batch_size, keep_samples):
                if kept >= keep_samples:
                    break
                keep.append(batch)
                kept += len(next(iter(batch.values())))
                if sess is not None:
                    reference.append(probe_batch(sess, tensors, batch, data.where, with_reference=True)[1])
            del sess
        del probe
        results = self._gather("calibration", calls, on_batch)
        merge = time.perf_counter()
        stats = {name: TensorStats() for name in tensors}
        for r in results:  # shard order: the order of the batches in one process
            stats = merge_stats(stats, r["stats"])
            for k, v in r["casts"].items():
                data.casts.setdefault(k, v)
        self._note(results, merge, len(pickle.dumps(results[0]["stats"])))
        for a in actors:
            self.ray.kill(a)
        return stats

    def evaluate(self, float_model, quant_model, names: list[str], data: ShardedSource, batch_size: int,
                 threshold: float, on_batch: Callable[[int], None] | None = None) -> tuple[str, list, list]:
        """validate's loop on the cluster: (output kind, partial_figures of the deployed run per
        batch, those of the simulated run), batches in the order one process runs them."""
        _, Evaluator = _actor_classes(self.ray)
        shards = data.shards(self.workers, batch_size)
        fref, qref = self.ray.put(float_model), self.ray.put(quant_model)
        actors = [Evaluator.remote(fref, qref, data, self._die_after(k)) for k in range(len(shards))]
        calls = [a.run.remote(names, lo, hi, batch_size, threshold) for a, (lo, hi) in zip(actors, shards)]
        results = self._gather("validation", calls, on_batch)
        for a in actors:
            self.ray.kill(a)
        merge = time.perf_counter()
        parts = [p for r in results for p in r["parts"]]
        out = results[0]["kind"], [d for d, _ in parts], [s for _, s in parts]
        self._note(results, merge, len(pickle.dumps(results[0]["parts"])))
        return out


def maybe_cluster(workers: int | None, address: str | None):
    """A context manager for the CLI's --workers / --ray: a Cluster, or None (one process) when
    neither is given. Without Ray installed: DfqError at once, before anything runs."""
    if workers is None and address is None:
        return contextlib.nullcontext(None)
    return Cluster(workers, address)
