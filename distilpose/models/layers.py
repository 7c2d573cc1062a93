"""Shared building blocks: the model config, residual conv blocks and the token encoder.

Everything here is used by more than one model file and is never re-implemented elsewhere:

- `ModelConfig`: one dataclass describes every built-in model (teacher and student).
- `BasicBlock`, `Bottleneck`: ResNet blocks with MMPose 0.x attribute names (`conv1`, `bn1`, ...)
  so that HRNet and StemNet checkpoints load by name.
- `TokenEncoder`: TokenPose's transformer over keypoint tokens and patch (visual) tokens. Its
  module tree mirrors the official DistilPose/TokenPose head (`keypoint_token`, `pos_embedding`,
  `patch_to_embedding`, `transformer.layers.{i}.{0,1}.fn.{norm,fn}`), so official checkpoints load
  after renaming only the head prefix (see `checkpoint.checkpoint_filter_fn`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from distilpose.errors import BadConfigError
from distilpose.geometry import PAPER, Geometry

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class BackboneSpec:
    """A row of the backbone table: the builder family and its settings.

    Families: "stem" (`Stem`), "hrnet" (`hrnet.HRNet` from `HRNetConfig` fields), "encdec"
    (`convnet.EncoderDecoder`) give a feature map at heatmap resolution (input / 4) for the token
    and similarity heads; "resnet" (`resnet.ResNetTrunk`: torchvision's ResNet-50 without
    `widths`, else BasicBlock stages of these widths) is a strided trunk for the CNN heads.
    """

    family: str
    args: dict = field(default_factory=dict)


# The one table of backbones: adding one is a row here (and a family builder if it is new).
BACKBONES: dict[str, BackboneSpec] = {
    "stemnet": BackboneSpec("stem", dict(width=64, out_channels=256, blocks=4)),
    "hrnet_w48": BackboneSpec("hrnet", dict(num_stages=4)),
    "hrnet_w48_s3": BackboneSpec("hrnet", dict(num_stages=3)),  # DistilPose-L: stages 1-3
    # demo and tests: 32 channels everywhere, two bottlenecks, trains fast on a CPU
    "stemnet_tiny": BackboneSpec("stem", dict(width=32, out_channels=32, blocks=2)),
    "resnet50": BackboneSpec("resnet"),
    "resnet_tiny": BackboneSpec("resnet", dict(widths=(32, 64, 128))),
    "encdec_demo": BackboneSpec("encdec"),
    "encdec_demo_s": BackboneSpec("encdec", dict(widths=(24, 48, 72), blocks=1, stem=16)),
}
# "token": TokenPose / DistilPose token encoder; "similarity": the same encoder, heatmaps (demo
# teacher) or soft-argmax coordinates (demo student) from keypoint x visual token similarity;
# "deconv": SimpleBaseline's deconvolution heatmap head (teacher); "fc": DeepPose's pooled
# linear regression (student). Only the token heads have tokens.
HEADS = ("token", "similarity", "deconv", "fc")
TOKEN_HEADS = ("token", "similarity")
_HEAD_ROLE = {"deconv": "teacher", "fc": "student"}
# output stride 32 / 16: only the CNN heads fit them
_RESNETS = tuple(name for name, spec in BACKBONES.items() if spec.family == "resnet")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved in checkpoints as `config.to_dict()`.

    Sizes are `(width, height)` as everywhere in the project. The encoder works on the backbone's
    heatmap-resolution feature map, cut into `patch_size` patches (`Geometry.patch_grid`): the
    paper's 48x64 map in 3x4 patches is 16x16 patches, P = 256 visual tokens next to K = 17
    keypoint tokens.
    """

    name: str = "distilpose_s"
    role: str = "student"  # "teacher" predicts heatmaps, "student" regresses coordinates
    backbone: str = "stemnet"  # one of BACKBONES; its output stride must be input / heatmap size
    input_size: tuple[int, int] = PAPER.input_size  # crop (width, height), the paper's 256x192
    heatmap_size: tuple[int, int] = PAPER.heatmap_size  # backbone feature map = teacher heatmap
    patch_size: tuple[int, int] = PAPER.patch_size  # on the feature map (official [4, 3])
    dim: int = 192  # token width of TokenPose-L / DistilPose
    depth: int = 12  # encoder layers (official 12 for teacher and students)
    heads: int = 8  # attention heads, head width dim / heads = 24
    mlp_ratio: int = 3  # feed-forward width = dim * mlp_ratio = 576
    num_keypoints: int = 17  # COCO-17
    single_sigma: bool = False  # student: one sigma for both axes (paper Table B, out dim 4)
    teacher_dim: int | None = None  # student: if set and != dim, project tokens to this width
    head: str = "token"  # one of HEADS; configs saved before it existed are token models
    head_channels: int = 256  # "deconv": width of each deconvolution (SimpleBaseline: 256)

    def __post_init__(self) -> None:
        for key in ("input_size", "heatmap_size", "patch_size"):
            setattr(self, key, tuple(int(v) for v in getattr(self, key)))
        if self.role not in ROLES:
            raise BadConfigError(f"model config 'role' is {self.role!r}; expected one of {ROLES}")
        if self.backbone not in BACKBONES:
            raise BadConfigError(
                f"model config 'backbone' is {self.backbone!r}; expected one of {tuple(BACKBONES)}"
            )
        if self.head not in HEADS:
            raise BadConfigError(f"model config 'head' is {self.head!r}; expected one of {HEADS}")
        if _HEAD_ROLE.get(self.head, self.role) != self.role:
            raise BadConfigError(
                f"model config 'head' {self.head!r} is a {_HEAD_ROLE[self.head]}'s head; "
                f"'role' is {self.role!r}"
            )
        if (self.head in TOKEN_HEADS) == (self.backbone in _RESNETS):
            raise BadConfigError(
                f"model config 'backbone' {self.backbone!r} does not fit 'head' {self.head!r}; "
                f"expected one of {_RESNETS} for the CNN heads, another backbone for 'token'"
            )
        if not self.geometry.tiles:
            raise BadConfigError(
                f"model config 'patch_size' {self.patch_size} does not tile 'heatmap_size' "
                f"{self.heatmap_size}; expected divisors of the heatmap width and height"
            )
        if self.dim % self.heads or (self.dim // 2) % 2:
            raise BadConfigError(
                f"model config 'dim' {self.dim} must be divisible by 'heads' {self.heads} "
                "and by 4 (the 2-D sine position embedding)"
            )

    @property
    def geometry(self) -> Geometry:
        """Crop, heatmap and patch sizes as one object (`distilpose.geometry`)."""
        return Geometry(self.input_size, self.heatmap_size, self.patch_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Number of patches (across, down): (16, 16) for the full models."""
        return self.geometry.patch_grid

    @property
    def num_patches(self) -> int:
        return self.geometry.num_patches

    @property
    def has_tokens(self) -> bool:
        """Whether the model outputs keypoint and visual tokens (TokenPose / DistilPose)."""
        return self.head in TOKEN_HEADS

    @property
    def has_maps(self) -> bool:
        """Whether the coords are a soft-argmax over maps the model outputs (`heatmap_logits`):
        the demo students' similarity head."""
        return self.role == "student" and self.head == "similarity"

    @property
    def has_sigmas(self) -> bool:
        """Whether the model predicts sigma_x, sigma_y per joint: every student does (DistilPose's
        head, the demo's similarity head and DeepPose's confidence head); teachers do not."""
        return self.role == "student"

    @property
    def token_dim(self) -> int:
        """Width of the tokens a model outputs (after the optional projection)."""
        return self.teacher_dim if self.teacher_dim else self.dim

    def to_dict(self) -> dict:
        """Plain lists/str/int/bool only, so it loads with `torch.load(weights_only=True)`."""
        d = asdict(self)
        for key in ("input_size", "heatmap_size", "patch_size"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadConfigError(
                f"model config has unknown fields {unknown}; expected {sorted(known)}"
            )
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Convolution blocks (MMPose 0.x naming)


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU) as an `nn.Sequential`, keys `0` (conv) and `1` (bn)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; HRNet's branch block."""

    expansion = 1

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual: HRNet's `layer1` and StemNet block."""

    expansion = 4

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        mid = out_ch // self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_res_layer(block: type[nn.Module], in_ch: int, out_ch: int, blocks: int) -> nn.Sequential:
    """`blocks` residual blocks; the first gets a 1x1 conv+BN `downsample` if the width changes."""
    downsample = None
    if in_ch != out_ch:
        downsample = conv_bn(in_ch, out_ch, 1, relu=False)
    layers = [block(in_ch, out_ch, downsample=downsample)]
    layers += [block(out_ch, out_ch) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """Two stride-2 3x3 convs (input / 4) then `layer1` of bottlenecks.

    This is HRNet's stem + stage 1 and, on its own, the StemNet backbone of DistilPose-S.
    Keys: `conv1`, `bn1`, `conv2`, `bn2`, `layer1.{i}.*`.
    """

    def __init__(self, width: int = 64, out_channels: int = 256, blocks: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_res_layer(Bottleneck, width, out_channels, blocks)
        self.out_channels = out_channels

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [B, w, H/2, W/2]
        x = self.relu(self.bn2(self.conv2(x)))  # [B, w, H/4, W/4]
        return self.layer1(x)  # [B, out_channels, H/4, W/4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stem(x)


def init_conv_weights(module: nn.Module) -> None:
    """MMPose's backbone init: conv weights N(0, 0.001), BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Transformer (TokenPose's pre-norm ViT encoder)


class Residual(nn.Module):
    """x + fn(x); the official key tree has this wrapper (`layers.{i}.{j}.fn`)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class PreNorm(nn.Module):
    """fn(LayerNorm(x)); keys `norm` and `fn`."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Attention(nn.Module):
    """Multi-head self-attention; `to_qkv` has no bias, scale (dim / heads) ** -0.5 as the official
    `scale_with_head=True`. Heads are split head-major: q = [h0 d0..d23, h1 d0..d23, ...]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # key `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # [B, N, 3, h, d/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, N, d/h]
        # SDPA's default scale is head_dim ** -0.5, the official scale; it is the fast path on CPU
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d/h]
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Linear, GELU, Linear; Dropout(0) slots keep the official indices `net.0` and `net.3`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """`depth` pre-norm layers; with sine-full position embedding (the official setting) the
    position embedding is added to the visual tokens again before every layer after the first."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, num_keypoints: int):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(PreNorm(dim, Attention(dim, heads))),
                    Residual(PreNorm(dim, FeedForward(dim, mlp_dim))),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [B, K+P, D] tokens; pos: [1, P, D] position embedding of the visual tokens."""
        pos = F.pad(pos, (0, 0, self.num_keypoints, 0))  # [1, K+P, D], zeros on keypoint tokens
        for i, (attn, ff) in enumerate(self.layers):
            if i > 0:
                x = x + pos
            x = ff(attn(x))
        return x


def sine_position_embedding(
    grid: tuple[int, int], dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sine embedding of a `grid` = (across, down) patch grid -> [1, down*across, dim].

    As TokenPose/DETR: row and column indices 1..n are normalised to (0, 2*pi]; each half of the
    channels encodes one axis (y first, then x) with frequencies
    temperature ** (2*(i//2) / (dim/2)), interleaved as sin, cos, sin, cos. Tokens are in
    row-major (y, x) order like the patches.
    """
    w, h = grid
    half = dim // 2
    eps = 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32) / (h + eps) * 2 * math.pi  # [h]
    x = torch.arange(1, w + 1, dtype=torch.float32) / (w + eps) * 2 * math.pi  # [w]
    freq = torch.arange(half, dtype=torch.float32)
    freq = temperature ** (2 * (freq // 2) / half)  # [half]

    def encode(a: torch.Tensor) -> torch.Tensor:  # [n] -> [n, half] as sin, cos, sin, cos, ...
        a = a[:, None] / freq
        return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, half)  # [h, w, half]
    pos_x = encode(x)[None, :, :].expand(h, w, half)  # [h, w, half]
    return torch.cat((pos_y, pos_x), dim=2).reshape(1, h * w, dim)


def patchify(features: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, ph*pw*C] patches in row-major order, each flattened as
    (row in patch, column in patch, channel) with channel fastest, as the official rearrange
    'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'. `patch_size` is (width, height)."""
    b, c, h, w = features.shape
    pw, ph = patch_size
    x = features.reshape(b, c, h // ph, ph, w // pw, pw)  # [B, C, gh, ph, gw, pw]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, ph, pw, C]
    return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


class TokenEncoder(nn.Module):
    """TokenPose's token encoder (the paper's Token-distilling Encoder for students).

    Feature map [B, C, Hh, Wh] -> patches -> `patch_to_embedding` -> + sine position ->
    [keypoint tokens; visual tokens] -> transformer. Subclasses add `mlp_head` and the output.
    """

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__()
        c = config
        self.patch_size = c.patch_size
        self.heatmap_size = c.heatmap_size
        self.num_keypoints = c.num_keypoints
        self.keypoint_token = nn.Parameter(torch.zeros(1, c.num_keypoints, c.dim))
        # fixed, but a Parameter (requires_grad False) so it is saved under the official key
        self.pos_embedding = nn.Parameter(
            sine_position_embedding(c.patch_grid, c.dim), requires_grad=False
        )
        patch_dim = in_channels * c.patch_size[0] * c.patch_size[1]
        self.patch_to_embedding = nn.Linear(patch_dim, c.dim)
        self.transformer = Transformer(
            c.dim, c.depth, c.heads, c.dim * c.mlp_ratio, c.num_keypoints
        )

    def init_weights(self) -> None:
        """Official init: truncated normal (std 0.02) linears with zero bias, unit LayerNorms."""
        nn.init.trunc_normal_(self.keypoint_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, C, Hh, Wh] -> (keypoint tokens [B, K, D], visual tokens [B, P, D])."""
        if features.shape[-2:] != self.heatmap_size[::-1]:
            raise ValueError(
                f"feature map is {tuple(features.shape[-2:])} (H, W); the model was built for "
                f"heatmap_size {self.heatmap_size} (W, H): check the input crop size"
            )
        x = self.patch_to_embedding(patchify(features, self.patch_size))  # [B, P, D]
        x = x + self.pos_embedding
        kpt = self.keypoint_token.expand(x.shape[0], -1, -1)  # [B, K, D]
        x = self.transformer(torch.cat((kpt, x), dim=1), self.pos_embedding)  # [B, K+P, D]
        return x[:, : self.num_keypoints], x[:, self.num_keypoints :]


def similarity_projections(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """`query` (keypoint token -> [D]) and `key` (visual token -> one [D] key per pixel of its
    patch) of the demo heads, which lay heatmaps out by the visual tokens (`similarity_maps`)."""
    d, (pw, ph) = config.dim, config.patch_size
    query = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
    key = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d * pw * ph))
    return query, key


def similarity_maps(
    q: torch.Tensor, keys: torch.Tensor, heatmap_size: tuple[int, int], patch_size: tuple[int, int]
) -> torch.Tensor:
    """q [B, K, D], keys [B, P, ph*pw*D] -> maps [B, K, Hh, Wh]: the scaled dot product of each
    keypoint's query with the key of every heatmap pixel (pixel s of patch p: key s of token p)."""
    (wh, hh), (pw, ph) = heatmap_size, patch_size
    b, k, d = q.shape
    keys = keys.reshape(b, -1, ph * pw, d)  # [B, P, ph*pw, D], pixels row-major in the patch
    sim = torch.einsum("bkd,bpsd->bkps", q, keys) * d**-0.5  # [B, K, P, ph*pw]
    # patches are row-major over (hh/ph, wh/pw); put each patch's pixels back in place
    sim = sim.reshape(b, k, hh // ph, wh // pw, ph, pw).permute(0, 1, 2, 4, 3, 5)
    return sim.reshape(b, k, hh, wh)
