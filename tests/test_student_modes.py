"""Student training without a store: fresh crops of the images every epoch, with the teacher
online or teacher-free (`reg` / `rle`), from the CLI with a chosen recipe; the run's mode and
teacher-forward count; exact resume with RLE's flow; refusals in one line.

Sized small (12 demo people, 48x64 crops, tiny models, one thread): a few seconds in all.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from distilpose.data import (
    MILD_RECIPE,
    AugmentRecipe,
    load_coco_instances,
    make_demo_data,
    normalize,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.errors import BadCheckpointError, BadConfigError
from distilpose.geometry import Geometry
from distilpose.models import build_model, save_checkpoint
from distilpose.training.runs import StudentRun
from student_train.train import plan_student, train_student

SIZE = Geometry((48, 64)).size_overrides()
PEOPLE, BATCH = 12, 4  # 3 steps per epoch
TRAIN = dict(batch_size=BATCH, device="cpu", workers=0, warmup_iters=1, log_every=1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic CPU kernels; also makes forking a torch user safe
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("modes")
    paths = make_demo_data(root / "data", num_train=PEOPLE, num_val=2, seed=3)
    torch.manual_seed(0)
    teacher = build_model("tokenpose_tiny", **SIZE).eval()  # random: plumbing needs no good one
    ckpt = root / "teacher.pth"
    save_checkpoint(ckpt, teacher, meta={"role": "teacher", "model": "tokenpose_tiny"})
    return {"ann": str(paths["train_ann"]), "images": str(paths["train_images"]), "teacher": ckpt}


def student_run(data: dict, out: Path, **kw) -> StudentRun:
    paths = {"ann_file": data["ann"], "images": data["images"]}
    kw = {"model": "distilpose_tiny", "model_overrides": SIZE, **paths, **TRAIN, **kw}
    return StudentRun(None, out_dir=str(out), **kw)


def epoch_rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "epoch"]


def test_fresh_crops_follow_the_recipe_seeded_by_seed_instance_epoch(data, tmp_path):
    """Epoch e's crop of instance i is sample_crop_spec(i, recipe, seed, view=e), rendered: the
    chosen recipe reaches the pixels, and every epoch is a new view."""
    plan = plan_student(student_run(data, tmp_path, losses="reg", recipe=MILD_RECIPE, seed=5))
    assert plan.mode == "teacher_free" and plan.recipe == MILD_RECIPE.to_dict()
    instances = load_coco_instances(data["ann"], data["images"], train=True, aspect_ratio=0.75)
    for epoch in (0, 1):
        batch = next(iter(plan.data(epoch)))
        for row, index in enumerate(batch["instance"].tolist()):
            inst = instances[index]
            spec = sample_crop_spec(inst, MILD_RECIPE, 5, epoch, (48, 64))
            crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, (48, 64))
            torch.testing.assert_close(batch["images"][row], normalize(crop.image))
    first, second = (next(iter(plan.data(e)))["images"] for e in (0, 1))
    assert not torch.equal(first, second)
    # the default is the paper's student recipe (rotations, half bodies): other crops
    paper = plan_student(student_run(data, tmp_path, losses="reg", seed=5))
    assert paper.recipe == AugmentRecipe().to_dict()


def test_cli_trains_teacher_free_with_rle_from_the_images(data, tmp_path):
    out = tmp_path / "free"
    args = ["train-student", "--ann", data["ann"], "--images", data["images"], "--out", out,
            "--augment", "mild", "--losses", "rle", "--model", "distilpose_tiny",
            "--input-size", "48x64", "--epochs", "2", "--batch-size", BATCH, "--device", "cpu",
            "--workers", "0"]  # fmt: skip
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    state = torch.load(out / "student.pth", map_location="cpu", weights_only=True)
    assert state["meta"]["mode"] == "teacher_free" and state["meta"]["teacher_forwards"] == 0
    assert state["meta"]["student_config"]["recipe"] == MILD_RECIPE.to_dict()
    rows = epoch_rows(out)
    assert [r["teacher_forwards"] for r in rows] == ["0", "0"]
    assert all(np.isfinite(float(r["loss_rle"])) for r in rows)
    last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert any(k.startswith("loss_fn.rle.flow.") for k in last["task"])  # the flow, saved


def test_online_teacher_counts_its_forwards(data, tmp_path):
    summary = train_student(
        student_run(data, tmp_path, losses="reg,kt,vt,sh,cs", epochs=2,
                    teacher_online=str(data["teacher"]))
    )  # fmt: skip
    assert summary["mode"] == "online_teacher"
    assert summary["teacher_forwards"] == 2 * PEOPLE
    assert [int(r["teacher_forwards"]) for r in epoch_rows(tmp_path)] == [PEOPLE, 2 * PEOPLE]
    assert float(epoch_rows(tmp_path)[0]["loss_sh"]) > 0


def _train_until(run: StudentRun, stop_epoch: int | None) -> None:
    """Train; with `stop_epoch`, die (no cleanup) when that epoch ends, before its checkpoint."""

    def die(epoch: int, model: object) -> dict:
        if epoch == stop_epoch:
            os._exit(3)
        return {}

    train_student(run, eval_fn=die if stop_epoch is not None else None)


def test_interrupted_runs_resume_exactly_with_the_flow_and_the_count(data, tmp_path):
    """Online teacher + rle, fresh crops: stopped mid-run twice (at a mid-epoch checkpoint of
    epoch 0, then after the last step of epoch 1) and resumed, the weights, the RLE flow and
    the teacher-forward count equal an uninterrupted run's bit for bit; with the student's
    input jittered, which draws from the resumed RNG."""
    kw = dict(
        losses="rle,sh,cs", epochs=3, ckpt_every_steps=2, teacher_online=str(data["teacher"]),
        input_jitter=0.4,
    )  # fmt: skip
    reference = tmp_path / "reference"
    _train_until(student_run(data, reference, **kw), None)
    killed = tmp_path / "killed"
    for i, stop in enumerate((0, 1)):
        run = student_run(data, killed, resume=i > 0, **kw)
        child = mp.get_context("fork").Process(target=_train_until, args=(run, stop))
        child.start()
        child.join()
        assert child.exitcode == 3
    last = torch.load(killed / "last.pth", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["epoch_step"]) == (1, 3)  # stopped after epoch 1's last step
    _train_until(student_run(data, killed, resume=True, **kw), None)
    assert "resume: " in (killed / "train.log").read_text()

    want, got = (torch.load(d / "last.pth", weights_only=True) for d in (reference, killed))
    for part in ("state_dict", "task"):
        assert want[part].keys() == got[part].keys()
        for name in want[part]:
            assert torch.equal(want[part][name], got[part][name]), f"{part} {name} differs"
    assert int(got["task"]["teacher_forwards"]) == 3 * PEOPLE
    assert epoch_rows(killed) == [
        {**r, "samples_per_s": s["samples_per_s"]}
        for r, s in zip(epoch_rows(reference), epoch_rows(killed), strict=True)
    ]


def test_a_checkpoint_without_task_state_resumes_only_without_the_flow(data, tmp_path):
    """A last.pth saved before tasks kept state: a run without RLE resumes (its teacher-forward
    count restarts, said in train.log); one with RLE's flow is refused in one line."""
    for losses in ("reg", "rle"):
        out = tmp_path / losses
        train_student(student_run(data, out, losses=losses, epochs=1))
        state = torch.load(out / "last.pth", weights_only=True)
        del state["task"]
        torch.save(state, out / "last.pth")
        again = student_run(data, out, losses=losses, epochs=2, resume=True)
        if losses == "reg":
            assert train_student(again)["steps"] == 2 * PEOPLE // BATCH
            assert "counters restart at 0" in (out / "train.log").read_text()
        else:
            with pytest.raises(BadCheckpointError, match="no task state .the RLE flow"):
                train_student(again)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(losses="reg,sh"), "losses: sh needs the teacher's heatmaps, and this run has no"),
        (dict(losses="rle", ann_file=None), "store: none given; expected a store, or ann_file"),
        (dict(losses="rle", model="tokenpose_tiny"), "rle needs the student's predicted sigmas"),
    ],
)  # fmt: skip
def test_refusals_name_the_problem(data, tmp_path, kw, message):
    with pytest.raises(BadConfigError, match=message):
        train_student(student_run(data, tmp_path / "r", **kw))
    assert not (tmp_path / "r").exists()


