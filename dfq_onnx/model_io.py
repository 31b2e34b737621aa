"""Load a model safely, move between ONNX protobufs and graphsurgeon graphs, save atomically.

`load_model` guarantees: the model passed onnx.checker, its default-domain opset is at least
MIN_OPSET (per-channel DequantizeLinear needs `axis`), shapes are inferred where possible, and
external data is loaded. The input file is only ever read. `load_light` gives the same model as
its structure (large initializers as stubs, see below) plus those initializers as numpy arrays,
each held once; `to_graph(light, arrays)` makes the graphsurgeon graph that shares them.
`save_model` guarantees: the output path is not the input path, and the file appears whole or
not at all (written to a temporary file in the same folder, then renamed); a model over
`large` bytes (default just under protobuf's 2 GB limit), or converted from an input over it, keeps its
tensors in OUT.onnx.data beside OUT.onnx (the output's name + ".data", a relative location).

Weights are never copied to analyse the structure: the checker, shape inference and
onnxruntime's analysis sessions see a "light" model whose initializers of STUB_MIN_ELEMENTS
elements or more are stubs (name, type and dims, marked as external data at STUB_LOCATION, no
bytes). The checker's own test of those tensors (data at least as long as the dims claim) is done
here on the real tensors; onnxruntime gets the numpy arrays themselves as external initializers
(no copy); graphsurgeon graphs share the arrays (read-only, so no pass can change a weight in
place behind another graph's back).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, numpy_helper, version_converter
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import functions
from .errors import DfqError

MIN_OPSET = 13
LAYER_NORM_OPSET = 17  # the first opset with LayerNormalization: a LayerNorm written out is upgraded to it
ModelLike = "str | os.PathLike | onnx.ModelProto"
STUB_MIN_ELEMENTS = 1024     # initializers this large are stubbed: no op's shape inference reads their values
STUB_LOCATION = "dfq-in-memory"
LARGE_MODEL_BYTES = 1_900_000_000  # protobuf's limit is 2 GiB: above this, save_model writes external data
BLOCK_BYTES = 1 << 26  # a dequantized Gemm/MatMul matrix is computed in blocks of at most this many float bytes
LEAN_BYTES = 2 ** 31  # weights over this (a model over protobuf's limit): lean onnxruntime sessions (shared_session)
_STUBBABLE = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
              TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
              TensorProto.UINT64, TensorProto.BOOL}


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


def _read_external_data(model: onnx.ModelProto, path: Path) -> dict[str, np.ndarray]:
    """Load a model's external data (refused as read_model refuses it): each large initializer of
    the main graph is read from its file straight into a read-only numpy array (np.fromfile: one
    copy, the array) and becomes a stub (stub_tensor); any other external tensor is read into the
    protobuf as onnx does. Returns the arrays by name."""
    _check_external_data(model, path)
    folder = path.resolve().parent
    arrays = {}
    try:
        for k, t in enumerate(model.graph.initializer):
            if t.data_location != TensorProto.EXTERNAL or t.data_type not in _STUBBABLE or sys.byteorder != "little":
                continue
            n = int(np.prod(t.dims, dtype=np.int64))
            if n < STUB_MIN_ELEMENTS:
                continue
            info = {e.key: e.value for e in t.external_data}
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            a = np.fromfile(folder / info["location"], dtype=dtype, count=n, offset=int(info.get("offset", 0) or 0))
            if a.size != n:
                raise DfqError(f"{path}: tensor {t.name!r}: its external data holds {a.size} of {n} values")
            a = a.reshape(tuple(t.dims))
            a.setflags(write=False)
            arrays[t.name] = a
            model.graph.initializer[k].CopyFrom(stub_tensor(t.name, t.data_type, t.dims))
        for t in _tensors(model.graph):
            if t.data_location == TensorProto.EXTERNAL and not _is_stub(t):
                onnx.external_data_helper.load_external_data_for_tensor(t, str(folder))
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
    except DfqError:
        raise
    except Exception as e:  # unreadable data file
        raise DfqError(f"{path}: cannot read its external data ({_first_line(e)})") from None
    return arrays


def load_model(src, min_opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Read (or take) a model, check it, upgrade it to opset >= min_opset (13 by default; 21 for
    16-bit QuantizeLinear) and infer shapes. A full ModelProto (weights included); the pipeline
    itself uses load_light, which holds each weight once."""
    light, arrays = load_light(src, min_opset)
    return with_arrays(light, arrays)


def load_light(src, min_opset: int = MIN_OPSET) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """load_model's model as (structure with stubbed large initializers, {name: read-only numpy
    array}). The same checks: the checker (its tensor-size test on the real tensors), the opset
    upgrade, shape inference (on the structure: no weight is serialized)."""
    where = "model" if isinstance(src, onnx.ModelProto) else str(src)
    if isinstance(src, onnx.ModelProto):
        model, external = src, {}
    else:  # the weights in external data files go from the file to their arrays, never into the protobuf
        model = read_model(src, external_data=False)
        external = _read_external_data(model, Path(src))
    _check(model, where)
    if model is src:  # the caller's model is only read: dims are rewritten below
        model = onnx.ModelProto()
        model.CopyFrom(src)
    _forget_dynamic_dims(model)
    opset = default_opset(model)
    if opset == 0:  # e.g. a scikit-learn pipeline exported with ai.onnx.ml alone
        ops = sorted({n.op_type for n in model.graph.node})
        raise DfqError(f"{where}: the model imports no ONNX (ai.onnx) operator set, only "
                       f"{', '.join(sorted({i.domain for i in model.opset_import})) or 'none'} "
                       f"({', '.join(ops[:4])}{', ...' if len(ops) > 4 else ''}): nothing dfq-onnx can quantize")
    target = min_opset if opset < min_opset else min(opset, max(min_opset, runtime_qdq_opset()))
    # a LayerNorm written out below opset 17: upgrade, so canonicalize makes it one LayerNormalization
    # module instead of 8-bit pieces; if the converter cannot, keep the opset (form_modules then keeps
    # the whole normalization float)
    ln_upgrade = target < LAYER_NORM_OPSET <= runtime_qdq_opset() and spells_out_layer_norm(model)
    fallback = target
    if ln_upgrade:
        target = LAYER_NORM_OPSET

    def convert(m: onnx.ModelProto) -> onnx.ModelProto:
        nonlocal target
        try:
            return _converted(m, target)
        except Exception:
            if target == fallback:
                raise
            target = fallback
        return _converted(m, target)

    def _converted(m: onnx.ModelProto, to: int) -> onnx.ModelProto:
        if to == opset:
            return m
        try:
            m = version_converter.convert_version(m, to)
            _check(m, where, converted=True)
            return m
        except Exception as e:
            raise DfqError(f"{where}: cannot convert opset {opset} to {target}"
                           f"{' (onnxruntime has no QuantizeLinear above it)' if target < opset else ''}: "
                           f"{_first_line(e)}") from None

    big = {t.name for t in model.graph.initializer if _stubbable(t)}
    arrays = dict(external)
    for t in model.graph.initializer:
        if t.name in big:
            if t.HasField("raw_data") and sys.byteorder == "little":  # the bytes themselves, not a copy of them
                a = np.frombuffer(t.raw_data, onnx.helper.tensor_dtype_to_np_dtype(t.data_type),
                                  int(np.prod(t.dims, dtype=np.int64))).reshape(tuple(t.dims))
            else:
                a = np.array(numpy_helper.to_array(t))  # what graphsurgeon's LazyValues.load gives
            a.setflags(write=False)
            arrays[t.name] = a
    light = light_copy(model, big)
    if target != opset:  # up to min_opset; down to what onnxruntime's Q/DQ kernels implement
        try:  # on the structure: the converter's adapters rewrite nodes, not large weights
            converted = convert(light)
            kept = {t.name: tuple(t.dims) for t in converted.graph.initializer}
            if any(kept.get(n) != a.shape for n, a in arrays.items()):
                raise DfqError("the converter changed a large initializer")
            light = converted
        except DfqError:  # an adapter that needs the weights' values: convert the whole model
            model = convert(with_arrays(model, external) if external else model)
            return load_light(model, target)
    del model
    light, arrays = float32_twin(light, arrays)
    return infer_shapes(light), arrays


