"""Rules that recognise activations exporters write out as elementwise arithmetic.

Each rule is pattern -> replacement on the graphsurgeon graph, applied where every intermediate
tensor is read only by the next op of the pattern (so nothing else sees a value that disappears)
and every constant is a scalar:

  hard_sigmoid:  Clip(Add(x, b), 0, c) then Mul(k) or Div(1/k), with c k = 1
                 -> HardSigmoid(x; alpha=k, beta=b k)             (x*Clip(x+3,0,6)/6's gate)
  hard_sigmoid:  Clip(Add(Mul(x, a), b), 0, 1)
                 -> HardSigmoid(x; alpha=a, beta=b)               (Paddle's slope 0.2, offset 0.5)
  late_scale:    Mul(x, Clip(Add(x, b), 0, c)) then Mul(k) or Div(1/k), with c k = 1
                 -> Mul(x, HardSigmoid(x; k, b k))                 (x*Clip(x+3,0,6) then /6)
  hard_swish:    Mul(x, HardSigmoid(x; 1/6, 1/2)) -> HardSwish(x)  (opset 14 and later; named as the Mul)
  layer_norm:    d = Sub(x, ReduceMean(x)); Div(d, Sqrt(Add(ReduceMean(Pow(d, 2) or Mul(d, d)), eps)))
                 [then Mul(gamma)] [then Add(beta)], the means over the last axis
                 -> LayerNormalization(x, gamma, beta; axis=-1, epsilon=eps)  (opset 17 and later;
                 model_io upgrades a model below it whose ops spell one); the square root may be
                 Pow(v, 0.5), and the division a Mul by its Reciprocal
  softmax:       e = Exp(x) or Exp(Sub(x, ReduceMax(x))); Div(e, ReduceSum(e)), over the last axis
                 -> Softmax(x; axis=-1)                                          (any opset)

A normalization spelled another way (RMSNorm, L2 normalization, a LayerNorm whose two
subtractions are separate nodes, ...) stays float as one unit: form_modules.normalization_nodes.

Other activations written out (SiLU as x*Sigmoid(x), GELU through Erf or Tanh, Mish through
Softplus and Tanh) need no rule: any chain of elementwise ops on one tensor is one lookup table
(passes/form_modules.py), however it is spelled.

Each replacement computes the same function up to float rounding (HardSigmoid(x) = max(0,
min(1, alpha x + beta)), HardSwish(x) = x HardSigmoid(x; 1/6, 1/2)).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

import numpy as np

from ..graph_utils import const_value, new_name

REL_TOL = 1e-6


def recognize_activations(g: gs.Graph) -> dict[str, int]:
    """Apply the rules above in place until none matches; return how often each one fired."""
    fired = {"hard_sigmoid": 0, "late_scale": 0, "hard_swish": 0, "layer_norm": 0, "softmax": 0}
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            if not node.outputs and not node.inputs:
                continue
            for name, rule in (("hard_sigmoid", _hard_sigmoid), ("late_scale", _late_scale),
                               ("hard_swish", _hard_swish), ("layer_norm", _layer_norm), ("softmax", _softmax)):
                if rule(g, node):
                    fired[name] += 1
                    changed = True
                    break
    g.cleanup()
    return fired


def _scalar(t) -> float | None:
    v = const_value(t)
    if v is None or v.size != 1 or v.dtype.kind != "f":
        return None
    return float(v.reshape(()))


def _only_reader(t: gs.Tensor, g: gs.Graph) -> gs.Node | None:
    if len(t.outputs) != 1 or any(o is t for o in g.outputs):
        return None
    return t.outputs[0]


def _binary(node: gs.Node, op: str) -> tuple[gs.Tensor, float] | None:
    """(variable input, scalar constant) of op(x, c) or, for commutative ops, op(c, x)."""
    if node.op != op or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _scalar(b) is not None and not isinstance(a, gs.Constant):
        return a, _scalar(b)
    if op in ("Add", "Mul") and _scalar(a) is not None and not isinstance(b, gs.Constant):
        return b, _scalar(a)
    return None


def _clip_0_c(node: gs.Node) -> float | None:
    """c of Clip(x, 0, c) with scalar constant bounds."""
    if node.op != "Clip" or len(node.inputs) != 3:
        return None
    lo, hi = _scalar(node.inputs[1]), _scalar(node.inputs[2])
    return hi if lo == 0.0 and hi is not None and hi > 0 else None


def _scale_after(t: gs.Tensor, g: gs.Graph) -> tuple[gs.Node, float] | None:
    """The Mul(k) or Div(d) (k = 1/d) that alone reads t, and k."""
    s = _only_reader(t, g)
    if s is None:
        return None
    if (m := _binary(s, "Mul")) is not None and m[0] is t:
        return s, m[1]
    if (d := _binary(s, "Div")) is not None and d[0] is t and d[1] != 0:
        return s, 1.0 / d[1]
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _drop(*nodes: gs.Node) -> None:
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()


def _hard_sigmoid_node(g: gs.Graph, x: gs.Tensor, alpha: float, beta: float, out: gs.Tensor) -> gs.Node:
    node = gs.Node("HardSigmoid", new_name(g, "HardSigmoid"), {"alpha": float(alpha), "beta": float(beta)}, [x], [out])
    g.nodes.append(node)
    return node


def _add_clip(g: gs.Graph, clip: gs.Node):
    """For Clip(Add(x, b), 0, c) whose Add output only the Clip reads: (add, x, b, c)."""
    c = _clip_0_c(clip)
    if c is None or not clip.inputs[0].inputs:
        return None
    add = clip.inputs[0].inputs[0]
    xb = _binary(add, "Add")
    if xb is None or _only_reader(add.outputs[0], g) is not clip:
        return None
    return add, xb[0], xb[1], c


def _hard_sigmoid(g: gs.Graph, clip: gs.Node) -> bool:
    found = _add_clip(g, clip)
    if found is not None:
        add, x, b, c = found
        scale = _scale_after(clip.outputs[0], g)
        if scale is not None and _close(c * scale[1], 1.0):
            s, k = scale
            out = s.outputs[0]
            _drop(add, clip, s)
            _hard_sigmoid_node(g, x, k, b * k, out)
            return True
        if _close(c, 1.0) and x.inputs and (xa := _binary(x.inputs[0], "Mul")) is not None \
                and _only_reader(x, g) is add:  # Paddle: Clip(x * a + b, 0, 1)
            mul = x.inputs[0]
            out = clip.outputs[0]
            _drop(mul, add, clip)
            _hard_sigmoid_node(g, xa[0], xa[1], b, out)
            return True
    return False


def _late_scale(g: gs.Graph, mul: gs.Node) -> bool:
    """Mul(x, Clip(Add(x, b), 0, c)) then a scale k with c k = 1: the scale moves onto the gate."""
    if mul.op != "Mul" or len(mul.inputs) != 2:
        return False
    for gate_i in (0, 1):
        gate, x = mul.inputs[gate_i], mul.inputs[1 - gate_i]
        if not gate.inputs or _only_reader(gate, g) is not mul:
            continue
        found = _add_clip(g, gate.inputs[0])
        if found is None or found[1] is not x:
            continue
        add, _, b, c = found
        scale = _scale_after(mul.outputs[0], g)
        if scale is None or not _close(c * scale[1], 1.0):
            continue
        s, k = scale
        clip = gate.inputs[0]
        out = s.outputs[0]
        _drop(add, clip, s)
        hs = gs.Variable(new_name(g, f"{x.name}_hard_sigmoid"), dtype=x.dtype, shape=x.shape)
        _hard_sigmoid_node(g, x, k, b * k, hs)
        mul.inputs[gate_i] = hs
        mul.outputs[0] = out
        return True
    return False


def _hard_swish(g: gs.Graph, mul: gs.Node) -> bool:
    if mul.op != "Mul" or len(mul.inputs) != 2 or (g.opset or 0) < 14:
        return False
    for gate_i in (0, 1):
        gate, x = mul.inputs[gate_i], mul.inputs[1 - gate_i]
        h = gate.inputs[0] if gate.inputs else None
        if h is None or h.op != "HardSigmoid" or h.inputs[0] is not x or _only_reader(gate, g) is not mul:
            continue
        if not (_close(float(h.attrs.get("alpha", 0.2)), 1 / 6) and _close(float(h.attrs.get("beta", 0.5)), 0.5)):
            continue
        out = mul.outputs[0]
        # the Mul's name: the module it ends is named so below opset 14 too (inspect --sensitivity's
        # names must hold for a conversion that upgrades the opset, such as --override NAME=w8a16)
        name = mul.name or new_name(g, "HardSwish")
        _drop(h, mul)
        mul.name = ""
        g.nodes.append(gs.Node("HardSwish", name, {}, [x], [out]))
        return True
    return False



def _last_axis_mean(node: gs.Node, op: str = "ReduceMean") -> gs.Tensor | None:
    """x of ReduceMean(x) (or another reduction `op`) over the last axis only, keeping dims (axes
    as attribute or input)."""
    if node is None or node.op != op or not int(node.attrs.get("keepdims", 1)):
        return None
    x = node.inputs[0]
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_value(node.inputs[1])
    if axes is None or np.size(axes) != 1 or x.shape is None:
        return None
    a = int(np.reshape(axes, -1)[0])
    return x if a in (-1, len(x.shape) - 1) else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _root(node: gs.Node | None) -> bool:
    """Sqrt(v), or Pow(v, 0.5)."""
    return node is not None and (node.op == "Sqrt" or node.op == "Pow" and _scalar(node.inputs[1]) == 0.5)


def _layer_norm(g: gs.Graph, div: gs.Node) -> bool:
    if div.op not in ("Div", "Mul") or (g.opset or 0) < 17 or len(div.inputs) != 2:
        return False
    d, s = div.inputs
    recip = None
    if div.op == "Mul":  # d * Reciprocal(Sqrt(v)), either order
        if _producer(d) is not None and _producer(d).op == "Reciprocal":
            d, s = s, d
        recip = _producer(s)
        if recip is None or recip.op != "Reciprocal":
            return False
        s = recip.inputs[0]
    sub, sqrt = _producer(d), _producer(s)
    if sub is None or sub.op != "Sub" or not _root(sqrt):
        return False
    x = sub.inputs[0]
    mean = _producer(sub.inputs[1])
    if _last_axis_mean(mean) is not x:
        return False
    add = _producer(sqrt.inputs[0])
    veps = _binary(add, "Add") if add is not None else None
    if veps is None:
        return False
    var = _producer(veps[0])
    sq = _producer(var.inputs[0]) if _last_axis_mean(var) is not None else None
    if sq is None or not ((sq.op == "Pow" and sq.inputs[0] is d and _scalar(sq.inputs[1]) == 2.0) or
                          (sq.op == "Mul" and sq.inputs[0] is d and sq.inputs[1] is d)):
        return False
    inner = [mean, sub, sq, var, add, sqrt] + ([recip] if recip else [])
    pairs = [(mean, sub), (sq, var), (var, add)] + ([(add, sqrt), (sqrt, recip), (recip, div)] if recip else
                                                    [(add, sqrt), (sqrt, div)])
    if any(_only_reader(a.outputs[0], g) is not b for a, b in pairs) or \
            {id(r) for r in d.outputs} != {id(sq), id(div)} or any(o is d for o in g.outputs):
        return False
    width = x.shape[-1] if x.shape is not None else None
    if not isinstance(width, int):
        return False
    out, last = div.outputs[0], div
    gamma = np.ones(width, np.float32)
    beta = np.zeros(width, np.float32)
    affine = []
    nxt = _only_reader(out, g)
    for op in ("Mul", "Add"):
        if nxt is None or nxt.op != op or len(nxt.inputs) != 2:
            continue
        k = 1 if nxt.inputs[0] is last.outputs[0] else 0
        c = const_value(nxt.inputs[k])
        if c is None or c.size not in (1, width) or c.ndim > 1 and any(n != 1 for n in c.shape[:-1]):
            break
        vec = np.broadcast_to(c.reshape(-1), (width,)).astype(np.float32)
        if op == "Mul":
            gamma, beta = gamma * vec, beta * vec
        else:
            beta = beta + vec
        affine.append(nxt)
        last = nxt
        out = nxt.outputs[0]
        nxt = _only_reader(out, g)
    eps = veps[1]
    _drop(*inner, div, *affine)
    g.nodes.append(gs.Node("LayerNormalization", new_name(g, "LayerNormalization"), {"axis": -1, "epsilon": float(eps)},
                           [x, gs.Constant(new_name(g, "ln_scale"), gamma), gs.Constant(new_name(g, "ln_bias"), beta)],
                           [out]))
    return True


def _softmax(g: gs.Graph, div: gs.Node) -> bool:
    """Div(e, ReduceSum(e)) with e = Exp(x) or Exp(x - ReduceMax(x)), over the last axis."""
    if div.op != "Div" or len(div.inputs) != 2:
        return False
    e, s = div.inputs
    exp, red = _producer(e), _producer(s)
    if exp is None or exp.op != "Exp" or _last_axis_mean(red, "ReduceSum") is not e:
        return False
    if {id(r) for r in e.outputs} != {id(red), id(div)} or any(o is e for o in g.outputs) or \
            _only_reader(s, g) is not div:
        return False
    x, inner = exp.inputs[0], [exp, red]
    sub = _producer(x)
    if sub is not None and sub.op == "Sub" and _only_reader(x, g) is exp:
        mx = _producer(sub.inputs[1])
        if mx is not None and _last_axis_mean(mx, "ReduceMax") is sub.inputs[0] and _only_reader(mx.outputs[0], g) is sub:
            x, inner = sub.inputs[0], inner + [sub, mx]  # the usual shift by the row maximum: same function
    if x.shape is None:
        return False
    out = div.outputs[0]
    _drop(*inner, div)
    g.nodes.append(gs.Node("Softmax", new_name(g, "Softmax"), {"axis": -1}, [x], [out]))
    return True
