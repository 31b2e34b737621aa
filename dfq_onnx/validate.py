"""Compare a quantized model with its float original under onnxruntime, on the same inputs.

Works on models from any quantizer (dfq-onnx, onnxruntime's quantize_static, ...), and on a C
library folder written by `convert --format c` (built and run through c_runner.py).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .calibration_data import DataSource, input_specs
from .energy import energies, sqnr_db
from .errors import DfqError
from .model_io import read_model
from .report import inspect_model


def _session(model, threads: int, simulated: bool = False) -> ort.InferenceSession:
    """simulated: no graph optimizations, so DequantizeLinear -> float op -> QuantizeLinear runs as
    written, in float (the arithmetic the quantizer simulated); else the deployed graph with
    onnxruntime's default optimizations (fused int8 kernels)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if simulated:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DfqError(f"onnxruntime cannot load {model if not isinstance(model, onnx.ModelProto) else 'model'}: "
                       f"{str(e).strip().splitlines()[0]}") from None


def qonnx_as_qcdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A QONNX model (QONNX Quant nodes) as qonnx's QuantToQCDQ writes it: the same quantizers as
    QuantizeLinear/Clip/DequantizeLinear, which onnxruntime runs; any other model unchanged. Needs
    the qonnx package (the [qonnx] extra): without it, a one-line error that says so."""
    if not any(n.op_type == "Quant" and n.domain.startswith("qonnx") for n in model.graph.node):
        return model
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.infer_shapes import InferShapes
        from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ
    except ImportError:
        raise DfqError("the quantized model is QONNX (Quant nodes), which onnxruntime cannot run: validate "
                       "converts it with qonnx; pip install 'dfq-onnx[qonnx]'") from None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        out = ModelWrapper(m).transform(InferShapes()).transform(QuantToQCDQ()).model
    except Exception as e:
        raise DfqError(f"qonnx cannot convert the QONNX model to QuantizeLinear/DequantizeLinear: "
                       f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if any(n.op_type == "Quant" for n in out.graph.node):
        raise DfqError("qonnx left Quant nodes it cannot express as QuantizeLinear/DequantizeLinear "
                       "(more than 8 bits, or a non-integer zero point): onnxruntime cannot run them")
    return out


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits.reshape(len(logits), -1), axis=1)[:, :k]


def _load_labels(labels) -> np.ndarray | None:
    if labels is None or isinstance(labels, np.ndarray):
        return labels
    p = Path(labels)
    if not p.is_file():
        raise DfqError(f"{p}: no such labels file")
    try:
        if p.suffix == ".npy":
            return np.load(p).reshape(-1)
        return np.loadtxt(p, dtype=np.int64).reshape(-1)
    except Exception as e:
        raise DfqError(f"{p}: cannot read labels ({e})") from None


def _class_labels(n: int, kind: str, labels, data) -> np.ndarray | None:
    """The class labels: those given, else the data's own, checked against the sample count n;
    None unless the first output holds class scores (kind "classes": labels mean nothing for a map)."""
    if labels is None:
        labels = data.labels
    labels = _load_labels(labels)
    if labels is not None and len(labels) != n:
        raise DfqError(f"labels: {len(labels)} labels for {n} samples")
    return labels if kind == "classes" else None


def output_kind(y: np.ndarray) -> str:
    """What the first output holds, from its shape without the batch axis: "classes" (one axis
    longer than 1: class scores), "map" (two or more: a probability, segmentation or detection
    map) or "values" (one number per sample)."""
    long_axes = sum(1 for d in y.shape[1:] if d > 1)
    return "classes" if long_axes == 1 else "map" if long_axes > 1 else "values"


def validate(float_model, quant_model, data, *, labels=None, num_samples: int | None = None,
             batch_size: int = 32, threads: int = 2, runs: int = 50, preprocess: str | None = None,
             threshold: float = 0.5, decode: str | None = None, postprocess: str | None = None,
             conf: float | None = None, iou: float = 0.45, label_classes: list[str] | None = None,
             on_start=None, on_batch=None, cluster=None) -> dict:
    """Accuracy, agreement, SQNR, max error, requantization points, op counts and latency of both.
    on_start(number of samples) and on_batch(samples done in a batch) report progress. cluster: an
    entered dfq_onnx.distributed.Cluster whose workers each run a shard of the data (the same
    figures; latency is measured here; not with box decoding or a C library yet).

    Figures by the first output's kind (output_kind): top-1/top-5 accuracy and top-1 agreement
    only for class scores (None otherwise); for a map, the percentage of elements on the same
    side of `threshold` in both models, and map figures (mask IoU at `threshold`, the share each
    model marks, median per-sample SQNR); SQNR (pooled: over all samples at once) and max abs
    error for every output.

    The quantized model runs twice: deployed (default optimizations: onnxruntime's int8 kernels;
    the top-level figures) and simulated (no optimizations: the float arithmetic of the QDQ
    graph; under "simulated"). Their difference shows kernels that do not compute what the
    graph says (such as 16-bit saturation in u8s8 kernels on CPUs without VNNI).

    Boxes (decode "yolo" | "picodet" | "dbnet", or postprocess "module:function"; see
    dfq_onnx.detection): both models' outputs are decoded the same way (conf: score threshold,
    None for the decoder's default; iou: NMS IoU) and "detection" holds the quantized model's
    COCO mAP@0.5 / mAP@[.5:.95] against the float model's detections (vs_float), both models' mAP
    against ground truth when `labels` is a COCO JSON file or a folder of KITTI label files
    (vs_labels), and detections per image; None without a decoder. COCO JSON: sample i is the
    i-th entry of "images" (without "images", image id i); model class k is the k-th category by
    ascending id (or the k-th name of label_classes). KITTI: one .txt per sample in sorted name
    order; class k is the k-th of label_classes (default Car, Van, Truck, Pedestrian,
    Person_sitting, Cyclist, Tram, Misc; DontCare and other types are skipped). Boxes are in
    model-input pixels.

    quant_model may also be a folder written by `convert --format c`: see validate_c; or a QONNX
    model (Quant nodes), run as qonnx's QCDQ conversion of it (qonnx_as_qcdq)."""
    box = _box_setup(labels, decode, postprocess)
    if box["labels"] is not None:
        labels = None
    if cluster is not None and box["on"]:
        raise DfqError("validate on a cluster (--workers / --ray) does not decode boxes yet: "
                       "drop --decode/--postprocess or run in one process")
    if isinstance(quant_model, (str, Path)) and Path(quant_model).is_dir():
        if cluster is not None:
            raise DfqError("validate on a cluster (--workers / --ray) runs ONNX models only: "
                           "a C library folder runs in one process")
        return validate_c(float_model, quant_model, data, labels=labels, num_samples=num_samples,
                          batch_size=batch_size, threads=threads, runs=runs, preprocess=preprocess,
                          threshold=threshold, decode=decode, postprocess=postprocess, conf=conf, iou=iou,
                          label_classes=label_classes, _box=box, on_start=on_start, on_batch=on_batch)
    fm, read = read_model(float_model, False), read_model(quant_model, False)
    qm = qonnx_as_qcdq(read)
    if qm is not read:  # a QONNX model: onnxruntime runs its QCDQ conversion
        quant_model = qm
    fs, qs = input_specs(fm), input_specs(qm)
    if [(s.name, s.dtype, s.shape[1:]) for s in fs] != [(s.name, s.dtype, s.shape[1:]) for s in qs]:
        raise DfqError("the two models have different inputs: "
                       f"{[(s.name, s.shape) for s in fs]} vs {[(s.name, s.shape) for s in qs]}")
    f_out = [o.name for o in fm.graph.output]
    q_out = [o.name for o in qm.graph.output]
    if len(f_out) != len(q_out):
        raise DfqError(f"the two models have different outputs: {f_out} vs {q_out}")
    source = DataSource if cluster is None else cluster.source  # a cluster's: split, read by its workers
    data = source(data, fs, num_samples=num_samples, preprocess=preprocess)
    if on_start is not None:
        on_start(len(data))
    fsess, qsess = _session(float_model, threads), _session(quant_model, threads)
    fixed = [s.fixed_batch for s in qs if s.fixed_batch is not None]
    bs = fixed[0] if fixed else batch_size  # the float model's fixed batch: DataSource.batches
    one = fixed[0] if fixed else 1  # latency's batch: one sample, or the fixed batch (no other size runs)
    if cluster is not None:  # partial figures of each batch, from the workers, in batch order
        kind, parts_q, parts_s = cluster.evaluate(float_model, quant_model, f_out, data, bs, threshold, on_batch)
        n = sum(p["samples"] for p in parts_q)
        labels = _class_labels(n, kind, labels, data)
        deployed, simulated = (finish_figures(f_out, parts_q, labels, kind),
                               finish_figures(f_out, parts_s, labels, kind))
        first = {k: v[:one] for k, v in next(iter(data.batches(bs, 1))).items()}
        det = None
    else:
        first, n, kind, labels, deployed, simulated, det = _run_here(
            fsess, qsess, _session(quant_model, threads, simulated=True), f_out, data, bs, labels, threshold,
            box, fm, conf, iou, label_classes, on_batch, one)
    fi, qi = inspect_model(fm), inspect_model(qm)
    return {
        "samples": n,
        "output_kind": kind,
        "threshold": threshold if kind == "map" else None,
        "map_agreement": deployed["map_agreement"],
        "map": deployed["map"],
        "float": deployed["float"],
        "quant": deployed["quant"],
        "agreement_top1": deployed["agreement_top1"],
        "sqnr_db": deployed["sqnr_db"],
        "max_abs_error": deployed["max_abs_error"],
        "simulated": {"top1": simulated["quant"]["top1"], "top5": simulated["quant"]["top5"],
                      "agreement_top1": simulated["agreement_top1"], "map_agreement": simulated["map_agreement"],
                      "map": simulated["map"],
                      "sqnr_db": simulated["sqnr_db"],
                      "max_abs_error": simulated["max_abs_error"]},
        "deployed_minus_simulated_agreement": None if kind != "classes" else
        deployed["agreement_top1"] - simulated["agreement_top1"],
        "detection": det,
        "latency_ms": {"float": _latency(fsess, first, runs), "quant": _latency(qsess, first, runs)},
        "latency_batch": one,
        "threads": threads,
        "requant_points": {"float": fi["requant_points"], "quant": qi["requant_points"]},
        "op_types": {"float": fi["op_types"], "quant": qi["op_types"]},
        "nodes": {"float": fi["nodes"], "quant": qi["nodes"]},
    }


