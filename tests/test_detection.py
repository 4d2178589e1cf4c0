"""Detection support: the generated digits-detection set, the COCO loader, decode + NMS, COCO mAP
(must equal pycocotools' COCOeval), box-level parity and the zoo detector."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qatcheck.data import digit_detection as dd
from qatcheck.data.coco import CocoDataset
from qatcheck.errors import ArtifactError, DataError
from qatcheck.tasks.detection import (BoxAgreement, CenterNetDecoder, DetectionTask, Detections, coco_evaluate, nms,
                                      to_original)


# ---- generated set ----------------------------------------------------------------------------
def test_generator_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dd, "COUNTS", {"train": 12, "val": 6})
    a, b = (dd.ensure_split("val", tmp_path / r) for r in ("a", "b"))
    assert (a / "instances.json").read_bytes() == (b / "instances.json").read_bytes()
    for png in sorted((a / "images").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(b / "images" / png.name)))
    # a complete set is reused, an incomplete one regenerated
    stamp = (a / "instances.json").stat().st_mtime_ns
    assert dd.ensure_split("val", tmp_path / "a") == a and (a / "instances.json").stat().st_mtime_ns == stamp
    (a / "complete.json").unlink()
    dd.ensure_split("val", tmp_path / "a")
    assert (a / "complete.json").is_file()
    xa, ya = dd.synthesize(4, seed=3)
    xb, yb = dd.synthesize(4, seed=3)
    assert np.array_equal(xa, xb) and all(np.array_equal(p["boxes"], q["boxes"]) for p, q in zip(ya, yb))


def test_train_and_val_use_disjoint_source_digits() -> None:
    from qatcheck.data.digits import digits_split

    src = dd.source_digits()
    assert np.array_equal(src["train"][2], digits_split("train").targets)
    assert np.array_equal(src["val"][2], digits_split("val").targets)
    used = {}
    for split in ("train", "val"):
        ann = json.loads((dd.ensure_split(split) / "instances.json").read_text())["annotations"]
        used[split] = {a["source_index"] for a in ann}
        assert used[split] <= set(src[split][0].tolist())
    assert not used["train"] & used["val"]
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert not {raw[i].tobytes() for i in used["train"]} & {raw[i].tobytes() for i in used["val"]}
    val = dd.digit_detection_split("val")
    assert val.num_classes == 10 and len(val) == dd.COUNTS["val"]
    x, t = next(val.batches(4))
    assert x.shape == (4, 1, 64, 64) and x.dtype == np.float32 and t[0]["boxes"].shape[1] == 4
    calib = dd.digit_detection_split("calib")
    assert len(calib) == dd.CALIB_IMAGES and set(calib.image_ids) <= set(dd.digit_detection_split("train").image_ids)


# ---- COCO loader --------------------------------------------------------------------------------
def _fixture(tmp: Path, **edit) -> tuple[Path, Path]:
    img_dir = tmp / "images"
    img_dir.mkdir(exist_ok=True)
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(img_dir / "a.png")
    Image.fromarray(np.full((30, 30, 3), 50, np.uint8)).save(img_dir / "b.png")
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 20},
                   {"id": 9, "file_name": "b.png", "width": 30, "height": 30}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
                        {"id": 2, "image_id": 9, "category_id": 5, "bbox": [0, 0, 15, 30]}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
    }
    for key, fn in edit.items():
        fn(data)
    ann = tmp / "instances.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


def test_coco_loader_letterbox_and_targets(tmp_path: Path) -> None:
    ds = CocoDataset(*_fixture(tmp_path), input_size=(32, 32), letterbox=True)
    assert len(ds) == 2 and ds.num_classes == 2 and ds.category_ids == (3, 5)
    (x, t), = list(ds.batches(2))
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    a = t[0]
    assert a["image_id"] == 7 and a["orig_size"] == (20, 40)
    assert a["scale"] == (0.8, 0.8) and a["pad"] == (0, 8)
    np.testing.assert_allclose(a["boxes"], [[8, 12, 24, 20]])
    assert a["labels"].tolist() == [0] and t[1]["labels"].tolist() == [1]
    # mapping the target box back gives the annotation
    from qatcheck.tasks.detection import Detections

    back = to_original(Detections(a["boxes"], np.ones(1, np.float32), a["labels"]), a)
    np.testing.assert_allclose(back, [[10, 5, 20, 10]], atol=1e-5)
    stretched = CocoDataset(*_fixture(tmp_path), input_size=(32, 32), letterbox=False, category_ids=[5])
    assert stretched.num_classes == 1 and next(stretched.batches(1))[1][0]["labels"].size == 0
    assert stretched.fingerprint() != ds.fingerprint()
    assert ds.coco.getAnnIds(imgIds=[7]) == [1] and ds.coco.anns[2]["area"] == 450  # area filled in


def test_coco_inputs_fingerprint_leaves_out_the_annotations(tmp_path: Path) -> None:
    """A moved box changes the set's fingerprint (QAT and the eval baseline key on it) but not its
    inputs' (calibrated artifacts key on that: calibration never reads a box); a new input size does."""
    images, annotations = _fixture(tmp_path)
    ds = CocoDataset(images, annotations, input_size=(32, 32))
    (tmp_path / "moved").mkdir()
    _, moved = _fixture(tmp_path / "moved", box=lambda data: data["annotations"][0].update(bbox=[11, 5, 20, 10]))
    moved_ds = CocoDataset(images, moved, input_size=(32, 32))
    assert moved_ds.fingerprint() != ds.fingerprint() and moved_ds.inputs_fingerprint() == ds.inputs_fingerprint()
    assert CocoDataset(images, annotations, input_size=(48, 48)).inputs_fingerprint() != ds.inputs_fingerprint()


