"""Student training from a teacher store: data path, view rule, losses wiring, online mode.

The store here is built by `build_tiny_store` below (a randomly initialised tiny teacher run on
demo data, written through `store.StoreWriter`): plumbing needs a store, not a good teacher, and
the student stage must not import `teacher_dump`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distilpose.data import (
    AugmentRecipe,
    annotation_digest,
    crop_digest,
    load_coco_instances,
    make_demo_data,
    normalize,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.errors import BadConfigError, StoreMismatchError
from distilpose.models import build_from_checkpoint, build_model, save_checkpoint
from distilpose.training.losses import DistillationLoss, parse_losses
from distilpose.training.runs import StudentRun
from store import StoreMeta, StoreWriter
from student_train.data import StudentBatches, target_fields, view_for_epoch
from student_train.train import build_task, load_teacher, resolve_warmup, train_student

ALL = "reg,kt,vt,sh,cs"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_tiny_store(
    root: Path,
    *,
    views: int = 2,
    num_train: int = 30,
    num_val: int = 10,
    seed: int = 0,
    mode: str = "fp16",
) -> dict:
    """Demo data -> random tiny teacher -> store with `views` views; returns the paths."""
    root = Path(root)
    paths = make_demo_data(root / "data", num_train=num_train, num_val=num_val, seed=seed)
    torch.manual_seed(seed)
    teacher = build_model("tokenpose_tiny").eval()
    ckpt = root / "teacher.pth"
    save_checkpoint(ckpt, teacher, meta={"role": "teacher", "model": "tokenpose_tiny"})
    cfg = teacher.config
    w, h = cfg.input_size
    ann, images = str(paths["train_ann"]), str(paths["train_images"])
    instances = load_coco_instances(ann, images, train=True, aspect_ratio=w / h)
    recipe = AugmentRecipe()
    meta = StoreMeta(
        teacher_name=cfg.name,
        teacher_sha256=file_sha256(ckpt),
        num_instances=len(instances),
        views=views,
        seed=seed,
        geometry=cfg.geometry,
        token_dim=cfg.dim,
        num_keypoints=cfg.num_keypoints,
        recipe=recipe.to_dict(),
        ann_digest=annotation_digest(ann),
        ann_file=ann,
        image_root=images,
        chunk_samples=8,
        shard_chunks=1,
        mode=mode,
        extra={"teacher_ckpt": str(ckpt)},  # as dump-teacher records it
    )
    store = root / "store.zarr"
    writer = StoreWriter.create_or_open(store, meta)
    for unit in writer.pending_units():
        view = writer.unit_view(unit)
        specs, crops, kpts, wts = [], [], [], []
        idx = writer.unit_instances(unit)
        for i in idx:
            inst = instances[int(i)]
            spec = sample_crop_spec(inst, recipe, seed, view, (w, h))
            crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, (w, h))
            specs.append(spec.to_array())
            crops.append(crop.image)
            kpts.append(crop.keypoints)
            wts.append(crop.weights)
        with torch.no_grad():
            out = teacher(normalize(np.stack(crops)))
        writer.write_unit(
            unit,
            {
                "spec": np.stack(specs),
                "instance": np.asarray(idx, dtype=np.int64),
                "image_id": np.array([instances[int(i)].image_id for i in idx]),
                "ann_id": np.array([instances[int(i)].ann_id for i in idx]),
                "keypoints": np.stack(kpts),
                "weights": np.stack(wts),
                "crop_digest": [crop_digest(c) for c in crops],
                "heatmaps": out.heatmaps.numpy(),
                "keypoint_tokens": out.keypoint_tokens.numpy(),
                "visual_tokens": out.visual_tokens.numpy(),
            },
        )
    return {**paths, "store": str(store), "teacher": str(ckpt), "num_instances": len(instances)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    return build_tiny_store(tmp_path_factory.mktemp("tiny"))


def epoch_batches(tiny: dict, epoch: int, **kw) -> list[dict]:
    kw.setdefault("workers", 0)
    return list(StudentBatches(tiny["store"], batch_size=8, **kw)(epoch))


def test_view_rule_and_fields():
    assert [view_for_epoch(e, 3) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert view_for_epoch(5, 1) == 0
    with pytest.raises(ValueError):
        view_for_epoch(0, 0)
    assert target_fields(["reg"]) == ()
    assert target_fields(["reg", "cs", "sh", "vt"]) == ("heatmaps", "visual_tokens")


def test_warmup_is_capped_only_for_short_runs():
    assert resolve_warmup(None, 700_000) == 500  # the paper's recipe on a full COCO run
    assert resolve_warmup(None, 300) == 30  # a demo run is not mostly warmup
    assert resolve_warmup(40, 300) == 40  # explicit wins


def test_epochs_read_view_epoch_mod_views(tiny):
    n = tiny["num_instances"]
    for epoch in range(3):
        batches = epoch_batches(tiny, epoch)
        views = torch.cat([b["view"] for b in batches])
        assert (views == epoch % 2).all(), epoch
        seen = torch.cat([b["instance"] for b in batches]).sort().values
        assert seen.tolist() == list(range(n))  # every instance exactly once per epoch
    b = batches[0]
    assert b["images"].shape == (8, 3, 128, 96) and b["images"].dtype == torch.float32
    assert b["coords"].shape == (8, 17, 2) and b["weights"].shape == (8, 17)
    assert b["heatmaps"].shape == (8, 17, 32, 24) and b["heatmaps"].dtype == torch.float32
    assert b["keypoint_tokens"].shape == (8, 17, 64) and b["visual_tokens"].shape == (8, 64, 64)
    vis = b["weights"] > 0
    assert vis.any() and ((b["coords"][vis] >= 0) & (b["coords"][vis] <= 1)).all()


def test_views_differ_and_order_is_seeded(tiny):
    a0, a1 = epoch_batches(tiny, 0), epoch_batches(tiny, 1)
    first = {int(i): img for b in a0 for i, img in zip(b["instance"], b["images"], strict=True)}
    second = {int(i): img for b in a1 for i, img in zip(b["instance"], b["images"], strict=True)}
    assert any(not torch.equal(first[i], second[i]) for i in first)  # view 1 is another crop
    again = epoch_batches(tiny, 0)
    assert [b["instance"].tolist() for b in again] == [b["instance"].tolist() for b in a0]
    other_seed = epoch_batches(tiny, 0, seed=1)
    assert [b["instance"].tolist() for b in other_seed] != [b["instance"].tolist() for b in a0]


def test_reg_only_reads_no_teacher_outputs(tiny):
    b = epoch_batches(tiny, 0, losses=["reg"])[0]
    assert not {"heatmaps", "keypoint_tokens", "visual_tokens"} & set(b)


def test_worker_count_does_not_change_batches(tiny):
    one = epoch_batches(tiny, 1, workers=0)
    two = epoch_batches(tiny, 1, workers=2)
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["instance"], b["instance"])
        assert torch.equal(a["images"], b["images"])
        assert torch.equal(a["heatmaps"], b["heatmaps"])


@pytest.mark.reliability(
    case="images changed since the dump",
    outcome="StoreMismatchError: the crop differs from the stored digest",
)
def test_changed_images_fail_the_digest_check(tiny, tmp_path):
    moved = tmp_path / "images"
    shutil.copytree(tiny["train_images"], moved)
    for p in moved.glob("*.jpg"):  # same names, other pixels: a store/dataset mismatch
        cv2.imwrite(str(p), 255 - cv2.imread(str(p)))
    with pytest.raises(StoreMismatchError, match="other crop"):
        epoch_batches(tiny, 0, images=str(moved))
    assert epoch_batches(tiny, 0, images=str(moved), verify_digest=False)  # opt-out


def test_online_batches_see_the_same_pixels(tiny):
    stored = epoch_batches(tiny, 1)
    online = epoch_batches(tiny, 1, online=True)
    assert len(stored) == len(online)
    for s, o in zip(stored, online, strict=True):
        assert torch.equal(s["instance"], o["instance"])
        assert torch.equal(s["images"], o["images"])
        assert torch.allclose(s["coords"], o["coords"]) and torch.equal(s["weights"], o["weights"])
        assert "heatmaps" not in o


def test_online_teacher_gives_the_stored_targets(tiny):
    """The loss from the online teacher equals the loss from its stored (fp16) outputs."""
    batch = epoch_batches(tiny, 0)[0]
    student = build_model("distilpose_tiny").eval()
    loss_fn = DistillationLoss(parse_losses(ALL), geometry=student.config.geometry)
    teacher = load_teacher(tiny["teacher"], student.config)
    with torch.no_grad():
        from_store = build_task(loss_fn)(student, batch)
        online = {k: v for k, v in batch.items() if k not in ("heatmaps", "visual_tokens")}
        from_teacher = build_task(loss_fn, teacher)(student, online)
    for key in ("loss_reg", "loss_kt", "loss_vt", "loss_sh", "loss_cs"):
        assert torch.allclose(from_store[key], from_teacher[key], rtol=1e-2, atol=1e-5), key


def read_metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_train_student_all_losses_and_baseline(tiny, tmp_path):
    runs = {}
    for name, losses in (("all", ALL), ("reg", "reg")):
        out = tmp_path / name
        summary = train_student(
            StudentRun(
                tiny["store"], "distilpose_tiny", out, losses=losses, epochs=2, batch_size=8,
                device="cpu", workers=0, log_every=2,
            )
        )  # fmt: skip
        runs[name] = (out, summary)
        assert summary["epochs"] == 2 and summary["checkpoint"] == str(out / "student.pth")
        for f in ("student.pth", "last.pth", "config.json", "metrics.csv", "loss_curves.png"):
            assert (out / f).is_file(), f
        model, meta = build_from_checkpoint(out / "student.pth")
        assert meta["role"] == "student" and meta["model"] == "distilpose_tiny"
        assert meta["losses"] == list(parse_losses(losses))
        assert meta["store"] == tiny["store"]
        assert meta["teacher_sha256"] == file_sha256(Path(tiny["teacher"]))
        config = json.loads((out / "config.json").read_text())
        replay = config["meta"]["student_config"]
        assert replay["losses"] == losses and replay["views"] == 2
        assert replay["train"]["epochs"] == 2
    all_rows = read_metrics(runs["all"][0])
    reg_rows = read_metrics(runs["reg"][0])
    epochs = [r for r in all_rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(float(r["loss_kt"]) > 0 for r in epochs)
    assert all(float(r["loss_sh"]) > 0 and float(r["loss_cs"]) >= 0 for r in epochs)
    assert "loss_kt" not in reg_rows[0] and float(reg_rows[-1]["loss_reg"]) > 0
    # Same seed, same data: the two runs start from the same student and differ by the losses.
    a, _ = build_from_checkpoint(runs["all"][0] / "student.pth")
    b, _ = build_from_checkpoint(runs["reg"][0] / "student.pth")
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.reliability(
    case="train-student with a student whose sizes do not fit the store",
    outcome="StoreMismatchError naming the size, before anything is written",
)
def test_student_that_does_not_fit_the_store_is_refused(tiny, tmp_path):
    with pytest.raises(StoreMismatchError, match="input_size"):
        train_student(
            StudentRun(tiny["store"], "distilpose_s", tmp_path / "s", epochs=1, device="cpu")
        )
    with pytest.raises(StoreMismatchError, match="token dim"):
        train_student(
            StudentRun(
                tiny["store"], "distilpose_tiny", tmp_path / "d", epochs=1, device="cpu",
                model_overrides={"dim": 32, "heads": 2},
            )
        )  # fmt: skip
    with pytest.raises(BadConfigError, match="unknown loss"):
        train_student(StudentRun(tiny["store"], "distilpose_tiny", tmp_path / "l", losses="reg,kd"))
    assert not (tmp_path / "s" / "last.pth").exists()


def test_teacher_online_mode_trains(tiny, tmp_path):
    out = tmp_path / "online"
    summary = train_student(
        StudentRun(
            tiny["store"], "distilpose_tiny", out, epochs=1, batch_size=8, device="cpu", workers=0,
            teacher_online=tiny["teacher"],
        )
    )  # fmt: skip
    _, meta = build_from_checkpoint(summary["checkpoint"])
    assert meta["teacher_online"] == tiny["teacher"]
    rows = [r for r in read_metrics(out) if r["kind"] == "epoch"]
    assert float(rows[0]["loss_vt"]) > 0 and float(rows[0]["loss_sh"]) > 0
