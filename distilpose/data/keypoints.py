"""COCO-17 person keypoints: names, left/right pairs, skeleton and OKS sigmas, in one place.

Indices are 0-based everywhere in this project; the COCO file format's 1-based skeleton is made
only by `coco_person_category()` when writing annotation files.
"""

from __future__ import annotations

import numpy as np

NUM_KEYPOINTS = 17

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# Each left joint with its right mirror; a horizontal flip swaps the two.
FLIP_PAIRS: tuple[tuple[int, int], ...] = tuple((i, i + 1) for i in range(1, NUM_KEYPOINTS, 2))


def _flip_index() -> list[int]:
    index = list(range(NUM_KEYPOINTS))
    for left, right in FLIP_PAIRS:
        index[left], index[right] = right, left
    return index


# FLIP_INDEX[k] is the joint that k becomes after a flip: `flipped = keypoints[FLIP_INDEX]`.
FLIP_INDEX: list[int] = _flip_index()

# The COCO skeleton (limbs to draw), 0-based.
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
)

# Per-joint OKS falloff of the COCO keypoint benchmark (pycocotools' values).
OKS_SIGMAS: np.ndarray = (
    np.array(
        [
            0.26,
            0.25,
            0.25,
            0.35,
            0.35,
            0.79,
            0.79,
            0.72,
            0.72,
            0.62,
            0.62,
            1.07,
            1.07,
            0.87,
            0.87,
            0.89,
            0.89,
        ]
    )
    / 10.0
)

# Half-body augmentation picks one of these two sets (MMPose's upper_body_ids / lower_body_ids).
UPPER_BODY_IDS: tuple[int, ...] = tuple(range(11))
LOWER_BODY_IDS: tuple[int, ...] = tuple(range(11, NUM_KEYPOINTS))


def coco_person_category() -> dict:
    """The standard `categories` entry of a COCO person-keypoints file (1-based skeleton)."""
    return {
        "supercategory": "person",
        "id": 1,
        "name": "person",
        "keypoints": list(KEYPOINT_NAMES),
        "skeleton": [[a + 1, b + 1] for a, b in SKELETON],
    }
