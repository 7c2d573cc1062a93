"""Top-down crops: box -> (center, scale), seeded crop specs, and one pure renderer.

Augmentation is split in two, as detectron2 does it: `sample_crop_spec` is the only random
step and only decides a small record (`CropSpec`: center, scale, rotation, flip, half-body);
`render_crop` turns a spec into pixels, keypoints and weights deterministically. The store keeps
specs, the student replays them, evaluation inverts them.

Conventions (MMPose 0.x top-down, which the official checkpoints were trained with):
- `scale` is in units of 200 px (`pixel_std`); the box is padded x1.25 and widened or heightened
  to the input aspect ratio (192/256).
- The affine maps `center` to the crop centre `(W_in/2, H_in/2)` and a source width of
  `scale[0] * 200` to `W_in`; `rotation` is in degrees, positive counter-clockwise as MMPose's.
- A flip is a horizontal mirror of the crop, `x -> W_in - 1 - x` in crop pixels, folded into the
  same affine (one warp), with left/right joints swapped (`FLIP_INDEX`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import cv2
import numpy as np

from distilpose.data.instance import PersonInstance
from distilpose.data.keypoints import FLIP_INDEX, LOWER_BODY_IDS, UPPER_BODY_IDS
from distilpose.errors import BadConfigError
from distilpose.geometry import PAPER

if TYPE_CHECKING:  # torch is imported lazily: loaders and dataset workers never need it
    import torch

PIXEL_STD = 200.0  # MMPose 0.x: scale is box size / 200
BOX_PADDING = 1.25  # MMPose 0.x top-down box padding
HALF_BODY_PADDING = 1.5  # MMPose 0.x half-body box padding (instead of 1.25)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
LUMA_RGB = (0.299, 0.587, 0.114)  # ITU-R 601 gray, as torchvision's rgb_to_grayscale
BORDER_VALUE = (0, 0, 0)  # pixels from outside the image are black, as MMPose's warpAffine


def box_to_center_scale(
    bbox_xywh,
    aspect_ratio: float = 192 / 256,
    padding: float = BOX_PADDING,
    pixel_std: float = PIXEL_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Box `[x, y, w, h]` -> (center [2] float32, scale [2] float32 in units of `pixel_std`).

    The box keeps its centre and is widened or heightened to `aspect_ratio` (= W/H of the input),
    then padded by `padding`.
    """
    x, y, w, h = (float(v) for v in bbox_xywh[:4])
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / pixel_std, h / pixel_std], dtype=np.float32) * padding
    return center, scale.astype(np.float32)


