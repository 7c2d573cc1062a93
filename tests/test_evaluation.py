"""Pure evaluation functions: OKS, OKS-NMS, rescoring, COCO results and pycocotools AP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distilpose.data.keypoints import OKS_SIGMAS
from distilpose.evaluation.metrics import (
    coco_keypoint_eval,
    keypoint_errors,
    load_coco,
    oks_iou,
    oks_nms,
    rescore,
    to_coco_results,
)

ANN = Path(__file__).parent / "data" / "coco_mini" / "annotations" / "person_keypoints.json"


def _pose(x0: float, y0: float, rng: np.random.Generator) -> np.ndarray:
    kpts = np.zeros((17, 3))
    kpts[:, 0] = x0 + rng.uniform(0, 60, 17)
    kpts[:, 1] = y0 + rng.uniform(0, 120, 17)
    kpts[:, 2] = 0.9
    return kpts


def _pred(image_id: int, kpts: np.ndarray, score: float, area: float = 100.0 * 150.0) -> dict:
    return {"image_id": image_id, "keypoints": kpts, "score": score, "area": area}


def test_oks_iou_identical_and_far_poses():
    rng = np.random.default_rng(0)
    a = _pose(0, 0, rng)
    near = a.copy()
    near[:, :2] += 2.0
    far = a.copy()
    far[:, 0] += 500
    oks = oks_iou(a, np.stack([a, near, far]), 15000.0, np.full(3, 15000.0))
    assert oks[0] == pytest.approx(1.0)
    assert 0.9 < oks[1] < 1.0
    assert oks[2] < 1e-6
    # hand check of one keypoint's term: exp(-d^2 / (2 * area * (2 sigma)^2))
    one = oks_iou(a[:1], near[None, :1], 15000.0, np.array([15000.0]), OKS_SIGMAS[:1])
    d2 = 8.0
    expected = np.exp(-d2 / (2 * 15000.0 * (2 * OKS_SIGMAS[0]) ** 2))
    assert one[0] == pytest.approx(expected, rel=1e-9)


def test_oks_iou_vis_thr_counts_only_confident_joints():
    rng = np.random.default_rng(1)
    a = _pose(0, 0, rng)
    b = a.copy()
    b[:8, 0] += 300  # the first 8 joints are far off ...
    b[:8, 2] = 0.05  # ... but not confident
    assert oks_iou(a, b[None], 1e4, np.array([1e4]))[0] < 0.6
    assert oks_iou(a, b[None], 1e4, np.array([1e4]), vis_thr=0.2)[0] == pytest.approx(1.0)


def test_oks_nms_suppresses_duplicates_keeps_distinct_people():
    rng = np.random.default_rng(2)
    a = _pose(100, 100, rng)
    b = _pose(400, 100, rng)
    dup = a.copy()
    dup[:, :2] += 1.0
    preds = [
        _pred(1, dup, 0.8),  # 0: duplicate of 1 with a lower score -> suppressed
        _pred(1, a, 0.9),  # 1: kept
        _pred(1, b, 0.7),  # 2: another person -> kept
        _pred(2, a.copy(), 0.5),  # 3: same pose in another image -> kept
    ]
    assert oks_nms(preds, thr=0.9) == [1, 2, 3]
    # the higher-scored one of a pair survives, whichever comes first in the list
    preds[0]["score"] = 0.95
    assert oks_nms(preds, thr=0.9) == [0, 2, 3]
    # a threshold above every OKS keeps all
    assert oks_nms(preds, thr=1.01) == [0, 1, 2, 3]
    assert oks_nms([]) == []


def test_oks_nms_ties_keep_the_last_duplicate_as_mmpose():
    """Equal scores: MMPose 0.x's `argsort()[::-1]` takes the later prediction first, so of
    tied duplicates the last one survives; distinct people with tied scores all survive."""
    rng = np.random.default_rng(4)
    a = _pose(100, 100, rng)
    b = _pose(400, 100, rng)
    dups = [a.copy() for _ in range(3)]
    for i, d in enumerate(dups):
        d[:, :2] += 0.5 * i
    preds = [_pred(1, dups[0], 1.0), _pred(1, b, 1.0), _pred(1, dups[1], 1.0)]
    preds.append(_pred(1, dups[2], 1.0))
    assert oks_nms(preds) == [1, 3]
    # the rule holds beyond numpy's small-array insertion sort (> 16 per image)
    many = [_pred(7, a.copy(), 1.0) for _ in range(40)]
    assert oks_nms(many) == [39]
    # a strictly higher score still wins wherever it stands
    preds[0]["score"] = 1.5
    assert oks_nms(preds) == [0, 1]


def test_oks_nms_uses_area_for_tolerance():
    rng = np.random.default_rng(3)
    a = _pose(0, 0, rng)
    shifted = a.copy()
    shifted[:, :2] += 6.0
    small = [_pred(1, a, 0.9, area=200.0), _pred(1, shifted, 0.8, area=200.0)]
    large = [_pred(1, a, 0.9, area=2e5), _pred(1, shifted, 0.8, area=2e5)]
    assert oks_nms(small) == [0, 1]  # small people: 6 px apart are different people
    assert oks_nms(large) == [0]  # large people: 6 px apart is a duplicate


def test_rescore_hand_computed():
    scores = np.array([0.1, 0.5, 0.9, 0.2, 0.3])
    # joints above 0.2 (strictly): 0.5, 0.9, 0.3 -> mean 1.7 / 3
    assert rescore(scores, 0.8) == pytest.approx(0.8 * 1.7 / 3)
    assert rescore(scores, 0.8, thr=0.6) == pytest.approx(0.8 * 0.9)
    assert rescore(np.full(17, 0.1), 0.9) == 0.0


def test_to_coco_results_format():
    rng = np.random.default_rng(4)
    preds = [_pred(785, _pose(0, 0, rng), np.float32(0.7))]
    res = to_coco_results(preds)
    assert len(res) == 1
    r = res[0]
    assert set(r) == {"image_id", "category_id", "keypoints", "score"}
    assert r["category_id"] == 1 and r["image_id"] == 785
    assert len(r["keypoints"]) == 51
    assert r["keypoints"][2] == pytest.approx(0.9)
    json.dumps(res)  # plain Python numbers


def _gt_results(noise: float = 0.0, seed: int = 0) -> list[dict]:
    data = json.loads(ANN.read_text())
    rng = np.random.default_rng(seed)
    results = []
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0) or ann["num_keypoints"] == 0:
            continue
        kpts = np.array(ann["keypoints"], dtype=np.float64).reshape(17, 3)
        kpts[:, :2] += rng.normal(0.0, noise, (17, 2)) if noise else 0.0
        kpts[:, 2] = 1.0
        results.append({"image_id": ann["image_id"], "keypoints": kpts, "score": 1.0, "area": 1.0})
    return to_coco_results(results)


def test_coco_eval_ground_truth_scores_one_and_noise_scores_less():
    perfect = coco_keypoint_eval(ANN, _gt_results())
    assert perfect["AP"] == pytest.approx(1.0)
    assert perfect["AR"] == pytest.approx(1.0)
    assert set(perfect) >= {"AP", "AP50", "AP75", "APm", "APl", "AR"}
    noisy = coco_keypoint_eval(load_coco(ANN), _gt_results(noise=8.0))  # a loaded COCO works too
    assert 0.0 <= noisy["AP"] < 0.95
    noisier = coco_keypoint_eval(str(ANN), _gt_results(noise=30.0))
    assert noisier["AP"] < noisy["AP"]


def test_coco_eval_empty_results():
    metrics = coco_keypoint_eval(ANN, [])
    assert metrics["AP"] == 0.0 and metrics["AR"] == 0.0


def test_keypoint_errors_pck_and_pixels():
    coco = load_coco(ANN)
    results = []
    shift = 3.0
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        if ann.get("num_keypoints", 0) == 0:
            continue
        kpts = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3).copy()
        kpts[:, 0] += shift  # every joint 3 px to the right
        kpts[:, 2] = 1.0
        results.append({"image_id": ann["image_id"], "keypoints": kpts.reshape(-1).tolist()})
    out = keypoint_errors(coco, results)
    assert out["pixel_error"] == pytest.approx(shift)
    assert out["matched"] == len(results)
    # PCK@0.05: 3 px counts for people whose box's longer side is >= 60 px, not below
    boxes = [a for a in coco.loadAnns(coco.getAnnIds(iscrowd=False)) if a["num_keypoints"] > 0]
    joints = [(a["num_keypoints"], max(a["bbox"][2:]) * 0.05 >= shift) for a in boxes]
    expected = sum(n for n, ok in joints if ok) / sum(n for n, _ in joints)
    assert out["PCK"] == pytest.approx(expected)
    assert keypoint_errors(coco, [])["PCK"] == 0.0  # nobody predicted: every joint wrong


def test_mean_pose_results_place_the_mean_box_relative_pose_in_each_box():
    """Every person gets the training people's mean box-relative joints in its own box: on
    the same set the error is the spread around that mean, zero only if all poses agree."""
    from distilpose.evaluation.metrics import mean_pose_results

    coco = load_coco(ANN)
    people = [a for a in coco.loadAnns(coco.getAnnIds(iscrowd=False)) if a["num_keypoints"] > 0]
    results = mean_pose_results(coco, coco)
    assert len(results) == len(people)
    first = np.asarray(results[0]["keypoints"]).reshape(-1, 3)
    x, y, w, h = people[0]["bbox"]
    assert (first[:, 0] >= x).all() and (first[:, 0] <= x + w).all()  # inside its box
    assert (first[:, 1] >= y).all() and (first[:, 1] <= y + h).all()
    err = keypoint_errors(coco, results)["pixel_error"]
    assert (
        0
        < err
        < keypoint_errors(coco, [{**r, "keypoints": [0.0] * 51} for r in results])["pixel_error"]
    )
    one = people[0]  # a set of one person: its mean pose is its own pose, error 0
    single = type(coco)()
    single.dataset = {
        **coco.dataset,
        "annotations": [one],
        "images": [i for i in coco.dataset["images"] if i["id"] == one["image_id"]],
    }
    single.createIndex()
    kpts = np.asarray(one["keypoints"], float).reshape(-1, 3)
    got = np.asarray(mean_pose_results(single, single)[0]["keypoints"]).reshape(-1, 3)
    labelled = kpts[:, 2] > 0
    np.testing.assert_allclose(got[labelled, :2], kpts[labelled, :2], atol=1e-6)


def test_default_results_json_beside_checkpoint_but_not_inside_the_package(tmp_path):
    from distilpose.inference.eval_run import default_results_json
    from distilpose.weights import DEMO_TEACHER_FILE

    assert default_results_json(tmp_path / "run" / "student.pth") == (
        tmp_path / "run" / "student_results.json"
    )
    # the shipped teacher's folder is part of the install: results go to the working directory
    assert default_results_json(DEMO_TEACHER_FILE) == Path("demo_teacher_results.json")
