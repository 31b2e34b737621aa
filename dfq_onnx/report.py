"""Facts about any ONNX model: op counts, requantization points, modules, scales.

Works on float models, dfq-onnx models and onnxruntime-quantized models alike.

Counting rules:
- requant_points: QuantizeLinear nodes whose input is not a constant and that are not lossless,
  plus dfq RoundingShift ops. A QuantizeLinear is lossless when it re-quantizes the output of a
  pass-through op (MaxPool, Reshape, ...) whose data input comes from a DequantizeLinear with the
  same scale and zero point: the values are already on the grid, nothing is rounded. Those are
  reported apart as `requant_lossless`.
- weight_quantizers: constant tensors that are quantized (DequantizeLinear or QuantizeLinear of
  an initializer, or the integer weight of a ConvInteger/MatMulInteger).
- scales: every element of every scale tensor of a Q/DQ node, counted once per tensor.
- QONNX: a Quant node (quantize and dequantize in one) counts as a QuantizeLinear: on a constant
  it is a weight quantizer, after a pass-through op whose input comes from a Quant of the same
  scale, zero point and bit width it is lossless, else a requantization point; its scale counts.
- per_layer_requant_points (float models only, else null): what a per-layer scheme would need
  on this graph: graph inputs plus one per output of every op that computes new values (Conv,
  BatchNormalization, activations, Add, ...; not pass-through ops).
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .fixedpoint import is_pow2
from .graph_utils import PASS_THROUGH_OPS
from .model_io import default_opset, read_model

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QONNX_QUANT = "Quant"  # QONNX's quantizer (x, scale, zero point, bit width): a Q/DQ pair in one node
SHIFT_OPS = ("RoundingShift", "RoundingDivide")  # dfq's integer requantizers
INTEGER_LINEAR = ("ConvInteger", "MatMulInteger")


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def _qparams(node: onnx.NodeProto, consts) -> tuple | None:
    """(scale bytes, zero-point bytes) of a Q/DQ node, for comparing two nodes."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return None
    s = consts[node.input[1]]
    z = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    if z is None:
        return None
    bits = consts.get(node.input[3]) if node.op_type == QONNX_QUANT and len(node.input) > 3 else None
    return (s.tobytes(), s.shape, np.asarray(z).astype(np.int64).tobytes(),
            None if bits is None else np.asarray(bits).tobytes(),
            tuple((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute)
            if node.op_type == QONNX_QUANT else None)


def inspect_model(model) -> dict:
    m = read_model(model, external_data=False)
    g = m.graph
    consts = _constants(m)
    producer = {o: n for n in g.node for o in n.output}
    op_types = Counter(n.op_type for n in g.node)

    requant = lossless = 0
    quantized_consts: set[str] = set()
    scale_tensors: dict[str, np.ndarray] = {}
    for n in g.node:
        kind = _requant_kind(n, producer, consts)
        requant += kind == "requant"
        lossless += kind == "lossless"
        if n.op_type in INTEGER_LINEAR and len(n.input) > 1 and n.input[1] in consts:
            quantized_consts.add(n.input[1])
        if n.op_type in QDQ_OPS + (QONNX_QUANT,):
            if len(n.input) > 1 and n.input[1] in consts:
                scale_tensors[n.input[1]] = consts[n.input[1]]
            if n.input[0] in consts:
                quantized_consts.add(n.input[0])
    total = sum(int(np.asarray(s).size) for s in scale_tensors.values())
    pow2 = sum(int(np.sum(is_pow2(np.asarray(s, dtype=np.float64)))) for s in scale_tensors.values())

    sparsity = _weight_sparsity(g, producer, consts)
    meta = {p.key: p.value for p in m.metadata_props}
    modules = json.loads(meta["dfq.modules"]) if "dfq.modules" in meta else None
    tables = sum(1 for n in g.node if _is_table(n, consts)) or \
        (sum(1 for x in modules if x.get("kind") == "table") if modules else 0)
    quantized = bool(quantized_ops(m))
    return {
        "opset": default_opset(m),
        "nodes": len(g.node),
        "op_types": dict(sorted(op_types.items())),
        "requant_points": requant,
        "requant_lossless": lossless,
        "weight_quantizers": len(quantized_consts),
        "weight_sparsity": sparsity,  # per integer weight constant: its zero codes
        "modules": None if modules is None else len(modules),
        "module_list": modules,
        "float_islands": json.loads(meta["dfq.float_islands"]) if "dfq.float_islands" in meta else None,
        "float_modules": json.loads(meta["dfq.float_modules"]) if "dfq.float_modules" in meta else None,
        "tables": tables,
        "scales": {"total": total, "power_of_two": pow2},
        "per_layer_requant_points": None if quantized else per_layer_requant_points(m),
        "producer": meta.get("dfq.producer") or (m.producer_name or None),
    }


def _weight_sparsity(g, producer, consts) -> list[dict]:
    """Per integer weight of a linear op (behind a DequantizeLinear, or a ConvInteger/MatMulInteger
    weight), its codes equal to the zero point (zero weights) and its size."""
    rows = {}
    for n in g.node:
        if len(n.input) < 2:
            continue
        if n.op_type in INTEGER_LINEAR and n.input[1] in consts:
            name, zp = n.input[1], consts[n.input[3]] if len(n.input) > 3 and n.input[3] in consts else 0
        elif n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input[1] in producer \
                and producer[n.input[1]].op_type == "DequantizeLinear" and producer[n.input[1]].input[0] in consts:
            dq = producer[n.input[1]]
            name, zp = dq.input[0], consts[dq.input[2]] if len(dq.input) > 2 and dq.input[2] in consts else 0
        else:
            continue
        w = np.asarray(consts[name])
        if w.dtype.kind in "iu":
            rows[name] = {"weight": name, "zeros": int(np.count_nonzero(w == np.asarray(zp).reshape(-1)[0])),
                          "size": int(w.size)}
    return [rows[k] for k in sorted(rows)]


def per_layer_requant_points(model: onnx.ModelProto) -> int:
    """What a per-layer scheme would need on a float model (see the module docstring); reads the
    graph's structure only, never a weight."""
    g = model.graph
    compute = [n for n in g.node if n.op_type not in PASS_THROUGH_OPS + QDQ_OPS + ("Constant", "Identity",
                                                                                  "Shape", "Gather", "Cast")]
    inits = {i.name for i in g.initializer}
    return sum(1 for i in g.input if i.name not in inits) + len(compute)


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The op types that show a model is already quantized (Q/DQ, integer and QLinear kernels,
    dfq-onnx's requantizers), sorted."""
    ops = {n.op_type for n in model.graph.node}
    return sorted(op for op in ops if op in QDQ_OPS + INTEGER_LINEAR + ("DynamicQuantizeLinear", QONNX_QUANT)
                  or op.startswith(SHIFT_OPS + ("QLinear",)))


def _requant_kind(n: onnx.NodeProto, producer, consts) -> str | None:
    """"requant" for a requantization point, "lossless" for a QuantizeLinear that rounds nothing
    (see the module docstring), None for any other node."""
    if n.op_type.startswith(SHIFT_OPS):  # RoundingShift and its variants, RoundingDivide
        return "requant"
    if _is_table(n, consts):  # a lookup table: its entries were rounded once, at conversion
        return "requant"
    if n.op_type not in ("QuantizeLinear", QONNX_QUANT) or n.input[0] in consts:
        return None
    return "lossless" if _is_lossless(n, producer, consts) else "requant"


def _is_table(n: onnx.NodeProto, consts) -> bool:
    """A Gather of 8-bit codes from a constant table (a multiple of 256 entries): dfq-onnx's lookup
    table in the integer graph."""
    t = consts.get(n.input[0]) if n.op_type == "Gather" else None
    return t is not None and t.dtype in (np.int8, np.uint8) and t.ndim == 1 and t.size % 256 == 0


def requant_nodes(model) -> list[onnx.NodeProto]:
    """The nodes counted as requantization points by inspect_model, in graph order."""
    m = read_model(model, external_data=False)
    consts = _constants(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    return [n for n in m.graph.node if _requant_kind(n, producer, consts) == "requant"]


def _is_lossless(q: onnx.NodeProto, producer, consts) -> bool:
    p = producer.get(q.input[0])
    if p is None or p.op_type not in PASS_THROUGH_OPS:
        return False
    data = [i for i in p.input if i and i not in consts]
    if not data:
        return False
    if p.op_type != "Concat":
        data = data[:1]
    want = _qparams(q, consts)
    source = QONNX_QUANT if q.op_type == QONNX_QUANT else "DequantizeLinear"
    for i in data:
        d = producer.get(i)
        if d is None or d.op_type != source or want is None or _qparams(d, consts) != want:
            return False
    return True


def per_layer_summary(info: dict) -> str:
    return f"{info['requant_points']} requantization points (per-layer scheme: {info['per_layer_requant_points']})"
