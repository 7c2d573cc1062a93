"""`train-student --resume` after SIGKILL, 10 times in a row: the final weights equal an
uninterrupted run's (issue 8).

Each run is a forked child on one CPU thread (deterministic kernels, and no interpreter start-up
per run), checkpointing every step so that kills land between and during checkpoint writes as
well as in the middle of epochs, in start-up and in resuming. The kill moments are random
(seeded) and scaled to the measured step time of this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_student_train import build_tiny_store  # noqa: E402

from distilpose.training.runs import StudentRun  # noqa: E402
from student_train.train import train_student  # noqa: E402

KILLS = 10
EPOCHS = 3
# 30 instances in batches of 4: 8 steps per epoch, 24 in all; kills stop short of the end, so
# all 10 land in an unfinished run.
TRAIN = dict(
    epochs=EPOCHS, batch_size=4, device="cpu", workers=0, seed=0, log_every=1, ckpt_every_steps=1
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic CPU kernels; also makes forking a torch user safe
    yield
    torch.set_num_threads(n)


def train(store: str, out: Path, resume: bool) -> dict:
    return train_student(StudentRun(store, "distilpose_tiny", out, resume=resume, **TRAIN))


def checkpoint_id(out: Path) -> tuple[int, int] | None:
    """Identity of out/last.pth: each atomic save replaces the file, giving a new inode."""
    try:
        st = os.stat(out / "last.pth")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_checkpoints(proc, out: Path, n: int, timeout: float = 60.0) -> None:
    """Wait until `n` more checkpoints were saved (or the run ended)."""
    seen, last = 0, checkpoint_id(out)
    deadline = time.monotonic() + timeout
    while seen < n and proc.is_alive() and time.monotonic() < deadline:
        now = checkpoint_id(out)
        if now != last:
            seen, last = seen + 1, now
        time.sleep(0.001)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "student.pth", map_location="cpu", weights_only=True)
    return state["state_dict"]


@pytest.mark.reliability(
    case="train-student --resume after SIGKILL, 10 kills in a row",
    outcome="final student weights torch.equal an uninterrupted run's",
)
def test_ten_sigkills_and_resumes_give_the_uninterrupted_weights(tmp_path, record_property):
    tiny = build_tiny_store(tmp_path / "tiny", views=2, num_train=30, num_val=4)
    reference = tmp_path / "reference"
    summary = train(tiny["store"], reference, resume=False)
    assert summary["steps"] == 8 * EPOCHS
    step_s = summary["time_s"] / summary["steps"]

    killed = tmp_path / "killed"
    rng = random.Random(8)
    interrupted, steps_seen = 0, [0]
    for i in range(KILLS):
        proc = mp.get_context("fork").Process(
            target=train, args=(tiny["store"], killed, i > 0), daemon=True
        )
        proc.start()
        # A random moment: during start-up or resuming, or inside the step after 1-3 more
        # checkpoints (computing, writing the checkpoint, replacing it, logging metrics), so
        # that the kills spread over the run, epoch ends and view changes included.
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 3 * step_s))
        else:
            target = min(steps_seen[-1] + rng.randint(1, 3), 8 * EPOCHS - 2)
            wait_for_checkpoints(proc, killed, target - steps_seen[-1])
            time.sleep(rng.uniform(0.0, step_s))
        if proc.is_alive():
            interrupted += 1
        proc.kill()  # SIGKILL
        proc.join()
        assert proc.exitcode in (-signal.SIGKILL, 0), proc.exitcode
        if (killed / "last.pth").exists():
            last = torch.load(killed / "last.pth", map_location="cpu", weights_only=True)
            steps_seen.append(int(last["step"]))

    # Every kill must land in a running, unfinished run, or the test would prove less.
    assert interrupted == KILLS, (interrupted, steps_seen)
    assert steps_seen[-1] < 8 * EPOCHS, steps_seen
    assert train(tiny["store"], killed, resume=True)["steps"] == 8 * EPOCHS

    want, got = final_weights(reference), final_weights(killed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after {KILLS} kills"
    last = torch.load(killed / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS
    assert not list(killed.glob("*.tmp")) and not list(killed.glob(".*.tmp"))  # cleaned up
    record_property("kills_survived", KILLS)