def _run_here(fsess, qsess, ssess, f_out: list[str], data: DataSource, bs: int, labels, threshold: float,
              box: dict, fm, conf, iou: float, label_classes, on_batch, one: int = 1) -> tuple:
    """validate's loop in this process: (first sample, samples, output kind, class labels, figures
    of the deployed run, of the simulated run, detection figures)."""
    outs_f: list[list[np.ndarray]] = [[] for _ in f_out]
    outs_q: list[list[np.ndarray]] = [[] for _ in f_out]
    outs_s: list[list[np.ndarray]] = [[] for _ in f_out]
    first = None
    for batch in data.batches(bs):
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
        if first is None:  # the latency's input: `one` rows (one sample, or a fixed batch)
            first = {k: v[:one] for k, v in batch.items()}
        try:
            yf, yq, ys = fsess.run(None, batch), qsess.run(None, batch), ssess.run(None, batch)
        except Exception as e:
            raise DfqError(f"{data.where}: onnxruntime failed on the data: {str(e).strip().splitlines()[0]}") from None
        for i in range(len(f_out)):
            outs_f[i].append(yf[i])
            outs_q[i].append(yq[i])
            outs_s[i].append(ys[i])
    F = [np.concatenate(o) for o in outs_f]
    Q = [np.concatenate(o) for o in outs_q]
    S = [np.concatenate(o) for o in outs_s]
    n, kind = len(F[0]), output_kind(F[0])
    labels = _class_labels(n, kind, labels, data)
    deployed, simulated = (_compare(f_out, F, Q, labels, kind, threshold, bs),
                           _compare(f_out, F, S, labels, kind, threshold, bs))
    det = _detection(box, fm, first, F, {"quant": Q, "simulated": S}, n, bs, conf, iou, label_classes)
    return first, n, kind, labels, deployed, simulated, det


