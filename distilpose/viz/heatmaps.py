"""Paper Fig. 5 / Fig. B: the student's simulated heatmaps next to the teacher's cached ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from distilpose.data.keypoints import KEYPOINT_NAMES
from distilpose.errors import BadAnnotationError, BadConfigError, StoreMismatchError
from distilpose.viz.common import (
    bgr_to_rgb,
    forward_crop,
    joint_indices,
    load_model,
    new_figure,
    save_figure,
    to_numpy,
)
from distilpose.viz.skeleton import plot_skeleton

# Sizes in inches (x DPI = pixels). Heatmap pairs: one cell per pair (simulated | teacher).
HEATMAP_PAIR_SIZE = (2.0, 1.8)
HEATMAP_PAIRS_PER_ROW = 6
HEATMAP_TITLE_HEIGHT = 0.4


def heatmap_figure_size(num_joints: int, with_crop: bool = True) -> tuple[float, float]:
    """Figure size in inches of `draw_heatmap_pairs` for `num_joints` pairs (+ the crop panel)."""
    cells = num_joints + int(with_crop)
    cols = min(HEATMAP_PAIRS_PER_ROW, cells)
    rows = math.ceil(cells / cols)
    return cols * HEATMAP_PAIR_SIZE[0], rows * HEATMAP_PAIR_SIZE[1] + HEATMAP_TITLE_HEIGHT


def draw_heatmap_pairs(
    simulated: np.ndarray,
    teacher: np.ndarray,
    sigmas: np.ndarray,
    out_png: str | Path,
    *,
    joints: Sequence[int | str] | None = None,
    crop_bgr: np.ndarray | None = None,
    coords_px: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Simulated heatmaps next to the teacher's, one pair per joint, sigmas written on them.

    Args:
        simulated: [K, Hh, Wh] the student's simulated heatmaps (paper Eq. 2).
        teacher: [K, Hh, Wh] the teacher's heatmaps for the same crop.
        sigmas: [K, 2] the student's (sigma_x, sigma_y) in heatmap pixels.
        out_png: where to write; size `heatmap_figure_size(len(joints), crop_bgr is not None)`.
        joints: names or indices to draw (all K by default).
        crop_bgr: [H_in, W_in, 3] uint8, optional: the crop, drawn in the first cell.
        coords_px: [K, 2] crop pixels, optional: the student's joints marked on the crop.
        title: optional figure title.
    """
    simulated, teacher, sigmas = to_numpy(simulated), to_numpy(teacher), to_numpy(sigmas)
    if simulated.shape != teacher.shape or simulated.ndim != 3:
        raise BadConfigError(
            f"heatmaps: simulated {simulated.shape} and teacher {teacher.shape}; "
            "expected two equal [K, H, W] arrays"
        )
    if sigmas.shape != (simulated.shape[0], 2):
        raise BadConfigError(f"sigmas: shape {sigmas.shape}; expected [{simulated.shape[0]}, 2]")
    index = joint_indices(joints, simulated.shape[0])
    with_crop = crop_bgr is not None
    size = heatmap_figure_size(len(index), with_crop)
    fig = new_figure(size)
    cols = min(HEATMAP_PAIRS_PER_ROW, len(index) + int(with_crop))
    cell_w, cell_h = HEATMAP_PAIR_SIZE[0] / size[0], HEATMAP_PAIR_SIZE[1] / size[1]
    top = 1.0 - HEATMAP_TITLE_HEIGHT / size[1]

    def cell_axes(cell: int, half: int):
        """Axes for the left (0) or right (1) half of a cell; 3:4 panels with a title line."""
        row, col = divmod(cell, cols)
        x0 = col * cell_w + half * cell_w / 2 + 0.01 * cell_w
        y0 = top - (row + 1) * cell_h + 0.04 * cell_h
        ax = fig.add_axes((x0, y0, cell_w / 2 - 0.02 * cell_w, cell_h * 0.80))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    cell = 0
    if with_crop:
        ax = cell_axes(0, 0)
        ax.imshow(bgr_to_rgb(crop_bgr))
        ax.set_title("crop", fontsize=7)
        if coords_px is not None:
            pts = to_numpy(coords_px)
            plot_skeleton(ax, pts, lw=1.0)
            ax.scatter(pts[index, 0], pts[index, 1], s=6, c="red", zorder=3)
        ax.set_xlim(0, crop_bgr.shape[1])
        ax.set_ylim(crop_bgr.shape[0], 0)
        cell = 1
    for k in index:
        vmax = max(float(simulated[k].max()), float(teacher[k].max()), 1e-6)
        for half, (heatmap, label) in enumerate(
            ((simulated[k], "simulated"), (teacher[k], "teacher"))
        ):
            ax = cell_axes(cell, half)
            ax.imshow(heatmap, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(
                f"{KEYPOINT_NAMES[k] if k < len(KEYPOINT_NAMES) else k}" if half == 0 else label,
                fontsize=7,
                loc="left" if half == 0 else "right",
            )
            if half == 0:
                ax.text(
                    0.03,
                    0.03,
                    f"σx={sigmas[k, 0]:.2f}\nσy={sigmas[k, 1]:.2f}",
                    transform=ax.transAxes,
                    fontsize=6,
                    color="white",
                    va="bottom",
                )
        cell += 1
    fig.suptitle(title or "simulated (left) vs teacher (right) heatmaps", fontsize=9, y=0.995)
    return save_figure(fig, out_png)


def viz_heatmaps(
    student_ckpt: str | Path | nn.Module,
    store,
    out_png: str | Path,
    sample: int = 0,
    *,
    joints: Sequence[int | str] | None = None,
    device: str = "cpu",
) -> Path:
    """Paper Fig. 5 for one store slot: the student's simulated heatmaps vs the cached teacher's.

    `store` is an opened store, `store.reader.StoreReader.open(path)` (anything with `.meta` and
    `.read_slots(start, stop, fields=...)`): `distilpose` never imports the stage packages, so
    the caller opens it. The crop is re-rendered from the slot's spec with the store's annotation
    file and image root, so the student sees exactly the pixels the teacher saw.
    """
    from distilpose.data import CropSpec, load_coco_instances, read_image, render_crop
    from distilpose.data.codecs import simulated_heatmaps

    if isinstance(store, str | Path) or not hasattr(store, "read_slots"):
        raise BadConfigError(
            f"store: got {store!r}; expected an opened store (store.reader.StoreReader.open(path))"
        )
    reader = store
    meta = reader.meta
    model = load_model(student_ckpt, device, role="student")
    config = model.config
    geometry = meta.geometry
    input_size, heatmap_size = geometry.input_size, geometry.heatmap_size
    if (config.input_size, config.heatmap_size) != (input_size, heatmap_size):
        raise StoreMismatchError(
            f"store: input/heatmap size {input_size}/{heatmap_size}; the student "
            f"{config.name} uses {config.input_size}/{config.heatmap_size}"
        )
    layout = getattr(reader, "layout", None)
    num_slots = layout.num_slots(meta.views) if layout else int(meta.num_instances) * meta.views
    if not 0 <= sample < num_slots:
        raise BadConfigError(f"sample: {sample} outside the store's {num_slots} slots")
    slot = reader.read_slots(sample, sample + 1, fields=("spec", "instance", "ann_id", "heatmaps"))
    if int(slot["instance"][0]) < 0:
        raise BadConfigError(f"sample: slot {sample} is padding (no person); pick another slot")
    spec = CropSpec.from_array(np.asarray(slot["spec"][0]))
    teacher = np.asarray(slot["heatmaps"][0], dtype=np.float32)  # [K, Hh, Wh]

    instances = load_coco_instances(meta.ann_file, meta.image_root)
    inst = _find_instance(instances, slot, spec, meta.ann_file)
    crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, input_size)
    out = forward_crop(model, crop.image, device)
    sim = simulated_heatmaps(out.coords, out.sigmas, heatmap_size)[0]  # [K, Hh, Wh]
    coords_px = to_numpy(out.coords[0]) * np.asarray(input_size, np.float32)
    return draw_heatmap_pairs(
        sim,
        teacher,
        out.sigmas[0],
        out_png,
        joints=joints,
        crop_bgr=crop.image,
        coords_px=coords_px,
        title=f"{config.name} vs teacher heatmaps, store slot {sample} (image {inst.image_id})",
    )


def _find_instance(instances: list, slot: dict, spec, ann_file) -> object:
    """The person of a store slot: by annotation id when the store has one, else by index."""
    ann_ids = slot.get("ann_id")
    if ann_ids is not None and int(ann_ids[0]) >= 0:
        ann_id = int(ann_ids[0])
        for inst in instances:
            if inst.ann_id == ann_id:
                return inst
        raise BadAnnotationError(f"{ann_file}: no annotation id {ann_id} (named by the store)")
    for inst in instances:
        if inst.index == spec.instance:
            return inst
    raise BadAnnotationError(f"{ann_file}: no instance {spec.instance} (named by the store)")


# ---------------------------------------------------------------------- 2. confidence scoring
