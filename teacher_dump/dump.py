"""Run the teacher once per (instance, view) and fill the store with its outputs.

    summary = dump_teacher(DumpRun("teacher.pth", "person_keypoints_train2017.json",
                                   "train2017/", "teacher_store", views=4))

Pipeline (one process per GPU under torchrun, each taking shard (rank, world) of the units):

    DataLoader workers  --  read JPEG, sample_crop_spec, warpAffine, normalize   (processes)
    main thread         --  teacher forward (eval, inference_mode, autocast, channels_last)
    writer thread       --  StoreWriter.write_unit: encode, compress, fsync, mark complete

The three overlap: workers prefetch the next batches while the teacher runs, and a bounded
queue lets the store write finished units while the next ones are computed.

Resumable and exact: only the units the store lists as pending are computed, and forward
batches never cross a unit and always start at the same slot of it, so a sample is computed in
the same batch position with the same batch shape in every run; a dump killed and rerun (with the
same batch size and device) writes the same bytes as one that never stopped. Raising `views`
adds view blocks and leaves the existing ones untouched.

A missing or corrupt image is not fatal: its samples get zero outputs, zero weights and an
all-zero crop digest (marked invalid, never a plausible zero-filled sample), one warning line each,
the count in the summary, and each one's slot and reason in its unit's marker (`skipped`,
schema 3), from which readers leave it out of training.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distilpose.data import (
    AugmentRecipe,
    PersonInstance,
    annotation_digest,
    crop_digest,
    load_coco_instances,
    normalize,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.data.canvas import Canvas
from distilpose.data.crop import crop_keypoints
from distilpose.device import resolve_device
from distilpose.errors import BadCheckpointError, BadConfigError, BadImageError
from distilpose.io import file_sha256
from distilpose.models import build_from_checkpoint, build_model, load_checkpoint
from distilpose.progress import ProgressCounter, progress
from distilpose.training.distributed import init_group, wait_for_ranks, world
from distilpose.training.engine import amp_dtype
from distilpose.training.runs import DumpRun
from store.pixels import canvas_crop, choose_pixels, decode_crop, encode_canvas, encode_crop
from store.schema import JPEG_QUALITY, TEACHER_OUTPUTS, StoreMeta, default_layout, dump_mode
from store.writer import StoreWriter, existing_meta

log = logging.getLogger("distilpose.dump")


def load_teacher(ckpt: str | Path, model: str | None = None) -> nn.Module:
    """The teacher in `ckpt`: recognised from the file, or built as `model` and loaded into."""
    if model:
        net = build_model(model)
        load_checkpoint(net, str(ckpt))
    else:
        net, _ = build_from_checkpoint(ckpt)
    if net.config.role != "teacher":
        raise BadCheckpointError(
            f"{ckpt}: holds the {net.config.role} '{net.config.name}'; expected a teacher"
        )
    return net.eval()


class DumpCrops(Dataset):
    """Crop of plan entry i = (slot, instance index, view), rendered in a worker process.

    Items: "images" [3, H, W] float32 normalized, "keypoints" [K, 2] crop px, "weights" [K],
    "spec" [8] float64, "slot", "instance", "image_id", "ann_id", "crop_digest" [32] uint8,
    "error" ("" when the image was read), and with `pixels` "jpeg" or "lossless" the encoded
    crop "pixels" (bytes); with "canvas" the person's encoded canvas "pixels" and its geometry
    "canvas" [5], the crop warped from the decoded canvas. The teacher gets the crop decoded
    from those bytes, and the digest is of the decoded pixels: what the store keeps is exactly
    what the teacher saw.
    """

    def __init__(
        self,
        instances: list[PersonInstance],
        plan: list[tuple[int, int, int]],
        recipe: AugmentRecipe,
        seed: int,
        input_size: tuple[int, int],
        num_keypoints: int,
        pixels: str = "none",
        jpeg_quality: int = JPEG_QUALITY,
    ) -> None:
        self.instances, self.plan, self.recipe, self.seed = instances, plan, recipe, seed
        self.input_size, self.num_keypoints = input_size, num_keypoints
        self.pixels, self.jpeg_quality = pixels, jpeg_quality

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        slot, index, view = self.plan[i]
        inst = self.instances[index]
        spec = sample_crop_spec(inst, self.recipe, self.seed, view, self.input_size)
        item = {
            "slot": slot,
            "instance": inst.index,
            "image_id": inst.image_id,
            "ann_id": inst.ann_id,
            "spec": spec.to_array(),
            "error": "",
        }
        try:
            full = read_image(inst.image_path)
        except BadImageError as e:
            w, h = self.input_size
            k = self.num_keypoints
            if self.pixels == "canvas":  # a black 1 px canvas keeps the row well-formed
                item["pixels"] = encode_crop(np.zeros((1, 1, 3), np.uint8), "jpeg")
                item["canvas"] = Canvas((0.0, 0.0), 1.0, (1, 1)).to_array()
            elif self.pixels != "none":  # a black crop keeps the row well-formed
                item["pixels"] = encode_crop(np.zeros((h, w, 3), np.uint8), self.pixels)
            return {
                **item,
                "images": torch.zeros(3, h, w),
                "keypoints": np.zeros((k, 2), np.float32),
                "weights": np.zeros(k, np.float32),  # invalid: nothing to learn from
                "crop_digest": np.zeros(32, np.uint8),  # no crop was seen
                "error": str(e),
            }
        if self.pixels == "canvas":
            # the crop warped from the stored canvas by the function students use: every view
            # renders the same canvas, so it equals the one warped from view 0's stored copy
            data, geometry = encode_canvas(
                full, inst, self.recipe, self.input_size, self.jpeg_quality
            )
            item["pixels"], item["canvas"] = data, geometry
            image = canvas_crop(data, geometry, item["spec"], self.input_size)
            keypoints, weights = crop_keypoints(spec, inst.keypoints, self.input_size)
        else:
            crop = render_crop(full, spec, inst.keypoints, self.input_size)
            image, keypoints, weights = crop.image, crop.keypoints, crop.weights
            if self.pixels != "none":  # the teacher sees the pixels the store gives students
                item["pixels"] = encode_crop(image, self.pixels, self.jpeg_quality)
                image = decode_crop(item["pixels"], self.pixels, self.input_size)
        return {
            **item,
            "images": normalize(image),
            "keypoints": keypoints.astype(np.float32),
            "weights": weights.astype(np.float32),
            "crop_digest": np.frombuffer(crop_digest(image), np.uint8),
        }


def collate(items: list[dict]) -> dict:
    """Stack tensors, numpy arrays and numbers; keep strings and bytes as lists."""
    out = {}
    for k, first in items[0].items():
        vals = [it[k] for it in items]
        if isinstance(first, torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(first, str | bytes):
            out[k] = vals
        else:
            out[k] = np.stack([np.asarray(v) for v in vals])
    return out


class UnitWriter(threading.Thread):
    """Writes finished units from a bounded queue, so storing overlaps the teacher's forward."""

    def __init__(self, writer: StoreWriter, depth: int = 4) -> None:
        super().__init__(name="store-writer", daemon=True)
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:  # after a failure, drain without writing
                try:
                    self.writer.write_unit(*job)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def put(self, unit: int, arrays: dict) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put((unit, arrays))

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _concat(parts: list) -> object:
    """Batches of one field joined: arrays concatenated, lists (encoded crops) chained."""
    if isinstance(parts[0], list):
        return [x for p in parts for x in p]
    return np.concatenate(parts)


