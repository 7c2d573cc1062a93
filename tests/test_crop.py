"""Crop specs, the affine, rendering, flips and normalization, on the real COCO samples."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distilpose.data.coco import load_coco_instances, read_image
from distilpose.data.crop import (
    AugmentRecipe,
    CropSpec,
    crop_digest,
    eval_crop_spec,
    get_affine_transform,
    normalize,
    render_crop,
    sample_crop_spec,
)
from distilpose.data.keypoints import FLIP_INDEX

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "coco_mini"
ANN = DATA / "annotations" / "person_keypoints.json"
IMAGES = DATA / "images"
SIZE = (192, 256)


@pytest.fixture(scope="module")
def instances():
    return load_coco_instances(ANN, IMAGES, train=True)


@pytest.fixture(scope="module")
def images(instances):
    return {p: read_image(p) for p in {i.image_path for i in instances}}


def _three_point_affine(center, scale, rot, size):
    """MMPose 0.x's construction: centre, a rotated point above it, and a perpendicular third."""
    src_w = scale[0] * 200.0
    t = math.radians(rot)
    src_dir = np.array([src_w * 0.5 * math.sin(t), -src_w * 0.5 * math.cos(t)])
    dst_dir = np.array([0.0, -size[0] * 0.5])

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src = np.array([center, center + src_dir, [0, 0]], dtype=np.float64)
    dst = np.array([[size[0] / 2, size[1] / 2], [size[0] / 2, size[1] / 2] + dst_dir, [0, 0]])
    src[2], dst[2] = third(src[0], src[1]), third(dst[0], dst[1])
    return cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32))


@pytest.mark.parametrize("rot", [0.0, 30.0, -75.5, 90.0])
def test_affine_matches_three_point_convention(instances, rot):
    inst = instances[0]
    m = get_affine_transform(inst.center, inst.scale, rot, SIZE)
    assert m.shape == (2, 3) and m.dtype == np.float64
    np.testing.assert_allclose(
        m, _three_point_affine(inst.center, inst.scale, rot, SIZE), atol=2e-4
    )
    inv = get_affine_transform(inst.center, inst.scale, rot, SIZE, inverse=True)
    both = np.vstack([inv, [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]])
    np.testing.assert_allclose(both, np.eye(3), atol=1e-12)


def test_affine_by_hand_on_real_box(instances, images):
    inst = instances[0]  # bbox (280.79, 44.73, 217.7, 345.68) after MMPose's clipping
    cx, cy = 280.79 + 217.7 / 2, 44.73 + 345.68 / 2
    s = 192.0 / (0.75 * 345.68 * 1.25)  # crop px per image px
    m = get_affine_transform(inst.center, inst.scale, 0.0, SIZE)
    # float32 centre/scale: agree to 1e-4 crop px
    np.testing.assert_allclose(m, [[s, 0, 96 - s * cx], [0, s, 128 - s * cy]], atol=1e-4)
    # the contract's inverse formula: x_img = center + (x_crop - size/2) * scale*200/size
    crop = render_crop(images[inst.image_path], eval_crop_spec(inst), inst.keypoints, SIZE)
    pts = np.array([[0.0, 0.0], [191.0, 255.0], [50.5, 10.25]])
    want = inst.center + (pts - np.array(SIZE) / 2) * (inst.scale * 200 / np.array(SIZE))
    got = pts @ crop.to_image[:, :2].T + crop.to_image[:, 2]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_keypoints_land_where_the_affine_says(instances, images):
    inst = instances[0]
    spec = replace(eval_crop_spec(inst), rotation=90.0)
    crop = render_crop(images[inst.image_path], spec, inst.keypoints, SIZE)
    # by hand: left shoulder of annotation 442619 is at (399, 108); rotation +90 is
    # counter-clockwise, so image offset (dx, dy) becomes crop offset s * (dy, -dx)
    s = 192.0 / (0.75 * 345.68 * 1.25)
    cx, cy = 280.79 + 217.7 / 2, 44.73 + 345.68 / 2
    dx, dy = 399 - cx, 108 - cy
    np.testing.assert_allclose(crop.keypoints[5], [96 + s * dy, 128 - s * dx], rtol=1e-5)
    # and all joints, un-rotated, with the simple scale-and-shift formula
    plain = render_crop(images[inst.image_path], eval_crop_spec(inst), inst.keypoints, SIZE)
    want = (inst.keypoints[:, :2] - [cx, cy]) * s + [96, 128]
    np.testing.assert_allclose(plain.keypoints, want, rtol=1e-5, atol=1e-4)


