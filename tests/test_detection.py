"""Box figures of validate (dfq_onnx/detection.py): each decoder finds the boxes a test plants in
synthetic outputs; COCO mAP (faster-coco-eval) follows IoU geometry; validate --decode yolo on a
small quantized detector equals the figure computed here from onnxruntime's outputs with this
file's own decoding; missing extra and bad labels give one-line errors."""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("faster_coco_eval")

from dfq_onnx import detection as D  # noqa: E402
from dfq_onnx.cli import main  # noqa: E402


def one_line_error(res, mention: str):
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert mention.lower() in res.stderr.lower(), res.stderr


def same_boxes(det, boxes, classes, atol=1e-3):
    b, s, c = det
    order = np.lexsort((b[:, 1], b[:, 0]))
    want = np.asarray(boxes, np.float64)
    w_order = np.lexsort((want[:, 1], want[:, 0]))
    assert len(b) == len(want), (b, want)
    np.testing.assert_allclose(b[order], want[w_order], atol=atol)
    np.testing.assert_array_equal(c[order], np.asarray(classes)[w_order])


# --------------------------------------------------------------------------- decoders

def test_yolov5_decoded_output_threshold_and_nms():
    C = 3
    y = np.zeros((2, 20, 5 + C), np.float32)  # K = 20 boxes: longer than 5 + C (else YOLOv8 layout)
    # sample 0: a box (class 2), a near duplicate with a lower score (suppressed), a low-score box (dropped)
    y[0, 0, :5], y[0, 0, 5 + 2] = [50, 40, 20, 10, 0.9], 1.0          # score 0.9
    y[0, 1, :5], y[0, 1, 5 + 2] = [51, 40, 20, 10, 0.8], 1.0          # IoU 0.9 with box 0: gone
    y[0, 2, :5], y[0, 2, 5 + 0] = [10, 10, 4, 4, 0.2], 1.0            # 0.2 < 0.25: gone
    y[0, 3, :5], y[0, 3, 5 + 1] = [51, 40, 20, 10, 0.8], 0.9          # same place, other class: kept
    # sample 1: one box
    y[1, 0, :5], y[1, 0, 5 + 0] = [100, 100, 30, 60, 0.5], 0.8       # 0.4
    dets = D.decode_yolo([y], (256, 256))
    same_boxes(dets[0], [[40, 35, 60, 45], [41, 35, 61, 45]], [2, 1])
    np.testing.assert_allclose(sorted(dets[0][1]), [0.72, 0.9], rtol=1e-6)
    same_boxes(dets[1], [[85, 70, 115, 130]], [0])


def test_yolov8_decoded_output():
    C, K = 2, 20
    y = np.zeros((1, 4 + C, K), np.float32)
    y[0, :4, 3], y[0, 4 + 1, 3] = [30, 30, 10, 20], 0.7
    y[0, :4, 7], y[0, 4 + 0, 7] = [80, 60, 8, 8], 0.3
    same_boxes(D.decode_yolo([y], (128, 128))[0], [[25, 20, 35, 40], [76, 56, 84, 64]], [1, 0])