TWIN_CAST = "dfq_float32_twin_"  # the Casts float32_twin puts at a model's float16 / float64 inputs and outputs
_NARROW_OR_WIDE = (TensorProto.FLOAT16, TensorProto.DOUBLE)


def float32_twin(light: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict]:
    """A model that computes in float16 (a GPU export) or float64, as the same model computing in
    float32: its weights and constants made float32 (exact from float16; rounded from float64,
    far below 8-bit rounding), Casts to those types made Casts to float32, and the interface kept:
    such an input is cast to float32 once as it enters, such an output back to its type as it
    leaves (Cast nodes named TWIN_CAST...). The calibration data and the quantized model keep the
    model's input and output types; everything between is quantized as a float32 model would be.
    A float32 model is returned as it is."""
    g = light.graph
    other = _NARROW_OR_WIDE

    def elem(v) -> int | None:
        return v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else None

    in_attrs = any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type in other or
                   a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in other
                   for n in g.node for a in n.attribute)
    if not (in_attrs or any(t.data_type in other for t in g.initializer) or
            any(elem(v) in other for v in list(g.input) + list(g.output) + list(g.value_info))):
        return light, arrays
    model = onnx.ModelProto()
    model.CopyFrom(light)  # large weights are stubs here: a cheap copy
    g, arrays = model.graph, dict(arrays)
    inits = {t.name for t in g.initializer}
    for t in g.initializer:
        if t.data_type not in other:
            continue
        if t.name in arrays:
            a = arrays[t.name].astype(np.float32)
            a.setflags(write=False)
            arrays[t.name] = a
            t.data_type = TensorProto.FLOAT
        else:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in other:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in other:
                a.i = TensorProto.FLOAT
    for v in g.value_info:
        if elem(v) in other:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    wide = {v.name: f"{v.name}_float32" for v in list(g.input) + list(g.output)
            if elem(v) in other and v.name not in inits}
    for v in g.input:
        if v.name in inits and elem(v) in other:  # an initializer listed as an input (IR < 4)
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    for n in g.node:
        n.input[:] = [wide.get(i, i) for i in n.input]
        n.output[:] = [wide.get(o, o) for o in n.output]
    cast = onnx.helper.make_node
    ins = [cast("Cast", [v.name], [wide[v.name]], name=f"{TWIN_CAST}in_{k}", to=TensorProto.FLOAT)
           for k, v in enumerate(g.input) if v.name in wide]
    outs = [cast("Cast", [wide[v.name]], [v.name], name=f"{TWIN_CAST}out_{k}", to=elem(v))
            for k, v in enumerate(g.output) if v.name in wide]
    nodes = ins + list(g.node) + outs
    del g.node[:]
    g.node.extend(nodes)
    return model, arrays


def spells_out_layer_norm(model: onnx.ModelProto) -> bool:
    """The graph has the ops of a LayerNorm written out (ReduceMean, Sub, a square root or a power,
    a division or reciprocal): cheap, by op types only; passes/patterns.py does the matching."""
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    return {"ReduceMean", "Sub"} <= ops and bool(ops & {"Sqrt", "Pow"}) and bool(ops & {"Div", "Reciprocal"})


def _stubbable(t: TensorProto) -> bool:
    return t.data_type in _STUBBABLE and t.data_location != TensorProto.EXTERNAL and \
        int(np.prod(t.dims, dtype=np.int64)) >= STUB_MIN_ELEMENTS


def _is_stub(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(e.key == "location" and e.value == STUB_LOCATION
                                                           for e in t.external_data)


def stub_tensor(name: str, data_type: int, dims) -> TensorProto:
    """A tensor with a name, type and dims and no data (marked as external data at STUB_LOCATION)."""
    t = TensorProto(name=name, data_type=data_type, dims=[int(d) for d in dims])
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=STUB_LOCATION)
    return t


def _copy_fields(dst, src, skip: str) -> None:
    for fd, v in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(v)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(v)
        else:
            setattr(dst, fd.name, v)


