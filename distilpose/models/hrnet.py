"""HRNet-W48 and StemNet backbones, with MMPose 0.x module names.

HRNet: "Deep High-Resolution Representation Learning for Human Pose Estimation" (Sun et al.,
CVPR 2019), as configured in the DistilPose teacher (`teacher_hr48_coco_256x192.py`): stem of two
stride-2 convs, `layer1` of 4 bottlenecks (256 ch), then stages 2-4 with 1, 4 and 3 HR modules of
4 BasicBlocks per branch, branch widths (48, 96, 192, 384). Only branch 0 (48 ch at input / 4)
feeds the heads, so the last module of the last stage fuses into branch 0 only
(MMPose `multiscale_output=False`). DistilPose-L stops after stage 3.

Keys, as in MMPose 0.x: `conv1, bn1, conv2, bn2, layer1.{i}`, `transition{s}.{j}.*`,
`stage{s}.{m}.branches.{b}.{i}.*`, `stage{s}.{m}.fuse_layers.{i}.{j}.*`.

StemNet (DistilPose-S): the HRNet stem + `layer1` alone (256 ch at input / 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distilpose.models.convnet import EncoderDecoder
from distilpose.models.layers import (
    BACKBONES,
    BasicBlock,
    Stem,
    conv_bn,
    init_conv_weights,
    make_res_layer,
)


@dataclass(frozen=True)
class HRNetConfig:
    width: int = 48  # branch 0 channels; branch b has width * 2**b
    num_stages: int = 4  # 4 for the teacher, 3 for DistilPose-L
    stage_modules: tuple[int, ...] = (1, 4, 3)  # HR modules in stages 2, 3, 4
    num_blocks: int = 4  # BasicBlocks per branch in every module
    stem_width: int = 64
    layer1_channels: int = 256  # 4 bottlenecks of width 64, x4 expansion


class HRModule(nn.Module):
    """Parallel branches, then fusion: every output branch i sums all branches, resampled.

    j > i: 1x1 conv + BN, nearest upsample x 2**(j-i);
    j < i: (i-j) stride-2 3x3 convs with ReLU between them.
    With `multiscale_output=False` only branch 0 is produced.
    """

    def __init__(self, channels: list[int], num_blocks: int, multiscale_output: bool):
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(
            make_res_layer(BasicBlock, c, c, num_blocks) for c in channels
        )
        num_out = self.num_branches if multiscale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse(channels, j, i) for j in range(self.num_branches))
            for i in range(num_out)
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _fuse(channels: list[int], j: int, i: int) -> nn.Module | None:
        """The path from branch j to output branch i (None: identity, i == j)."""
        if j == i:
            return None
        if j > i:
            return nn.Sequential(
                *conv_bn(channels[j], channels[i], 1, relu=False),
                nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
            )
        steps = []
        for k in range(i - j):
            last = k == i - j - 1
            out_ch = channels[i] if last else channels[j]
            steps.append(conv_bn(channels[j], out_ch, 3, stride=2, relu=not last))
        return nn.Sequential(*steps)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        if self.num_branches == 1:
            return xs
        out = []
        for fuse in self.fuse_layers:
            y = 0
            for j, x in enumerate(xs):
                y = y + (x if fuse[j] is None else fuse[j](x))
            out.append(self.relu(y))
        return out


def make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    """From the previous stage's branches to the next: 3x3 conv on a width change, None when equal,
    and for each new branch stride-2 3x3 convs from the lowest-resolution branch."""
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(conv_bn(pre[i], c, 3) if pre[i] != c else None)
        else:
            steps = []
            for k in range(i + 1 - len(pre)):
                out_ch = c if k == i - len(pre) else pre[-1]
                steps.append(conv_bn(pre[-1], out_ch, 3, stride=2))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNet(Stem):
    """HRNet; forward returns branch 0 [B, width, H/4, W/4]."""

    def __init__(self, cfg: HRNetConfig = HRNetConfig()):
        super().__init__(cfg.stem_width, cfg.layer1_channels, blocks=4)
        pre = [cfg.layer1_channels]
        for s in range(2, cfg.num_stages + 1):
            cur = [cfg.width * 2**b for b in range(s)]
            n_mod = cfg.stage_modules[s - 2]
            last_stage = s == cfg.num_stages
            modules = [
                HRModule(cur, cfg.num_blocks, multiscale_output=not (last_stage and m == n_mod - 1))
                for m in range(n_mod)
            ]
            setattr(self, f"transition{s - 1}", make_transition(pre, cur))
            setattr(self, f"stage{s}", nn.Sequential(*modules))
            pre = cur
        self.num_stages = cfg.num_stages
        self.out_channels = cfg.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.forward_stem(x)]  # [B, 256, H/4, W/4]
        for s in range(2, self.num_stages + 1):
            transition = getattr(self, f"transition{s - 1}")
            # new branches grow from the lowest-resolution branch of the previous stage
            xs = [
                ys[min(i, len(ys) - 1)] if t is None else t(ys[min(i, len(ys) - 1)])
                for i, t in enumerate(transition)
            ]
            ys = getattr(self, f"stage{s}")(xs)
        return ys[0]  # [B, width, H/4, W/4]


# The families of `layers.BACKBONES` that give a feature map at heatmap resolution.
_FAMILIES = {
    "stem": Stem,
    "hrnet": lambda **args: HRNet(HRNetConfig(**args)),
    "encdec": EncoderDecoder,
}


def build_backbone(name: str) -> nn.Module:
    """Backbone by config name (a row of `layers.BACKBONES`); the module has `out_channels`
    (channels at input / 4)."""
    spec = BACKBONES.get(name)
    if spec is None or spec.family not in _FAMILIES:
        raise ValueError(f"unknown backbone {name!r}")
    model = _FAMILIES[spec.family](**spec.args)
    init_conv_weights(model)
    return model
