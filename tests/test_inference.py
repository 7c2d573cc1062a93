"""Top-down inference (flip test, decoding), `run_eval` and `predict_source` end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from distilpose.data import (
    PersonInstance,
    box_to_center_scale,
    eval_crop_spec,
    load_coco_instances,
    normalize,
    render_crop,
)
from distilpose.data.codecs import HeatmapCodec, crop_to_image
from distilpose.data.keypoints import FLIP_INDEX, NUM_KEYPOINTS
from distilpose.errors import BadAnnotationError, BadConfigError
from distilpose.evaluation.metrics import coco_keypoint_eval, oks_nms, to_coco_results
from distilpose.geometry import Geometry
from distilpose.inference.config import InferConfig
from distilpose.inference.detector import BoxesFile
from distilpose.inference.eval_run import format_metrics_table, run_eval
from distilpose.inference.inferencer import Inferencer
from distilpose.inference.predict import predict_source
from distilpose.inference.topdown import default_use_scores, flip_student_output, predict_instances
from distilpose.models import StudentOutput, TeacherOutput, build_model, save_checkpoint

MINI = Path(__file__).parent / "data" / "coco_mini"
ANN = MINI / "annotations" / "person_keypoints.json"
DETS = MINI / "annotations" / "person_detections.json"
IMAGES = MINI / "images"
IN_W, IN_H = 48, 64  # stub crop size: small and fast
GEOMETRY = Geometry((IN_W, IN_H))


def _ramps(width: int) -> torch.Tensor:
    """[K, W] column weights; joint k's ramp mirrored is joint FLIP_INDEX[k]'s ramp."""
    x = torch.arange(width, dtype=torch.float64)
    rows = []
    for k in range(NUM_KEYPOINTS):
        power = 1 + (k - 1) // 2 if k else 0
        if k == 0:
            rows.append(torch.ones(width, dtype=torch.float64))
        elif k % 2 == 1:  # left joints: weight grows to the right
            rows.append(((x + 1) / width) ** power)
        else:  # right joints: the mirror image of their left partner's ramp
            rows.append(((width - x) / width) ** power)
    return torch.stack(rows)


def _centroids(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per joint, the centroid (crop px, pixel centre at the index) of the image intensity
    weighted by the joint's ramp, and the ramp's mean weight as a score.

    Exactly equivariant under a horizontal flip of the input (with left/right swapped)."""
    b, _, h, w = images.shape
    intensity = images.double().mean(1).exp()  # [B, H, W] > 0
    ramp = _ramps(w)  # [K, W]
    weight = intensity[:, None] * ramp[None, :, None, :]  # [B, K, H, W]
    total = weight.sum((2, 3))
    xs = torch.arange(w, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64)
    cx = (weight * xs).sum((2, 3)) / total
    cy = (weight * ys[:, None]).sum((2, 3)) / total
    scores = total / intensity.sum((1, 2))[:, None]  # [B, K] in (0, 1]
    return torch.stack([cx, cy], -1), scores


