"""What every figure shares: the Agg figure and PNG writers, joint selection, model loading and
the crops pictures are drawn on.

Figures are made with matplotlib's object API on the Agg canvas (never pyplot), so importing the
package changes no global backend and works on machines without a display. Every matplotlib
figure has a fixed size in inches at `DPI`, so a PNG's pixel size is known before it is drawn.
PNGs are written atomically (`distilpose.io`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from distilpose.data.keypoints import KEYPOINT_NAMES, NUM_KEYPOINTS
from distilpose.errors import BadAnnotationError, BadConfigError
from distilpose.io import atomic_open, atomic_path
from distilpose.models import build_from_checkpoint

DPI = 100


def new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches the Agg canvas; no pyplot, no global backend
    return fig


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    with atomic_path(out) as tmp:
        # No bbox_inches="tight": it would change the pixel size from figure to figure.
        fig.savefig(tmp, dpi=DPI, format="png", pil_kwargs={"optimize": True})
    return out


def write_png_bgr(image: np.ndarray, out_png: str | Path) -> Path:
    out = Path(out_png)
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"{out}: could not encode the PNG file")
    with atomic_open(out, "wb") as f:
        f.write(data.tobytes())
    return out


def figure_pixels(size: tuple[float, float]) -> tuple[int, int]:
    """Pixel (width, height) of a PNG drawn at `size` inches (what the tests expect)."""
    return round(size[0] * DPI), round(size[1] * DPI)


def joint_indices(joints: Sequence[int | str] | None, num_keypoints: int) -> list[int]:
    """Joint names or indices -> indices; None -> all joints."""
    if joints is None:
        return list(range(num_keypoints))
    out = []
    for j in joints:
        if isinstance(j, str):
            if j not in KEYPOINT_NAMES:
                raise BadConfigError(
                    f"joints: unknown keypoint {j!r}; expected one of COCO-17 names"
                )
            out.append(KEYPOINT_NAMES.index(j))
        elif 0 <= int(j) < num_keypoints:
            out.append(int(j))
        else:
            raise BadConfigError(f"joints: index {j} outside [0, {num_keypoints - 1}]")
    return out


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def load_model(
    checkpoint: str | Path | nn.Module, device: str = "cpu", role: str | None = None
) -> nn.Module:
    """A checkpoint path (this project's or an official one) or an already built model; with
    `role`, one of that role ("student" or "teacher") or BadConfigError."""
    if isinstance(checkpoint, nn.Module):
        model = checkpoint
    else:
        model, _ = build_from_checkpoint(checkpoint, map_location=device)
    found = getattr(model.config, "role", role)
    if role is not None and found != role:
        name = model_label(model) if checkpoint is model else checkpoint
        raise BadConfigError(f"{name}: a {found} checkpoint; expected a {role}")
    return model.to(device).eval()


def model_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", type(model).__name__)


def forward_crop(model: nn.Module, crop_bgr: np.ndarray, device: str = "cpu"):
    """Run one crop through a model; returns its output dataclass (batch of one)."""
    from distilpose.data import normalize

    with torch.no_grad():
        return model(normalize(crop_bgr[None]).to(device))  # [1, 3, H_in, W_in]


# ------------------------------------------------------------------- crops from annotation files


def load_instance(ann_file: str | Path, image_root: str | Path, instance: int):
    """Person `instance` (PersonInstance.index of the file's GT boxes) and its image (BGR)."""
    from distilpose.data import load_coco_instances, read_image

    instances = load_coco_instances(ann_file, image_root)
    if not 0 <= instance < len(instances):
        raise BadAnnotationError(
            f"{ann_file}: instance {instance} asked for; the file has {len(instances)} people"
        )
    inst = instances[instance]
    return inst, read_image(inst.image_path)


def render_instance(ann_file: str | Path, image_root: str | Path, instance: int, input_size):
    """Load person `instance` and crop it without augmentation to `input_size` (W, H).

    A larger `input_size` of the same aspect gives the same view at a higher resolution (the
    crop's affine maps the same box onto it), which is how pictures get sharp crops.
    Returns (PersonInstance, RenderedCrop).
    """
    from distilpose.data import eval_crop_spec, render_crop

    inst, image = load_instance(ann_file, image_root, instance)
    return inst, render_crop(image, eval_crop_spec(inst), inst.keypoints, input_size)


def display_size(input_size, height_px: int) -> tuple[int, int]:
    """`input_size` (W, H) scaled to `height_px` high: the resolution a picture shows a crop at."""
    factor = height_px / input_size[1]
    return round(input_size[0] * factor), round(input_size[1] * factor)


def crop_whole_image(image_bgr: np.ndarray, input_size) -> np.ndarray:
    """The whole image as one person box, cropped (padded to the aspect ratio) to `input_size`."""
    from distilpose.data import CropSpec, render_crop
    from distilpose.data.crop import box_to_center_scale

    h, w = image_bgr.shape[:2]
    w_in, h_in = input_size
    center, scale = box_to_center_scale((0.0, 0.0, float(w), float(h)), aspect_ratio=w_in / h_in)
    spec = CropSpec(
        instance=0,
        view=0,
        center=(float(center[0]), float(center[1])),
        scale=(float(scale[0]), float(scale[1])),
        rotation=0.0,
        flip=False,
        half_body=False,
    )
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    return render_crop(image_bgr, spec, keypoints, input_size).image
