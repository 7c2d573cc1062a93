"""A person's canvas holds every crop its recipe can draw: views warped from the canvas are the
views warped from the image (bit for bit at the image's resolution, close when the canvas is
smaller), on real COCO people and with the default and the demo's recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distilpose.data.canvas import canvas_for, render_canvas, warp_from_canvas
from distilpose.data.coco import load_coco_instances, read_image
from distilpose.data.crop import MILD_RECIPE, AugmentRecipe, render_crop, sample_crop_spec

DATA = Path(__file__).parent / "data" / "coco_mini"
RECIPES = {"default": AugmentRecipe(), "mild": MILD_RECIPE}


@pytest.fixture(scope="module")
def people() -> list[tuple]:
    insts = load_coco_instances(
        DATA / "annotations" / "person_keypoints.json", DATA / "images", train=True
    )
    images = {p: read_image(p) for p in {i.image_path for i in insts}}
    return [(inst, images[inst.image_path]) for inst in insts]


def _views(people, recipe, input_size, n=12):
    """(crop from the image, crop from the canvas, canvas) for n views of every person."""
    for inst, image in people:
        canvas = canvas_for(inst, recipe, image.shape[1::-1], input_size)
        pixels = render_canvas(image, canvas)
        assert pixels.shape == (canvas.size[1], canvas.size[0], 3)
        for view in range(n):
            spec = sample_crop_spec(inst, recipe, seed=7, view=view, input_size=input_size)
            direct = render_crop(image, spec, inst.keypoints, input_size).image
            yield direct, warp_from_canvas(pixels, spec, canvas, input_size), canvas


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_views_from_a_full_resolution_canvas_are_the_image_views(people, recipe):
    """Where the canvas keeps the image's pixels (density 1: people no larger than the crop's
    largest zoom, here at the paper's 192x256), a view from it is the view from the image:
    every pixel equal, but for warpAffine's 1/32-px fixed-point rounding of the shifted matrix
    (at most 1 level, on a few pixels)."""
    seen = 0
    for direct, warped, canvas in _views(people, RECIPES[recipe], (192, 256)):
        if canvas.density < 1:
            continue
        seen += 1
        diff = np.abs(direct.astype(int) - warped.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert seen >= 12


@pytest.mark.parametrize("input_size", [(192, 256), (48, 64)])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_crop_the_recipe_draws_lies_on_the_canvas(people, recipe, input_size):
    """The corners of every drawn crop, in image px and cut to the image (outside it a crop
    reads black either way), fall on the canvas: 200 views per person, rotations, half-body
    and scale draws included, at full and reduced canvas resolution."""
    from distilpose.data.crop import spec_affine, transform_points

    w_in, h_in = input_size
    corners = np.array([[0, 0], [w_in, 0], [0, h_in], [w_in, h_in]], np.float64)
    densities = set()
    for inst, image in people:
        h, w = image.shape[:2]
        canvas = canvas_for(inst, RECIPES[recipe], (w, h), input_size)
        densities.add(canvas.density < 1)
        lo = np.asarray(canvas.origin)
        hi = lo + np.asarray(canvas.size) / canvas.density
        for view in range(200):
            spec = sample_crop_spec(inst, RECIPES[recipe], seed=3, view=view, input_size=input_size)
            m = np.linalg.inv(np.vstack([spec_affine(spec, input_size), [0, 0, 1]]))[:2]
            pts = np.clip(transform_points(corners, m), 0, [w, h])
            assert (pts >= lo - 1e-6).all() and (pts <= hi + 1e-6).all(), (spec, canvas)
    assert input_size != (48, 64) or True in densities  # reduced canvases are checked too


def test_canvas_is_cut_to_the_image_and_sized_by_the_largest_zoom(people):
    recipe = AugmentRecipe()
    for inst, image in people:
        h, w = image.shape[:2]
        canvas = canvas_for(inst, recipe, (w, h))
        x0, y0 = canvas.origin
        assert x0 >= 0 and y0 >= 0
        assert x0 + canvas.size[0] / canvas.density <= w + 1 / canvas.density
        assert y0 + canvas.size[1] / canvas.density <= h + 1 / canvas.density
        widest_zoom = 192 / ((1 - recipe.scale_factor) * float(inst.scale[0]) * 200)
        assert canvas.density <= 1.0 and canvas.density >= min(1.0, widest_zoom) - 1e-9


def test_store_docs_show_the_canvas_record():
    """docs/store.md's canvas paragraph is canvas_bench's record as the benchmark writes it."""
    import json

    from benchmarks import canvas_bench

    record = json.loads(canvas_bench.RECORD.read_text())
    assert canvas_bench.docs_block(record) in canvas_bench.STORE_DOCS.read_text()
