"""COCO loading on the real samples in tests/data/coco_mini: boxes, detections, bad files."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from distilpose.data.coco import (
    annotation_digest,
    load_coco_instances,
    read_image,
    resolve_image_path,
)
from distilpose.data.crop import box_to_center_scale
from distilpose.data.keypoints import (
    FLIP_INDEX,
    FLIP_PAIRS,
    KEYPOINT_NAMES,
    OKS_SIGMAS,
    SKELETON,
    coco_person_category,
)
from distilpose.errors import BadAnnotationError, BadConfigError, BadImageError

DATA = Path(__file__).parent / "data" / "coco_mini"
ANN = DATA / "annotations" / "person_keypoints.json"
DETS = DATA / "annotations" / "person_detections.json"
IMAGES = DATA / "images"


def _raw():
    return json.loads(ANN.read_text())


def _write(tmp_path: Path, data, name="ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_keypoint_tables_match_the_real_file():
    cat = _raw()["categories"][0]
    assert list(KEYPOINT_NAMES) == cat["keypoints"]
    assert [[a + 1, b + 1] for a, b in SKELETON] == cat["skeleton"]
    assert coco_person_category()["skeleton"] == cat["skeleton"]
    for left, right in FLIP_PAIRS:
        assert KEYPOINT_NAMES[left].replace("left", "right") == KEYPOINT_NAMES[right]
        assert FLIP_INDEX[left] == right and FLIP_INDEX[right] == left
    assert FLIP_INDEX[0] == 0 and OKS_SIGMAS.shape == (17,)
    assert OKS_SIGMAS[0] == pytest.approx(0.026) and OKS_SIGMAS[-1] == pytest.approx(0.089)


def test_box_to_center_scale_by_hand():
    # tall box: width is widened to 0.75 * height; scale = size / 200 * 1.25
    center, scale = box_to_center_scale([280.79, 44.73, 218.7, 346.68])
    assert center.dtype == np.float32 and scale.dtype == np.float32
    np.testing.assert_allclose(center, [280.79 + 109.35, 44.73 + 173.34], rtol=1e-6)
    w = 0.75 * 346.68  # 260.01
    np.testing.assert_allclose(scale, [w / 160.0, 346.68 / 160.0], rtol=1e-6)
    np.testing.assert_allclose(scale, [1.6250625, 2.16675], rtol=1e-6)
    # wide (square) box: height is raised to width / 0.75
    center, scale = box_to_center_scale([38.08, 110.95, 174.71, 174.71])
    np.testing.assert_allclose(center, [125.435, 198.305], rtol=1e-6)
    np.testing.assert_allclose(scale, [174.71 / 160.0, 174.71 / 0.75 / 160.0], rtol=1e-6)


def test_train_instances_from_real_samples():
    insts = load_coco_instances(ANN, IMAGES, train=True)
    anns = _raw()["annotations"]
    # 14 people, 2 of them without labelled keypoints
    assert len(anns) == 14 and len(insts) == 12
    assert [i.index for i in insts] == list(range(12))
    keys = [(i.image_id, i.ann_id) for i in insts]
    assert keys == sorted(keys)
    first = insts[0]
    assert (first.image_id, first.ann_id) == (785, 442619)
    # MMPose 0.x GT box cleaning: x2 = min(W-1, x + w - 1) on a 640x425 image
    np.testing.assert_allclose(first.bbox, [280.79, 44.73, 217.7, 345.68], atol=1e-9)
    np.testing.assert_allclose(first.center, [280.79 + 217.7 / 2, 44.73 + 345.68 / 2], rtol=1e-6)
    np.testing.assert_allclose(first.scale, [0.75 * 345.68 / 160, 345.68 / 160], rtol=1e-6)
    ann = next(a for a in anns if a["id"] == 442619)
    assert first.keypoints.shape == (17, 3) and first.keypoints.dtype == np.float32
    np.testing.assert_array_equal(first.keypoints.reshape(-1), ann["keypoints"])
    assert first.score == 1.0 and first.area == pytest.approx(ann["area"])
    assert Path(first.image_path) == (IMAGES / "000000000785.jpg").resolve()
    assert all(Path(i.image_path).is_file() for i in insts)
    # a box touching the left border of 197388 (640x392): x1 = 0.5, x2 = 0.5 + 89.1
    edge = next(i for i in insts if i.ann_id == 543117)
    np.testing.assert_allclose(edge.bbox, [0.5, 43.74, 89.1, 219.09], atol=1e-9)


def test_detections_load_with_threshold():
    dets = json.loads(DETS.read_text())
    for thr in (0.0, 0.3, 0.9):
        insts = load_coco_instances(ANN, IMAGES, dets_file=DETS, det_score_thr=thr)
        kept = [d for d in dets if d["category_id"] == 1 and d["score"] >= thr]
        assert len(insts) == len(kept) and len(insts) > 0
        assert all(i.score >= thr and i.ann_id == -1 for i in insts)
        assert [i.image_id for i in insts] == sorted(i.image_id for i in insts)
        # within an image, file order is kept
        first_img = min(d["image_id"] for d in kept)
        in_file = [d["bbox"] for d in kept if d["image_id"] == first_img]
        loaded = [list(i.bbox) for i in insts if i.image_id == first_img]
        assert loaded == in_file
        assert not np.any(insts[0].keypoints)
        x, y, w, h = insts[0].bbox
        assert insts[0].area == pytest.approx(w * h)
        c, s = box_to_center_scale(insts[0].bbox)
        np.testing.assert_array_equal(insts[0].center, c)
        np.testing.assert_array_equal(insts[0].scale, s)
    assert len(load_coco_instances(ANN, IMAGES, dets_file=DETS, det_score_thr=0.3)) < len(dets)


@pytest.mark.reliability(
    case="detections file given for training",
    outcome="BadConfigError: training uses ground-truth boxes",
)
def test_train_refuses_detections():
    with pytest.raises(BadConfigError):
        load_coco_instances(ANN, IMAGES, dets_file=DETS, train=True)


def test_annotation_digest(tmp_path):
    assert annotation_digest(ANN) == hashlib.sha256(ANN.read_bytes()).hexdigest()
    copy = tmp_path / "a.json"
    copy.write_bytes(ANN.read_bytes() + b" ")
    assert annotation_digest(copy) != annotation_digest(ANN)


@pytest.mark.reliability(
    case="image file_name absolute, with '..' or a drive",
    outcome="BadAnnotationError naming 'file_name'",
)
def test_resolve_image_path(tmp_path):
    root = tmp_path / "images"
    assert resolve_image_path(root, "x/y.jpg") == str(root / "x" / "y.jpg")
    assert resolve_image_path(root, "x/../y.jpg") == str(root / "y.jpg")
    for bad in ("../y.jpg", "x/../../y.jpg", "/etc/passwd", "..", "", "C:/y.jpg", "\\y.jpg"):
        with pytest.raises(BadAnnotationError, match="file_name"):
            resolve_image_path(root, bad)


@pytest.mark.reliability(
    case="annotation file_name escaping the image root",
    outcome="one-line BadAnnotationError: 'leaves the image root'",
)
def test_escaping_file_name_refused_when_loading(tmp_path):
    data = _raw()
    data["images"][0]["file_name"] = "../../secret.jpg"
    with pytest.raises(BadAnnotationError, match="leaves the image root"):
        load_coco_instances(_write(tmp_path, data), IMAGES)


@pytest.mark.reliability(
    case="image missing, corrupt or empty",
    outcome="BadImageError naming the file",
)
def test_read_image(tmp_path):
    img = read_image(IMAGES / "000000000785.jpg")
    assert img.shape == (425, 640, 3) and img.dtype == np.uint8
    with pytest.raises(BadImageError, match="not found"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(BadImageError, match="decode"):
        read_image(bad)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError):
        read_image(empty)


def _mutated(mutate):
    data = _raw()
    mutate(data)
    return data


def _ann(data, ann_id=442619):
    return next(a for a in data["annotations"] if a["id"] == ann_id)


BAD_ANNOTATIONS = {
    "no bbox": (lambda d: _ann(d).pop("bbox"), "annotation 442619 has no 'bbox'"),
    "short bbox": (lambda d: _ann(d).update(bbox=[1, 2, 3]), "'bbox' is .*expected 4 numbers"),
    "negative w": (lambda d: _ann(d).update(bbox=[1, 2, -3, 4]), "has width -3"),
    "text bbox": (lambda d: _ann(d).update(bbox="1,2,3,4"), "'bbox' is '1,2,3,4'"),
    "kpts length": (
        lambda d: _ann(d).update(keypoints=[1, 2, 2] * 16),
        "annotation 442619 'keypoints' is .*expected 51 numbers",
    ),
    "no keypoints": (lambda d: _ann(d).pop("keypoints"), "has no 'keypoints'"),
    "no annotations": (lambda d: d.pop("annotations"), "missing list 'annotations'"),
    "no file_name": (lambda d: d["images"][1].pop("file_name"), r"images\[1\] has no 'file_name'"),
    "unknown image": (lambda d: _ann(d).update(image_id=12345), "refers to image_id 12345"),
    # issue 24: accepted silently before (inf and NaN pass "area <= 0"; 1e30 is finite)
    "area inf": (lambda d: _ann(d).update(area=math.inf), r"'area' is inf; expected 1 number"),
    "area NaN": (lambda d: _ann(d).update(area=math.nan), r"'area' is nan; expected 1 number"),
    "area text": (lambda d: _ann(d).update(area="big"), r"'area' is 'big'; expected 1 number"),
    "keypoint 1e30": (
        lambda d: _ann(d)["keypoints"].__setitem__(0, 1e30),
        r"'keypoints' is \[1e\+30, .*expected 51 numbers \(finite, within \+-1e\+06\)",
    ),
    "bbox 1e30": (
        lambda d: _ann(d)["bbox"].__setitem__(2, 1e30),
        r"'bbox' is \[.*1e\+30.*\]; expected 4 numbers \(finite, within \+-1e\+06\)",
    ),
}


@pytest.mark.reliability(
    case="annotation file lacks a field or has a bad one",
    outcome="one-line BadAnnotationError naming the file, record and what was expected",
)
@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_files_give_one_line(tmp_path, case):
    mutate, pattern = BAD_ANNOTATIONS[case]
    path = _write(tmp_path, _mutated(mutate))
    with pytest.raises(BadAnnotationError, match=pattern) as e:
        load_coco_instances(path, IMAGES, train=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))


@pytest.mark.reliability(
    case="annotation file not JSON, or missing",
    outcome="one-line BadAnnotationError naming the file",
)
def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(BadAnnotationError, match="not a JSON COCO annotation file") as e:
        load_coco_instances(p, IMAGES)
    assert "\n" not in str(e.value)
    with pytest.raises(BadAnnotationError, match="not found"):
        load_coco_instances(tmp_path / "nope.json", IMAGES)


BAD_DETECTIONS = {
    "not a list": ({"bbox": [1, 2, 3, 4]}, "expected a list of detections"),
    "no score": ([{"image_id": 785, "category_id": 1, "bbox": [1, 2, 3, 4]}], "has no 'score'"),
    "unknown image": (
        [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9}],
        "detection 0 is for image_id 1, which is not in the annotation file",
    ),
    "bad box": (
        [{"image_id": 785, "category_id": 1, "bbox": [1, 2], "score": 0.9}],
        "detection 0 'bbox' is",
    ),
    "all boxes [0, 0, 0, 0]": (  # issue 24: every one skipped, evaluated on no people
        [{"image_id": 785, "category_id": 1, "bbox": [0, 0, 0, 0], "score": 0.9}] * 3,
        r"all 3 person detections scoring >= 0 have an empty box",
    ),
    "score NaN": (
        [{"image_id": 785, "category_id": 1, "bbox": [1, 2, 3, 4], "score": math.nan}],
        "detection 0 'score' is nan",
    ),
}


@pytest.mark.reliability(
    case="detections file malformed",
    outcome="one-line BadAnnotationError naming the file and detection",
)
@pytest.mark.parametrize("case", sorted(BAD_DETECTIONS))
def test_bad_detection_files(tmp_path, case):
    data, pattern = BAD_DETECTIONS[case]
    path = _write(tmp_path, data, "dets.json")
    with pytest.raises(BadAnnotationError, match=pattern) as e:
        load_coco_instances(ANN, IMAGES, dets_file=path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.reliability(
    case="ground-truth box of zero area (or crowd)",
    outcome="skipped, with one warning counting them",
)
def test_skips_crowd_and_empty_boxes_with_a_warning(tmp_path, caplog):
    def mutate(d):
        _ann(d)["iscrowd"] = 1
        _ann(d, 460541)["bbox"] = [247.76, 74.23, 0.0, 300.78]  # zero width

    path = _write(tmp_path, _mutated(mutate))
    with caplog.at_level(logging.WARNING, logger="distilpose.data.coco"):
        insts = load_coco_instances(path, IMAGES, train=True)
    ids = {i.ann_id for i in insts}
    assert len(insts) == 10 and 442619 not in ids and 460541 not in ids
    assert "skipped 1 ground-truth boxes" in caplog.text


@pytest.mark.reliability(
    case="keypoints outside the image",
    outcome="kept as labelled, no error (crop weights zero them outside the crop)",
)
def test_keypoints_outside_the_image_are_kept(tmp_path):
    def mutate(d):
        _ann(d)["keypoints"][0:3] = [-50.0, 900.0, 2]

    insts = load_coco_instances(_write(tmp_path, _mutated(mutate)), IMAGES, train=True)
    np.testing.assert_array_equal(insts[0].keypoints[0], [-50.0, 900.0, 2])


def test_image_root_copy_loads(tmp_path):
    # instances resolve against whatever root is given, not the annotation file's folder
    root = tmp_path / "imgs"
    shutil.copytree(IMAGES, root)
    insts = load_coco_instances(ANN, root, train=True)
    assert all(Path(i.image_path).parent == root.resolve() for i in insts)
