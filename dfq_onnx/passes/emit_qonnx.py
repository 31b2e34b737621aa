"""Write the quantized model in QONNX: a float graph whose quantizers are QONNX `Quant` nodes, the
input format of FINN, hls4ml and Concrete ML.

The QONNX graph is the QDQ graph (emit_qdq.py, which renders the quantized IR) with each
quantizer respelled, so both compute the same numbers:
- an activation's QuantizeLinear -> [Clip of the codes] -> DequantizeLinear becomes
  Quant(x, 2^-f, 0, bits, signed, narrow=0, ROUND) (ROUND is round half to even, as
  QuantizeLinear), preceded by a float Clip at the code bounds times 2^-f where the codes were
  clipped (exact: the bounds are on the grid and rounding is monotone, so clamping then rounding
  gives the clamped codes; every quantized tensor ends in a Quant, as FINN and Concrete ML want);
- a weight's DequantizeLinear of int8 codes becomes the dequantized float weight (exact: codes
  times a power of two) behind Quant(w, 2^-f per channel, 0, the module's weight bits, signed,
  narrow=0, ROUND), which gives it back unchanged;
- an int32 bias's DequantizeLinear becomes its float32 value, computed as DequantizeLinear does
  (float32(code) * 2^-f).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph_utils import new_name
from ..quantized import QuantizedModel

QONNX_DOMAIN = "qonnx.custom_op.general"
SIGNED = {np.dtype(np.int8): (8, 1), np.dtype(np.uint8): (8, 0), np.dtype(np.int16): (16, 1), np.dtype(np.uint16): (16, 0),
          np.dtype(np.int32): (32, 1)}


def _scale_for(scale: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A per-axis DequantizeLinear scale reshaped to broadcast against a tensor of `rank`."""
    if scale.ndim == 0 or rank == 0:
        return scale
    shape = [1] * rank
    shape[axis % rank] = -1
    return scale.reshape(shape)


def to_qonnx(qdq: onnx.ModelProto, qm: QuantizedModel) -> onnx.ModelProto:
    """The QONNX model of a QDQ model written by emit_qdq for the quantized model `qm` (see above)."""
    g = gs.import_onnx(qdq)
    weight_bits = {m.name: int(m.weight_bits) for m in qm.modules if m.kind == "linear"}
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731

    def quant(x, scale, bits: int, signed: int, name: str, out=None):
        out = out if out is not None else gs.Variable(new_name(g, f"{name}_quant"), np.float32)
        g.nodes.append(gs.Node("Quant", new_name(g, f"{name}_Quant"),
                               {"signed": signed, "narrow": 0, "rounding_mode": "ROUND"},
                               [x, gs.Constant(new_name(g, f"{name}_scale"), f32(scale)),
                                gs.Constant(new_name(g, f"{name}_zeropt"), f32(0.0)),
                                gs.Constant(new_name(g, f"{name}_bitwidth"), f32(bits))], [out], domain=QONNX_DOMAIN))
        return out

    for dq in [n for n in g.nodes if n.op == "DequantizeLinear"]:
        src, scale = dq.inputs[0], np.asarray(dq.inputs[1].values, np.float32)
        out = dq.outputs[0]
        if isinstance(src, gs.Constant):  # a weight or a bias
            codes = np.asarray(src.values)
            s = _scale_for(scale, int(dq.attrs.get("axis", 1)), codes.ndim)
            value = codes.astype(np.float32) * s
            dq.inputs.clear()
            dq.outputs.clear()
            readers = [r for r in out.outputs]
            bits = next((weight_bits[r.name] for r in readers if r.name in weight_bits and r.inputs[1] is out), None)
            if codes.dtype == np.int32 or bits is None:  # a bias: its float value
                new = gs.Constant(new_name(g, f"{src.name}_float"), value.astype(np.float32))
            else:
                new = quant(gs.Constant(new_name(g, f"{src.name}_float"), value.astype(np.float32)), s, bits, 1, src.name)
            for r in readers:
                r.inputs = [new if t is out else t for t in r.inputs]
            g.outputs = [new if t is out else t for t in g.outputs]
            continue
        clip = src.inputs[0] if src.inputs and src.inputs[0].op == "Clip" else None
        q = (clip.inputs[0].inputs[0] if clip is not None else src.inputs[0]) if src.inputs else None
        if q is None or q.op != "QuantizeLinear":
            continue
        zp = np.asarray(q.inputs[2].values)
        bits, signed = SIGNED[np.dtype(zp.dtype)]
        offset = int(zp)  # emit_qdq's signed_as_uint8: signed codes stored as uint8 + 128
        if offset:
            signed = 1
        x = q.inputs[0]
        dq.inputs.clear()
        dq.outputs.clear()
        if clip is None:
            quant(x, scale, bits, signed, x.name, out)
        else:  # clamping the value to code bounds times the scale, then rounding, clamps the codes
            lo, hi = (float(np.asarray(clip.inputs[k].values)) - offset for k in (1, 2))
            c = gs.Variable(new_name(g, f"{x.name}_clipped"), np.float32)
            g.nodes.append(gs.Node("Clip", new_name(g, f"{x.name}_code_clip"), {},
                                   [x, gs.Constant(new_name(g, f"{x.name}_lo"), f32(lo * float(scale))),
                                    gs.Constant(new_name(g, f"{x.name}_hi"), f32(hi * float(scale)))], [c]))
            quant(c, scale, bits, signed, x.name, out)
    g.cleanup()
    g.toposort()
    model = gs.export_onnx(g, do_type_check=False)
    model.ir_version = qdq.ir_version
    imports = {o.domain: o.version for o in qdq.opset_import}
    imports.setdefault(QONNX_DOMAIN, 1)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid(d, v) for d, v in imports.items()])
    for p in qdq.metadata_props:
        model.metadata_props.add(key=p.key, value=p.value)
    model.producer_name, model.producer_version = qdq.producer_name, qdq.producer_version
    return model