@pytest.mark.parametrize("case, edit, words", [
    ("bad json", None, "not valid JSON"),
    ("missing file", lambda d: d["images"].append({"id": 11, "file_name": "gone.png", "width": 4, "height": 4}),
     "gone.png"),
    ("missing image id", lambda d: d["annotations"].append({"id": 3, "image_id": 99, "category_id": 3,
                                                           "bbox": [0, 0, 1, 1]}), "image id 99"),
    ("box outside", lambda d: d["annotations"][0].update(bbox=[30, 5, 20, 10]), "outside image 7"),
    ("unknown category", lambda d: d["annotations"][0].update(category_id=4), "category_id 4"),
])
def test_coco_loader_errors_name_the_file(tmp_path: Path, case: str, edit, words: str) -> None:
    img_dir, ann = _fixture(tmp_path, **({"e": edit} if edit else {}))
    if edit is None:
        ann.write_text('{"images": [')
    with pytest.raises(DataError) as info:
        CocoDataset(img_dir, ann, input_size=(32, 32))
    assert words in str(info.value) and (str(ann) in str(info.value) or "gone.png" in str(info.value))


# ---- decode, metric, agreement --------------------------------------------------------------------
def heads(objs, classes: int = 3, hw: int = 16, n: int = 1) -> list[np.ndarray]:
    """Hand-made CenterNet heads: objs = [(image, class, cx, cy, w, h, score)] in cells."""
    heat = np.full((n, classes, hw, hw), -12.0, np.float32)
    size = np.zeros((n, 2, hw, hw), np.float32)
    off = np.zeros((n, 2, hw, hw), np.float32)
    for i, c, cx, cy, w, h, s in objs:
        ix, iy = int(cx), int(cy)
        heat[i, c, iy, ix] = np.log(s / (1 - s))
        size[i, :, iy, ix] = (w, h)
        off[i, :, iy, ix] = (cx - ix, cy - iy)
    return [heat, size, off]


def test_decode_and_nms_on_hand_made_heads() -> None:
    out = heads([(0, 1, 4.5, 6.25, 8, 4, 0.9), (0, 2, 10.0, 10.0, 2, 4, 0.6),
                 (0, 1, 6.5, 6.25, 8, 4, 0.8),    # a separate peak, box IoU 0.6 with the first: NMS
                 (1, 0, 2.0, 3.0, 1, 1, 0.005)],  # under the score threshold
                n=2)
    d0, d1 = CenterNetDecoder(stride=4, nms_iou=0.5).decode(out)
    np.testing.assert_allclose(d0.boxes, [[2, 17, 34, 33], [36, 32, 44, 48]], atol=1e-4)
    np.testing.assert_allclose(d0.scores, [0.9, 0.6], atol=1e-5)
    assert d0.labels.tolist() == [1, 2] and len(d1) == 0
    # without NMS (IoU 1.0) the overlapping box survives
    assert len(CenterNetDecoder(nms_iou=1.0).decode(out)[0]) == 3


