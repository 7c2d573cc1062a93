"""Target codecs: keypoints <-> training targets, and model outputs -> keypoints.

One class per target type, in the style of MMPose 1.x codecs: ``encode`` turns keypoints into what
a model is trained against, ``decode`` turns what a model outputs back into keypoints. One codec
configuration feeds both directions. Notation: ``B`` samples, ``K`` keypoints, ``(W, H)`` sizes.

Coordinate convention (the project's one convention; every module follows it):

- *image px*: pixels of the original image.
- *crop px*: pixels of the crop after the affine warp; the crop is ``input_size = (W_in, H_in)``,
  e.g. 192 wide and 256 high. Keypoints in the store and in rendered crops are in crop px.
- *normalized*: ``u = x_crop / W_in``, ``v = y_crop / H_in``. Student ``coords`` and regression
  targets live here; the visible crop is ``[0, 1]``.
- *heatmap px*: ``x_hm = x_crop / stride`` with ``stride = W_in / W_hm`` (4 for 192 -> 48), so a
  normalized ``u`` sits at ``u * W_hm`` on the heatmap grid ``x = 0 .. W_hm - 1`` (the "x size"
  convention). It is used by the Gaussian targets, heatmap decoding, the simulated heatmaps
  (paper Eq. 2: ``mu = coords * (W_hm, H_hm)``) and the confidence lookup, whose index is
  ``round(u * W_hm)`` clipped to ``[0, W_hm - 1]`` (same for y).

The official code mixes three scalings (``/ size``, ``* (size - 1)``, ``* size``); only the last
one is used here. Crop px -> image px is MMPose 0.x ``transform_preds`` without rotation:
``x_img = center + (x_crop - W_in / 2) * (scale * 200 / W_in)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from distilpose.data.keypoints import FLIP_INDEX
from distilpose.geometry import PAPER, Geometry, Size

Array = np.ndarray | torch.Tensor

PIXEL_STD = 200.0  # MMPose 0.x expresses box scales in units of 200 px


def _as_numpy(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def _check_geometry(geometry: Geometry) -> Geometry:
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry: expected a distilpose.geometry.Geometry, got {geometry!r}")
    return geometry


def _check_size(name: str, size: Sequence[int]) -> Size:
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"{name}: expected a (width, height) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


class HeatmapCodec:
    """Gaussian heatmap targets (MMPose 0.x "MSRA" encoding) and their decoding.

    Args:
        geometry: crop ``input_size`` ``(W_in, H_in)`` and ``heatmap_size`` ``(W_hm, H_hm)``; the
            stride is ``W_in / W_hm``.
        sigma: Gaussian standard deviation in heatmap px (2 at 64x48, as the teacher was trained).
    """

    def __init__(self, geometry: Geometry = PAPER, sigma: float = 2.0) -> None:
        self.geometry = _check_geometry(geometry)
        self.input_size, self.heatmap_size = geometry.input_size, geometry.heatmap_size
        if sigma <= 0:
            raise ValueError(f"sigma: expected a positive value, got {sigma}")
        self.sigma = float(sigma)
        self.stride = np.array(geometry.stride, dtype=np.float32)

    def encode(self, keypoints: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints in crop px -> Gaussian target heatmaps.

        The Gaussian (peak 1, unnormalized) is centred on the nearest heatmap pixel
        ``floor(x / stride + 0.5)`` and drawn inside a ``3 sigma`` window, as MMPose 0.x does;
        a joint whose window lies entirely off the map gets weight 0 and an empty heatmap.

        Args:
            keypoints: ``[K, 2]`` (x, y) in crop px.
            weights: ``[K]``, 0 for joints that must not be trained (invisible, outside the crop).

        Returns:
            heatmaps ``[K, H_hm, W_hm]`` float32 and target weights ``[K]`` float32.
        """
        kpts = np.asarray(keypoints, dtype=np.float32).reshape(-1, 2)
        w = np.asarray(weights, dtype=np.float32).reshape(-1).copy()
        if len(w) != len(kpts):
            raise ValueError(
                f"weights: expected {len(kpts)} values (one per keypoint), got {len(w)}"
            )
        wh, hh = self.heatmap_size
        radius = 3.0 * self.sigma
        mu = np.floor(kpts / self.stride + 0.5)  # [K, 2] integer heatmap px
        # The window [ul, br) of MMPose's pasted Gaussian patch, per axis.
        ul = np.trunc(mu - radius)
        br = np.trunc(mu + radius + 1)
        off_map = (ul[:, 0] >= wh) | (ul[:, 1] >= hh) | (br[:, 0] < 0) | (br[:, 1] < 0)
        w[off_map] = 0.0

        xs = np.arange(wh, dtype=np.float32)  # [W]
        ys = np.arange(hh, dtype=np.float32)  # [H]
        gx = np.exp(-((xs[None] - mu[:, :1]) ** 2) / (2 * self.sigma**2))  # [K, W]
        gy = np.exp(-((ys[None] - mu[:, 1:]) ** 2) / (2 * self.sigma**2))  # [K, H]
        gx *= (xs[None] >= ul[:, :1]) & (xs[None] < br[:, :1])
        gy *= (ys[None] >= ul[:, 1:]) & (ys[None] < br[:, 1:])
        heatmaps = gy[:, :, None] * gx[:, None, :]  # [K, H, W]
        heatmaps *= (w > 0)[:, None, None]
        return heatmaps.astype(np.float32), w

    def decode(self, heatmaps: Array, dark: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps -> keypoints in crop px and their heatmap maxima.

        Default (MMPose 0.x "default" post-processing): argmax, then a quarter-pixel step towards
        the higher neighbour on each axis (for peaks at least 2 px from the border). With
        ``dark=True`` (DARK, Zhang et al. CVPR 2020): blur each map with an 11x11 Gaussian scaled
        back to its original maximum, take the log, and move the argmax by one Newton step
        ``-H^-1 g`` of its second-order Taylor expansion. Maps whose maximum is <= 0 decode to
        ``-1`` heatmap px (``-stride`` crop px), as MMPose marks them.

        Args:
            heatmaps: ``[B, K, H_hm, W_hm]`` numpy array or tensor.
            dark: use DARK refinement instead of the quarter-pixel shift.

        Returns:
            coords ``[B, K, 2]`` float32 in crop px and maxvals ``[B, K]`` float32 (numpy).
        """
        hm = _as_numpy(heatmaps).astype(np.float32, copy=False)
        if hm.ndim != 4:
            raise ValueError(f"heatmaps: expected [B, K, H, W], got shape {tuple(hm.shape)}")
        b, k, h, w = hm.shape
        flat = hm.reshape(b, k, h * w)
        idx = flat.argmax(axis=-1)  # [B, K]
        maxvals = np.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
        px, py = idx % w, idx // w
        coords = np.stack([px, py], axis=-1).astype(np.float32)  # [B, K, 2] heatmap px

        if dark:
            coords += _dark_offsets(hm, px, py)
        else:
            # Both neighbours on both axes exist (MMPose's "1 < p < size - 1" test).
            inner = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
            pxc, pyc = np.clip(px, 1, w - 2), np.clip(py, 1, h - 2)
            bi, ki = np.meshgrid(np.arange(b), np.arange(k), indexing="ij")
            dx = hm[bi, ki, pyc, pxc + 1] - hm[bi, ki, pyc, pxc - 1]
            dy = hm[bi, ki, pyc + 1, pxc] - hm[bi, ki, pyc - 1, pxc]
            shift = 0.25 * np.sign(np.stack([dx, dy], axis=-1))
            coords += np.where(inner[..., None], shift, 0.0).astype(np.float32)

        coords[maxvals <= 0] = -1.0
        return coords * self.stride, maxvals.astype(np.float32)

    def flip_back(
        self, heatmaps_flipped: Array, flip_index: Sequence[int] | None = None, shift: bool = True
    ) -> Array:
        """Heatmaps predicted on a horizontally flipped crop -> heatmaps of the original crop.

        Mirrors the width axis, swaps left/right channels, and (official teacher flip test,
        MMPose ``shift_heatmap=True``) shifts the result one heatmap px to the right, which
        compensates the half-pixel misalignment of mirroring at stride 4.

        Args:
            heatmaps_flipped: ``[B, K, H_hm, W_hm]`` numpy array or tensor.
            flip_index: for each joint, the index of its mirror (default COCO-17 ``FLIP_INDEX``).
            shift: apply the one-pixel shift.

        Returns:
            ``[B, K, H_hm, W_hm]``, same type as the input.
        """
        if flip_index is None:
            flip_index = FLIP_INDEX
        if heatmaps_flipped.shape[1] != len(flip_index):
            raise ValueError(
                f"heatmaps_flipped: expected {len(flip_index)} channels (one per keypoint), "
                f"got {heatmaps_flipped.shape[1]}"
            )
        index = list(flip_index)
        if isinstance(heatmaps_flipped, torch.Tensor):
            out = heatmaps_flipped.flip(-1)[:, index].clone()
        else:
            out = np.ascontiguousarray(np.asarray(heatmaps_flipped)[..., ::-1][:, index])
        if shift:
            # Column 0 keeps its value (MMPose: out[..., 1:] = out[..., :-1]).
            tail = out[..., :-1]
            out[..., 1:] = tail.clone() if isinstance(tail, torch.Tensor) else tail.copy()
        return out


def _blur_keep_peak(hm: np.ndarray, kernel: int = 11) -> np.ndarray:
    """Gaussian-blur every map of ``[B, K, H, W]`` with zero padding, rescaled to its old max.

    The same separable kernel as ``cv2.GaussianBlur(ksize, 0)`` (sigma from the kernel size), as
    two 1-D passes over all maps at once.
    """
    b, k, h, w = hm.shape
    g = cv2.getGaussianKernel(kernel, 0).astype(np.float32).ravel()  # [kernel]
    r = (kernel - 1) // 2
    # Zero padding: MMPose pads each map with zeros before blurring, so no reflected border.
    padded = np.pad(hm, ((0, 0), (0, 0), (r, r), (r, r)))
    rows = sum(g[i] * padded[..., :, i : i + w] for i in range(kernel))  # [B, K, H + 2r, W]
    blurred = sum(g[i] * rows[..., i : i + h, :] for i in range(kernel))  # [B, K, H, W]
    old_max = hm.reshape(b, k, -1).max(-1)
    new_max = blurred.reshape(b, k, -1).max(-1)
    scale = np.where(new_max > 0, old_max / np.where(new_max > 0, new_max, 1.0), 1.0)
    return (blurred * scale[..., None, None]).astype(np.float32)


def _dark_offsets(hm: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """DARK sub-pixel offsets ``[B, K, 2]`` in heatmap px for argmax positions ``px, py``."""
    b, k, h, w = hm.shape
    logh = np.log(np.maximum(_blur_keep_peak(hm), 1e-10))
    # Derivatives by central differences need two pixels on each side (MMPose's range test).
    inner = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    x, y = np.clip(px, 2, w - 3), np.clip(py, 2, h - 3)
    bi, ki = np.meshgrid(np.arange(b), np.arange(k), indexing="ij")

    def at(dy: int, dx: int) -> np.ndarray:
        return logh[bi, ki, y + dy, x + dx]

    gx = 0.5 * (at(0, 1) - at(0, -1))
    gy = 0.5 * (at(1, 0) - at(-1, 0))
    hxx = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
    hyy = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
    hxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
    det = hxx * hyy - hxy**2
    ok = inner & (det != 0)
    safe = np.where(ok, det, 1.0)
    # Newton step -H^-1 g with the closed-form inverse of the symmetric 2x2 Hessian.
    ox = -(hyy * gx - hxy * gy) / safe
    oy = -(-hxy * gx + hxx * gy) / safe
    return np.where(ok[..., None], np.stack([ox, oy], axis=-1), 0.0).astype(np.float32)


class RegressionCodec:
    """Normalized-coordinate regression targets (MMPose ``TopDownGenerateTargetRegression``).

    Args:
        geometry: its crop ``input_size`` ``(W_in, H_in)`` in pixels; normalized
            ``u = x / W_in``, ``v = y / H_in``.
    """

    def __init__(self, geometry: Geometry = PAPER) -> None:
        self.geometry = _check_geometry(geometry)
        self.input_size = geometry.input_size

    def encode(self, keypoints: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop px -> normalized coordinates.

        Args:
            keypoints: ``[K, 2]`` (or ``[..., K, 2]``) in crop px.
            weights: ``[K]`` (or ``[..., K]``).

        Returns:
            coords ``[K, 2]`` float32 normalized, and weights ``[K]`` float32, zeroed for joints
            outside ``[0, 1]`` on either axis (outside the crop, so not supervised).
        """
        coords = np.asarray(keypoints, dtype=np.float32) / np.asarray(
            self.input_size, dtype=np.float32
        )
        w = np.asarray(weights, dtype=np.float32).copy()
        inside = ((coords >= 0) & (coords <= 1)).all(-1)
        return coords, np.where(inside, w, 0.0).astype(np.float32)

    def decode(self, coords: Array) -> Array:
        """Normalized ``[B, K, 2]`` -> crop px ``[B, K, 2]`` (same array type as the input)."""
        if isinstance(coords, torch.Tensor):
            return coords * coords.new_tensor(self.input_size)
        return np.asarray(coords) * np.asarray(self.input_size, dtype=np.float32)


def _affine_parts(centers: Array, scales: Array, input_size: Size, like: Array):
    size = _check_size("input_size", input_size)
    if isinstance(like, torch.Tensor):
        c = torch.as_tensor(centers, dtype=like.dtype, device=like.device)
        s = torch.as_tensor(scales, dtype=like.dtype, device=like.device)
        sz = like.new_tensor(size)
    else:
        c = np.asarray(centers, dtype=np.float64)
        s = np.asarray(scales, dtype=np.float64)
        sz = np.asarray(size, dtype=np.float64)
    # [B, 2] -> [B, 1, 2] so that one box applies to all K joints
    return c[..., None, :], s[..., None, :] * PIXEL_STD / sz, sz


def crop_to_image(coords_crop: Array, centers: Array, scales: Array, input_size: Size) -> Array:
    """Crop px -> image px for crops without rotation (MMPose 0.x ``transform_preds``).

    ``x_img = center + (x_crop - W_in / 2) * (scale * 200 / W_in)``, same for y with ``H_in``.

    Args:
        coords_crop: ``[B, K, 2]`` in crop px.
        centers: ``[B, 2]`` box centres in image px.
        scales: ``[B, 2]`` box sizes in units of 200 px.
        input_size: crop ``(W_in, H_in)``.

    Returns:
        ``[B, K, 2]`` in image px (numpy float64 for numpy input, tensor for tensor input).
    """
    c, px_per_crop_px, sz = _affine_parts(centers, scales, input_size, coords_crop)
    return c + (coords_crop - sz / 2) * px_per_crop_px


def image_to_crop(coords_img: Array, centers: Array, scales: Array, input_size: Size) -> Array:
    """Image px ``[B, K, 2]`` -> crop px ``[B, K, 2]``; the inverse of :func:`crop_to_image`."""
    c, px_per_crop_px, sz = _affine_parts(centers, scales, input_size, coords_img)
    return (coords_img - c) / px_per_crop_px + sz / 2


def simulated_heatmaps(
    coords: torch.Tensor, sigmas: torch.Tensor, heatmap_size: Size = PAPER.heatmap_size
) -> torch.Tensor:
    """Simulated heatmaps of paper Eq. 2 from predicted positions and deviations.

    ``H_k(x, y) = exp(-((x - mu_x)^2 / sigma_x^2 + (y - mu_y)^2 / sigma_y^2) / 2)`` on the grid
    ``x = 0 .. W_hm - 1``, ``y = 0 .. H_hm - 1`` with ``mu = coords * (W_hm, H_hm)``: unnormalized
    (peak 1, like the teacher's targets) and differentiable in ``coords`` and ``sigmas``.

    Args:
        coords: ``[B, K, 2]`` normalized (x, y).
        sigmas: ``[B, K, 2]`` (sigma_x, sigma_y) in heatmap px, positive; ``[B, K, 1]`` is
            broadcast (the single-sigma variant).
        heatmap_size: ``(W_hm, H_hm)``.

    Returns:
        ``[B, K, H_hm, W_hm]`` in the dtype of ``coords``.
    """
    wh, hh = _check_size("heatmap_size", heatmap_size)
    mu = coords * coords.new_tensor([wh, hh])  # [B, K, 2] heatmap px
    var = sigmas.expand_as(coords) ** 2 + 1e-9  # the epsilon only guards sigma == 0
    xs = torch.arange(wh, dtype=coords.dtype, device=coords.device)
    ys = torch.arange(hh, dtype=coords.dtype, device=coords.device)
    ex = (xs - mu[..., :1]) ** 2 / var[..., :1]  # [B, K, W]
    ey = (ys - mu[..., 1:]) ** 2 / var[..., 1:]  # [B, K, H]
    return torch.exp(-0.5 * (ey[..., :, None] + ex[..., None, :]))  # [B, K, H, W]


def heatmap_lookup_index(
    coords: torch.Tensor, heatmap_size: Size = PAPER.heatmap_size
) -> torch.Tensor:
    """Normalized ``[B, K, 2]`` -> integer heatmap px ``[B, K, 2]``: ``round(u * W_hm)`` clipped."""
    wh, hh = _check_size("heatmap_size", heatmap_size)
    idx = torch.round(coords.detach() * coords.new_tensor([wh, hh])).long()
    return torch.stack([idx[..., 0].clamp(0, wh - 1), idx[..., 1].clamp(0, hh - 1)], dim=-1)


def heatmap_values_at(heatmaps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Heatmap values ``[B, K]`` at the rounded normalized positions ``coords [B, K, 2]``.

    No gradient flows into ``coords`` (rounding); it does flow into ``heatmaps``.
    """
    b, k, hh, wh = heatmaps.shape
    idx = heatmap_lookup_index(coords, (wh, hh))
    flat = (idx[..., 1] * wh + idx[..., 0]).unsqueeze(-1)  # [B, K, 1]
    return heatmaps.reshape(b, k, hh * wh).gather(-1, flat).squeeze(-1)
