"""Train a heatmap teacher (TokenPose) on a COCO-format dataset with the shared trainer.

The teacher does not have to come from the official release: `train_teacher` fits
`tokenpose_tiny`, `tokenpose_s` or `tokenpose_l_w48` as a heatmap model, as TokenPose was
trained: seeded augmented crops (view = epoch, so every epoch draws fresh augmentation that any
rerun reproduces), Gaussian targets (`HeatmapCodec`, sigma 2 at 64x48), joint MSE with target
weights (`HeatmapLoss`), Adam with warmup and step decay (`distilpose.training.engine`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distilpose.data import (
    AugmentRecipe,
    PersonInstance,
    annotation_digest,
    load_coco_instances,
    normalize,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.data.codecs import HeatmapCodec
from distilpose.errors import BadConfigError
from distilpose.geometry import Geometry
from distilpose.inference.eval_run import coco_validator
from distilpose.models import build_model, save_checkpoint
from distilpose.training.distributed import rank_share, world
from distilpose.training.engine import TrainConfig, Trainer
from distilpose.training.losses import HeatmapLoss
from distilpose.training.runs import TeacherRun
from distilpose.viz.curves import draw_run_loss_curves

# The TokenPose-L teacher was trained with stronger scale and milder rotation than the
# student recipe (OFFICIAL_FACTS: rotation 40, scale 0.5); flip and half-body as the student.
TEACHER_RECIPE = AugmentRecipe(scale_factor=0.5, rotation_factor=40.0)


class HeatmapCrops(Dataset):
    """Augmented crop `i` of view `self.view`, with its Gaussian heatmap targets.

    Items: "images" [3, H, W] float32 normalized, "heatmaps" [K, Hh, Wh], "target_weights" [K],
    "instance" []. Set `view` before building a DataLoader: workers get a copy per epoch.
    """

    def __init__(
        self,
        instances: list[PersonInstance],
        recipe: AugmentRecipe,
        seed: int,
        geometry: Geometry,
    ) -> None:
        self.instances, self.recipe, self.seed = instances, recipe, seed
        self.input_size = geometry.input_size
        self.codec = HeatmapCodec(geometry)
        self.view = 0

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, i: int) -> dict:
        inst = self.instances[i]
        spec = sample_crop_spec(inst, self.recipe, self.seed, self.view, self.input_size)
        crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, self.input_size)
        heatmaps, target_weights = self.codec.encode(crop.keypoints, crop.weights)
        return {
            "images": normalize(crop.image),
            "heatmaps": torch.from_numpy(heatmaps),
            "target_weights": torch.from_numpy(np.asarray(target_weights, np.float32)),
            "instance": torch.tensor(inst.index),
        }


class TeacherBatches:
    """`epoch -> DataLoader`: a (seed, epoch) shuffle, this rank's share, view = epoch.

    The shuffle is cut into global batches of world_size x batch_size (whole ones only) and rank
    r takes slice r of each (`distilpose.training.distributed.rank_share`), so R ranks x B see
    the same global batches as one process with R x B.
    """

    def __init__(self, dataset: HeatmapCrops, batch_size: int, seed: int, workers: int) -> None:
        self.dataset, self.batch_size, self.seed, self.workers = dataset, batch_size, seed, workers
        self.rank, self.world_size, _ = world()
        if len(self) == 0:
            raise BadConfigError(
                f"batch_size: {batch_size} x {self.world_size} process(es) exceeds the "
                f"{len(dataset)} training instances; expected a smaller batch size"
            )

    def __len__(self) -> int:
        # Full batches only: BatchNorm needs > 1 sample, and every rank must take equal steps.
        return len(self.dataset) // (self.batch_size * self.world_size)

    def __call__(self, epoch: int) -> DataLoader:
        self.dataset.view = epoch
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g)
        step = self.batch_size * self.world_size
        start, stop = rank_share(step, self.rank, self.world_size)
        mine = [order[k + start : k + stop] for k in range(0, len(self) * step, step)]
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=torch.cat(mine).tolist() if mine else [],
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
        )


def heatmap_task(loss_fn: nn.Module) -> Callable[[nn.Module, dict], dict]:
    """The trainer's task: teacher forward + joint MSE -> {"loss", "loss_heatmap"}."""

    def task(model: nn.Module, batch: dict) -> dict:
        out = model(batch["images"])
        return loss_fn(out.heatmaps, batch["heatmaps"], batch["target_weights"])

    return task


