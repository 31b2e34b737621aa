"""Build and run a generated C library (passes/emit_c.py) with the system C compiler.

The harness (written here, not by the generator) reads samples of input codes from stdin, calls
NAME_run on each and writes the output codes, then (dump=True) the whole arena, to stdout."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

CC = shutil.which("cc") or shutil.which("gcc")
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]
OPTIMIZE = ["-O3", "-march=native"]  # the vectorizer too: gcc 12 once miscompiled a form that -O0/-O1 ran right
DTYPES = {"int8_t": np.int8, "uint8_t": np.uint8, "int32_t": np.int32}
AARCH64_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


CPU = _cpu_flags()
X86 = {  # the x86 kernel families (c_kernels.py): flags, DFQ_SIMD they select, CPU flags they need
    "avx2": (["-march=x86-64-v3"], 2, {"avx2", "fma", "bmi2"}),
    "vnni": (["-march=x86-64-v3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], 3,
             {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
}


def families(prefix: str) -> dict:
    """Kernel family -> (compiler flags, the DFQ_SIMD value they must select) for each family this
    machine runs natively: the portable one and the small build (shared generic kernels) always,
    the x86 ones where the CPU has the instructions."""
    out = {"portable": ([f"-D{prefix.upper()}_PORTABLE"], 0), "small": ([f"-D{prefix.upper()}_SMALL"], 0)}
    for name, (flags, simd, need) in X86.items():
        if need <= CPU:
            out[name] = (flags, simd)
    return out


def selected_family(lib, flags, cc=None) -> int:
    """The DFQ_SIMD value the library's preprocessor chooses under `flags` (cc -E -dM)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{lib.prefix}.h").write_text(lib.header)
        (Path(d) / f"{lib.prefix}.c").write_text(lib.source)
        r = subprocess.run([cc or CC, *flags, "-E", "-dM", str(Path(d) / f"{lib.prefix}.c")],
                           capture_output=True, text=True, check=True)
    return int(re.search(r"^#define DFQ_SIMD (\d+)$", r.stdout, re.M).group(1))


def _macros(n: int, kind: str) -> list[str]:
    return [kind] if n == 1 else [f"{kind}{i}" for i in range(n)]


def harness(lib, dump: bool = False, float_io: bool = False) -> str:
    """float_io: NAME_run_float on float32 samples instead of NAME_run on codes."""
    f, p, P = lib.facts, lib.prefix, lib.prefix.upper()
    ins, outs = f["inputs"], f["outputs"]
    ti = ["float" if float_io else f["tensors"][n]["ctype"] for n in ins]
    to = ["float" if float_io else f["tensors"][n]["ctype"] for n in outs]
    mi, mo = _macros(len(ins), "INPUT"), _macros(len(outs), "OUTPUT")
    decl = [f"static {t} in{i}[{P}_{m}_SIZE];" for i, (t, m) in enumerate(zip(ti, mi))] + \
           [f"static {t} out{i}[{P}_{m}_SIZE];" for i, (t, m) in enumerate(zip(to, mo))]
    read = " && ".join(f"fread(in{i}, sizeof in{i}[0], {P}_{m}_SIZE, stdin) == {P}_{m}_SIZE" for i, m in enumerate(mi))
    args = ", ".join([f"in{i}" for i in range(len(ins))] + [f"out{i}" for i in range(len(outs))])
    write = " ".join(f"fwrite(out{i}, sizeof out{i}[0], {P}_{m}_SIZE, stdout);" for i, m in enumerate(mo))
    if dump:
        write += f" fwrite({p}_arena, 1, {P}_ARENA_BYTES, stdout);"
    return f"""#include <stdio.h>
#include "{p}.h"
{chr(10).join(decl)}
int main(void) {{
    while ({read}) {{
        if ({p}_run{"_float" if float_io else ""}({args}) != 0) return 1;
        {write}
    }}
    return 0;
}}
"""


def build(lib, where: Path, flags=(), dump: bool = False, float_io: bool = False, cc=None) -> Path:
    """Write the library and the harness to `where` and compile them (STRICT warnings) into an
    executable (cc: another compiler, e.g. AARCH64_CC; its executables run under QEMU)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{lib.prefix}.c").write_text(lib.source)
    (where / f"{lib.prefix}.h").write_text(lib.header)
    (where / "main.c").write_text(harness(lib, dump, float_io))
    exe = where / ("run.aarch64" if cc is not None and cc == AARCH64_CC else "run")
    cmd = [cc or CC, *STRICT, *flags, "-o", str(exe), str(where / "main.c"), str(where / f"{lib.prefix}.c"), "-lm"]
    if any("THREADS" in f for f in flags):
        cmd.append("-pthread")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stderr[:4000]}")
    return exe


def run(lib, exe: Path, feeds: list[list[np.ndarray]], dump: bool = False, float_io: bool = False):
    """Run the executable on samples (each a list of input code arrays, one per graph input);
    returns per sample the output arrays (and the arena bytes with dump)."""
    f = lib.facts
    dtype = lambda n: np.float32 if float_io else DTYPES[f["tensors"][n]["ctype"]]  # noqa: E731
    stdin = b"".join(np.ascontiguousarray(a, dtype(n)).tobytes()
                     for sample in feeds for n, a in zip(f["inputs"], sample))
    cmd = [QEMU, "-L", AARCH64_SYSROOT, str(exe)] if exe.suffix == ".aarch64" else [str(exe)]
    r = subprocess.run(cmd, input=stdin, capture_output=True)
    if r.returncode:
        raise AssertionError(f"{exe} exited {r.returncode}:\n{r.stderr.decode()[:4000]}")
    buf, at, res = r.stdout, 0, []
    for _ in feeds:
        outs = []
        for n in f["outputs"]:
            t = f["tensors"][n]
            dt = np.dtype(dtype(n))
            size = int(np.prod(t["shape"]))
            outs.append(np.frombuffer(buf, dt, size, at).reshape(t["shape"]))
            at += size * dt.itemsize
        if dump:
            outs.append(buf[at:at + f["arena_bytes"]])
            at += f["arena_bytes"]
        res.append(outs)
    assert at == len(buf), (at, len(buf))
    return res


def tensor_from_arena(lib, arena: bytes, name: str) -> np.ndarray:
    t = lib.facts["tensors"][name]
    dt = np.dtype(DTYPES[t["ctype"]])
    return np.frombuffer(arena, dt, int(np.prod(t["shape"])), t["offset"]).reshape(t["shape"])
