"""Codecs: Gaussian targets, heatmap decoding (argmax+shift, DARK), flip-back, regression targets,
crop <-> image coordinates and the simulated heatmaps of paper Eq. 2."""

import math

import numpy as np
import pytest
import torch

from distilpose.data.codecs import (
    HeatmapCodec,
    RegressionCodec,
    crop_to_image,
    heatmap_lookup_index,
    heatmap_values_at,
    image_to_crop,
    simulated_heatmaps,
)
from distilpose.data.crop import get_affine_transform, transform_points
from distilpose.data.keypoints import FLIP_INDEX, NUM_KEYPOINTS
from distilpose.geometry import Geometry

INPUT, HEATMAP = (192, 256), (48, 64)
STRIDE = 4.0


def random_keypoints(rng, n, margin=12.0):
    """[n, 2] crop px away from the border (so the quarter shift / DARK apply)."""
    return np.stack(
        [rng.uniform(margin, INPUT[0] - margin, n), rng.uniform(margin, INPUT[1] - margin, n)], -1
    ).astype(np.float32)


# ---- HeatmapCodec.encode ---------------------------------------------------------------------


def test_encode_gaussian_values_and_peak():
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP), sigma=2.0)
    kpts = np.array([[41.9, 81.0], [100.0, 30.1]], np.float32)
    hm, w = codec.encode(kpts, np.ones(2))
    assert hm.shape == (2, 64, 48) and hm.dtype == np.float32
    np.testing.assert_array_equal(w, [1, 1])
    # 41.9 / 4 = 10.475 -> centre column 10 (floor(x + 0.5)); 81 / 4 = 20.25 -> row 20
    assert hm[0].max() == 1.0 and hm[0, 20, 10] == 1.0
    assert hm[0, 20, 11] == pytest.approx(math.exp(-1 / 8))
    assert hm[0, 22, 9] == pytest.approx(math.exp(-(4 + 1) / 8))
    # 3-sigma window: 6 px from the centre is drawn, 7 px is not
    assert hm[0, 20, 16] == pytest.approx(math.exp(-36 / 8)) and hm[0, 20, 17] == 0
    assert hm[1, 8, 25] == 1.0  # (100 / 4, 30.1 / 4) -> (25, 8)


def test_encode_weights_off_map_and_invisible():
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP))
    kpts = np.array([[-10.0, 50.0], [-40.0, 50.0], [50.0, 50.0], [50.0, 300.0]], np.float32)
    hm, w = codec.encode(kpts, np.array([1, 1, 0, 1]))
    # x = -10 -> centre -2: the window still reaches the map, so the joint keeps its weight
    np.testing.assert_array_equal(w, [1, 0, 0, 0])
    assert hm[0].max() > 0
    assert not hm[1:].any()  # off the map or weight 0: empty target


# ---- HeatmapCodec.decode ---------------------------------------------------------------------


def test_encode_decode_round_trip_within_half_stride():
    rng = np.random.default_rng(0)
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP))
    kpts = random_keypoints(rng, 17)
    hm, _ = codec.encode(kpts, np.ones(17))
    coords, maxvals = codec.decode(hm[None])
    assert coords.shape == (1, 17, 2) and maxvals.shape == (1, 17)
    np.testing.assert_allclose(maxvals, 1.0)
    # The target is centred on the nearest heatmap pixel: error <= stride / 2 on each axis.
    assert np.abs(coords[0] - kpts).max() <= STRIDE / 2 + 1e-4
    # Keypoints on the heatmap grid come back exactly (symmetric peak: no shift).
    grid = np.round(kpts / STRIDE) * STRIDE
    hm, _ = codec.encode(grid, np.ones(17))
    np.testing.assert_allclose(codec.decode(hm[None])[0][0], grid, atol=1e-5)
    # DARK's zero-padded blur pulls peaks near the border inwards a little (< 1/4 heatmap px).
    np.testing.assert_allclose(codec.decode(hm[None], dark=True)[0][0], grid, atol=1.0)


