"""Typed run configs (distilpose.training.runs): one object per stage run, saved to config.json
and read back by `--resume`."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_student_train import build_tiny_store  # noqa: E402

import cli  # noqa: E402
from distilpose.data import MILD_RECIPE  # noqa: E402
from distilpose.errors import BadConfigError  # noqa: E402
from distilpose.training.runs import DumpRun, StudentRun, TeacherRun, saved_run  # noqa: E402

RUNS = [
    TeacherRun(
        "tokenpose_tiny", Path("a.json"), Path("imgs"), Path("out"), epochs=3, recipe=MILD_RECIPE,
        model_overrides={"input_size": (96, 128), "heatmap_size": (24, 32)},
    ),
    DumpRun(Path("t.pth"), "a.json", "imgs", "store", views=2, shard=(1, 2), max_instances=5),
    StudentRun(
        "store", "distilpose_tiny", Path("out"), losses="reg,sh", warmup_iters=None,
        teacher_online=Path("t.pth"), model_overrides={"dim": 32}, schedule="cosine",
    ),
]  # fmt: skip


@pytest.mark.parametrize("run", RUNS, ids=lambda r: type(r).__name__)
def test_a_run_reads_back_equal_from_its_json(run):
    text = run.to_json()
    back = type(run).from_json(text)
    assert back == run and back.to_json() == text
    assert json.loads(text) == run.to_dict()  # plain JSON: paths as str, tuples as lists
    assert all(not isinstance(v, Path) for v in vars(back).values())


@pytest.mark.parametrize("run", RUNS, ids=lambda r: type(r).__name__)
def test_unknown_or_missing_fields_are_one_line_errors(run):
    kind = type(run).__name__
    data = {**run.to_dict(), "epochz": 3}
    with pytest.raises(BadConfigError, match=rf"^run.json: unknown field\(s\) epochz for {kind}"):
        type(run).from_dict(data, "run.json")
    data = run.to_dict()
    # StudentRun requires nothing: no store means training from the images
    required = [f.name for f in dataclasses.fields(run) if f.default is dataclasses.MISSING]
    for name in required[:1]:
        del data[name]
        with pytest.raises(BadConfigError, match=rf"missing field\(s\) {name} for {kind}") as e:
            type(run).from_dict(data, "run.json")
        assert "\n" not in str(e.value)
    assert bool(required) == (kind != "StudentRun")
    with pytest.raises(BadConfigError, match="not a JSON|JSON"):
        type(run).from_json("{not json", "run.json")


def test_a_damaged_saved_run_is_refused_on_resume_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"run": {"store": "s", "epochz": 1}}))
    with pytest.raises(BadConfigError, match=r"config.json \(run\): unknown field\(s\) epochz"):
        saved_run(StudentRun, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"meta": {}}))  # saved before runs were
    assert saved_run(StudentRun, tmp_path) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_store(tmp_path_factory.mktemp("tiny"), views=1, num_train=8, num_val=2)
    torch.set_num_threads(n)


def test_resume_continues_the_saved_run_and_logs_what_changed(tiny, tmp_path):
    """`--resume` reads the run from config.json: options not given again keep their saved
    values (here --losses reg, not the default five terms); a changed one is logged."""
    out = tmp_path / "run"
    args = ["train-student", "--store", tiny["store"], "--model", "distilpose_tiny", "--out"]
    args += [str(out), "--batch-size", "8", "--device", "cpu", "--workers", "0"]
    first = CliRunner().invoke(cli.app, [*args, "--losses", "reg", "--epochs", "1"])
    assert first.exit_code == 0, first.output
    saved = saved_run(StudentRun, out)
    assert saved.losses == "reg" and saved.epochs == 1 and not saved.resume

    again = CliRunner().invoke(cli.app, [*args, "--epochs", "2", "--lr", "0.002", "--resume"])
    assert again.exit_code == 0, again.output
    run = saved_run(StudentRun, out)
    assert run == saved.replace(epochs=2, lr=0.002, resume=True)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == ["0", "1"]
    assert "loss_kt" not in rows[-1]  # still the reg-only run
    log = (out / "train.log").read_text()
    assert "resume: run differs from the one saved in config.json in ['epochs', 'lr']" in log


def test_resume_on_a_changed_store_is_still_refused(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["train-student", "--model", "distilpose_tiny", "--out", str(out), "--batch-size"]
    args += ["8", "--device", "cpu", "--workers", "0", "--epochs", "1"]
    assert CliRunner().invoke(cli.app, [*args, "--store", tiny["store"]]).exit_code == 0
    other = build_tiny_store(tmp_path / "other", views=1, num_train=8, num_val=2, seed=1)
    result = CliRunner().invoke(cli.app, [*args, "--store", other["store"], "--resume"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "the store changed" in result.output
    assert "--allow-store-change" in result.output


def test_a_cli_run_without_warmup_iters_gets_the_capped_warmup(tiny, tmp_path):
    """No --warmup-iters: the run keeps StudentRun's None, and the trainer warms up for the
    paper's 500 steps capped at a tenth of the run (here 3 epochs x 4 batches: 1 step)."""
    out = tmp_path / "run"
    args = ["train-student", "--store", tiny["store"], "--model", "distilpose_tiny", "--out"]
    args += [str(out), "--batch-size", "2", "--epochs", "3", "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(cli.app, [*args, "--losses", "reg"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "config.json").read_text())
    assert doc["run"]["warmup_iters"] is None
    steps = 3 * 8 // 2
    assert doc["train_config"]["warmup_iters"] == min(500, steps // 10) == 1
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["kind"] == "epoch"]
    # after the first epoch (4 steps) the lr is the run's (with 500 warmup steps: 1e-3 * 4/500)
    assert float(rows[0]["lr"]) == pytest.approx(1e-3)


# ------------------------------------------------------------------ types and ranges (issue 27)

BAD_FIELDS = [  # (config file line, the error after "error: <file>: ")
    ('epochs = "ten"', "StudentRun.epochs: got 'ten' (str); expected an integer"),
    ("batch_size = -3", "StudentRun.batch_size: got -3; expected an integer of at least 1"),
    ("batch_size = 0", "StudentRun.batch_size: got 0; expected an integer of at least 1"),
    ("lr = -1", "StudentRun.lr: got -1; expected a finite number > 0"),
    ("lr = nan", "StudentRun.lr: got nan; expected a finite number > 0"),
    ("workers = -3", "StudentRun.workers: got -3; expected an integer of at least 0"),
    (
        "epochs = 9223372036854775808",
        "StudentRun.epochs: got 9223372036854775808; expected an integer within int64",
    ),
    ("ema = 1.5", "StudentRun.ema: got 1.5; expected a decay between 0 and 1"),
    ("accum_steps = 0", "StudentRun.accum_steps: got 0; expected an integer of at least 1"),
]


@pytest.mark.reliability(
    case="train-student --config with a field of the wrong type or out of range",
    outcome="one error line naming the file, the field and what was expected; exit 1",
)
@pytest.mark.parametrize("line, error", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_bad_config_field_is_one_error_line(tmp_path, line, error):
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    out = tmp_path / "o"
    args = ["train-student", "--config", str(config), "--store", "s", "--out", str(out)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: {error}"), lines
    assert not out.exists()


def test_bad_fields_on_the_command_line_and_in_json_are_one_error_line(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    args = ["train-teacher", "--ann", str(ann), "--images", str(tmp_path), "--out", "o"]
    result = CliRunner().invoke(cli.app, [*args, "--batch-size", "0"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: TeacherRun.batch_size: got 0; expected an integer of at least 1"
    )
    good = StudentRun("s").to_dict()
    for change, message in (
        ({"epochs": True}, r"StudentRun.epochs: got True \(bool\); expected an integer"),
        ({"lr_scale": "sqrt"}, "StudentRun.lr_scale: got 'sqrt'; expected one of linear, none"),
        ({"store": 3}, r"StudentRun.store: got 3 \(int\); expected a string \(or null\)"),
    ):
        with pytest.raises(BadConfigError, match=message):
            StudentRun.from_dict({**good, **change})
    teacher = TeacherRun("m", "a", "i", "o").to_dict()
    with pytest.raises(BadConfigError, match="recipe: unknown key.s. flip; expected keys among"):
        TeacherRun.from_dict({**teacher, "recipe": {"flip": 0.5}})