def light_copy(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `names` are stubs (stub_tensor): everything
    else is copied, those tensors' bytes are not."""
    light = onnx.ModelProto()
    _copy_fields(light, model, "graph")
    _copy_fields(light.graph, model.graph, "initializer")
    for t in model.graph.initializer:
        light.graph.initializer.append(stub_tensor(t.name, t.data_type, t.dims) if t.name in names else t)
    return light


def with_arrays(light: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The full model: `light` with its stubs replaced by the arrays' values."""
    model = onnx.ModelProto()
    _copy_fields(model, light, "graph")
    _copy_fields(model.graph, light.graph, "initializer")
    for t in light.graph.initializer:
        model.graph.initializer.append(numpy_helper.from_array(arrays[t.name], t.name) if t.name in arrays else t)
    return model


def _check(model: onnx.ModelProto, where: str, converted: bool = False) -> None:
    """onnx.checker on the model's structure (large initializers declared as graph inputs of
    their type and dims), and the checker's size test on those initializers themselves."""
    try:
        stubs = {t.name for t in model.graph.initializer if _is_stub(t)}  # load_light's: no data to test
        big = {t.name for t in model.graph.initializer if _stubbable(t)} | stubs
        for t in model.graph.initializer:
            if t.name in big and t.name not in stubs:
                _check_tensor_size(t)
        light = onnx.ModelProto()
        _copy_fields(light, model, "graph")
        _copy_fields(light.graph, model.graph, "initializer")
        have = {i.name for i in light.graph.input}
        for t in model.graph.initializer:
            if t.name not in big:
                light.graph.initializer.append(t)
            elif t.name not in have:
                light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        onnx.checker.check_model(light)
    except Exception as e:
        if converted:
            raise
        raise DfqError(f"{where}: invalid ONNX model: {_first_line(e)}") from None


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model's verdict on a model, without serializing its weights (the checker
    takes the model as bytes: a copy of every weight, and a second one where it parses them):
    the checker on the structure, the size test on the large tensors themselves."""
    _check(model, "model", converted=True)


def _check_tensor_size(t: TensorProto) -> None:
    """The checker's test: the data holds at least as many values as the dims claim."""
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.HasField("raw_data"):
        need = n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        have = len(t.raw_data)
        if have < need:
            raise onnx.checker.ValidationError(
                f"TensorProto (tensor name: {t.name}) raw_data size ({have} bytes) is too small for the declared "
                f"shape and type ({need} bytes required).")
        return
    field = onnx.helper.tensor_dtype_to_field(t.data_type)
    have = len(getattr(t, field))
    if have < n:
        raise onnx.checker.ValidationError(
            f"TensorProto (tensor name: {t.name}) {field} size ({have}) is too small for the declared shape "
            f"({n} values required).")


@functools.lru_cache(maxsize=None)
def runtime_qdq_opset() -> int:
    """The newest opset at which this onnxruntime runs QuantizeLinear and DequantizeLinear (onnx
    may define newer ones: onnx 1.23 has opset 28, onnxruntime 1.32 implements them up to 25-27).
    A model above it is converted down, so the quantized model runs."""
    helper = onnx.helper
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
    module = _symbolic_shape_module()
    SymbolicShapeInference = module.SymbolicShapeInference
    s = SymbolicShapeInference(2**31 - 1, True, False, 0)
    if all(hasattr(s, a) for a in ("_preprocess", "_infer_impl", "_update_output_from_vi")):
        with _memoized_simplify(module):
            s._preprocess(model)
            while s.run_:
                s._infer_impl()
            s._update_output_from_vi()
        return s.out_mp_
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


@contextmanager
def _memoized_simplify(module):
    """Within: the symbolic shape module (dfq-onnx's own copy, _symbolic_shape_module) calls a
    sympy.simplify that remembers its results. Its dims repeat the same few expressions: on the
    PP-OCRv4 detector 72 calls, 13 distinct, 7 of its 8 s of shape inference in sympy; the same
    function of the same expression, so the same shapes. onnxruntime's own module is not touched."""
    import types

    sympy = getattr(module, "sympy", None)
    if sympy is None or module.__name__ != _PRIVATE_SYMBOLIC:
        yield
        return
    real = sympy.simplify
    cached = functools.lru_cache(maxsize=None)(real)

    def simplify(expr, *args, **kwargs):
        return real(expr, *args, **kwargs) if args or kwargs else cached(expr)

    proxy = types.ModuleType(sympy.__name__)
    proxy.__dict__.update(sympy.__dict__)
    proxy.simplify = simplify
    module.sympy = proxy
    try:
        yield
    finally:
        module.sympy = sympy


_PRIVATE_SYMBOLIC = "_dfq_ort_symbolic_shape_infer"


@functools.lru_cache(maxsize=None)
def _symbolic_shape_module():
    """onnxruntime.tools.symbolic_shape_infer, loaded from its file: importing it through its
    package runs onnxruntime/tools/__init__.py, which imports torch when torch is installed
    (about 1 s and 300 MB for a module that needs only onnx, numpy and sympy)."""
    import importlib.util

    name = "onnxruntime.tools.symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(ort.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location(_PRIVATE_SYMBOLIC, path)
    if spec is None or not path.is_file():
        import onnxruntime.tools.symbolic_shape_infer as module
        return module
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unknown_dims(model: onnx.ModelProto) -> bool:
    """Some tensor has a dim that shape inference lost, other than the batch (axis 0): the passes
    never need the batch, so symbolic inference (and its sympy import) is skipped for that alone,
    as after a classifier's Reshape to [-1, K]."""
    for vi in list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and any(not d.HasField("dim_value") and not d.dim_param or
                                       d.dim_param.startswith("unk__") for d in list(t.shape.dim)[1:]):
            return True
    return False


def to_graph(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> gs.Graph:
    """The graphsurgeon graph of a model; with `arrays` (load_light), its stubbed constants hold
    those arrays (shared, not copied)."""
    graph = gs.import_onnx(model)
    if arrays:
        _attach(graph, arrays, {})
    return graph


def _attach(graph: gs.Graph, values: dict, locations: dict) -> None:
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and t.name in values:
            t._values = values[t.name]
            t.data_location = locations.get(t.name)


def _stub_of(c: gs.Constant) -> TensorProto | None:
    """The stub standing for a large constant, or None to export it as it is."""
    v = c._values
    if isinstance(v, LazyValues):
        t = v.tensor
        return stub_tensor(c.name, t.data_type, t.dims) if _stubbable(t) else None
    if not isinstance(v, np.ndarray) or v.size < STUB_MIN_ELEMENTS:
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
    except Exception:
        return None
    if data_type not in _STUBBABLE or (c._export_dtype is not None and np.dtype(c._export_dtype) != v.dtype):
        return None
    return stub_tensor(c.name, data_type, v.shape)


@contextmanager
def stubbed(graph: gs.Graph):
    """Within: graph's large constants are stubs; yields {name: their values} and
    {name: data_location}. Exports made inside carry no weight bytes."""
    values, locations = {}, {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            stub = _stub_of(t)
            if stub is not None:
                values[t.name], locations[t.name] = t._values, t.data_location
                t._values = LazyValues(stub)
    try:
        yield values, locations
    finally:
        _attach(graph, values, locations)


def with_inferred_shapes(graph: gs.Graph) -> gs.Graph:
    """The graph re-imported after onnx shape inference (shapes computed from folded constants,
    such as Pad amounts, become known); the graph itself if inference fails. Inference runs on the
    structure (stubbed weights); the new graph shares the weights."""
    try:
        with stubbed(graph) as (values, locations):
            model = to_model(graph)
        new = gs.import_onnx(infer_shapes(model))
        _attach(new, values, locations)
        return new
    except Exception:
        return graph


LEAN_SESSION_BYTES = 1 << 26  # simulated graphs with this many bytes of constants or more: no weight copies


CONCURRENT_MAX_BYTES = 1 << 26  # graphs with less than this in constants run batches side by side
SIDE_BY_SIDE = 2  # ... this many runs at once, each on its share of the CPUs
PIECE_ROWS = 4  # rows of a batch cut into pieces (pieces()): SIDE_BY_SIDE pieces hold one default batch of 8


def cpus() -> int:
    """The CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def in_order(sess, fn, items):
    """fn(item) for each item, yielded in the items' order, with up to sess.dfq_workers calls
    running at once (analysis_session sets it; 1 without). Items are drawn lazily, at most that
    many ahead of the consumer, so a data stream is not read ahead further. The results are those
    of the calls one after another: each call runs on its own share of onnxruntime's threads."""
    workers = getattr(sess, "dfq_workers", 1)
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pieces(batches, split: bool, rows: int = PIECE_ROWS):
    """Each batch cut into pieces of `rows` rows (the last one shorter), if `split` (batch_major:
    else whole). The cut is the same on every machine, so sums over pieces are too; a piece's
    outputs are the rows of the batch's."""
    for batch in batches:
        n = len(next(iter(batch.values())))
        if not split or n <= rows:
            yield batch
            continue
        for a in range(0, n, rows):
            yield {k: v[a:a + rows] for k, v in batch.items()}


def batch_major(graph: gs.Graph) -> bool:
    """Whether a batch of the graph can be cut by rows: its batch dim is dynamic, the same (one
    symbol, or unnamed) on every input, and its first output's rows are the samples': that output
    is declared with the input's symbol, or rows_are_samples proves it (an exporter that names
    the output's batch dim apart, as tf2onnx does, or leaves it unnamed). Not for a fixed batch
    (no other size runs) or an output laid out [time, batch, ...]."""
    shapes = [t.shape for t in graph.inputs]
    if not graph.outputs or any(not s for s in shapes):
        return False
    lead = shapes[0][0]
    if isinstance(lead, int) or any(s[0] != lead for s in shapes):
        return False
    out = graph.outputs[0].shape
    return bool(lead) and bool(out) and out[0] == lead or rows_are_samples(graph)


_ROWWISE = set(functions.ELEMENTWISE) | {  # output[i] from the inputs' row i (constants broadcast)
    "Sum", "Mean", "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or",
    "Xor", "Cast", "Sqrt", "Reciprocal", "Log", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mod",
    "Identity", "Dropout", "BatchNormalization"}
_WINDOWED = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",  # per
             "GlobalLpPool", "LRN", "InstanceNormalization", "DepthToSpace", "SpaceToDepth"}  # sample, weights constant
_SAME_RANK = {"Softmax", "LogSoftmax", "Hardmax", "LayerNormalization", "Transpose", "Concat", "Split", "Slice", "Pad",
              "Resize", "Upsample"}


def rows_are_samples(graph: gs.Graph) -> bool:
    """Whether row i of every tensor computed from the graph's inputs is a function of the
    inputs' row i alone (so a batch cut into pieces gives the same rows), proved node by node
    from the ops' semantics (_keeps_rows): per-position ops with constants that broadcast below
    the batch axis, convolutions and pools, MatMul/Gemm with constant weights, and reshapes,
    transposes, concatenations, slices, squeezes, reductions, pads, resizes and softmaxes that
    keep axis 0 and its length. A shape read from the data (Shape, then Gather, Slice, Concat,
    Unsqueeze, Squeeze, Cast) is followed entry by entry, so `x.reshape(x.shape[0], -1)` and a
    Resize to a size taken from a tensor's shape pass. Conservative: any other op, or a shape
    computed otherwise, makes it False (the batch is then run whole)."""
    rows = {t.name: _rank(t, {}) for t in graph.inputs}  # tensors whose axis 0 is the samples': their rank
    fixed: set[str] = set()                 # tensors computed from constants alone
    shapes: dict[str, list | None] = {}     # shape vectors read from the data: entries "N" (the batch
    for node in _topological(graph):        # size), an int or None (unknown); None: not followed
        if node.domain not in (None, "", "ai.onnx"):
            return False
        live = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant) and t.name not in fixed]
        if not live:
            fixed.update(o.name for o in node.outputs)
        elif node.op == "Shape" and node.inputs[0].name in rows:
            r = _rank(node.inputs[0], rows)
            dims = node.inputs[0].shape or [None] * (r or 0)
            whole = ["N"] + [d if isinstance(d, int) else None for d in dims[1:]] if r else None
            shapes[node.outputs[0].name] = None if whole is None else \
                whole[slice(node.attrs.get("start", 0), node.attrs.get("end"))]
        elif not any(t.name in rows for t in live):
            if not all(t.name in shapes for t in live):
                return False
            shapes.update({o.name: None for o in node.outputs})
            shapes[node.outputs[0].name] = _shape_entries(node, shapes)
        elif any(t.name not in rows and t.name not in shapes for t in live) \
                or not _keeps_rows(node, rows, shapes, graph.opset):
            return False
        else:
            rank = _out_rank(node, rows, shapes)
            rows.update({o.name: _rank(o, {o.name: rank}) for o in node.outputs if o.name})
    return all(o.name in rows for o in graph.outputs)


