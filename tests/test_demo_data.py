"""The built-in synthetic dataset and the crop picture."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distilpose.data.coco import load_coco_instances, read_image
from distilpose.data.demo import make_demo_data
from distilpose.data.keypoints import OKS_SIGMAS, coco_person_category
from distilpose.data.show import show_crops

REAL = Path(__file__).parent / "data" / "coco_mini"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_data(out, num_train=40, num_val=20, seed=0)


def _quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_layout_and_pycocotools_loads(demo):
    out, paths = demo
    assert set(paths) == {"train_ann", "train_images", "val_ann", "val_images", "val_dets"}
    assert paths["train_ann"] == out / "annotations" / "person_keypoints_train.json"
    assert paths["val_dets"] == out / "annotations" / "person_detections_val.json"
    for split, num in (("train", 40), ("val", 20)):
        coco = _quiet_coco(paths[f"{split}_ann"])
        assert len(coco.getAnnIds()) == num
        assert coco.loadCats(1)[0] == coco_person_category()
        files = sorted(p.name for p in paths[f"{split}_images"].glob("*.jpg"))
        assert files == sorted(img["file_name"] for img in coco.dataset["images"])
        per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
        assert min(per_image) >= 1 and max(per_image) <= 3 and max(per_image) > 1
        for img in coco.dataset["images"]:
            pixels = read_image(paths[f"{split}_images"] / img["file_name"])
            assert pixels.shape == (img["height"], img["width"], 3) == (192, 192, 3)
        for ann in coco.dataset["annotations"]:
            k = np.array(ann["keypoints"]).reshape(17, 3)
            assert ann["num_keypoints"] == int((k[:, 2] > 0).sum()) > 0
            assert not k[k[:, 2] == 0].any()  # unlabelled joints are 0, 0, 0
            lab = k[k[:, 2] > 0]
            assert (lab[:, :2] >= 0).all() and (lab[:, :2] < 192).all()
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 192 and y + h <= 192
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0


def test_occlusion_and_truncation_are_labelled(demo):
    _, paths = demo
    vis = []
    for split in ("train", "val"):
        anns = json.loads(paths[f"{split}_ann"].read_text())["annotations"]
        vis += [np.array(a["keypoints"]).reshape(17, 3)[:, 2] for a in anns]
    vis = np.stack(vis)
    assert (vis == 1).any() and (vis == 0).any() and (vis == 2).mean() > 0.5


def test_ground_truth_against_itself_scores_ap_1(demo):
    _, paths = demo
    gt = _quiet_coco(paths["val_ann"])
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in gt.dataset["annotations"]
        if a["num_keypoints"] > 0
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.kpt_oks_sigmas = OKS_SIGMAS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP
    assert ev.stats[5] == pytest.approx(1.0)  # AR
    # the check can fail: keypoints moved by 6 px no longer score 1
    for r in results:
        r["keypoints"] = [v + 6 if i % 3 != 2 else v for i, v in enumerate(r["keypoints"])]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] < 0.9


def test_detections_file(demo):
    _, paths = demo
    dets = json.loads(paths["val_dets"].read_text())
    gt = json.loads(paths["val_ann"].read_text())
    ids = {img["id"] for img in gt["images"]}
    assert len(dets) >= len(gt["annotations"])
    assert all(d["image_id"] in ids and d["category_id"] == 1 for d in dets)
    assert all(0 < d["score"] <= 1 and d["bbox"][2] > 0 and d["bbox"][3] > 0 for d in dets)
    assert any(d["score"] < 0.3 for d in dets)  # false positives carry low scores
    insts = load_coco_instances(paths["val_ann"], paths["val_images"], dets_file=paths["val_dets"])
    assert len(insts) == len(dets)
    train = load_coco_instances(paths["train_ann"], paths["train_images"], train=True)
    assert len(train) == 40


def test_deterministic_given_seed(demo, tmp_path):
    out, paths = demo
    again = make_demo_data(tmp_path / "b", num_train=40, num_val=20, seed=0)
    for key in ("train_ann", "val_ann", "val_dets"):
        assert paths[key].read_bytes() == again[key].read_bytes()
    for key in ("train_images", "val_images"):
        for f in sorted(paths[key].glob("*.jpg")):
            assert f.read_bytes() == (again[key] / f.name).read_bytes()
    other = make_demo_data(tmp_path / "c", num_train=40, num_val=20, seed=1)
    assert other["train_ann"].read_bytes() != paths["train_ann"].read_bytes()


def test_show_crops_png(tmp_path, demo):
    _, paths = demo
    out = show_crops(
        REAL / "annotations" / "person_keypoints.json",
        REAL / "images",
        tmp_path / "grid.png",
        num=5,
        views=2,
        input_size=(96, 128),
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(out))
    # 5 instances -> 3 per row, 2 rows; each row: 3 x 2 tiles of 96 px + 2 gaps of 6 px;
    # each tile 128 px high plus a 14 px caption
    assert img.shape == (2 * (128 + 14), 3 * 2 * 96 + 2 * 6, 3)
    assert img.std() > 10  # crops were drawn, not a blank canvas
    # the demo data works too, and the same seed draws the same picture
    a = show_crops(paths["train_ann"], paths["train_images"], tmp_path / "a.png", num=4)
    b = show_crops(paths["train_ann"], paths["train_images"], tmp_path / "b.png", num=4)
    assert a.read_bytes() == b.read_bytes()
    assert cv2.imread(str(a)).shape == (2 * (256 + 14), 2 * 2 * 192 + 6, 3)
