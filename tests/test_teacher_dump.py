"""Stage 1: train a tiny teacher, dump it into a store; kills, shards and extra views are exact."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.data import (
    AugmentRecipe,
    crop_digest,
    load_coco_instances,
    make_demo_data,
    normalize,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.errors import BadCheckpointError, StoreMismatchError
from distilpose.geometry import Geometry
from distilpose.models import build_from_checkpoint, build_model, save_checkpoint
from distilpose.training.engine import TrainConfig, Trainer
from distilpose.training.losses import HeatmapLoss
from distilpose.training.runs import DumpRun, TeacherRun
from store import StoreReader, array_specs, store_verify
from store.pixels import decode_crop
from teacher_dump.dump import dump_teacher
from teacher_dump.train import TEACHER_RECIPE, HeatmapCrops, heatmap_task, train_teacher

# 40 instances, 2 views, units of 8 samples: 5 units per view, 10 in all.
DUMP = dict(views=2, seed=1, batch_size=3, workers=0, device="cpu", chunk_samples=8, shard_chunks=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # also makes forking a child that runs torch safe
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_demo_data(tmp_path_factory.mktemp("demo"), num_train=40, num_val=10)


def save_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, build_model("tokenpose_tiny"), meta={"role": "teacher"})
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth", seed=0)


def dump(teacher, data, out, **kw) -> dict:
    return dump_teacher(
        DumpRun(teacher, data["train_ann"], data["train_images"], out, **{**DUMP, **kw})
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher, data) -> Path:
    """An uninterrupted 2-view dump, with DataLoader worker processes and another batch split
    across workers than the runs it is compared with (workers=0)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    summary = dump(teacher, data, out, workers=2)
    assert summary["samples"] == 80 and summary["units"] == 10 and summary["skipped"] == 0
    return out


def read_all(path: Path) -> dict[str, np.ndarray]:
    reader = StoreReader.open(path)
    assert reader.complete_mask().all(), f"{path} is incomplete"
    total = reader.layout.num_slots(reader.meta.views)
    return reader.read_slots(0, total, fields=list(array_specs(reader.meta)))


def assert_same_store(a: Path, b: Path) -> None:
    xa, xb = read_all(a), read_all(b)
    assert xa.keys() == xb.keys()
    for name in xa:
        assert xa[name].dtype == xb[name].dtype, name
        assert np.array_equal(xa[name], xb[name]), f"array '{name}' differs"


def markers(store: Path) -> int:
    d = store / "complete"
    return len([f for f in os.listdir(d) if f.startswith("u")]) if d.is_dir() else 0


def stored_meta_exists(store: Path) -> bool:
    f = store / "zarr.json"
    return f.is_file() and "distilpose_store" in f.read_text(errors="ignore")


def run_in_child(target, *args, **kwargs) -> mp.Process:
    p = mp.get_context("fork").Process(target=target, args=args, kwargs=kwargs, daemon=True)
    p.start()
    return p


# ---- dump --------------------------------------------------------------------------------


def test_dump_contents(reference, data):
    x = read_all(reference)
    reader = StoreReader.open(reference)
    real = x["instance"] >= 0
    assert (
        real.sum() == 80 and reader.meta.views == 2 and reader.meta.teacher_name == "tokenpose_tiny"
    )
    assert x["heatmaps"].shape[1:] == (17, 32, 24) and x["visual_tokens"].shape[1:] == (64, 64)
    assert (
        np.abs(x["heatmaps"][real].astype(np.float32)).sum() > 0
        and (x["crop_digest"][real] != 0).any(1).all()
    )
    # every instance once per view, and the spec names the slot's instance and view
    views = reader.layout.slot_views(np.arange(len(real)))
    for v in (0, 1):
        assert sorted(x["instance"][real & (views == v)]) == list(range(40))
    assert np.array_equal(x["spec"][real, 0], x["instance"][real])
    assert np.array_equal(x["spec"][real, 1], views[real])
    # the two views are different crops of the same people
    assert not np.array_equal(x["spec"][views == 0][:5], x["spec"][views == 1][:5])