def _peek(c: gs.Constant) -> np.ndarray:
    """A constant's value, read without caching it in the graph (graphsurgeon keeps a value once
    read, and writes it back re-encoded: the converted model's bytes would change)."""
    v = c._values
    return np.asarray(v.load() if isinstance(v, LazyValues) else v)


def _rank(t: gs.Tensor, known: dict) -> int | None:
    return len(t.shape) if t.shape is not None else known.get(t.name)


def _out_rank(node: gs.Node, rows: dict, shapes: dict) -> int | None:
    """The rank of node's first output where shape inference left it unknown: a Reshape's shape
    length, a MatMul's or a per-position op's broadcast rank (inputs' ranks known), Gemm's 2."""
    if node.op == "Reshape":
        t = node.inputs[1]
        if t.name in shapes:
            return None if shapes[t.name] is None else len(shapes[t.name])
        return int(t.shape[0]) if isinstance(t, gs.Constant) and len(t.shape) == 1 else None
    if node.op in ("Gemm", "Flatten"):
        return 2
    ranks = [len(t.shape) if isinstance(t, gs.Constant) else _rank(t, rows) for t in node.inputs if t.name]
    if node.op == "MatMul" and None not in ranks:
        return max(ranks) - (min(ranks) == 1)
    if node.op in _ROWWISE and None not in ranks:
        return max(ranks)
    if node.op in _WINDOWED | _SAME_RANK or node.op.startswith("Reduce") and node.attrs.get("keepdims", 1):
        return ranks[0] if ranks else None
    return None