def test_decode_quarter_shift_towards_higher_neighbour():
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP))
    hm = np.zeros((1, 2, 64, 48), np.float32)
    hm[0, 0, 30, 20] = 1.0
    hm[0, 0, 30, 21] = 0.5  # right neighbour higher: +0.25 in x
    hm[0, 0, 29, 20] = 0.5  # upper neighbour higher: -0.25 in y
    hm[0, 1, 30, 1] = 1.0  # too close to the border: no shift (MMPose's 1 < x < W - 1)
    hm[0, 1, 30, 2] = 0.5
    coords, maxvals = codec.decode(torch.from_numpy(hm))
    np.testing.assert_allclose(coords[0, 0], [20.25 * 4, 29.75 * 4])
    np.testing.assert_allclose(coords[0, 1], [1 * 4, 30 * 4])
    np.testing.assert_allclose(maxvals[0], [1.0, 1.0])


def test_decode_marks_empty_maps():
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP))
    coords, maxvals = codec.decode(np.zeros((2, 3, 64, 48), np.float32))
    np.testing.assert_array_equal(coords, -STRIDE)
    np.testing.assert_array_equal(maxvals, 0.0)


def test_dark_beats_argmax_on_sub_pixel_positions():
    rng = np.random.default_rng(1)
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP))
    kpts = random_keypoints(rng, 2 * 17, margin=16.0).reshape(2, 17, 2)
    norm = torch.from_numpy(kpts / np.array(INPUT, np.float32))
    hm = simulated_heatmaps(norm, torch.full((2, 17, 2), 2.0), HEATMAP).numpy()
    before = hm.copy()
    plain, _ = codec.decode(hm)
    dark, maxvals = codec.decode(hm, dark=True)
    np.testing.assert_array_equal(hm, before)  # decoding must not modify its input
    err_plain = np.linalg.norm(plain - kpts, axis=-1)
    err_dark = np.linalg.norm(dark - kpts, axis=-1)
    assert err_dark.mean() < 0.5 * err_plain.mean()
    assert err_dark.max() < 0.5  # crop px, i.e. 1/8 heatmap px
    assert (maxvals > 0.7).all()  # maxvals are from the unblurred maps


def test_decode_rejects_wrong_rank():
    with pytest.raises(ValueError, match="heatmaps"):
        HeatmapCodec().decode(np.zeros((17, 64, 48)))


# ---- flip_back -------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flip_back_recovers_mirrored_keypoints(as_tensor):
    rng = np.random.default_rng(2)
    codec = HeatmapCodec(Geometry(INPUT, HEATMAP))
    kpts = np.round(random_keypoints(rng, NUM_KEYPOINTS) / STRIDE) * STRIDE
    # What the teacher sees on the flipped crop: x -> W - 1 - x and left/right swapped.
    flipped = kpts[FLIP_INDEX].copy()
    flipped[:, 0] = INPUT[0] - 1 - flipped[:, 0]
    hm, _ = codec.encode(flipped, np.ones(NUM_KEYPOINTS))
    hm = hm[None]
    back = codec.flip_back(torch.from_numpy(hm) if as_tensor else hm)
    assert isinstance(back, torch.Tensor) == as_tensor
    coords, _ = codec.decode(back)
    # Mirroring at stride 4 leaves (W_in - 1) / 4 - (W_hm - 1) = -0.75 heatmap px; the official
    # one-pixel shift turns it into +0.25 before rounding, so grid keypoints come back exactly.
    np.testing.assert_allclose(coords[0], kpts, atol=1e-5)
    unshifted, _ = codec.decode(codec.flip_back(hm, shift=False))
    np.testing.assert_allclose(unshifted[0, :, 0], kpts[:, 0] - STRIDE, atol=1e-5)
    np.testing.assert_allclose(unshifted[0, :, 1], kpts[:, 1], atol=1e-5)


def test_flip_back_checks_channels():
    with pytest.raises(ValueError, match="17"):
        HeatmapCodec().flip_back(np.zeros((1, 5, 64, 48)))


# ---- RegressionCodec ---------------------------------------------------------------------------


def test_regression_round_trip_and_weights():
    rng = np.random.default_rng(3)
    codec = RegressionCodec(Geometry(INPUT))
    kpts = random_keypoints(rng, 17, margin=0.0)
    kpts[3] = [-1.0, 10.0]  # left of the crop
    kpts[4] = [10.0, 256.5]  # below it
    coords, w = codec.encode(kpts, np.ones(17))
    assert coords.dtype == np.float32 and w.dtype == np.float32
    np.testing.assert_allclose(coords[0], kpts[0] / np.array([192, 256]), rtol=1e-6)
    assert w[3] == 0 and w[4] == 0 and w.sum() == 15
    np.testing.assert_allclose(codec.decode(coords[None])[0], kpts, atol=1e-5)
    back = codec.decode(torch.from_numpy(coords[None]))
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back[0].numpy(), kpts, atol=1e-5)


