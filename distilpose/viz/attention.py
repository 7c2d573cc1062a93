"""Paper Fig. 3b: one keypoint token's attention over the visual tokens, per model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from distilpose.data.keypoints import KEYPOINT_NAMES, NUM_KEYPOINTS
from distilpose.errors import BadConfigError
from distilpose.viz.common import (
    bgr_to_rgb,
    crop_whole_image,
    joint_indices,
    load_model,
    model_label,
    new_figure,
    save_figure,
    to_numpy,
)

ATTENTION_PANEL_SIZE = (3.0, 4.4)  # per model: a 3:4 crop plus a title line

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
        raise BadConfigError(f"{model_label(model)}: no attention layer with a to_qkv projection")
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
        raise BadConfigError(f"{model_label(model)}: attention layer {layer} was not called")
    weights = attention_weights(attn, captured[-1])  # [B, h, N, N]
    b, _, n, _ = weights.shape
    config = model.config
    num_kpt = int(config.num_keypoints)
    gw, gh = config.patch_grid
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
        u, v = to_numpy(output.coords[0, keypoint])
        return float(u) * w_in, float(v) * h_in
    heatmap = to_numpy(output.heatmaps[0, keypoint])
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
    k = joint_indices([keypoint], NUM_KEYPOINTS)[0]
    models = [load_model(c, device) for c in checkpoints]
    if isinstance(crop, str | Path):
        from distilpose.data import read_image

        image = read_image(crop)
        crops = [crop_whole_image(image, m.config.input_size) for m in models]
    else:
        crops = [np.asarray(crop, np.uint8) for _ in models]

    fig = new_figure((ATTENTION_PANEL_SIZE[0] * len(models), ATTENTION_PANEL_SIZE[1]))
    from distilpose.data import normalize

    for i, (model, shown) in enumerate(zip(models, crops, strict=True)):
        size = model.config.input_size
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
        ax.imshow(bgr_to_rgb(shown))
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
            f"{model_label(model)} ({role})\n"
            f"{KEYPOINT_NAMES[k]}, layer {layer % depth + 1}/{depth}",
            fontsize=8,
        )
    return save_figure(fig, out_png)