def validate_c(float_model, c_folder, data, *, labels=None, num_samples: int | None = None,
               batch_size: int = 32, threads: int = 2, runs: int = 50, preprocess: str | None = None,
               threshold: float = 0.5, decode: str | None = None, postprocess: str | None = None,
               conf: float | None = None, iou: float = 0.45, label_classes: list[str] | None = None,
               _box: dict | None = None, on_start=None, on_batch=None) -> dict:
    """validate's figures for a C library folder (`convert --format c`): the library is built with
    the system C compiler (cached) and its NAME_run_float runs on the inputs the float model gets
    under onnxruntime, one sample at a time (its shapes are fixed at batch 1). The keys are
    validate's, but there is no simulated run ("simulated" is None), the requantization points,
    op counts and nodes of the quantized side are those of NAME_int.onnx (the integer graph the C
    code equals), latency_ms.quant is the C library's, and "c_library" says how it was built and
    on how many threads it ran: `threads` where the library has a NAME_THREADS option, else one.
    "detection" has validate's keys (the C library's outputs in place of the quantized model's)
    without "simulated"."""
    from . import c_runner

    box = _box if _box is not None else _box_setup(labels, decode, postprocess)
    if box["labels"] is not None:
        labels = None

    fm = read_model(float_model, False)
    fs = input_specs(fm)
    f_out = [o.name for o in fm.graph.output]
    runner = c_runner.load(c_folder, threads)
    lib = runner.lib
    runner.check_inputs([s.name for s in fs], [None] * len(fs))
    if len(f_out) != len(lib.outputs):
        raise DfqError(f"the model has {len(f_out)} outputs {f_out} and the C library {len(lib.outputs)} "
                       f"{[p.name for p in lib.outputs]}")
    data = DataSource(data, fs, num_samples=num_samples, preprocess=preprocess)
    if on_start is not None:
        on_start(len(data))
    fsess = _session(float_model, threads)
    outs_f: list[list[np.ndarray]] = [[] for _ in f_out]
    outs_c: list[list[np.ndarray]] = [[] for _ in f_out]
    first = None
    for batch in data.batches(batch_size):
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
        xs = [batch[s.name] for s in fs]
        runner.check_inputs([s.name for s in fs], [x.shape[1:] for x in xs])
        if first is None:
            first = {k: v[:lib.batch] for k, v in batch.items()}
        try:
            yf = fsess.run(None, batch)
        except Exception as e:
            raise DfqError(f"{data.where}: onnxruntime failed on the data: {str(e).strip().splitlines()[0]}") from None
        yc = runner.run(xs)
        for i in range(len(f_out)):
            outs_f[i].append(yf[i])
            outs_c[i].append(yc[i])
    F = [np.concatenate(o) for o in outs_f]
    C = [np.concatenate(o) for o in outs_c]
    n, kind = len(F[0]), output_kind(F[0])
    labels = _class_labels(n, kind, labels, data)
    r = _compare(f_out, F, C, labels, kind, threshold, batch_size)
    det = _detection(box, fm, first, F, {"quant": C}, n, batch_size, conf, iou, label_classes)
    fi, qi = inspect_model(fm), inspect_model(lib.int_model)
    b = runner.built
    return {
        "samples": n,
        "output_kind": kind,
        "threshold": threshold if kind == "map" else None,
        "map_agreement": r["map_agreement"],
        "map": r["map"],
        "float": r["float"],
        "quant": r["quant"],
        "agreement_top1": r["agreement_top1"],
        "sqnr_db": r["sqnr_db"],
        "max_abs_error": r["max_abs_error"],
        "simulated": None,
        "deployed_minus_simulated_agreement": None,
        "detection": det,
        "latency_ms": {"float": _latency(fsess, first, runs),
                       "quant": runner.latency([first[s.name] for s in fs], runs)},
        "latency_batch": lib.batch,
        "threads": threads,
        "requant_points": {"float": fi["requant_points"], "quant": qi["requant_points"]},
        "op_types": {"float": fi["op_types"], "quant": qi["op_types"]},
        "nodes": {"float": fi["nodes"], "quant": qi["nodes"]},
        "c_library": {
            "folder": str(lib.folder), "prefix": lib.prefix, "batch": lib.batch,
            "threads": runner.threads, "threads_option": lib.threads_option,
            "command": " ".join(b.command), "cached": b.cached, "build_seconds": b.seconds,
            "library": str(b.path) if b.cache is not None else None,
        },
    }


