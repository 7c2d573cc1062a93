"""The demo's claim in small: from one store and seed, the distilled student beats reg-only.

The shipped demo teacher is dumped over a few synthetic people; two `distilpose_demo` students
train with the same seed, steps and schedule, one with the demo's full objective and one with
`reg` alone, and are scored on other people. A loss term that stops carrying the teacher's
knowledge (a wrong target, sign or weight) removes the margin and fails this test.
"""

from __future__ import annotations

import json

import pytest

import demo
from distilpose.data import MILD_RECIPE, make_demo_data
from distilpose.evaluation.metrics import keypoint_errors, load_coco
from distilpose.inference.config import InferConfig
from distilpose.inference.eval_run import run_eval
from distilpose.training.runs import DumpRun, StudentRun
from distilpose.weights import DEMO_TEACHER_FILE, demo_teacher_path
from student_train.many import train_many
from teacher_dump.dump import dump_teacher

PLAN = demo.DemoPlan()
STEPS = dict(epochs=16, batch_size=PLAN.batch_size)  # 16 epochs x 64 batches of 512 people
# Mean joint error on 40 other people, with the shipped teacher and the demo's student, batch,
# lr and losses, 8,192 samples per student. On 128 people x 64 epochs the recording machine
# measured distilled 18.4 vs reg-only 22.7 px, but another machine of the same kind 21.2 vs
# 23.0 (its float kernels take another path): too close. On 512 people x 16 epochs (same
# samples, more people) that machine measured 16.9 vs 20.3 (data seed 5) and 15.9 vs 19.8
# (seed 6); at 12 epochs only 18.6 vs 21.0. Both students are far from converged, so the
# margin a test this fast can demand is about half to two thirds of the measured gap.
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


def test_distilled_student_beats_reg_only(demo_store):
    """Both students train as in the demo (at once, one process and thread each, on 2+ cores)."""
    data, store, root = demo_store
    roles = {"distilled": PLAN.losses, "baseline": "reg"}
    runs = train_many(
        [
            StudentRun(
                str(store), "distilpose_demo", str(root / name), losses=losses, lr=PLAN.lr,
                schedule="cosine", device="cpu", seed=0, workers=0, **STEPS,
            )
            for name, losses in roles.items()
        ],
        "cpu",
    )  # fmt: skip
    errors = {
        name: _pixel_error(data, run["checkpoint"], root / f"{name}.json")
        for name, run in zip(roles, runs, strict=True)
    }
    assert errors["distilled"] < errors["baseline"] - MARGIN_PX, errors


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
