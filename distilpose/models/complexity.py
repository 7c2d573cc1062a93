"""Parameters and multiply-accumulates (MACs), counted the way the paper did.

The paper's "GFLOPs" come from MMCV's `get_model_complexity_info`, which counts per call of a
leaf module: convolutions (kernel x in/groups x out per output position, + bias), transposed
convolutions (the same per *input* position), linear layers (input elements x output
features), normalisation layers (input elements, x2 with an affine), ReLU-family activations
(output elements), pooling (input elements) and upsampling (output elements).
It does NOT count GELU, softmax, additions or attention's two matrix products.
The "full" count adds those products (q @ k^T and attn @ v: 2 x B x N^2 x D per attention
layer), which matter for the token encoder (DistilPose-S: 2.38 paper-style, ~2.7 full).

Counts use one crop [1, 3, H, W] at the model's `input_size`; GMACs = MACs / 1e9. A model on
the meta device is counted without computing anything (how `model_info(name)` does it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from distilpose.models.layers import Attention
from distilpose.models.registry import MODEL_NAMES, build_model

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (the fixed sine position embedding is saved but not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _module_macs(m: nn.Module, inputs: tuple, output: torch.Tensor, full: bool) -> int:
    """MACs of one call of a leaf module, by MMCV's rules (plus attention products if `full`)."""
    x = inputs[0] if inputs else None
    if isinstance(m, nn.Conv2d):
        per_position = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        positions = output.numel() // m.out_channels  # B * H_out * W_out
        macs = per_position * m.out_channels * positions
        return macs + (output.numel() if m.bias is not None else 0)
    if isinstance(m, nn.ConvTranspose2d):  # MMCV: per *input* position
        per_position = m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels
        positions = x.numel() // m.in_channels
        macs = per_position // m.groups * positions
        return macs + (m.out_channels * positions if m.bias is not None else 0)
    if isinstance(m, nn.Linear):
        return x.numel() * m.out_features
    if isinstance(m, _NORMS):
        affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
        return x.numel() * (2 if affine else 1)
    if isinstance(m, _ACTIVATIONS):
        return output.numel()
    if isinstance(m, _POOLS):
        return x.numel()
    if isinstance(m, nn.Upsample):
        return output.numel()
    if full and isinstance(m, Attention):
        b, n, d = x.shape
        return 2 * b * n * n * d  # q @ k^T and attn @ v over all heads
    return 0


@torch.no_grad()
def count_macs(
    model: nn.Module, input_size: tuple[int, int] | None = None, full: bool = False
) -> int:
    """MACs of one forward pass on a [1, 3, H, W] input; `input_size` (W, H) defaults to the
    model's config. `full=False`: as the paper (MMCV); `full=True`: attention products too."""
    if input_size is None:
        input_size = model.config.input_size
    total = 0

    def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += _module_macs(m, inputs, output, full)

    counted = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Upsample, Attention)
    counted += _NORMS + _ACTIVATIONS + _POOLS
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        model(torch.zeros(1, 3, input_size[1], input_size[0], device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def _info(model: nn.Module) -> dict:
    c = model.config
    return {
        "name": c.name,
        "role": c.role,
        "input_size": list(c.input_size),
        "params": count_params(model),
        "gflops": round(count_macs(model) / 1e9, 4),
        "gflops_full": round(count_macs(model, full=True) / 1e9, 4),
    }


@functools.cache
def _info_by_name(name: str) -> tuple:
    # counted on the meta device: shapes flow through the hooks without any arithmetic
    with torch.device("meta"):
        model = build_model(name)
    return tuple(_info(model).items())


def model_info(name_or_model: str | nn.Module) -> dict:
    """{"name", "role", "input_size" [W, H], "params", "gflops" (paper-style GMACs),
    "gflops_full" (attention products included)}. By name the result is cached per process."""
    if isinstance(name_or_model, str):
        info = dict(_info_by_name(name_or_model))
        return {**info, "input_size": list(info["input_size"])}  # a fresh list per caller
    return _info(name_or_model)


def list_model_infos() -> list[dict]:
    """`model_info` of every built-in model, in MODEL_NAMES order."""
    return [model_info(name) for name in MODEL_NAMES]


def format_model_infos(infos: list[dict]) -> str:
    """`distilpose models`' table of `model_info` rows, with how GFLOPs are counted."""
    header = (
        f"{'name':<19} {'role':<8} {'input (w x h)':<14} {'params':>12} "
        f"{'GFLOPs':>8} {'GFLOPs full':>12}"
    )
    lines = [header, "-" * len(header)]
    for m in infos:
        w, h = m["input_size"]
        lines.append(
            f"{m['name']:<19} {m['role']:<8} {f'{w} x {h}':<14} {m['params']:>12,} "
            f"{m['gflops']:>8.2f} {m['gflops_full']:>12.2f}"
        )
    lines.append(
        "GFLOPs counted as the paper did (MMCV: conv/linear MACs plus norms and activations,"
        " attention matmuls not counted); 'full' adds attention's matrix products."
    )
    return "\n".join(lines)
