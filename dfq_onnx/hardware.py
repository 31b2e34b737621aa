"""What requantization costs in silicon: two requantizer circuits, synthesized and simulated.

The two units (combinational; int32 accumulator in, int8 code out, or uint8 when `uns` is set):
- shift: dfq-onnx's RoundingShift, y = sat(floor(acc / 2^s) + round), round = bit s-1 of acc and
  (any lower bit, or bit s: the quotient is odd): acc / 2^s rounded to nearest, ties to even, as
  ONNX QuantizeLinear rounds (fixedpoint.rounding_shift). Per-channel shift s. Ties to even costs
  an OR tree over the bits below the half bit and two gates over round half up.
- multiplier: the requantizer of integer-only inference with float scales (gemmlowp/TFLite
  MultiplyByQuantizedMultiplier, right-shift case): saturating rounding doubling high multiply by
  a Q31 multiplier m, rounding divide by 2^s, saturate (fixedpoint.multiply_requant).
Neither has a zero point or an activation clamp: both would cost the same in the two units.

Area: Yosys synthesizes each unit (`synth -flatten`) to its generic gate library and `stat -tech
cmos` counts cells and estimated CMOS transistors.

Energy proxy: the synthesized netlist runs under Icarus Verilog (zero delay) on a stream of
int32 accumulators captured from a model's calibration run; the proxy is the number of signal
toggles (0 <-> 1 on every net, ports included) per requantization. Each output is checked against
the numpy reference. The proxy is not an energy: no process library, no wire load or capacitance,
no glitches (zero-delay simulation), no leakage, no clock or parameter storage.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DfqError


ACC_BITS = 32
OUT_BITS = 8
SHIFT_BITS = 5          # right shifts 0..31
MULTIPLIER_BITS = 32    # Q31 multiplier
UNITS = ("shift", "multiplier")
TOOLS = ("yosys", "iverilog", "vvp")
TOOL_TIMEOUT = 600      # seconds per tool call

_SATURATE = """
    wire signed [{A}:0] lo = uns ? 0 : -(1 <<< ({O} - 1));
    wire signed [{A}:0] hi = uns ? (1 <<< {O}) - 1 : (1 <<< ({O} - 1)) - 1;
    assign y = (r < lo) ? lo[{O}-1:0] : (r > hi) ? hi[{O}-1:0] : r[{O}-1:0];
endmodule
"""


def verilog(unit: str, acc_bits: int = ACC_BITS, out_bits: int = OUT_BITS, shift_bits: int = SHIFT_BITS) -> str:
    """Verilog-2005 source of one requantizer, module `<unit>_requant`."""
    a, o, sb = acc_bits, out_bits, shift_bits
    sat = _SATURATE.format(A=a, O=o)
    if unit == "shift":
        return f"""// dfq-onnx rounding-shift requantizer: y = sat(round_half_to_even(acc / 2^s))