def train_teacher(run: TeacherRun, eval_fn: Callable[[nn.Module], dict] | None = None) -> dict:
    """Train teacher `run.model` on a COCO keypoints file; returns the run summary.

    Writes run.out_dir/{teacher.pth, last.pth, config.json, metrics.csv, train.log,
    loss_curves.png}; config.json keeps `run` under "run" for `--resume`. teacher.pth has meta
    {"role": "teacher", "model", "ann_digest", ...} and loads with
    `distilpose.models.build_from_checkpoint`. `eval_fn(model) -> metrics` runs every
    `run.val_every` epochs and after the last; its metrics go into metrics.csv.
    """
    out, seed, epochs = Path(run.out_dir), run.seed, run.epochs
    recipe = run.recipe or TEACHER_RECIPE
    instances = load_coco_instances(run.ann_file, run.image_root, train=True)[: run.max_instances]
    torch.manual_seed(seed)  # the initial weights are part of the run's identity
    net = build_model(run.model, run.backbone_weights, **(run.model_overrides or {}))
    cfg = net.config
    if cfg.role != "teacher":
        raise BadConfigError(
            f"model: {run.model!r} is a {cfg.role}; "
            "expected a teacher (tokenpose_*, simplebaseline_*)"
        )
    dataset = HeatmapCrops(instances, recipe, seed, cfg.geometry)
    batches = TeacherBatches(dataset, run.batch_size, seed, run.workers)
    config = TrainConfig(
        epochs=epochs,
        batch_size=run.batch_size,
        lr=run.lr,
        warmup_iters=min(run.warmup_iters, max(epochs * len(batches) // 4, 1)),  # short runs
        device=run.device,
        amp=run.amp,
        seed=seed,
        num_workers=run.workers,
        log_every=run.log_every,
        sync_bn=run.sync_bn,
        accum_steps=run.accum_steps,
        ema_decay=run.ema,
        lr_scale=run.lr_scale,
        val_every=run.val_every,
    )
    meta = {
        "role": "teacher",
        "model": run.model,
        "model_overrides": run.model_overrides or {},
        "ann_file": run.ann_file,
        "image_root": run.image_root,
        "ann_digest": annotation_digest(run.ann_file),
        "num_instances": len(instances),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "train": asdict(config),
    }

    validate = None
    if run.val_ann or run.val_images or run.val_dets:
        if not (run.val_ann and run.val_images):
            raise BadConfigError("val_ann, val_images: expected both to validate while training")
        validate = coco_validator(run.val_ann, run.val_images, out, meta, dets_file=run.val_dets)

    def on_epoch_end(epoch: int, model: nn.Module) -> dict:
        if eval_fn is None or ((epoch + 1) % run.val_every and epoch + 1 != epochs):
            return {}
        return eval_fn(model)

    trainer = Trainer(
        net, heatmap_task(HeatmapLoss()), batches, config, out, meta, on_epoch_end,
        run=run.to_dict(), validate=validate, on_save=draw_run_loss_curves,
    )  # fmt: skip
    summary = trainer.fit(resume=run.resume)
    final = out / "teacher.pth"
    if trainer.is_main:
        save_checkpoint(final, trainer.model, meta=meta)
    result = {**summary, "checkpoint": str(final), "last": str(out / "last.pth")}
    if trainer.is_main:
        (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
