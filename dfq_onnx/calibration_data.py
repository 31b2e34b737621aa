"""Calibration and evaluation data: readers that yield batches of model inputs, checked.

Accepted sources: a .npz file (keys = input names, arrays N x ...; an optional `labels` array),
a folder of .npy files (single-input models; each file one sample or a batch), a folder of images
(with a preprocessing spec), a dict of arrays, an iterable of input dicts, or an onnxruntime
CalibrationDataReader (anything with get_next()). Batches are produced lazily, so memory does not
grow with the number of samples (an .npz saved uncompressed is memory-mapped: npz_arrays), and
each batch is checked against the model's inputs: names, ranks, fixed dimensions, dtypes (float
data for a float input; an integer or bool input takes its own type), finite values.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .errors import DfqError
from .fixedpoint import all_finite

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints, or None for a dynamic dimension

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0 else None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        # exporters write an unknown dim as a dim_param, nothing, or a dim_value of -1 (or 0)
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image file into a model input."""
    resize: int | None = None      # shorter side resized to this before the centre crop
    size: tuple[int, int] | None = None  # (H, W) crop; default: the model's input size
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0             # pixel range: 1.0 -> [0, 1]; 255 -> [0, 255]
    layout: str | None = None      # NCHW or NHWC; default: from the model's input shape
    color: str = "RGB"             # RGB, BGR or L (grayscale)

    @classmethod
    def parse(cls, spec: str | None) -> "Preprocess":
        """Parse "resize=256 size=224 mean=0.485,0.456,0.406 std=... scale=1 layout=NCHW color=RGB"."""
        if not spec:
            return cls()
        kw: dict = {}
        for part in re.split(r"[\s;]+", spec.strip()):
            if not part:
                continue
            if "=" not in part:
                raise DfqError(f"--preprocess: expected key=value, got {part!r}")
            k, v = part.split("=", 1)
            k = k.strip().lower()
            try:
                if k == "resize":
                    kw["resize"] = int(v)
                elif k in ("size", "crop"):
                    hw = [int(x) for x in v.replace("x", ",").split(",")]
                    kw["size"] = (hw[0], hw[-1])
                elif k in ("mean", "std"):
                    kw[k] = tuple(float(x) for x in v.split(","))
                elif k == "scale":
                    kw["scale"] = float(v)
                elif k == "layout":
                    if v.upper() not in ("NCHW", "NHWC"):
                        raise ValueError
                    kw["layout"] = v.upper()
                elif k == "color":
                    if v.upper() not in ("RGB", "BGR", "L"):
                        raise ValueError
                    kw["color"] = v.upper()
                else:
                    raise DfqError(f"--preprocess: unknown key {k!r} (resize, size, mean, std, scale, layout, color)")
            except (ValueError, IndexError):
                raise DfqError(f"--preprocess: bad value for {k}: {v!r}") from None
        if "std" in kw and any(s == 0 for s in kw["std"]):
            raise DfqError("--preprocess: std must not be zero")
        return cls(**kw)