def test_pixels_follow_the_affine_exactly(images, instances):
    # zoom 1 and an integer centre: the warp is an exact pixel shuffle, so values must match
    image = images[instances[0].image_path]
    spec = CropSpec(0, 0, (400.0, 200.0), (192 / 200, 256 / 200), 90.0, False, False)
    crop = render_crop(image, spec, np.zeros((17, 3), np.float32), SIZE).image
    for xc, yc in [(10, 20), (96, 128), (150, 3)]:
        # crop (xc, yc) = (96 + dy, 128 - dx) => image (400 + 128 - yc, 200 + xc - 96)
        np.testing.assert_array_equal(crop[yc, xc], image[200 + xc - 96, 400 + 128 - yc])


def test_weights_visibility_and_inside(instances, images):
    inst = instances[0]
    kpts = inst.keypoints.copy()
    kpts[0, 2] = 0  # unlabelled
    kpts[1, :2] = [-500, -500]  # labelled, far outside the crop
    crop = render_crop(images[inst.image_path], eval_crop_spec(inst), kpts, SIZE)
    assert crop.weights.dtype == np.float32 and crop.keypoints.dtype == np.float32
    assert crop.weights[0] == 0 and crop.weights[1] == 0
    inside = (crop.keypoints >= 0).all(1) & (crop.keypoints < np.array(SIZE)).all(1)
    np.testing.assert_array_equal(crop.weights, (inside & (kpts[:, 2] > 0)).astype(np.float32))
    assert crop.weights[2:].sum() == 15


