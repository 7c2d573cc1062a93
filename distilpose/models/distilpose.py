"""DistilPose students: a CNN backbone + Token-distilling Encoder (TDE) + regression head.

"DistilPose: Tokenized Pose Regression with Heatmap Distillation" (Ye et al., CVPR 2023), as the
official `DistilPoseHead` with `out_mode='all'`: the TDE is TokenPose's encoder (same layout as the
teacher's, so its tokens can be matched to the teacher's), and a LayerNorm + Linear(D, 5) on each
keypoint token gives x, y (sigmoid, normalised to the crop), a confidence score (raw) and
sigma_x, sigma_y (softplus, heatmap pixels) of the simulated heatmap.

DistilPose-S: StemNet (256 ch at 64x48), patch_to_embedding [192, 3072].
DistilPose-L: HRNet-W48 stages 1-3, branch 0 (48 ch), patch_to_embedding [192, 576].
Official checkpoints keep the head under `keypoint_head.tokenhead.*`; here it is `head.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distilpose.models.hrnet import build_backbone
from distilpose.models.layers import (
    ModelConfig,
    TokenEncoder,
    similarity_maps,
    similarity_projections,
)


@dataclass
class StudentOutput:
    """coords [B, K, 2]: x, y in [0, 1] of the crop (x / W_in, y / H_in), sigmoid;
    scores [B, K]: raw confidence (no sigmoid; trained towards the teacher's heatmap value);
    sigmas [B, K, 2]: sigma_x, sigma_y > 0 in heatmap pixels (softplus);
    keypoint_tokens [B, K, D], visual_tokens [B, P, D]: last encoder layer's outputs (no final
    LayerNorm), projected to `teacher_dim` when the config sets one; None for a student without
    tokens (DeepPose, whose coords are raw regression outputs, not sigmoid);
    sigma_logits [B, K, 2]: the sigma channels before the softplus (`sigmas = softplus(.)`), which
    the `rle` loss reads through MMPose's sigmoid instead;
    heatmap_logits [B, K, H_hm, W_hm]: the similarity maps whose softmax the coords are the
    expectation of (`head="similarity"` only, else None), which the `dsnt` loss reads."""

    coords: torch.Tensor
    scores: torch.Tensor
    sigmas: torch.Tensor
    keypoint_tokens: torch.Tensor | None = None
    visual_tokens: torch.Tensor | None = None
    sigma_logits: torch.Tensor | None = None
    heatmap_logits: torch.Tensor | None = None


class RegressionHead(TokenEncoder):
    """TDE + `mlp_head` = LayerNorm(D), Linear(D, 5) (Linear(D, 4) with `single_sigma`).

    With `head="similarity"` (demo students, not the paper's) x, y come instead from a soft-argmax
    over keypoint-token x visual-token similarity maps, laid out like the demo teacher's heatmaps
    (integral regression: still no heatmap decoding, but no thousands-of-steps plateau at the
    mean pose, which the linear readout of a small model shows on a CPU budget).

    Output channels per keypoint, in the official order: x, y, score, sigma_x, sigma_y
    (x, y, score, sigma with a single sigma used for both axes).
    """

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__(config, in_channels)
        self.config_head = config.head
        out_dim = 4 if config.single_sigma else 5
        if config.head == "similarity":  # x, y come from the soft-argmax, not from mlp_head
            out_dim -= 2
        self.mlp_head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, out_dim))
        if config.head == "similarity":
            self.query, self.key = similarity_projections(config)
        self.init_weights()

    def soft_argmax(self, kpt: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Demo students: coords [B, K, 2] = expected position under softmax(similarity maps),
        in the same units as the heatmap codec (heatmap px j <-> j / W_hm); and the maps
        [B, K, H_hm, W_hm] (logits), for a loss on their shape (`dsnt`)."""
        maps = similarity_maps(self.query(kpt), self.key(vis), self.heatmap_size, self.patch_size)
        b, k, hh, wh = maps.shape
        prob = maps.float().flatten(2).softmax(-1).reshape(b, k, hh, wh)
        xs = torch.arange(wh, device=maps.device, dtype=prob.dtype) / wh
        ys = torch.arange(hh, device=maps.device, dtype=prob.dtype) / hh
        coords = torch.stack(((prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)), dim=-1)
        return coords, maps

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """-> coords [B, K, 2], scores [B, K], sigma logits [B, K, 2], tokens [B, K/P, D],
        similarity maps [B, K, H_hm, W_hm] (None for the linear readout)."""
        kpt, vis = self.encode(features)  # [B, K, D], [B, P, D]
        out = self.mlp_head(kpt)  # [B, K, 5] or [B, K, 4] (minus x, y for "similarity")
        maps = None
        if self.config_head == "similarity":
            (coords, maps), rest = self.soft_argmax(kpt, vis), out
        else:
            coords, rest = out[..., 0:2].sigmoid(), out[..., 2:]
        scores = rest[..., 0]
        sigma_logits = rest[..., 1:].expand(-1, -1, 2)  # [B, K, 2]; a single sigma repeats
        return coords, scores, sigma_logits, kpt, vis, maps


class DistilPose(nn.Module):
    """images [B, 3, H, W] (normalised RGB) -> StudentOutput.

    A student whose token width `dim` differs from the teacher's (`teacher_dim`) gets a learned
    linear projection `token_proj` (Linear(dim, teacher_dim)) applied to both token outputs, so
    the token-distillation losses can compare them with the teacher's; it is trained by those
    losses only and is not used for the keypoint prediction.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone)
        self.head = RegressionHead(config, self.backbone.out_channels)
        self.token_proj: nn.Linear | None = None
        if config.teacher_dim and config.teacher_dim != config.dim:
            self.token_proj = nn.Linear(config.dim, config.teacher_dim)
            nn.init.trunc_normal_(self.token_proj.weight, std=0.02)
            nn.init.zeros_(self.token_proj.bias)

    def forward(self, images: torch.Tensor) -> StudentOutput:
        coords, scores, sigma_logits, kpt, vis, maps = self.head(self.backbone(images))
        if self.token_proj is not None:
            kpt, vis = self.token_proj(kpt), self.token_proj(vis)
        return StudentOutput(
            coords=coords,
            scores=scores,
            sigmas=F.softplus(sigma_logits),
            keypoint_tokens=kpt,
            visual_tokens=vis,
            sigma_logits=sigma_logits,
            heatmap_logits=maps,
        )
