"""Data-free mode (--calib none): ranges from BatchNorm statistics, accuracy on real digits."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dfq_onnx import QuantConfig
from dfq_onnx.cli import main
from dfq_onnx.errors import DfqError
from dfq_onnx.model_io import to_graph
from dfq_onnx.passes.canonicalize import canonicalize
from dfq_onnx.passes.data_free import batchnorm_moments, data_free_stats
from dfq_onnx.passes.fold_batchnorm import fold_batchnorm
from dfq_onnx.passes.form_modules import find_modules, plan_quantization
from dfq_onnx.calibration_data import input_specs
from dfq_onnx.pipeline import run

from helpers import SHIPPED, run_ort


@pytest.mark.parametrize("fmt", ["qdq", "int"])
def test_data_free_accuracy_within_two_points_of_float(fmt, test_data):
    x, y = test_data
    r = run(SHIPPED, "none", QuantConfig(format=fmt))
    acc_f = 100 * np.mean(run_ort(SHIPPED, {"input": x})[0].argmax(1) == y)
    acc_q = 100 * np.mean(run_ort(r.model, {"input": x})[0].argmax(1) == y)
    assert acc_q >= acc_f - 2.0, (acc_q, acc_f)
    assert r.facts["bias_corrected"] == 0 and r.samples == 0
    assert r.facts["random"] == 1  # only the graph input has no BatchNorm behind it


def _conv_bn_relu(gamma, beta, shape=(1, 3, 8, 8)):
    c = len(gamma)
    w = np.random.default_rng(0).standard_normal((c, shape[1], 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.asarray(gamma, np.float32), "g"),
             numpy_helper.from_array(np.asarray(beta, np.float32), "b"),
             numpy_helper.from_array(np.zeros(c, np.float32), "m"), numpy_helper.from_array(np.ones(c, np.float32), "v"),
             numpy_helper.from_array(np.ones((c, c, 1, 1), np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *shape[1:]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c, None, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_relu_range_follows_gamma_and_beta():
    """Channel c of the BN output is taken as N(beta_c, gamma_c^2): after Relu its largest draw
    lies a few gammas above beta, and a channel with beta far below zero is all zero."""
    model = _conv_bn_relu(gamma=[0.5, 2.0, 1.0], beta=[1.0, 3.0, -50.0])
    g = canonicalize(to_graph(model))
    moments = batchnorm_moments(g)
    np.testing.assert_allclose(moments["bn"][0], [1.0, 3.0, -50.0])
    np.testing.assert_allclose(moments["bn"][1], [0.25, 4.0, 1.0])
    g = fold_batchnorm(g)
    plan = plan_quantization(g, find_modules(g))
    stats, facts = data_free_stats(g, plan, moments, input_specs(model), 8)
    relu = stats["r"]
    assert relu.min == 0.0
    assert 3.0 + 3 * 2.0 < relu.max < 3.0 + 5.5 * 2.0  # set by the widest channel
    assert facts == {"bn_derived": 1, "random": 1}


def test_data_free_needs_static_float_inputs():
    model = _conv_bn_relu([1.0, 1.0], [0.0, 0.0])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    with pytest.raises(DfqError, match="static input shapes"):
        run(model, "none")


def test_cli_data_free_warns(tmp_path):
    res = CliRunner().invoke(main, ["convert", str(SHIPPED), str(tmp_path / "q.onnx"), "--calib", "none"])
    assert res.exit_code == 0, res.stderr
    assert "warning: data-free mode" in res.stderr
    assert "from BatchNorm statistics" in res.stdout
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")))