@pytest.mark.parametrize("rot", [0.0, 25.0])
def test_flip_is_a_mirror_with_pairs_swapped(instances, images, rot):
    for inst in instances[:4]:
        image = images[inst.image_path]
        spec = replace(eval_crop_spec(inst), rotation=rot)
        a = render_crop(image, spec, inst.keypoints, SIZE)
        b = render_crop(image, replace(spec, flip=True), inst.keypoints, SIZE)
        # one warp with the mirror folded in: OpenCV's fixed-point sampling may round a
        # handful of pixels one grey level apart
        diff = np.abs(b.image.astype(int) - a.image[:, ::-1].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005
        want = a.keypoints[FLIP_INDEX].copy()
        want[:, 0] = SIZE[0] - 1 - want[:, 0]
        np.testing.assert_allclose(b.keypoints, want, atol=1e-3)
        np.testing.assert_array_equal(b.weights, a.weights[FLIP_INDEX])
        # to_image maps the flipped crop's joint k back to the person's joint FLIP_INDEX[k]
        back = b.keypoints @ b.to_image[:, :2].T + b.to_image[:, 2]
        np.testing.assert_allclose(back, inst.keypoints[FLIP_INDEX, :2], atol=1e-3)


def test_render_is_deterministic(instances, images):
    inst = instances[3]
    spec = sample_crop_spec(inst, AugmentRecipe(), seed=5, view=1)
    a = render_crop(images[inst.image_path], spec, inst.keypoints, SIZE)
    b = render_crop(images[inst.image_path].copy(), CropSpec.from_array(spec.to_array()),
                    inst.keypoints.copy(), SIZE)  # fmt: skip
    assert a.image.shape == (256, 192, 3) and a.image.dtype == np.uint8
    assert a.image.tobytes() == b.image.tobytes()
    assert crop_digest(a.image) == crop_digest(b.image) and len(crop_digest(a.image).hex()) == 64
    other = render_crop(images[inst.image_path], replace(spec, rotation=spec.rotation + 1),
                        inst.keypoints, SIZE)  # fmt: skip
    assert crop_digest(other.image) != crop_digest(a.image)


def test_spec_array_round_trip():
    spec = CropSpec(7, 3, (1.5, -2.25), (0.9, 1.2), -33.3, True, True)
    arr = spec.to_array()
    assert arr.dtype == np.float64 and arr.shape == (8,)
    np.testing.assert_array_equal(arr, [7, 3, 1.5, -2.25, 0.9, 1.2, -33.3, 3])
    assert CropSpec.from_array(arr) == spec
    assert CropSpec.from_array(replace(spec, flip=False).to_array()).half_body
    recipe = AugmentRecipe(flip_prob=0.1)
    assert AugmentRecipe.from_dict(recipe.to_dict()) == recipe


def _all_specs(instances, seed, order):
    out = {}
    for idx, view in order:
        out[(idx, view)] = sample_crop_spec(instances[idx], AugmentRecipe(), seed, view, SIZE)
    return out


def test_specs_do_not_depend_on_call_order(instances):
    keys = [(i, v) for i in range(len(instances)) for v in range(4)]
    forward = _all_specs(instances, 3, keys)
    shuffled = list(keys)
    np.random.default_rng(0).shuffle(shuffled)
    np.random.seed(123)  # global numpy state must not matter
    assert _all_specs(instances, 3, shuffled) == forward
    assert _all_specs(instances, 4, keys) != forward
    assert len({s.to_array().tobytes() for s in forward.values()}) == len(keys)


_CHILD = """
import json, sys
from distilpose.data.coco import load_coco_instances, read_image
from distilpose.data.crop import AugmentRecipe, crop_digest, render_crop, sample_crop_spec
insts = load_coco_instances(sys.argv[1], sys.argv[2], train=True)
out = []
for inst in reversed(insts):
    image = read_image(inst.image_path)
    for view in (1, 0):
        spec = sample_crop_spec(inst, AugmentRecipe(), 11, view)
        crop = render_crop(image, spec, inst.keypoints)
        out.append([inst.index, view, spec.to_array().tolist(), crop_digest(crop.image).hex()])
print(json.dumps(out))
"""


def test_specs_and_crops_identical_across_processes(instances, images):
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ANN), str(IMAGES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    child = json.loads(res.stdout)
    assert len(child) == 2 * len(instances)
    for idx, view, arr, digest in child:
        inst = instances[idx]
        spec = sample_crop_spec(inst, AugmentRecipe(), 11, view)
        assert spec.to_array().tolist() == arr  # bit-equal floats
        crop = render_crop(images[inst.image_path], spec, inst.keypoints)
        assert crop_digest(crop.image).hex() == digest


def test_recipe_statistics_and_ranges(instances):
    recipe = AugmentRecipe()
    inst = instances[0]  # 17 labelled joints: half-body allowed
    specs = [sample_crop_spec(inst, recipe, 0, v) for v in range(1500)]
    flips = np.mean([s.flip for s in specs])
    rotated = np.mean([s.rotation != 0 for s in specs])
    half = np.mean([s.half_body for s in specs])
    assert abs(flips - 0.5) < 0.05 and abs(rotated - 0.6) < 0.05 and abs(half - 0.3) < 0.05
    rots = np.array([s.rotation for s in specs])
    assert rots.min() >= -90 and rots.max() <= 90 and (np.abs(rots) == 90).any()
    full = [s for s in specs if not s.half_body]
    ratios = np.array([s.scale[0] / inst.scale[0] for s in full])
    assert ratios.min() >= 0.65 - 1e-6 and ratios.max() <= 1.35 + 1e-6
    assert np.isclose(ratios.min(), 0.65, atol=1e-6) and np.isclose(ratios.max(), 1.35, atol=1e-6)
    for s in full:
        assert s.center == (float(inst.center[0]), float(inst.center[1]))
    # half-body crops are centred on the mean of the chosen half's joints
    upper = inst.keypoints[:11, :2].mean(0)
    lower = inst.keypoints[11:, :2].mean(0)
    centres = [np.array(s.center) for s in specs if s.half_body]
    n_up = sum(np.allclose(c, upper, atol=1e-3) for c in centres)
    n_low = sum(np.allclose(c, lower, atol=1e-3) for c in centres)
    assert n_up + n_low == len(centres) and 0.6 < n_up / len(centres) < 0.8  # P(N < 0.5) ~ 0.69


def test_half_body_needs_more_than_eight_joints(instances):
    inst = instances[0]
    kpts = inst.keypoints.copy()
    kpts[8:, 2] = 0  # exactly 8 labelled joints left
    few = replace(inst, keypoints=kpts)
    assert not any(sample_crop_spec(few, AugmentRecipe(), 0, v).half_body for v in range(300))
    never = AugmentRecipe(flip_prob=0, half_body_prob=0, rotation_prob=0, scale_factor=0)
    spec = sample_crop_spec(inst, never, 0, 0)
    assert spec == replace(eval_crop_spec(inst), view=0)


def test_eval_crop_spec(instances):
    inst = instances[2]
    spec = eval_crop_spec(inst, view=1)
    assert spec.instance == inst.index and spec.view == 1
    assert spec.center == tuple(float(c) for c in inst.center) and spec.rotation == 0.0
    assert not spec.flip and not spec.half_body


def test_normalize():
    crop = np.zeros((4, 5, 3), np.uint8)
    crop[1, 2] = (0, 128, 255)  # BGR
    t = normalize(crop)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(t[:, 1, 2].numpy(), (np.array([255, 128, 0]) / 255 - mean) / std,
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(t[:, 0, 0].numpy(), -mean / std, rtol=1e-6)
    batch = normalize(np.stack([crop, crop[:, ::-1]]))
    assert batch.shape == (2, 3, 4, 5)
    torch.testing.assert_close(batch[0], t)
    torch.testing.assert_close(batch[1], t.flip(-1))
    with pytest.raises(ValueError):
        normalize(crop.astype(np.float32))


def test_normalize_rgb_agrees_with_normalize_in_every_input_form():
    """A stacked batch, a list of crops (a decoder's output) and one crop give the numbers
    `normalize` gives for the same pixels in BGR, bit for bit (one _standardize)."""
    from distilpose.data import normalize_rgb

    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2)))
    ref = normalize(bgr)
    assert torch.equal(normalize_rgb(rgb), ref)
    assert torch.equal(normalize_rgb(list(rgb)), ref)
    assert torch.equal(normalize_rgb(rgb[1]), ref[1])
    assert torch.equal(normalize_rgb(rgb.permute(0, 1, 3, 2)), ref.permute(0, 1, 3, 2))


