"""The shared trainer: exact resume (torchtitan style), run-directory files, lr recipe."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from distilpose.errors import BadConfigError
from distilpose.models import build_model
from distilpose.training.engine import TrainConfig, Trainer, lr_at
from distilpose.viz.curves import draw_run_loss_curves


class Killed(Exception):
    """Stands in for SIGKILL: the run stops in the middle of the data."""


def tiny_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tokenpose_tiny", depth=1, dim=16, heads=2)


def make_batches(kill_at: tuple[int, int] | None = None, n_batches: int = 3):
    """Random batches drawn from the global RNG the trainer seeds per epoch.

    kill_at=(epoch, i): raise before yielding batch i of that epoch.
    """

    def batches(epoch: int):
        for i in range(n_batches):
            if kill_at == (epoch, i):
                raise Killed(f"killed at epoch {epoch} batch {i}")
            yield {
                "images": torch.randn(4, 3, 128, 96),
                "heatmaps": torch.rand(4, 17, 32, 24),
                "target_weights": (torch.rand(4, 17) > 0.2).float(),
            }

    return batches


def task(model: torch.nn.Module, batch: dict) -> dict:
    out = model(batch["images"])
    # A random op inside the step: resume must restore the RNG, not only the weights.
    noise = 0.01 * torch.randn_like(batch["heatmaps"])
    err = (out.heatmaps - batch["heatmaps"] - noise) * batch["target_weights"][..., None, None]
    mse = err.pow(2).mean()
    return {"loss": mse, "loss_heatmap": mse.detach(), "loss_abs": err.abs().mean().detach()}


def config(**kw) -> TrainConfig:
    base = dict(
        epochs=4,
        batch_size=4,
        lr=1e-3,
        warmup_iters=4,
        milestones=(0.5, 0.75),
        device="cpu",
        log_every=2,
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "kill_at, ckpt_every_steps",
    [((2, 0), 0), ((2, 2), 2)],  # at an epoch boundary; mid-epoch after a step checkpoint
    ids=["epoch_boundary", "mid_epoch"],
)
def test_resume_gives_identical_weights(tmp_path, kill_at, ckpt_every_steps):
    cfg = config(ckpt_every_steps=ckpt_every_steps)
    full = Trainer(tiny_teacher(), task, make_batches(), cfg, tmp_path / "full", {"run": "full"})
    full.fit()

    run = tmp_path / "resumed"
    with pytest.raises(Killed):
        Trainer(tiny_teacher(), task, make_batches(kill_at), cfg, run, {}).fit()
    torch.manual_seed(123)  # a different init: every weight must come from the checkpoint
    other = build_model("tokenpose_tiny", depth=1, dim=16, heads=2)
    resumed = Trainer(other, task, make_batches(), cfg, run, {})
    summary = resumed.fit(resume=True)

    assert summary["epochs"] == 4 and summary["steps"] == 12 == full.step
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)

    # The killed run's rows after its checkpoint are replaced, not duplicated.
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    epochs = [int(r["epoch"]) for r in rows if r["kind"] == "epoch"]
    steps = [int(r["step"]) for r in rows if r["kind"] == "step"]
    assert epochs == [0, 1, 2, 3]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    # and the logged epoch losses equal the uninterrupted run's
    full_rows = list(csv.DictReader((tmp_path / "full" / "metrics.csv").open()))
    loss = [r["loss"] for r in rows if r["kind"] == "epoch"]
    assert loss == [r["loss"] for r in full_rows if r["kind"] == "epoch"]


def test_a_different_run_differs(tmp_path):
    """Guards the equality test against vacuity: another seed gives other weights."""
    a = Trainer(tiny_teacher(), task, make_batches(), config(epochs=1), tmp_path / "a", {})
    b = Trainer(tiny_teacher(), task, make_batches(), config(epochs=1, seed=4), tmp_path / "b", {})
    a.fit()
    b.fit()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_directory_files(tmp_path):
    evals = []

    def on_epoch_end(epoch, model):
        evals.append((epoch, model.training))
        model.eval()  # the trainer must put it back into training mode
        return {"AP": 0.1 * (epoch + 1)}

    meta = {"role": "teacher", "model": "tokenpose_tiny", "args": {"epochs": 2}}
    t = Trainer(
        tiny_teacher(),
        task,
        make_batches(),
        config(epochs=2),
        tmp_path,
        meta,
        on_epoch_end=on_epoch_end,
        on_save=draw_run_loss_curves,  # what the stages pass: the loop itself draws nothing
    )
    summary = t.fit()
    assert evals == [(0, True), (1, True)]

    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["meta"] == meta
    assert TrainConfig(**doc["train_config"]) == t.config  # replayable

    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {
        "kind",
        "epoch",
        "step",
        "lr",
        "loss",
        "loss_heatmap",
        "loss_abs",
        "samples_per_s",
        "AP",
    } <= set(rows[0])
    ep = [r for r in rows if r["kind"] == "epoch"]
    assert [float(r["AP"]) for r in ep] == pytest.approx([0.1, 0.2])
    assert float(rows[0]["lr"]) < 1e-3  # still warming up
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    assert summary["final"]["AP"] == pytest.approx(0.2)

    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "loss_heatmap=" in (tmp_path / "train.log").read_text()

    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["meta"] == meta
    assert {"optimizer", "scaler", "scheduler", "rng", "state_dict", "model"} <= set(ckpt)


def test_non_finite_loss_stops_the_run(tmp_path):
    def bad_task(model, batch):
        out = task(model, batch)
        return {**out, "loss": out["loss"] * float("nan")}

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        Trainer(tiny_teacher(), bad_task, make_batches(), config(), tmp_path, {}).fit()


def test_lr_recipe():
    cfg = TrainConfig()  # the paper's: 300 epochs, 1e-3, warmup 500, x0.1 at 200 and 260
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-6)
    assert lr_at(cfg, 0, 250) == pytest.approx(1e-3 * (1 - 0.5 * 0.999))
    assert lr_at(cfg, 0, 500) == pytest.approx(1e-3)
    assert lr_at(cfg, 199, 10**6) == pytest.approx(1e-3)
    assert lr_at(cfg, 200, 10**6) == pytest.approx(1e-4)
    assert lr_at(cfg, 259, 10**6) == pytest.approx(1e-4)
    assert lr_at(cfg, 260, 10**6) == pytest.approx(1e-5)
    with pytest.raises(BadConfigError, match="epochs"):
        TrainConfig(epochs=0)


def test_cosine_lr_for_short_runs():
    cfg = TrainConfig(epochs=4, warmup_iters=10, schedule="cosine", total_steps=1000)
    assert lr_at(cfg, 0, 10) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.01)))
    assert lr_at(cfg, 2, 500) == pytest.approx(0.5e-3)  # halfway: half the lr, no step drop
    assert lr_at(cfg, 3, 999) < 1e-7 and lr_at(cfg, 3, 999) > 0
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-6)  # the warmup still starts at lr * 0.001
    with pytest.raises(BadConfigError, match="total_steps"):
        TrainConfig(schedule="cosine")
    with pytest.raises(BadConfigError, match="schedule"):
        TrainConfig(schedule="linear")