module shift_requant (
    input  wire signed [{a - 1}:0] acc,
    input  wire [{sb - 1}:0] s,
    input  wire uns,
    output wire [{o - 1}:0] y
);
    wire signed [{a - 1}:0] q = acc >>> s;
    wire [{a - 1}:0] low = (({a}'d1 << s) >> 1) - 1;          // the bits below the half bit
    wire sticky = |(acc & low);
    wire round_bit = (s != 0) & acc[s - 1'b1] & (sticky | q[0]);
    wire signed [{a}:0] r = {{q[{a - 1}], q}} + round_bit;
""" + sat
    if unit == "multiplier":
        if a > MULTIPLIER_BITS:
            raise ValueError("the multiplier unit takes accumulators of at most 32 bits")
        return f"""// gemmlowp/TFLite requantizer: sat(RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, m), s))
module multiplier_requant (
    input  wire signed [{a - 1}:0] acc,
    input  wire signed [31:0] m,
    input  wire [{sb - 1}:0] s,
    input  wire uns,
    output wire [{o - 1}:0] y
);
    wire signed [63:0] ab = acc * m;
    wire signed [63:0] nudge = ab[63] ? 64'sd1 - (64'sd1 <<< 30) : (64'sd1 <<< 30);
    wire signed [63:0] t = ab + nudge;
    wire signed [63:0] fl = t >>> 31;
    wire signed [31:0] hm = fl[31:0] + (t[63] & (|t[30:0]));   // (t / 2^31) rounded toward zero
    wire ovf = (acc == -(64'sd1 <<< 31)) & (m == 32'sh80000000);
    wire signed [31:0] x = ovf ? 32'sh7fffffff : hm;
    wire [31:0] mask = (32'd1 << s) - 1;
    wire [31:0] rem = x & mask;
    wire [31:0] thr = (mask >> 1) + x[31];
    wire signed [31:0] qx = x >>> s;
    wire signed [32:0] r = {{qx[31], qx}} + (rem > thr);
""" + sat
    raise ValueError(f"unknown unit {unit!r}; choose from {UNITS}")


def rom_verilog(table) -> str:
    """Verilog-2005 source of a lookup table as a combinational ROM, module `table_rom`: 8-bit
    code in, the table's 8-bit entry out (a case statement; Yosys turns it into logic)."""
    rows = "\n".join(f"            8'd{i}: y = 8'd{int(v) & 0xFF};" for i, v in enumerate(table))
    return f"""// lookup table: y = table[x]
module table_rom (
    input  wire [7:0] x,
    output reg  [7:0] y
);
    always @(*) begin
        case (x)
{rows}
            default: y = 8'd0;
        endcase
    end
endmodule
"""


def synthesize_rom(table, workdir: Path | None = None) -> Synthesis:
    """Yosys as in `synthesize`, for the ROM of one 256-entry table."""
    return _synthesize(rom_verilog(table), "table_rom", "rom", "a table ROM", workdir)


def missing_tools() -> list[str]:
    """The circuit tools (yosys, iverilog, vvp) not found on PATH."""
    return [t for t in TOOLS if shutil.which(t) is None]


def require_tools() -> None:
    miss = missing_tools()
    if miss:
        raise DfqError(f"{', '.join(miss)} not found: the hardware report synthesizes with Yosys and simulates "
                       "with Icarus Verilog (Debian/Ubuntu: apt-get install yosys iverilog)")


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except FileNotFoundError:
        require_tools()
        raise
    except subprocess.TimeoutExpired:
        raise DfqError(f"{what} took longer than {TOOL_TIMEOUT} s") from None
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
        raise DfqError(f"{what} failed: {lines[-1] if lines else f'exit code {p.returncode}'}")
    return p.stdout


@dataclass
class Synthesis:
    unit: str
    cells: int
    transistors: int
    cell_types: dict[str, int]
    netlist: str  # gate-level Verilog written by Yosys


def synthesize(unit: str, workdir: Path | None = None) -> Synthesis:
    """Yosys: `synth -flatten` to the generic gate library, `stat -tech cmos`, gate-level netlist."""
    return _synthesize(verilog(unit), f"{unit}_requant", unit, f"the {unit} requantizer", workdir)


def _synthesize(source: str, top: str, unit: str, what: str, workdir: Path | None) -> Synthesis:
    require_tools()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(workdir or tmp)
        (d / f"{unit}.v").write_text(source)
        _run(["yosys", "-q", "-p", f"read_verilog {unit}.v; synth -flatten -top {top}; opt_clean; "
              f"tee -q -o {unit}_stat.txt stat -tech cmos; write_verilog -noattr {unit}_net.v"], d,
             f"yosys synthesis of {what}")
        stat = (d / f"{unit}_stat.txt").read_text()
        netlist = (d / f"{unit}_net.v").read_text()
    cells = int(re.search(r"Number of cells:\s+(\d+)", stat).group(1))
    trans = int(re.search(r"Estimated number of transistors:\s+(\d+)", stat).group(1))
    types = {k: int(v) for k, v in re.findall(r"^\s+(\$_\w+_)\s+(\d+)", stat, re.M)}
    return Synthesis(unit, cells, trans, types, netlist)


_TESTBENCH = """`timescale 1ns/1ns
module tb;
    reg signed [{A}:0] acc;
    reg signed [31:0] m;
    reg [{S}:0] s;
    reg uns;
    wire [{O}:0] y;
    integer fi, fo, r;
    {top} dut (.acc(acc), {mport}.s(s), .uns(uns), .y(y));
    initial begin
        fi = $fopen("in.txt", "r");
        fo = $fopen("out.txt", "w");
        $dumpfile("toggles.vcd");
        $dumpvars(0, dut);
        r = $fscanf(fi, "%h %h %h %h\\n", acc, m, s, uns);
        while (r == 4) begin
            #5 $fdisplay(fo, "%0d", y);
            #5 r = $fscanf(fi, "%h %h %h %h\\n", acc, m, s, uns);
        end
        $fclose(fo);
        $finish;
    end
endmodule
"""


def simulate(synth: Synthesis, acc: np.ndarray, s: np.ndarray, unsigned: np.ndarray,
             m: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Run the gate-level netlist on one input vector per element, in order. Returns the output
    codes (int64; int8 or uint8 by `unsigned`) and the number of signal toggles over all
    transitions between consecutive inputs (the first input's settling is not counted)."""
    require_tools()
    n = len(acc)
    acc = np.asarray(acc, dtype=np.int64)
    m = np.zeros(n, np.int64) if m is None else np.asarray(m, dtype=np.int64)
    top = f"{synth.unit}_requant"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = np.stack([acc & 0xFFFFFFFF, m & 0xFFFFFFFF, np.asarray(s, np.int64), np.asarray(unsigned, np.int64)], 1)
        (d / "in.txt").write_text("".join(f"{a:08x} {b:08x} {c:x} {u:x}\n" for a, b, c, u in rows.tolist()))
        (d / "net.v").write_text(synth.netlist)
        (d / "tb.v").write_text(_TESTBENCH.format(A=ACC_BITS - 1, S=SHIFT_BITS - 1, O=OUT_BITS - 1, top=top,
                                                  mport=".m(m), " if synth.unit == "multiplier" else ""))
        _run(["iverilog", "-g2005", "-o", "sim", "tb.v", "net.v"], d, f"iverilog compile of the {synth.unit} netlist")
        _run(["vvp", "-n", "sim"], d, f"simulation of the {synth.unit} netlist")
        raw = np.array([int(v) for v in (d / "out.txt").read_text().split()], dtype=np.int64)
        toggles = count_toggles(d / "toggles.vcd")
    if len(raw) != n:
        raise DfqError(f"simulation of the {synth.unit} netlist returned {len(raw)} of {n} values")
    signed = ~np.asarray(unsigned, dtype=bool)
    y = np.where(signed & (raw >= 1 << (OUT_BITS - 1)), raw - (1 << OUT_BITS), raw)
    return y, toggles


def count_toggles(vcd: Path) -> int:
    """Bit changes between 0 and 1 of all dumped signals after the first timestamp of a VCD file:
    each value listed for a signal is compared with the signal's previous value, bit by bit (a
    simulator may list a signal again with an unchanged value; that is not a toggle)."""
    text = Path(vcd).read_bytes()
    start = text.find(b"\n#", text.find(b"$enddefinitions"))
    if start < 0:
        return 0
    first_step = text.find(b"\n#", start + 1)
    first_step = len(text) if first_step < 0 else first_step
    buf = np.frombuffer(text, dtype=np.uint8)
    ends = np.flatnonzero(buf[start:] == 10)[1:] + start       # the newline ending each line
    begins = np.concatenate([[start + 1], ends[:-1] + 1])      # each line's first character
    heads = buf[np.minimum(begins, len(buf) - 1)]
    scalar = np.isin(heads, np.frombuffer(b"01xzXZ", np.uint8))
    toggles = _scalar_toggles(begins[scalar], ends[scalar], buf, first_step)
    vec = heads == ord("b")
    if np.any(vec):
        vals, ids, pos = [], [], []
        for b, e in zip(begins[vec].tolist(), ends[vec].tolist()):
            v, ident = text[b + 1:e].split()
            vals.append(v)
            ids.append(ident)
            pos.append(b)
        width = max(len(v) for v in vals)
        # VCD left-extends a vector with 0, or with x/z if its first digit is x/z
        bits = np.frombuffer(b"".join(v.rjust(width, b"0" if v[:1] == b"1" else v[:1]) for v in vals),
                             np.uint8).reshape(len(vals), width)
        _, key = np.unique(np.array(ids, dtype=bytes), return_inverse=True)
        toggles += _count(bits, key, np.asarray(pos) > first_step)
    return toggles


def _scalar_toggles(begins, ends, buf, first_step) -> int:
    """Toggles of scalar lines `<value><ident>`: each ident's bytes (zero-padded) as one row key."""
    if len(begins) == 0:
        return 0
    idx = begins[:, None] + 1 + np.arange(int((ends - begins).max()) - 1)
    ident = np.where(idx < ends[:, None], buf[np.minimum(idx, len(buf) - 1)], 0)
    _, key = np.unique(ident, axis=0, return_inverse=True)
    return _count(buf[begins].reshape(-1, 1), key.ravel(), begins > first_step)


def _count(bits: np.ndarray, key: np.ndarray, later: np.ndarray) -> int:
    """Bits that change between 0 and 1 from one listed value of a signal to its next, counting
    only values listed after the first time step."""
    order = np.lexsort((np.arange(len(key)), key))
    b, k, late = bits[order], key[order], later[order]
    pair = (k[1:] == k[:-1]) & late[1:]
    zero_one = np.isin(b, (ord("0"), ord("1")))
    flip = (b[1:] != b[:-1]) & zero_one[1:] & zero_one[:-1]
    return int(np.sum(flip[pair]))
