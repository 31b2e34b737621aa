"""Check dfq_onnx.fuse (BatchNorm folding) on ImageNet MobileNetV2 with real photos.

Loads CACHE/mobilenet_v2.onnx (built by bench/zoo.py, built here if missing), folds it with
dfq_onnx.fuse, and runs original and fused under onnxruntime (CPUExecutionProvider) on the RGB
photos shipped in scikit-image plus their horizontal flips, as one batch. Prints BatchNormalization
counts, max |a-b|, max |a-b| / max |a| and top-1 agreement; exits 1 if the relative difference
exceeds 1e-4.

Usage: python bench/check_fuse.py [--cache DIR] [--tol 1e-4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402


def count_op(model, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=zoo.DEFAULT_CACHE, help="cache folder (default bench/cache/)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed max|a-b|/max|a| (default 1e-4)")
    args = ap.parse_args(argv)

    import onnx

    import dfq_onnx

    path = zoo.build_mobilenet_v2(args.cache)
    original = onnx.load(str(path))
    fused = dfq_onnx.fuse(path)

    photos = zoo.skimage_photos()
    images = [zoo.imagenet_preprocess(img) for img in photos.values()]
    images += [zoo.imagenet_preprocess(np.ascontiguousarray(img[:, ::-1])) for img in photos.values()]
    x = np.stack(images).astype(np.float32)

    a = run(path, x)
    b = run(fused, x)
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(a).max())
    rel = diff / scale
    agree = int((a.argmax(1) == b.argmax(1)).sum())

    print(f"model                 {path}")
    print(f"inputs                {len(x)} = {len(photos)} skimage photos ({', '.join(photos)}) + horizontal flips")
    print(f"BatchNormalization    before {count_op(original, 'BatchNormalization')}, "
          f"after {count_op(fused, 'BatchNormalization')}")
    print(f"nodes                 before {len(original.graph.node)}, after {len(fused.graph.node)}")
    print(f"max |a-b|             {diff:.3e}  (max |a| = {scale:.3f})")
    print(f"max |a-b| / max |a|   {rel:.3e}  (tolerance {args.tol:g})")
    print(f"top-1 agreement       {agree}/{len(x)}")
    print(f"top-1 (original)      {dict(zip(photos, a.argmax(1)[:len(photos)].tolist()))}")
    ok = rel <= args.tol
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
