"""The paper's models by name: TokenPose teachers and DistilPose students.

    model = build_model("distilpose_s")            # model.config: ModelConfig
    out = model(images)                            # images [B, 3, 256, 192] -> StudentOutput

| name              | role    | backbone                  | tokens      | paper       |
|-------------------|---------|---------------------------|-------------|-------------|
| `tokenpose_l_w48` | teacher | HRNet-W48, 4 stages       | 192 x 12    | 69.41M, 17.03 GMACs |
| `tokenpose_s`     | teacher | StemNet                   | 192 x 12    | Table 5 teacher     |
| `distilpose_s`    | student | StemNet                   | 192 x 12    | 5.36M, 2.38 GMACs   |
| `distilpose_l`    | student | HRNet-W48, stages 1-3     | 192 x 12    | 21.27M, 10.33 GMACs |
| `tokenpose_tiny`  | teacher | tiny stem (32 ch)         | 64 x 4      | demo and tests      |
| `distilpose_tiny` | student | tiny stem (32 ch)         | 64 x 2      | demo and tests      |
| `simplebaseline_r50` | teacher | ResNet-50 + 3 deconvs  | none        | Table 6 teacher     |
| `deeppose_r50`    | student | ResNet-50, pooled Linear  | none        | Table 6 student     |
| `simplebaseline_tiny` | teacher | tiny ResNet + 2 deconvs | none      | demo and tests      |
| `deeppose_tiny`   | student | tiny ResNet, pooled Linear | none       | demo and tests      |

Tiny models take 128x96 crops (heatmaps 32x24, 64 patches of 4x3). The tiny ResNet has three
stages of one BasicBlock (32, 64, 128 channels, stride 16); its deconvolutions have 64
channels. Models without tokens
(SimpleBaseline, DeepPose) accept `weights=PATH` in `build_model`: a local torchvision ResNet
state dict (ImageNet) for the trunk.
"""

from __future__ import annotations

import os
from dataclasses import fields

from torch import nn

from distilpose.errors import BadConfigError

# checkpoint and complexity import the registry below lazily, inside their functions
from distilpose.models.checkpoint import (
    build_from_checkpoint,
    checkpoint_filter_fn,
    identify_checkpoint,
    load_backbone_weights,
    load_checkpoint,
    save_checkpoint,
)
from distilpose.models.complexity import count_macs, count_params, list_model_infos, model_info
from distilpose.models.deeppose import DeepPose
from distilpose.models.distilpose import DistilPose, StudentOutput
from distilpose.models.layers import ModelConfig
from distilpose.models.simplebaseline import SimpleBaseline
from distilpose.models.tokenpose import TeacherOutput, TokenPose

_TINY = dict(input_size=(96, 128), heatmap_size=(24, 32), patch_size=(3, 4), dim=64, heads=4)

# name -> ModelConfig fields that differ from the defaults (the full DistilPose-S)
_MODELS: dict[str, dict] = {
    "tokenpose_l_w48": dict(role="teacher", backbone="hrnet_w48"),
    "tokenpose_s": dict(role="teacher", backbone="stemnet"),
    "distilpose_s": dict(role="student", backbone="stemnet"),
    "distilpose_l": dict(role="student", backbone="hrnet_w48_s3"),
    "tokenpose_tiny": dict(role="teacher", backbone="stemnet_tiny", depth=4, **_TINY),
    "distilpose_tiny": dict(role="student", backbone="stemnet_tiny", depth=2, **_TINY),
    # the paper's CNN pair (Table 6); token fields (dim, patch_size, ...) are unused by them
    "simplebaseline_r50": dict(role="teacher", backbone="resnet50", head="deconv"),
    "deeppose_r50": dict(role="student", backbone="resnet50", head="fc"),
    "simplebaseline_tiny": dict(
        role="teacher", backbone="resnet_tiny", head="deconv", head_channels=64, **_TINY
    ),
    "deeppose_tiny": dict(role="student", backbone="resnet_tiny", head="fc", **_TINY),
}
MODEL_NAMES = list(_MODELS)


def model_config(name: str, **overrides) -> ModelConfig:
    """The built-in config `name` with `overrides` (ModelConfig fields) applied."""
    if name not in _MODELS:
        raise BadConfigError(f"model name {name!r} is unknown; expected one of {MODEL_NAMES}")
    known = {f.name for f in fields(ModelConfig)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BadConfigError(
            f"model overrides {unknown} are unknown; expected among {sorted(known)}"
        )
    return ModelConfig(name=name, **{**_MODELS[name], **overrides})


def create_model(config: ModelConfig) -> nn.Module:
    """A fresh (randomly initialised) model for a config: by head, then by role."""
    if config.head == "deconv":
        return SimpleBaseline(config)
    if config.head == "fc":
        return DeepPose(config)
    return TokenPose(config) if config.role == "teacher" else DistilPose(config)


def build_model(name: str, weights: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build a model by the paper's name; overrides change ModelConfig fields (e.g. depth=6).
    `weights`: a local backbone state dict (e.g. torchvision's ImageNet ResNet-50 file) loaded
    strictly into `model.backbone` (a classifier `fc.*` in it is dropped)."""
    model = create_model(model_config(name, **overrides))
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


__all__ = [
    "MODEL_NAMES",
    "DeepPose",
    "DistilPose",
    "ModelConfig",
    "SimpleBaseline",
    "StudentOutput",
    "TeacherOutput",
    "TokenPose",
    "build_from_checkpoint",
    "build_model",
    "checkpoint_filter_fn",
    "count_macs",
    "count_params",
    "create_model",
    "identify_checkpoint",
    "list_model_infos",
    "load_backbone_weights",
    "load_checkpoint",
    "model_config",
    "model_info",
    "save_checkpoint",
]