@pytest.mark.parametrize("logits", [False, True])
def test_yolov5_raw_heads(logits):
    """Grid heads [N, 3(5+C), H, W] at strides 8 and 16 (YOLOv5 anchors P3, P4); the test inverts
    YOLOv5's decoding to plant two boxes, one per head."""
    C, hw = 2, (64, 64)
    heads = [np.full((1, 3, 5 + C, 8, 8), 0.01), np.full((1, 3, 5 + C, 4, 4), 0.01)]  # strides 8, 16
    planted = []

    def plant(h, stride, a, gy, gx, box, cls, anchor):
        cx, cy, w, ht = box
        v = heads[h][0, a, :, gy, gx]
        v[0], v[1] = (cx / stride - gx + 0.5) / 2, (cy / stride - gy + 0.5) / 2
        v[2], v[3] = np.sqrt(w / anchor[0]) / 2, np.sqrt(ht / anchor[1]) / 2
        v[4], v[5 + cls] = 0.9, 0.9
        planted.append(([cx - w / 2, cy - ht / 2, cx + w / 2, cy + ht / 2], cls))

    plant(0, 8, 1, 3, 5, (45.0, 27.0, 20.0, 36.0), 1, (16, 30))
    plant(1, 16, 2, 1, 2, (40.0, 20.0, 60.0, 100.0), 0, (59, 119))
    outs = [h.reshape(1, -1, h.shape[3], h.shape[4]) for h in heads]
    outs = outs[::-1]  # head order must not matter: strides come from the grid sizes
    if logits:
        outs = [np.log(o / (1 - o)) for o in outs]
    dets = D.decode_yolo(outs, hw, sigmoid=[logits, logits])
    clipped = np.clip([b for b, _ in planted], 0, 64)  # the second box reaches above the image (y -30)
    same_boxes(dets[0], clipped, [c for _, c in planted])
    np.testing.assert_allclose(sorted(dets[0][1]), [0.81, 0.81], rtol=1e-5)


