"""Each pass on hand-built graphs and on the shipped model."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx.model_io import load_model, to_graph, to_model
from dfq_onnx.passes.canonicalize import canonicalize
from dfq_onnx.passes.fold_batchnorm import fold_batchnorm
from dfq_onnx.passes.form_modules import find_modules, plan_quantization
from dfq_onnx.pipeline import fuse

from helpers import CALIB, SHIPPED, run_ort

rng = np.random.default_rng(0)


def init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def bn_inits(prefix, c):
    return [init(f"{prefix}_g", rng.uniform(0.5, 2, c)), init(f"{prefix}_b", rng.normal(0, 1, c)),
            init(f"{prefix}_m", rng.normal(0, 1, c)), init(f"{prefix}_v", rng.uniform(0.5, 2, c))]


def bn(prefix, x, y):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, epsilon=1e-3)


def make(nodes, inits, inp_shape, out_name="y", opset=13):
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [None] * len(inp_shape))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp_shape)],
                          [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def fold(model):
    m = load_model(model)
    return to_model(fold_batchnorm(canonicalize(to_graph(m))), m)


def assert_same(a, b, x):
    ya, yb = run_ort(a, {"x": x})[0], run_ort(b, {"x": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4 * np.abs(ya).max())


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_canonicalize_drops_identity_dropout_constant():
    w = rng.normal(size=(4, 3, 3, 3))
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w.astype(np.float32))),
             helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("Conv", ["xi", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Dropout", ["c"], ["d"]),
             helper.make_node("Identity", ["d"], ["y"])]
    m = make(nodes, [], [1, 3, 8, 8])
    out = to_model(canonicalize(to_graph(load_model(m))), m)
    assert ops(out) == ["Conv"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same(m, out, rng.normal(size=(1, 3, 8, 8)).astype(np.float32))


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
def test_fold_batchnorm_each_linear_op(layer):
    c = 6
    if layer == "Conv":
        shape, w = [2, 3, 8, 8], rng.normal(size=(c, 3, 3, 3))
        lin = helper.make_node("Conv", ["x", "w", "b"], ["l"], pads=[1, 1, 1, 1])
        inits = [init("w", w), init("b", rng.normal(size=c))]
    elif layer == "ConvTranspose":
        shape, w = [2, 3, 5, 5], rng.normal(size=(3, c, 3, 3))
        lin = helper.make_node("ConvTranspose", ["x", "w"], ["l"], strides=[2, 2])
        inits = [init("w", w)]
    elif layer == "Gemm":
        shape, w = [4, 5], rng.normal(size=(c, 5))
        lin = helper.make_node("Gemm", ["x", "w", "b"], ["l"], transB=1, alpha=0.5, beta=2.0)
        inits = [init("w", w), init("b", rng.normal(size=c))]
    else:
        shape, w = [4, 5], rng.normal(size=(5, c))
        lin = helper.make_node("MatMul", ["x", "w"], ["mm"])
        inits = [init("w", w), init("b", rng.normal(size=c))]
    nodes = [lin]
    if layer == "MatMul":
        nodes.append(helper.make_node("Add", ["mm", "b"], ["l"]))
    nodes += [bn("bn", "l", "n"), helper.make_node("Mul", ["n", "s"], ["y"])]
    scale_shape = (c, 1, 1) if layer.startswith("Conv") else (c,)
    inits += bn_inits("bn", c) + [init("s", rng.uniform(0.5, 1.5, scale_shape))]
    m = make(nodes, inits, shape)
    out = fold(m)
    assert "BatchNormalization" not in ops(out) and "Mul" not in ops(out)
    assert_same(m, out, rng.normal(size=shape).astype(np.float32))


def test_shared_weight_is_not_folded_twice():
    w = rng.normal(size=(4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]), bn("bn1", "a", "an"),
             helper.make_node("Conv", ["x", "w"], ["b"], pads=[1, 1, 1, 1]), bn("bn2", "b", "bn"),
             helper.make_node("Add", ["an", "bn"], ["y"])]
    m = make(nodes, [init("w", w)] + bn_inits("bn1", 4) + bn_inits("bn2", 4), [1, 3, 8, 8])
    out = fold(m)
    assert "BatchNormalization" not in ops(out)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]
    assert_same(m, out, rng.normal(size=(1, 3, 8, 8)).astype(np.float32))


def test_bn_after_a_non_linear_op_is_kept():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn("bn", "r", "y")]
    m = make(nodes, bn_inits("bn", 3), [1, 3, 4, 4])
    out = fold(m)
    assert "BatchNormalization" in ops(out)
    assert_same(m, out, rng.normal(size=(1, 3, 4, 4)).astype(np.float32))


def test_fused_shipped_model_equals_original(test_data):
    x, _ = test_data
    fused = fuse(SHIPPED)
    assert "BatchNormalization" not in ops(fused)
    a = run_ort(SHIPPED, {"input": x})[0]
    b = run_ort(fused, {"input": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    # the batch dimension stays dynamic
    assert fused.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_shipped_model_modules_and_plan():
    g = fold_batchnorm(canonicalize(to_graph(load_model(SHIPPED))))
    mods = find_modules(g)
    linear = [m for m in mods if m.kind == "linear"]
    assert [m.op for m in linear] == ["Conv"] * 6 + ["Gemm"]
    assert sum(m.residual is not None for m in linear) == 2
    assert [m.activation for m in linear] == ["Relu", "Relu", "Relu", "Relu6", "Relu", "Relu", None]
    assert [m.op for m in mods if m.kind == "pool"] == ["GlobalAveragePool"]
    plan = plan_quantization(g, mods)
    assert plan.requant_kind == {**{"input": "input"}, **{m.output: "module" for m in mods if m.output != "logits"}}
    assert plan.float_outputs == {"logits"}  # the graph output leaves at accumulator precision
    assert not plan.float_nodes
    # MaxPool and Flatten keep their input's fraction
    kept = {g.tensors()[t].inputs[0].op for t in plan.passthrough}
    assert kept == {"MaxPool", "Flatten"}


def test_residual_add_is_claimed_by_the_later_branch():
    w1, w2 = rng.normal(size=(4, 3, 1, 1)), rng.normal(size=(4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    m = make(nodes, [init("w1", w1), init("w2", w2)], [1, 3, 8, 8])
    g = canonicalize(to_graph(load_model(m)))
    mods = find_modules(g)
    assert mods[0].residual is None and mods[0].output == "a"
    assert mods[1].residual is not None and mods[1].residual_input == "a" and mods[1].output == "y"


def test_calibration_statistics_are_exact_and_mergeable(monkeypatch, calib_data):
    """min/max see every value; the histogram sees the same strided per-sample subset whatever
    the batching, so statistics of shards (batches of 5) merge into those of the whole (32)."""

    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.fixedpoint import abs_histogram
    from dfq_onnx.passes import calibrate as cal

    monkeypatch.setattr(cal, "HIST_SAMPLES_PER_ITEM", 1000)  # force subsampling on MNIST's small tensors
    model = load_model(SHIPPED)
    g = fold_batchnorm(canonicalize(to_graph(model)))
    plan = plan_quantization(g, find_modules(g))
    x = calib_data[:64]
    data = DataSource({"input": x}, input_specs(model))
    whole = cal.calibrate(g, plan.requant, data, batch_size=32)
    shards = cal.calibrate(g, plan.requant, data, batch_size=5)

    probe = g.copy()
    probe.outputs = [probe.tensors()[t] for t in plan.requant]
    for t in probe.outputs:
        t.dtype = np.float32
    values = run_ort(to_model(probe), {"input": x})
    stepped = 0
    for name, v in zip(plan.requant, values):
        a, b = whole[name], shards[name]
        assert (a.count, a.min, a.max) == (b.count, b.min, b.max) == (v.size, float(v.min()), float(v.max()))
        np.testing.assert_array_equal(a.hist, b.hist)
        flat = v.reshape(len(v), -1)
        step = (flat.shape[1] // 1000) | 1
        stepped += step > 1
        np.testing.assert_array_equal(a.hist, abs_histogram(flat[:, ::step]))
    assert stepped >= 3


def test_range_alignment_keeps_the_function_and_lands_on_a_power_of_two(test_data, calib_data):
    """The aligned graph computes the same function (float, no quantization); each aligned
    tensor's best clipping threshold then sits on a power-of-two code range (to the search step)."""
    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.fixedpoint import clip_threshold, qrange
    from dfq_onnx.passes.align_ranges import align_ranges
    from dfq_onnx.passes.calibrate import calibrate

    model = load_model(SHIPPED)
    g = fold_batchnorm(canonicalize(to_graph(model)))
    plan = plan_quantization(g, find_modules(g))
    data = DataSource({"input": calib_data}, input_specs(model))
    stats = calibrate(g, plan.requant, data)
    aligned, new_stats, facts = align_ranges(g, plan, stats, act_bits=8, method="mse")
    assert facts["aligned"] >= 2
    x, _ = test_data
    a = run_ort(to_model(g, model), {"input": x})[0]
    b = run_ort(to_model(aligned, model), {"input": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    # statistics re-measured on the aligned graph: thresholds now sit on 2^k * qmax
    measured = calibrate(aligned, plan.requant, data)
    moved = [t for t in plan.requant if new_stats[t].max != stats[t].max]
    assert len(moved) == facts["aligned"]
    for t in moved:
        s = measured[t]
        assert s.max == pytest.approx(new_stats[t].max, rel=1e-5)
        hi = qrange(8, t in plan.unsigned)[1]
        top = clip_threshold(s.hist, s.max_abs, 8, t in plan.unsigned)
        k = np.log2(top / hi)
        assert abs(k - round(k)) <= 1 / 16 + 1e-6, (t, top)  # within one step of the threshold search


def test_zero_spatial_pad_folds_into_the_conv_and_other_pads_stay():
    w = init("w", rng.normal(size=(4, 3, 3, 3)))
    spatial = numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 2, 1], dtype=np.int64), "pads")
    channel = numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 0, 0, 0], dtype=np.int64), "cpads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 0, 0, 1], strides=[2, 2])]
    m = make(nodes, [w, spatial], [2, 3, 9, 10])
    x = rng.normal(size=(2, 3, 9, 10)).astype(np.float32)
    f = fold(m)
    assert ops(f) == ["Conv"]
    assert_same(m, f, x)
    # padding channels is not a Conv padding: kept
    w4 = init("w", rng.normal(size=(4, 4, 3, 3)))
    m2 = make([helper.make_node("Pad", ["x", "cpads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"])],
              [w4, channel], [2, 3, 9, 10])
    f2 = fold(m2)
    assert ops(f2) == ["Pad", "Conv"]
    assert_same(m2, f2, x)