def _val_predictions(ds: CocoDataset, rng: np.random.Generator) -> list[tuple[list, list]]:
    """Heads that reproduce the val ground truth with jitter, misses and false positives."""
    batches = []
    for _, t in ds.batches(50, limit=2):
        objs = []
        for i, tt in enumerate(t):
            for (x1, y1, x2, y2), c in zip(tt["boxes"], tt["labels"]):
                if rng.random() < 0.1:
                    continue
                j = rng.normal(0, 0.15, 4)
                objs.append((i, int(c), min((x1 + x2) / 8 + j[0], 15.9), min((y1 + y2) / 8 + j[1], 15.9),
                             (x2 - x1) / 4 * (1 + j[2] / 2), (y2 - y1) / 4 * (1 + j[3] / 2), rng.uniform(0.2, 0.99)))
            objs.append((i, int(rng.integers(10)), rng.uniform(0, 15.9), rng.uniform(0, 15.9), 3, 3,
                         rng.uniform(0.05, 0.5)))
        batches.append((heads(objs, classes=10, n=len(t)), t))
    return batches


def test_map_equals_pycocotools() -> None:
    from pycocotools.cocoeval import COCOeval

    ds = dd.digit_detection_split("val")
    task = DetectionTask.for_dataset(ds)
    assert task.metric_names == ("map50_95", "map50", "ap_small")
    metric = task.metric()
    batches = _val_predictions(ds, np.random.default_rng(0))
    for outs, t in batches:
        metric.update(outs, t)
    ours = metric.result()
    assert 0.3 < ours["map50_95"] < 0.95
    # the reference: predictions as a plain COCO results list, evaluated by pycocotools directly
    results = [{"image_id": int(r[0]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5]),
                "category_id": int(r[6])} for r in metric.predictions()]
    ev = COCOeval(ds.coco, ds.coco.loadRes(results), "bbox")
    ev.params.imgIds = sorted(metric.image_ids)
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert abs(ours["map50_95"] - ev.stats[0]) < 1e-6 and abs(ours["map50"] - ev.stats[1]) < 1e-6
    assert abs(ours["ap_small"] - ev.stats[3]) < 1e-6


def test_faster_coco_eval_matches_pycocotools() -> None:
    pytest.importorskip("faster_coco_eval")
    ds = dd.digit_detection_split("val")
    metric = DetectionTask.for_dataset(ds).metric()
    for outs, t in _val_predictions(ds, np.random.default_rng(1)):
        metric.update(outs, t)
    preds = metric.predictions()
    ref = coco_evaluate(ds.coco, preds, metric.image_ids, ds.category_ids, "pycocotools")
    fast = coco_evaluate(ds.coco, preds, metric.image_ids, ds.category_ids, "faster_coco_eval")
    np.testing.assert_allclose(fast, ref, atol=1e-6)


def test_box_match_identical_and_shifted() -> None:
    objs = [(0, 1, 4.5, 6.5, 3, 3, 0.9), (0, 2, 10.5, 10.5, 3, 4, 0.7), (1, 0, 8.5, 3.5, 4, 4, 0.8)]
    ref = heads(objs, n=2)
    agree = BoxAgreement(CenterNetDecoder())
    agree.update(ref, ref)
    r = agree.result()
    assert r["box_match"] == 1.0 and r["box_iou"] == pytest.approx(1.0) and r["box_score_delta"] == 0.0
    shifted = heads([(i, c, cx + (2 if i == 0 else 0), cy, w, h, s) for i, c, cx, cy, w, h, s in objs], n=2)
    agree = BoxAgreement(CenterNetDecoder())
    agree.update(ref, shifted)
    assert agree.result()["box_match"] == pytest.approx(1 / 3)
    # a class change is a miss too; a small score change is not
    changed = heads([(0, 2, 4.5, 6.5, 3, 3, 0.9), (0, 2, 10.5, 10.5, 3, 4, 0.65), (1, 0, 8.5, 3.5, 4, 4, 0.8)], n=2)
    agree = BoxAgreement(CenterNetDecoder())
    agree.update(ref, changed)
    r = agree.result()
    assert r["box_match"] == pytest.approx(2 / 3) and r["box_score_delta"] == pytest.approx(0.025, abs=1e-5)


