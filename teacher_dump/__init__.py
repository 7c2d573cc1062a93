"""Stage 1: obtain a teacher and run it once over the training set into the store.

`train_teacher` trains a TokenPose heatmap teacher with the shared trainer
(`distilpose.training.engine`);
`dump_teacher` runs a teacher over seeded augmented crops and writes its heatmaps and tokens
into a store (`store/`), resumably and in parallel. The student stage only reads that store.
"""

from teacher_dump.dump import dump_teacher
from teacher_dump.train import train_teacher

__all__ = ["dump_teacher", "train_teacher"]
