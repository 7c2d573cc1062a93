"""Paper Fig. 6: a crop with each joint's name and confidence score, green when correct."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from distilpose.data.keypoints import KEYPOINT_NAMES, OKS_SIGMAS
from distilpose.errors import BadConfigError
from distilpose.evaluation.metrics import keypoint_similarity
from distilpose.viz.common import (
    bgr_to_rgb,
    display_size,
    figure_pixels,
    forward_crop,
    load_instance,
    load_model,
    new_figure,
    save_figure,
    to_numpy,
)
from distilpose.viz.skeleton import plot_skeleton

CONFIDENCE_SIZE = (4.8, 6.4)  # 480 x 640 px: a 3:4 crop, like the model input
CORRECT_COLOR, WRONG_COLOR, UNKNOWN_COLOR = "#1fbf3f", "#e0201b", "#9a9a9a"


def oks_correct(
    pred_xy: np.ndarray,
    gt_keypoints: np.ndarray,
    area: float,
    thr: float = 0.5,
    sigmas: np.ndarray = OKS_SIGMAS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint correctness by COCO's OKS term (`evaluation.keypoint_similarity`) >= thr.

    Args:
        pred_xy: [K, 2] predicted joints, image pixels.
        gt_keypoints: [K, 3] ground truth (x, y, visibility), image pixels.
        area: the person's annotated area (pixels^2).
    Returns:
        (correct [K] bool, labelled [K] bool); `correct` is False where not labelled.
    """
    pred_xy = np.asarray(pred_xy, np.float64)[:, :2]
    gt = np.asarray(gt_keypoints, np.float64)
    labelled = gt[:, 2] > 0
    d2 = ((pred_xy - gt[:, :2]) ** 2).sum(-1)
    oks = keypoint_similarity(d2, float(area), sigmas)
    return (oks >= thr) & labelled, labelled


def draw_confidence(
    crop_bgr: np.ndarray,
    coords_px: np.ndarray,
    scores: np.ndarray,
    correct: np.ndarray | None,
    out_png: str | Path,
    *,
    labelled: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Paper Fig. 6: a crop with the skeleton; each joint boxed with its name and score.

    Args:
        crop_bgr: [H, W, 3] uint8 crop.
        coords_px: [K, 2] predicted joints in crop pixels.
        scores: [K] the predicted confidence scores.
        correct: [K] bool, box edge green when True, red when False; None: all grey.
        labelled: [K] bool, optional: joints without ground truth are grey whatever `correct` says.
        out_png: where to write; size `figure_pixels(CONFIDENCE_SIZE)`.
    """
    pts, scores = to_numpy(coords_px), to_numpy(scores).reshape(-1)
    if pts.shape != (scores.shape[0], 2):
        raise BadConfigError(f"coords: shape {pts.shape}; expected [{scores.shape[0]}, 2]")
    fig = new_figure(CONFIDENCE_SIZE)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(bgr_to_rgb(crop_bgr))
    ax.set_axis_off()
    h, w = crop_bgr.shape[:2]
    plot_skeleton(ax, pts, lw=2.0, joint_size=14)
    for k, (x, y) in enumerate(pts):
        if labelled is not None and not labelled[k]:
            edge = UNKNOWN_COLOR
        elif correct is None:
            edge = UNKNOWN_COLOR
        else:
            edge = CORRECT_COLOR if correct[k] else WRONG_COLOR
        name = KEYPOINT_NAMES[k] if k < len(KEYPOINT_NAMES) else str(k)
        # Right joints' labels to the left, left joints' to the right, so pairs do not collide.
        dx = -1 if name.startswith("right_") else 1 if name.startswith("left_") else 0
        ax.annotate(
            f"{name}\n{scores[k]:.2f}",
            (x, y),
            xytext=(dx * 14, 10 if dx == 0 else 0),
            textcoords="offset points",
            ha={-1: "right", 0: "center", 1: "left"}[dx],
            va="center",
            fontsize=6,
            bbox={"boxstyle": "round,pad=0.2", "fc": (1, 1, 1, 0.85), "ec": edge, "lw": 1.5},
            zorder=4,
        )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    if title:
        ax.text(
            0.01,
            0.99,
            title,
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            bbox={"boxstyle": "square,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.7},
        )
    return save_figure(fig, out_png)


def viz_confidence(
    student_ckpt: str | Path | nn.Module,
    ann_file: str | Path,
    image_root: str | Path,
    out_png: str | Path,
    instance: int = 0,
    *,
    device: str = "cpu",
) -> Path:
    """Paper Fig. 6 for one annotated person: predicted joints, scores and OKS correctness."""
    model = load_model(student_ckpt, device, role="student")
    config = model.config
    from distilpose.data import eval_crop_spec, render_crop

    input_size = config.input_size
    inst, image = load_instance(ann_file, image_root, instance)
    spec = eval_crop_spec(inst)
    crop = render_crop(image, spec, inst.keypoints, input_size)
    out = forward_crop(model, crop.image, device)
    coords = to_numpy(out.coords[0])  # [K, 2] normalized
    # Correctness is judged in image pixels, where the OKS area is defined.
    to_image = np.asarray(crop.to_image, np.float64)
    pred_img = (coords * np.asarray(input_size)) @ to_image[:, :2].T + to_image[:, 2]
    correct, labelled = oks_correct(pred_img, inst.keypoints, inst.area)
    # The same view rendered at the picture's resolution, so the crop is sharp.
    shown = display_size(input_size, figure_pixels(CONFIDENCE_SIZE)[1])
    display = render_crop(image, spec, inst.keypoints, shown).image
    return draw_confidence(
        display,
        coords * np.asarray(shown, np.float32),
        to_numpy(out.scores[0]),
        correct,
        out_png,
        labelled=labelled,
        title=f"{config.name}  image {inst.image_id}  ann {inst.ann_id}",
    )