def _box_setup(labels, decode: str | None, postprocess: str | None) -> dict:
    """Checks before any model runs: the mAP backend is installed when boxes are asked for, and
    box labels (COCO JSON or a KITTI folder) come with a decoder."""
    from . import detection

    box_labels = labels if isinstance(labels, (str, Path)) and detection.is_box_labels(labels) else None
    on = bool(decode or postprocess)
    if box_labels is not None and not on:
        raise DfqError(f"{labels}: box labels (COCO JSON or a KITTI folder) need --decode or --postprocess")
    if on:
        if decode and postprocess:
            raise DfqError("give --decode or --postprocess, not both")
        if decode and decode not in detection.DECODERS:
            raise DfqError(f"--decode {decode!r}: choose from {', '.join(detection.DECODERS)}")
        detection.require_backend()
    return {"on": on, "decode": decode, "postprocess": postprocess, "labels": box_labels}


def _input_hw(first: dict) -> tuple[int, int]:
    """(H, W) of the first input: NCHW when axis 1 has at most 4 entries, else NHWC."""
    x = next(iter(first.values()))
    if x.ndim != 4:
        raise DfqError(f"box decoding needs an image input [N,C,H,W] or [N,H,W,C]; got {list(x.shape)}")
    return (int(x.shape[2]), int(x.shape[3])) if x.shape[1] <= 4 else (int(x.shape[1]), int(x.shape[2]))


