"""Load a model safely, move between ONNX protobufs and graphsurgeon graphs, save atomically.

`load_model` guarantees: the model passed onnx.checker, its default-domain opset is at least
MIN_OPSET (per-channel DequantizeLinear needs `axis`), shapes are inferred where possible, and
external data is loaded. The input file is only ever read.
`save_model` guarantees: the output path is not the input path, and the file appears whole or
not at all (written to a temporary file in the same folder, then renamed).
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import version_converter

from .errors import DfqError

MIN_OPSET = 13
ModelLike = "str | os.PathLike | onnx.ModelProto"


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def read_model(src, external_data: bool = True) -> onnx.ModelProto:
    """The model at a path (or a ModelProto itself), with a one-line DfqError if it is not one."""
    if isinstance(src, onnx.ModelProto):
        return src
    path = Path(src)
    if not path.exists():
        raise DfqError(f"{path}: no such file")
    if not path.is_file():
        raise DfqError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, ...
        raise DfqError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    if not model.graph.node and not model.graph.input:
        raise DfqError(f"{path}: not an ONNX model (empty graph)")
    if external_data:
        _check_external_data(model, path)
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as e:  # missing or short data file
            raise DfqError(f"{path}: cannot read its external data ({_first_line(e)})") from None
    return model


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that leave the model's folder (absolute paths, `..`, a
    symbolic link pointing out) and ranges that run past the end of their file."""
    folder = path.resolve().parent
    for t in _tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (folder / loc).resolve()
        if not loc or Path(loc).is_absolute() or (target != folder and folder not in target.parents):
            raise DfqError(f"{path}: tensor {t.name!r} keeps its data at {loc!r}, outside the model's folder: refused")
        if not target.is_file():
            raise DfqError(f"{path}: tensor {t.name!r}: external data file {loc!r} not found")
        try:
            end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        except ValueError:
            raise DfqError(f"{path}: tensor {t.name!r}: bad external data offset or length") from None
        if end > target.stat().st_size:
            raise DfqError(f"{path}: tensor {t.name!r} claims bytes up to {end} of {loc!r}, which has "
                           f"{target.stat().st_size}: refused")


def load_model(src, min_opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Read (or take) a model, check it, upgrade it to opset >= min_opset (13 by default; 21 for
    16-bit QuantizeLinear) and infer shapes."""
    where = "model" if isinstance(src, onnx.ModelProto) else str(src)
    model = onnx.ModelProto()
    model.CopyFrom(read_model(src))
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise DfqError(f"{where}: invalid ONNX model: {_first_line(e)}") from None
    _forget_dynamic_dims(model)
    opset = default_opset(model)
    target = min_opset if opset < min_opset else min(opset, max(min_opset, runtime_qdq_opset()))
    if target != opset:  # up to min_opset; down to what onnxruntime's Q/DQ kernels implement
        try:
            model = version_converter.convert_version(model, target)
            onnx.checker.check_model(model)
        except Exception as e:
            raise DfqError(f"{where}: cannot convert opset {opset} to {target}"
                           f"{' (onnxruntime has no QuantizeLinear above it)' if target < opset else ''}: "
                           f"{_first_line(e)}") from None
    return infer_shapes(model)


@functools.lru_cache(maxsize=None)
def runtime_qdq_opset() -> int:
    """The newest opset at which this onnxruntime runs QuantizeLinear and DequantizeLinear (onnx
    may define newer ones: onnx 1.23 has opset 28, onnxruntime 1.32 implements them up to 25-27).
    A model above it is converted down, so the quantized model runs."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    so = ort.SessionOptions()
    so.log_severity_level = 3
    for opset in range(onnx.defs.onnx_opset_version(), MIN_OPSET, -1):
        g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.float32(1), "s"), numpy_helper.from_array(np.int8(0), "z")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        try:
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return MIN_OPSET


