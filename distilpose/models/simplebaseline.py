"""SimpleBaseline heatmap teacher: a ResNet + deconvolutions + a 1x1 conv to K heatmaps.

"Simple Baselines for Human Pose Estimation and Tracking" (Xiao et al., ECCV 2018), the paper's
Table 6 teacher (ResNet-50, 256x192, 70.4 AP). As MMPose 0.x's `TopdownHeatmapSimpleHead`:
`deconv_layers` = n x [ConvTranspose2d(4x4, stride 2, padding 1, no bias), BN, ReLU] with 256
channels, bringing the trunk's stride 32 down to 4 (n = 3; 2 for the stride-16 tiny trunk), then
`final_layer` = Conv2d(256, K, 1) with bias. Heatmaps are raw (no sigmoid), 64x48 at 256x192.

It has no tokens: its stores hold heatmaps only and its students distil with `sh` and `cs`.
MMPose checkpoints keep the head under `keypoint_head.*`; here it is `head.*`
(`checkpoint.checkpoint_filter_fn` renames).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distilpose.models.layers import ModelConfig
from distilpose.models.resnet import ResNetTrunk
from distilpose.models.tokenpose import TeacherOutput


class DeconvHead(nn.Module):
    """features [B, C, h, w] -> heatmaps [B, K, h * 2**n, w * 2**n]."""

    def __init__(self, in_channels: int, channels: int, num_deconv: int, num_keypoints: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_deconv):
            layers += [
                nn.ConvTranspose2d(
                    in_channels if i == 0 else channels,
                    channels,
                    4,
                    stride=2,
                    padding=1,
                    bias=False,
                ),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(channels, num_keypoints, 1)
        # MMPose's init: N(0, 0.001) deconvolutions and final conv, zero bias, unit BN
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d | nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers(features))


class SimpleBaseline(nn.Module):
    """images [B, 3, H, W] (normalised RGB) -> TeacherOutput (heatmaps only, tokens None)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNetTrunk(config.backbone)
        num_deconv = int(math.log2(self.backbone.stride // 4))  # back to stride 4
        self.head = DeconvHead(
            self.backbone.out_channels, config.head_channels, num_deconv, config.num_keypoints
        )

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        heatmaps = self.head(self.backbone(images))  # [B, K, H/4, W/4]
        wh, hh = self.config.heatmap_size
        if heatmaps.shape[-2:] != (hh, wh):
            raise ValueError(
                f"heatmaps are {tuple(heatmaps.shape[-2:])} (H, W); the model was built for "
                f"heatmap_size {self.config.heatmap_size} (W, H): check the input crop size"
            )
        return TeacherOutput(heatmaps=heatmaps)