def test_dump_matches_the_teacher_forward(reference, teacher, data):
    """Spot check: the store keeps the crop's JPEG, and its heatmaps are the teacher's output on
    the decoded crop; the digest is of those decoded pixels."""
    x = read_all(reference)
    assert StoreReader.open(reference).meta.pixels == "jpeg"  # the default
    slot = int(np.flatnonzero(x["instance"] >= 0)[7])
    inst = load_coco_instances(data["train_ann"], data["train_images"], train=True)[
        int(x["instance"][slot])
    ]
    spec = sample_crop_spec(
        inst, AugmentRecipe(), seed=1, view=int(x["spec"][slot, 1]), input_size=(96, 128)
    )
    crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, (96, 128))
    seen = decode_crop(x["pixels"][slot], "jpeg", (96, 128))
    assert crop_digest(seen) == x["crop_digest"][slot].tobytes()
    assert np.abs(seen.astype(int) - crop.image).mean() < 3  # a JPEG of the rendered crop
    model, _ = build_from_checkpoint(teacher)
    with torch.no_grad():
        hm = model(normalize(seen)[None]).heatmaps[0].numpy()
    np.testing.assert_allclose(x["heatmaps"][slot].astype(np.float32), hm, atol=2e-3, rtol=1e-2)
    np.testing.assert_array_equal(x["keypoints"][slot], crop.keypoints)


@pytest.mark.reliability(
    case="dump-teacher SIGKILLed once after 3 of 10 units",
    outcome="resume computes only the pending units; store equals the reference",
)
def test_killed_dump_resumes_to_the_same_store(tmp_path, reference, teacher, data, record_property):
    out = tmp_path / "store"
    p = run_in_child(dump, teacher, data, out)
    deadline = time.time() + 60
    while markers(out) < 3 and p.is_alive() and time.time() < deadline:
        time.sleep(0.005)
    assert p.is_alive(), "the dump finished before it could be killed"
    p.kill()  # SIGKILL
    p.join()
    assert p.exitcode == -9
    done = markers(out)
    assert 3 <= done < 10, f"expected a partial store, found {done} complete units"
    summary = dump(teacher, data, out)
    assert summary["units"] == 10 - done  # only the pending units were computed
    assert_same_store(out, reference)  # pixels included
    check = store_verify(out)  # every stored crop decodes to the pixels the teacher saw
    assert check["crops"] == "decoded" and check["ok"] == check["checked"] == 80
    record_property("kills_survived", 1)


def test_two_shards_in_two_processes_equal_one(tmp_path, reference, teacher, data):
    out = tmp_path / "store"
    procs = [run_in_child(dump, teacher, data, out, shard=(0, 2))]
    # Shard 1 starts once shard 0 has created the store: creating one store from two processes
    # at the same instant is the store's lock's business (store/writer.py), not the dump's.
    deadline = time.time() + 30
    while not stored_meta_exists(out) and time.time() < deadline:
        time.sleep(0.005)
    procs.append(run_in_child(dump, teacher, data, out, shard=(1, 2)))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert_same_store(out, reference)


def test_raising_views_keeps_view_0(tmp_path, reference, teacher, data):
    out = tmp_path / "store"
    assert dump(teacher, data, out, views=1)["units"] == 5
    view0 = {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file() and "/c/" in str(f)}
    assert len(view0) >= 5
    assert dump(teacher, data, out, views=2)["units"] == 5  # only view 1's units
    for f, b in view0.items():
        assert f.read_bytes() == b, f"{f} changed"
    assert_same_store(out, reference)


@pytest.mark.reliability(
    case="dump into a store of another teacher or seed, or with a student",
    outcome="StoreMismatchError naming the field; BadCheckpointError 'expected a teacher'",
)
def test_another_teacher_seed_or_a_student_is_refused(tmp_path, reference, teacher, data):
    other = save_teacher(tmp_path / "other.pth", seed=1)
    with pytest.raises(StoreMismatchError, match="teacher_sha256"):
        dump(other, data, reference)
    with pytest.raises(StoreMismatchError, match="seed"):
        dump(teacher, data, reference, seed=2)
    student = tmp_path / "student.pth"
    save_checkpoint(student, build_model("distilpose_tiny"), meta={"role": "student"})
    with pytest.raises(BadCheckpointError, match="expected a teacher"):
        dump(student, data, tmp_path / "store")


