"""The demo's claim in small: from one store and seed, the distilled student leaves the mean
pose, where a student without the teacher does not.

The shipped demo teacher is dumped over a few synthetic people; a `distilpose_demo` student
trains with the demo's full objective, batch, lr and schedule, and is scored on other people
against the mean pose placed in each person's box (`mean_pose_results`). At this budget a
`reg`-only student stays within about a pixel of the mean pose (measured beside it, numbers
below), so the mean pose stands in for that second student at no training cost (it was half
of this suite's CPU time); the demo itself (benchmarks/results/demo_run.md) trains both. A
loss term that stops carrying the teacher's knowledge (a wrong target, sign or weight) leaves
the student at the mean pose and fails this.
"""

from __future__ import annotations

import json

import pytest

import demo
from distilpose.data import MILD_RECIPE, make_demo_data
from distilpose.evaluation.metrics import keypoint_errors, load_coco, mean_pose_results
from distilpose.inference.config import InferConfig
from distilpose.inference.eval_run import run_eval
from distilpose.training.runs import DumpRun, StudentRun
from distilpose.weights import DEMO_TEACHER_FILE, demo_teacher_path
from student_train.train import train_student
from teacher_dump.dump import dump_teacher

PLAN = demo.DemoPlan()
STEPS = dict(epochs=16, batch_size=PLAN.batch_size)  # 16 epochs x 64 batches of 512 people
# Mean joint error on 40 other people, 8,192 samples per student. On 512 people x 16 epochs
# one machine measured distilled 16.9 vs reg-only 20.3 px (data seed 5) and 15.9 vs 19.8 (seed
# 6); another machine of the same kind (its float kernels take other paths) distilled 16.7,
# reg-only 21.0, mean pose 20.5 (seed 5) and 15.6, 19.4, 20.4 (seed 6); at 12 epochs only 18.6
# vs 21.0. Both students
# are far from converged, so the margin a test this fast can demand is about half to two
# thirds of the measured gap.
MARGIN_PX = 2.0


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = make_demo_data(root / "data", num_train=512, num_val=40, seed=5)
    store = root / "store"
    dump_teacher(
        DumpRun(
            demo_teacher_path(), data["train_ann"], data["train_images"], str(store), views=1,
            seed=5, device="cpu", recipe=MILD_RECIPE, workers=0,
        )
    )  # fmt: skip
    return data, store, root


def _pixel_error(data: dict, ckpt, out) -> float:
    run_eval(
        ckpt, data["val_ann"], data["val_images"], config=InferConfig(device="cpu"), out_json=out
    )
    return keypoint_errors(load_coco(data["val_ann"]), json.loads(out.read_text()))["pixel_error"]


def test_distilled_student_leaves_the_mean_pose(demo_store):
    """The distilled student, trained as in the demo, beats the mean pose by MARGIN_PX."""
    data, store, root = demo_store
    run = train_student(
        StudentRun(
            str(store), "distilpose_demo", str(root / "distilled"), losses=PLAN.losses,
            lr=PLAN.lr, schedule="cosine", device="cpu", seed=0, workers=0, **STEPS,
        )
    )  # fmt: skip
    distilled = _pixel_error(data, run["checkpoint"], root / "distilled.json")
    val = load_coco(data["val_ann"])
    floor = keypoint_errors(val, mean_pose_results(load_coco(data["train_ann"]), val))
    assert distilled < floor["pixel_error"] - MARGIN_PX, (distilled, floor)


def test_shipped_teacher_is_checked(tmp_path, monkeypatch):
    """A changed byte in the shipped teacher is one clear error, not a silent other teacher."""
    import distilpose.weights as w
    from distilpose.errors import BadCheckpointError

    assert demo_teacher_path() == DEMO_TEACHER_FILE
    bad = tmp_path / "demo_teacher.pth"
    blob = bytearray(DEMO_TEACHER_FILE.read_bytes())
    blob[len(blob) // 2] ^= 1
    bad.write_bytes(bytes(blob))
    monkeypatch.setattr(w, "DEMO_TEACHER_FILE", bad)
    with pytest.raises(BadCheckpointError, match="sha256"):
        w.demo_teacher_path()
