"""inspect counts against counts made by hand on small graphs."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import dfq_onnx

rng = np.random.default_rng(0)


def f32(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def conv_relu_conv(path):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    inits = [f32("w1", rng.normal(size=(8, 3, 3, 3))), f32("b1", rng.normal(size=8)),
             f32("w2", rng.normal(size=(4, 8, 3, 3))), f32("b2", rng.normal(size=4))]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(path))
    return m


def test_float_model_counts(tmp_path):
    conv_relu_conv(tmp_path / "f.onnx")
    info = dfq_onnx.inspect(tmp_path / "f.onnx")
    assert info["op_types"] == {"Conv": 2, "Relu": 1, "MaxPool": 1}
    assert info["nodes"] == 4 and info["opset"] == 13
    assert info["requant_points"] == 0 and info["weight_quantizers"] == 0
    assert info["modules"] is None
    assert info["scales"] == {"total": 0, "power_of_two": 0}
    assert info["per_layer_requant_points"] == 1 + 3  # input, conv1, relu1, conv2


def test_hand_built_qdq_graph_counts():
    """x -Q-DQ- Conv(DQ w, DQ b) -Q-DQ- MaxPool -Q-DQ- ; a constant Q (float weight) too."""
    s_x, s_y, s_bad = f32("s_x", 0.5), f32("s_y", 0.25), f32("s_bad", 0.3)
    z = numpy_helper.from_array(np.zeros((), np.int8), "z")
    wq = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "wq")
    ws = f32("ws", [0.125, 0.0625])
    wz = numpy_helper.from_array(np.zeros(2, np.int8), "wz")
    wf = f32("wf", np.ones((2, 2, 1, 1)))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s_x", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "s_y", "z"], ["cq"]),       # requant 2
        helper.make_node("DequantizeLinear", ["cq", "s_y", "z"], ["cd"]),
        helper.make_node("MaxPool", ["cd"], ["p"], kernel_shape=[1, 1]),
        helper.make_node("QuantizeLinear", ["p", "s_y", "z"], ["pq"]),       # lossless
        helper.make_node("DequantizeLinear", ["pq", "s_y", "z"], ["pd"]),
        helper.make_node("QuantizeLinear", ["wf", "s_bad", "z"], ["wfq"]),   # weight quantizer
        helper.make_node("DequantizeLinear", ["wfq", "s_bad", "z"], ["wfd"]),
        helper.make_node("Conv", ["pd", "wfd"], ["c2"]),
        helper.make_node("QuantizeLinear", ["c2", "s_bad", "z"], ["y"]),     # requant 3
    ]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, [1, 2, 4, 4])],
                          [s_x, s_y, s_bad, z, wq, ws, wz, wf])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    info = dfq_onnx.inspect(m)
    assert info["requant_points"] == 3
    assert info["requant_lossless"] == 1
    assert info["weight_quantizers"] == 2
    # scales: s_x, s_y, ws (2 elements), s_bad -> 5 values; 0.3 is not a power of two
    assert info["scales"] == {"total": 5, "power_of_two": 4}


def test_onnxruntime_quantize_static_model(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    conv_relu_conv(tmp_path / "f.onnx")

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), R(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    info = dfq_onnx.inspect(tmp_path / "q.onnx")
    # by hand: onnxruntime quantizes the input, conv1's output (Relu removed) and conv2's output;
    # the MaxPool output gets a lossless Q at the same scale; 2 weights + 2 biases are constants
    assert info["requant_points"] == 3
    assert info["requant_lossless"] == 1
    assert info["weight_quantizers"] == 4
    assert info["modules"] is None
    assert info["scales"]["total"] > info["scales"]["power_of_two"]
