"""COCO person data, seeded crop specs and their renderer, and the built-in demo dataset."""

from distilpose.data.coco import (
    annotation_digest,
    load_coco_instances,
    read_image,
    resolve_image_path,
)
from distilpose.data.crop import (
    MILD_RECIPE,
    AugmentRecipe,
    CropSpec,
    RenderedCrop,
    box_to_center_scale,
    crop_digest,
    eval_crop_spec,
    get_affine_transform,
    normalize,
    normalize_rgb,
    photometric_jitter,
    render_crop,
    sample_crop_spec,
)
from distilpose.data.demo import make_demo_data
from distilpose.data.instance import PersonInstance
from distilpose.data.keypoints import (
    FLIP_INDEX,
    FLIP_PAIRS,
    KEYPOINT_NAMES,
    NUM_KEYPOINTS,
    OKS_SIGMAS,
    SKELETON,
)
from distilpose.data.show import show_crops

__all__ = [
    "FLIP_INDEX",
    "FLIP_PAIRS",
    "KEYPOINT_NAMES",
    "NUM_KEYPOINTS",
    "OKS_SIGMAS",
    "MILD_RECIPE",
    "SKELETON",
    "AugmentRecipe",
    "CropSpec",
    "PersonInstance",
    "RenderedCrop",
    "annotation_digest",
    "box_to_center_scale",
    "crop_digest",
    "eval_crop_spec",
    "get_affine_transform",
    "load_coco_instances",
    "make_demo_data",
    "normalize",
    "normalize_rgb",
    "photometric_jitter",
    "read_image",
    "render_crop",
    "resolve_image_path",
    "sample_crop_spec",
    "show_crops",
]