def store_bytes(writer: StoreWriter) -> int:
    """Bytes of every file of the store (local directory or object store)."""
    return writer.location.tree_bytes()


def _open_store(
    out: str, meta: StoreMeta, world_size: int, rank: int, options: dict | None, fit=None
) -> StoreWriter:
    """Create or reopen the store; under torchrun rank 0 creates it (and fits a compact
    store's bases with `fit`), the others wait."""
    if world_size == 1:
        return StoreWriter.create_or_open(out, meta, fit=fit, **(options or {}))
    first = StoreWriter.create_or_open(out, meta, fit=fit, **(options or {})) if rank == 0 else None
    wait_for_ranks("rank 0 to create or open the store")
    return first or StoreWriter.create_or_open(out, meta, **(options or {}))


def fit_tokens(setup: DumpSetup, teacher: nn.Module, dev: torch.device, batch_size: int):
    """The `fit` a compact store is created with: the teacher's tokens on the given samples,
    rendered and batched as the dump renders them (batches from the unit's first slot), rows
    of unreadable images left out. Runs only when the store is created."""

    def fit(samples: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        batches = [list(range(b, min(b + batch_size, len(samples))))
                   for b in range(0, len(samples), batch_size)]  # fmt: skip
        plan = DumpPlan([], [], samples=samples, batches=batches)
        tokens = [o for o in setup.outputs if o != "heatmaps"]
        parts: dict[str, list] = {o: [] for o in tokens}
        loader = dump_loader(setup, plan, setup.meta, setup.meta.seed, 0, dev)
        for batch in progress(loader, len(batches), "fit compact bases", "batches"):
            result = _forward(teacher, batch["images"], dev)
            ok = np.array([not e for e in batch["error"]])
            for o in tokens:
                parts[o].append(getattr(result, o).float().cpu().numpy()[ok])
        return {o: np.concatenate(p) for o, p in parts.items()}

    return fit


@dataclass
class DumpPlan:
    """This process's share of a dump: the pending units it claimed, their real slots as
    `samples` (slot, instance index, view), and forward batches (indices into `samples`) that
    never cross a unit and always start at the same slot of it."""

    units: list[int]
    elsewhere: list[int]  # pending units another dump of this store claimed first
    samples: list[tuple[int, int, int]] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    unit_of_batch: list[int] = field(default_factory=list)
    unit_size: dict[int, int] = field(default_factory=dict)


def plan_dump(writer: StoreWriter, shard: tuple[int, int], batch_size: int) -> DumpPlan:
    """Claim shard `shard`'s pending units of the store and align forward batches to them."""
    # writers started together on one store split its units instead of racing on them
    return plan_units(writer, *writer.claim(writer.pending_units(shard=tuple(shard))), batch_size)


def plan_units(
    writer: StoreWriter, units: list[int], elsewhere: list[int], batch_size: int
) -> DumpPlan:
    """The plan of claimed `units`: their samples and forward batches aligned to them."""
    plan = DumpPlan(units, elsewhere)
    for unit in units:
        first = len(plan.samples)
        lo, _ = writer.unit_slots(unit)
        view = writer.unit_view(unit)
        # Real slots only (padding closes a view block); rows in unit_instances order.
        for j, index in enumerate(writer.unit_instances(unit)):
            plan.samples.append((lo + j, int(index), view))
        plan.unit_size[unit] = len(plan.samples) - first
        for b in range(first, len(plan.samples), batch_size):
            plan.batches.append(list(range(b, min(b + batch_size, len(plan.samples)))))
            plan.unit_of_batch.append(unit)
    return plan


@dataclass
class DumpTally:
    """What the loop did: samples written and skipped, seconds in the teacher and in all."""

    written: int = 0
    skipped: int = 0
    forward_s: float = 0.0
    loop_s: float = 0.0


def _forward(teacher: nn.Module, images: torch.Tensor, dev: torch.device) -> object:
    """The teacher's outputs for one batch: eval, inference_mode, autocast, channels_last."""
    dtype = amp_dtype(dev)
    images = images.to(dev, non_blocking=True)
    if dev.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with (
        torch.inference_mode(),
        torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
    ):
        return teacher(images)


def run_batch(
    teacher: nn.Module,
    batch: dict,
    outputs: tuple[str, ...],
    dev: torch.device,
    writer: StoreWriter,
    tally: DumpTally,
) -> dict:
    """One loader batch with the teacher's `outputs` added (float32 numpy, [B, ...]); samples
    whose image could not be read get zero outputs (their zero weights mark them invalid)."""
    t0 = time.perf_counter()
    result = _forward(teacher, batch.pop("images"), dev)
    for output in outputs:
        batch[output] = getattr(result, output).float().cpu().numpy()
    tally.forward_s += time.perf_counter() - t0  # .cpu() waited for the device
    for i, err in enumerate(batch["error"]):  # the writer records these in the unit's marker
        if err:  # the image could not be read: mark the sample invalid
            tally.skipped += 1
            slot, index = int(batch["slot"][i]), int(batch["instance"][i])
            view = writer.slot_instance(slot)[1]
            log.warning(f"skipped slot {slot} (instance {index}, view {view}): {err}")
            for output in outputs:
                batch[output][i] = 0
    return batch


def unit_arrays(parts: list[dict]) -> dict:
    """The batches of one unit joined into the arrays `StoreWriter.write_unit` takes."""
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}