def _detection(box: dict, fm, first: dict, F: list, others: dict, n: int, batch: int, conf, iou: float,
               label_classes) -> dict | None:
    """validate's "detection" figures (None when no decoder was asked for)."""
    if not box["on"]:
        return None
    from . import detection

    decoder = detection.make_decoder(box["decode"], box["postprocess"], fm, _input_hw(first), conf, iou)
    truth = None if box["labels"] is None else detection.load_box_labels(box["labels"], n, label_classes)
    dets_f = detection.decode_all(decoder, F, batch)
    if conf is None and box["decode"]:
        conf = 0.5 if box["decode"] == "dbnet" else 0.25
    res = {"decoder": box["decode"] or f"postprocess {box['postprocess']}", "conf": conf,
           "iou": None if box["decode"] == "dbnet" or box["postprocess"] else iou,
           "labels": None if box["labels"] is None else str(box["labels"])}
    for key, O in others.items():
        fig = detection.figures(dets_f, detection.decode_all(decoder, O, batch), truth)
        if key == "quant":
            res.update(fig)
        else:
            res[key] = fig
    return res


def _compare(names: list[str], F: list[np.ndarray], Q: list[np.ndarray], labels, kind: str = "classes",
             threshold: float = 0.5, chunk: int | None = None) -> dict:
    """Accuracy of both and top-1 agreement (class scores), thresholded agreement (a map), SQNR
    and max abs error per output of Q against F. Computed as partial_figures of consecutive chunks
    of `chunk` samples (the batches the models ran in) merged in order by finish_figures: the
    same arithmetic, to the last bit, as a cluster whose workers each took whole batches."""
    n = len(F[0])
    chunk = chunk or max(n, 1)
    parts = [partial_figures(names, [f[i:i + chunk] for f in F], [q[i:i + chunk] for q in Q], kind, threshold)
             for i in range(0, n, chunk)]
    return finish_figures(names, parts, labels, kind)


