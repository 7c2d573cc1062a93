"""Pictures: the paper's figures, drawn from checkpoints, stores, results and run directories.

One function per picture, each taking paths (or already loaded objects) and an output PNG path and
returning that path:

- `viz_heatmaps`    simulated heatmaps next to the teacher's cached ones (paper Fig. 5 / Fig. B);
- `viz_confidence`  a crop with each joint's name and score, green when correct (Fig. 6);
- `viz_attention`   one keypoint token's attention over the visual tokens (Fig. 3b);
- `viz_predictions` every person's skeleton on a whole image from COCO-format results;
- `viz_curves`      loss terms and AP per evaluation from a run directory's `metrics.csv`.

The `draw_*` functions below them take plain arrays and are what the tests check directly.
Figures are made with matplotlib's object API on the Agg canvas (never pyplot), so importing this
module changes no global backend and works on machines without a display. Every matplotlib
figure has a fixed size in inches at `DPI`, so a PNG's pixel size is known before it is drawn.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from distilpose.data.keypoints import KEYPOINT_NAMES, NUM_KEYPOINTS, OKS_SIGMAS, SKELETON
from distilpose.errors import BadAnnotationError, BadConfigError, StoreMismatchError

DPI = 100

# Sizes in inches (x DPI = pixels). Heatmap pairs: one cell per pair (simulated | teacher).
HEATMAP_PAIR_SIZE = (2.0, 1.8)
HEATMAP_PAIRS_PER_ROW = 6
HEATMAP_TITLE_HEIGHT = 0.4
CONFIDENCE_SIZE = (4.8, 6.4)  # 480 x 640 px: a 3:4 crop, like the model input
ATTENTION_PANEL_SIZE = (3.0, 4.4)  # per model: a 3:4 crop plus a title line
CURVES_SIZE = (10.0, 4.0)
PREDICTIONS_MAX_SIDE = 640  # whole-image pictures are resized so their longer side is this

# Matplotlib colours: left joints/limbs, right ones, and the middle (nose, shoulders, hips).
LEFT_COLOR, RIGHT_COLOR, MIDDLE_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"
CORRECT_COLOR, WRONG_COLOR, UNKNOWN_COLOR = "#1fbf3f", "#e0201b", "#9a9a9a"
# BGR person colours for OpenCV drawings (tab10 without the greys).
PERSON_COLORS_BGR = (
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (34, 189, 188),
    (207, 190, 23),
)


# ----------------------------------------------------------------------------- small helpers


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches the Agg canvas; no pyplot, no global backend
    return fig


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": it would change the pixel size from figure to figure.
    fig.savefig(out, dpi=DPI, format="png", pil_kwargs={"optimize": True})
    return out


def _write_bgr(image: np.ndarray, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), image, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"{out}: could not write the PNG file")
    return out


def figure_pixels(size: tuple[float, float]) -> tuple[int, int]:
    """Pixel (width, height) of a PNG drawn at `size` inches (what the tests expect)."""
    return round(size[0] * DPI), round(size[1] * DPI)


def heatmap_figure_size(num_joints: int, with_crop: bool = True) -> tuple[float, float]:
    """Figure size in inches of `draw_heatmap_pairs` for `num_joints` pairs (+ the crop panel)."""
    cells = num_joints + int(with_crop)
    cols = min(HEATMAP_PAIRS_PER_ROW, cells)
    rows = math.ceil(cells / cols)
    return cols * HEATMAP_PAIR_SIZE[0], rows * HEATMAP_PAIR_SIZE[1] + HEATMAP_TITLE_HEIGHT


def _joint_side_color(k: int) -> str:
    name = KEYPOINT_NAMES[k] if k < len(KEYPOINT_NAMES) else ""
    if name.startswith("left_"):
        return LEFT_COLOR
    if name.startswith("right_"):
        return RIGHT_COLOR
    return MIDDLE_COLOR


def _limb_color(a: int, b: int) -> str:
    ca, cb = _joint_side_color(a), _joint_side_color(b)
    return ca if ca == cb else MIDDLE_COLOR


def _joint_indices(joints: Sequence[int | str] | None, num_keypoints: int) -> list[int]:
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


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def _load_model(checkpoint: str | Path | nn.Module, device: str = "cpu") -> nn.Module:
    """A checkpoint path (this project's or an official one) or an already built model."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.to(device).eval()
    from distilpose.models import build_from_checkpoint

    model, _ = build_from_checkpoint(checkpoint, map_location=device)
    return model.to(device).eval()


def _model_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", type(model).__name__)


def _forward(model: nn.Module, crop_bgr: np.ndarray, device: str = "cpu"):
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
    return inst, render_crop(image, eval_crop_spec(inst), inst.keypoints, tuple(input_size))


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
    return render_crop(image_bgr, spec, keypoints, tuple(input_size)).image


# -------------------------------------------------------------------- 1. simulated vs teacher


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
    simulated, teacher, sigmas = _to_numpy(simulated), _to_numpy(teacher), _to_numpy(sigmas)
    if simulated.shape != teacher.shape or simulated.ndim != 3:
        raise BadConfigError(
            f"heatmaps: simulated {simulated.shape} and teacher {teacher.shape}; "
            "expected two equal [K, H, W] arrays"
        )
    if sigmas.shape != (simulated.shape[0], 2):
        raise BadConfigError(f"sigmas: shape {sigmas.shape}; expected [{simulated.shape[0]}, 2]")
    index = _joint_indices(joints, simulated.shape[0])
    with_crop = crop_bgr is not None
    size = heatmap_figure_size(len(index), with_crop)
    fig = _new_figure(size)
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
        ax.imshow(_bgr_to_rgb(crop_bgr))
        ax.set_title("crop", fontsize=7)
        if coords_px is not None:
            pts = _to_numpy(coords_px)
            for a, b in SKELETON:
                ax.plot(pts[[a, b], 0], pts[[a, b], 1], color=_limb_color(a, b), lw=1.0)
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
    return _save(fig, out_png)


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
    from distilpose.codecs import simulated_heatmaps
    from distilpose.data import CropSpec, load_coco_instances, read_image, render_crop

    if isinstance(store, str | Path) or not hasattr(store, "read_slots"):
        raise BadConfigError(
            f"store: got {store!r}; expected an opened store (store.reader.StoreReader.open(path))"
        )
    reader = store
    meta = reader.meta
    model = _load_model(student_ckpt, device)
    config = model.config
    if getattr(config, "role", "student") != "student":
        raise BadConfigError(f"{student_ckpt}: a {config.role} checkpoint; expected a student")
    input_size, heatmap_size = tuple(meta.input_size), tuple(meta.heatmap_size)
    if tuple(config.input_size) != input_size or tuple(config.heatmap_size) != heatmap_size:
        raise StoreMismatchError(
            f"store: input/heatmap size {input_size}/{heatmap_size}; the student "
            f"{config.name} uses {tuple(config.input_size)}/{tuple(config.heatmap_size)}"
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
    out = _forward(model, crop.image, device)
    sim = simulated_heatmaps(out.coords, out.sigmas, heatmap_size)[0]  # [K, Hh, Wh]
    coords_px = _to_numpy(out.coords[0]) * np.asarray(input_size, np.float32)
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


def oks_correct(
    pred_xy: np.ndarray,
    gt_keypoints: np.ndarray,
    area: float,
    thr: float = 0.5,
    sigmas: np.ndarray = OKS_SIGMAS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint correctness by COCO's OKS term: exp(-d^2 / (2 s^2 k^2)) >= thr, s^2 = area.

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
    k2 = (2.0 * np.asarray(sigmas, np.float64)) ** 2
    oks = np.exp(-d2 / (2.0 * max(float(area), np.spacing(1)) * k2))
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
    pts, scores = _to_numpy(coords_px), _to_numpy(scores).reshape(-1)
    if pts.shape != (scores.shape[0], 2):
        raise BadConfigError(f"coords: shape {pts.shape}; expected [{scores.shape[0]}, 2]")
    fig = _new_figure(CONFIDENCE_SIZE)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(_bgr_to_rgb(crop_bgr))
    ax.set_axis_off()
    h, w = crop_bgr.shape[:2]
    for a, b in SKELETON:
        if a < len(pts) and b < len(pts):
            ax.plot(pts[[a, b], 0], pts[[a, b], 1], color=_limb_color(a, b), lw=2.0, alpha=0.9)
    for k, (x, y) in enumerate(pts):
        if labelled is not None and not labelled[k]:
            edge = UNKNOWN_COLOR
        elif correct is None:
            edge = UNKNOWN_COLOR
        else:
            edge = CORRECT_COLOR if correct[k] else WRONG_COLOR
        ax.scatter([x], [y], s=14, c=[_joint_side_color(k)], edgecolors="white", zorder=3)
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
    return _save(fig, out_png)


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
    model = _load_model(student_ckpt, device)
    config = model.config
    if getattr(config, "role", "student") != "student":
        raise BadConfigError(f"{student_ckpt}: a {config.role} checkpoint; expected a student")
    from distilpose.data import eval_crop_spec, render_crop

    input_size = tuple(config.input_size)
    inst, image = load_instance(ann_file, image_root, instance)
    spec = eval_crop_spec(inst)
    crop = render_crop(image, spec, inst.keypoints, input_size)
    out = _forward(model, crop.image, device)
    coords = _to_numpy(out.coords[0])  # [K, 2] normalized
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
        _to_numpy(out.scores[0]),
        correct,
        out_png,
        labelled=labelled,
        title=f"{config.name}  image {inst.image_id}  ann {inst.ann_id}",
    )


# ----------------------------------------------------------------------------- 3. attention

_ATTENTION_NAME = re.compile(r"(?:^|\.)transformer\.layers\.(\d+)\.0\.fn\.fn$")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The encoder's self-attention modules in layer order (`transformer.layers.{i}.0.fn.fn`)."""
    found = []
    for name, module in model.named_modules():
        match = _ATTENTION_NAME.search(name)
        if match and hasattr(module, "to_qkv"):
            found.append((int(match.group(1)), module))
    if not found:  # a differently named tree: any module that owns a `to_qkv`, in order
        found = [(i, m) for i, m in enumerate(m for m in model.modules() if hasattr(m, "to_qkv"))]
    return [m for _, m in sorted(found, key=lambda t: t[0])]


def attention_weights(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) [B, h, N, N] from an attention module's `to_qkv` output [B, N, 3*D].

    Heads are split head-major as `distilpose.models.layers.Attention` does; the scale is the
    module's `scale` if it has one, else head_dim ** -0.5 (the official `scale_with_head`).
    """
    heads = int(attn.heads)
    b, n, three_inner = qkv.shape
    head_dim = three_inner // 3 // heads
    q, k, _ = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, h, N, d]
    scale = float(getattr(attn, "scale", head_dim**-0.5))
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def keypoint_attention(
    model: nn.Module, images: torch.Tensor, keypoint: int, layer: int = -1
) -> tuple[np.ndarray, object]:
    """Attention of keypoint token `keypoint` over the visual tokens at encoder layer `layer`.

    softmax(q k^T * scale) is recomputed from the layer's hooked `to_qkv` output, averaged over
    heads, and reshaped to the patch grid (tokens: K keypoint tokens first, then P visual tokens
    in row-major patch order).

    Returns:
        (attention [B, gh, gw] float32, the model's output for `images`).
    """
    layers = attention_modules(model)
    if not layers:
        raise BadConfigError(f"{_model_label(model)}: no attention layer with a to_qkv projection")
    if not -len(layers) <= layer < len(layers):
        raise BadConfigError(f"layer: {layer} outside the encoder's {len(layers)} layers")
    attn = layers[layer]
    captured: list[torch.Tensor] = []
    handle = attn.to_qkv.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            output = model(images)
    finally:
        handle.remove()
    if not captured:
        raise BadConfigError(f"{_model_label(model)}: attention layer {layer} was not called")
    weights = attention_weights(attn, captured[-1])  # [B, h, N, N]
    b, _, n, _ = weights.shape
    config = model.config
    num_kpt = int(config.num_keypoints)
    gw = config.heatmap_size[0] // config.patch_size[0]
    gh = config.heatmap_size[1] // config.patch_size[1]
    if n != num_kpt + gw * gh:
        raise BadConfigError(
            f"{config.name}: {n} tokens; expected {num_kpt} keypoint + {gw * gh} visual tokens"
        )
    row = weights[:, :, keypoint, num_kpt:].mean(1)  # [B, P]
    return row.reshape(b, gh, gw).float().cpu().numpy(), output


def _predicted_joint(model: nn.Module, output, keypoint: int) -> tuple[float, float]:
    """The model's own location of `keypoint` in crop pixels (student coords or heatmap argmax)."""
    w_in, h_in = model.config.input_size
    if hasattr(output, "coords"):
        u, v = _to_numpy(output.coords[0, keypoint])
        return float(u) * w_in, float(v) * h_in
    heatmap = _to_numpy(output.heatmaps[0, keypoint])
    y, x = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
    stride = w_in / heatmap.shape[1]
    return x * stride, y * stride  # x_crop = x_hm * stride (the codecs' convention)


def viz_attention(
    checkpoints: str | Path | nn.Module | Sequence[str | Path | nn.Module],
    crop: np.ndarray | str | Path,
    out_png: str | Path,
    keypoint: str | int = "right_ankle",
    layer: int = -1,
    *,
    device: str = "cpu",
) -> Path:
    """Paper Fig. 3b: one keypoint token's attention over the visual tokens, per model.

    Args:
        checkpoints: one checkpoint/model or several (e.g. teacher and student), one panel each.
        crop: a crop (uint8 BGR [H, W, 3]; shown as given and resized to each model's input) or
            an image file, taken whole as one person box; `render_instance(...)[1].image` gives
            a person's (at a larger size of the same aspect for a sharper picture).
        keypoint: COCO-17 name or index (the red dot marks the model's own prediction of it).
        layer: encoder layer (Python indexing: -1 is the last).
        out_png: size `figure_pixels((n * ATTENTION_PANEL_SIZE[0], ATTENTION_PANEL_SIZE[1]))`.
    """
    if isinstance(checkpoints, str | Path | nn.Module):
        checkpoints = [checkpoints]
    k = _joint_indices([keypoint], NUM_KEYPOINTS)[0]
    models = [_load_model(c, device) for c in checkpoints]
    if isinstance(crop, str | Path):
        from distilpose.data import read_image

        image = read_image(crop)
        crops = [crop_whole_image(image, m.config.input_size) for m in models]
    else:
        crops = [np.asarray(crop, np.uint8) for _ in models]

    fig = _new_figure((ATTENTION_PANEL_SIZE[0] * len(models), ATTENTION_PANEL_SIZE[1]))
    from distilpose.data import normalize

    for i, (model, shown) in enumerate(zip(models, crops, strict=True)):
        size = tuple(model.config.input_size)
        crop_i = (
            shown
            if shown.shape[1::-1] == size
            else cv2.resize(shown, size, interpolation=cv2.INTER_AREA)
        )
        images = normalize(crop_i[None]).to(device)  # [1, 3, H_in, W_in]
        attention, output = keypoint_attention(model, images, k, layer)
        h, w = shown.shape[:2]
        # Each patch covers a block of the crop: nearest keeps the patch grid visible.
        up = cv2.resize(attention[0], (w, h), interpolation=cv2.INTER_NEAREST)
        ax = fig.add_axes((i / len(models) + 0.01, 0.01, 1 / len(models) - 0.02, 0.90))
        ax.imshow(_bgr_to_rgb(shown))
        ax.imshow(up, cmap="jet", alpha=0.5, extent=(0, w, h, 0))
        x, y = _predicted_joint(model, output, k)
        ax.scatter(
            [x * w / size[0]], [y * h / size[1]], s=30, c="red", edgecolors="white", zorder=3
        )
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        role = getattr(model.config, "role", "")
        depth = len(attention_modules(model))
        ax.set_title(
            f"{_model_label(model)} ({role})\n"
            f"{KEYPOINT_NAMES[k]}, layer {layer % depth + 1}/{depth}",
            fontsize=8,
        )
    return _save(fig, out_png)


# --------------------------------------------------------------------- 4. whole-image results


def _image_id_from_name(path: str | Path) -> int | None:
    digits = re.findall(r"\d+", Path(path).stem)
    return int(digits[-1]) if digits else None


def draw_skeletons(
    image_bgr: np.ndarray,
    people: Sequence[np.ndarray],
    out_png: str | Path,
    *,
    labels: Sequence[str] | None = None,
    kpt_thr: float = 0.2,
    max_side: int = PREDICTIONS_MAX_SIDE,
) -> Path:
    """Every person's skeleton on a whole image (OpenCV), resized so its longer side is `max_side`.

    Args:
        image_bgr: [H, W, 3] uint8.
        people: per person [K, 3] (x, y, score) image pixels; joints scoring below `kpt_thr`
            are left out.
        labels: optional text per person (drawn at its top-left joint).
    """
    h, w = image_bgr.shape[:2]
    factor = max_side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    canvas = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    for p, kpts in enumerate(people):
        kpts = np.asarray(kpts, np.float64).reshape(-1, 3)
        color = PERSON_COLORS_BGR[p % len(PERSON_COLORS_BGR)]
        xy = np.round(kpts[:, :2] * factor).astype(int)
        shown = kpts[:, 2] >= kpt_thr
        for a, b in SKELETON:
            if a < len(kpts) and b < len(kpts) and shown[a] and shown[b]:
                cv2.line(canvas, tuple(xy[a]), tuple(xy[b]), color, 2, cv2.LINE_AA)
        for j in np.flatnonzero(shown):
            cv2.circle(canvas, tuple(xy[j]), 3, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(canvas, tuple(xy[j]), 3, color, 1, cv2.LINE_AA)
        if labels is not None and shown.any():
            x0, y0 = xy[shown].min(0)
            org = (int(x0), max(12, int(y0) - 6))
            cv2.putText(canvas, labels[p], org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3)
            cv2.putText(canvas, labels[p], org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1)
    return _write_bgr(canvas, out_png)


def viz_predictions(
    results_json: str | Path | list[dict],
    image_path: str | Path,
    out_png: str | Path,
    image_id: int | None = None,
    score_thr: float = 0.3,
    *,
    kpt_thr: float = 0.2,
    max_side: int = PREDICTIONS_MAX_SIDE,
) -> Path:
    """Every person scoring >= `score_thr` in COCO keypoint results, drawn on the image.

    `image_id` defaults to the only id in the results, else to the number in the image's file
    name (COCO names files by id, e.g. 000000000785.jpg).
    """
    import json

    from distilpose.data import read_image

    if isinstance(results_json, list):
        results = results_json
    else:
        try:
            results = json.loads(Path(results_json).read_text())
        except (OSError, ValueError) as e:
            raise BadAnnotationError(
                f"{results_json}: not a readable JSON results file ({e})"
            ) from e
    if not isinstance(results, list):
        raise BadAnnotationError(f"{results_json}: expected a list of COCO keypoint results")
    if image_id is None:
        ids = {int(r["image_id"]) for r in results if "image_id" in r}
        image_id = next(iter(ids)) if len(ids) == 1 else _image_id_from_name(image_path)
        if image_id is None:
            raise BadConfigError(f"image_id: {image_path} names no id; pass image_id")
    people, labels = [], []
    for r in results:
        if int(r.get("image_id", -1)) != image_id or float(r.get("score", 0.0)) < score_thr:
            continue
        if len(r.get("keypoints", ())) != NUM_KEYPOINTS * 3:
            raise BadAnnotationError(
                f"{results_json}: a result of image {image_id} has "
                f"{len(r.get('keypoints', ()))} keypoint values; expected {NUM_KEYPOINTS * 3}"
            )
        people.append(np.asarray(r["keypoints"], np.float64).reshape(NUM_KEYPOINTS, 3))
        labels.append(f"{float(r['score']):.2f}")
    return draw_skeletons(
        read_image(image_path), people, out_png, labels=labels, kpt_thr=kpt_thr, max_side=max_side
    )


# -------------------------------------------------------------------------------- 5. curves


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv -> {column: float array}; empty cells (a row without that value) are NaN.

    The trainer's `kind` column ("step" rows every `log_every` steps, "epoch" rows with the
    epoch means and evaluation results) is kept as a str array.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise BadConfigError(f"{path}: cannot read the metrics file ({e})") from e
    if not rows:
        raise BadConfigError(f"{path}: no rows; expected a header and one row per logged step")

    def number(s: str | None) -> float:
        try:
            return float(s) if s not in (None, "") else math.nan
        except ValueError:
            return math.nan

    columns = [c for c in rows[0] if c is not None]
    out = {c: np.array([number(r.get(c)) for r in rows]) for c in columns if c != "kind"}
    if "kind" in columns:
        out["kind"] = np.array([r.get("kind") or "" for r in rows])
    return out


def _is_ap_column(name: str) -> bool:
    # COCO's stats (AP, AP50, ..., AR) as written by periodic evaluation, with or without a prefix.
    return re.fullmatch(r"(?:\w+[/_])?A[PR](?:50|75|m|l)?", name) is not None


def draw_curves(metrics: dict[str, np.ndarray], out_png: str | Path, title: str = "") -> Path:
    """Loss terms against step (log y) on the left; AP per evaluation, or the lr, on the right."""
    n = len(next(iter(metrics.values())))
    step = metrics.get("step", np.full(n, np.nan))
    if np.isnan(step).all():
        step = np.arange(n, dtype=float)
    # `epoch` is the 0-based epoch a row belongs to; an evaluation after it has seen epoch + 1.
    epoch = metrics.get("epoch", np.arange(n, dtype=float)) + 1
    kind = metrics.get("kind", np.full(n, ""))
    # Loss lines from the step rows when there are any (epoch rows repeat them as means).
    loss_rows = kind == "step" if (kind == "step").any() else np.ones(n, bool)
    fig = _new_figure(CURVES_SIZE)
    ax_loss = fig.add_axes((0.07, 0.13, 0.40, 0.77))
    ax_right = fig.add_axes((0.57, 0.13, 0.40, 0.77))
    losses = [c for c in metrics if c == "loss" or c.startswith("loss_")]
    for c in losses:
        ok = loss_rows & np.isfinite(metrics[c]) & (metrics[c] > 0) & np.isfinite(step)
        if ok.any():
            ax_loss.plot(step[ok], metrics[c][ok], lw=1.5 if c == "loss" else 1.0, label=c)
    if ax_loss.lines:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7, loc="best")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss terms", fontsize=9)
    ax_loss.grid(alpha=0.3, which="both")

    ap_cols = [c for c in metrics if _is_ap_column(c)]
    for c in ap_cols:
        ok = np.isfinite(metrics[c]) & np.isfinite(epoch)
        if ok.any():
            ax_right.plot(epoch[ok], metrics[c][ok], marker="o", ms=3, label=c)
    if ax_right.lines:
        ax_right.set_xlabel("epochs trained")
        ax_right.set_title("COCO keypoint AP per evaluation", fontsize=9)
        ax_right.legend(fontsize=7, loc="best")
    elif "lr" in metrics and np.isfinite(metrics["lr"]).any():
        ok = loss_rows & np.isfinite(metrics["lr"]) & np.isfinite(step)
        ax_right.plot(step[ok], metrics["lr"][ok], color="k", lw=1.0)
        ax_right.set_xlabel("step")
        ax_right.set_title("learning rate (no evaluation logged)", fontsize=9)
    else:
        ax_right.set_title("no evaluation logged", fontsize=9)
    ax_right.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9, y=0.99)
    return _save(fig, out_png)


def viz_curves(run_dir: str | Path, out_png: str | Path) -> Path:
    """Training curves of a run directory (or a metrics.csv path): losses and AP per evaluation."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / "metrics.csv"
    if not path.is_file():
        raise BadConfigError(f"{path}: no metrics file; expected a run directory with metrics.csv")
    return draw_curves(read_metrics(path), out_png, title=str(path.parent.name))
