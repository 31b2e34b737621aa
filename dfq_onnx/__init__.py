"""dfq-onnx: power-of-two (shift-only) quantization of ONNX models with unified linear modules.

Public API: convert(), fuse(), inspect(), QuantConfig, DfqError.
"""
from __future__ import annotations

__version__ = "0.1.0"

from onnx_graphsurgeon.logger import G_LOGGER as _GS_LOGGER

_GS_LOGGER.severity = _GS_LOGGER.CRITICAL

import onnxruntime as _ort  # noqa: E402

_ort.set_default_logger_severity(3)  # warnings from constant folding are not the user's business

from .config import QuantConfig  # noqa: E402
from .errors import DfqError  # noqa: E402


def convert(model, calib, config: QuantConfig | None = None, preprocess: str | None = None, cluster=None):
    """Quantize a float model (path or onnx.ModelProto) and return the quantized onnx.ModelProto
    (QDQ, integer-only or QONNX by config.format; for format c the integer graph, whose C sources
    are pipeline.run(...).library).

    calib: a .npz path, a folder of .npy files or images, a dict of arrays (input name -> N x ...),
    an iterable of input dicts, or an onnxruntime CalibrationDataReader. preprocess: the image
    spec for a folder of images (see `dfq-onnx convert --help`). cluster: an entered
    dfq_onnx.distributed.Cluster to calibrate on (same output, byte for byte).
    """
    from .pipeline import run

    return run(model, calib, config, preprocess=preprocess, cluster=cluster).model


def fuse(model):
    """The fused float model (BatchNorm and per-channel affine ops folded into linear layers)."""
    from .pipeline import fuse as _fuse

    return _fuse(model)


def inspect(model) -> dict:
    """Op counts, requantization points, modules and scales of any ONNX model (see report.py)."""
    from .report import inspect_model

    return inspect_model(model)


__all__ = ["convert", "fuse", "inspect", "QuantConfig", "DfqError", "__version__"]