def dump_loop(
    teacher: nn.Module,
    loader: DataLoader,
    plan: DumpPlan,
    writer: StoreWriter,
    outputs: tuple[str, ...],
    dev: torch.device,
    name: str,
) -> DumpTally:
    """Run the teacher over `plan`'s batches and hand each finished unit to the writer thread;
    returns once every unit, this process's and those claimed elsewhere, is in the store."""
    tally = DumpTally()
    parts: list[dict] = []
    unit_writer = UnitWriter(writer)
    loop_start = time.perf_counter()
    try:
        with ProgressCounter(len(plan.samples), f"dump {name}", "samples") as bar:
            for unit, batch in zip(plan.unit_of_batch, loader, strict=True):
                batch = run_batch(teacher, batch, outputs, dev, writer, tally)
                parts.append(batch)
                bar.advance(len(batch["slot"]))
                if sum(len(p["slot"]) for p in parts) == plan.unit_size[unit]:
                    unit_writer.put(unit, unit_arrays(parts))
                    tally.written += plan.unit_size[unit]
                    parts = []
    finally:
        unit_writer.close()
        writer.release()
    writer.wait_for(plan.elsewhere)  # units another dump of this store took: done when they are
    tally.loop_s = time.perf_counter() - loop_start
    return tally


def dump_summary(
    run: DumpRun, plan: DumpPlan, tally: DumpTally, elapsed: float, info: dict
) -> dict:
    """The run summary (returned and printed as one stderr line); `info`: shard, teacher,
    device, pixels, bytes."""
    out, written, loop_s = run.out, tally.written, tally.loop_s
    summary = {
        "store": str(out),
        "samples": written,
        "views": run.views,
        "units": len(plan.units),
        "shard": info["shard"],
        "bytes": info["bytes"],
        "time_s": round(elapsed, 3),
        "samples_per_s": round(written / max(elapsed, 1e-9), 1),
        # the pipeline alone, without loading the teacher, annotations and store
        "loop_samples_per_s": round(written / max(loop_s, 1e-9), 1),
        # share of the loop spent in the teacher (transfer, forward, copy back): the rest is
        # waiting for data or for the writer
        "forward_share": round(tally.forward_s / max(loop_s, 1e-9), 3),
        "skipped": tally.skipped,
        "teacher": info["teacher"],
        "device": info["device"],
        "pixels": info["pixels"],
    }
    print(
        f"dump-teacher: {written} samples ({len(plan.units)} units, views={run.views}, shard "
        f"{summary['shard']}) -> {out} [{summary['bytes'] / 2**20:.1f} MiB] in {elapsed:.1f} s "
        f"({summary['samples_per_s']} samples/s), {tally.skipped} skipped",
        file=sys.stderr,
    )
    return summary


