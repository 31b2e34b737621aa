from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHIPPED = MODELS / "mnist_resnet.onnx"
CALIB = MODELS / "mnist_calib.npz"
TEST = MODELS / "mnist_test.npz"


def run_ort(model, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    """Run a model (path or ModelProto) under onnxruntime on the CPU."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)
