"""A picture of the augmentation: a PNG grid of seeded training crops with their keypoints.

Each instance's views sit side by side (a small gap separates instances); every tile carries a
caption `#instance vview` plus `F` (flipped), `H` (half-body) and the rotation in degrees.
Joints with weight 0 (unlabelled or outside the crop) are not drawn. Left joints are drawn in
orange and right joints in blue, so a flip that forgot to swap pairs is visible at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from distilpose.data.coco import load_coco_instances, read_image
from distilpose.data.crop import AugmentRecipe, render_crop, sample_crop_spec
from distilpose.data.keypoints import KEYPOINT_NAMES, SKELETON
from distilpose.errors import BadAnnotationError
from distilpose.geometry import PAPER

CAPTION_HEIGHT = 14  # px of caption strip under each tile
GROUP_GAP = 6  # px between instances

_LEFT, _RIGHT, _CENTRE = (0, 140, 255), (255, 120, 0), (0, 220, 0)  # BGR


def _joint_colour(k: int) -> tuple[int, int, int]:
    name = KEYPOINT_NAMES[k]
    return _LEFT if name.startswith("left") else _RIGHT if name.startswith("right") else _CENTRE


def grid_shape(num: int, views: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in px of the grid `show_crops` draws for `num` instances."""
    per_row = max(1, math.ceil(math.sqrt(num)))
    rows = math.ceil(num / per_row)
    w_in, h_in = input_size
    width = per_row * views * w_in + (per_row - 1) * GROUP_GAP
    height = rows * (h_in + CAPTION_HEIGHT)
    return width, height


def _draw_tile(crop, caption: str) -> np.ndarray:
    img = crop.image.copy()
    kp, wt = crop.keypoints, crop.weights
    for a, b in SKELETON:
        if wt[a] > 0 and wt[b] > 0:
            pa, pb = tuple(int(round(v)) for v in kp[a]), tuple(int(round(v)) for v in kp[b])
            cv2.line(img, pa, pb, (255, 255, 255), 1, cv2.LINE_AA)
    for k in np.nonzero(wt > 0)[0]:
        p = tuple(int(round(v)) for v in kp[k])
        cv2.circle(img, p, 3, _joint_colour(int(k)), -1, cv2.LINE_AA)
    strip = np.full((CAPTION_HEIGHT, img.shape[1], 3), 32, np.uint8)
    cv2.putText(strip, caption, (2, CAPTION_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33,
                (235, 235, 235), 1, cv2.LINE_AA)  # fmt: skip
    return np.vstack([img, strip])


def show_crops(
    ann_file,
    image_root,
    out_png,
    *,
    num: int = 16,
    views: int = 2,
    seed: int = 0,
    input_size: tuple[int, int] = PAPER.input_size,
    recipe: AugmentRecipe | None = None,
) -> Path:
    """Write a PNG grid of `views` augmented crops of `num` training instances; returns its path.

    Instances are picked at random (seeded by `seed`) from the ground-truth training instances;
    the crops are exactly those `sample_crop_spec(inst, recipe, seed, view)` gives a store.
    """
    recipe = recipe or AugmentRecipe()
    w_in, h_in = int(input_size[0]), int(input_size[1])
    instances = load_coco_instances(ann_file, image_root, train=True, aspect_ratio=w_in / h_in)
    if not instances:
        raise BadAnnotationError(
            f"{ann_file}: no people with labelled keypoints; expected at least one to show"
        )
    num = min(num, len(instances))
    pick = np.sort(np.random.default_rng(seed).choice(len(instances), num, replace=False))
    width, height = grid_shape(num, views, (w_in, h_in))
    per_row = max(1, math.ceil(math.sqrt(num)))
    canvas = np.full((height, width, 3), 255, np.uint8)
    cache: dict[str, np.ndarray] = {}
    for n, idx in enumerate(pick):
        inst = instances[int(idx)]
        if inst.image_path not in cache:
            cache = {inst.image_path: read_image(inst.image_path)}  # instances come image by image
        image = cache[inst.image_path]
        row, col = divmod(n, per_row)
        for v in range(views):
            spec = sample_crop_spec(inst, recipe, seed, v, (w_in, h_in))
            crop = render_crop(image, spec, inst.keypoints, (w_in, h_in))
            caption = f"#{inst.index} v{v}{' F' if spec.flip else ''}"
            caption += f"{' H' if spec.half_body else ''} r{spec.rotation:+.0f}"
            x0 = col * (views * w_in + GROUP_GAP) + v * w_in
            y0 = row * (h_in + CAPTION_HEIGHT)
            canvas[y0 : y0 + h_in + CAPTION_HEIGHT, x0 : x0 + w_in] = _draw_tile(crop, caption)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise OSError(f"{out}: could not encode the PNG")
    out.write_bytes(buf.tobytes())
    return out
