"""DistilPose: tokenized pose regression with heatmap distillation, trained from a cached teacher.

The package holds what both stages share: models, COCO data and seeded augmentation, target
codecs, losses, evaluation and the one training loop. The stages live beside it: `teacher_dump`
(run the teacher once, fill the store), `store` (the on-disk cache) and `student_train` (train
students from it).

`from distilpose import Inferencer` is the everyday entry point (images or videos in, poses out);
it is imported on first use, so `import distilpose` (and every CLI command) stays light.
"""

__version__ = "0.1.0"
__all__ = ["Inferencer", "PoseResult"]


def __getattr__(name: str):
    if name in __all__:
        from distilpose import inferencer

        return getattr(inferencer, name)
    raise AttributeError(f"module 'distilpose' has no attribute {name!r}")