def test_picodet_heads_and_layout():
    """PicoDet: per stride a score output [N,HW,C] and a distribution output [N,HW,4x8]; planted
    distances are one-hot bins, so the DFL expectation is the bin (times the stride)."""
    hw, C, R = (64, 48), 3, 7
    strides = [8, 16, 32]
    scores, dists = [], []
    planted = []
    for s in strides:
        h, w = -(-hw[0] // s), -(-hw[1] // s)
        scores.append(np.full((1, h * w, C), 0.01, np.float32))
        d = np.zeros((1, h * w, 4, R + 1), np.float32)
        d[..., 0] = 30.0  # every distance 0 unless planted
        dists.append(d)
    for si, (cell_y, cell_x), ltrb, cls in [(0, (2, 3), (1, 2, 3, 1), 2), (2, (1, 0), (0, 1, 1, 1), 0)]:
        s = strides[si]
        w = -(-hw[1] // s)
        k = cell_y * w + cell_x
        scores[si][0, k, cls] = 0.8
        dists[si][0, k] = 0
        dists[si][0, k, np.arange(4), list(ltrb)] = 30.0
        cx, cy = (cell_x + 0.5) * s, (cell_y + 0.5) * s
        planted.append(([cx - ltrb[0] * s, cy - ltrb[1] * s, cx + ltrb[2] * s, cy + ltrb[3] * s], cls))
    outs = scores + [d.reshape(1, d.shape[1], -1) for d in dists]
    layout = D.picodet_layout([o.shape for o in outs], hw)
    assert layout == [(0, 3, 8), (1, 4, 16), (2, 5, 32)]
    # told apart by the graph (Sigmoid) when the class count is a multiple of 4 too
    assert D.picodet_layout([o.shape for o in outs[3:] + outs[:3]], hw, [False] * 3 + [True] * 3) == \
        [(3, 0, 8), (4, 1, 16), (5, 2, 32)]
    dets = D.decode_picodet(outs, hw)
    clipped = np.clip([b for b, _ in planted], 0, [48, 64, 48, 64])  # the second box reaches y 80 > 64
    same_boxes(dets[0], clipped, [c for _, c in planted])


@pytest.mark.parametrize("scipy_available", [True, False])
def test_dbnet_components(monkeypatch, scipy_available):
    if not scipy_available:
        monkeypatch.setitem(sys.modules, "scipy", None)
    m = np.full((1, 1, 40, 60), 0.05, np.float32)
    m[0, 0, 5:15, 10:30] = 0.9      # 20 x 10 text line
    m[0, 0, 20:30, 40:44] = 0.8     # 4 x 10
    m[0, 0, 30, 44] = 0.8           # touches the one above diagonally: same component (8-connected)
    m[0, 0, 35:37, 2:4] = 0.9       # 2 x 2: below min_size, dropped
    m[0, 0, 2:6, 50:58] = 0.35      # above the mask threshold but mean score 0.35 < 0.5: dropped
    dets = D.decode_dbnet([m], (40, 60), unclip_ratio=0.0)
    same_boxes(dets[0], [[10, 5, 30, 15], [40, 20, 45, 31]], [0, 0])
    # unclip: each side grows by area x ratio / perimeter; on an input twice the map's size
    dets = D.decode_dbnet([m[:, :, :18]], (36, 120), unclip_ratio=0.6)
    d = 20 * 10 * 0.6 / (2 * 30)
    same_boxes(dets[0], [[(10 - d) * 2, (5 - d) * 2, (30 + d) * 2, (15 + d) * 2]], [0])
    # boxes are clipped to the input
    dets = D.decode_dbnet([m[:, :, :16]], (32, 120), unclip_ratio=1.5)
    d = 20 * 10 * 1.5 / (2 * 30)
    same_boxes(dets[0], [[(10 - d) * 2, 0, (30 + d) * 2, 32]], [0])


# --------------------------------------------------------------------------- mAP

def boxes_grid(n_img=4, per=5, size=20.0):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_img):
        xy = rng.uniform(0, 200, (per, 2)) + np.arange(per)[:, None] * 300  # far apart
        out.append((np.concatenate([xy, xy + size], 1), rng.integers(0, 3, per)))
    return out


def test_map_of_itself_is_one():
    truth = boxes_grid()
    dets = [(b, np.linspace(0.9, 0.5, len(b)), c) for b, c in truth]
    assert D.coco_map(truth, dets) == {"map50": pytest.approx(1.0), "map": pytest.approx(1.0)}


@pytest.mark.parametrize("shift", [2.0, 4.0, 6.0, 8.0, 12.0])
def test_map_of_shifted_boxes_follows_iou(shift):
    """Every detection is its truth box moved right by `shift` (20-pixel boxes): IoU =
    (20 - shift) / (20 + shift), so AP is 1 at the COCO thresholds up to that IoU and 0 above."""
    truth = boxes_grid(size=20.0)
    dets = [(b + [shift, 0, shift, 0], np.full(len(b), 0.9), c) for b, c in truth]
    iou = (20 - shift) / (20 + shift)
    thresholds = np.linspace(0.5, 0.95, 10)
    r = D.coco_map(truth, dets)
    assert r["map50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)
    assert r["map"] == pytest.approx(np.mean(thresholds <= iou))


def test_map_wrong_class_and_missing_detections():
    truth = [(b, np.zeros(len(b), np.int64)) for b, _ in boxes_grid(n_img=2, per=4)]  # one class
    half = [(b[:2], np.full(2, 0.9), c[:2]) for b, c in truth]  # half the boxes found, none wrong
    # precision 1 up to recall 0.5: 51 of COCO's 101 recall points (0, 0.01, ..., 1)
    assert D.coco_map(truth, half) == {"map50": pytest.approx(51 / 101), "map": pytest.approx(51 / 101)}
    wrong = [(b, np.full(len(b), 0.9), c + 1) for b, c in truth]
    assert D.coco_map(truth, wrong)["map50"] == 0.0
    assert D.coco_map([(np.zeros((0, 4)), np.zeros(0))], [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))]) == \
        {"map50": None, "map": None}


# --------------------------------------------------------------------------- end to end

