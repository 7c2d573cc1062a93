"""Stage 1: obtain a teacher and run it once over the training set into the store.

`train_teacher` trains a TokenPose heatmap teacher with the shared trainer
(`distilpose.training.engine`);
`dump_teacher` runs a teacher over seeded augmented crops and writes its heatmaps and tokens
into a store (`store/`), resumably and in parallel (torchrun ranks, `--shard` jobs, or a Dask
cluster). The student stage only reads that store.
"""

from distilpose.training.runs import DumpRun
from teacher_dump import dump
from teacher_dump.train import train_teacher


def dump_teacher(run: DumpRun) -> dict:
    """`teacher_dump.dump.dump_teacher` (this process, or torchrun ranks), or with `run.cluster`
    its units as tasks on a Dask cluster (`teacher_dump.cluster.dump_on_cluster`)."""
    if run.cluster is None:
        return dump.dump_teacher(run)
    from teacher_dump.cluster import dump_on_cluster  # distributed is imported only for this

    return dump_on_cluster(run)


__all__ = ["dump_teacher", "train_teacher"]
