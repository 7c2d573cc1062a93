"""COCO keypoint evaluation as pure functions around pycocotools.

The protocol is MMPose 0.x's top-down one, which the official DistilPose numbers come from:

1. every person gets an instance score: box score x mean of its keypoint scores above 0.2
   (`rescore`, the paper's Eq. 3);
2. per image, people are sorted by that score and any person whose OKS with a higher-scored one
   exceeds 0.9 is dropped (`oks_nms`; the area is `prod(scale * 200)` of the crop box);
3. the survivors go to pycocotools' `COCOeval(iouType="keypoints")` (`coco_keypoint_eval`).

A prediction here is a dict with at least `image_id`, `keypoints` ([K, 3] image pixels plus the
keypoint score), `score` (the instance score) and `area`; `distilpose.inference.topdown` makes them.
No file or command-line handling lives here beyond what pycocotools needs to read a file.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distilpose.data.keypoints import OKS_SIGMAS

# COCOeval's `stats` for iouType="keypoints", in its order.
COCO_KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def keypoint_similarity(
    d2: np.ndarray, area: float | np.ndarray, sigmas: np.ndarray = OKS_SIGMAS
) -> np.ndarray:
    """COCO's per-keypoint OKS term exp(-d^2 / (2 s^2 k^2)), s^2 = area, k = 2 sigma.

    Args:
        d2: [..., K] squared distances (pixels^2).
        area: the object area (pixels^2), a number or an array broadcasting against `d2`.
        sigmas: [K] per-keypoint OKS sigmas (COCO's by default).

    Returns:
        [..., K] similarities in (0, 1].
    """
    variances = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2  # [K]
    return np.exp(-(d2 / variances / (np.asarray(area, dtype=np.float64) + np.spacing(1)) / 2.0))


def oks_iou(
    kpts: np.ndarray,
    others: np.ndarray,
    area: float,
    other_areas: np.ndarray,
    sigmas: np.ndarray = OKS_SIGMAS,
    vis_thr: float | None = None,
) -> np.ndarray:
    """Object keypoint similarity of one pose against several (COCO's OKS, as MMPose 0.x).

    Args:
        kpts: [K, 3] or [K, 2] one pose (x, y[, score]).
        others: [N, K, 3] or [N, K, 2] the poses to compare with.
        area: the pose's area (pixels^2); the mean of the two areas scales the distance.
        other_areas: [N] their areas.
        sigmas: [K] per-keypoint OKS sigmas (COCO's by default).
        vis_thr: if set, only keypoints whose score exceeds it in BOTH poses count.

    Returns:
        [N] OKS values in [0, 1] (0 where no keypoint counts).
    """
    kpts = np.asarray(kpts, dtype=np.float64)
    others = np.asarray(others, dtype=np.float64).reshape(-1, *kpts.shape)
    d2 = ((others[:, :, :2] - kpts[None, :, :2]) ** 2).sum(-1)  # [N, K]
    mean_area = (area + np.asarray(other_areas, dtype=np.float64)) / 2.0  # [N]
    similarity = keypoint_similarity(d2, mean_area[:, None], sigmas)  # [N, K]
    if vis_thr is None:
        return similarity.mean(axis=1)
    valid = (kpts[None, :, 2] > vis_thr) & (others[:, :, 2] > vis_thr)  # [N, K]
    counts = valid.sum(axis=1)
    total = (similarity * valid).sum(axis=1)
    return np.where(counts > 0, total / np.maximum(counts, 1), 0.0)


def oks_nms(
    predictions: Sequence[dict],
    thr: float = 0.9,
    sigmas: np.ndarray = OKS_SIGMAS,
    vis_thr: float | None = None,
) -> list[int]:
    """Greedy OKS non-maximum suppression, per image (MMPose 0.x `oks_nms`).

    Within each image, predictions are taken by decreasing `score`; one is dropped when its OKS
    with an already kept prediction is above `thr`. Uses `keypoints` ([K, 3] or flat [3K]),
    `score` and `area` (the official protocol's `prod(scale * 200)`).

    Ties: among equal scores the prediction LATER in `predictions` is taken first, so of tied
    duplicates the last one is kept. This is MMPose 0.x's `scores.argsort()[::-1]` as it ran
    then (numpy's quicksort sorted small arrays by insertion, which is stable); here the sort is
    stable by request, so the rule holds for any number of people and any numpy (whose newer
    SIMD sorts leave MMPose's own tie order undefined). Ties are common: with box-score-only
    ranking every ground-truth box of an image has the same score.

    Returns:
        Indices into `predictions` of the kept ones, in ascending order.
    """
    by_image: dict[int, list[int]] = defaultdict(list)
    for i, pred in enumerate(predictions):
        by_image[int(pred["image_id"])].append(i)

    keep: list[int] = []
    for indices in by_image.values():
        kpts = np.stack([np.asarray(predictions[i]["keypoints"]).reshape(-1, 3) for i in indices])
        scores = np.array([float(predictions[i]["score"]) for i in indices])
        areas = np.array([float(predictions[i]["area"]) for i in indices])
        order = np.argsort(scores, kind="stable")[::-1]  # ties: the later one first
        while order.size > 0:
            best = order[0]
            keep.append(indices[best])
            rest = order[1:]
            if rest.size == 0:
                break
            oks = oks_iou(kpts[best], kpts[rest], areas[best], areas[rest], sigmas, vis_thr)
            order = rest[oks <= thr]
    return sorted(keep)


def rescore(keypoint_scores: np.ndarray, box_score: float, thr: float = 0.2) -> float:
    """Instance score = box score x mean of the keypoint scores above `thr` (paper Eq. 3).

    When no keypoint score exceeds `thr`, the mean is taken as 0 (as MMPose 0.x does), so such a
    person ranks last.
    """
    s = np.asarray(keypoint_scores, dtype=np.float64).reshape(-1)
    valid = s > thr
    mean = float(s[valid].mean()) if valid.any() else 0.0
    return float(box_score) * mean


def to_coco_results(predictions: Sequence[dict], category_id: int = 1) -> list[dict]:
    """COCO keypoint results: one dict per prediction with `image_id`, `category_id`,
    `keypoints` (flat [3K]: x, y, keypoint score) and `score` (the instance score), all plain
    Python numbers so that `json.dump` takes them."""
    results = []
    for pred in predictions:
        kpts = np.asarray(pred["keypoints"], dtype=np.float64).reshape(-1, 3)
        results.append(
            {
                "image_id": int(pred["image_id"]),
                "category_id": int(category_id),
                "keypoints": [round(float(v), 3) for v in kpts.reshape(-1)],
                "score": float(pred["score"]),
            }
        )
    return results


def load_coco(ann_file: str | Path):
    """pycocotools' COCO for a keypoint annotation file, without its prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def coco_keypoint_eval(ann_file_or_coco, results: Sequence[dict]) -> dict[str, float]:
    """pycocotools keypoint AP/AR of `results` (COCO results format) against the annotations.

    Args:
        ann_file_or_coco: an annotation file path or an already loaded `pycocotools.coco.COCO`.
        results: COCO keypoint results (`to_coco_results` output); may be empty.

    Returns:
        {"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"} in [0, 1],
        or -1 (pycocotools' convention) for an area range without ground truth. An empty result
        list scores 0 everywhere. pycocotools' printout is swallowed.
    """
    if not results:
        return dict.fromkeys(COCO_KEYPOINT_METRICS, 0.0)
    from pycocotools.cocoeval import COCOeval

    coco = (
        load_coco(ann_file_or_coco)
        if isinstance(ann_file_or_coco, str | Path)
        else ann_file_or_coco
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco.loadRes([dict(r) for r in results])  # loadRes adds keys: pass copies
        coco_eval = COCOeval(coco, coco_dt, iouType="keypoints")
        coco_eval.params.useSegm = None
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(v) for name, v in zip(COCO_KEYPOINT_METRICS, coco_eval.stats, strict=True)}


def keypoint_errors(coco, results: Sequence[dict], pck_thr: float = 0.05) -> dict[str, float]:
    """PCK and mean pixel error of `results` against `coco`'s labelled joints.

    Each ground-truth person (not crowd, with labelled joints) takes the result in its image with
    the highest OKS (greedy over people, each result used once). A labelled joint counts as
    correct when its predicted position lies within `pck_thr` x the longer side of the person's
    box (PCK@0.05 of the box size); people without a result count as wrong. The pixel error is
    the mean Euclidean distance in image pixels over the joints of matched people. Unlike AP it
    moves when predictions improve below OKS's thresholds.

    Returns: {"PCK": fraction of joints, "pixel_error": px, "matched": people matched}.
    """
    by_image: dict[int, list[np.ndarray]] = defaultdict(list)
    for r in results:
        by_image[int(r["image_id"])].append(np.asarray(r["keypoints"], np.float64).reshape(-1, 3))
    correct = total = 0
    errors: list[np.ndarray] = []
    matched = 0
    for image_id in coco.getImgIds():
        anns = [
            a
            for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
            if a.get("num_keypoints", 0) > 0
        ]
        preds = by_image.get(image_id, [])
        free = list(range(len(preds)))
        for a in anns:
            gt = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
            labelled = gt[:, 2] > 0
            total += int(labelled.sum())
            if not free:
                continue
            others = np.stack([preds[i] for i in free])
            area = float(a.get("area", 0.0)) or float(a["bbox"][2] * a["bbox"][3])
            d2 = ((others[:, :, :2] - gt[None, :, :2]) ** 2).sum(-1)  # [N, K]
            var = (2.0 * OKS_SIGMAS) ** 2
            oks = (np.exp(-d2 / var / (2 * area + np.spacing(1)))[:, labelled]).mean(1)
            best = int(np.argmax(oks))
            dist = np.sqrt(d2[best][labelled])
            free.pop(best)
            matched += 1
            correct += int((dist <= pck_thr * max(a["bbox"][2], a["bbox"][3])).sum())
            errors.append(dist)
    return {
        "PCK": correct / max(total, 1),
        "pixel_error": float(np.concatenate(errors).mean()) if errors else float("nan"),
        "matched": matched,
    }


def mean_pose_results(train_coco, coco) -> list[dict]:
    """The mean pose as a prediction: every person of `coco` (with labelled joints, not crowd)
    gets the training people's mean joint positions placed in its ground-truth box.

    The mean of each joint is taken over `train_coco`'s labelled joints, in box-relative
    coordinates ((x - x0) / w, (y - y0) / h). It is what a regressor that has not yet left the
    mean pose scores (`keypoint_errors` of it), the floor a trained student must beat.

    Returns: results as `keypoint_errors` reads them ([K, 3] keypoints flattened, score 1).
    """
    total, count = None, None
    for a in _people(train_coco):
        k = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
        x, y, w, h = (float(v) for v in a["bbox"])
        if total is None:
            total, count = np.zeros((len(k), 2)), np.zeros(len(k))
        seen = k[:, 2] > 0
        total[seen] += (k[seen, :2] - (x, y)) / (max(w, 1e-6), max(h, 1e-6))
        count[seen] += 1
    if total is None:
        raise ValueError("mean_pose_results: the training set has no person with labelled joints")
    mean = total / np.maximum(count, 1)[:, None]  # [K, 2] box-relative
    results = []
    for a in _people(coco):
        x, y, w, h = (float(v) for v in a["bbox"])
        kpts = np.concatenate([mean * (w, h) + (x, y), np.ones((len(mean), 1))], 1)
        results.append({"image_id": a["image_id"], "keypoints": kpts.reshape(-1).tolist(),
                        "score": 1.0})  # fmt: skip
    return results


def _people(coco) -> list[dict]:
    """`coco`'s people with labelled joints, not crowd."""
    anns = coco.loadAnns(coco.getAnnIds(iscrowd=False))
    return [a for a in anns if a.get("num_keypoints", 0) > 0]
