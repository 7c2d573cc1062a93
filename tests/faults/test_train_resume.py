"""`train-student --resume` after SIGKILL: the final weights equal an uninterrupted run's.

Each run is a subprocess on one CPU thread (deterministic kernels), checkpointing every step so
that kills land between and during checkpoint writes as well as in the middle of epochs. The
kill moments are random (seeded), after the run's first checkpoint exists.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_student_train import build_tiny_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
SCRIPT = f"""
import sys
import torch
torch.set_num_threads(1)
from student_train.train import train_student
train_student(sys.argv[1], "distilpose_tiny", sys.argv[2], epochs={EPOCHS}, batch_size=8,
              device="cpu", workers=0, seed=0, resume=sys.argv[3] == "1", log_every=1,
              ckpt_every_steps=1)
"""


def start(store: str, out: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILPOSE_NO_PROGRESS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, store, str(out), "1" if resume else "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, rng: random.Random) -> int:
    """SIGKILL `proc` at a random moment once out/last.pth exists; returns its exit code."""
    ckpt = out / "last.pth"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.4))
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "student.pth", map_location="cpu", weights_only=True)
    return state["state_dict"]


def test_sigkill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    tiny = build_tiny_store(tmp_path / "tiny", views=2, num_train=30, num_val=4)
    reference = tmp_path / "reference"
    finish(start(tiny["store"], reference, resume=False))

    killed = tmp_path / "killed"
    rng = random.Random(8)
    codes = [kill_after_first_checkpoint(start(tiny["store"], killed, False), killed, rng)]
    codes.append(kill_after_first_checkpoint(start(tiny["store"], killed, True), killed, rng))
    assert -signal.SIGKILL in codes, f"no run was killed mid-training: exit codes {codes}"
    finish(start(tiny["store"], killed, resume=True))

    want, got = final_weights(reference), final_weights(killed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    last = torch.load(killed / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS
