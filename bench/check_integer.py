"""Check dfq_onnx's integer-only format (format="int") on ImageNet MobileNetV2 with real photos.

Loads CACHE/mobilenet_v2.onnx (built by bench/zoo.py, built here if missing), calibrates on 64
random 224 crops (+ random horizontal flips) of the scikit-image photos, and converts it with
format="int" and format="qdq". Then:
  * lists the op types of the integer model and checks no float Conv/Gemm remains;
  * compares requantization points with the number of unified modules;
  * bit-exactness: runs the integer model under onnxruntime (ORT_DISABLE_ALL and the default
    optimization level) with every module's integer input/residual/output exposed, and compares
    each module's output with the numpy reference dfq_onnx.fixedpoint.module_forward, exactly;
  * accuracy: top-1 agreement and logit SQNR (dB) of the int and qdq models vs the float model on
    evaluation crops drawn with seeds disjoint from calibration.
Exits 1 on any bit mismatch or if a float Conv/Gemm remains.

Usage: python bench/check_integer.py [--cache DIR] [--calib 64] [--exact-images 8] [--eval 40]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

CALIB_SEED = 0
EVAL_SEED = 10_000  # disjoint from CALIB_SEED


# --------------------------------------------------------------------------- data

def _resized(photos: dict[str, np.ndarray]):
    """Each photo as a PIL image resized (bilinear) so its shorter side is 256."""
    from PIL import Image

    out = []
    for img in photos.values():
        im = Image.fromarray(np.asarray(img)).convert("RGB")
        w, h = im.size
        scale = 256 / min(w, h)
        nw, nh = max(256, round(w * scale)), max(256, round(h * scale))
        out.append(im.resize((nw, nh), Image.BILINEAR))
    return out


def random_crops(resized, n: int, seed: int) -> np.ndarray:
    """n random 224 crops (each flipped horizontally with probability 1/2), cycling over the resized
    photos, normalised as zoo.imagenet_preprocess does (/255, ImageNet mean/std, CHW float32)."""
    rng = np.random.default_rng(seed)
    xs = []
    for i in range(n):
        im = resized[i % len(resized)]
        w, h = im.size
        left = int(rng.integers(0, w - 224 + 1))
        top = int(rng.integers(0, h - 224 + 1))
        a = np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = (a - zoo.IMAGENET_MEAN) / zoo.IMAGENET_STD
        xs.append(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))
    return np.stack(xs)


# --------------------------------------------------------------------------- onnxruntime

def session(model, level: str = "default"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if level == "disable":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, bs: int = 8) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])


def with_outputs(model, names: list[str]):
    import onnx

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def sqnr_db(f: np.ndarray, q: np.ndarray) -> float:
    f = f.astype(np.float64)
    err = float(np.sum((f - q.astype(np.float64)) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(f ** 2)) / err)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=zoo.DEFAULT_CACHE, help="cache folder (default bench/cache/)")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (default 64)")
    ap.add_argument("--exact-images", type=int, default=8, help="images for the bit-exactness check (default 8)")
    ap.add_argument("--eval", type=int, default=40, help="evaluation crops for agreement/SQNR (default 40)")
    args = ap.parse_args(argv)

    import dfq_onnx
    from dfq_onnx import QuantConfig
    from dfq_onnx.fixedpoint import module_forward
    from dfq_onnx.pipeline import run

    ok = True
    path = zoo.build_mobilenet_v2(args.cache)
    photos = zoo.skimage_photos()
    resized = _resized(photos)
    calib = random_crops(resized, args.calib, CALIB_SEED)
    evalx = random_crops(resized, args.eval, EVAL_SEED)
    exact = evalx[:args.exact_images]
    print(f"model                 {path}")
    print(f"photos                {len(photos)} ({', '.join(photos)})")
    print(f"calibration           {len(calib)} random 224 crops + flips (seed {CALIB_SEED})")
    print(f"evaluation            {len(evalx)} random 224 crops + flips (seed {EVAL_SEED}); "
          f"first {len(exact)} for bit-exactness")

    # ---- conversion
    t = time.perf_counter()
    ri = run(path, {"input": calib}, QuantConfig(format="int", num_samples=len(calib), batch_size=8))
    t_int = time.perf_counter() - t
    t = time.perf_counter()
    rq = run(path, {"input": calib}, QuantConfig(format="qdq", num_samples=len(calib), batch_size=8))
    t_qdq = time.perf_counter() - t
    print(f"convert int           {t_int:.1f} s ({ri.samples} samples)")
    print(f"convert qdq           {t_qdq:.1f} s ({rq.samples} samples)")

    # ---- structure
    info = dfq_onnx.inspect(ri.model)
    qinfo = dfq_onnx.inspect(rq.model)
    print("int op_types          " + ", ".join(f"{k} {v}" for k, v in info["op_types"].items()))
    floats = {op: info["op_types"].get(op, 0) for op in ("Conv", "Gemm", "MatMul", "ConvTranspose")}
    ints = {op: info["op_types"].get(op, 0) for op in ("ConvInteger", "MatMulInteger")}
    float_left = floats["Conv"] + floats["Gemm"]
    print(f"float linear ops      {floats}  -> {'none: OK' if not any(floats.values()) else 'FAIL'}")
    print(f"integer linear ops    {ints}")
    ok &= float_left == 0
    print(f"int   requant points  {info['requant_points']} vs modules {info['modules']} "
          f"(by kind {ri.requant_by_kind}; int_params {len(ri.int_params)}, float islands {info['float_islands']})")
    print(f"qdq   requant points  {qinfo['requant_points']} (+{qinfo['requant_lossless']} lossless) "
          f"vs modules {qinfo['modules']}; scales {qinfo['scales']}")
    print(f"per-layer scheme      {ri.per_layer_requant_points} requant points")

    # ---- bit-exactness
    names = []
    for p in ri.int_params:
        for k in ("int_input", "int_output", "int_residual"):
            if p.get(k) and p[k] not in names:
                names.append(p[k])
    probe = with_outputs(ri.model, names)
    for level in ("disable", "default"):
        sess = session(probe, level)
        outs = [o.name for o in sess.get_outputs()]
        t = time.perf_counter()
        vals = dict(zip(outs, sess.run(None, {"input": exact})))
        t_run = time.perf_counter() - t
        checked = bad = total = 0
        worst = []
        t = time.perf_counter()
        for p in ri.int_params:
            x = vals[p["int_input"]]
            r = vals[p["int_residual"]] if p.get("int_residual") else None
            ref = module_forward(p, x, r)
            got = vals[p["int_output"]]
            if ref.shape != got.shape:
                n_bad = got.size
                worst.append(f"{p['name']}: shape {got.shape} vs ref {ref.shape}")
            else:
                n_bad = int(np.sum(ref != got.astype(np.int64)))
                if n_bad:
                    worst.append(f"{p['name']} ({p['op']}): {n_bad} elems, max |d| "
                                 f"{int(np.abs(ref - got.astype(np.int64)).max())}")
            checked += 1
            bad += n_bad
            total += got.size
        t_ref = time.perf_counter() - t
        level_name = "ORT_DISABLE_ALL" if level == "disable" else "default opt"
        print(f"bit-exact {level_name:15} {checked} modules, {total} elements, {bad} mismatching "
              f"(ort {t_run:.2f} s, numpy ref {t_ref:.1f} s) -> {'OK' if bad == 0 else 'FAIL'}")
        for w in worst[:10]:
            print(f"    {w}")
        ok &= bad == 0 and checked == len(ri.int_params) > 0

    # ---- accuracy-ish
    f = run_batched(session(path), evalx)
    yi = run_batched(session(ri.model), evalx)
    yq = run_batched(session(rq.model), evalx)
    fa, ia, qa = f.argmax(1), yi.argmax(1), yq.argmax(1)
    n = len(evalx)
    print(f"top-1 agreement       float/int {int((fa == ia).sum())}/{n}, float/qdq {int((fa == qa).sum())}/{n}, "
          f"int/qdq {int((ia == qa).sum())}/{n}")
    print(f"logit SQNR            int {sqnr_db(f, yi):.2f} dB, qdq {sqnr_db(f, yq):.2f} dB, "
          f"int vs qdq {sqnr_db(yq, yi):.2f} dB")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