def tiny_yolo(path, classes=2):
    """Conv net 3x32x32 -> two heads [N, 3(5+C), 8, 8] and [N, 3(5+C), 4, 4], each ending in a Sigmoid."""
    rng = np.random.default_rng(1)
    ch = 3 * (5 + classes)

    def w(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [w("w1", 8, 3, 3, 3), w("b1", 8, scale=0.1), w("w2", 16, 8, 3, 3), w("b2", 16, scale=0.1),
             w("w3", 16, 16, 3, 3, scale=0.2), w("b3", 16, scale=0.1),
             w("h1", ch, 16, 1, 1), w("hb1", ch, scale=0.5), w("h2", ch, 16, 1, 1), w("hb2", ch, scale=0.5)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "h1", "hb1"], ["o1"]),
             helper.make_node("Sigmoid", ["o1"], ["head_s4"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("Conv", ["r3", "h2", "hb2"], ["o2"]),
             helper.make_node("Sigmoid", ["o2"], ["head_s8"])]
    g = helper.make_graph(nodes, "tiny_yolo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("head_s4", TensorProto.FLOAT, ["n", ch, 8, 8]),
                           helper.make_tensor_value_info("head_s8", TensorProto.FLOAT, ["n", ch, 4, 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def reference_yolo(heads, input_hw, conf, iou, anchors):
    """This test's own decoding of sigmoided YOLOv5 grid heads: plain loops, boxes clipped to the
    image, then greedy per-class NMS."""
    res = []
    n = heads[0].shape[0]
    for i in range(n):
        cand = []
        for head, anc in zip(sorted(heads, key=lambda h: -h.shape[2]), anchors):
            _, ch, h, w = head.shape
            k = ch // 3
            stride_y, stride_x = input_hw[0] / h, input_hw[1] / w
            for a in range(3):
                for gy in range(h):
                    for gx in range(w):
                        v = head[i, a * k:(a + 1) * k, gy, gx].astype(np.float64)
                        cls = int(np.argmax(v[5:]))
                        score = v[4] * v[5 + cls]
                        cx, cy = (2 * v[0] - 0.5 + gx) * stride_x, (2 * v[1] - 0.5 + gy) * stride_y
                        bw, bh = (2 * v[2]) ** 2 * anc[a][0], (2 * v[3]) ** 2 * anc[a][1]
                        if score > conf:  # clipped to the image, as YOLOv5 does
                            box = [min(max(v, 0.0), lim) for v, lim in zip(
                                [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], [input_hw[1], input_hw[0]] * 2)]
                            if box[2] > box[0] and box[3] > box[1]:  # not empty once clipped
                                cand.append((score, cls, box))
        cand.sort(key=lambda t: -t[0])  # stable: ties keep the order above
        kept = []
        for sc, cl, b in cand:
            if len(kept) == 100:
                break
            if all(k[1] != cl or box_iou(b, k[2]) <= iou for k in kept):
                kept.append((sc, cl, b))
        res.append((np.array([k[2] for k in kept]).reshape(-1, 4), np.array([k[0] for k in kept]),
                    np.array([k[1] for k in kept], np.int64)))
    return res


def box_iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / max((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter, 1e-12)  # clipped: may be empty


def faster_coco_map(truth, dets):
    """mAP straight from faster-coco-eval's API (not through dfq_onnx.detection)."""
    from faster_coco_eval import COCO, COCOeval_faster

    anns = [{"id": k + 1, "image_id": i, "category_id": int(c), "iscrowd": 0,
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
            for k, (i, b, c) in enumerate((i, b, c) for i, (bs, cs) in enumerate(truth) for b, c in zip(bs, cs))]
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(truth))], "annotations": anns,
                  "categories": [{"id": c} for c in range(2)]}
    gt.createIndex()
    res = [{"image_id": i, "category_id": int(c), "score": float(s), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
           for i, (bs, ss, cs) in enumerate(dets) for b, s, c in zip(bs, ss, cs)]
    ev = COCOeval_faster(gt, gt.loadRes(res), iouType="bbox", print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import dfq_onnx

    d = tmp_path_factory.mktemp("det")
    fp = tiny_yolo(d / "f.onnx")
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (24, 3, 32, 32)).astype(np.float32)
    np.savez(d / "data.npz", x=x)
    qp = d / "q.onnx"
    onnx.save(dfq_onnx.convert(str(fp), {"x": rng.uniform(-1, 1, (32, 3, 32, 32)).astype(np.float32)}), str(qp))
    return d, fp, qp, x


def run(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_validate_decode_yolo_end_to_end(tiny):
    d, fp, qp, x = tiny
    res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"), "--decode", "yolo",
                                    "--runs", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)["detection"]
    yf, yq = run(fp, x), run(qp, x)
    F = reference_yolo_heads(yf)
    Q = reference_yolo_heads(yq)
    assert sum(len(s) for _, s, _ in F) > 0
    m50, m = faster_coco_map([(b, c) for b, _, c in F], Q)
    assert r["vs_float"]["map50"] == pytest.approx(m50, abs=1e-9)
    assert r["vs_float"]["map"] == pytest.approx(m, abs=1e-9)
    assert 0 <= r["vs_float"]["map"] <= r["vs_float"]["map50"] <= 1
    assert r["detections_per_image"]["float"] == pytest.approx(np.mean([len(s) for _, s, _ in F]))
    assert r["detections_per_image"]["quant"] == pytest.approx(np.mean([len(s) for _, s, _ in Q]))
    assert r["vs_labels"] is None and r["simulated"]["vs_float"]["map50"] is not None
    # the float model against itself
    res = CliRunner().invoke(main, ["validate", str(fp), str(fp), "--data", str(d / "data.npz"), "--decode", "yolo",
                                    "--runs", "1", "--json"])
    assert json.loads(res.stdout)["detection"]["vs_float"] == {"map50": 1.0, "map": 1.0}
    # the table
    res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"), "--decode", "yolo",
                                    "--runs", "1"])
    assert res.exit_code == 0 and "mAP@0.5 vs float detections" in res.stdout and "detections per image" in res.stdout


def reference_yolo_heads(outs):
    """YOLOv5's anchors (pixels) for its two finest heads, given to the heads by ascending stride."""
    return reference_yolo(outs, (32, 32), 0.25, 0.45, [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)]])


