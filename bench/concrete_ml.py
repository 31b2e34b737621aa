"""Concrete ML (fully homomorphic encryption) on dfq-onnx's QONNX output for the shipped MNIST model.

  python bench/concrete_ml.py [--venv PATH]     # default venv: bench/cache/cml-venv

Concrete ML pins old torch and onnx versions, so it runs in its own virtual environment, never in
this one. When PATH holds no working Concrete ML, the script creates it with `python3 -m venv`
(the interpreter running this script) and `pip install concrete-ml==1.9.0` (about 6 GB with torch's
CUDA wheels). If that fails, pip's error lines are recorded verbatim in the results and no variant
is compiled.

In this environment, per variant:
 1. the shipped model is converted by dfq-onnx to QONNX (Quant nodes, power-of-two scales);
 2. the QONNX model is adapted to what Concrete ML 1.9's QAT importer accepts, one function per
    adaptation (see ADAPTATIONS). Each one keeps the computed function: after every step the
    adapted model runs on CHECK_SAMPLES test digits next to the unadapted QONNX model with the
    qonnx package's executor (or, when qonnx is not importable, with its Quant nodes spelled as
    standard ops in onnxruntime next to dfq-onnx's QDQ model), and the largest difference is
    recorded; a difference above float32 rounding stops the variant.
Then a child script in the venv compiles the adapted model with compile_onnx_model (import_qat=True,
inputset = the 128 calibration digits) and runs fhe="simulate" (never real FHE) on the 1000 test
digits. The results give test accuracy, argmax agreement with the float model (onnxruntime here)
and with dfq-onnx's own quantized model (its QDQ model in onnxruntime), the circuit's largest
integer bit width and Concrete ML's per-layer bit width report. FHE table lookups take at most
16-bit inputs, and wide ones may find no cryptographic parameters, so a variant may fail to
compile: the error's type and first line are recorded (with the graph lines Concrete marks), next
to the largest integer Concrete traced before failing and the accumulator widths dfq-onnx's IR
proves (`max_accumulator_bits`, and per module bit_length(acc_bound) + 1).

Variants (VARIANTS): W8A8 (dfq-onnx's default), W8A8 with Concrete ML's rounding_threshold_bits 8
and 6, W4A8 / W3A8 / W2A8 (dfq-onnx keeps activations at 8 bits), and W4A8 / W3A8 with
rounding_threshold_bits 8. About 20 minutes on 2 cores, mostly the simulation of the variants that
compile. Results: bench/cache/concrete_ml.json, with a one-paragraph markdown summary under
"markdown".
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from dfq_onnx import QuantConfig
from dfq_onnx.pipeline import run as dfq_run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"
TEST = ROOT / "models" / "mnist_test.npz"
DEFAULT_VENV = HERE / "cache" / "cml-venv"
OUT = HERE / "cache" / "concrete_ml.json"

CML_REQUIREMENT = "concrete-ml==1.9.0"
VENV_PACKAGES = ("concrete-ml", "concrete-python", "torch", "onnx", "numpy")
QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")
BREVITAS_DOMAIN = "onnx.brevitas"  # the only Quant domain Concrete ML 1.9 looks up
CML_OPSET = 14                     # Concrete ML 1.9 requires opset_import[0] == ("", 14)
PASS_THROUGH = ("MaxPool", "Clip")  # ops after which Concrete ML needs the quantization re-applied
CHECK_SAMPLES = 16                 # test digits for the adaptation checks
CHECK_TOLERANCE = 1e-5             # float32 rounding on logits of magnitude ~10
CHILD_TIMEOUT = 900                # seconds per variant (compile + simulation)
# Concrete ML's n_bits for a QAT import: the real widths come from the Quant nodes;
# model_outputs sets the requantization of the final Gemm's output.
N_BITS = {"model_inputs": 8, "op_weights": 8, "op_inputs": 8, "model_outputs": 8}

# On 2 cores a compiled variant takes about 7 minutes (simulation: 0.4 s per digit), a failed one
# 5 s to 3 minutes; W2A8 with rounding is left out (dfq-onnx's own W2A8 model is ~47 % accurate).
VARIANTS = (
    {"name": "W8A8", "weight_bits": 8, "rounding_threshold_bits": None},
    {"name": "W8A8, rounding_threshold_bits=8", "weight_bits": 8, "rounding_threshold_bits": 8},
    {"name": "W8A8, rounding_threshold_bits=6", "weight_bits": 8, "rounding_threshold_bits": 6},
    {"name": "W4A8", "weight_bits": 4, "rounding_threshold_bits": None},
    {"name": "W3A8", "weight_bits": 3, "rounding_threshold_bits": None},
    {"name": "W2A8", "weight_bits": 2, "rounding_threshold_bits": None},
    {"name": "W4A8, rounding_threshold_bits=8", "weight_bits": 4, "rounding_threshold_bits": 8},
    {"name": "W3A8, rounding_threshold_bits=8", "weight_bits": 3, "rounding_threshold_bits": 8},
)

# Runs inside the venv: python child.py JOB.json. Writes JOB["result"] (JSON) and, when the model
# compiled, the simulated logits to JOB["logits"] (.npy).
CHILD = r'''
import json, re, sys, time
from importlib import metadata

job = json.load(open(sys.argv[1]))
if job["what"] == "versions":
    out = {}
    for name in job["packages"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    json.dump(out, open(job["result"], "w"))
    sys.exit(0)

import numpy as np
import onnx
from concrete.fhe.compilation.artifacts import DebugArtifacts
from concrete.ml.torch.compile import compile_onnx_model


def plain(v):
    """JSON-able copy of Concrete ML's bit width report (tuples, numpy scalars)."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def highlighted(text):
    """Concrete's explanation in a compile error: each message after a ^^^ marker, with the marked
    graph line's operation (shortened), value type and "@ layer" tag (None when absent)."""
    lines, messages = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("^") and i:
            marked = lines[i - 1]
            op = marked.split("#", 1)[0].strip()
            kind = re.search(r"\w+(Tensor|Scalar)<[^>]*>", marked)
            messages.append({"message": line.strip().lstrip("^").strip(),
                             "operation": op if len(op) <= 40 else op[:37] + "...",
                             "type": kind.group(0) if kind else None,
                             "layer": marked.rsplit("@ ", 1)[1].strip() if "@ " in marked else None})
    return messages or None


