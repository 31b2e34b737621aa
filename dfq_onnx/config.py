"""User-facing settings of a conversion."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import DfqError
from .gptq import Sparsity

METHODS = ("mse", "max")
EFFORTS = ("fast", "default", "max")
ROUNDINGS = ("auto", "gptq", "nearest")
FORMATS = ("qdq", "int", "c", "qonnx")
INTEGER_FORMATS = ("int", "c")  # rendered from the integer graph's IR (unified modules, no float requantizer)
LAYOUTS = ("ort", "unified")
TARGETS = ("ort", "ort-x86-vnni", "ort-x86", "ort-arm", "hw")
SATURATION_SAFE_TARGETS = ("ort", "ort-x86")  # weights one bit coarser where int16 pair sums could saturate
U8S8_PAIR_SUM = 128  # x86 without VNNI: u8 x s8 pairs summed in int16: 255 * 128 <= 32767


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8          # 2..8, stored as int8
    act_bits: int = 8             # 8 or 16 (int8/int16, or uint8/uint16 for provably non-negative tensors)
    per_channel: bool = True      # weight fraction per output channel (else per tensor)
    method: str = "mse"           # "mse": least expected squared error; "max": no clipping
    bias_correction: bool = True  # empirical bias correction on the simulated graph (passes/bias_correction.py)
    align: bool = True            # range alignment between consecutive convolutions (passes/align_ranges.py)
    equalize: bool = False        # cross-layer equalization (passes/equalize.py)
    search_exponents: bool = False  # output-aware activation exponent search (passes/search_exponents.py)
    effort: str = "default"       # fast: round to nearest, histogram exponents. default: the fast output-aware
    #                               exponent search (passes/search_exponents.local_search) and second-order
    #                               rounding below 8 weight bits. max: second-order rounding at every width (in
    #                               stages, activation order) and the full exponent search
    rounding: str = "auto"        # weight rounding: gptq (second order, passes/round_weights.py), nearest, or
    #                               auto (the effort's choice)
    sparsity: str | None = None   # "N:M" or a fraction: prune weights (jointly with rounding under gptq)
    num_samples: int = 128        # calibration samples used
    batch_size: int = 8          # calibration batch size (1 for models with a fixed batch of 1)
    format: str = "qdq"           # "qdq" (ONNX Runtime int8 kernels), "int" (integer-only graph), "c" (a C99
    #                               library of the integer graph's IR, passes/emit_c.py) or "qonnx" (the QDQ
    #                               graph with QONNX Quant nodes, passes/emit_qonnx.py)
    prefix: str = "model"         # format c: the library's name (NAME.c, NAME.h, NAME_run)
    target: str = "ort"           # deployment: ort (any onnxruntime CPU, the safe default) and ort-x86 (no VNNI):
    #                               channels one bit coarser where a pair of codes the kernels add could saturate int16;
    #                               ort-x86-vnni | ort-arm: no limit; hw: the integer-only graph
    keep_float: tuple = ()        # names of unified modules (their linear/pool node) left in float
    overrides: tuple = ()         # (module name, weight bits) pairs: per-module weight precision
    act_overrides: tuple = ()     # (module name, activation bits) pairs: bits of that module's output
    layout: str = "ort"           # QDQ only. "ort": a residual Add gets its own requantization so that
    #                               onnxruntime can run QLinearConv (+ QLinearAdd); "unified": one requantization
    #                               per module, as in the integer graph (onnxruntime runs those convs in float)

    def __post_init__(self):
        if not 2 <= self.weight_bits <= 8:
            raise DfqError(f"weight bits must be 2..8, got {self.weight_bits}")
        if self.act_bits not in (8, 16):
            raise DfqError(f"activation bits must be 8 or 16, got {self.act_bits}")
        for name, bits in self.act_overrides:
            if int(bits) not in (8, 16):
                raise DfqError(f"override {name}: activation bits must be 8 or 16, got {bits}")
        if self.uses_16bit_activations and self.integer:
            raise DfqError("16-bit activations need --format qdq: the integer graph's ConvInteger takes 8-bit inputs")
        if self.method not in METHODS:
            raise DfqError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.format not in FORMATS:
            raise DfqError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.layout not in LAYOUTS:
            raise DfqError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.target not in TARGETS:
            raise DfqError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target == "hw" and not self.integer:
            raise DfqError("target hw is integer hardware: it needs the integer-only format (--format int)")
        if self.effort not in EFFORTS:
            raise DfqError(f"effort must be one of {', '.join(EFFORTS)}, got {self.effort!r}")
        if self.rounding not in ROUNDINGS:
            raise DfqError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        Sparsity.parse(self.sparsity)  # a clear error for a bad spec
        if self.num_samples < 1:
            raise DfqError("number of calibration samples must be at least 1")
        if self.batch_size < 1:
            raise DfqError("batch size must be at least 1")
        for name, bits in self.overrides:
            if not 2 <= int(bits) <= 8:
                raise DfqError(f"override {name}: weight bits must be 2..8, got {bits}")

    @property
    def gptq(self) -> bool:
        """Second-order weight rounding: asked for, or (auto) at effort max, or at effort default below
        8 weight bits or with sparsity."""
        if self.rounding != "auto":
            return self.rounding == "gptq"
        low = self.weight_bits < 8 or any(int(b) < 8 for _, b in self.overrides)
        return self.effort == "max" or (self.effort == "default" and (low or self.sparsity is not None))

    @property
    def searches(self) -> bool:
        """The output-aware exponent search runs: asked for, or at effort max."""
        return self.search_exponents or self.effort == "max"

    @property
    def fast_search(self) -> bool:
        """The fast local exponent search runs instead: effort default, the full one not asked for."""
        return self.effort == "default" and not self.searches

    @property
    def integer(self) -> bool:
        """The integer graph's IR is built (one requantization per unified module)."""
        return self.format in INTEGER_FORMATS

    @property
    def uses_16bit_activations(self) -> bool:
        return self.act_bits == 16 or any(int(b) == 16 for _, b in self.act_overrides)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["keep_float"] = list(self.keep_float)
        d["overrides"] = {name: int(bits) for name, bits in self.overrides}
        d["act_overrides"] = {name: int(bits) for name, bits in self.act_overrides}
        return d