def test_validate_with_coco_and_kitti_labels(tiny, tmp_path):
    """Labels written from the float model's own detections: the float model scores 1.0 against
    them, and the quantized model's figures equal its figures against the float detections."""
    d, fp, qp, x = tiny
    F = reference_yolo_heads(run(fp, x))
    images = [{"id": 100 + 7 * i, "file_name": f"{i}.jpg"} for i in range(len(F))]
    anns = [{"id": len(images) + k, "image_id": 100 + 7 * i, "category_id": 10 + 5 * int(c), "iscrowd": 0,
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for i, (bs, _, cs) in enumerate(F) for k, (b, c) in enumerate(zip(bs, cs))]
    for k, a in enumerate(anns):
        a["id"] = k + 1
    (tmp_path / "l.json").write_text(json.dumps({"images": images[::-1][::-1], "annotations": anns[::-1],
                                                  "categories": [{"id": 15, "name": "b"}, {"id": 10, "name": "a"}]}))
    kitti = tmp_path / "kitti"
    kitti.mkdir()
    for i, (bs, _, cs) in enumerate(F):
        (kitti / f"{i:06d}.txt").write_text("".join(
            f"{['Car', 'Pedestrian'][c]} 0.00 0 -1 {b[0]:.6f} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f} 1 1 1 0 0 0 0\n"
            for b, c in zip(bs, cs)) + "DontCare -1 -1 -10 1 1 5 5 -1 -1 -1 -1000 -1000 -1000 -10\n")
    for labels, extra in [(tmp_path / "l.json", []), (kitti, ["--label-classes", "Car,Pedestrian"])]:
        res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"), "--decode",
                                        "yolo", "--labels", str(labels), "--runs", "1", "--json", *extra])
        assert res.exit_code == 0, res.output
        r = json.loads(res.stdout)["detection"]
        assert r["vs_labels"]["float"]["map50"] == pytest.approx(1.0)
        assert r["vs_labels"]["float"]["map"] == pytest.approx(1.0, abs=1e-4)  # KITTI text keeps 6 decimals
        assert r["vs_labels"]["quant"]["map50"] == pytest.approx(r["vs_float"]["map50"], abs=1e-3)


