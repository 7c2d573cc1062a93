"""`train-student --val-every 1 --ema 0.99` from the CLI, SIGKILLed 3 times and resumed: the
final weights, the EMA weights, best.pth and the best AP equal an uninterrupted run's (issue 27).

As tests/faults/test_train_resume.py: forked children on one CPU thread, a checkpoint every
step, kills at random (seeded) moments scaled to the measured step time.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_student_train import build_tiny_store  # noqa: E402

import cli  # noqa: E402
from faults.test_train_resume import wait_for_checkpoints  # noqa: E402

KILLS = 3
EPOCHS = 3
STEPS = 4 * EPOCHS  # 16 instances in batches of 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic CPU kernels; also makes forking a torch user safe
    yield
    torch.set_num_threads(n)


def cli_train(tiny: dict, out: Path, resume: bool) -> None:
    args = ["train-student", "--store", tiny["store"], "--out", str(out)]
    args += ["--model", "distilpose_tiny", "--epochs", str(EPOCHS), "--batch-size", "4"]
    args += ["--device", "cpu", "--workers", "0", "--ckpt-every-steps", "1"]
    args += ["--val-ann", str(tiny["val_ann"]), "--val-images", str(tiny["val_images"])]
    args += ["--val-every", "1", "--ema", "0.99"] + (["--resume"] if resume else [])
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output[-2000:]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_equal_states(want: dict, got: dict, what: str) -> None:
    assert want.keys() == got.keys(), what
    for name in want:
        assert torch.equal(want[name], got[name]), f"{what}: {name} differs"


def val_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "epoch"]
    return [(r["epoch"], r["val_AP"], r["best_AP"]) for r in rows]


@pytest.mark.reliability(
    case="train-student --val-every 1 --ema 0.99 --resume after SIGKILL, 3 kills",
    outcome="final weights, EMA weights, best.pth and best AP equal an uninterrupted run's",
)
def test_val_ema_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, record_property):
    tiny = build_tiny_store(tmp_path / "tiny", views=2, num_train=16, num_val=4)
    reference = tmp_path / "reference"
    started = time.perf_counter()
    cli_train(tiny, reference, resume=False)
    step_s = (time.perf_counter() - started) / STEPS
    ref_last = load(reference / "last.pth")
    assert ref_last["step"] == STEPS and ref_last["ema"] is not None
    assert (reference / "best.pth").is_file()
    assert len(val_rows(reference)) == EPOCHS  # validated after every epoch
    # the EMA is not the trained weights (it lags them), and best.pth holds the EMA's
    ema, trained = ref_last["ema"], ref_last["state_dict"]
    assert any(not torch.equal(ema[k], trained[k]) for k in ema if ema[k].is_floating_point())
    best = load(reference / "best.pth")
    assert best["meta"]["best"]["ema"] is True
    assert best["meta"]["best"]["AP"] == ref_last["best"]["AP"]

    killed = tmp_path / "killed"
    rng = random.Random(27)
    seen = 0
    for i in range(KILLS):
        proc = mp.get_context("fork").Process(
            target=cli_train, args=(tiny, killed, i > 0), daemon=True
        )
        proc.start()
        target = min(seen + rng.randint(2, 4), STEPS - 2)
        wait_for_checkpoints(proc, killed, target - seen, timeout=120)
        time.sleep(rng.uniform(0.0, step_s))
        assert proc.is_alive(), "the run ended before the kill"
        proc.kill()  # SIGKILL
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        seen = int(load(killed / "last.pth")["step"])
    assert seen < STEPS
    cli_train(tiny, killed, resume=True)

    got_last = load(killed / "last.pth")
    assert_equal_states(ref_last["state_dict"], got_last["state_dict"], "weights")
    assert_equal_states(ref_last["ema"], got_last["ema"], "EMA weights")
    assert got_last["best"] == ref_last["best"]
    assert_equal_states(best["state_dict"], load(killed / "best.pth")["state_dict"], "best.pth")
    assert_equal_states(
        load(reference / "student.pth")["state_dict"],
        load(killed / "student.pth")["state_dict"],
        "student.pth",
    )
    assert val_rows(killed) == val_rows(reference)
    record_property("kills_survived", KILLS)
