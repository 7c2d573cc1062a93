"""TokenPose heatmap teacher: a CNN backbone + TokenPose's transformer + an MLP heatmap head.

"TokenPose: Learning Keypoint Tokens for Human Pose Estimation" (Li et al., ICCV 2021), in the
form DistilPose uses as its teacher (`TokenPoseHead` of yshMars/DistilPose): HRNet-W48 branch 0
(48 ch at 64x48), 4x3 patches -> 256 visual tokens + 17 keypoint tokens, 12 pre-norm layers of
width 192, and an MLP from each keypoint token to its 64x48 heatmap.

Official checkpoints keep the head under `keypoint_head.tokenpose.*`; here it is `head.*`
(`checkpoint.checkpoint_filter_fn` renames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distilpose.models.hrnet import build_backbone
from distilpose.models.layers import (
    ModelConfig,
    TokenEncoder,
    similarity_maps,
    similarity_projections,
)


@dataclass
class TeacherOutput:
    """heatmaps [B, K, Hh, Wh] (raw, not normalised); keypoint_tokens [B, K, D];
    visual_tokens [B, P, D] (last encoder layer's outputs, no final LayerNorm); tokens are None
    for a teacher without them (SimpleBaseline)."""

    heatmaps: torch.Tensor
    keypoint_tokens: torch.Tensor | None = None
    visual_tokens: torch.Tensor | None = None


class HeatmapHead(TokenEncoder):
    """Token encoder + `mlp_head`: keypoint token [D] -> heatmap [Hh*Wh].

    The official rule: a hidden layer of width Hh*Wh/8 (384 at 64x48) when dim <= that width / 2,
    i.e. LayerNorm(192), Linear(192, 384), LayerNorm(384), Linear(384, 3072); otherwise
    LayerNorm(D), Linear(D, Hh*Wh) (the tiny teacher).
    """

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__(config, in_channels)
        wh, hh = config.heatmap_size
        hidden = wh * hh // 8
        if config.dim <= hidden * 0.5:
            self.mlp_head = nn.Sequential(
                nn.LayerNorm(config.dim),
                nn.Linear(config.dim, hidden),
                nn.LayerNorm(hidden),
                nn.Linear(hidden, wh * hh),
            )
        else:
            self.mlp_head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, wh * hh))
        self.init_weights()

    def forward(self, features: torch.Tensor) -> TeacherOutput:
        kpt, vis = self.encode(features)  # [B, K, D], [B, P, D]
        wh, hh = self.heatmap_size
        heatmaps = self.mlp_head(kpt).reshape(kpt.shape[0], kpt.shape[1], hh, wh)  # [B, K, Hh, Wh]
        return TeacherOutput(heatmaps=heatmaps, keypoint_tokens=kpt, visual_tokens=vis)


class SimilarityHead(TokenEncoder):
    """Token encoder + heatmaps from keypoint-token x visual-token similarity (demo teacher).

    Not the paper's head: each heatmap pixel is the scaled dot product of a keypoint token's
    query `q_k` [D] with a key of the visual token whose patch holds the pixel, one key per
    pixel of the patch: heatmap[k, patch p, pixel s] = <q_k, key_s(v_p)> / sqrt(D). The heatmap
    is thus laid out by the visual tokens themselves, which a student can mimic (L_VT), and it
    leaves the mean pose within a few hundred steps, where the MLP head needs thousands.
    """

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__(config, in_channels)
        self.query, self.key = similarity_projections(config)
        self.init_weights()

    def forward(self, features: torch.Tensor) -> TeacherOutput:
        kpt, vis = self.encode(features)  # [B, K, D], [B, P, D]
        heatmaps = similarity_maps(
            self.query(kpt), self.key(vis), self.heatmap_size, self.patch_size
        )  # [B, K, Hh, Wh]
        return TeacherOutput(heatmaps=heatmaps, keypoint_tokens=kpt, visual_tokens=vis)


class TokenPose(nn.Module):
    """images [B, 3, H, W] (normalised RGB) -> TeacherOutput."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone)
        head = SimilarityHead if config.head == "similarity" else HeatmapHead
        self.head = head(config, self.backbone.out_channels)

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        return self.head(self.backbone(images))
