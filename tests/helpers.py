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


def int8_weight_rows(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each Conv/Gemm/MatMul's int8 weight codes read from a QDQ model, as [output channels, K]
    rows in the order onnxruntime's x86 kernels reduce over: a Conv's kernel taps with input
    channels fastest (its filter reordered to [taps, C/group, M]), a Gemm's or MatMul's input
    dimension. Depthwise convolutions (their kernels never pair products) are left out. The
    kernels add elements (2i, 2i+1) of a row in int16 (tests/test_avx2_kernels.py runs them)."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in dq:
            continue
        w = consts[dq[n.input[1]].input[0]].astype(np.int64)
        attrs = {a.name: a.i for a in n.attribute}
        if n.op_type == "Conv":
            if attrs.get("group", 1) > 1 and w.shape[1] == 1 and w.shape[0] == attrs["group"]:
                continue
            out[n.name] = np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        else:
            out[n.name] = w if attrs.get("transB", 0) else w.T
    return out


def worst_pair_sum(rows: np.ndarray, sign: int) -> np.ndarray:
    """Per row: the largest sum of two same-sign (sign * code > 0) codes the kernels pair."""
    q = np.maximum(sign * np.asarray(rows, np.int64), 0)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.int64)], axis=-1)
    return (q[..., 0::2] + q[..., 1::2]).max(axis=-1)
