"""Requantizer circuits: the numpy references, the synthesized netlists against them, the toggle
counter, and the per-model hardware report. Circuit tests need yosys and iverilog."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfq_onnx import hardware as hw
from dfq_onnx.errors import DfqError
from dfq_onnx.fixedpoint import multiply_requant, quantize_multiplier, rounding_shift

from helpers import CALIB, SHIPPED

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
needs_tools = pytest.mark.skipif(bool(hw.missing_tools()),
                                 reason=f"{', '.join(hw.missing_tools())} not installed (apt-get install yosys iverilog)")


# --- the numpy reference of the multiplier requantizer, against gemmlowp written out in Python ints
def _srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul, with C's truncating division."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    q = abs(ab + nudge) // (1 << 31)
    return q if ab + nudge >= 0 else -q


def _rdbpot(x: int, e: int) -> int:
    """gemmlowp RoundingDivideByPOT."""
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(INT32_MIN, INT32_MAX), st.integers(1 << 30, INT32_MAX), st.integers(0, 31))
def test_multiply_requant_is_gemmlowp(acc, m, s):
    assert multiply_requant(np.array([acc]), m, s)[0] == _rdbpot(_srdhm(acc, m), s)


def test_multiply_requant_saturating_corner():
    assert multiply_requant(np.array([INT32_MIN]), INT32_MIN, 0)[0] == INT32_MAX


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-9, 0.999999, allow_nan=False))
def test_quantize_multiplier_represents_the_real_value(real):
    m, s = quantize_multiplier(np.array([real]))
    assert (1 << 30) <= m[0] < (1 << 31) and s[0] >= 0
    approx = m[0] * 2.0 ** (-31 - int(s[0]))
    assert abs(approx - real) <= 2.0 ** (-32 - int(s[0])) * 1.0000001


def test_quantize_multiplier_refuses_values_outside_0_1():
    for bad in (0.0, 1.0, 2.5, -0.1, np.inf):
        with pytest.raises(ValueError):
            quantize_multiplier(np.array([bad]))


def test_multiplier_requant_rounds_like_the_real_product():
    """The real product, rounded twice: to nearest by the high multiply (at most half a unit of
    2^-s in the result), then to nearest by the divide."""
    rng = np.random.default_rng(3)
    acc = rng.integers(-10**6, 10**6, 5000)
    real = rng.uniform(1e-4, 0.9, 5000)
    m, s = quantize_multiplier(real)
    exact = acc * (m.astype(np.float64) * np.ldexp(1.0, -31 - s))
    assert np.all(np.abs(multiply_requant(acc, m, s) - exact) <= np.where(s > 0, 0.5 + 0.5 * np.ldexp(1.0, -s), 0.5) + 1e-9)


# --- the toggle counter, on a hand-written VCD file
VCD = """$timescale 1ns $end
$scope module dut $end
$var wire 1 ! a $end
$var wire 1 "# b $end
$var wire 4 $ v [3:0] $end
$upscope $end
$enddefinitions $end
#0
$dumpvars
0!
1"#
b101 $
$end
#10
1!
0"#
b1010 $
#20
1!
0!
b11 $
#30
1"#
bx $
"""


def test_count_toggles_counts_bit_changes_after_the_first_step(tmp_path):
    f = tmp_path / "t.vcd"
    f.write_text(VCD)
    # t=10: a 0->1, b 1->0, v 0101->1010 (4 bits); t=20: a listed again unchanged (no toggle),
    # then 1->0, v 1010->0011 (2 bits); t=30: b 0->1, v to x (no toggle)
    assert hw.count_toggles(f) == 1 + 1 + 4 + 1 + 2 + 1


# --- the circuits
EDGE = [0, 1, -1, 2, -2, 3, -3, 127, 128, -128, -129, 255, 256, 1 << 20, -(1 << 20), INT32_MAX, INT32_MIN,
        INT32_MAX - 1, INT32_MIN + 1, (1 << 30) + 12345, -(1 << 30) - 12345]


@pytest.fixture(scope="module")
def vectors():
    """Edge accumulators under every shift and both signednesses, then random ones."""
    rng = np.random.default_rng(0)
    acc = [a for a in EDGE for _ in (0, 1) for _ in range(0, 32, 5)]
    s = [k for _ in EDGE for _ in (0, 1) for k in range(0, 32, 5)]
    u = [i % 2 for a in EDGE for i in (0, 1) for _ in range(0, 32, 5)]
    n = 300
    acc += list(rng.integers(INT32_MIN, INT32_MAX, n // 2, endpoint=True)) + list(rng.integers(-4096, 4096, n // 2))
    s += list(rng.integers(0, 32, n))
    u += list(rng.integers(0, 2, n))
    acc, s, u = np.array(acc, np.int64), np.array(s, np.int64), np.array(u, bool)
    m, ms = quantize_multiplier(rng.uniform(1e-4, 0.999, len(acc)))
    m[:3] = INT32_MIN  # the saturating corner of the doubling high multiply, with acc = 0, 1, -1
    acc[2] = INT32_MIN
    m[2] = INT32_MIN
    return acc, s, u, m, np.minimum(ms, 31)


def _saturate(y, u):
    return np.where(u, np.clip(y, 0, 255), np.clip(y, -128, 127))


@pytest.fixture(scope="module")
def netlists():
    return {u: hw.synthesize(u) for u in hw.UNITS}


@needs_tools
def test_shift_netlist_is_bit_exact_with_rounding_shift(netlists, vectors):
    acc, s, u, _, _ = vectors
    y, _ = hw.simulate(netlists["shift"], acc, s, u)
    np.testing.assert_array_equal(y, _saturate(rounding_shift(acc, s), u))


@needs_tools
def test_multiplier_netlist_is_bit_exact_with_gemmlowp(netlists, vectors):
    acc, _, u, m, ms = vectors
    y, _ = hw.simulate(netlists["multiplier"], acc, ms, u, m)
    np.testing.assert_array_equal(y, _saturate(multiply_requant(acc, m, ms), u))


@needs_tools
def test_toggles_are_zero_for_a_constant_stream_and_cover_the_ports(netlists):
    syn = netlists["shift"]
    n = 20
    _, still = hw.simulate(syn, np.full(n, 12345), np.full(n, 3), np.zeros(n, bool))
    assert still == 0
    acc = np.where(np.arange(n) % 2 == 0, 0x55555555, -0x55555556)  # every acc bit flips
    y, moving = hw.simulate(syn, acc, np.full(n, 3), np.zeros(n, bool))
    port_flips = 32 * (n - 1) + sum(bin((int(a) ^ int(b)) & 0xFF).count("1") for a, b in zip(y[:-1], y[1:]))
    assert moving >= port_flips


@needs_tools
def test_multiplier_unit_is_much_larger_than_the_shift_unit(netlists):
    """The claim the report quantifies: a 32x32 multiplier dominates the baseline's area."""
    assert netlists["multiplier"].transistors > 5 * netlists["shift"].transistors
    assert netlists["multiplier"].cells > 5 * netlists["shift"].cells