class DumpSetup(NamedTuple):
    """What every process of a dump derives from its run: the teacher (eval, on the CPU), its
    config, the instances, the crop recipe, the outputs to store and the store's metadata."""

    teacher: nn.Module
    config: object
    instances: list[PersonInstance]
    recipe: AugmentRecipe
    outputs: tuple[str, ...]
    meta: StoreMeta


def dump_setup(
    run: DumpRun, shard: tuple[int, int] | None = None, teacher: nn.Module | None = None
) -> DumpSetup:
    """Check the run's numbers, load its teacher (unless given) and instances, and describe
    its store."""
    shard, views, batch_size = tuple(shard or run.shard), run.views, run.batch_size
    if not (0 <= shard[0] < shard[1]) or batch_size < 1 or views < 1:
        raise BadConfigError(
            f"shard={shard}, batch_size={batch_size}, views={views}; expected 0 <= i < n, "
            "batch_size >= 1, views >= 1"
        )
    teacher = teacher if teacher is not None else load_teacher(run.teacher_ckpt, run.model)
    cfg = teacher.config
    recipe = run.recipe or AugmentRecipe()
    instances = load_coco_instances(run.ann_file, run.image_root, train=True)[: run.max_instances]
    if not instances:
        raise BadConfigError(
            f"{run.ann_file}: no trainable person instances; expected at least one"
        )
    outputs = TEACHER_OUTPUTS if cfg.has_tokens else ("heatmaps",)  # what the teacher gives
    # `auto` pixels and `compact` targets: an existing store keeps its own format
    # (store.pixels.choose_pixels, store.schema.dump_mode)
    options = run.storage_options or {}
    looks = run.pixels == "auto" or run.mode == "compact"
    stored = existing_meta(str(run.out), **options) if looks else None
    mode = dump_mode(run.mode, stored and stored.mode)
    chunk_samples, shard_chunks = default_layout(mode)  # unless the run names them
    meta = StoreMeta(
        teacher_name=cfg.name,
        teacher_sha256=file_sha256(run.teacher_ckpt),
        num_instances=len(instances),
        views=views,
        seed=run.seed,
        geometry=cfg.geometry,
        token_dim=cfg.dim if cfg.has_tokens else 0,  # no tokens: no token sizes
        teacher_outputs=outputs,
        num_keypoints=cfg.num_keypoints,
        recipe=recipe.to_dict(),
        ann_digest=annotation_digest(run.ann_file),
        ann_file=run.ann_file,
        image_root=run.image_root,
        mode=mode,
        chunk_samples=run.chunk_samples or chunk_samples,
        shard_chunks=run.shard_chunks or shard_chunks,
        pixels=choose_pixels(run.pixels, views, stored.pixels if stored else None),
        jpeg_quality=JPEG_QUALITY if run.jpeg_quality is None else run.jpeg_quality,
        targets_zstd=run.targets_zstd,
        extra={"teacher_ckpt": run.teacher_ckpt, "batch_size": batch_size},
    )
    return DumpSetup(teacher, cfg, instances, recipe, outputs, meta)