def partial_figures(names: list[str], F: list[np.ndarray], Q: list[np.ndarray], kind: str,
                    threshold: float) -> dict:
    """What one batch contributes to _compare's figures, as values that merge exactly: per output
    the float64 energies of the signal and of the error and the max abs error; for class scores
    the top-5 classes of both per sample; for a map the element counts (same side of threshold,
    intersection, union, marked by each) and the per-sample SQNRs."""
    part: dict = {"samples": len(F[0]), "signal": [], "noise": [], "max_abs_error": []}
    for name, f, q in zip(names, F, Q):
        if f.shape != q.shape:
            raise DfqError(f"output {name!r}: shapes differ ({f.shape} vs {q.shape})")
        signal, noise = energies(f, q)
        part["signal"].append(signal)
        part["noise"].append(noise)
        part["max_abs_error"].append(float(np.max(np.abs(f.astype(np.float64) - q))) if f.size else 0.0)
    if kind == "classes":
        part["top_float"], part["top_quant"] = _topk(F[0], 5), _topk(Q[0], 5)
    elif kind == "map":
        mf, mq = F[0] > threshold, Q[0] > threshold
        per = []
        for a, b in zip(F[0], Q[0]):
            signal, noise = energies(a, b)
            if signal > 0:
                per.append(sqnr_db(signal, noise))
        part.update(elements=int(mf.size), same=int(np.count_nonzero(mf == mq)),
                    inter=int(np.count_nonzero(mf & mq)), union=int(np.count_nonzero(mf | mq)),
                    marked_float=int(np.count_nonzero(mf)), marked_quant=int(np.count_nonzero(mq)),
                    per_sample_sqnr=per)
    return part


def finish_figures(names: list[str], parts: list[dict], labels, kind: str) -> dict:
    """_compare's figures from partial_figures of consecutive batches, merged in their order:
    integer counts, float64 energies summed one batch after another, maxima, concatenations."""
    sqnr, max_err = {}, {}
    for i, name in enumerate(names):
        signal = noise = 0.0
        for p in parts:
            signal += p["signal"][i]
            noise += p["noise"][i]
        sqnr[name] = sqnr_db(signal, noise)
        max_err[name] = max(p["max_abs_error"][i] for p in parts)
    common = {"sqnr_db": sqnr, "max_abs_error": max_err, "map_agreement": None, "map": None}
    if kind != "classes":
        none = {"top1": None, "top5": None}
        if kind == "map":
            count = {k: sum(p[k] for p in parts) for k in ("elements", "same", "inter", "union",
                                                           "marked_float", "marked_quant")}
            per = [v for p in parts for v in p["per_sample_sqnr"]]
            common["map_agreement"] = float(100.0 * (count["same"] / count["elements"]))
            common["map"] = {"mask_iou": None if count["union"] == 0 else float(count["inter"] / count["union"]),
                             "marked_float": float(100.0 * (count["marked_float"] / count["elements"])),
                             "marked_quant": float(100.0 * (count["marked_quant"] / count["elements"])),
                             "sqnr_per_sample_median_db": float(np.median(per)) if per else None}
        return {"float": none, "quant": dict(none), "agreement_top1": None, **common}
    top_f = np.concatenate([p["top_float"] for p in parts])
    top_q = np.concatenate([p["top_quant"] for p in parts])

    def acc(top, k):
        return None if labels is None else float(100.0 * (np.count_nonzero(np.any(top[:, :k] == labels[:, None], axis=1)) / len(top)))

    return {"float": {"top1": acc(top_f, 1), "top5": acc(top_f, 5)},
            "quant": {"top1": acc(top_q, 1), "top5": acc(top_q, 5)},
            "agreement_top1": float(100.0 * (np.count_nonzero(top_f[:, 0] == top_q[:, 0]) / len(top_f))), **common}


def _latency(sess: ort.InferenceSession, feed: dict, runs: int) -> float:
    """Median wall time of one run on `feed` (one sample, or a fixed-batch model's whole batch), in
    milliseconds, after a warm-up."""
    for _ in range(min(5, runs)):
        sess.run(None, feed)
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(times))