class CentroidStudent(nn.Module):
    """A flip-equivariant 'student': coords from intensity centroids."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            geometry=GEOMETRY, input_size=GEOMETRY.input_size, heatmap_size=GEOMETRY.heatmap_size
        )
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> StudentOutput:
        xy, scores = _centroids(images)
        coords = xy / torch.tensor([IN_W, IN_H], dtype=torch.float64)
        z = torch.zeros(images.shape[0], NUM_KEYPOINTS, 2)
        return StudentOutput(coords.float(), scores.float(), z + 1, z, z)


class CentroidTeacher(nn.Module):
    """A 'teacher' drawing Gaussian heatmaps at the centre of mass, left joints 6 px left of it
    and right joints 6 px right of it (so that a flip test without swapping would fail)."""

    OFFSET = 6.0

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            geometry=GEOMETRY, input_size=GEOMETRY.input_size, heatmap_size=GEOMETRY.heatmap_size
        )
        self.codec = HeatmapCodec(GEOMETRY)

    def positions(self, images: torch.Tensor) -> np.ndarray:
        xy, _ = _centroids(images)
        centre = xy[:, 0].numpy()  # [B, 2] the nose ramp is flat: plain centre of mass
        offsets = np.array([0.0] + [-self.OFFSET, self.OFFSET] * 8)  # left odd, right even
        pos = np.repeat(centre[:, None], NUM_KEYPOINTS, axis=1)
        pos[..., 0] += offsets
        return pos  # [B, K, 2] crop px

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        mu = self.positions(images) / self.codec.stride  # [B, K, 2] heatmap px, not rounded
        w_hm, h_hm = self.config.heatmap_size
        gx = np.exp(-0.5 * ((np.arange(w_hm) - mu[..., :1]) / 1.5) ** 2)  # [B, K, W_hm]
        gy = np.exp(-0.5 * ((np.arange(h_hm) - mu[..., 1:]) / 1.5) ** 2)  # [B, K, H_hm]
        heatmaps = gy[..., :, None] * gx[..., None, :]  # [B, K, H_hm, W_hm]
        z = torch.zeros(images.shape[0], NUM_KEYPOINTS, 4)
        return TeacherOutput(torch.from_numpy(heatmaps).float(), z, z)


@pytest.fixture(scope="module")
def stub_instances(tmp_path_factory) -> list[PersonInstance]:
    root = tmp_path_factory.mktemp("stub")
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (9, 9), 3)
    image[20:50, 30:60] = 255  # something off-centre for the centroid to find
    path = root / "img.png"
    cv2.imwrite(str(path), image)
    instances = []
    for i, box in enumerate([(10.0, 5.0, 60.0, 70.0), (40.0, 20.0, 50.0, 60.0)]):
        center, scale = box_to_center_scale(box, aspect_ratio=IN_W / IN_H)
        instances.append(
            PersonInstance(
                index=i,
                image_id=1,
                ann_id=-1,
                image_path=str(path),
                bbox=box,
                score=0.8,
                keypoints=np.zeros((NUM_KEYPOINTS, 3), np.float32),
                center=center,
                scale=scale,
                area=box[2] * box[3],
            )
        )
    return instances


def _kpts(preds: list[dict]) -> np.ndarray:
    return np.stack([p["keypoints"] for p in preds])  # [N, K, 3]


def test_flip_student_output_formulas():
    coords = np.random.default_rng(0).uniform(0, 1, (2, NUM_KEYPOINTS, 2))
    scores = np.arange(2 * NUM_KEYPOINTS, dtype=np.float64).reshape(2, NUM_KEYPOINTS)
    c, s = flip_student_output(coords, scores, 192, "corrected")
    np.testing.assert_allclose(c[:, 1, 0], 1 - coords[:, 2, 0] - 1 / 192)
    np.testing.assert_allclose(c[:, 1, 1], coords[:, 2, 1])
    np.testing.assert_allclose(s, scores[:, FLIP_INDEX])
    c, s = flip_student_output(coords, scores, 192, "official")
    np.testing.assert_allclose(c[:, 1, 0], 1 - coords[:, 2, 0])
    np.testing.assert_allclose(s, scores)  # the released code does not swap the scores
    with pytest.raises(BadConfigError):
        flip_student_output(coords, scores, 192, "mmpose")


def test_student_flip_corrected_matches_unflipped_official_is_half_pixel_off(stub_instances):
    model = CentroidStudent()
    plain = _kpts(
        predict_instances(model, stub_instances, InferConfig(False, batch_size=2, device="cpu"))
    )
    corrected = predict_instances(
        model, stub_instances, InferConfig(True, "corrected", device="cpu")
    )
    official = predict_instances(model, stub_instances, InferConfig(True, "official", device="cpu"))
    # the stub's scores differ between left and right joints: the swap matters
    assert np.abs(plain[:, 1, 2] - plain[:, 2, 2]).min() > 0.01
    np.testing.assert_allclose(_kpts(corrected), plain, atol=1e-4)
    # official: x lands half an input pixel to the right (in image px: times the crop's zoom)
    off = _kpts(official)
    zoom = np.array([inst.scale[0] * 200 / IN_W for inst in stub_instances])  # image px / crop px
    shift = np.broadcast_to(0.5 * zoom[:, None], off.shape[:2])
    np.testing.assert_allclose(off[..., 0] - plain[..., 0], shift, atol=1e-4)
    np.testing.assert_allclose(off[..., 1], plain[..., 1], atol=1e-4)
    expected_scores = 0.5 * (plain[..., 2] + plain[..., 2][:, FLIP_INDEX])
    np.testing.assert_allclose(off[..., 2], expected_scores, atol=1e-5)


def test_student_decoding_to_image_pixels_and_scores(stub_instances):
    model = CentroidStudent()
    preds = predict_instances(model, stub_instances, InferConfig(flip=False, device="cpu"))
    for inst, pred in zip(stub_instances, preds, strict=True):
        crop = render_crop(
            cv2.imread(inst.image_path), eval_crop_spec(inst), inst.keypoints, (IN_W, IN_H)
        )
        xy, scores = _centroids(normalize(crop.image)[None])
        expected = crop_to_image(xy.numpy(), inst.center[None], inst.scale[None], (IN_W, IN_H))[0]
        np.testing.assert_allclose(pred["keypoints"][:, :2], expected, atol=1e-3)
        np.testing.assert_allclose(pred["keypoints"][:, 2], scores[0].numpy(), atol=1e-5)
        mean_above = scores[0].numpy()[scores[0].numpy() > 0.2].mean()
        assert pred["score"] == pytest.approx(0.8 * mean_above, rel=1e-5)
        assert pred["area"] == pytest.approx(np.prod(inst.scale * 200.0), rel=1e-5)
        assert pred["image_id"] == 1 and pred["box_score"] == pytest.approx(0.8)


def test_use_scores_false_ranks_by_box_score(stub_instances):
    preds = predict_instances(
        CentroidStudent(), stub_instances, InferConfig(use_scores=False, device="cpu")
    )
    assert np.all(_kpts(preds)[..., 2] == 1.0)
    assert [p["score"] for p in preds] == pytest.approx([0.8, 0.8])


def test_teacher_flip_test_with_heatmaps(stub_instances):
    model = CentroidTeacher()
    stats: dict = {}
    plain = _kpts(
        predict_instances(model, stub_instances, InferConfig(False, dark=True, device="cpu"))
    )
    dark = InferConfig(True, dark=True, device="cpu")
    flipped = _kpts(predict_instances(model, stub_instances, dark, stats=stats))
    zoom = np.array([inst.scale[0] * 200 / IN_W for inst in stub_instances])[:, None]
    # flip_back's one-pixel shift approximates the 3/4-px mirror offset at stride 4: within
    # a crop pixel; without the left/right swap the joints would be 12 px apart
    assert np.abs(flipped[..., 0] - plain[..., 0]).max() < 1.0 * zoom.max()
    assert np.all(flipped[:, 1::2, 0] < flipped[:, 2::2, 0])  # left joints stay on the left
    assert (
        stats["samples"] == 2 and stats["samples_per_s"] > 0 and stats["forward_samples_per_s"] > 0
    )
    # DARK recovers the sub-pixel positions the stub drew
    for inst, pred in zip(stub_instances, plain, strict=True):
        crop = render_crop(
            cv2.imread(inst.image_path), eval_crop_spec(inst), inst.keypoints, (IN_W, IN_H)
        )
        pos = model.positions(normalize(crop.image)[None])
        expected = crop_to_image(pos, inst.center[None], inst.scale[None], (IN_W, IN_H))[0]
        err = np.abs(pred[:, :2] - expected) / (inst.scale[0] * 200 / IN_W)  # crop px
        assert err.max() < 0.35
        assert np.all(pred[:, 2] > 0.5)  # heatmap maxima are the scores


class OracleStudent(nn.Module):
    """Answers, batch after batch, the ground truth of the instances it is given (no flip)."""

    def __init__(self, coords: np.ndarray, scores: np.ndarray) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            geometry=GEOMETRY, input_size=GEOMETRY.input_size, heatmap_size=GEOMETRY.heatmap_size
        )
        self.coords, self.scores, self.next = coords, scores, 0

    def forward(self, images: torch.Tensor) -> StudentOutput:
        n, start = images.shape[0], self.next
        self.next += n
        coords = torch.from_numpy(self.coords[start : start + n]).float()
        scores = torch.from_numpy(self.scores[start : start + n]).float()
        return StudentOutput(coords, scores, coords, coords, coords)


def test_ground_truth_through_the_whole_pipeline_scores_ap_one():
    instances = load_coco_instances(ANN, IMAGES, aspect_ratio=IN_W / IN_H)
    crops = [
        render_crop(cv2.imread(i.image_path), eval_crop_spec(i), i.keypoints, (IN_W, IN_H))
        for i in instances
    ]
    coords = np.stack([c.keypoints for c in crops]) / np.array([IN_W, IN_H])  # normalized
    scores = np.stack([(i.keypoints[:, 2] > 0).astype(np.float32) for i in instances])
    model = OracleStudent(coords, scores)
    preds = predict_instances(model, instances, InferConfig(False, batch_size=5, device="cpu"))
    kept = [preds[i] for i in oks_nms(preds)]
    assert len(kept) == len(instances)  # distinct people all survive OKS-NMS
    metrics = coco_keypoint_eval(ANN, to_coco_results(kept))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR"] == pytest.approx(1.0)


def test_default_use_scores_from_meta():
    assert default_use_scores("student", {"losses": ["reg"]}) is False
    assert default_use_scores("student", {"losses": ["reg", "kt", "vt", "sh", "cs"]}) is True
    assert default_use_scores("student", {"losses": "reg,sh"}) is False
    assert default_use_scores("student", {"losses": "reg=1,cs=0.01"}) is True
    assert default_use_scores("student", {"losses": {"reg": 1.0, "cs": 0.0}}) is False
    assert default_use_scores("student", {}) is True  # unknown recipe
    assert default_use_scores("teacher", {"losses": ["heatmap"]}) is True


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, meta in [
        ("distilpose_tiny", {"losses": ["reg", "kt", "vt", "sh", "cs"]}),
        ("tokenpose_tiny", {}),
    ]:
        paths[name] = root / f"{name}.pth"
        save_checkpoint(paths[name], build_model(name), meta=meta)
    paths["undistilled"] = root / "undistilled.pth"
    save_checkpoint(paths["undistilled"], build_model("distilpose_tiny"), meta={"losses": ["reg"]})
    return paths


def _check_results_json(path: str, num: int) -> list[dict]:
    results = json.loads(Path(path).read_text())
    assert isinstance(results, list) and len(results) == num
    gt_ids = {img["id"] for img in json.loads(ANN.read_text())["images"]}
    for r in results:
        assert r["image_id"] in gt_ids and r["category_id"] == 1
        assert len(r["keypoints"]) == 51 and 0.0 <= r["score"] <= 1.0
    return results


def test_run_eval_student_gt_boxes_and_detections(tiny_ckpts, tmp_path):
    torch.set_num_threads(1)
    ckpt = tiny_ckpts["distilpose_tiny"]
    res = run_eval(ckpt, ANN, IMAGES, config=InferConfig(device="cpu", batch_size=8))
    assert res["role"] == "student" and res["model"] == "distilpose_tiny"
    assert 0.0 <= res["AP"] <= 1.0 and 0.0 <= res["AR"] <= 1.0
    assert res["num_instances"] == 12  # people with labelled keypoints
    assert res["results_json"] == str(ckpt.with_name("distilpose_tiny_results.json"))
    _check_results_json(res["results_json"], res["num_results"])
    assert res["samples_per_s"] > 0 and res["device"] == "cpu" and res["use_scores"] is True
    table = format_metrics_table(res)
    assert "AP50" in table and "samples/s" in table

    out = tmp_path / "dets_results.json"
    cpu = InferConfig(device="cpu")
    res = run_eval(ckpt, ANN, IMAGES, dets_file=DETS, det_score_thr=0.5, config=cpu, out_json=out)
    assert res["num_instances"] == 18 and res["results_json"] == str(out)
    assert 1 <= res["num_results"] <= 18  # OKS-NMS may drop duplicates
    _check_results_json(res["results_json"], res["num_results"])
    assert 0.0 <= res["AP"] <= 1.0


def test_run_eval_undistilled_student_ignores_its_scores(tiny_ckpts, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="distilpose.inference.eval_run"):
        res = run_eval(tiny_ckpts["undistilled"], ANN, IMAGES, out_json=tmp_path / "r.json")
    assert res["use_scores"] is False
    assert "confidence loss" in caplog.text
    results = _check_results_json(res["results_json"], res["num_results"])
    assert all(r["score"] == 1.0 for r in results)  # GT boxes score 1 and scores are ignored
    forced = run_eval(
        tiny_ckpts["undistilled"],
        ANN,
        IMAGES,
        config=InferConfig(flip=False, use_scores=True),
        out_json=tmp_path / "f.json",
    )
    assert forced["use_scores"] is True


def test_infer_config_refuses_bad_settings():
    with pytest.raises(BadConfigError, match="flip_mode: got 'mirror'"):
        InferConfig(flip_mode="mirror")
    with pytest.raises(BadConfigError, match="batch_size: got 0"):
        InferConfig(batch_size=0)


def test_run_eval_teacher(tiny_ckpts, tmp_path):
    res = run_eval(
        tiny_ckpts["tokenpose_tiny"],
        ANN,
        IMAGES,
        config=InferConfig(dark=True),
        out_json=tmp_path / "t.json",
    )
    assert res["role"] == "teacher" and 0.0 <= res["AP"] <= 1.0
    _check_results_json(res["results_json"], res["num_results"])
    assert "teacher" in format_metrics_table(res)


def test_predict_source_whole_image_and_boxes(tiny_ckpts, tmp_path):
    image = IMAGES / "000000000785.jpg"
    out = tmp_path / "whole.json"
    results = predict_source(
        Inferencer(tiny_ckpts["distilpose_tiny"], "none"),
        [image],
        out_json=out,
        overlay_dir=tmp_path / "ov",
    )["results"]
    assert json.loads(out.read_text()) == results
    assert len(results) == 1 and results[0]["image_id"] == 785
    h, w = cv2.imread(str(image)).shape[:2]
    assert results[0]["bbox"] == [0.0, 0.0, float(w), float(h)]
    overlay = cv2.imread(str(tmp_path / "ov" / "000000000785_pose.png"))
    assert overlay is not None and overlay.shape == (h, w, 3)

    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps(
            [
                {
                    "file_name": "000000000785.jpg",
                    "bbox": [280.0, 44.0, 218.0, 346.0],
                    "score": 0.9,
                },
                {"image_id": 785, "bbox": [10.0, 10.0, 100.0, 200.0]},
                {"image_id": 40083, "bbox": [1.0, 1.0, 5.0, 5.0]},  # another image: ignored
                {"file_name": "000000000785.jpg", "bbox": [0, 0, 5, 5], "category_id": 2},
            ]
        )
    )
    # a folder: images without boxes have no people; 40083's box is used
    no_flip = InferConfig(flip=False)
    boxed = Inferencer(tiny_ckpts["distilpose_tiny"], BoxesFile(boxes), config=no_flip)
    results = predict_source(boxed, [IMAGES], out_json=out)["results"]
    assert [(r["file_name"], r["image_id"]) for r in results] == [
        ("000000000785.jpg", 785),
        ("000000000785.jpg", 785),
        ("000000040083.jpg", 40083),
    ]
    # one image: the other image's box is ignored
    results = predict_source(boxed, [image], out_json=out)["results"]
    assert [r["bbox"] for r in results] == [[280.0, 44.0, 218.0, 346.0], [10.0, 10.0, 100.0, 200.0]]
    xs = np.array(results[0]["keypoints"]).reshape(17, 3)[:, 0]
    assert np.all((xs >= 280.0 - 60) & (xs <= 280.0 + 218 + 60))  # inside the padded box

    boxes.write_text(json.dumps([{"file_name": "000000000785.jpg", "bbox": [0, 0, 0, 10]}]))
    with pytest.raises(BadAnnotationError, match="bbox"):
        boxed = Inferencer(tiny_ckpts["distilpose_tiny"], BoxesFile(boxes))
        predict_source(boxed, [image], out_json=out)