def test_class_count_mismatch_is_a_data_error() -> None:
    ds = dd.digit_detection_split("val")
    task = DetectionTask.for_dataset(ds)
    _, t = next(ds.batches(2))
    with pytest.raises(DataError, match="predicts 3 classes but the eval data declares 10"):
        task.metric().update(heads([], classes=3, n=2), t)
    with pytest.raises(DataError, match="predicts 3 classes"):
        task.check_model(heads([], classes=3))


# ---- zoo detector ----------------------------------------------------------------------------------
def test_checkpoint_loads_and_detects() -> None:
    import torch

    from qatcheck.zoo.digit_detector import DETECTOR_CHECKPOINT, OUTPUT_NAMES, load_digit_detector
    from qatcheck.zoo.train_detector import evaluate

    assert DETECTOR_CHECKPOINT.stat().st_size < 1 << 20
    model = load_digit_detector()
    outs = model(torch.zeros(2, 1, 64, 64))
    assert len(outs) == len(OUTPUT_NAMES) and outs[0].shape == (2, 10, 16, 16)
    val = CocoDataset(*(lambda f: (f / "images", f / "instances.json"))(dd.ensure_split("val")),
                      input_size=(64, 64), letterbox=False, max_images=200, channels=1,
                      mean=(dd.MEAN,), std=(dd.STD,))
    t0 = time.perf_counter()
    m = evaluate(model, val)
    assert m["map50"] >= 0.85, m
    assert time.perf_counter() - t0 < 20
    meta = torch.load(DETECTOR_CHECKPOINT, weights_only=True)["meta"]
    assert meta["val_fingerprint"] == dd.digit_detection_split("val").fingerprint()


def test_bad_checkpoint_names_the_file(tmp_path: Path) -> None:
    import torch

    from qatcheck.zoo.digit_detector import load_digit_detector

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="junk.pt"):
        load_digit_detector(junk)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": {"arch": {"widths": [8, 16, 32, 64]}}}, wrong)
    with pytest.raises(ArtifactError, match="wrong.pt.*missing keys"):
        load_digit_detector(wrong)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_digit_detector(tmp_path / "absent.pt")


def test_detection_recipe_matches_the_model() -> None:
    from qatcheck.zoo.recipes import detection_recipe

    r = detection_recipe()
    assert r.task == "detection" and r.output_names == ("heatmap", "size", "offset")
    assert r.input.shape[1:] == (1, dd.IMAGE_SIZE, dd.IMAGE_SIZE)


def test_coco_val2017_layout_and_root_errors(tmp_path: Path, monkeypatch) -> None:
    """coco_val2017 reads the standard layout from --qatcheck-coco-root's variable, and says what is
    missing when the folder is not a COCO root."""
    from qatcheck.data.coco import COCO_ROOT_ENV, coco_val2017

    monkeypatch.delenv(COCO_ROOT_ENV, raising=False)
    with pytest.raises(DataError, match="--qatcheck-coco-root"):
        coco_val2017()
    img_dir, ann = _fixture(tmp_path)
    with pytest.raises(DataError, match="val2017"):
        coco_val2017(tmp_path)
    img_dir.rename(tmp_path / "val2017")
    (tmp_path / "annotations").mkdir()
    ann.rename(tmp_path / "annotations" / "instances_val2017.json")
    monkeypatch.setenv(COCO_ROOT_ENV, str(tmp_path))
    ds = coco_val2017(input_size=(32, 32))
    assert len(ds) == 2 and ds.name == "coco-val2017" and list(ds.category_ids) == [3, 5]


