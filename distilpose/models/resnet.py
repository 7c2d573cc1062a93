"""ResNet trunks of the CNN pair (SimpleBaseline teacher, DeepPose student), from torchvision.

"Deep Residual Learning for Image Recognition" (He et al., CVPR 2016). ResNet-50 is torchvision's
`resnet50` without its pooling and classifier. The keys are torchvision's, which are also MMPose
0.x's `ResNet` keys (`conv1`, `bn1`, `layer{1..4}.{i}.conv{1,2,3}` / `bn{1,2,3}`,
`layer{s}.0.downsample.{0,1}`; MMPose's default `style='pytorch'` puts the stride on the 3x3
conv, as torchvision does), so an MMPose `backbone.*` loads by name and torchvision's ImageNet
weights load into the trunk with their `fc.*` dropped (`build_model(..., weights=PATH)`).

`resnet_tiny` (demo and tests): the same stem and torchvision's `BasicBlock`, three stages of one
block each, widths 32 / 64 / 128, output stride 16 so that crops of 48x64 and 96x128 both tile.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, resnet50

from distilpose.models.layers import BACKBONES


def _stage(
    block: type[nn.Module], in_ch: int, width: int, blocks: int, stride: int
) -> nn.Sequential:
    """torchvision's stage layout: the first block strides and gets a 1x1 conv + BN downsample."""
    out_ch = width * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    layers = [block(in_ch, width, stride, downsample)]
    layers += [block(out_ch, width) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetTrunk(nn.Module):
    """images [B, 3, H, W] -> features [B, out_channels, H / stride, W / stride].

    Attributes `out_channels` (2048 for ResNet-50) and `stride` (32; 16 for the tiny trunk).
    """

    def __init__(self, name: str = "resnet50"):
        super().__init__()
        spec = BACKBONES.get(name)
        if spec is None or spec.family != "resnet":
            raise ValueError(f"unknown ResNet trunk {name!r}")
        if "widths" not in spec.args:  # torchvision's ResNet-50
            net = resnet50(weights=None)  # torchvision's init (Kaiming convs, unit BN)
            self.conv1, self.bn1, self.relu, self.maxpool = (
                net.conv1,
                net.bn1,
                net.relu,
                net.maxpool,
            )
            self.stages = ["layer1", "layer2", "layer3", "layer4"]
            for s in self.stages:
                setattr(self, s, getattr(net, s))
            self.out_channels, self.stride = 512 * Bottleneck.expansion, 32
        else:
            widths = spec.args["widths"]
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.stages = [f"layer{i + 1}" for i in range(len(widths))]
            in_ch = widths[0]
            for i, (s, w) in enumerate(zip(self.stages, widths, strict=True)):
                setattr(self, s, _stage(BasicBlock, in_ch, w, 1, 1 if i == 0 else 2))
                in_ch = w
            self.out_channels, self.stride = in_ch, 4 * 2 ** (len(widths) - 1)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, C, H/4, W/4]
        for s in self.stages:
            x = getattr(self, s)(x)
        return x  # [B, out_channels, H/stride, W/stride]
