"""Elementwise ONNX ops in float64 numpy: the float functions that lookup tables round.

A chain of elementwise ops reading one tensor (an activation however an exporter spelled it:
HardSwish as Add/Clip/Div/Mul, SiLU as x*Sigmoid(x), GELU through Erf or Tanh, Mish through
Softplus) is a function of that tensor alone; on 8-bit codes it is a 256-entry table
(quantized.py builds it). This module evaluates such a chain on given input values, in float64,
following the ONNX operator definitions with the attributes and constants exactly as the model
stores them. No ONNX import: ops arrive as (op, attrs, inputs)."""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


UNARY = {
    "Sigmoid": lambda x, a: _sigmoid(x),
    "Tanh": lambda x, a: np.tanh(x),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a: x * np.clip(x * (1.0 / 6.0) + 0.5, 0.0, 1.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x),
    "Elu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 1.0) * np.expm1(np.minimum(x, 0.0))),
    "Selu": lambda x, a: a.get("gamma", 1.0507009873554804934193349852946) *
    np.where(x > 0, x, a.get("alpha", 1.6732632423543772848170429916717) * np.expm1(np.minimum(x, 0.0))),
    "Celu": lambda x, a: np.maximum(0.0, x) + np.minimum(0.0, a.get("alpha", 1.0) *
                                                          np.expm1(np.minimum(x, 0.0) / a.get("alpha", 1.0))),
    "ThresholdedRelu": lambda x, a: np.where(x > a.get("alpha", 1.0), x, 0.0),
    "Softplus": lambda x, a: _softplus(x),
    "Softsign": lambda x, a: x / (1.0 + np.abs(x)),
    "Mish": lambda x, a: x * np.tanh(_softplus(x)),
    "Gelu": lambda x, a: (0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))))
    if a.get("approximate", "none") == "tanh" else 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "Erf": lambda x, a: _erf(x),
    "Exp": lambda x, a: np.exp(x),
    "Relu": lambda x, a: np.maximum(x, 0.0),
    "Abs": lambda x, a: np.abs(x),
    "Neg": lambda x, a: -x,
}
BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum, "PRelu": lambda x, s: np.where(x >= 0, x, s * x),
}
AFFINE = ("Add", "Sub", "Mul", "Div", "Neg")  # with constants: a chain of only these is affine
ELEMENTWISE = tuple(UNARY) + tuple(BINARY) + ("Clip",)


def apply(op: str, attrs: dict, inputs: list) -> np.ndarray:
    """One elementwise op on float64 arrays (None for an absent optional input)."""
    with np.errstate(all="ignore"):
        if op in UNARY:
            return np.asarray(UNARY[op](inputs[0], attrs), np.float64)
        if op in BINARY:
            return np.asarray(BINARY[op](inputs[0], inputs[1]), np.float64)
        if op == "Clip":
            lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
            hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
            x = inputs[0]
            if lo is not None:
                x = np.maximum(x, lo)
            if hi is not None:
                x = np.minimum(x, hi)
            return np.asarray(x, np.float64)
    raise ValueError(f"{op} is not an elementwise op known to dfq-onnx")


def evaluate(chain, root: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run `chain` (in order; each item (op, attrs, input names, output name, constants by input
    name)) on root = x in float64; return every tensor computed, by name."""
    values = {root: np.asarray(x, np.float64)}
    for op, attrs, inputs, output, consts in chain:
        args = [None if not n else values[n] if n in values else np.asarray(consts[n], np.float64)
                for n in inputs]
        values[output] = apply(op, attrs, args)
    return values
