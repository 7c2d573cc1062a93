"""The name -> builder table: each built-in model is a name and the ModelConfig fields that
differ from the defaults (the full DistilPose-S). See `distilpose.models` for the table of
models. Imports only the model files and `state_io` (reading a backbone's weights), so
`checkpoint` and the complexity counter import it at their top: checkpoint -> registry ->
state_io, never back."""

from __future__ import annotations

import os
from dataclasses import fields

from torch import nn

from distilpose.errors import BadConfigError
from distilpose.models.deeppose import DeepPose
from distilpose.models.distilpose import DistilPose
from distilpose.models.layers import ModelConfig
from distilpose.models.simplebaseline import SimpleBaseline
from distilpose.models.state_io import load_backbone_weights
from distilpose.models.tokenpose import TokenPose

_TINY = dict(input_size=(96, 128), heatmap_size=(24, 32), patch_size=(3, 4), dim=64, heads=4)
# demo models: 96x128 crops, 24x32 heatmaps, 2x2 patches -> 12x16 = 192 visual tokens
_DEMO = dict(input_size=(96, 128), heatmap_size=(24, 32), patch_size=(2, 2), dim=64, heads=4,
             depth=2, mlp_ratio=2)  # fmt: skip

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
    # the demo's pair (not the paper's): see the README's demo section
    "tokenpose_demo": dict(role="teacher", backbone="encdec_demo", head="similarity", **_DEMO),
    "distilpose_demo": dict(role="student", backbone="encdec_demo_s", head="similarity", **_DEMO),
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
