"""DistilPose: tokenized pose regression with heatmap distillation, trained from a cached teacher.

The package holds what both stages share: models, COCO data and seeded augmentation, target
codecs, losses, evaluation and the one training loop. The stages live beside it: `teacher_dump`
(run the teacher once, fill the store), `store` (the on-disk cache) and `student_train` (train
students from it).
"""

__version__ = "0.1.0"