def on_device(teacher: nn.Module, dev: torch.device) -> nn.Module:
    """The teacher on `dev` (channels_last on CUDA, the layout its convolutions run fastest in)."""
    teacher = teacher.to(dev)
    return teacher.to(memory_format=torch.channels_last) if dev.type == "cuda" else teacher


def dump_loader(
    setup: DumpSetup, plan: DumpPlan, meta: StoreMeta, seed: int, workers: int, dev
) -> DataLoader:
    """Batches of `plan` rendered by `workers` processes (0: in this process), with the pixels
    of the store `meta` describes."""
    cfg = setup.config
    dataset = DumpCrops(
        setup.instances, plan.samples, setup.recipe, seed, cfg.input_size, cfg.num_keypoints,
        pixels=meta.pixels, jpeg_quality=meta.jpeg_quality,
    )  # fmt: skip
    return DataLoader(
        dataset,
        batch_sampler=plan.batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def dump_teacher(run: DumpRun) -> dict:
    """Fill store `run.out` with the teacher's outputs on `run.views` seeded crops of every
    instance.

    pixels: "auto" (default: `store.pixels.choose_pixels`, canvas from 3 views on, else jpeg;
    an existing store keeps its own), "jpeg" or "lossless" keeps each crop's pixels in the store
    (the teacher runs on the decoded crop) so students train without the images; "canvas" each
    person's canvas once; "none" keeps only specs.
    targets_zstd=False keeps fp16 teacher outputs uncompressed (8% larger, faster to read).
    mode: "fp16", "lossy", "lossy16" or a compact mode (`store.schema.COMPACT`; "compact" is
    `DEFAULT_COMPACT` for a new store, an existing compact store's own: `dump_mode`), whose
    token bases are fitted on the teacher's outputs for the store's first slots when this run
    creates the store (`fit_tokens`), then kept.

    Returns the summary: store, samples, views, units, shard, bytes, time_s, samples_per_s,
    loop_samples_per_s, forward_share, skipped, teacher, device. `shard=(i, n)` takes every
    n-th unit (under torchrun, rank i of n). Write units hold `chunk_samples * shard_chunks`
    samples (the store may shrink `shard_chunks` for a small dataset); forward batches of
    `batch_size` never cross a unit. An existing store keeps its own layout; a rerun must use
    the same batch size and device for a bit-identical result.
    """
    rank, world_size, local_rank = world()
    shard, batch_size = tuple(run.shard), run.batch_size
    if world_size > 1:
        shard = (rank, world_size)
    if run.cluster is not None:  # the cluster path imports this module, not the other way
        raise BadConfigError(
            f"cluster={run.cluster!r} given to teacher_dump.dump.dump_teacher, which runs here; "
            "expected teacher_dump.dump_teacher (it hands the run to teacher_dump.cluster)"
        )
    start = time.perf_counter()
    out = str(run.out)  # a path or a URL (s3://...): never through Path, which folds "//"
    dev = resolve_device(run.device, local_rank)
    setup = dump_setup(run, shard)
    cfg = setup.config
    # barriers are all the ranks need from each other: gloo, also on CUDA
    own_group = world_size > 1 and init_group(dev, "gloo")
    teacher = on_device(setup.teacher, dev)
    fit = fit_tokens(setup, teacher, dev, batch_size)
    writer = _open_store(out, setup.meta, world_size, rank, run.storage_options, fit)
    plan = plan_dump(writer, shard, batch_size)
    loader = dump_loader(setup, plan, writer.meta, run.seed, run.workers, dev)
    name = out.rstrip("/").rsplit("/")[-1]
    tally = dump_loop(teacher, loader, plan, writer, setup.outputs, dev, name)
    if world_size > 1:
        wait_for_ranks("every rank's units of the dump")  # the store is finished with the last
        if own_group:
            dist.destroy_process_group()
    if rank == 0:  # signs what a writer stopped before signing left (and object stores' races)
        writer.sign_units()

    info = {
        "shard": f"{shard[0]}/{shard[1]}",
        "teacher": cfg.name,
        "device": str(dev),
        "pixels": writer.meta.pixels,
        "bytes": store_bytes(writer),
    }
    return dump_summary(run, plan, tally, time.perf_counter() - start, info)
