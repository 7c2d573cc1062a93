"""Every person's skeleton on a whole image, from COCO-format keypoint results."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from distilpose.data.keypoints import NUM_KEYPOINTS
from distilpose.errors import BadAnnotationError, BadConfigError
from distilpose.limits import load_json
from distilpose.viz.common import write_png_bgr
from distilpose.viz.skeleton import draw_pose

PREDICTIONS_MAX_SIDE = 640  # whole-image pictures are resized so their longer side is this
# BGR person colours for OpenCV drawings (tab10 without the greys).
PERSON_COLORS_BGR = (
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (34, 189, 188),
    (207, 190, 23),
)


def _image_id_from_name(path: str | Path) -> int | None:
    digits = re.findall(r"\d+", Path(path).stem)
    return int(digits[-1]) if digits else None


def draw_skeletons(
    image_bgr: np.ndarray,
    people: Sequence[np.ndarray],
    out_png: str | Path,
    *,
    labels: Sequence[str] | None = None,
    kpt_thr: float = 0.2,
    max_side: int = PREDICTIONS_MAX_SIDE,
) -> Path:
    """Every person's skeleton on a whole image (OpenCV), resized so its longer side is `max_side`.

    Args:
        image_bgr: [H, W, 3] uint8.
        people: per person [K, 3] (x, y, score) image pixels; joints scoring <= `kpt_thr`
            are left out.
        labels: optional text per person (drawn at its top-left joint).
    """
    h, w = image_bgr.shape[:2]
    factor = max_side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    canvas = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    for p, kpts in enumerate(people):
        kpts = np.asarray(kpts, np.float64).reshape(-1, 3) * (factor, factor, 1.0)
        color = PERSON_COLORS_BGR[p % len(PERSON_COLORS_BGR)]
        draw_pose(canvas, kpts, kpt_thr=kpt_thr, color=color, thickness=1)
        xy = np.round(kpts[:, :2]).astype(int)
        shown = kpts[:, 2] > kpt_thr
        if labels is not None and shown.any():
            x0, y0 = xy[shown].min(0)
            org = (int(x0), max(12, int(y0) - 6))
            cv2.putText(canvas, labels[p], org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3)
            cv2.putText(canvas, labels[p], org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1)
    return write_png_bgr(canvas, out_png)


def viz_predictions(
    results_json: str | Path | list[dict],
    image_path: str | Path,
    out_png: str | Path,
    image_id: int | None = None,
    score_thr: float = 0.3,
    *,
    kpt_thr: float = 0.2,
    max_side: int = PREDICTIONS_MAX_SIDE,
) -> Path:
    """Every person scoring >= `score_thr` in COCO keypoint results, drawn on the image.

    `image_id` defaults to the only id in the results, else to the number in the image's file
    name (COCO names files by id, e.g. 000000000785.jpg).
    """
    from distilpose.data import read_image

    if isinstance(results_json, list):
        results = results_json
    else:
        results = load_json(results_json, BadAnnotationError, "results")
    if not isinstance(results, list):
        raise BadAnnotationError(f"{results_json}: expected a list of COCO keypoint results")
    if image_id is None:
        ids = {int(r["image_id"]) for r in results if "image_id" in r}
        image_id = next(iter(ids)) if len(ids) == 1 else _image_id_from_name(image_path)
        if image_id is None:
            raise BadConfigError(f"image_id: {image_path} names no id; pass image_id")
    people, labels = [], []
    for r in results:
        if int(r.get("image_id", -1)) != image_id or float(r.get("score", 0.0)) < score_thr:
            continue
        if len(r.get("keypoints", ())) != NUM_KEYPOINTS * 3:
            raise BadAnnotationError(
                f"{results_json}: a result of image {image_id} has "
                f"{len(r.get('keypoints', ()))} keypoint values; expected {NUM_KEYPOINTS * 3}"
            )
        people.append(np.asarray(r["keypoints"], np.float64).reshape(NUM_KEYPOINTS, 3))
        labels.append(f"{float(r['score']):.2f}")
    return draw_skeletons(
        read_image(image_path), people, out_png, labels=labels, kpt_thr=kpt_thr, max_side=max_side
    )