@pytest.mark.reliability(
    case="missing or corrupt image during dump-teacher",
    outcome="slot skipped, warned and counted in the summary; stored invalid, never zero-filled",
)
def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path, teacher, data, caplog):
    root = tmp_path / "images"
    shutil.copytree(data["train_images"], root)
    insts = load_coco_instances(data["train_ann"], root, train=True)
    gone, broken = Path(insts[0].image_path), Path(insts[-1].image_path)
    gone.unlink()
    broken.write_bytes(b"not a jpeg")
    bad = {i.index for i in insts if i.image_path in (str(gone), str(broken))}
    out = tmp_path / "store"
    with caplog.at_level("WARNING", logger="distilpose.dump"):
        summary = dump_teacher(
            DumpRun(teacher, data["train_ann"], root, out, **{**DUMP, "views": 1})
        )
    assert summary["skipped"] == len(bad) >= 2
    assert sum("skipped slot" in r.message for r in caplog.records) == len(bad)
    x = read_all(out)
    skipped = np.isin(x["instance"], list(bad))
    assert skipped.sum() == len(bad)
    # marked invalid, not plausible zeros: no weights, an all-zero digest, zero outputs
    assert not x["weights"][skipped].any() and not x["crop_digest"][skipped].any()
    assert not x["heatmaps"][skipped].any()
    ok = (x["instance"] >= 0) & ~skipped
    assert x["crop_digest"][ok].any(1).all()


# ---- train ---------------------------------------------------------------------------------


def test_train_teacher_runs_and_saves_a_teacher(tmp_path, data):
    out = tmp_path / "run"
    run = TeacherRun(
        "tokenpose_tiny",
        data["train_ann"],
        data["train_images"],
        out,
        epochs=2,
        batch_size=8,
        device="cpu",
        workers=2,
        log_every=2,
        model_overrides={"depth": 1},
    )
    summary = train_teacher(run)
    assert summary["epochs"] == 2 and summary["steps"] == 10
    model, meta = build_from_checkpoint(out / "teacher.pth")
    assert meta["role"] == "teacher" and meta["model"] == "tokenpose_tiny"
    assert model.config.depth == 1 and meta["recipe"] == TEACHER_RECIPE.to_dict()
    for name in ("last.pth", "metrics.csv", "config.json", "loss_curves.png", "train.log"):
        assert (out / name).is_file(), name
    # the run is resumable and already finished: resume does nothing more
    again = train_teacher(run.replace(workers=0, resume=True))
    assert again["steps"] == 10


def test_teacher_overfits_a_fixed_batch(tmp_path, data):
    """The heatmap task + trainer learn: the loss on one repeated batch falls steadily."""
    insts = load_coco_instances(data["train_ann"], data["train_images"], train=True)[:8]
    crops = HeatmapCrops(insts, TEACHER_RECIPE, 0, Geometry((96, 128), (24, 32)))
    batch = {
        k: torch.stack([crops[i][k] for i in range(8)])
        for k in ("images", "heatmaps", "target_weights")
    }
    assert batch["target_weights"].sum() > 0 and batch["heatmaps"].max() > 0.5
    # Predicting all zeros already scores this; learning the peaks must do better.
    zeros = HeatmapLoss()(
        torch.zeros_like(batch["heatmaps"]), batch["heatmaps"], batch["target_weights"]
    )["loss"].item()
    losses = []

    def task(model, b):
        out = heatmap_task(HeatmapLoss())(model, b)
        losses.append(float(out["loss"].detach()))
        return out

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=8, lr=3e-3, warmup_iters=1, device="cpu", log_every=5)
    Trainer(
        build_model("tokenpose_tiny", depth=1), task, lambda e: [batch] * 5, cfg, tmp_path, {}
    ).fit()
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert np.mean(losses[-5:]) < 0.92 * zeros, (zeros, losses)
