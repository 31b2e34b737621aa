"""The fast exponent search (passes/search_exponents.local_search). Oracles: onnx.reference (a
second runtime) running the fused float model's modules on values rounded by plain numpy, and
onnxruntime's QDQ arithmetic for the model output."""
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from dfq_onnx import QuantConfig
from dfq_onnx.calibration_data import DataSource, input_specs
from dfq_onnx.fixedpoint import quantize
from dfq_onnx.model_io import load_light, to_graph, to_model
from dfq_onnx.passes.calibrate import calibrate
from dfq_onnx.passes.canonicalize import canonicalize
from dfq_onnx.passes.choose_exponents import choose_exponents
from dfq_onnx.passes.fold_batchnorm import fold_batchnorm
from dfq_onnx.passes.form_modules import find_modules, plan_quantization
from dfq_onnx.passes.search_exponents import THIN, reader_errors
from dfq_onnx.pipeline import run
from helpers import CALIB, SHIPPED, run_ort


@pytest.fixture(scope="module")
def fused():
    original, weights = load_light(str(SHIPPED))
    graph = fold_batchnorm(canonicalize(to_graph(original, weights)))
    plan = plan_quantization(graph, find_modules(graph), residual_requant=True)
    data = DataSource(str(CALIB), input_specs(original), num_samples=16)
    stats = calibrate(graph, plan.requant, data, 8)
    exps = choose_exponents(graph, plan, stats, weight_bits=8, act_bits=8, per_channel=True, method="mse")
    return graph, original, plan, exps


def test_reader_errors_are_the_readers_output_errors_in_a_second_runtime(fused):
    """Every measured group, at f - 1, f and f + 1: the squared difference of its reading modules'
    outputs (float nodes, onnx.reference) between the tensor rounded in numpy and the float one,
    summed over every position, or where the module's Conv runs again (the group is not made
    inside the module), over every THIN-th row and column."""
    graph, original, plan, exps = fused
    x = np.load(CALIB)["input"][:8]
    cost, ref = reader_errors(graph, plan, exps, [{"input": x}])
    model = to_model(graph, original)
    # every tensor of the fused model as an output, from both runtimes' point of view
    names = [t for n in model.graph.node for t in n.output]
    probe = onnx.load_from_string(model.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    values = dict(zip(names, run_ort(probe, {"input": x}, optimize=False)))
    values["input"] = x
    np.testing.assert_allclose(ref, values[model.graph.output[0].name], rtol=1e-5, atol=1e-5)
    assert "input" in cost and len(cost) >= 5
    checked = thinned = 0
    for grp, by_d in cost.items():
        if grp != plan.group(grp):
            continue
        made_inside = {o for m in plan.modules for n in model.graph.node if n.name in m.nodes for o in n.output}
        readers = [m for m in plan.modules if grp in _module_inputs(m, model)
                   or (grp in made_inside and grp in {i for n in model.graph.node if n.name in m.nodes for i in n.input})]
        for d in (-1, 0, 1):
            f = exps.act[grp]
            xq = (quantize(values[grp], f + d, 8, grp in plan.unsigned) * 2.0 ** -(f + d)).astype(np.float32)
            want = 0.0
            for m in readers:
                ins = list(dict.fromkeys([grp] + _module_inputs(m, model)))
                sub = onnx.utils.Extractor(probe).extract_model(ins, [m.output])
                feeds = {i.name: (xq if i.name == grp else values[i.name]) for i in sub.graph.input}
                y = ReferenceEvaluator(sub).run(None, feeds)[0].astype(np.float64)
                e = y - values[m.output]
                conv = next(n for n in model.graph.node if n.name == m.name).op_type == "Conv"
                rerun = grp not in {o for n in model.graph.node if n.name in m.nodes for o in n.output}
                if conv and rerun and e.ndim == 4:
                    e = e[:, :, ::THIN, ::THIN]
                    thinned += 1
                want += float(np.sum(e ** 2))
            assert by_d[d] == pytest.approx(want, rel=2e-3, abs=1e-6), (grp, d)
            checked += 1
    assert checked >= 15 and thinned >= 3


def test_calibration_keeps_the_float_output_the_search_compares_with(fused):
    """The reference outputs calibration keeps for the search are the float model's first output
    on exactly the kept batches (onnxruntime on the original file, unfused), one per kept batch,
    and only for those; a keep count inside a batch included."""
    graph, original, plan, exps = fused
    data = DataSource(str(CALIB), input_specs(original), num_samples=21)
    kept, reference = [], []
    calibrate(graph, plan.requant, data, 5, keep=kept, keep_samples=12, reference=reference)
    assert [len(b["input"]) for b in kept] == [5, 5, 5] and len(reference) == len(kept)
    float_model = onnx.load(str(SHIPPED))
    for b, r in zip(kept, reference):
        want = run_ort(float_model, {"input": b["input"]})[0]
        np.testing.assert_allclose(r, want, rtol=1e-4, atol=1e-4)


def _module_inputs(m, model) -> list[str]:
    """The tensors a module's nodes read from outside the module (not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.name in m.nodes]
    made = {o for n in nodes for o in n.output}
    return list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in made and i not in inits))


def test_fast_search_never_lowers_held_out_accuracy_much_and_keeps_its_promise(test_data):
    """Where it moves fractions, the model's output SQNR on its confirming samples rose by more than
    0.1 dB; on the shipped model it must leave the held-out test digits (against the float model)
    within 0.3 dB of the fast effort's model."""
    x = test_data[0]
    ref = run_ort(SHIPPED, {"input": x})[0].astype(np.float64)

    def sqnr(model):
        y = run_ort(model, {"input": x}, optimize=False)[0].astype(np.float64)
        return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))

    default = run(SHIPPED, CALIB, QuantConfig())
    fast = run(SHIPPED, CALIB, QuantConfig(effort="fast"))
    f = default.facts
    assert f["local_search_groups"] >= 5 and "local_search_groups" not in fast.facts
    if f["exponents_moved"]:
        a, b = f["search_sqnr_db"]
        assert b > a + 0.1
    assert sqnr(default.model) > sqnr(fast.model) - 0.3


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2),
       size=st.integers(5, 21), group=st.sampled_from([1, 4]), residual=st.sampled_from(["", "x", "r"]),
       opset=st.sampled_from([13, 21]), seed=st.integers(0, 99))
