"""Small CNN backbones of the demo models: feature maps at input / 4, fast on a CPU.

Not from the paper: the paper's backbones (HRNet-W48, StemNet) need a GPU to train. These keep
the paper models' contract (a `[B, C, H/4, W/4]` feature map that the token encoder cuts into
patches) at a size that trains in minutes on two CPU cores.

- `EncoderDecoder`: stride-4 stem, two more stride-2 levels of BasicBlocks, then top-down
  upsample-and-add back to stride 4, so every stride-4 feature sees a 1/16 context. The teacher
  uses widths (32, 64, 96) with two blocks per level; the student a slimmer (24, 48, 72) with
  one. A stride-4-only student (two convs and one BasicBlock, 121k parameters) was tried first:
  at 20 epochs on the demo store it reached AP 0.020 against 0.153 for the slim
  encoder-decoder: its receptive field is too small for the token encoder to find joints fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distilpose.models.layers import BasicBlock, conv_bn, make_res_layer


class EncoderDecoder(nn.Module):
    """images [B, 3, H, W] -> features [B, widths[0], H/4, W/4]."""

    def __init__(
        self, widths: tuple[int, int, int] = (32, 64, 96), blocks: int = 2, stem: int = 24
    ):
        super().__init__()
        w0, w1, w2 = widths
        self.stem = nn.Sequential(conv_bn(3, stem, 3, stride=2), conv_bn(stem, w0, 3, stride=2))
        self.level0 = make_res_layer(BasicBlock, w0, w0, blocks)  # H/4
        self.level1 = nn.Sequential(
            conv_bn(w0, w1, 3, stride=2), make_res_layer(BasicBlock, w1, w1, blocks)
        )
        self.level2 = nn.Sequential(
            conv_bn(w1, w2, 3, stride=2), make_res_layer(BasicBlock, w2, w2, blocks)
        )
        self.lateral2 = conv_bn(w2, w1, 1, relu=False)  # H/16 -> H/8 widths
        self.lateral1 = conv_bn(w1, w0, 1, relu=False)  # H/8 -> H/4 widths
        self.fuse1 = BasicBlock(w1, w1)
        self.fuse0 = BasicBlock(w0, w0)
        self.out_channels = w0

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.level0(self.stem(x))  # [B, w0, H/4, W/4]
        x1 = self.level1(x0)  # [B, w1, H/8, W/8]
        x2 = self.level2(x1)  # [B, w2, H/16, W/16]
        y1 = self.fuse1(F.relu(x1 + self._up(self.lateral2(x2), x1)))
        return self.fuse0(F.relu(x0 + self._up(self.lateral1(y1), x0)))  # [B, w0, H/4, W/4]
