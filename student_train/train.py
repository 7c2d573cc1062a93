"""`train-student`: a regression student trained from the teacher store (paper Eq. 7).

The student reads the teacher's heatmaps and tokens from the store and never runs the teacher,
unless `teacher_online` names a teacher checkpoint (the official method: the teacher runs on
every batch; kept to compare speed and results). The loop itself is the shared
`distilpose.engine.Trainer`; this module only wires data, loss and model into it.

Recipe (the paper's): Adam, lr 1e-3, linear warmup 500 iterations, x0.1 at 2/3 and 13/15 of the
epochs; epoch e trains on the store's view `e mod V`. One deviation for short runs: by default
the warmup is capped at a tenth of all iterations, so a demo run of a few hundred steps is not
mostly warmup (a full COCO run has ~700k steps, where the cap never bites).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from distilpose.engine import TrainConfig, Trainer, resolve_device, world
from distilpose.errors import (
    BadCheckpointError,
    BadConfigError,
    StoreFormatError,
    StoreMismatchError,
)
from distilpose.limits import load_json
from distilpose.losses import LOSS_NAMES, DistillationLoss, parse_losses
from distilpose.models import build_from_checkpoint, build_model, save_checkpoint
from store import StoreReader
from store.schema import TEACHER_OUTPUTS
from student_train.data import OnlineBatches, StudentBatches, check_targets

PAPER_WARMUP_ITERS = 500  # paper: linear warmup over the first 500 iterations


def resolve_warmup(warmup_iters: int | None, total_iters: int) -> int:
    """None = the paper's 500, capped at a tenth of the run (short runs stay mostly trained)."""
    if warmup_iters is not None:
        return int(warmup_iters)
    return max(1, min(PAPER_WARMUP_ITERS, total_iters // 10))


def teacher_targets(teacher: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the teacher (online mode): heatmaps [B,K,Hh,Wh] and, if it has them, tokens
    [B,K,D], [B,P,D]."""
    with torch.no_grad():
        out = teacher(images)
    names = ("heatmaps", "keypoint_tokens", "visual_tokens")
    return {n: getattr(out, n).float() for n in names if getattr(out, n) is not None}


def build_task(
    loss_fn: nn.Module, teacher: nn.Module | None = None
) -> Callable[[nn.Module, dict], dict]:
    """The Trainer's task: student forward + Eq. 7 loss; with a teacher, its targets first."""

    def task(model: nn.Module, batch: dict) -> dict:
        targets = dict(batch)
        if teacher is not None:
            if next(teacher.parameters()).device != batch["images"].device:
                teacher.to(batch["images"].device)
            targets.update(teacher_targets(teacher, batch["images"]))
        return loss_fn(model(batch["images"]), targets)

    return task


def load_teacher(path: str | Path, student_config: object) -> nn.Module:
    """The online teacher, frozen, checked to see the student's crops."""
    teacher, _ = build_from_checkpoint(str(path))
    tcfg = teacher.config
    if tcfg.role != "teacher":  # a student has no heatmaps to distil
        raise BadCheckpointError(f"{path}: holds the {tcfg.role} '{tcfg.name}'; expected a teacher")
    mine, theirs = tcfg.geometry, student_config.geometry
    if (mine.input_size, mine.heatmap_size) != (theirs.input_size, theirs.heatmap_size):
        raise BadConfigError(
            f"{path}: teacher input/heatmap size {mine.input_size}/{mine.heatmap_size} differs "
            f"from the student's {theirs.input_size}/{theirs.heatmap_size}"
        )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def store_identity(meta: object) -> dict:
    """The store fields a run depends on: its identity fields and its number of views."""
    out = {**meta.identity(), "views": meta.views}
    return json.loads(json.dumps(out))  # tuples as lists: compared with what config.json holds


def check_store_unchanged(run_dir: Path, store: str, identity: dict) -> None:
    """Refuse to resume the run in `run_dir` on a store that changed since it started."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return  # nothing started yet: resume starts from scratch
    started = (load_json(path, BadConfigError).get("meta") or {}).get("student_config") or {}
    before = started.get("store_identity") or {
        k: v for k, v in (("views", started.get("views")),) if v is not None
    }
    changed = [
        f"{name}: run={before[name]!r} store={identity.get(name)!r}"
        for name in sorted(before)
        if before[name] != identity.get(name)
    ]
    if changed:
        raise StoreMismatchError(
            f"{store}: the store changed since the run in {run_dir} started ({'; '.join(changed)});"
            " expected the same store to resume exactly (pass --allow-store-change to train on "
            "the changed store anyway)"
        )


def train_student(
    store: str | Path | None,
    model: str = "distilpose_s",
    out_dir: str | Path = "runs/student",
    *,
    losses: str = "reg,kt,vt,sh,cs",
    epochs: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_iters: int | None = None,
    device: str = "auto",
    seed: int = 0,
    workers: int = 2,
    resume: bool = False,
    teacher_online: str | Path | None = None,
    model_overrides: dict | None = None,
    official_sh_weight: bool = False,
    eval_fn: Callable[[int, nn.Module], dict] | None = None,
    allow_incomplete: bool = False,
    ann_file: str | Path | None = None,
    images: str | Path | None = None,
    verify_digest: bool = True,
    amp: bool = True,
    log_every: int = 20,
    ckpt_every_steps: int = 0,
    allow_store_change: bool = False,
    decode: str = "auto",
    sync_bn: bool = True,
    channels_last: bool = False,
    amp_dtype: str = "auto",
    schedule: str = "step",
) -> dict:
    """Train `model` from the teacher store `store`; returns the run summary.

    Writes out_dir/{student.pth, last.pth, config.json, metrics.csv, loss_curves.png,
    train.log}. `schedule`: "step" (the paper's x0.1 drops at 2/3 and 13/15 of the epochs) or
    "cosine" (smooth decay to 0 over the run, for short runs). eval_fn(epoch, model) -> dict
    runs after every epoch (its values land in the epoch rows of metrics.csv).
    student.pth meta: role, model, losses, store, teacher_sha256 (loadable with
    `distilpose.models.build_from_checkpoint`). `ann_file` / `images` override the dataset
    paths recorded in the store; with `store=None` and `teacher_online`, they are required and
    each epoch draws a fresh augmentation (no store at all). A store with pixels needs neither
    (its crops are read from it); `decode` says where its JPEG crops are decoded on a CUDA run
    ("auto"/"gpu": on the GPU, "cpu": in the DataLoader workers). `resume` refuses a store whose
    identity (teacher, seed, dataset, sizes, mode, views) changed since the run started, unless
    `allow_store_change`.
    """
    out = Path(out_dir)
    weights = parse_losses(losses)
    torch.manual_seed(seed)  # the student's initialisation is part of the run's identity
    student = build_model(model, **(model_overrides or {}))
    cfg = student.config

    teacher = load_teacher(teacher_online, cfg) if teacher_online else None
    if teacher is not None:
        outputs = TEACHER_OUTPUTS if teacher.config.has_tokens else ("heatmaps",)
        check_targets(weights, outputs, teacher.config.name, cfg)
    store_meta: dict = {}
    identity: dict | None = None
    if store is not None:
        reader = StoreReader.open(str(store))
        if teacher is None:  # a loss the store has no target for fails before anything runs
            check_targets(weights, reader.meta.teacher_outputs, reader.meta.teacher_name, cfg)
        reader.check_student(cfg)  # sizes first: a mismatch fails before any data is read
        identity = store_identity(reader.meta)
        if resume and not allow_store_change:
            check_store_unchanged(out, str(store), identity)
        if not allow_incomplete and not bool(reader.complete_mask().all()):
            raise StoreFormatError(
                f"{store}: store is incomplete (dump still running or interrupted); "
                "expected a finished dump, or pass allow_incomplete=True"
            )
        data = StudentBatches(
            store,
            batch_size=batch_size,
            seed=seed,
            workers=workers,
            losses=weights,
            online=teacher is not None,
            ann_file=str(ann_file) if ann_file else None,
            images=str(images) if images else None,
            verify_digest=verify_digest,
            allow_incomplete=allow_incomplete,
            device=resolve_device(device, world()[2]),
            decode=decode,
        )
        store_meta = {"teacher_sha256": data.meta.teacher_sha256, "views": data.views}

    elif teacher is not None and ann_file and images:
        data = OnlineBatches(
            str(ann_file),
            str(images),
            batch_size=batch_size,
            geometry=cfg.geometry,
            seed=seed,
            workers=workers,
        )
    else:
        raise BadConfigError(
            "store: none given; expected a store, or teacher_online with ann_file and images"
        )

    loss_fn = DistillationLoss(
        weights, geometry=cfg.geometry, official_sh_weight=official_sh_weight
    )
    total_iters = epochs * len(data)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_iters=resolve_warmup(warmup_iters, total_iters),
        device=device,
        amp=amp,
        seed=seed,
        num_workers=workers,
        log_every=log_every,
        sync_bn=sync_bn,
        channels_last=channels_last,
        amp_dtype=amp_dtype,
        ckpt_every_steps=ckpt_every_steps,
        schedule=schedule,
        total_steps=total_iters if schedule == "cosine" else 0,
    )
    meta = {
        "role": "student",
        "model": model,
        "losses": list(weights),
        "loss_weights": weights,
        "store": str(store) if store is not None else None,
        "teacher_sha256": store_meta.get("teacher_sha256", ""),
        "teacher_online": str(teacher_online) if teacher_online else None,
        "student_config": {
            "store": str(store) if store is not None else None,
            "model": model,
            "model_overrides": model_overrides or {},
            "losses": losses,
            "official_sh_weight": official_sh_weight,
            "allow_incomplete": allow_incomplete,
            "ann_file": str(ann_file) if ann_file else None,
            "images": str(images) if images else None,
            "views": store_meta.get("views"),
            "store_identity": identity,
            "decode": decode,
            "view_rule": "view = epoch mod views",
            "train": asdict(config),
        },
    }
    trainer = Trainer(
        student,
        build_task(loss_fn, teacher),
        data,
        config,
        out,
        meta,
        on_epoch_end=eval_fn,
        # DDP: heads of the terms left out (sigmas, scores, token projections) get no gradient
        find_unused_parameters=set(weights) != set(LOSS_NAMES),
    )
    summary = trainer.fit(resume=resume)

    final = out / "student.pth"
    if world()[0] == 0:  # DDP: rank 0 writes
        save_checkpoint(final, student, meta=meta)
    return {**summary, "checkpoint": str(final), "last": summary["checkpoint"], "losses": weights}