def test_cli_refuses_a_recipe_with_a_store_in_one_line(data, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    args = ["train-student", "--store", str(store), "--out", str(tmp_path / "o"), "--augment",
            "mild", "--losses", "reg"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: recipe: ")


def test_input_jitter_changes_the_students_input_only(data, tmp_path):
    """--input-jitter from the CLI: the run records it and trains other weights than the same
    run without it (the jitter acts), while the online teacher's forward count is unchanged
    (it saw each crop as it was, once)."""
    common = [
        "--ann", data["ann"], "--images", data["images"], "--model", "distilpose_tiny",
        "--input-size", "48x64", "--losses", "reg", "--epochs", "1", "--batch-size", "4",
        "--device", "cpu", "--workers", "0", "--teacher-online", str(data["teacher"]),
    ]  # fmt: skip
    outs = {}
    for name, extra in (("plain", []), ("jitter", ["--input-jitter", "0.4"])):
        outs[name] = tmp_path / name
        res = CliRunner().invoke(
            cli.app, ["train-student", *common, "--out", str(outs[name]), *extra]
        )
        assert res.exit_code == 0, res.output
    plain, jitter = (torch.load(outs[n] / "last.pth", weights_only=True) for n in outs)
    assert jitter["meta"]["student_config"]["input_jitter"] == 0.4
    assert plain["meta"]["student_config"]["input_jitter"] == 0.0
    assert int(plain["task"]["teacher_forwards"]) == int(jitter["task"]["teacher_forwards"])
    assert any(
        not torch.equal(plain["state_dict"][k], jitter["state_dict"][k])
        for k in plain["state_dict"]
    )
    bad = CliRunner().invoke(
        cli.app, ["train-student", *common, "--out", str(tmp_path / "bad"), "--input-jitter", "2"]
    )
    assert bad.exit_code == 1 and "input_jitter" in bad.output and "Traceback" not in bad.output
