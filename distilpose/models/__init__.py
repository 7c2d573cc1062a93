"""The paper's models by name: TokenPose teachers, DistilPose students and the CNN pair.

    model = build_model("distilpose_s")            # model.config: ModelConfig
    out = model(images)                            # images [B, 3, H, W] -> StudentOutput

| name | role | backbone | tokens (dim x depth) | paper |
|---|---|---|---|---|
| `tokenpose_l_w48` | teacher | HRNet-W48, 4 stages | 192 x 12 | 69.41M, 17.03 GMACs |
| `tokenpose_s` | teacher | StemNet | 192 x 12 | Table 5 teacher |
| `distilpose_s` | student | StemNet | 192 x 12 | 5.36M, 2.38 GMACs |
| `distilpose_l` | student | HRNet-W48, stages 1-3 | 192 x 12 | 21.27M, 10.33 GMACs |
| `tokenpose_tiny` | teacher | tiny stem (32 ch) | 64 x 4 | demo and tests |
| `distilpose_tiny` | student | tiny stem (32 ch) | 64 x 2 | demo and tests |
| `simplebaseline_r50` | teacher | ResNet-50 + 3 deconvs | none | Table 6 teacher |
| `deeppose_r50` | student | ResNet-50, pooled Linear | none | Table 6 student |
| `simplebaseline_tiny` | teacher | tiny ResNet + 2 deconvs | none | demo and tests |
| `deeppose_tiny` | student | tiny ResNet, pooled Linear | none | demo and tests |
| `tokenpose_demo` | teacher | encoder-decoder | 64 x 2 | the demo's teacher |
| `distilpose_demo` | student | small encoder-decoder | 64 x 2 | the demo's student |

Sizes are width x height, as everywhere in the project. Tiny models take 96x128 crops (heatmaps
24x32, 64 patches of 3x4); the demo pair takes 96x128 crops (heatmaps 24x32, 192 patches of
2x2) and reads heatmaps from keypoint x visual token similarity (head "similarity"). The tiny
ResNet has three stages of one BasicBlock (32, 64, 128 channels, stride 16); its deconvolutions
have 64 channels. Models without tokens (SimpleBaseline, DeepPose) accept `weights=PATH` in
`build_model`: a local torchvision ResNet state dict (ImageNet) for the trunk.
tests/test_models.py checks this table against `MODEL_NAMES` and the configs.
"""

from __future__ import annotations

from distilpose.models.checkpoint import (
    build_from_checkpoint,
    identify_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distilpose.models.complexity import count_macs, count_params, list_model_infos, model_info
from distilpose.models.deeppose import DeepPose
from distilpose.models.distilpose import DistilPose, StudentOutput
from distilpose.models.layers import ModelConfig
from distilpose.models.registry import MODEL_NAMES, build_model, create_model, model_config
from distilpose.models.simplebaseline import SimpleBaseline
from distilpose.models.state_io import checkpoint_filter_fn, load_backbone_weights
from distilpose.models.tokenpose import TeacherOutput, TokenPose

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
