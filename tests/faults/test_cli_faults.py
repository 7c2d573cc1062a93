"""What a user sees at the command line for faults and untrusted files (issue 8): one line
`error: ...` naming the file and what was expected, exit code 1, and nothing already written lost.

Runs `cli.app` in-process with typer's CliRunner on a tiny store (8 demo people, one view).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_student_train import build_tiny_store  # noqa: E402

import cli  # noqa: E402
from distilpose.models import build_model, save_checkpoint  # noqa: E402
from store import StoreReader  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = build_tiny_store(tmp_path_factory.mktemp("tiny"), views=1, num_train=8, num_val=4)
    student = Path(paths["store"]).parent / "student.pth"
    save_checkpoint(student, build_model("distilpose_tiny"), meta={"role": "student"})
    yield {**paths, "student": str(student)}
    torch.set_num_threads(n)


def one_line_error(result) -> str:
    """The single line a failing command printed; asserts exit code 1 and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def train_student(tiny: dict, out: Path, *extra: str):
    args = ["train-student", "--store", tiny["store"], "--model", "distilpose_tiny"]
    args += ["--out", str(out), "--batch-size", "8", "--device", "cpu", "--workers", "0"]
    return runner.invoke(cli.app, [*args, *extra])


# ---- (b) full or read-only disk for the training output --------------------------------------


def _disk_full(monkeypatch) -> str:
    def save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # the disk fills up in the middle of the file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    return os.strerror(errno.ENOSPC)


def _read_only(monkeypatch) -> str:
    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's own name)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return os.strerror(errno.EROFS)


@pytest.mark.reliability(
    case="train-student --resume onto a full or read-only disk",
    outcome="one line naming last.pth, exit 1; the previous last.pth intact; a rerun finishes",
)
@pytest.mark.parametrize("fault", [_disk_full, _read_only], ids=["disk full", "read-only"])
def test_full_or_read_only_disk_during_training(tiny, tmp_path, monkeypatch, fault):
    run = tmp_path / "run"
    assert train_student(tiny, run, "--epochs", "1").exit_code == 0
    before = (run / "last.pth").read_bytes()
    reason = fault(monkeypatch)
    line = one_line_error(train_student(tiny, run, "--epochs", "2", "--resume"))
    assert str(run / "last.pth") in line and reason in line, line
    monkeypatch.undo()
    assert (run / "last.pth").read_bytes() == before  # not truncated, not replaced
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    # once there is room again, the same command continues from the intact checkpoint
    assert train_student(tiny, run, "--epochs", "2", "--resume").exit_code == 0
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2


@pytest.mark.reliability(
    case="train-student --out below a file (cannot make the run folder)",
    outcome="one line naming the run folder, exit 1, before any training",
)
def test_run_folder_that_cannot_be_made(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_line_error(train_student(tiny, blocker / "run", "--epochs", "1"))
    assert f"{blocker / 'run'}: cannot write the run directory" in line, line


# ---- (c) configuration files are data, never code --------------------------------------------

TAGS = {
    "os.system": "!!python/object/apply:os.system ['touch {marker}']",
    "subprocess.Popen": "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
}


@pytest.mark.reliability(
    case="YAML config with a code-running python tag",
    outcome="one line 'not valid YAML' naming the file and line, exit 1; nothing runs",
)
@pytest.mark.parametrize(
    "command,tag",
    [
        pytest.param(c, t, id=f"{t} in {c} --config")
        for c in ("make-demo-data", "train-student")
        for t in sorted(TAGS)
    ],
)
def test_yaml_config_with_code_is_refused(tmp_path, command, tag):
    marker = tmp_path / "ran"
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {TAGS[tag].format(marker=marker)}\n")
    args = [command, "--config", str(config)]
    args += [str(tmp_path / "d")] if command == "make-demo-data" else []
    line = one_line_error(runner.invoke(cli.app, args))
    assert line.startswith(f"error: {config}: not valid YAML") and "line 1" in line, line
    assert not marker.exists()


# ---- (d) NaN/Inf from a teacher --------------------------------------------------------------


@pytest.mark.reliability(
    case="dump-teacher with a teacher whose outputs are NaN",
    outcome="refused at write time: one line naming store, slot, instance and array; "
    "nothing marked complete",
)
def test_nan_teacher_is_refused_at_write_time(tiny, tmp_path):
    teacher = build_model("tokenpose_tiny")
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("nan"))
    ckpt = tmp_path / "nan_teacher.pth"
    save_checkpoint(ckpt, teacher, meta={"role": "teacher"})
    out = tmp_path / "store"
    args = ["dump-teacher", "--teacher", str(ckpt), "--ann", tiny["train_ann"]]
    args += ["--images", tiny["train_images"], "--out", str(out), "--device", "cpu"]
    line = one_line_error(runner.invoke(cli.app, [*args, "--workers", "0", "--batch-size", "4"]))
    assert line.startswith(f"error: {out}: slot ") and "(instance " in line, line
    assert "'heatmaps' holds NaN/Inf" in line and "refused at write time" in line, line
    assert not StoreReader.open(out).complete_mask().any()
    assert not list((out / "complete").glob("u*.json"))