def test_thinned_reader_errors_are_every_other_output_of_a_second_runtime(k, stride, dil, pad, size, group, residual,
                                                                          opset, seed):
    """A Conv reader of any stride, dilation, padding and grouping (with or without a residual Add
    after it, of the model input or of the rounded tensor itself), at opset 13 and 21: the measured
    error is the squared error of its float output (onnx.reference) summed over every THIN-th row
    and column."""
    rng = np.random.default_rng(seed)
    c = 4
    h = onnx.helper
    w1 = rng.normal(size=(c, 1, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(c, c // group, k, k)).astype(np.float32)
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1] * 4, group=c, name="c1"),
             h.make_node("Relu", ["a"], ["r"], name="r1"),
             h.make_node("Conv", ["r", "w2", "b2"], ["y2"], strides=[stride] * 2, pads=[pad] * 4, dilations=[dil] * 2,
                         group=group, name="c2")]
    last = "y2"
    residual = residual if out == size else ""
    if residual:
        nodes.append(h.make_node("Add", ["y2", residual], ["s"], name="add"))
        last = "s"
    nodes.append(h.make_node("Relu", [last], ["y"], name="r2"))
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in
             (("w1", w1), ("b1", rng.normal(size=c).astype(np.float32)), ("w2", w2),
              ("b2", rng.normal(size=c).astype(np.float32)))]
    model = h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, c, size, size])],
                                      [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits),
                         opset_imports=[h.make_opsetid("", opset)])
    graph = to_graph(model, {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer})
    graph = fold_batchnorm(canonicalize(graph))
    plan = plan_quantization(graph, find_modules(graph), residual_requant=True)
    x = rng.normal(size=(2, c, size, size)).astype(np.float32)
    stats = calibrate(graph, plan.requant, DataSource({"x": x}, input_specs(model)), 2)
    exps = choose_exponents(graph, plan, stats, weight_bits=8, act_bits=8, per_channel=True, method="mse")
    cost, _ = reader_errors(graph, plan, exps, [{"x": x}])
    fused = to_model(graph, model)
    grp = next(n.input[0] for n in fused.graph.node if n.name == "c2")
    assert grp in cost
    mod = next(m for m in plan.modules if m.name == "c2")
    every = onnx.utils.Extractor(fused).extract_model(["x"], [grp, mod.output])
    rv, y_float = ReferenceEvaluator(every).run(None, {"x": x})
    sub = onnx.utils.Extractor(fused).extract_model([grp, "x"] if residual == "x" else [grp], [mod.output])
    for d in (-1, 0, 1):
        f = exps.act[plan.group(grp)] + d
        xq = (quantize(rv, f, 8, grp in plan.unsigned) * 2.0 ** -f).astype(np.float32)
        feeds = {i.name: (xq if i.name == grp else x) for i in sub.graph.input}
        e = ReferenceEvaluator(sub).run(None, feeds)[0].astype(np.float64) - y_float
        e = e[:, :, ::THIN, ::THIN]
        assert cost[plan.group(grp)][d] == pytest.approx(float(np.sum(e ** 2)), rel=2e-3, abs=1e-5), d