def test_equalization_keeps_the_function_and_equalizes_ranges(test_data):
    """Cross-layer equalization on the shipped model: the two Conv -> Relu -> Conv pairs whose
    middle tensor only the second conv reads; the float outputs do not move, and each pair's
    per-channel ranges become equal (max|W1[i]| = max|W2[:, i]|)."""
    from dfq_onnx.passes.align_ranges import find_pairs
    from dfq_onnx.passes.equalize import equalize

    x, _ = test_data
    original = load_model(SHIPPED)
    g = fold_batchnorm(canonicalize(to_graph(original)))
    eq, facts, scales = equalize(g)
    assert facts == {"equalized": 2, "equalize_skipped": 0} and len(scales) == 2
    a = run_ort(to_model(g, original), {"input": x[:200]})[0]
    b = run_ort(to_model(eq, original), {"input": x[:200]})[0]
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 1e-5
    for n1, _, n2 in find_pairs(eq):
        if n1.outputs[0].name not in scales:
            continue
        w1, w2 = np.asarray(n1.inputs[1].values), np.asarray(n2.inputs[1].values)
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
        r2 = np.abs(w2).max(axis=(0, 2, 3))
        np.testing.assert_allclose(r1, r2, rtol=1e-5)
        assert not np.allclose(scales[n1.outputs[0].name], 1.0)


