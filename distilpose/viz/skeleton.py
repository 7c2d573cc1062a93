"""The one skeleton drawer: which limbs and joints of a person are drawn, in which colours.

Colour rule (one for every picture): joints named `left_*` and limbs joining two of them in
blue, `right_*` in orange, the rest (the nose, limbs across the body) in green, matplotlib's
tab10 colours. It reads the side from the COCO-17 keypoint names, so a joint without a side
name is middle. (`distilpose predict` overlays used the opposite colours until they were drawn
here.) `skeleton` picks and colours; `draw_pose` draws on a BGR image with OpenCV (overlays,
whole-image pictures), `plot_skeleton` on a matplotlib axes (the crop figures).
"""

from __future__ import annotations

import cv2
import numpy as np

from distilpose.data.keypoints import KEYPOINT_NAMES, SKELETON

LEFT_COLOR, RIGHT_COLOR, MIDDLE_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"
BOX_COLOR_BGR = (160, 160, 160)


def hex_to_bgr(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (b, g, r) for OpenCV."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return b, g, r


def joint_color(k: int) -> str:
    name = KEYPOINT_NAMES[k] if k < len(KEYPOINT_NAMES) else ""
    if name.startswith("left_"):
        return LEFT_COLOR
    if name.startswith("right_"):
        return RIGHT_COLOR
    return MIDDLE_COLOR


def limb_color(a: int, b: int) -> str:
    ca, cb = joint_color(a), joint_color(b)
    return ca if ca == cb else MIDDLE_COLOR


def skeleton(
    keypoints: np.ndarray, kpt_thr: float | None = None
) -> tuple[list[tuple[int, int, str]], list[tuple[int, str]]]:
    """The limbs [(a, b, colour)] and joints [(k, colour)] to draw for one person.

    Args:
        keypoints: [K, 2] (all joints drawn) or [K, 3] with a score per joint: joints scoring
            <= `kpt_thr`, and limbs touching them, are left out.
    """
    kpts = np.asarray(keypoints, dtype=np.float64)
    k = len(kpts)
    shown = np.ones(k, bool)
    if kpt_thr is not None and kpts.ndim == 2 and kpts.shape[1] > 2:
        shown = kpts[:, 2] > kpt_thr
    limbs = [
        (a, b, limb_color(a, b)) for a, b in SKELETON if a < k and b < k and shown[a] and shown[b]
    ]
    joints = [(j, joint_color(j)) for j in np.flatnonzero(shown).tolist()]
    return limbs, joints


def draw_pose(
    image: np.ndarray,
    keypoints: np.ndarray,
    bbox: tuple[float, float, float, float] | None = None,
    kpt_thr: float = 0.3,
    *,
    color: tuple[int, int, int] | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """Draw one person on `image` (uint8 BGR, in place, also returned).

    Args:
        keypoints: [K, 3] image px and keypoint score; joints scoring <= `kpt_thr` are skipped,
            and so are limbs touching them.
        bbox: optional [x, y, w, h] box, drawn thin and grey.
        color: one BGR colour for this person's limbs and joints (telling people apart on a
            crowded image); None: the side colours.
        thickness: line thickness; None: scaled to the image (1 px per 250 px of its short side).
    """
    kpts = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    thick = thickness or max(1, round(min(image.shape[:2]) / 250))
    if bbox is not None:
        x, y, w, h = bbox
        cv2.rectangle(image, (round(x), round(y)), (round(x + w), round(y + h)), BOX_COLOR_BGR, 1)
    limbs, joints = skeleton(kpts, kpt_thr)
    xy = [(round(x), round(y)) for x, y in kpts[:, :2]]
    for a, b, c in limbs:
        cv2.line(image, xy[a], xy[b], color or hex_to_bgr(c), thick + 1, cv2.LINE_AA)
    for j, c in joints:
        cv2.circle(image, xy[j], thick + 2, color or hex_to_bgr(c), -1, cv2.LINE_AA)
        cv2.circle(image, xy[j], thick + 2, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def plot_skeleton(ax, coords: np.ndarray, lw: float = 1.0, joint_size: float | None = None) -> None:
    """Draw one person's skeleton on a matplotlib axes in image coordinates.

    Args:
        coords: [K, 2] joint positions in the axes' data (pixel) coordinates.
        joint_size: scatter size of the joints (white-edged, side colours); None: limbs only.
    """
    pts = np.asarray(coords, dtype=np.float64)[:, :2]
    limbs, joints = skeleton(pts)
    for a, b, c in limbs:
        ax.plot(pts[[a, b], 0], pts[[a, b], 1], color=c, lw=lw, alpha=0.9)
    if joint_size is not None:
        index = [j for j, _ in joints]
        ax.scatter(
            pts[index, 0], pts[index, 1], s=joint_size, c=[c for _, c in joints],
            edgecolors="white", zorder=3,
        )  # fmt: skip