def _forget_dynamic_dims(model: onnx.ModelProto) -> None:
    """Make every dim written as a dim_value <= 0 (exporters write -1, some 0, for "dynamic") an
    unknown dim. Shape inference would take -1 as a size: a Flatten of [-1, C, -1, -1] gives
    [-1, C] (the product of the -1s is 1), a Gemm then sees the wrong K and the graph's shapes
    disagree with the data."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.Clear()


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes: onnx's shape inference, then, where a tensor's dims stay
    unknown (dynamic spatial dims: onnx does not carry a symbol through a Conv), onnxruntime's
    symbolic shape inference, which keeps them as expressions of the input's symbols (so the two
    branches of a residual Add are seen to match). Each step that fails leaves the shapes it
    found; shapes help the passes but are not required."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    if not _unknown_dims(model):
        return model
    try:
        return _symbolic_shapes(model)
    except Exception:
        return model


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference, keeping what it found when it cannot finish. Its
    public entry point then saves the model as sym_shape_infer_temp.onnx (plus external data) in
    the current directory and raises; dfq-onnx writes nothing but its output, so the steps of that
    entry point are run here, or, if this onnxruntime lacks them, the entry point in a scratch
    directory."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    s = SymbolicShapeInference(2**31 - 1, True, False, 0)
    if all(hasattr(s, a) for a in ("_preprocess", "_infer_impl", "_update_output_from_vi")):
        s._preprocess(model)
        while s.run_:
            s._infer_impl()
        s._update_output_from_vi()
        return s.out_mp_
    import contextlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _unknown_dims(model: onnx.ModelProto) -> bool:
    for vi in list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and any(not d.HasField("dim_value") and not d.dim_param or
                                       d.dim_param.startswith("unk__") for d in t.shape.dim):
            return True
    return False


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def with_inferred_shapes(graph: gs.Graph) -> gs.Graph:
    """The graph re-imported after onnx shape inference (shapes computed from folded constants,
    such as Pad amounts, become known); the graph itself if inference fails."""
    try:
        return gs.import_onnx(infer_shapes(to_model(graph)))
    except Exception:
        return graph


def analysis_session(graph: gs.Graph, failure: str, basic: bool = False, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session for a pass's own probe graph (quiet; no memory pattern: measured
    on MobileNetV2 calibration, batch 8, peak RSS 620 -> 400 MB at the same speed). basic: only
    basic graph optimizations, so a QDQ graph with constant scales runs as simulated float
    arithmetic. optimize=False: none at all (a QDQ graph whose scales are graph inputs: onnxruntime's
    basic Clip/Q fusions assume constant scales; measured on EfficientNet-Lite0, basic level gave
    an output SQNR of 4.1 dB where the graph computes 11.6 dB). If onnxruntime refuses the graph:
    DfqError "<failure>: <its first line>"."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(to_model(graph).SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DfqError(f"{failure}: {str(e).splitlines()[0]}") from None


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph; keep the opset imports, IR version and metadata of `like`."""
    model = gs.export_onnx(graph, do_type_check=False)
    if like is not None:
        model.ir_version = max(like.ir_version, 7)  # IR 7 pairs with opset 13; initializers need not be inputs
        model.producer_name = like.producer_name
        model.producer_version = like.producer_version
        for p in like.metadata_props:
            model.metadata_props.add(key=p.key, value=p.value)
        have = {imp.domain for imp in model.opset_import}
        for imp in like.opset_import:
            if imp.domain not in have:
                model.opset_import.add(domain=imp.domain, version=imp.version)
    return model


def check_output_path(out, inp=None) -> Path:
    """Refuse an output that is the input or lies in a folder we cannot write to."""
    out = Path(out)
    if inp is not None and not isinstance(inp, onnx.ModelProto):
        if out.resolve() == Path(inp).resolve():
            raise DfqError(f"{out}: output path equals the input path; choose another")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise DfqError(f"{out.parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise DfqError(f"{out.parent}: output folder is not writable")
    if out.exists() and out.is_dir():
        raise DfqError(f"{out}: is a folder, not a file path")
    return out


def save_model(model: onnx.ModelProto, out, inp=None) -> Path:
    """Write `model` to `out` atomically (temporary file + rename)."""
    out = check_output_path(out, inp)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    except OSError as e:
        raise DfqError(f"{out.parent}: cannot write there ({e.strerror})") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the output follows the umask like any file
        large = model.ByteSize() > 1_900_000_000
        if large:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out.name + ".data")
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DfqError(f"{out}: cannot write ({e.strerror or e})") from None
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
