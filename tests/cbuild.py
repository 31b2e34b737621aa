"""Build and run a generated C library (passes/emit_c.py) with the system C compiler.

The harness (written here, not by the generator) reads samples of input codes from stdin, calls
NAME_run on each and writes the output codes, then (dump=True) the whole arena, to stdout."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

CC = shutil.which("cc") or shutil.which("gcc")
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]
OPTIMIZE = ["-O3", "-march=native"]  # the vectorizer too: gcc 12 once miscompiled a form that -O0/-O1 ran right
DTYPES = {"int8_t": np.int8, "uint8_t": np.uint8, "int32_t": np.int32}


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


def build(lib, where: Path, flags=(), dump: bool = False, float_io: bool = False) -> Path:
    """Write the library and the harness to `where` and compile them (STRICT warnings) into an executable."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{lib.prefix}.c").write_text(lib.source)
    (where / f"{lib.prefix}.h").write_text(lib.header)
    (where / "main.c").write_text(harness(lib, dump, float_io))
    exe = where / "run"
    cmd = [CC, *STRICT, *flags, "-o", str(exe), str(where / "main.c"), str(where / f"{lib.prefix}.c"), "-lm"]
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
    r = subprocess.run([str(exe)], input=stdin, capture_output=True)
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