def test_postprocess_function(tiny, tmp_path, monkeypatch):
    d, fp, qp, x = tiny
    (tmp_path / "mypost.py").write_text(
        "import numpy as np\n"
        "def boxes(outs):\n"
        "    n = len(outs[0])\n"
        "    return [(np.array([[0, 0, 10 + 4 * float(outs[0][i, 0, 0, 0]), 10]]), np.array([0.9]), np.array([0]))"
        " for i in range(n)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = CliRunner().invoke(main, ["validate", str(fp), str(fp), "--data", str(d / "data.npz"),
                                    "--postprocess", "mypost:boxes", "--runs", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)["detection"]
    assert r["vs_float"] == {"map50": 1.0, "map": 1.0} and r["detections_per_image"]["float"] == 1.0


# --------------------------------------------------------------------------- errors

def test_missing_extra_is_one_line(tiny, monkeypatch):
    d, fp, qp, x = tiny
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"), "--decode", "yolo",
                                    "--runs", "1"])
    one_line_error(res, "pip install 'dfq-onnx[detect]'")


def test_bad_box_labels_are_one_line(tiny, tmp_path):
    d, fp, qp, x = tiny
    n = len(x)
    kitti_few = tmp_path / "few"
    kitti_few.mkdir()
    (kitti_few / "0.txt").write_text("")
    kitti_bad = tmp_path / "bad"
    kitti_bad.mkdir()
    for i in range(n):
        (kitti_bad / f"{i:03d}.txt").write_text("Car 0 0 0 1 2 x 4 1 1 1 0 0 0 0\n" if i == 3 else "")
    cases = {
        "notjson.json": ("{not json", "not a COCO JSON file"),
        "noann.json": (json.dumps({"images": []}), "no \"annotations\""),
        "count.json": (json.dumps({"images": [{"id": 1}], "annotations": []}), f"1 images for {n} samples"),
        "badann.json": (json.dumps({"annotations": [{"image_id": 0}]}), "without image_id, category_id and bbox"),
        "badid.json": (json.dumps({"annotations": [{"image_id": 999, "category_id": 0, "bbox": [0, 0, 1, 1]}]}),
                       "image id 999"),
        "badcat.json": (json.dumps({"annotations": [{"image_id": 0, "category_id": 7, "bbox": [0, 0, 1, 1]}],
                                    "categories": [{"id": 1}]}), "category id 7"),
    }
    for name, (text, mention) in cases.items():
        (tmp_path / name).write_text(text)
        res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"),
                                        "--decode", "yolo", "--labels", str(tmp_path / name), "--runs", "1"])
        one_line_error(res, mention)
    for folder, mention in [(kitti_few, f"1 KITTI label files (.txt) for {n} samples"),
                            (kitti_bad, "003.txt:1: not a KITTI label line"),
                            (tmp_path / "missing.json", "no such labels file")]:
        res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"),
                                        "--decode", "yolo", "--labels", str(folder), "--runs", "1"])
        one_line_error(res, mention)
    # box labels without a decoder; a decoder that does not fit the outputs; a bad --postprocess
    res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"),
                                    "--labels", str(tmp_path / "count.json"), "--runs", "1"])
    one_line_error(res, "need --decode or --postprocess")
    res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"),
                                    "--decode", "picodet", "--runs", "1"])
    one_line_error(res, "--decode picodet")
    res = CliRunner().invoke(main, ["validate", str(fp), str(qp), "--data", str(d / "data.npz"),
                                    "--postprocess", "no_such_module_here:f", "--runs", "1"])
    one_line_error(res, "cannot import no_such_module_here")