def traced_bit_width(artifacts):
    """Largest integer of the last graph Concrete traced (also known when compilation failed)."""
    graphs = [f.final_graph for f in artifacts.module_artifacts.functions.values() if f.final_graph]
    return max((g.maximum_integer_bit_width() for g in graphs), default=None)


data = np.load(job["data"])
model = onnx.load(job["model"])
artifacts = DebugArtifacts(job["artifacts"])
out = {"compiled": False}
t0 = time.perf_counter()
try:
    qm = compile_onnx_model(model, data["calib"], import_qat=True, n_bits=job["n_bits"],
                            rounding_threshold_bits=job["rounding_threshold_bits"], artifacts=artifacts)
except Exception as e:
    text = str(e).strip()
    out["error"] = type(e).__name__ + (": " + text.splitlines()[0] if text else "")
    out["error_detail"] = highlighted(text)
    out["compile_seconds"] = time.perf_counter() - t0
    try:
        out["traced_max_bit_width"] = traced_bit_width(artifacts)
    except Exception:
        out["traced_max_bit_width"] = None
else:
    out["compile_seconds"] = time.perf_counter() - t0
    out["compiled"] = True
    out["max_bit_width"] = int(qm.fhe_circuit.graph.maximum_integer_bit_width())
    out["bitwidth_report"] = plain(qm.bitwidth_and_range_report())
    t1 = time.perf_counter()
    logits = qm.forward(data["test"], fhe="simulate")
    out["simulate_seconds"] = time.perf_counter() - t1
    np.save(job["logits"], np.asarray(logits, dtype=np.float32))