def _shape_entries(node: gs.Node, shapes: dict) -> list | None:
    """The entries of a shape vector computed by node from shape vectors and constants, or None."""
    def entries(t):
        if isinstance(t, gs.Constant):
            return [int(v) for v in np.ravel(_peek(t))] if np.issubdtype(t.dtype, np.integer) else None
        return shapes.get(t.name)
    ins = [entries(t) for t in node.inputs]
    if node.op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return ins[0]
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1) and all(e is not None for e in ins):
        return [v for e in ins for v in e]
    if node.op == "Gather" and ins[0] is not None and isinstance(node.inputs[1], gs.Constant) \
            and int(node.attrs.get("axis", 0)) == 0:
        try:
            return [ins[0][int(i)] for i in np.ravel(_peek(node.inputs[1]))]
        except IndexError:
            return None
    if node.op == "Slice" and ins[0] is not None and all(isinstance(t, gs.Constant) for t in node.inputs[1:]) \
            and all(e in (None, [0]) for e in ins[3:4]) and all(e in (None, [1]) for e in ins[4:5]):
        return ins[0][ins[1][0]:ins[2][0]]
    return None


def _topological(graph: gs.Graph) -> list:
    """The graph's nodes, each after the producers of its inputs (without copying the graph)."""
    made = {t.name for t in graph.inputs}
    waiting, order = list(graph.nodes), []
    while waiting:
        later = []
        for node in waiting:
            if all(not t.name or isinstance(t, gs.Constant) or t.name in made or not t.inputs for t in node.inputs):
                order.append(node)
                made.update(o.name for o in node.outputs)
            else:
                later.append(node)
        if len(later) == len(waiting):  # a cycle or a dangling input: leave the rest as listed
            return order + later
        waiting = later
    return order


def _keeps_rows(node: gs.Node, rows: dict, shapes: dict, opset: int) -> bool:
    """Whether node's outputs keep axis 0 as the samples', given that its inputs in `rows` do (with
    the ranks `rows` gives where their shapes are unknown) and the others are constants or the
    shape vectors in `shapes` (rows_are_samples)."""
    attrs = node.attrs
    led = [t for t in node.inputs if t.name in rows]
    x = node.inputs[0]
    rank = _rank(x, rows)

    def not_batch(a, r=rank):  # a (possibly negative) axis of a rank-r tensor that is not axis 0
        return r is not None and -r <= a < r and a % r != 0

    def const(i, value=True):  # input i's value (or shape); None if absent; False if computed
        t = node.inputs[i] if i < len(node.inputs) else None
        if t is None or not t.name:
            return None
        return False if not isinstance(t, gs.Constant) else _peek(t) if value else tuple(t.shape)

    def axes(i, key):  # an attribute's axes (older opsets), else a constant input's; None if absent
        if key in attrs:
            return [int(a) for a in attrs[key]]
        v = const(i)
        return v if v is None or v is False else [int(a) for a in np.ravel(v)]

    if node.op in _ROWWISE:
        ranks = {_rank(t, rows) for t in led}
        r = ranks.pop() if len(ranks) == 1 else -1
        if r == -1 or attrs.get("training_mode", 0):
            return False
        for i, t in enumerate(node.inputs):
            v = None if t.name in rows else const(i, value=False)
            if v is False or v is not None and len(v) > 0 and (r is None or len(v) > r or
                                                                   len(v) == r and v[0] != 1):
                return False
        return True
    if node.op == "MatMul":
        a, b = node.inputs[:2]
        ra, rb = _rank(a, rows), _rank(b, rows)
        if a.name in rows and b.name in rows:
            return ra is not None and ra == rb and ra >= 3
        if a.name in rows:
            c = const(1, value=False)
            return c is not False and c is not None and ra is not None and ra >= 2 and len(c) <= 2
        c = const(0, value=False)
        return c is not False and c is not None and rb is not None and rb >= 3 and (len(c) < rb or c[0] == 1)
    if x.name not in rows:
        return False
    if node.op in _WINDOWED:
        return all(isinstance(t, gs.Constant) or not t.name for t in node.inputs[1:])
    if node.op in ("Softmax", "LogSoftmax", "Hardmax"):  # below opset 13: 2-d [rows before axis, the rest]
        return not_batch(int(attrs.get("axis", -1 if opset >= 13 else 1)))
    if node.op == "LayerNormalization":
        return not_batch(int(attrs.get("axis", -1))) and all(isinstance(t, gs.Constant) or not t.name
                                                             for t in node.inputs[1:])
    if node.op == "Gemm":
        c = const(2, value=False)
        return not attrs.get("transA", 0) and isinstance(node.inputs[1], gs.Constant) and c is not False \
            and (c is None or len(c) < 2 or c[0] == 1)
    if node.op == "Reshape":  # rows kept when the new axis 0 is the batch (row-major order)
        shape = shapes.get(node.inputs[1].name) if node.inputs[1].name in shapes else const(1)
        if shape is None or shape is False or attrs.get("allowzero", 0) or len(shape) == 0:
            return False
        shape = [d if d == "N" or d is None else int(d) for d in shape]
        if shape[0] in ("N", 0):
            return True
        if rank is None or x.shape is None:
            return False
        dims = list(x.shape[1:])
        rest = [x.shape[i + 1] if d == 0 and i + 1 < rank else d for i, d in enumerate(shape[1:])]
        return shape[0] == -1 and all(isinstance(d, int) and d > 0 for d in dims + rest) \
            and int(np.prod(rest)) == int(np.prod(dims))
    if node.op == "Flatten":  # [d0 * ... * d(axis-1), the rest]: rows kept only at axis 1
        a = int(attrs.get("axis", 1))
        return a == 1 or rank is not None and a == 1 - rank
    if node.op == "Transpose":
        return "perm" in attrs and int(list(attrs["perm"])[0]) == 0
    if node.op == "Concat":
        return len(led) == len([t for t in node.inputs if t.name]) and not_batch(int(attrs["axis"]))
    if node.op == "Split":
        return not_batch(int(attrs.get("axis", 0)))
    if node.op == "Gather":
        return const(1, value=False) is not False and not_batch(int(attrs.get("axis", 0)))
    if node.op in ("ArgMax", "ArgMin"):
        return not_batch(int(attrs.get("axis", 0)))
    if node.op == "Slice" or node.op == "Squeeze" or node.op.startswith("Reduce"):
        a = axes(3 if node.op == "Slice" else 1, "axes")
        return bool(a) and all(not_batch(v) for v in a)  # absent: every axis (Slice: as many as starts)
    if node.op == "Unsqueeze":
        a = axes(1, "axes")
        return bool(a) and rank is not None and all(not_batch(v, rank + len(a)) for v in a)
    if node.op == "Pad":
        pads = np.asarray(attrs["pads"]) if "pads" in attrs else const(1)
        order = const(3)  # the padded axes (an input from opset 18; absent: every axis)
        if pads is None or pads is False or order is False or rank is None:
            return False
        order = list(range(rank)) if order is None else [int(a) for a in np.ravel(order)]
        return all(v % rank != 0 or pads[j] == 0 == pads[j + len(order)] for j, v in enumerate(order))
    if node.op in ("Resize", "Upsample"):
        scales = np.asarray(attrs["scales"]) if "scales" in attrs else const(2 if node.op == "Resize" else 1)
        sizes = shapes.get(node.inputs[3].name) if len(node.inputs) > 3 and node.inputs[3].name in shapes else None
        if sizes is not None and "axes" not in attrs:  # a size read from a batch tensor's shape
            return sizes[:1] == ["N"]
        return (node.op == "Upsample" or const(3, value=False) is None) and "axes" not in attrs and scales is not None \
            and scales is not False and scales.size > 0 and float(scales.ravel()[0]) == 1.0
    return False


