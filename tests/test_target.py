"""The default target is safe on every onnxruntime CPU: on x86 without VNNI (AVX2) the u8 x s8
kernels add adjacent products in int16 and saturate. Emulated in numpy (fixedpoint.u8s8_dot_avx2),
so this runs the same on a VNNI machine."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dfq_onnx import QuantConfig
from dfq_onnx.fixedpoint import u8s8_dot_avx2
from dfq_onnx.pipeline import run

from helpers import CALIB, SHIPPED, int8_weight_rows


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda k: st.tuples(
    st.lists(st.integers(0, 255), min_size=k, max_size=k),
    st.lists(st.integers(-128, 127), min_size=k, max_size=k))))
def test_emulated_kernel_is_exact_iff_no_pair_saturates(xw):
    """Against plain integer arithmetic: the emulation equals the exact dot product when every
    adjacent pair sum fits int16, and differs by exactly the clipped amount otherwise."""
    x, w = (np.array(v) for v in xw)
    got = int(u8s8_dot_avx2(x, w[None])[0])
    pairs = [x[i] * w[i] + (x[i + 1] * w[i + 1] if i + 1 < len(x) else 0) for i in range(0, len(x), 2)]
    assert got == sum(min(max(p, -32768), 32767) for p in pairs)
    if all(-32768 <= p <= 32767 for p in pairs):
        assert got == int(np.dot(x, w))


def worst_case_errors(rows_by_node) -> int:
    """Channels whose emulated AVX2 result differs from the exact one on the worst input: the
    kernel's packing (rows in its K order, helpers.int8_weight_rows), activation code 255
    wherever the weight has one sign and 0 elsewhere, for either sign."""
    bad = 0
    for w in rows_by_node.values():
        for sign in (1, -1):
            x = np.where(sign * w > 0, 255, 0)               # [C, K]: one worst input per channel
            emulated = np.array([u8s8_dot_avx2(x[c], w[c:c + 1])[0] for c in range(len(w))])
            bad += int(np.sum(emulated != np.sum(x * w, axis=1)))
    return bad


def test_default_target_cannot_saturate_and_vnni_target_can():
    """The default (target ort) keeps every pair sum within int16 for any input; ort-x86-vnni
    keeps full 8-bit codes, and the emulated AVX2 kernel then gets some channels wrong."""
    safe = run(SHIPPED, CALIB)
    assert safe.facts["saturation_guarded"] > 0
    assert worst_case_errors(int8_weight_rows(safe.model)) == 0
    fast = run(SHIPPED, CALIB, QuantConfig(target="ort-x86-vnni"))
    assert fast.facts["saturation_guarded"] == 0
    assert worst_case_errors(int8_weight_rows(fast.model)) > 0


def test_the_integer_graph_keeps_8_bit_weights_by_default():
    """The integer graph's ConvInteger/MatMulInteger run u8 x u8 (exact on every CPU): no 7-bit
    guard, and its weight codes use the full range."""
    r = run(SHIPPED, CALIB, QuantConfig(format="int"))
    assert r.facts["saturation_guarded"] == 0
    assert max(int(np.abs(m.weight).max()) for m in r.quantized.modules if hasattr(m, "weight")) > 64

