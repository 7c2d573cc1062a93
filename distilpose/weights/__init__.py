"""Weights shipped inside the package: the demo's trained teacher.

`demo_teacher.pth` is `tokenpose_demo` trained once by this project's own `train-teacher` on
synthetic demo people (the command, seed and log are in `benchmarks/results/demo_teacher.md`;
`DEMO_TEACHER_RECIPE` below is that command as data, and `distilpose demo --train-teacher`
retrains it). Its SHA-256 is checked before every use, so a damaged or swapped file fails with
one line instead of distilling from the wrong teacher. Stored in half precision (the model
loads it into float32), which keeps the file small enough to ship.
"""

from __future__ import annotations

from pathlib import Path

from distilpose.errors import BadCheckpointError
from distilpose.io import file_sha256 as sha256_of

DEMO_TEACHER_FILE = Path(__file__).with_name("demo_teacher.pth")
DEMO_TEACHER_SHA256 = "0366bdcbefadd3408df3f2b53bbe598ce5ae39f2ffa8161d1f0584c702fec053"

# How demo_teacher.pth was made: `distilpose make-demo-data` then `distilpose train-teacher`.
DEMO_TEACHER_RECIPE = {
    "model": "tokenpose_demo",
    "data_seed": 1000,  # its own synthetic people: no overlap with any demo split
    "num_train": 16000,
    "num_val": 600,
    "epochs": 40,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_iters": 300,
    "seed": 0,
    "augment": "mild",
}


def demo_teacher_path() -> Path:
    """The shipped demo teacher, after checking that its bytes are the released ones."""
    path = DEMO_TEACHER_FILE
    if not path.is_file():
        raise BadCheckpointError(
            f"{path}: the shipped demo teacher is missing; reinstall the package or run "
            "`distilpose demo --train-teacher`"
        )
    digest = sha256_of(path)
    if digest != DEMO_TEACHER_SHA256:
        raise BadCheckpointError(
            f"{path}: sha256 {digest[:16]}... differs from the released "
            f"{DEMO_TEACHER_SHA256[:16]}...; expected the file as shipped (reinstall the package)"
        )
    return path