def fixed_batch(graph: gs.Graph) -> bool:
    """Whether an input of the graph fixes the batch dim (no other batch size runs)."""
    return any(t.shape and isinstance(t.shape[0], int) for t in graph.inputs)


def single_sample(graph: gs.Graph) -> bool:
    """Whether the graph's inputs have a fixed batch of one sample (its batches side by side hold
    no more than a batch of two would)."""
    return bool(graph.inputs) and all(t.shape and t.shape[0] == 1 for t in graph.inputs)


def analysis_session(graph: gs.Graph, failure: str, simulated: bool | str = False, threads: int = 0,
                     side_by_side: bool = False):
    """An onnxruntime CPU session for a pass's own probe graph (quiet; no memory pattern: measured
    on MobileNetV2 calibration, batch 8, peak RSS 620 -> 400 MB at the same speed).

    simulated: a QDQ graph run as simulated float arithmetic (True: its scales are constants;
    "scale inputs": they are graph inputs). It gets every graph optimization except onnxruntime's
    QDQ ones (session.disable_quant_qdq: no Q/DQ fusions into int8 kernels, and no Clip/Relu
    fusions into a QuantizeLinear, which assume constant scales: with them a graph whose scales
    are inputs gave 4.1 dB on EfficientNet-Lite0 where it computes 11.6): on layout_cdla 0.08 s
    per sample against 0.12 with none and 0.19 at basic level, the same outputs to float
    rounding. Those optimizations copy weights inside onnxruntime (int8 weights' DequantizeLinear
    folded to float, convolution weights reordered for its blocked kernels), so a graph with
    LEAN_SESSION_BYTES of constants or more gets only basic optimizations without the QDQ
    folding (constant scales) or none (scale inputs): VGG-19's peak RSS 2.5 GB with the first
    rule everywhere, 2.1 GB with this one, at the same speed.

    If onnxruntime refuses the graph: DfqError "<failure>: <its first line>". The graph's large
    constants are not serialized (shared_session). threads: onnxruntime's intra-op threads (0:
    its default, one per core; a cluster worker that owns one CPU passes 1).

    side_by_side: the caller runs its batches cut into pieces (pieces(): batch_major graphs, or
    rows it reduces itself) through in_order. Then a graph with less than CONCURRENT_MAX_BYTES of
    constants runs SIDE_BY_SIDE pieces at a time (the session's dfq_workers), each on its share of
    the CPUs (one thread each on 2 cores). These graphs are many small nodes (every tensor read
    out, rounded or reduced), which onnxruntime's threads split poorly: on 2 cores, 8 calibration
    batches of PP-LCNet took 0.30 s so against 0.55-0.58 s one after another on 2 threads,
    MobileNetV3-style 0.16-0.19 against 0.30, MobileNetV2 0.46-0.54 against 0.53-0.63. Pieces,
    not whole batches: one batch's activations in flight (whole batches side by side raised
    MobileNetV2's peak RSS from 550 to 770 MB). A larger graph keeps onnxruntime's threads (its
    large convolutions split well: ResNet-50 gained 5 %)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    with stubbed(graph) as (values, _):
        model = to_model(graph)
    constants = sum(getattr(v, "nbytes", 0) for v in values.values())
    n_cpus = cpus()
    alone = constants >= CONCURRENT_MAX_BYTES  # runs one piece at a time on every machine (piece_rows)
    workers = SIDE_BY_SIDE if side_by_side and threads == 0 and not alone and n_cpus > 1 else 1
    so.intra_op_num_threads = max(1, n_cpus // workers) if workers > 1 else threads
    if simulated:
        if constants < LEAN_SESSION_BYTES:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        elif simulated == "scale inputs":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        sess = shared_session(model, {k: v.load() if isinstance(v, LazyValues) else v for k, v in values.items()}, so)
    except Exception as e:
        raise DfqError(f"{failure}: {str(e).splitlines()[0]}") from None
    sess.dfq_workers = workers
    sess.dfq_alone = alone
    return sess


def piece_rows(sess, rows: int) -> int:
    """The rows of one piece for a pass that runs `rows` at a time side by side: SIDE_BY_SIDE times
    as many where the session runs pieces one at a time whatever the machine (its constants are
    CONCURRENT_MAX_BYTES or more), so the same rows are in flight. Decided by the graph, not the
    CPUs: the pieces, and float sums over them, are the same on every machine."""
    return rows * SIDE_BY_SIDE if getattr(sess, "dfq_alone", False) else rows


class FedSession:
    """An onnxruntime session whose graph takes some weights as inputs, fed on every run from the
    numpy arrays themselves (onnxruntime reads a contiguous numpy input in place): run() and
    get_inputs() look like those of a session that holds them."""

    def __init__(self, sess: ort.InferenceSession, fed: dict[str, np.ndarray], keep: tuple):
        self._sess, self._fed, self._keep = sess, fed, keep

    def run(self, output_names, input_feed: dict, run_options=None):
        return self._sess.run(output_names, {**input_feed, **self._fed}, run_options)

    def get_inputs(self):
        return [i for i in self._sess.get_inputs() if i.name not in self._fed]

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _matrix_operand_only(model: onnx.ModelProto, name: str) -> bool:
    """Every reader of `name` is a Gemm or MatMul that takes it as its second operand."""
    readers = [(n, i) for n in model.graph.node for i, x in enumerate(n.input) if x == name]
    return bool(readers) and all(n.op_type in ("Gemm", "MatMul") and n.domain in ("", "ai.onnx") and i == 1
                                 for n, i in readers)


def _dequantized_only(model: onnx.ModelProto, name: str) -> bool:
    """Every reader of `name` is a DequantizeLinear that takes it as the codes it dequantizes."""
    readers = [(n, i) for n in model.graph.node for i, x in enumerate(n.input) if x == name]
    return bool(readers) and all(n.op_type == "DequantizeLinear" and i == 0 for n, i in readers)


def _blocked_products(model: onnx.ModelProto, arrays: dict[str, np.ndarray], block_bytes: int = BLOCK_BYTES):
    """(model, arrays) with each Gemm/MatMul whose matrix is DequantizeLinear(codes) of more than
    block_bytes as float split by output channels into products of at most that size (each with
    its slice of the bias, dequantized the same way), joined by a Concat: onnxruntime then holds
    one block's dequantized floats at a time, not the whole matrix's (VGG-19's first classifier
    layer: 411 MB; a 23,500 x 23,500 Gemm: 2.2 GB). Every output element is the same sum as
    before (the blocks split output channels, not the sum), so results are unchanged. The codes'
    blocks are views where they are contiguous (Gemm with transB, the usual layout)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    small = {t.name: t for t in model.graph.initializer if t.name not in arrays}

    def value(name: str):
        if name in arrays:
            return arrays[name]
        return numpy_helper.to_array(small[name]) if name in small else None

    def dequantized(name: str, size: int, axis: int):
        """(codes, scale, zero point or None, DequantizeLinear attributes) if `name` is the only
        output of a DequantizeLinear of constants per channel along `axis` (or per tensor) that
        nothing else reads; else None."""
        d = producer.get(name)
        if d is None or d.op_type != "DequantizeLinear" or readers.get(name) != 1 or d.domain not in ("", "ai.onnx"):
            return None
        codes, scale = value(d.input[0]), value(d.input[1])
        zp = value(d.input[2]) if len(d.input) > 2 and d.input[2] else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in d.attribute}
        if codes is None or scale is None or (len(d.input) > 2 and d.input[2] and zp is None) or \
                codes.shape[axis % codes.ndim] != size or set(attrs) - {"axis"}:
            return None
        if scale.size > 1 and (attrs.get("axis", 1) % codes.ndim != axis % codes.ndim or scale.size != size):
            return None
        if zp is not None and zp.size != scale.size:
            return None
        return codes, scale, zp, d

    nodes, inits, new_arrays, gone = [], [], dict(arrays), set()
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type not in ("Gemm", "MatMul") or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            nodes.append(n)
            continue
        axis = 0 if n.op_type == "Gemm" and attrs.get("transB", 0) else 1
        d = producer.get(n.input[1])
        codes = value(d.input[0]) if d is not None and d.op_type == "DequantizeLinear" else None
        if codes is None or codes.ndim != 2 or codes.size * 4 <= block_bytes:
            nodes.append(n)
            continue
        rows = codes.shape[axis]
        w = dequantized(n.input[1], rows, axis)
        has_bias = n.op_type == "Gemm" and len(n.input) > 2 and bool(n.input[2])
        bias = dequantized(n.input[2], rows, 0) if has_bias else None
        if w is None or (has_bias and (bias is None or bias[0].ndim != 1)):
            nodes.append(n)
            continue
        step = max(1, block_bytes // (4 * codes.shape[1 - axis]))
        parts = []
        for k, r0 in enumerate(range(0, rows, step)):
            r1 = min(rows, r0 + step)
            tag = f"{n.output[0]}_dfq_block{k}"
            inputs = [n.input[0]]
            for what, (q, sc, zp, dq), ax in (("w", w, axis), ("b", bias, 0)) if has_bias else (("w", w, axis),):
                block = (q[r0:r1] if ax == 0 else np.ascontiguousarray(q[:, r0:r1])) if q.ndim == 2 else q[r0:r1]
                new_arrays[f"{tag}_{what}_codes"] = block
                inits.append(stub_tensor(f"{tag}_{what}_codes", onnx.helper.np_dtype_to_tensor_dtype(block.dtype),
                                         block.shape))
                q_in = [f"{tag}_{what}_codes"]
                for part, v in (("scale", sc), ("zero", zp)):
                    if v is not None:
                        inits.append(numpy_helper.from_array(np.ascontiguousarray(v[r0:r1]) if v.size > 1 else v,
                                                             f"{tag}_{what}_{part}"))
                        q_in.append(f"{tag}_{what}_{part}")
                nodes.append(onnx.helper.make_node("DequantizeLinear", q_in, [f"{tag}_{what}"], name=f"{tag}_{what}_dq",
                                                   **({"axis": ax} if sc.size > 1 else {})))
                inputs.append(f"{tag}_{what}")
                gone |= {dq.output[0]}
            nodes.append(onnx.helper.make_node(n.op_type, inputs, [f"{tag}_y"], name=f"{tag}_product", **attrs))
            parts.append(f"{tag}_y")
        nodes.append(onnx.helper.make_node("Concat", parts, [n.output[0]], name=f"{n.output[0]}_dfq_blocks", axis=-1))
    if not gone:
        return model, arrays
    kept = [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] in gone)]
    used = {x for n in kept for x in n.input}
    out = onnx.ModelProto()
    _copy_fields(out, model, "graph")
    _copy_fields(out.graph, model.graph, "node")
    del out.graph.initializer[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(t for t in list(model.graph.initializer) + inits if t.name in used)
    names = {t.name for t in out.graph.initializer}
    return out, {k: v for k, v in new_arrays.items() if k in names}


def lean(arrays) -> bool:
    """Weights over LEAN_BYTES (2 GiB of floating-point arrays: only a model over protobuf's limit
    has them): onnxruntime sessions then hold no copy of the Gemm/MatMul matrices (shared_session)."""
    return sum(a.nbytes for a in arrays if a.dtype.kind == "f") > LEAN_BYTES


def shared_session(model: onnx.ModelProto, arrays: dict[str, np.ndarray], so: ort.SessionOptions):
    """An onnxruntime CPU session of `model`, a structure whose initializers named in `arrays`
    are stubs, computing on those arrays. They are external initializers, which onnxruntime
    copies (SessionOptions.add_external_initializers; measured: +548 MB for VGG-19's 548 MB, +2.1
    GB for a 23,500 x 23,500 Gemm) and, for a constant Gemm/MatMul matrix, packs into one more
    copy (+2.1 GB there, transiently both). A product with a dequantized matrix of over
    BLOCK_BYTES is computed in blocks of output channels (_blocked_products: the same sums; VGG-19's
    bias-correction probe peaks 370 MB lower). Over LEAN_BYTES of weights (lean()), a matrix that
    only Gemm/MatMul read as their second operand, and int8 codes that only DequantizeLinear reads,
    are graph inputs instead, fed from the arrays on every run (FedSession: no copy), and
    prepacking is off. Not below: onnxruntime computes a one-row product on an unpacked matrix by
    another kernel (a matrix-vector product) whose float sums round differently, and models under
    2 GB convert byte for byte as they always did."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    big = lean(arrays.values())
    model, arrays = _blocked_products(model, arrays, BLOCK_BYTES)
    fed = {}
    if big:
        so.add_session_config_entry("session.disable_prepacking", "1")
        fed = {k: a for k, a in arrays.items() if _matrix_operand_only(model, k) or _dequantized_only(model, k)}
    if fed:
        structure = onnx.ModelProto()
        _copy_fields(structure, model, "graph")
        _copy_fields(structure.graph, model.graph, "initializer")
        structure.graph.initializer.extend(t for t in model.graph.initializer if t.name not in fed)
        have = {i.name for i in structure.graph.input}
        for t in model.graph.initializer:
            if t.name in fed and t.name not in have:
                structure.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        model = structure
    rest = {k: a for k, a in arrays.items() if k not in fed}
    ortvalues = [ort.OrtValue.ortvalue_from_numpy(a) for a in rest.values()]
    if rest:
        so.add_external_initializers(list(rest), ortvalues)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    keep = (rest, ortvalues, so)  # onnxruntime reads them in place: keep them alive
    if fed:
        return FedSession(sess, fed, keep)
    sess._dfq_initializers = keep
    return sess


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


def save_model(model: onnx.ModelProto, out, inp=None, large: int = LARGE_MODEL_BYTES) -> Path:
    """Write `model` to `out` atomically (temporary file + rename). A model over `large` bytes
    (protobuf cannot serialize 2 GiB), or converted from an input over them (`inp`, its file and
    external data), is written with its tensors in `out.name + ".data"` beside `out` (relative
    location; both files first in a temporary folder there, then renamed, data first); `model`'s
    tensors then refer to that file. Each tensor goes to the data file from its own bytes, so the
    write holds no serialized copy of the weights."""
    out = check_output_path(out, inp)
    folder = out.resolve().parent
    try:
        size = model.ByteSize()
    except Exception:  # over what protobuf can size
        size = large + 1
    external = size > large or (inp is not None and not isinstance(inp, onnx.ModelProto) and _model_bytes(inp) > large)
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise DfqError(f"{out.parent}: cannot write there ({e.strerror})") from None
    tmp = os.path.join(tmpdir, out.name)
    data = out.name + ".data"
    try:
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
            os.chmod(os.path.join(tmpdir, data), 0o666 & ~_umask())
            os.replace(os.path.join(tmpdir, data), folder / data)
        else:
            onnx.save_model(model, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # the output follows the umask like any new file
        os.replace(tmp, out)
    except BaseException as e:
        if isinstance(e, OSError):
            raise DfqError(f"{out}: cannot write ({e.strerror or e})") from None
        raise
    finally:
        for name in os.listdir(tmpdir) if os.path.isdir(tmpdir) else []:
            os.unlink(os.path.join(tmpdir, name))
        if os.path.isdir(tmpdir):
            os.rmdir(tmpdir)
    return out


def _model_bytes(path) -> int:
    """The bytes of a model file and of the external data files it names (0 if unreadable). A file
    over 64 MB is judged by its own size (its weights are inside it; it is not parsed again)."""
    try:
        path = Path(path)
        size = path.stat().st_size
        if size > 1 << 26:
            return size
        m = onnx.load(str(path), load_external_data=False)
        files = {e.value for t in _tensors(m.graph) if t.data_location == TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
        return size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())
    except Exception:
        return 0


def save_library(lib, model: onnx.ModelProto, out, inp=None) -> Path:
    """Write a C library (passes/emit_c.py) into folder `out` (created if missing, its parent must
    exist): NAME.c, NAME.h and NAME_int.onnx, the integer graph it computes bit for bit. Each file
    is written to a temporary name first and renamed, so no half-written file is left."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DfqError(f"{out}: --format c writes a folder (NAME.c, NAME.h), and this is a file")
    if not out.resolve().parent.is_dir():
        raise DfqError(f"{out.parent}: output folder does not exist")
    if inp is not None and not isinstance(inp, onnx.ModelProto) and Path(inp).resolve().parent == out.resolve() \
            and Path(inp).name == f"{lib.prefix}_int.onnx":
        raise DfqError(f"{out / Path(inp).name}: would overwrite the input; choose another --prefix")
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise DfqError(f"{out}: cannot create ({e.strerror})") from None
    save_model(model, out / f"{lib.prefix}_int.onnx", inp)
    for name, text in ((f"{lib.prefix}.h", lib.header), (f"{lib.prefix}.c", lib.source)):
        tmp = out / f".{name}.tmp"
        try:
            tmp.write_text(text)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out / name)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            raise DfqError(f"{out / name}: cannot write ({e.strerror or e})") from None
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