def test_bias_correction_is_the_mean_error_of_each_module_in_a_second_runtime(calib_data):
    """Per corrected Conv/Gemm and output channel, the bias moves by mean(W x + b) - mean(y_q) over
    the samples (ragged batches: 5, 3 and 1), where x is the float tensor its input QuantizeLinear
    rounds and y_q its output in the simulated graph: both read off onnx.reference running the
    simulated QDQ graph, the float layer applied by numpy."""
    from onnx.reference import ReferenceEvaluator

    from dfq_onnx.calibration_data import DataSource, input_specs
    from dfq_onnx.model_io import load_light
    from dfq_onnx.passes.bias_correction import correct_biases
    from dfq_onnx.passes.calibrate import calibrate
    from dfq_onnx.passes.choose_exponents import choose_exponents
    from dfq_onnx.passes.emit_qdq import emit_qdq
    from dfq_onnx.quantized import build

    original, weights = load_light(str(SHIPPED), 21)  # onnx.reference has DequantizeLinear from opset 19
    graph = fold_batchnorm(canonicalize(to_graph(original, weights)))
    plan = plan_quantization(graph, find_modules(graph), residual_requant=True)
    stats = calibrate(graph, plan.requant, DataSource(str(CALIB), input_specs(original), num_samples=16), 8)
    exps = choose_exponents(graph, plan, stats, weight_bits=8, act_bits=8, per_channel=True, method="mse")
    simulated = emit_qdq(graph, build(graph, plan, exps, per_channel=True))[0]
    batches = [{"input": calib_data[a:b]} for a, b in ((0, 5), (5, 8), (8, 9))]
    corrected, facts = correct_biases(graph, plan, simulated, batches)
    sim = to_model(simulated, original)
    made = {o: n for n in sim.graph.node for o in n.output}
    names = [t for n in sim.graph.node for t in n.output]
    del sim.graph.output[:]
    sim.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names)
    x = np.concatenate([b["input"] for b in batches])
    values = dict(zip(names, ReferenceEvaluator(sim).run(None, {"input": x})), input=x)
    before = {n.name: n for n in graph.nodes}
    checked = 0
    for node in corrected.nodes:
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
            continue
        moved = np.asarray(node.inputs[2].values, np.float64) - np.asarray(before[node.name].inputs[2].values, np.float64)
        qnode = next(n for n in sim.graph.node if n.name == node.name)
        dq = made[qnode.input[0]]
        q = made[dq.input[0]]
        if q.op_type == "Clip":
            q = made[q.input[0]]
        pre = values[q.input[0]].astype(np.float64)
        act = [n for n in graph.nodes if n.op in ("Relu", "Clip") and n.inputs[0].name == q.input[0]]
        if act:  # the rounding reads the module before its activation (an unsigned code clamps at 0)
            bounds = [float(np.asarray(i.values)) for i in act[0].inputs[1:] if i is not None and i.name]
            pre = np.clip(pre, *(bounds + [None] * (2 - len(bounds)))) if act[0].op == "Clip" else np.maximum(pre, 0)
        w = np.asarray(before[node.name].inputs[1].values, np.float64)
        b = np.asarray(before[node.name].inputs[2].values, np.float64)
        if node.op == "Conv":
            attrs = {k: v for k, v in node.attrs.items()}
            one = helper.make_model(helper.make_graph(
                [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "g",
                [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
                [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], [numpy_helper.from_array(w, "w")]),
                opset_imports=[helper.make_opsetid("", 13)])
            fl = ReferenceEvaluator(one).run(None, {"x": pre})[0] + b.reshape(1, -1, 1, 1)
            axes = (0, 2, 3)
        else:
            fl = pre @ (w.T if int(node.attrs.get("transB", 0)) else w) + b
            axes = (0,)
        want = fl.mean(axis=axes) - values[qnode.output[0]].astype(np.float64).mean(axis=axes)
        np.testing.assert_allclose(moved, want, rtol=1e-3, atol=1e-5)
        checked += 1
    assert checked == facts["bias_corrected"] >= 5