def test_photometric_jitter_changes_colours_per_crop_and_moves_nothing():
    """Strength 0 is the identity; otherwise every crop gets its own change, seeded by torch's
    RNG, pixels stay in the image range, and a crop's spatial structure (where it is bright)
    is kept: the jittered crop correlates with the original."""
    import torch

    from distilpose.data import normalize, photometric_jitter

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (4, 32, 24, 3), dtype=np.uint8)
    crops[:, 8:16] = 255  # a bright band the jitter must not move
    x = normalize(crops)  # [4, 3, 32, 24]
    assert photometric_jitter(x, 0.0) is x
    torch.manual_seed(1)
    a = photometric_jitter(x, 0.4)
    torch.manual_seed(1)
    assert torch.equal(a, photometric_jitter(x, 0.4))
    assert a.shape == x.shape and a.dtype == x.dtype and not torch.equal(a, x)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    change = (a - x).mean((1, 2, 3))
    assert len(set(change.tolist())) == 4  # each crop its own draw
    rows = pixels.mean((1, 3))  # [4, 32]: brightness per row
    assert bool((rows[:, 8:16].mean(1) > rows[:, 20:].mean(1)).all())
    for i in range(4):
        r = torch.corrcoef(torch.stack([a[i].flatten(), x[i].flatten()]))[0, 1]
        assert r > 0.5