@needs_tools
@pytest.mark.slow
def test_hardware_report_on_the_shipped_model():
    from dfq_onnx.hw_report import hardware_report

    r = hardware_report(SHIPPED, CALIB, num_samples=32, values=600)
    assert all(u["bit_exact"] for u in r["units"].values())
    assert r["unit_ratios"]["area_transistors"] > 5 and r["unit_ratios"]["energy_proxy"] > 2
    d, o = r["dfq"], r["ort"]
    # dfq: one requantizer per module output except the logits (8 modules, the Gemm leaves as int32)
    assert d["requantizers"] == 7 and d["by_unit"] == {"shift": 6, "divide": 1}
    assert o["requantizers"] == len(r["ort_points"]) >= d["requantizers"]
    assert sum(p["elements"] for p in r["dfq_points"]) == d["requantizations"]
    # the stem Conv (16 channels, 28x28, a shift per channel) is one of dfq's requantizations
    assert any(p["elements"] == 16 * 28 * 28 and p["channels"] == 16 for p in r["dfq_points"])
    assert d["transistors"] < o["transistors"] and d["toggles"] < o["toggles"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dfq_onnx.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env)


def test_hw_needs_calibration_data():
    p = _cli("inspect", str(SHIPPED), "--hw")
    assert p.returncode == 1 and "--calib" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_calib_without_hw_is_a_usage_error():
    p = _cli("inspect", str(SHIPPED), "--calib", str(CALIB))
    assert p.returncode == 2 and "only with --hw" in p.stderr


def test_hw_refuses_a_quantized_model(tmp_path, shipped_qdq):
    import onnx

    q = tmp_path / "q.onnx"
    onnx.save(shipped_qdq.model, str(q))
    p = _cli("inspect", str(q), "--hw", "--calib", str(CALIB))
    assert p.returncode == 1 and "already quantized" in p.stderr and "Traceback" not in p.stderr


def test_hw_says_which_tools_are_missing(monkeypatch):
    monkeypatch.setattr(hw.shutil, "which", lambda tool: None)
    with pytest.raises(DfqError, match="yosys, iverilog, vvp not found"):
        hw.synthesize("shift")