def test_a_dynamic_height_width_point_maps_its_boxes_back_through_the_resize(tmp_path: Path) -> None:
    """Issue 21 item 11b: a dynamic H/W profile point resizes the inputs; the detector's boxes are
    then in the resized input's pixels. Before, the targets' scale / pad stayed those of the eval
    set's own size: mAP@.5 0.000 at 48x48 and 0.005 at 80x80 (0.905 at 64x64) for the same model.
    Now DetectionTask.resize_targets follows the resize (what is left is the detector's own drop
    on digits of another size)."""
    import torch

    from qatcheck.measurement import Case
    from qatcheck.options import Options
    from qatcheck.recipe import InputSpec
    from qatcheck.session import QatcheckSession
    from qatcheck.zoo.recipes import detection_recipe

    folder = dd.ensure_split("val")
    recipe = detection_recipe(
        name="digitdet_hw", modes=("dynamic",), backends=("torch",), dynamic_modes=(),
        eval_data=lambda: CocoDataset(folder / "images", folder / "instances.json", input_size=(64, 64),
                                      letterbox=False, max_images=64, channels=1, mean=(dd.MEAN,), std=(dd.STD,)),
        input=InputSpec(name="input", shape=(16, 1, 64, 64), dynamic={2: (48, 64, 80), 3: (48, 64, 80)}))
    session = QatcheckSession(Options(cache_dir=tmp_path, baselines_dir=tmp_path, progress=False))
    session.register(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        map50 = {p: session.measure(Case("digitdet_hw", "dynamic", "torch", p)).metrics["map50"]
                 for p in ("min", "opt", "max")}
    finally:
        torch.set_num_threads(threads)
    assert map50["opt"] > 0.85 and map50["min"] > 0.6 and map50["max"] > 0.7, map50


def test_resized_detection_targets_map_a_box_back_to_the_same_original_box() -> None:
    task = DetectionTask(None, range(3))
    t = {"image_id": 1, "orig_size": (120, 90), "scale": (64 / 90, 64 / 120), "pad": (0, 0),
         "boxes": np.float32([[8, 16, 40, 48]]), "labels": np.int64([2])}
    [r] = task.resize_targets([t], (64, 64), (48, 96))  # H x0.75, W x1.5
    assert np.allclose(r["boxes"], [[12, 12, 60, 36]]) and r["image_id"] == 1
    det = Detections(t["boxes"], np.float32([0.9]), np.int64([2]))
    resized = Detections(r["boxes"], det.scores, det.labels)
    assert np.allclose(to_original(resized, r), to_original(det, t))
    assert t["scale"] == (64 / 90, 64 / 120)  # the dataset's own targets are not rewritten


def test_nms_keeps_the_best_of_each_overlapping_group_per_class() -> None:
    """Greedy, class-wise, by descending score (ties: the lower index first); IoU above the
    threshold suppresses, at it does not."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30],
                      [0, 0, 10, 5]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.9, 0.1, 0.7], np.float32)
    labels = np.array([0, 0, 0, 1, 0, 0])
    # 1 and 3 tie at 0.9 but differ in class: both kept, 1 first; 0 and 2 overlap 1 (IoU 1, 0.82);
    # 5 overlaps 1 at IoU exactly 0.5: kept at a 0.5 threshold, suppressed below it
    assert nms(boxes, scores, labels, 0.5).tolist() == [1, 3, 5, 4]
    assert nms(boxes, scores, labels, 0.49).tolist() == [1, 3, 4]
    assert nms(boxes, scores, labels, 1.0).tolist() == [1, 3, 2, 5, 0, 4]
    assert nms(boxes[:0], scores[:0], labels[:0], 0.5).tolist() == []


@pytest.mark.parametrize("count", [40, 900, 1200])  # torchvision's two paths: one pass, per class past 1,000 boxes
def test_nms_keeps_what_torchvision_keeps(count) -> None:
    """The same indices in the same order as torchvision's batched_nms (where it is installed),
    with many overlaps and tied scores - past 1,000 boxes the same indices by the same scores
    (torchvision's last sort there breaks ties in no fixed order; the decoders keep 100 boxes)."""
    ops = pytest.importorskip("torchvision.ops")
    import torch

    rng = np.random.default_rng(count)
    for _ in range(20):
        xy = rng.uniform(0, 60, (count, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (count, 2)).astype(np.float32)], 1)
        scores = rng.choice(np.linspace(0.05, 1, 12, dtype=np.float32), count)  # many ties
        labels = rng.integers(0, 3, count)
        for iou in (0.3, 0.45, 0.7):
            want = ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), iou)
            got = nms(boxes, scores, labels, iou)
            if count <= 1000:
                assert got.tolist() == want.tolist()
            else:
                assert sorted(got.tolist()) == sorted(want.tolist())
                assert scores[got].tolist() == scores[want.numpy()].tolist()