def load_image(path: Path, spec: InputSpec, pre: Preprocess) -> np.ndarray:
    """One image as a model input of shape spec.shape[1:] (batch dim added by the caller)."""
    from PIL import Image

    if len(spec.shape) != 4:
        raise DfqError(f"input {spec.name!r} has rank {len(spec.shape)}; images need a 4-D input")
    layout = pre.layout or ("NHWC" if spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3) else "NCHW")
    c = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    hw = pre.size or ((spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2]))
    if any(not isinstance(d, int) for d in hw):
        raise DfqError("the model's image size is dynamic: pass --preprocess size=HxW")
    try:
        img = Image.open(path)
        img = img.convert("L" if (c == 1 or pre.color == "L") else "RGB")
    except Exception as e:
        raise DfqError(f"{path}: cannot read image ({e})") from None
    if pre.resize:
        w, h = img.size
        r = pre.resize / min(w, h)
        img = img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.BILINEAR)
    else:
        img = img.resize((hw[1], hw[0]), Image.BILINEAR)
    w, h = img.size
    top, left = max(0, (h - hw[0]) // 2), max(0, (w - hw[1]) // 2)
    img = img.crop((left, top, left + hw[1], top + hw[0]))
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if pre.color == "BGR":
        a = a[:, :, ::-1]
    a = a / 255.0 * pre.scale
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    a = (a - mean) / std
    return np.ascontiguousarray(a.transpose(2, 0, 1) if layout == "NCHW" else a).astype(spec.dtype)


def label_from_name(path: Path) -> int | None:
    """The integer label in a file name such as name_LABEL.jpg, if any."""
    m = re.search(r"_(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def check_batch(batch: dict, specs: list[InputSpec], where: str, casts: dict | None = None) -> dict[str, np.ndarray]:
    """Validate one batch against the model inputs; return it as float arrays of the input dtype.
    casts: input name -> (the data's dtype, the model's) is recorded there for every input whose
    data had to be cast (float64 or float16 data for a float32 input, integers, ...)."""
    if not isinstance(batch, dict):
        raise DfqError(f"{where}: expected a dict of input name -> array, got {type(batch).__name__}")
    names = {s.name for s in specs}
    missing = names - set(batch)
    if missing:
        raise DfqError(f"{where}: missing model input(s) {sorted(missing)} (has {sorted(batch)})")
    out = {}
    for s in specs:
        a = np.asarray(batch[s.name])
        if a.dtype != s.dtype and (a.dtype.kind not in "fiu" or (s.dtype.kind == "f" and a.dtype.kind != "f")):
            raise DfqError(f"{where}: input {s.name!r} has dtype {a.dtype}, model expects {s.dtype}")
        if a.ndim != len(s.shape):
            raise DfqError(f"{where}: input {s.name!r} has shape {a.shape}, model expects rank "
                           f"{len(s.shape)} {_fmt_shape(s.shape)}")
        for d, (have, want) in enumerate(zip(a.shape, s.shape)):
            if d == 0:
                continue
            if want is not None and have != want:
                raise DfqError(f"{where}: input {s.name!r} has shape {a.shape}, model expects {_fmt_shape(s.shape)}")
        if a.dtype.kind == "f" and not all_finite(a):
            raise DfqError(f"{where}: input {s.name!r} contains NaN or Inf")
        if casts is not None and a.dtype != s.dtype:
            casts[s.name] = (str(a.dtype), str(np.dtype(s.dtype)))
        out[s.name] = a.astype(s.dtype, copy=False)
    return out


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def npz_member(path: Path, key: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo] | None:
    """The open .npz (a zip file) and array `key`'s member in it; None (closed) when it has none."""
    z = zipfile.ZipFile(path)
    try:
        return z, z.getinfo(f"{key}.npy")
    except KeyError:
        z.close()
        return None


def npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream f, which is left at the array's data."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    return read(f)


def stored_data_start(raw, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) zip member's bytes start in the zip file `raw` (opened
    binary): after its local header, whose name and extra field lengths may differ from the
    central directory's."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError("bad local zip header")
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, as np.load(path, allow_pickle=False) reads them, except that an
    array stored uncompressed (np.savez) in C order is a read-only memory map of the file: it is
    not copied into memory, only the rows a conversion uses are read from disk, and the operating
    system may drop its pages under memory pressure. (np.load ignores mmap_mode for .npz.) The
    zip's checksum is not verified for mapped arrays; their values are checked as every batch is
    (finite, dtype, shape)."""
    out = {}
    with np.load(path, allow_pickle=False) as z, open(path, "rb") as raw:
        infos = {i.filename: i for i in z.zip.infolist()}
        for key in z.files:
            info = infos.get(f"{key}.npy")
            a = None
            if info is not None and info.compress_type == zipfile.ZIP_STORED:
                try:
                    start = stored_data_start(raw, info)
                    raw.seek(start)
                    shape, fortran, dtype = npy_header(raw)
                    if not fortran and not dtype.hasobject and all(shape) and \
                            raw.tell() - start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= info.file_size:
                        a = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape).view(np.ndarray)
                except Exception:  # not what np.savez writes: read it as np.load does (and fails)
                    a = None
            out[key] = z[key] if a is None else a
    return out


class DataSource:
    """A re-iterable source of model inputs (and labels, when the source has them)."""

    def __init__(self, src, specs: list[InputSpec], *, num_samples: int | None = None,
                 preprocess: str | Preprocess | None = None):
        if num_samples is not None and num_samples < 1:
            raise DfqError("--num-samples must be at least 1")
        self.specs = specs
        self.num_samples = num_samples
        self.pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.parse(preprocess)
        self.src = src
        self.where = "calibration data"
        self.casts: dict[str, tuple[str, str]] = {}  # input -> (data dtype, model dtype) where data was cast
        self._kind = self._classify(src)

    def _classify(self, src) -> str:
        if isinstance(src, (str, Path)):
            p = Path(src)
            self.where = str(p)
            if not p.exists():
                raise DfqError(f"{p}: no such file or folder")
            if p.is_file():
                if p.suffix.lower() == ".npz":
                    try:
                        self._npz = npz_arrays(p)
                    except Exception as e:
                        raise DfqError(f"{p}: not a readable .npz file ({e})") from None
                    return "npz"
                if p.suffix.lower() == ".npy":
                    self._files = [p]
                    return "npy"
                raise DfqError(f"{p}: expected a .npz file or a folder of .npy files or images")
            files = sorted(f for f in p.iterdir() if f.is_file())
            npys = [f for f in files if f.suffix.lower() == ".npy"]
            imgs = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            if npys:
                self._files = npys
                return "npy"
            if imgs:
                self._files = imgs
                return "images"
            raise DfqError(f"{p}: folder has no .npy files or images")
        if isinstance(src, dict):
            self._npz = {k: np.asarray(v) for k, v in src.items()}
            return "npz"
        if hasattr(src, "get_next"):
            return "reader"
        if isinstance(src, Iterable):
            return "iterable"
        raise DfqError(f"unsupported calibration data of type {type(src).__name__}")

    def __len__(self) -> int:
        """Number of samples that iteration will yield (an upper bound for readers)."""
        if self._kind == "npz":
            n = min((len(self._npz[s.name]) for s in self.specs if s.name in self._npz), default=0)
        elif self._kind in ("npy", "images"):
            n = len(self._files)
        else:
            n = self.num_samples or 0
        return min(n, self.num_samples) if self.num_samples else n

    @property
    def labels(self) -> np.ndarray | None:
        if self._kind == "npz" and "labels" in self._npz:
            return np.asarray(self._npz["labels"]).reshape(-1)[: len(self)]
        if self._kind == "images":
            labels = [label_from_name(f) for f in self._files[: len(self)]]
            return None if any(x is None for x in labels) else np.asarray(labels)
        return None

    def _samples(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of arrays with a leading batch dimension (any size)."""
        if self._kind == "npz":
            missing = [s.name for s in self.specs if s.name not in self._npz]
            if missing:
                raise DfqError(f"{self.where}: missing model input(s) {missing} "
                               f"(arrays in the data: {sorted(k for k in self._npz)})")
            rows = slice(self.num_samples)  # the rows used, alone checked (and, mapped, read)
            arrays = {s.name: self._npz[s.name] for s in self.specs}
            yield {k: a[rows] if a.ndim else a for k, a in arrays.items()}
        elif self._kind == "npy":
            if len(self.specs) != 1:
                raise DfqError(f"{self.where}: a folder of .npy files only works for single-input models; use .npz")
            s = self.specs[0]
            for f in self._files:
                try:
                    a = np.load(f, allow_pickle=False)
                except Exception as e:
                    raise DfqError(f"{f}: not a readable .npy file ({e})") from None
                yield {s.name: a[None] if a.ndim == len(s.shape) - 1 else a}
        elif self._kind == "images":
            if len(self.specs) != 1:
                raise DfqError(f"{self.where}: a folder of images only works for single-input models")
            s = self.specs[0]
            for f in self._files:
                yield {s.name: load_image(f, s, self.pre)[None]}
        elif self._kind == "reader":
            self.src.rewind() if hasattr(self.src, "rewind") else None
            while True:
                item = self.src.get_next()
                if item is None:
                    return
                yield item
        else:
            for item in self.src:
                yield item

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Checked batches of at most batch_size samples, num_samples in all. A model whose batch
        dim is fixed (an input [4, 3, H, W]) gets batches of exactly that size instead: leftover
        samples that do not fill one are dropped."""
        if batch_size < 1:
            raise DfqError("--batch-size must be at least 1")
        fixed = self.fixed_batch
        batch_size = fixed or batch_size
        limit = self.num_samples
        buf: list[dict[str, np.ndarray]] = []
        buf_n = done = 0
        for item in self._samples():
            item = check_batch(item, self.specs, self.where, self.casts)
            n = _rows(item)
            if limit is not None and done + buf_n + n > limit:
                n = limit - done - buf_n
                item = {k: v[:n] for k, v in item.items()}
            buf.append(item)
            buf_n += n
            while buf_n >= batch_size:
                merged = _concat(buf)
                yield {k: v[:batch_size] for k, v in merged.items()}
                done += batch_size
                buf_n -= batch_size
                buf = [{k: v[batch_size:] for k, v in merged.items()}] if buf_n else []
            if limit is not None and done + buf_n >= limit:
                break
        if buf_n and not fixed:
            done += buf_n
            yield _concat(buf)
        if done == 0 and buf_n:
            raise DfqError(f"{self.where}: the model takes batches of exactly {fixed} samples (its input's batch dim "
                           f"is fixed) and the data has only {buf_n}")
        if done == 0:
            raise DfqError(f"{self.where}: no samples")

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model's inputs fix, if any (None: a dynamic batch dim)."""
        return next((s.fixed_batch for s in self.specs if s.fixed_batch is not None), None)


def first_samples(batches: list[dict[str, np.ndarray]], n: int, whole: bool = False) -> list[dict[str, np.ndarray]]:
    """The leading batches holding the first n samples (the last one cut to size, unless `whole`:
    a model with a fixed batch dim takes whole batches only)."""
    out, have = [], 0
    for b in batches:
        if have >= n:
            break
        k = _rows(b) if whole else min(_rows(b), n - have)
        out.append({name: v[:k] for name, v in b.items()})
        have += k
    return out


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