json.dump(out, open(job["result"], "w"))
'''


# --- data and reference outputs (this environment) ------------------------------------------------
def load_data() -> dict:
    """Calibration digits, test digits and labels (the npz keys are the model's input name)."""
    name = onnx.load(str(MODEL), load_external_data=False).graph.input[0].name
    calib, test = np.load(CALIB), np.load(TEST)
    return {"input": name, "calib": calib[name].astype(np.float32),
            "test": test[name].astype(np.float32), "labels": test["labels"]}


def ort_logits(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """The model's first output on x with onnxruntime (CPU)."""
    blob = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def top1(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of rows whose argmax equals reference (labels, or another model's logits)."""
    ref = reference if reference.ndim == 1 else reference.argmax(1)
    return float((logits.argmax(1) == ref).mean())


# --- small graph helpers -----------------------------------------------------------------------------
def initializers(m: onnx.ModelProto) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def set_initializer(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Add or replace a float32 initializer."""
    tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
    for init in m.graph.initializer:
        if init.name == name:
            init.CopyFrom(tensor)
            return
    m.graph.initializer.append(tensor)


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def producers(m: onnx.ModelProto) -> dict:
    return {o: n for n in m.graph.node for o in n.output}


def consumers(m: onnx.ModelProto, tensor: str) -> list:
    return [n for n in m.graph.node if tensor in n.input]


def is_quant(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Quant"


def quant_range(bits: float, signed: int, narrow: int) -> tuple[float, float]:
    """Integer code range of a QONNX Quant node."""
    bits = int(bits)
    if signed:
        return -(2.0 ** (bits - 1)) + narrow, 2.0 ** (bits - 1) - 1
    return 0.0, 2.0 ** bits - 1 - narrow


def tensor_shapes(m: onnx.ModelProto) -> dict:
    """Static shapes of every tensor (batch 1) by ONNX shape inference, with each Quant (an
    elementwise op that keeps its input's shape) read as an Identity."""
    g = copy.deepcopy(m)
    for node in g.graph.node:
        if is_quant(node):
            node.op_type, node.domain = "Identity", ""
            del node.input[1:]
            del node.attribute[:]
    for value in list(g.graph.input) + list(g.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 1
    g = onnx.shape_inference.infer_shapes(g, strict_mode=True)
    shapes = {i.name: list(i.dims) for i in g.graph.initializer}
    for value in list(g.graph.value_info) + list(g.graph.input) + list(g.graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return shapes


# --- adaptations for Concrete ML 1.9's importer (each keeps the computed function) ------------------
def use_brevitas_domain(m: onnx.ModelProto) -> onnx.ModelProto:
    """Quant nodes under "onnx.brevitas" (Concrete ML looks ops up as domain + "." + op_type and only
    knows Brevitas' export domain; the op is QONNX's Quant either way), and the default-domain opset
    exactly 14, listed first (Concrete ML asserts both). The model's ops mean the same at 13 and 14."""
    m = copy.deepcopy(m)
    for node in m.graph.node:
        if is_quant(node) and node.domain in QONNX_DOMAINS:
            node.domain = BREVITAS_DOMAIN
    others = [o for o in m.opset_import if o.domain not in ("", "ai.onnx", BREVITAS_DOMAIN, *QONNX_DOMAINS)]
    del m.opset_import[:]
    m.opset_import.extend([helper.make_opsetid("", CML_OPSET), helper.make_opsetid(BREVITAS_DOMAIN, 1)])
    m.opset_import.extend(others)
    return m


def explicit_attributes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Write out the attributes whose ONNX defaults Concrete ML mishandles: Conv's kernel_shape, pads,
    strides, dilations and group; MaxPool/AveragePool's pads (4 values) and strides; Quant's
    signed, narrow and rounding_mode (QONNX defaults 1, 0, "ROUND")."""
    m = copy.deepcopy(m)
    shapes = tensor_shapes(m)
    for node in m.graph.node:
        attrs = attributes(node)
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"{node.name}: auto_pad {attrs['auto_pad']} has no explicit form here")
        if node.op_type in ("Conv", "MaxPool", "AveragePool"):
            kernel = attrs.get("kernel_shape") or shapes[node.input[1]][2:]
            defaults = {"kernel_shape": list(kernel), "pads": [0] * 2 * len(kernel),
                        "strides": [1] * len(kernel)}
            if node.op_type == "Conv":
                defaults.update(dilations=[1] * len(kernel), group=1)
            for name, value in defaults.items():
                if name not in attrs:
                    set_attribute(node, name, value)
        if is_quant(node):
            for name, value in (("signed", 1), ("narrow", 0), ("rounding_mode", "ROUND")):
                if name not in attrs:
                    set_attribute(node, name, value)
    return m


def global_pool_as_average_pool(m: onnx.ModelProto) -> onnx.ModelProto:
    """GlobalAveragePool (not implemented in Concrete ML) as AveragePool whose kernel and stride are
    the input's whole spatial size, without padding: the same mean."""
    m = copy.deepcopy(m)
    shapes = tensor_shapes(m)
    for node in m.graph.node:
        if node.op_type == "GlobalAveragePool":
            spatial = shapes[node.input[0]][2:]
            node.op_type = "AveragePool"
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("kernel_shape", spatial),
                                   helper.make_attribute("strides", spatial),
                                   helper.make_attribute("pads", [0] * 2 * len(spatial))])
    return m


def requantize_after_pass_through(m: onnx.ModelProto) -> onnx.ModelProto:
    """A Quant after every MaxPool and Clip whose output is not only read by Quant nodes: Concrete
    ML's QAT importer loses the quantization through them (dfq-onnx spells Relu6 as Quant, then
    Clip; its MaxPool is usually followed by a Quant already). The new Quant repeats the one that
    produced the op's input (same scale, bits, sign), so it is exact: the max of codes on that grid
    is on the grid and within range, and so is a Clip whose limits are on the grid (checked)."""
    m = copy.deepcopy(m)
    made, values = producers(m), initializers(m)
    nodes = []
    for node in m.graph.node:
        nodes.append(node)
        if node.op_type not in PASS_THROUGH or all(is_quant(c) for c in consumers(m, node.output[0])):
            continue
        source = made.get(node.input[0])
        if not is_quant(source):
            raise ValueError(f"{node.name}: input is not produced by a Quant node")
        scale = values[source.input[1]]
        for limit in node.input[1:]:
            if limit and limit in values and not np.all(np.mod(values[limit] / scale, 1) == 0):
                raise ValueError(f"{node.name}: Clip limit {values[limit]} is not on its input's grid")
        raw, requant = node.output[0], node.output[0] + "_requant"
        for reader in consumers(m, raw):
            reader.input[:] = [requant if i == raw else i for i in reader.input]
        for value in m.graph.output:
            if value.name == raw:
                value.name = requant
        repeat = copy.deepcopy(source)
        repeat.name = (node.name or raw) + "_requant"
        repeat.input[0], repeat.output[0] = raw, requant
        nodes.append(repeat)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def per_tensor_weight_quant(m: onnx.ModelProto) -> onnx.ModelProto:
    """Per-tensor weight Quant nodes (Concrete ML rejects a per-channel scale such as [C,1,1,1]).
    With power-of-two channel scales 2^e_c this is exact: the initializer takes the per-channel
    quantized values, the Quant the smallest scale 2^e_min and bits + (e_max - e_min), so every
    code q_c * 2^(e_c - e_min) is representable and rounding leaves the values unchanged. The
    accumulators grow by up to e_max - e_min bits on the channels with larger scales."""
    m = copy.deepcopy(m)
    values = initializers(m)
    for node in m.graph.node:
        if not is_quant(node) or node.input[0] not in values or values[node.input[1]].size == 1:
            continue
        w, scale, bits = values[node.input[0]], values[node.input[1]], float(values[node.input[3]])
        exps = np.log2(scale.astype(np.float64))
        if not np.array_equal(exps, np.round(exps)):
            raise ValueError(f"{node.name}: channel scales are not powers of two")
        attrs = attributes(node)
        lo, hi = quant_range(bits, attrs.get("signed", 1), attrs.get("narrow", 0))
        fake_quant = np.clip(np.rint(w / scale), lo, hi) * scale
        extra = int(exps.max() - exps.min())
        prefix = node.name or node.output[0]
        set_initializer(m, prefix + "_pt_weight", fake_quant)
        set_initializer(m, prefix + "_pt_scale", np.float32(scale.min()))
        set_initializer(m, prefix + "_pt_bitwidth", np.float32(bits + extra))
        node.input[0], node.input[1], node.input[3] = (prefix + "_pt_weight", prefix + "_pt_scale",
                                                       prefix + "_pt_bitwidth")
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


ADAPTATIONS = (use_brevitas_domain, explicit_attributes, global_pool_as_average_pool,
               requantize_after_pass_through, per_tensor_weight_quant)


# --- checking the adaptations -------------------------------------------------------------------------
def qonnx_executor():
    """qonnx's node-by-node executor as fn(model, x) -> logits, or None when qonnx is not importable."""
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.transformation.change_batchsize import ChangeBatchSize
        from qonnx.transformation.infer_shapes import InferShapes
    except ImportError:
        return None

    def execute(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
        wrapped = ModelWrapper(copy.deepcopy(m)).transform(ChangeBatchSize(len(x))).transform(InferShapes())
        graph = wrapped.model.graph
        return execute_onnx(wrapped, {graph.input[0].name: x})[graph.output[0].name]

    return execute


def quant_as_standard_ops(m: onnx.ModelProto) -> onnx.ModelProto:
    """Each Quant (zero point 0, ROUND) as Clip(Round(x / scale), lo, hi) * scale in standard ONNX ops,
    for onnxruntime; Round is half to even like Quant's ROUND, and the scales are powers of two."""
    m = copy.deepcopy(m)
    values = initializers(m)
    nodes = []
    for node in m.graph.node:
        if not is_quant(node):
            nodes.append(node)
            continue
        x, scale, zeropt, bitwidth = node.input
        if np.any(values[zeropt] != 0):
            raise ValueError(f"{node.name}: nonzero zero point")
        attrs = attributes(node)
        lo, hi = quant_range(float(values[bitwidth]), attrs.get("signed", 1), attrs.get("narrow", 0))
        p = node.output[0] + "_std"
        set_initializer(m, p + "_lo", np.float32(lo))
        set_initializer(m, p + "_hi", np.float32(hi))
        nodes += [helper.make_node("Div", [x, scale], [p + "_div"]),
                  helper.make_node("Round", [p + "_div"], [p + "_round"]),
                  helper.make_node("Clip", [p + "_round", p + "_lo", p + "_hi"], [p + "_clip"]),
                  helper.make_node("Mul", [p + "_clip", scale], [node.output[0]])]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    return m


def adapt(qonnx_model: onnx.ModelProto, qdq_logits: np.ndarray, x: np.ndarray) -> tuple:
    """The adapted model and one check per adaptation: the largest |difference| of the logits on x
    between the model so far and the unadapted QONNX model (qonnx's executor), or else dfq-onnx's
    QDQ model (qdq_logits) and the model so far with standard-op Quants (onnxruntime)."""
    execute = qonnx_executor()
    if execute is not None:
        method, reference = "qonnx executor vs the unadapted QONNX model", execute(qonnx_model, x)
        run_model = execute
    else:
        method, reference = "onnxruntime, Quant as standard ops, vs dfq-onnx's QDQ model", qdq_logits
        run_model = lambda m, xs: ort_logits(quant_as_standard_ops(m), xs)  # noqa: E731
    model, checks = qonnx_model, []
    for step in ADAPTATIONS:
        model = step(model)
        diff = float(np.abs(run_model(model, x) - reference).max())
        checks.append({"adaptation": step.__name__, "max_abs_diff": diff, "identical": diff <= CHECK_TOLERANCE})
    onnx.checker.check_model(model)
    return model, {"method": method, "samples": len(x), "steps": checks}


# --- dfq-onnx side ------------------------------------------------------------------------------------
def accumulator_bits(result) -> dict:
    """dfq-onnx's proven accumulator widths: the IR's maximum and, per module with an acc_bound,
    bit_length(acc_bound) + 1 (sign)."""
    per_module = {m.name: int(m.acc_bound).bit_length() + 1
                  for m in result.quantized.modules if getattr(m, "acc_bound", None) is not None}
    return {"max": int(result.quantized.facts["max_accumulator_bits"]), "per_module": per_module}


def convert(weight_bits: int, data: dict) -> dict:
    """dfq-onnx's QONNX and QDQ models at weight_bits (W?A8, other settings default), the QDQ
    model's logits on the test digits, and the QONNX model adapted for Concrete ML."""
    t0 = time.perf_counter()
    qonnx_result = dfq_run(str(MODEL), str(CALIB), QuantConfig(format="qonnx", weight_bits=weight_bits))
    qdq_result = dfq_run(str(MODEL), str(CALIB), QuantConfig(weight_bits=weight_bits))
    qdq_logits = ort_logits(qdq_result.model, data["test"])
    adapted, checks = adapt(qonnx_result.model, qdq_logits[:CHECK_SAMPLES], data["test"][:CHECK_SAMPLES])
    return {"adapted": adapted, "checks": checks, "qdq_logits": qdq_logits,
            "accumulator_bits": accumulator_bits(qonnx_result), "seconds": time.perf_counter() - t0}


# --- the Concrete ML venv -------------------------------------------------------------------------------
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def run_child(python: Path, job: dict, tmp: Path, timeout: float | None = None) -> dict:
    """Run CHILD in the venv on job; its JSON result, or {"error": ...} when it died."""
    script, job_file = tmp / "child.py", tmp / "job.json"
    script.write_text(CHILD)
    job = dict(job, result=str(tmp / "result.json"))
    Path(job["result"]).unlink(missing_ok=True)
    job_file.write_text(json.dumps(job))
    try:
        p = subprocess.run([str(python), str(script), str(job_file)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"TimeoutExpired: no result within {timeout} s"}
    if p.returncode != 0 or not Path(job["result"]).exists():
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return {"error": f"child exited with status {p.returncode}: " + (lines[-1] if lines else "")}
    return json.loads(Path(job["result"]).read_text())


def venv_versions(python: Path, tmp: Path) -> dict | None:
    """Versions of VENV_PACKAGES inside the venv, or None when its python does not run."""
    if not python.exists():
        return None
    out = run_child(python, {"what": "versions", "packages": list(VENV_PACKAGES)}, tmp, timeout=120)
    return None if "error" in out else out


def pip_error_lines(output: str) -> list[str]:
    """pip's ERROR lines verbatim, or its last lines when none is marked."""
    lines = output.rstrip().splitlines()
    return [ln for ln in lines if ln.startswith("ERROR")] or lines[-20:]


def ensure_venv(venv: Path, tmp: Path) -> dict:
    """The venv with Concrete ML: used as is when it has concrete-ml, else created and installed.
    Returns {"python", "versions", "created", "pip_errors"}; python is None when it failed."""
    python = venv_python(venv)
    versions = venv_versions(python, tmp)
    if versions and versions.get("concrete-ml"):
        return {"python": python, "versions": versions, "created": False, "pip_errors": None}
    if not python.exists():
        p = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if p.returncode != 0:
            return {"python": None, "versions": None, "created": False,
                    "pip_errors": ["python3 -m venv failed:"] + pip_error_lines(p.stdout + p.stderr)}
    print(f"installing {CML_REQUIREMENT} into {venv} (several minutes) ...", flush=True)
    p = subprocess.run([str(python), "-m", "pip", "install", CML_REQUIREMENT], capture_output=True, text=True)
    if p.returncode != 0:
        return {"python": None, "versions": None, "created": True, "pip_errors": pip_error_lines(p.stdout + p.stderr)}
    return {"python": python, "versions": venv_versions(python, tmp), "created": True, "pip_errors": None}


# --- one variant -------------------------------------------------------------------------------------------
def compile_and_simulate(python: Path, model: onnx.ModelProto, variant: dict, data_file: Path, tmp: Path) -> dict:
    """The child's compile + simulate result for one variant, with the logits loaded (or None)."""
    model_file, logits_file = tmp / "model.onnx", tmp / "logits.npy"
    onnx.save(model, str(model_file))
    logits_file.unlink(missing_ok=True)
    job = {"what": "compile", "model": str(model_file), "data": str(data_file), "logits": str(logits_file),
           "artifacts": str(tmp / "artifacts"), "n_bits": N_BITS,
           "rounding_threshold_bits": variant["rounding_threshold_bits"]}
    t0 = time.perf_counter()
    out = run_child(python, job, tmp, timeout=CHILD_TIMEOUT)
    out["seconds"] = time.perf_counter() - t0
    out["logits"] = np.load(logits_file) if out.get("compiled") and logits_file.exists() else None
    return out


def variant_entry(variant: dict, converted: dict, child: dict, data: dict, float_logits: np.ndarray) -> dict:
    """The JSON entry of one variant."""
    logits = child.get("logits")
    qdq = converted["qdq_logits"]
    return {
        "name": variant["name"],
        "settings": {"dfq_onnx": {"format": "qonnx", "weight_bits": variant["weight_bits"], "act_bits": 8},
                     "concrete_ml": {"import_qat": True, "n_bits": N_BITS,
                                     "rounding_threshold_bits": variant["rounding_threshold_bits"],
                                     "fhe": "simulate"}},
        "compiled": bool(child.get("compiled")),
        "error": child.get("error"),
        "error_detail": child.get("error_detail"),
        "max_bit_width": child.get("max_bit_width"),
        "traced_max_bit_width": child.get("traced_max_bit_width"),
        "bitwidth_report": child.get("bitwidth_report"),
        "accuracy": top1(logits, data["labels"]) if logits is not None else None,
        "agreement_with_float": top1(logits, float_logits) if logits is not None else None,
        "agreement_with_dfq": top1(logits, qdq) if logits is not None else None,
        "dfq_accuracy": top1(qdq, data["labels"]),
        "dfq_agreement_with_float": top1(qdq, float_logits),
        "seconds": child.get("seconds"),
        "compile_seconds": child.get("compile_seconds"),
        "simulate_seconds": child.get("simulate_seconds"),
        "dfq_max_accumulator_bits": converted["accumulator_bits"]["max"],
        "dfq_accumulator_bits": converted["accumulator_bits"]["per_module"],
        "adaptation_checks": converted["checks"],
        "convert_seconds": converted["seconds"],
    }


def run_variants(python: Path | None, data: dict, float_logits: np.ndarray, tmp: Path):
    """Yield each variant's entry in turn (python None: Concrete ML is missing, nothing compiles)."""
    data_file = tmp / "data.npz"
    np.savez(data_file, calib=data["calib"], test=data["test"])
    converted = {}
    for variant in VARIANTS:
        bits = variant["weight_bits"]
        if bits not in converted:
            converted[bits] = convert(bits, data)
        conv = converted[bits]
        if python is None:
            child = {"error": "Concrete ML is not installed (see install.pip_errors)"}
        elif not all(c["identical"] for c in conv["checks"]["steps"]):
            child = {"error": "an adaptation changed the model's outputs (see adaptation_checks)"}
        else:
            child = compile_and_simulate(python, conv["adapted"], variant, data_file, tmp)
        entry = variant_entry(variant, conv, child, data, float_logits)
        print(f"{entry['name']}: compiled={entry['compiled']} error={entry['error']} "
              f"max_bit_width={entry['max_bit_width']} accuracy={entry['accuracy']} "
              f"seconds={entry['seconds'] and round(entry['seconds'], 1)}", flush=True)
        yield entry


# --- report ----------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "flags": [f for f in ("avx2", "avx512_vnni") if f in flags],
            "python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def describe(e: dict) -> str:
    """One variant in a sentence fragment."""
    if e["compiled"]:
        return (f"{e['name']} compiled (largest circuit integer {e['max_bit_width']} bits) and reached "
                f"{e['accuracy']:.1%} test accuracy ({e['agreement_with_float']:.1%} argmax agreement with the "
                f"float model, {e['agreement_with_dfq']:.1%} with dfq-onnx's own model of "
                f"{e['dfq_accuracy']:.1%}; {e['seconds']:.0f} s to compile and simulate)")
    why = e["error"]
    if e.get("error_detail"):
        why += ": " + ", ".join(d["message"] for d in e["error_detail"])
    if e.get("traced_max_bit_width"):
        why += f"; largest integer traced {e['traced_max_bit_width']} bits"
    return f"{e['name']} did not compile ({why}; dfq-onnx's proven accumulator bound {e['dfq_max_accumulator_bits']} bits)"


def summary(results: dict) -> str:
    """The results in one markdown paragraph."""
    if results["install"]["pip_errors"]:
        return ("Concrete ML could not be installed in its venv, so nothing was compiled; pip said: "
                + " / ".join(results["install"]["pip_errors"]))
    v = results["machine"]["venv"] or {}
    variants = results["variants"]
    worst = max(s["max_abs_diff"] for e in variants for s in e["adaptation_checks"]["steps"])
    kept = ("left the logits bit-identical" if worst == 0 else f"changed the logits by at most {worst:.2g}")
    return (f"Concrete ML {v.get('concrete-ml')} (concrete-python {v.get('concrete-python')}) imports dfq-onnx's "
            f"QONNX export of the shipped MNIST model after {len(ADAPTATIONS)} adaptations "
            f"({', '.join(f'`{f.__name__}`' for f in ADAPTATIONS)}), each of which {kept} on "
            f"{CHECK_SAMPLES} test digits ({variants[0]['adaptation_checks']['method']}). "
            f"The float model scores {results['float_accuracy']:.1%} on {results['test_samples']} test digits. "
            f"With FHE simulation on those digits (never real FHE): "
            + "; ".join(describe(e) for e in variants) + ".")


def write_results(results: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help="virtual environment with Concrete ML (created when missing)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = load_data()
    float_logits = ort_logits(MODEL, data["test"])
    with tempfile.TemporaryDirectory() as tmp:
        install = ensure_venv(args.venv.resolve(), Path(tmp))
        results = {"machine": dict(machine_info(), venv=install["versions"]),
                   "install": {"requirement": CML_REQUIREMENT, "created": install["created"],
                               "pip_errors": install["pip_errors"]},
                   "model": str(MODEL.relative_to(ROOT)), "test_samples": len(data["test"]),
                   "calibration_samples": len(data["calib"]),
                   "float_accuracy": top1(float_logits, data["labels"]), "variants": [], "complete": False}
        for entry in run_variants(install["python"], data, float_logits, Path(tmp)):
            results["variants"].append(entry)
            write_results(results)  # partial results survive an interrupted run
    results["complete"] = True
    results["seconds"] = time.perf_counter() - t0
    results["markdown"] = summary(results)
    write_results(results)
    print(results["markdown"])
    print(f"wrote {OUT} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