# ---- crop <-> image ------------------------------------------------------------------------------


def test_crop_to_image_inverts_image_to_crop_and_matches_the_affine():
    rng = np.random.default_rng(4)
    centers = rng.uniform(100, 500, (3, 2))
    widths = rng.uniform(0.5, 3.0, 3)
    scales = np.stack([widths, widths * 256 / 192], -1)  # aspect ratio of the crop
    crop = np.stack([random_keypoints(rng, 17, margin=0.0) for _ in range(3)])
    img = crop_to_image(crop, centers, scales, INPUT)
    np.testing.assert_allclose(image_to_crop(img, centers, scales, INPUT), crop, atol=1e-6)
    # Hand check: the crop centre is the box centre; the crop's left edge is centre - scale*100.
    probe = np.array([[[96.0, 128.0], [0.0, 0.0]]])
    out = crop_to_image(probe, centers[:1], scales[:1], INPUT)
    np.testing.assert_allclose(out[0, 0], centers[0])
    np.testing.assert_allclose(out[0, 1], centers[0] - scales[0] * 100)
    # Same mapping as the data pipeline's inverse affine (no rotation).
    for i in range(3):
        m = get_affine_transform(centers[i], scales[i], 0.0, INPUT, inverse=True)
        np.testing.assert_allclose(transform_points(crop[i], m), img[i], atol=1e-6)
    t = crop_to_image(torch.from_numpy(crop), centers, scales, INPUT)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), img, rtol=1e-6, atol=1e-3)  # float32


# ---- simulated heatmaps (paper Eq. 2) ------------------------------------------------------------


def test_simulated_heatmaps_match_eq2_by_hand():
    coords = torch.tensor([[[0.25, 0.5], [0.1, 0.9]]])  # mu = (12, 32) and (4.8, 57.6)
    sigmas = torch.tensor([[[2.0, 3.0], [1.5, 2.5]]])
    hm = simulated_heatmaps(coords, sigmas, HEATMAP)
    assert hm.shape == (1, 2, 64, 48)
    assert hm[0, 0, 32, 12].item() == pytest.approx(1.0)
    # H(x=14, y=29) = exp(-((14-12)^2/2^2 + (29-32)^2/3^2) / 2) = exp(-1)
    assert hm[0, 0, 29, 14].item() == pytest.approx(math.exp(-1.0), rel=1e-6)
    # H(x=3, y=60) for mu = (4.8, 57.6), sigma = (1.5, 2.5)
    expected = math.exp(-0.5 * ((3 - 4.8) ** 2 / 1.5**2 + (60 - 57.6) ** 2 / 2.5**2))
    assert hm[0, 1, 60, 3].item() == pytest.approx(expected, rel=1e-5)
    flat = hm.reshape(2, -1).argmax(-1)
    assert (flat % 48).tolist() == [12, 5] and (flat // 48).tolist() == [32, 58]


def test_simulated_heatmaps_single_sigma_and_gradients():
    torch.manual_seed(0)
    coords = torch.rand(2, 3, 2, dtype=torch.float64, requires_grad=True)
    sigmas = (1.0 + torch.rand(2, 3, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, s: simulated_heatmaps(c, s, (6, 8)), (coords, sigmas))
    one = simulated_heatmaps(coords, sigmas[..., :1], (6, 8))
    two = simulated_heatmaps(coords, sigmas[..., :1].expand(-1, -1, 2), (6, 8))
    torch.testing.assert_close(one, two)


def test_heatmap_lookup_rounds_and_clips():
    coords = torch.tensor([[[0.26, 0.5], [1.0, 0.0], [-0.2, 1.3]]])  # x*48, y*64
    idx = heatmap_lookup_index(coords, HEATMAP)
    assert idx.tolist() == [[[12, 32], [47, 0], [0, 63]]]
    hm = torch.arange(3 * 64 * 48, dtype=torch.float32).reshape(1, 3, 64, 48)
    vals = heatmap_values_at(hm, coords)
    expected = [0 * 3072 + 32 * 48 + 12, 1 * 3072 + 0 + 47, 2 * 3072 + 63 * 48 + 0]
    assert vals.tolist() == [[float(v) for v in expected]]