@dataclass(frozen=True)
class AugmentRecipe:
    """Training augmentation; defaults are the official DistilPose student recipe."""

    flip_prob: float = 0.5  # horizontal flip
    half_body_prob: float = 0.3  # crop the upper or lower body only
    half_body_min_joints: int = 8  # half-body needs MORE than this many labelled joints
    scale_factor: float = 0.35  # scale *= clip(N * f + 1, 1 - f, 1 + f)
    rotation_factor: float = 45.0  # rotation = clip(N * f, -2f, 2f) degrees ...
    rotation_prob: float = 0.6  # ... applied with this probability (MMPose's rot_prob)

    def __post_init__(self) -> None:
        """Each field a finite number in its range (a store's metadata or a config file may
        hold anything: flip_prob "yes" must not reach the sampler)."""
        for f in fields(self):
            value = getattr(self, f.name)
            whole = f.type in (int, "int")
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or (whole and not isinstance(value, int)):
                kind = "an integer" if whole else "a number"
                raise BadConfigError(
                    f"recipe.{f.name}: got {value!r:.40} ({type(value).__name__}); expected {kind}"
                )
            if f.name.endswith("_prob"):
                ok, limits = 0 <= value <= 1, "a probability between 0 and 1"
            elif f.name == "scale_factor":  # 1 - f is the smallest scale: it must stay > 0
                ok, limits = 0 <= value < 1, "at least 0 and below 1"
            else:
                ok, limits = math.isfinite(value) and value >= 0, "finite and at least 0"
            if not ok:
                raise BadConfigError(f"recipe.{f.name}: got {value!r}; expected {limits}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentRecipe:
        """The recipe `d` describes; an unknown key is an error (a misspelt key would
        otherwise train silently with the default), and so is a value of another type or
        out of range."""
        if not isinstance(d, dict):
            raise BadConfigError(f"recipe: got {type(d).__name__}; expected a table of keys")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadConfigError(
                f"recipe: unknown key(s) {', '.join(unknown)}; expected keys among "
                f"{', '.join(sorted(known))}"
            )
        return cls(**d)


# For data that already varies pose, scale and rotation (the synthetic demo people): flips and a
# little scale only. The demo uses it; small models leave the mean pose sooner on it.
MILD_RECIPE = AugmentRecipe(half_body_prob=0.0, scale_factor=0.15, rotation_prob=0.0)


@dataclass(frozen=True)
class CropSpec:
    """Everything needed to re-render one crop of one instance; see `to_array` for the layout."""

    instance: int  # PersonInstance.index
    view: int
    center: tuple[float, float]  # image px
    scale: tuple[float, float]  # units of 200 px
    rotation: float  # degrees, counter-clockwise positive
    flip: bool
    half_body: bool

    def to_array(self) -> np.ndarray:
        """float64 [8]: instance, view, cx, cy, sx, sy, rotation, flags (flip + 2 * half_body)."""
        flags = int(self.flip) + 2 * int(self.half_body)
        return np.array(
            [self.instance, self.view, *self.center, *self.scale, self.rotation, flags],
            dtype=np.float64,
        )

    @classmethod
    def from_array(cls, a) -> CropSpec:
        a = np.asarray(a, dtype=np.float64)
        if a.shape != (8,):
            raise ValueError(f"crop spec array has shape {a.shape}; expected (8,)")
        flags = int(a[7])
        return cls(
            instance=int(a[0]),
            view=int(a[1]),
            center=(float(a[2]), float(a[3])),
            scale=(float(a[4]), float(a[5])),
            rotation=float(a[6]),
            flip=bool(flags & 1),
            half_body=bool(flags & 2),
        )


def half_body_box(
    keypoints: np.ndarray, upper_first: bool, aspect_ratio: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """MMPose 0.x half-body: centre = mean of the chosen half's labelled joints, box x1.5."""
    labelled = keypoints[:, 2] > 0
    upper = keypoints[[k for k in UPPER_BODY_IDS if labelled[k]], :2]
    lower = keypoints[[k for k in LOWER_BODY_IDS if labelled[k]], :2]
    if upper_first and len(upper) > 2:
        chosen = upper
    elif len(lower) > 2:
        chosen = lower
    else:
        chosen = upper
    if len(chosen) < 2:
        return None
    center = chosen.mean(axis=0).astype(np.float32)
    w, h = (chosen.max(axis=0) - chosen.min(axis=0)).astype(np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * HALF_BODY_PADDING
    return center, scale.astype(np.float32)


def sample_crop_spec(
    inst: PersonInstance,
    recipe: AugmentRecipe,
    seed: int,
    view: int,
    input_size: tuple[int, int] = PAPER.input_size,
) -> CropSpec:
    """Draw one training crop spec for `inst`.

    The generator is seeded by `(seed, inst.index, view)` only, and a fixed number of draws is
    taken in a fixed order whatever branch is taken, so the same spec comes out in any process,
    worker, order or machine. Order as MMPose's pipeline: flip, half-body, scale, rotation.
    """
    rng = np.random.default_rng([int(seed), int(inst.index), int(view)])
    u_flip, u_half, u_rot = rng.random(3)
    n_half, n_scale, n_rot = rng.standard_normal(3)

    center = np.asarray(inst.center, dtype=np.float32)
    scale = np.asarray(inst.scale, dtype=np.float32)
    flip = bool(u_flip < recipe.flip_prob)

    half_body = False
    labelled = int(np.count_nonzero(inst.keypoints[:, 2] > 0))
    if labelled > recipe.half_body_min_joints and u_half < recipe.half_body_prob:
        # MMPose takes the upper body when a *standard normal* draw is < 0.5 (~69%).
        box = half_body_box(inst.keypoints, n_half < 0.5, input_size[0] / input_size[1])
        if box is not None:
            center, scale = box
            half_body = True

    sf, rf = recipe.scale_factor, recipe.rotation_factor
    scale = scale * np.float32(np.clip(n_scale * sf + 1.0, 1.0 - sf, 1.0 + sf))
    rotation = (
        float(np.clip(n_rot * rf, -2.0 * rf, 2.0 * rf)) if u_rot <= recipe.rotation_prob else 0.0
    )
    return CropSpec(
        instance=int(inst.index),
        view=int(view),
        center=(float(center[0]), float(center[1])),
        scale=(float(scale[0]), float(scale[1])),
        rotation=rotation,
        flip=flip,
        half_body=half_body,
    )


def eval_crop_spec(inst: PersonInstance, view: int = 0) -> CropSpec:
    """The un-augmented crop of `inst`: its box centre and scale, no rotation, no flip."""
    return CropSpec(
        instance=int(inst.index),
        view=int(view),
        center=(float(inst.center[0]), float(inst.center[1])),
        scale=(float(inst.scale[0]), float(inst.scale[1])),
        rotation=0.0,
        flip=False,
        half_body=False,
    )


def get_affine_transform(
    center, scale, rotation: float, output_size: tuple[int, int], inverse: bool = False
) -> np.ndarray:
    """[2, 3] float64 affine image px -> crop px (or crop -> image with `inverse=True`).

    Same matrix as MMPose 0.x's three-point construction (centre, a point half a source width
    above it rotated by `rotation`, and the point perpendicular to both), written in closed form:
    a similarity `s * R(-rotation)` with `s = W_out / (scale[0] * 200)` that sends `center` to
    the output centre. Like MMPose, only `scale[0]` sets the zoom; `scale[1]` follows from the
    aspect ratio the box was made with.
    """
    cx, cy = float(center[0]), float(center[1])
    src_w = float(scale[0]) * PIXEL_STD
    out_w, out_h = float(output_size[0]), float(output_size[1])
    theta = math.radians(float(rotation))
    cos, sin = math.cos(theta), math.sin(theta)
    if not inverse:
        s = out_w / src_w
        a, b = s * cos, s * sin
        linear = np.array([[a, b], [-b, a]])
        shift = np.array([out_w * 0.5, out_h * 0.5]) - linear @ np.array([cx, cy])
    else:
        s = src_w / out_w
        a, b = s * cos, s * sin
        linear = np.array([[a, -b], [b, a]])
        shift = np.array([cx, cy]) - linear @ np.array([out_w * 0.5, out_h * 0.5])
    return np.concatenate([linear, shift[:, None]], axis=1)


def _flip_matrix(width: int) -> np.ndarray:
    """[3, 3] crop-space mirror x -> W - 1 - x (MMPose's pixel-centre flip convention)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def spec_affine(spec: CropSpec, input_size: tuple[int, int] = PAPER.input_size) -> np.ndarray:
    """[2, 3] float64 image px -> crop px for `spec`, flip included."""
    m = get_affine_transform(spec.center, spec.scale, spec.rotation, input_size)
    if spec.flip:
        m = (_flip_matrix(input_size[0]) @ np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    return m


def _invert_affine(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]


@dataclass
class RenderedCrop:
    """One rendered crop. For a flipped spec, joint k of `keypoints` is the mirror of joint
    `FLIP_INDEX[k]` of the person: map it back with `to_image` and swap to get image joints."""

    image: np.ndarray  # [H_in, W_in, 3] uint8 BGR
    keypoints: np.ndarray  # [K, 2] float32 crop px (flip applied, pairs swapped)
    weights: np.ndarray  # [K] float32: 1 if labelled (v > 0) and inside the crop, else 0
    to_image: np.ndarray  # [2, 3] float64 affine crop px -> image px (flip included)


def transform_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a [2, 3] affine to points [..., 2]."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def render_crop(
    image: np.ndarray,
    spec: CropSpec,
    keypoints: np.ndarray,
    input_size: tuple[int, int] = PAPER.input_size,
) -> RenderedCrop:
    """Warp `image` (uint8 BGR [H, W, 3]) to the crop of `spec`; pure and deterministic.

    keypoints: [K, 3] (x, y, visibility) image px, or [K, 2] (taken as labelled).
    One `cv2.warpAffine` (bilinear, black border); the flip is folded into the matrix.
    """
    w_in, h_in = int(input_size[0]), int(input_size[1])
    m = spec_affine(spec, (w_in, h_in))
    crop = cv2.warpAffine(
        image,
        m,
        (w_in, h_in),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_VALUE,
    )
    xy, weights = _keypoints_in(m, spec.flip, keypoints, (w_in, h_in))
    return RenderedCrop(image=crop, keypoints=xy, weights=weights, to_image=_invert_affine(m))


def crop_keypoints(
    spec: CropSpec, keypoints: np.ndarray, input_size: tuple[int, int] = PAPER.input_size
) -> tuple[np.ndarray, np.ndarray]:
    """The keypoints [K, 2] crop px and weights [K] that `render_crop` returns beside the
    image, without warping any pixels (crops made another way: a canvas store's)."""
    w_in, h_in = int(input_size[0]), int(input_size[1])
    return _keypoints_in(spec_affine(spec, (w_in, h_in)), spec.flip, keypoints, (w_in, h_in))


def _keypoints_in(
    m: np.ndarray, flip: bool, keypoints: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Image keypoints [K, 3] (or [K, 2], taken as labelled) -> crop px [K, 2] float32 under
    the affine `m` (flip folded in: joints swap sides) and weights [K]: labelled and inside."""
    kpts = np.asarray(keypoints, dtype=np.float32)
    vis = kpts[:, 2] if kpts.shape[1] > 2 else np.ones(len(kpts), dtype=np.float32)
    xy = transform_points(kpts[:, :2], m).astype(np.float32)
    if flip:
        xy, vis = xy[FLIP_INDEX], vis[FLIP_INDEX]
    w_in, h_in = size
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w_in) & (xy[:, 1] >= 0) & (xy[:, 1] < h_in)
    return xy, ((vis > 0) & inside).astype(np.float32)


def crop_digest(crop_image: np.ndarray) -> bytes:
    """The 32-byte sha256 of the crop's bytes (C order), as the store keeps it (its
    `crop_digest` row); equal digests mean equal pixels. Hex (`.hex()`) only in messages."""
    return hashlib.sha256(np.ascontiguousarray(crop_image).tobytes()).digest()


def normalize(crops: np.ndarray) -> torch.Tensor:
    """uint8 BGR `[H, W, 3]` or `[N, H, W, 3]` -> float32 RGB `[3, H, W]` or `[N, 3, H, W]`,
    ImageNet mean/std. The one place model inputs are normalized (with `normalize_rgb`: both
    end in `_standardize`, so a CPU and a GPU run give the same numbers)."""
    import torch

    arr = np.asarray(crops)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(
            f"normalize expects uint8 [H, W, 3] or [N, H, W, 3]; got {arr.dtype} {arr.shape}"
        )
    batch = torch.from_numpy(np.ascontiguousarray(arr)).reshape(-1, *arr.shape[-3:])
    out = torch.empty((batch.shape[0], 3, *batch.shape[1:3]), dtype=torch.float32)
    for c in range(3):  # BGR -> RGB and HWC -> CHW in the one strided copy per channel
        out[:, c].copy_(batch[..., 2 - c])
    out = _standardize(out)
    return out if arr.ndim == 4 else out[0]


def normalize_rgb(rgb) -> torch.Tensor:
    """uint8 RGB tensor `[..., 3, H, W]` on any device, or a sequence of `[3, H, W]` CPU crops
    (a decoder's output), -> float32 `[..., 3, H, W]` / `[N, 3, H, W]`, ImageNet mean/std (so
    a GPU run can ship uint8 crops and normalize them on the GPU)."""
    import torch

    if isinstance(rgb, torch.Tensor) and rgb.device.type != "cpu":
        out = torch.empty(rgb.shape, dtype=torch.float32, device=rgb.device)
        return _standardize(out.copy_(rgb))
    # on the CPU numpy's uint8 -> float32 cast is about 3x torch's one-thread copy, and a
    # list of crops is cast straight into the batch, never stacked first (store_bench)
    if isinstance(rgb, torch.Tensor):
        out = np.empty(tuple(rgb.shape), dtype=np.float32)
        np.copyto(out, rgb.numpy(), casting="unsafe")
    else:
        crops = list(rgb)
        out = np.empty((len(crops), *crops[0].shape), dtype=np.float32)
        for dst, crop in zip(out, crops, strict=True):
            np.copyto(dst, crop.numpy(), casting="unsafe")
    return _standardize(torch.from_numpy(out))


def _standardize(t: torch.Tensor) -> torch.Tensor:
    """float32 pixel values 0-255 `[..., 3, H, W]`, in place -> (x - 255 mean) / (255 std):
    two passes over the batch instead of (x / 255 - mean) / std's three new tensors (the
    normalization was the largest part of a CPU run's per-sample data cost)."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN_RGB, device=t.device).mul_(255.0).view(3, 1, 1)
    scale = torch.tensor(IMAGENET_STD_RGB, device=t.device).mul_(255.0).reciprocal_()
    return t.sub_(mean).mul_(scale.view(3, 1, 1))


def photometric_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Normalized crops `[B, 3, H, W]` (ImageNet mean/std) with a random colour change and
    noise per crop: brightness, contrast and saturation each x U(1 - s, 1 + s) (torchvision's
    ColorJitter order), then Gaussian noise of std U(0, s / 10) in [0, 1] pixel units, clamped
    to [0, 1]. Draws from torch's global RNG on the crops' device, so a seeded, resumed run
    draws the same changes. No pixel moves: keypoints and teacher targets stay exact."""
    import torch

    if strength <= 0:
        return images
    dev, b = images.device, images.shape[0]
    mean = torch.tensor(IMAGENET_MEAN_RGB, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB, device=dev).view(1, 3, 1, 1)
    luma = torch.tensor(LUMA_RGB, device=dev).view(1, 3, 1, 1)

    def blend(x: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
        f = 1 + strength * (2 * torch.rand(b, 1, 1, 1, device=dev) - 1)
        return (toward + f * (x - toward)).clamp(0, 1)

    x = images.float() * std + mean
    x = blend(x, torch.zeros_like(x))  # brightness: scale toward black
    x = blend(x, (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True))  # contrast
    x = blend(x, (x * luma).sum(1, keepdim=True))  # saturation: toward the crop's gray
    sigma = strength / 10 * torch.rand(b, 1, 1, 1, device=dev)
    x = (x + sigma * torch.randn_like(x)).clamp(0, 1)
    return ((x - mean) / std).to(images.dtype)
