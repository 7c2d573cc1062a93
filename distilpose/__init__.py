"""DistilPose: tokenized pose regression with heatmap distillation, trained from a cached teacher.

The package holds what both stages share, one subpackage per role: `models/` (the networks, their
registry and checkpoints), `data/` (COCO data, seeded augmentation, target codecs), `training/`
(the one training loop, losses, run configs, several processes), `evaluation/` (COCO keypoint AP),
`inference/` (images or videos in, poses out; detectors, export) and `viz/` (pictures), beside a
few small helpers (`geometry`, `errors`, `io`, `limits`, `progress`, `device`). The stages live
beside it: `teacher_dump` (run the teacher once, fill the store), `store` (the on-disk cache) and
`student_train` (train students from it).

`from distilpose import Inferencer` is the everyday entry point (images or videos in, poses out);
it is imported on first use, so `import distilpose` (and every CLI command) stays light.
"""

__version__ = "0.1.0"
__all__ = ["Inferencer", "PoseResult"]


def __getattr__(name: str):
    if name in __all__:
        from distilpose.inference import inferencer

        return getattr(inferencer, name)
    raise AttributeError(f"module 'distilpose' has no attribute {name!r}")
