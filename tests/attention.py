"""A small attention block built with onnx.helper: LayerNorm (spelled out as ReduceMean/Sub/Pow/Sqrt/Div,
or one LayerNormalization) -> MatMul Q/K/V -> scaled scores -> Softmax -> MatMul -> output projection
-> residual Add."""
import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper
def attention_block(T=16, D=32, seed=0, spelled=True, qkv_gather=False):
    """qkv_gather: Q, K and V from one MatMul, split as torch.onnx exports nn.MultiheadAttention
    (Reshape to [n, T, 3, D], Transpose to [3, n, T, D], Gather 0 / 1 / 2)."""
    rng = np.random.default_rng(seed)
    c = lambda n, v: numpy_helper.from_array(np.asarray(v, np.float32), n)
    n = helper.make_node
    nodes, inits = [], []
    if spelled:  # LayerNorm as torch < 17 / TF export it
        nodes += [n("ReduceMean", ["x", "ax"], ["mu"]), n("Sub", ["x", "mu"], ["d"]), n("Pow", ["d", "two"], ["d2"]),
                  n("ReduceMean", ["d2", "ax"], ["var"]), n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]),
                  n("Div", ["d", "sd"], ["nrm"]), n("Mul", ["nrm", "gamma"], ["ng"]), n("Add", ["ng", "beta"], ["h"])]
        inits += [numpy_helper.from_array(np.array([-1], np.int64), "ax"), c("two", 2.0), c("eps", 1e-5)]
    else:
        nodes += [n("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5)]
    inits += [c("gamma", 1 + 0.1 * rng.normal(size=D)), c("beta", 0.1 * rng.normal(size=D))]
    if qkv_gather:
        inits += [c("Wqkv", rng.normal(size=(D, 3 * D)) / np.sqrt(D)), c("bqkv", 0.05 * rng.normal(size=3 * D)),
                  numpy_helper.from_array(np.array([0, 0, 3, D], np.int64), "qkv_shape")]
        nodes += [n("MatMul", ["h", "Wqkv"], ["qkv0"]), n("Add", ["qkv0", "bqkv"], ["qkv1"]),
                  n("Reshape", ["qkv1", "qkv_shape"], ["qkv2"]), n("Transpose", ["qkv2"], ["qkv"], perm=[2, 0, 1, 3])]
        for i, k in enumerate("qkv"):
            inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{k}"))
            nodes.append(n("Gather", ["qkv", f"i{k}"], [k], axis=0))
    else:
        for k in "qkv":
            inits += [c(f"W{k}", rng.normal(size=(D, D)) / np.sqrt(D)), c(f"b{k}", 0.05 * rng.normal(size=D))]
            nodes += [n("MatMul", ["h", f"W{k}"], [f"{k}0"]), n("Add", [f"{k}0", f"b{k}"], [k])]
    nodes += [n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s0"]),
              n("Mul", ["s0", "scale"], ["s"]), n("Softmax", ["s"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["a"]),
              n("MatMul", ["a", "Wo"], ["o0"]), n("Add", ["o0", "bo"], ["o"]), n("Add", ["x", "o"], ["y"])]
    inits += [c("scale", 1 / np.sqrt(D)), c("Wo", rng.normal(size=(D, D)) / np.sqrt(D)), c("bo", 0.05 * rng.normal(size=D))]
    g = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", T, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", T, D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m, full_check=True)
    return m
