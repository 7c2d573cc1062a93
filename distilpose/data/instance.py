"""`PersonInstance`: one person to crop, as the COCO loader makes it and crop specs read it.

Its own module, below both `coco` (which fills it) and `crop` (whose specs take it), so the two
import in one direction: coco -> crop -> instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class PersonInstance:
    """One person to crop (ground-truth box or detection)."""

    index: int  # position in the dataset list (image_id, then ann id / detection order)
    image_id: int
    ann_id: int  # -1 for detections
    image_path: str  # resolved, inside the image root
    bbox: tuple[float, float, float, float]  # x, y, w, h image px (GT: clipped as MMPose 0.x)
    score: float  # 1.0 for ground-truth boxes, detector score otherwise
    keypoints: np.ndarray  # [K, 3] float32 (x, y, visibility 0/1/2) image px; zeros for detections
    center: np.ndarray  # [2] float32
    scale: np.ndarray  # [2] float32, units of 200 px
    area: float  # annotation area (GT) or w * h
