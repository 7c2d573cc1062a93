"""`train-student`: a regression student trained from the teacher store (paper Eq. 7).

The student reads the teacher's heatmaps and tokens from the store and never runs the teacher,
unless `teacher_online` names a teacher checkpoint (the official method: the teacher runs on
every batch; kept to compare speed and results). The loop itself is the shared
`distilpose.training.engine.Trainer`; this module only wires data, loss and model into it.

Modes (`MODES`, recorded in the checkpoint meta as "mode"): "store" (the store's views and
targets), "store_teacher_online" (the store's views, the teacher run on each batch: this
measures the online teacher's compute, not the effect of fresh views), and without a store, from
the annotation file and images with a fresh augmentation every epoch (the crop of instance i in
epoch e is seeded by (seed, i, e), so a resumed run is exact and, with the same seed and recipe,
epoch e < V sees view e of a store): "online_teacher" (the teacher run on each batch) and
"teacher_free" (no teacher: only terms that read no teacher output, `reg` and `rle`). Every
run counts the crops its teacher forwarded (`teacher_forwards`: epoch rows of metrics.csv,
student.pth's meta, the summary; 0 when the targets come from the store).

Recipe (the paper's): Adam, lr 1e-3, linear warmup 500 iterations, x0.1 at 2/3 and 13/15 of the
epochs; epoch e trains on the store's view `e mod V`. One deviation for short runs: by default
the warmup is capped at a tenth of all iterations, so a demo run of a few hundred steps is not
mostly warmup (a full COCO run has ~700k steps, where the cap never bites).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distilpose.data import AugmentRecipe, photometric_jitter
from distilpose.device import resolve_device
from distilpose.errors import (
    BadCheckpointError,
    BadConfigError,
    StoreMismatchError,
)
from distilpose.inference.eval_run import coco_validator
from distilpose.limits import load_json
from distilpose.models import build_from_checkpoint, build_model, save_checkpoint
from distilpose.training.distributed import global_total, world
from distilpose.training.engine import TrainConfig, Trainer
from distilpose.training.losses import (
    DEFAULT_LOSSES,
    LOSS_TERMS,
    TEACHER_FREE,
    DistillationLoss,
    parse_losses,
)
from distilpose.training.runs import StudentRun
from distilpose.viz.curves import draw_run_loss_curves
from store import StoreReader
from store.schema import OUTPUT_WORDS, TEACHER_OUTPUTS
from student_train.data import OnlineBatches, StudentBatches, check_targets

# What a run trains on: "mode" in the checkpoint meta (see the module docstring).
MODES = {
    "store": "the store's views and teacher targets",
    "store_teacher_online": "the store's views, the teacher run on each batch (compute, not "
    "fresh views)",
    "online_teacher": "a fresh augmentation every epoch from the images, the teacher run on each "
    "batch",
    "teacher_free": "a fresh augmentation every epoch from the images, no teacher",
}

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


class StudentTask(nn.Module):
    """The Trainer's task: student forward + the loss; with a teacher, its targets first.

    A module, so that what it holds trains and resumes with the student (`engine.Trainer`): the
    loss's parameters (RLE's flow) and the buffer `teacher_forwards`, the crops the teacher has
    forwarded so far in the run (under DDP: over all ranks, DDP padding rows included, since the
    teacher runs on them too). The frozen teacher is no part of its state.
    """

    def __init__(
        self, loss_fn: nn.Module, teacher: nn.Module | None = None, input_jitter: float = 0.0
    ) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.input_jitter = input_jitter
        object.__setattr__(self, "teacher", teacher)  # a plain attribute, not a submodule
        self.register_buffer("teacher_forwards", torch.zeros((), dtype=torch.int64))

    def forward(self, model: nn.Module, batch: dict) -> dict:
        targets = dict(batch)
        if self.teacher is not None:
            images = batch["images"]
            if next(self.teacher.parameters()).device != images.device:
                self.teacher.to(images.device)
            targets.update(teacher_targets(self.teacher, images))
            crops = torch.tensor(images.shape[0], device=self.teacher_forwards.device)
            self.teacher_forwards += global_total(crops)  # the global batch's under DDP
        # the teacher (above) saw the crop as stored; only the student's input is jittered
        images = photometric_jitter(batch["images"], self.input_jitter)
        return self.loss_fn(model(images), targets)


def build_task(
    loss_fn: nn.Module, teacher: nn.Module | None = None, input_jitter: float = 0.0
) -> StudentTask:
    """The Trainer's task for `loss_fn`, with an online `teacher` if given, and the student's
    input jittered with `input_jitter` (StudentRun's)."""
    return StudentTask(loss_fn, teacher, input_jitter)


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


@dataclass
class StudentPlan:
    """What a student run trains with, resolved and checked before the first step."""

    student: nn.Module
    teacher: nn.Module | None  # online mode only
    data: StudentBatches | OnlineBatches
    weights: dict[str, float]  # loss term -> weight
    store_meta: dict  # teacher_sha256 and views of the store ({} without one)
    identity: dict | None  # store_identity of the store, compared on --resume
    mode: str  # one of MODES
    recipe: dict  # the augmentation the crops were drawn with (the store's, or the run's)


def _store_batches(run: StudentRun, cfg: object, weights: dict, online: bool) -> tuple:
    """(batches, store_meta, identity) from the run's store, after checking it fits the run."""
    reader = StoreReader.open(run.store, run.storage_options)
    if not online:  # a loss the store has no target for fails before anything runs
        check_targets(weights, reader.meta.teacher_outputs, reader.meta.teacher_name, cfg)
    reader.check_student(cfg)  # sizes first: a mismatch fails before any data is read
    reader.check_markers()  # every complete unit's marker, signed and whole
    views = check_views(run.views, reader.meta.views, run.store)
    data = StudentBatches(
        run.store,
        batch_size=run.batch_size,
        seed=run.seed,
        workers=run.workers,
        losses=weights,
        online=online,
        ann_file=run.ann_file or None,
        images=run.images or None,
        verify_digest=run.verify_digest,
        allow_incomplete=run.allow_incomplete,
        device=resolve_device(run.device, world()[2]),
        decode=run.decode,
        storage_options=run.storage_options,
        views=views,
    )
    identity = {**store_identity(reader.meta), "views": data.views}  # the views it trains on
    if run.resume and not run.allow_store_change:
        check_store_unchanged(Path(run.out_dir), run.store, identity)
    skipped = data.skipped()
    if world()[0] == 0:
        _say_what_trains(run.store, reader, data, skipped)
        hint = None if online else views_hint(run.epochs, data.views)
        if hint:
            print(f"train-student: {hint}", file=sys.stderr)
    store_meta = {"teacher_sha256": data.meta.teacher_sha256, "views": data.views}
    return data, {**store_meta, "skipped": skipped}, identity


# The full demo's views curve (benchmarks/results/views_grid.md) matched the online teacher
# at one stored view per this many epochs (a test keeps it equal to the record's figure).
EPOCHS_PER_VIEW_MATCHED = 4.4


def views_hint(epochs: int, views: int) -> str | None:
    """A line for a run that reads each stored view many more times than the views curve
    found enough (more than twice the epochs per view it matched at), else None."""
    if epochs / views <= 2 * EPOCHS_PER_VIEW_MATCHED:
        return None
    return (
        f"{epochs} epochs from {views} view(s): each view is read {epochs / views:.0f} times; "
        f"the demo's views curve matched the online teacher at one view per "
        f"{EPOCHS_PER_VIEW_MATCHED:g} epochs (docs/scale-out.md; `dump-teacher --views N` adds "
        "views to this store)"
    )


def _say_what_trains(store: str, reader: StoreReader, data: StudentBatches, skipped: int) -> None:
    """One stderr line each: views left out (being added, or unfinished) and samples skipped."""
    complete = set(reader.complete_views())
    left_out = [v for v in range(reader.meta.views) if v not in complete]
    if data.views < len(complete):  # --views N: the first N by choice, not for want of data
        print(f"train-student: training on views {data.view_ids} of {store}", file=sys.stderr)
    elif left_out:
        print(
            f"train-student: views {left_out} of {store} are not complete (a dump adding them, "
            f"or stopped); training on the {data.views} complete view(s) {data.view_ids}",
            file=sys.stderr,
        )
    if skipped:
        total = data.views * reader.meta.num_instances
        print(
            f"train-student: {skipped} of {total} samples skipped (images the dump could not "
            "read: left out of every loss)",
            file=sys.stderr,
        )


def check_views(views: int | None, stored: int, store: str) -> int | None:
    """`views` (train on the store's first N of its `stored`) checked; None: no choice made
    (the store's complete views)."""
    if views is None:
        return None
    if not 1 <= views <= stored:
        raise StoreMismatchError(
            f"views: {views} asked for; the store {store} holds {stored}; expected 1..{stored} "
            "(add views with dump-teacher --views N)"
        )
    return int(views)


def check_student_outputs(weights: dict[str, float], student: object) -> None:
    """Refuse, by name, a term reading sigmas or maps the student does not predict."""
    for name in weights:
        if LOSS_TERMS[name].sigmas and not student.has_sigmas:
            raise BadConfigError(
                f"losses: {name} needs the student's predicted sigmas; {student.name} predicts "
                "none (expected a student model)"
            )
        if LOSS_TERMS[name].maps and not student.has_maps:
            raise BadConfigError(
                f"losses: {name} needs a student whose coords are a soft-argmax over maps; "
                f"{student.name} has head {student.head!r} (expected a demo student, head "
                "'similarity')"
            )


def check_teacher_free(weights: dict[str, float]) -> None:
    """Without a store and a teacher, refuse by name a term that reads a teacher output."""
    for name in weights:
        for target in LOSS_TERMS[name].targets:
            raise BadConfigError(
                f"losses: {name} needs the teacher's {OUTPUT_WORDS[target]}, and this run has no "
                f"store and no teacher_online; expected only teacher-free terms "
                f"({', '.join(TEACHER_FREE)}), or a store or teacher_online"
            )


def _image_batches(run: StudentRun, cfg: object) -> OnlineBatches:
    """Store-less batches: the annotation file's people, a fresh augmentation every epoch."""
    if not (run.ann_file and run.images):
        raise BadConfigError(
            "store: none given; expected a store, or ann_file and images to train from the "
            "images (with teacher_online, or teacher-free losses such as reg or rle)"
        )
    return OnlineBatches(
        run.ann_file,
        run.images,
        batch_size=run.batch_size,
        geometry=cfg.geometry,
        recipe=run.recipe,
        seed=run.seed,
        workers=run.workers,
    )


def plan_student(run: StudentRun) -> StudentPlan:
    """Build the student (seeded), the online teacher if any, and the batches; every check of
    losses against targets, sizes and store identity fails here, before training starts."""
    weights = parse_losses(run.losses)
    torch.manual_seed(run.seed)  # the student's initialisation is part of the run's identity
    student = build_model(run.model, run.backbone_weights, **(run.model_overrides or {}))
    cfg = student.config
    check_student_outputs(weights, cfg)

    teacher = load_teacher(run.teacher_online, cfg) if run.teacher_online else None
    if teacher is not None:
        outputs = TEACHER_OUTPUTS if teacher.config.has_tokens else ("heatmaps",)
        check_targets(weights, outputs, teacher.config.name, cfg)
    if run.store is not None:
        if run.recipe is not None:
            raise BadConfigError(
                f"recipe: {run.store} holds views cut with the store's recipe; expected no "
                "recipe (--augment) with a store, or no store to train on fresh crops"
            )
        data, store_meta, identity = _store_batches(run, cfg, weights, teacher is not None)
        mode = "store_teacher_online" if teacher is not None else "store"
        recipe = dict(data.meta.recipe)
        return StudentPlan(student, teacher, data, weights, store_meta, identity, mode, recipe)
    if teacher is None:
        check_teacher_free(weights)
    data = _image_batches(run, cfg)
    mode = "online_teacher" if teacher is not None else "teacher_free"
    recipe = (run.recipe or AugmentRecipe()).to_dict()
    return StudentPlan(student, teacher, data, weights, {}, None, mode, recipe)


def student_train_config(run: StudentRun, batches_per_epoch: int) -> TrainConfig:
    """The shared trainer's config for `run` (warmup resolved against the run's length)."""
    total_iters = run.epochs * batches_per_epoch
    return TrainConfig(
        epochs=run.epochs,
        batch_size=run.batch_size,
        lr=run.lr,
        warmup_iters=resolve_warmup(run.warmup_iters, total_iters),
        device=run.device,
        amp=run.amp,
        seed=run.seed,
        num_workers=run.workers,
        log_every=run.log_every,
        sync_bn=run.sync_bn,
        channels_last=run.channels_last,
        amp_dtype=run.amp_dtype,
        ckpt_every_steps=run.ckpt_every_steps,
        schedule=run.schedule,
        # cosine decays over optimizer steps: an accumulation of K batches is one
        total_steps=-(-total_iters // run.accum_steps) if run.schedule == "cosine" else 0,
        accum_steps=run.accum_steps,
        ema_decay=run.ema,
        lr_scale=run.lr_scale,
        val_every=run.val_every,
    )


def student_meta(run: StudentRun, plan: StudentPlan, config: TrainConfig) -> dict:
    """The checkpoint meta: role, model, losses, store, teacher and the resolved run config."""
    return {
        "role": "student",
        "model": run.model,
        "losses": list(plan.weights),
        "loss_weights": plan.weights,
        "store": run.store,
        "teacher_sha256": plan.store_meta.get("teacher_sha256", ""),
        "teacher_online": run.teacher_online or None,
        "mode": plan.mode,
        "student_config": {
            "store": run.store,
            "model": run.model,
            "model_overrides": run.model_overrides or {},
            "losses": run.losses,
            "official_sh_weight": run.official_sh_weight,
            "allow_incomplete": run.allow_incomplete,
            "ann_file": run.ann_file or None,
            "images": run.images or None,
            "views": plan.store_meta.get("views"),
            "store_identity": plan.identity,
            "decode": run.decode,
            "recipe": plan.recipe,
            "input_jitter": run.input_jitter,
            "view_rule": "view = epoch mod views"
            if plan.mode.startswith("store")
            else "a fresh crop every epoch, seeded by (seed, instance, epoch)",
            "train": asdict(config),
        },
    }


def train_student(run: StudentRun, eval_fn: Callable[[int, nn.Module], dict] | None = None) -> dict:
    """Train `run.model` from the teacher store `run.store`; returns the run summary.

    Writes run.out_dir/{student.pth, last.pth, config.json, metrics.csv, loss_curves.png,
    train.log}; config.json keeps `run` under "run" for `--resume`. `schedule`: "step" (the
    paper's x0.1 drops at 2/3 and 13/15 of the epochs) or "cosine" (smooth decay to 0 over the
    run, for short runs). eval_fn(epoch, model) -> dict runs after every epoch (its values land
    in the epoch rows of metrics.csv). With `val_ann` and `val_images` (and optionally
    `val_dets`), the run validates every `val_every` epochs with `eval`'s protocol, the EMA
    weights when `ema` is set, and keeps the best AP's weights in best.pth (val_AP, best_AP in
    metrics.csv). `backbone_weights`: an ImageNet backbone file to start from
    (`distilpose.models.load_backbone_weights`).
    student.pth meta: role, model, losses, store, teacher_sha256, mode, teacher_forwards
    (loadable with `distilpose.models.build_from_checkpoint`). `ann_file` / `images` override
    the dataset paths recorded in the store; with `store=None` they are required and each epoch
    draws a fresh augmentation with `recipe` (None: the paper's student recipe), the teacher
    `teacher_online` run on it, or none (teacher-free losses only). A store with pixels needs
    neither (its crops are read from it); `decode` says where its JPEG crops are decoded on a
    CUDA run ("auto"/"gpu": on the GPU, "cpu": in the DataLoader workers). `resume` refuses a
    store whose identity (teacher, seed, dataset, sizes, mode, views) changed since the run
    started, unless `allow_store_change`.
    """
    out = Path(run.out_dir)
    plan = plan_student(run)
    # RLE's flow starts from the run's seed alone, whatever else was built (a teacher or not)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed + 1)  # not the student's stream
        loss_fn = DistillationLoss(
            plan.weights,
            geometry=plan.student.config.geometry,
            official_sh_weight=run.official_sh_weight,
        )
    config = student_train_config(run, len(plan.data))
    meta = student_meta(run, plan, config)
    validate = None
    if run.val_ann or run.val_images or run.val_dets:
        if not (run.val_ann and run.val_images):
            raise BadConfigError("val_ann, val_images: expected both to validate while training")
        validate = coco_validator(run.val_ann, run.val_images, out, meta, dets_file=run.val_dets)
    task = build_task(loss_fn, plan.teacher, run.input_jitter)

    def epoch_end(epoch: int, model: nn.Module) -> dict:
        """The epoch row's columns: the caller's, and the teacher forwards so far."""
        row = (eval_fn(epoch, model) or {}) if eval_fn is not None else {}
        return {**row, "teacher_forwards": int(task.teacher_forwards)}

    trainer = Trainer(
        plan.student,
        task,
        plan.data,
        config,
        out,
        meta,
        on_epoch_end=epoch_end,
        # DDP: heads of the terms left out (sigmas, scores, token projections) get no gradient
        find_unused_parameters=not set(DEFAULT_LOSSES.split(",")) <= set(plan.weights),
        run=run.to_dict(),
        validate=validate,
        on_save=draw_run_loss_curves,
    )
    summary = trainer.fit(resume=run.resume)

    final = out / "student.pth"
    forwards = int(task.teacher_forwards)
    if world()[0] == 0:  # DDP: rank 0 writes
        save_checkpoint(final, plan.student, meta={**meta, "teacher_forwards": forwards})
    return {
        **summary,
        "checkpoint": str(final),
        "last": summary["checkpoint"],
        "losses": plan.weights,
        "mode": plan.mode,
        "teacher_forwards": forwards,
        "skipped": plan.store_meta.get("skipped", 0),
    }
