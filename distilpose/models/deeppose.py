"""DeepPose regression student: a ResNet + global average pooling + one Linear to K x 2.

"DeepPose: Human Pose Estimation via Deep Neural Networks" (Toshev and Szegedy, CVPR 2014) in
MMPose 0.x's form (`DeepposeRegressionHead`), the paper's Table 6 student (ResNet-50, 256x192,
52.6 AP alone, 59.7 AP distilled from SimpleBaseline with `sh` and `cs`).

`head.fc` = Linear(C, 2K) gives x, y normalised to the crop (x / W_in, y / H_in), raw as in
MMPose (no sigmoid), so MMPose checkpoints predict what they predicted there. The distillation
losses also need, per joint, a confidence score and the simulated heatmap's sigma_x, sigma_y:
`head.confidence` = Linear(C, 3K) on the same pooled feature (this project's addition; ~0.1M
parameters at ResNet-50). It starts at zero weight, so an MMPose checkpoint, which lacks it,
gives constant scores (1.0) and sigmas (2 heatmap px, the teacher's Gaussian) until trained.
No tokens: `kt` / `vt` do not apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distilpose.models.distilpose import StudentOutput
from distilpose.models.layers import ModelConfig
from distilpose.models.resnet import ResNetTrunk

INIT_SCORE = 1.0  # a teacher heatmap's peak value
INIT_SIGMA = 2.0  # heatmap px, the teacher's target Gaussian


class DeepPoseHead(nn.Module):
    """features [B, C, h, w] -> coords [B, K, 2], scores [B, K], sigma logits [B, K, 2]."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.fc = nn.Linear(in_channels, num_keypoints * 2)
        self.confidence = nn.Linear(in_channels, num_keypoints * 3)
        # MMPose: fc ~ N(0, 0.01); its zero bias would start every joint at the crop's corner,
        # the crop centre (0.5) is a better start and changes nothing for loaded weights
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.constant_(self.fc.bias, 0.5)
        nn.init.zeros_(self.confidence.weight)
        sigma_raw = math.log(math.expm1(INIT_SIGMA))  # softplus^-1
        bias = torch.tensor([INIT_SCORE, sigma_raw, sigma_raw]).repeat(num_keypoints)
        with torch.no_grad():
            self.confidence.bias.copy_(bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = features.mean(dim=(2, 3))  # global average pool [B, C]
        b, k = x.shape[0], self.num_keypoints
        coords = self.fc(x).reshape(b, k, 2)
        conf = self.confidence(x).reshape(b, k, 3)
        return coords, conf[..., 0], conf[..., 1:]


class DeepPose(nn.Module):
    """images [B, 3, H, W] (normalised RGB) -> StudentOutput (no tokens)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNetTrunk(config.backbone)
        self.head = DeepPoseHead(self.backbone.out_channels, config.num_keypoints)

    def forward(self, images: torch.Tensor) -> StudentOutput:
        coords, scores, sigma_logits = self.head(self.backbone(images))
        return StudentOutput(
            coords=coords, scores=scores, sigmas=F.softplus(sigma_logits), sigma_logits=sigma_logits
        )