# ---- (e) detections of images the annotation file does not have -----------------------------


@pytest.mark.reliability(
    case="eval --dets for images not in the annotation file",
    outcome="one line naming the detections file and image_id, exit 1",
)
def test_detections_of_unknown_images(tiny, tmp_path):
    dets = tmp_path / "dets.json"
    dets.write_text(
        json.dumps([{"image_id": 987654, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9}])
    )
    args = ["eval", "--checkpoint", tiny["student"], "--ann", tiny["val_ann"]]
    args += ["--images", tiny["val_images"], "--dets", str(dets), "--device", "cpu"]
    line = one_line_error(runner.invoke(cli.app, args))
    assert f"{dets}: detection 0 is for image_id 987654" in line
    assert "not in the annotation file" in line


# ---- (f) a checkpoint of another model -------------------------------------------------------


def _foreign(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "resnet.pth"  # some other network's weights
    torch.save({"state_dict": {"fc.weight": torch.zeros(10, 5), "fc.bias": torch.zeros(10)}}, path)
    return path, "the keys fit no built-in model"


def _swapped(tmp_path: Path) -> tuple[Path, str]:
    """Our own format saying 'distilpose_tiny' around a teacher's weights."""
    path = tmp_path / "swapped.pth"
    save_checkpoint(path, build_model("distilpose_tiny"), meta={"role": "student"})
    obj = torch.load(path, weights_only=True)
    obj["state_dict"] = build_model("tokenpose_tiny").state_dict()
    torch.save(obj, path)
    return path, "'distilpose_tiny'"


@pytest.mark.reliability(
    case="eval with a checkpoint of another model",
    outcome="one line naming the file and why it does not fit, exit 1",
)
@pytest.mark.parametrize("make", [_foreign, _swapped], ids=["foreign network", "wrong weights"])
def test_eval_with_another_models_checkpoint(tiny, tmp_path, make):
    ckpt, expected = make(tmp_path)
    args = ["eval", "--checkpoint", str(ckpt), "--ann", tiny["val_ann"]]
    line = one_line_error(
        runner.invoke(cli.app, [*args, "--images", tiny["val_images"], "--device", "cpu"])
    )
    assert line.startswith(f"error: {ckpt}: ") and expected in line, line


@pytest.mark.reliability(
    case="train-student --teacher-online with a checkpoint of another model",
    outcome="one line naming the file and what was expected, exit 1; no run written",
)
@pytest.mark.parametrize("which", ["student", "foreign network"])
def test_teacher_online_with_another_models_checkpoint(tiny, tmp_path, which):
    if which == "student":
        ckpt, expected = tiny["student"], "holds the student 'distilpose_tiny'; expected a teacher"
    else:
        ckpt, expected = _foreign(tmp_path)
    out = tmp_path / "run"
    result = train_student(tiny, out, "--epochs", "1", "--teacher-online", str(ckpt))
    line = one_line_error(result)
    assert line.startswith(f"error: {ckpt}: ") and expected in line, line
    assert not (out / "last.pth").exists()
