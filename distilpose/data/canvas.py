"""A person's canvas: one picture that holds every crop a recipe can draw of that person.

Issue 28: a store that keeps each view's JPEG crop pays for pixels once per view; a canvas is
kept once per person and every view is warped from it by its spec, by the teacher at dump time
and the student at training time (the same canvas and matrix: the same pixels on both sides).
This module is the geometry; `benchmarks/canvas_bench.py` measures what it costs and saves.

Where a crop can reach. The crop of a spec (center c, scale s, rotation r) samples the image in
the rectangle of width `s[0] * 200` and height `s[0] * 200 * H_in / W_in` (the affine zooms by
`s[0]` alone) centred at c and turned by r. A recipe draws each person's specs from a few
*bases* (center, scale): the person's box and, with half-body on, the upper and the lower half's
boxes; the scale draw multiplies the base's scale by at most `1 + scale_factor` and leaves the
centre where it is. So every crop lies, whatever the draws, inside the union over the bases of
the rectangle scaled by `1 + scale_factor` (no rotation in the recipe) or the disc of that
rectangle's half-diagonal (rotation on). The canvas is that union's bounding box, plus
`MARGIN` px for the bilinear neighbours of its edge, cut to the image.

Resolution. The largest zoom, `scale * (1 - scale_factor)`, shows `W_in / ((1 - f) s[0] 200)`
crop px per image px; the canvas keeps `min(1, that)` px per image px (`density`). A person no
wider than the crop's largest zoom keeps the image's own resolution, at an integer offset (the
canvas is a window of the image, black outside it as a crop's border); a larger person is kept
at the resolution its largest zoom needs, so no view is upsampled from fewer pixels than a crop
from the image would see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from distilpose.data.crop import (
    BORDER_VALUE,
    PIXEL_STD,
    AugmentRecipe,
    CropSpec,
    half_body_box,
    spec_affine,
)
from distilpose.data.instance import PersonInstance
from distilpose.geometry import PAPER

MARGIN = 2  # px: a bilinear sample at the region's edge reads its neighbour


@dataclass(frozen=True)
class Canvas:
    """Where a person's canvas sits in its image: canvas px (u, v) shows image px
    `origin + (u, v) / density`; `size` is (width, height) in canvas px."""

    origin: tuple[float, float]  # image px of canvas px (0, 0)
    density: float  # canvas px per image px, <= 1
    size: tuple[int, int]  # (width, height) canvas px

    def to_array(self) -> np.ndarray:
        """[5] float64: origin x, y, density, width, height (a canvas store's `canvas` row)."""
        return np.array([*self.origin, self.density, *self.size], dtype=np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> Canvas:
        ox, oy, density, w, h = (float(v) for v in np.asarray(a, dtype=np.float64))
        return cls(origin=(ox, oy), density=density, size=(int(w), int(h)))

    def to_image(self) -> np.ndarray:
        """[3, 3] float64 affine canvas px -> image px."""
        d = self.density
        return np.array([[1 / d, 0, self.origin[0]], [0, 1 / d, self.origin[1]], [0, 0, 1.0]])


def spec_bases(
    inst: PersonInstance, recipe: AugmentRecipe, input_size: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (center [2], scale [2]) a recipe's specs of `inst` start from: its box, and the
    upper and lower half-body boxes when half-body can fire (sample_crop_spec's rule)."""
    bases = [(np.asarray(inst.center, np.float64), np.asarray(inst.scale, np.float64))]
    labelled = int(np.count_nonzero(inst.keypoints[:, 2] > 0))
    if recipe.half_body_prob > 0 and labelled > recipe.half_body_min_joints:
        aspect = input_size[0] / input_size[1]
        for upper_first in (True, False):
            box = half_body_box(inst.keypoints, upper_first, aspect)
            if box is not None:
                bases.append((np.asarray(box[0], np.float64), np.asarray(box[1], np.float64)))
    return bases


def canvas_for(
    inst: PersonInstance,
    recipe: AugmentRecipe,
    image_size: tuple[int, int],
    input_size: tuple[int, int] = PAPER.input_size,
) -> Canvas:
    """The canvas that holds every crop `recipe` can draw of `inst` (module docstring), cut to
    the image (`image_size` (width, height)): outside it a crop reads black from the image's
    border and from the canvas's alike."""
    w_in, h_in = input_size
    grow = 1.0 + recipe.scale_factor
    rotates = recipe.rotation_prob > 0 and recipe.rotation_factor > 0
    lo, hi, zoom = np.full(2, np.inf), np.full(2, -np.inf), 0.0
    for center, scale in spec_bases(inst, recipe, input_size):
        half_w = 0.5 * float(scale[0]) * PIXEL_STD * grow
        half = np.array([half_w, half_w * h_in / w_in])
        if rotates:
            half = np.full(2, math.hypot(*half))
        lo, hi = np.minimum(lo, center - half), np.maximum(hi, center + half)
        zoom = max(zoom, w_in / ((1.0 - recipe.scale_factor) * float(scale[0]) * PIXEL_STD))
    density = min(1.0, zoom)
    lo = np.maximum(lo - MARGIN / density, 0.0)
    hi = np.minimum(hi + MARGIN / density, np.asarray(image_size, np.float64))
    if density == 1.0:  # a window of the image: integer offset, the image's own pixels
        lo, hi = np.floor(lo), np.ceil(hi)
    size = np.ceil((hi - lo) * density).astype(int)
    return Canvas(
        origin=(float(lo[0]), float(lo[1])), density=density, size=(int(size[0]), int(size[1]))
    )


def render_canvas(image: np.ndarray, canvas: Canvas) -> np.ndarray:
    """uint8 BGR [H, W, 3] image -> the canvas's pixels [size[1], size[0], 3] (black outside
    the image, as a crop's border)."""
    if canvas.density == 1.0:  # an integer shift: copy the window, no resampling at all
        return _window(image, canvas)
    # bilinear, as render_crop samples the image at any zoom: a canvas pixel is what a crop at
    # the largest zoom would read
    m = np.linalg.inv(canvas.to_image())[:2]
    return cv2.warpAffine(
        image, m, canvas.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_VALUE,
    )  # fmt: skip


def _window(image: np.ndarray, canvas: Canvas) -> np.ndarray:
    """The image's pixels under a density-1 canvas (integer origin), black where it leaves the
    image."""
    x0, y0 = int(canvas.origin[0]), int(canvas.origin[1])
    w, h = canvas.size
    out = np.zeros((h, w, 3), np.uint8)
    out[:] = BORDER_VALUE
    ih, iw = image.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + w, iw), min(y0 + h, ih)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def canvas_affine(
    spec: CropSpec, canvas: Canvas, input_size: tuple[int, int] = PAPER.input_size
) -> np.ndarray:
    """[2, 3] float64 canvas px -> crop px of `spec` (its image affine after the canvas's)."""
    m = np.vstack([spec_affine(spec, input_size), [0.0, 0.0, 1.0]])
    return (m @ canvas.to_image())[:2]


def warp_from_canvas(
    pixels: np.ndarray,
    spec: CropSpec,
    canvas: Canvas,
    input_size: tuple[int, int] = PAPER.input_size,
) -> np.ndarray:
    """The crop of `spec` (uint8 BGR [H_in, W_in, 3]) warped from a person's canvas pixels:
    one `cv2.warpAffine`, bilinear, black border, as `render_crop` warps from the image."""
    return cv2.warpAffine(
        pixels, canvas_affine(spec, canvas, input_size), tuple(int(v) for v in input_size),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE,
    )  # fmt: skip
