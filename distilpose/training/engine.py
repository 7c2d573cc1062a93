"""The one training loop, shared by teacher (heatmap) and student (distillation) training.

A run is a `TrainConfig`, a model, a `task(model, batch) -> {"loss": ..., "loss_x": ...}` (timm
style: the loop backpropagates "loss" and logs every other entry) and a `batches(epoch)` callable
giving that epoch's batches (dicts of tensors). A task that is an `nn.Module` may hold parameters
and buffers of its own (the student's RLE flow, its teacher-forward count): its parameters are
optimized with the model's (their gradients averaged over ranks, as DDP averages the model's),
and its state is saved in last.pth and restored on resume. `Trainer.fit` writes into the run
directory:

    config.json       the train config and the caller's full resolved config (`meta`), to replay,
                      and the stage's run object ("run", `distilpose.training.runs`) that
                      --resume reads
    metrics.csv       one row per `log_every` steps ("step") and per epoch ("epoch"): epoch, step,
                      lr, each loss term, samples/s, and whatever `on_epoch_end` returned
    train.log         the same as text lines
    last.pth          model, optimizer, grad scaler, epoch/step and RNG states, the EMA weights,
                      the best validation AP so far, the task module's state (atomic, loads
                      with weights_only=True);
                      every `ckpt_every` epochs and `ckpt_every_steps`
    best.pth          with a `validate` function: the weights (the EMA's, with `ema_decay`) of
                      the epoch with the highest validation AP so far
    loss_curves.png   one line per loss term, log y: drawn by the stage's `on_save` hook
                      (`distilpose.viz.curves.draw_run_loss_curves`), so this loop imports no
                      drawing code

Exact resume: every epoch starts with torch/numpy/random seeded from (seed, epoch), so an
epoch's batches and random ops depend only on the epoch; a mid-epoch checkpoint also stores the
RNG states, and resuming replays (and discards) the epoch's first batches before restoring them.
A CPU run interrupted and resumed ends with weights equal to an uninterrupted one (tested).

Learning rate (the paper's recipe, as MMPose's `step` policy with linear warmup): Adam at `lr`,
linear warmup from `lr * warmup_ratio` over `warmup_iters` steps, x`gamma` when the epoch reaches
each of `milestones` (fractions of `epochs`: 2/3 and 13/15 of 300 are epochs 200 and 260). The lr
is a pure function of (epoch, step), so the "scheduler" needs no state beyond those two numbers.

Global batch and lr rule: one optimizer step sees batch_size x processes x accum_steps crops
(the global batch). `lr_scale="linear"` (Goyal et al.) trains at lr x global batch /
REFERENCE_BATCH, where REFERENCE_BATCH = 512 is the batch the paper's lr is for (8 GPUs x 64);
"none" trains at `lr` whatever the batch. The run's first log line states both.

Gradient accumulation (`accum_steps` K): each optimizer step averages the gradients of K
consecutive batches (each loss / K); checkpoints are written only between optimizer steps, so
`epoch_step` (batches consumed) is always a multiple of K there. An epoch whose batch count is
not a multiple of K ends with one step over its last batches.

EMA (`ema_decay` d, timm's ModelEmaV2): after each optimizer step every floating tensor of the
state dict (weights and BatchNorm statistics) becomes d x ema + (1 - d) x model. With a
`validate` function, the EMA weights are the ones validated and kept in best.pth.

Validation: every `val_every` epochs and after the last, rank 0 calls `validate(model)`, which
returns metrics with "AP"; they land in the epoch row as val_AP, ... . Other ranks wait at a
barrier whose timeout (`distributed.barrier_timeout()`, 3 h) allows a COCO-size validation.

Short runs (the demo) may use `schedule="cosine"` instead: after the warmup, the lr follows
half a cosine from `lr` to 0 over `total_steps`, step by step.

Several processes: launched by torchrun (env RANK / WORLD_SIZE / LOCAL_RANK) the trainer joins
the process group (nccl on CUDA, gloo otherwise), makes BatchNorm cross-rank (`sync_bn`) and
wraps the model in DistributedDataParallel; only rank 0 writes files. `batches` gives this
rank's slice of each global batch (`distilpose.training.distributed`: R ranks x batch B train
the same run as one process with batch R x B, up to rounding; tested under torchrun on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilpose.device import resolve_device
from distilpose.errors import BadCheckpointError, BadConfigError
from distilpose.io import MetricsLog, write_text_atomic
from distilpose.progress import ProgressCounter
from distilpose.training.distributed import (
    across_ranks,
    average_gradients,
    init_group,
    mean_over_ranks,
    sync_batchnorm,
    wait_for_ranks,
    world,
)
from distilpose.training.runs import PER_INVOCATION, run_changes

log = logging.getLogger(__name__)

SAVE_HOOK_EVERY_S = 30.0  # `on_save` (a plot costs ~0.2 s) runs at checkpoints at most this often
Task = Callable[[nn.Module, dict], dict]
Batches = Callable[[int], Iterable[dict]]
Validate = Callable[[nn.Module], dict]  # model -> metrics with "AP" (COCO keypoint AP, 0-1)
REFERENCE_BATCH = 512  # the global batch the paper's lr 1e-3 is for: 8 GPUs x 64 crops
OnSave = Callable[[Path], None]  # run_dir -> None; e.g. redraws loss_curves.png from metrics.csv


@dataclass
class TrainConfig:
    epochs: int = 300  # paper Sec. 4.1: 300 epochs
    batch_size: int = 64  # paper: 64 images per GPU (used by the batches callable)
    lr: float = 1e-3  # paper: Adam, base learning rate 1e-3
    warmup_iters: int = 500  # MMPose TokenPose/DistilPose configs: linear warmup, 500 iterations
    warmup_ratio: float = 1e-3  # MMPose default: the warmup starts at lr * 0.001
    milestones: tuple[float, ...] = (2 / 3, 13 / 15)  # paper: x0.1 at epochs 200 and 260 of 300
    gamma: float = 0.1  # paper: 1e-3 -> 1e-4 -> 1e-5
    schedule: str = "step"  # "step": the paper's milestones; "cosine": lr -> 0 over total_steps
    total_steps: int = 0  # "cosine" only: the run's optimizer steps (epochs x batches per epoch)
    weight_decay: float = 0.0  # official configs: plain Adam, no weight decay
    clip_grad: float | None = None  # official configs: grad_clip=None
    device: str = "auto"  # CUDA when available, else CPU
    amp: bool = True  # CUDA only: bf16 autocast where supported, else fp16 with a GradScaler
    amp_dtype: str = "auto"  # "auto", "bf16" or "fp16"
    channels_last: bool = False  # CUDA only: NHWC layout, faster convolutions on tensor cores
    sync_bn: bool = True  # several processes: BatchNorm statistics over the global batch
    seed: int = 0  # each epoch reseeds from (seed, epoch): reproducible and exactly resumable
    num_workers: int = 2  # DataLoader worker processes (used by the batches callable)
    log_every: int = (
        20  # steps per metrics.csv step row (MMPose logs every 50; small runs need more)
    )
    ckpt_every: int = 1  # epochs between last.pth checkpoints; the final epoch always saves
    ckpt_every_steps: int = 0  # > 0: also checkpoint mid-epoch (long epochs, preemptible machines)
    accum_steps: int = 1  # batches per optimizer step: a larger global batch on fewer GPUs
    ema_decay: float | None = None  # EMA of the weights (timm's default 0.9998); None: no EMA
    lr_scale: str = "none"  # "linear": lr x global batch / REFERENCE_BATCH; "none": lr as given
    val_every: int = 1  # epochs between validations (with a validate function); the last always

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)  # JSON gives lists
        if self.schedule not in ("step", "cosine") or (
            self.schedule == "cosine" and self.total_steps < 1
        ):
            raise BadConfigError(
                f"TrainConfig: schedule={self.schedule!r}, total_steps={self.total_steps}; "
                "expected 'step', or 'cosine' with total_steps > 0"
            )
        if self.lr_scale not in ("linear", "none") or self.accum_steps < 1 or self.val_every < 1:
            raise BadConfigError(
                f"TrainConfig: lr_scale={self.lr_scale!r}, accum_steps={self.accum_steps}, "
                f"val_every={self.val_every}; expected 'linear' or 'none', and counts >= 1"
            )
        if self.epochs < 1 or self.lr <= 0 or self.log_every < 1 or self.ckpt_every < 1:
            raise BadConfigError(
                f"TrainConfig: epochs={self.epochs}, lr={self.lr}, log_every={self.log_every}, "
                f"ckpt_every={self.ckpt_every}; expected epochs, lr, log_every, ckpt_every > 0"
            )


def scaled_lr(config: TrainConfig, global_batch: int) -> float:
    """The peak lr a run trains at: `config.lr`, times global_batch / REFERENCE_BATCH when
    `lr_scale` is "linear"."""
    if config.lr_scale == "linear":
        return config.lr * global_batch / REFERENCE_BATCH
    return config.lr


def lr_at(config: TrainConfig, epoch: int, step: int, peak: float | None = None) -> float:
    """Learning rate of global step `step` in epoch `epoch` (both 0-based); `peak`: the lr
    after the warmup (default `config.lr`; the Trainer passes `scaled_lr`)."""
    peak = config.lr if peak is None else peak
    if config.schedule == "cosine":  # short runs: a smooth decay instead of two late drops
        t = min(step / config.total_steps, 1.0)
        lr = peak * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        decays = sum(epoch >= round(m * config.epochs) for m in config.milestones)
        lr = peak * config.gamma**decays
    if step < config.warmup_iters:  # MMCV linear warmup
        lr *= 1 - (1 - step / config.warmup_iters) * (1 - config.warmup_ratio)
    return lr


def amp_dtype(
    device: torch.device, enabled: bool = True, prefer: str = "auto"
) -> torch.dtype | None:
    """bf16 where the GPU supports it (no loss scaling needed), fp16 otherwise; None on CPU.

    prefer: "auto", or "bf16" / "fp16" to choose (fp16 trains with a GradScaler).
    """
    if not enabled or device.type != "cuda":
        return None
    if prefer == "fp16":
        return torch.float16
    if prefer == "bf16" or (prefer == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch (all devices), numpy's and Python's global RNGs from (seed, epoch)."""
    s = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def rng_state() -> dict:
    """Global RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": gauss,
        },
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Tensors of `batch` moved to `device`; 4-D floats in NHWC layout when `channels_last`."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)  # layout only, same values
        out[k] = v
    return out


def batch_len(batch: dict) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


class Meter:
    """Running means of the loss terms; sums stay on the device (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.samples = 0
        self.resumed_samples = 0  # counted before a resume: not part of this process's rate
        self.start = time.perf_counter()

    def add(self, losses: dict, samples: int) -> None:
        for k, v in losses.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.steps += 1
        self.samples += samples

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}

    def rate(self) -> float:
        return (self.samples - self.resumed_samples) / max(time.perf_counter() - self.start, 1e-9)

    def state_dict(self) -> dict:
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "steps": self.steps,
            "samples": self.samples,
        }

    @classmethod
    def from_state(cls, state: dict | None) -> Meter:
        m = cls()
        if state:
            m.sums = {k: torch.tensor(v) for k, v in state["sums"].items()}
            m.steps, m.samples = int(state["steps"]), int(state["samples"])
            m.resumed_samples = m.samples
        return m


class _NoBar:
    """Ranks other than 0 draw no progress bar."""

    def advance(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class ModelEma:
    """An exponential moving average of a model (timm's ModelEmaV2): after each optimizer step
    every floating state-dict tensor becomes decay x ema + (1 - decay) x model; integer ones
    (BatchNorm's num_batches_tracked) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = zip(self.module.state_dict().values(), model.state_dict().values(), strict=True)
        for ema, now in pairs:
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(now.detach(), alpha=1.0 - self.decay)
            else:
                ema.copy_(now)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


VAL_COLUMNS = ("AP", "AP50", "AP75", "APm", "APl", "AR")  # validate's metrics in metrics.csv


class Trainer:
    """Adam + warmup/step decay over `batches(epoch)`, AMP and DDP on CUDA, exact resume;
    optionally gradient accumulation, an EMA of the weights and validation with best.pth."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        batches: Batches,
        config: TrainConfig,
        run_dir: str | Path,
        meta: dict | None = None,
        on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
        find_unused_parameters: bool = False,
        run: dict | None = None,
        validate: Validate | None = None,
        on_save: OnSave | None = None,
    ) -> None:
        self.config, self.task, self.batches = config, task, batches
        self.run_dir, self.meta, self.on_epoch_end = Path(run_dir), dict(meta or {}), on_epoch_end
        # the stage's run object as a dict (distilpose.training.runs), read by --resume
        self.run = run
        self.validate = validate
        self.on_save = on_save
        self.rank, self.world_size, local_rank = world()
        self.device = resolve_device(config.device, local_rank)
        self.amp_dtype = amp_dtype(self.device, config.amp, config.amp_dtype)
        self.channels_last = config.channels_last and self.device.type == "cuda"
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            init_group(self.device)  # its GPU current first; barriers with a stated timeout
            if config.sync_bn:  # same state-dict keys: checkpoints do not change
                self.model = sync_batchnorm(self.model, self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: a loss subset may leave heads without gradients.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        # A task module's parameters (RLE's flow) are trained with the model's but live outside
        # it: not in student.pth, not in the EMA, their gradients averaged over ranks by hand.
        self.task_module = task.to(self.device) if isinstance(task, nn.Module) else None
        task_params = self.task_module.parameters() if self.task_module is not None else ()
        self.task_params = [p for p in task_params if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad] + self.task_params
        self.global_batch = config.batch_size * self.world_size * config.accum_steps
        self.peak_lr = scaled_lr(config, self.global_batch)
        self.optimizer = torch.optim.Adam(
            self.params, lr=self.peak_lr, weight_decay=config.weight_decay
        )
        self.ema = ModelEma(self.model, config.ema_decay) if config.ema_decay else None
        self.best_ap, self.best_epoch = -math.inf, 0  # best validation AP and its epoch (1-based)
        # Loss scaling is for fp16 only; disabled, the scaler passes everything through.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch = 0  # epochs completed = the next epoch to run
        self.step = 0  # optimizer steps completed, over the whole run
        self.epoch_step = 0  # batches consumed in the current (unfinished) epoch
        self._resume_rng: dict | None = None
        self._hooked = -math.inf
        self._epoch_meter = Meter()  # this epoch's running means, kept across a mid-epoch resume
        self.metrics = MetricsLog(self.run_dir / "metrics.csv")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything to continue exactly; tensors and plain values only."""
        return {
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {
                "epoch": self.epoch,
                "step": self.step,
                "lr": lr_at(self.config, self.epoch, self.step, self.peak_lr),
                "peak_lr": self.peak_lr,
                "global_batch": self.global_batch,
            },
            "epoch": self.epoch,
            "step": self.step,
            "epoch_step": self.epoch_step,
            "world_size": self.world_size,  # a mid-epoch resume needs the same global batch
            "epoch_meter": self._epoch_meter.state_dict(),  # the epoch row's means after resume
            # saved only between optimizer steps: epoch_step is a multiple of accum_steps
            "accum_steps": self.config.accum_steps,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best": {"AP": self.best_ap, "epoch": self.best_epoch},
            "rng": rng_state(),
            "train_config": asdict(self.config),
            "task": self._task_state(),
        }

    def _task_state(self) -> dict | None:
        """The task module's parameters and buffers (None: a plain function, or no state)."""
        if self.task_module is None or not self.task_module.state_dict():
            return None
        return {k: v.detach().cpu() for k, v in self.task_module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.epoch_step = int(state.get("epoch_step", 0))
        self._resume_rng = state.get("rng") if self.epoch_step else None
        self._epoch_meter = Meter.from_state(state.get("epoch_meter") if self.epoch_step else None)
        if self.ema is not None:
            if state.get("ema") is None:
                raise KeyError("no EMA weights in the checkpoint; resume without --ema")
            self.ema.load_state_dict(state["ema"])
        if state.get("task") is not None:
            self.task_module.load_state_dict(state["task"])
        elif self.task_params:  # trained parameters (RLE's flow) cannot be made up
            raise KeyError("no task state (the RLE flow) in it; resume without that loss")
        elif self._task_state() is not None:  # a checkpoint saved before tasks kept state
            log.warning("resume: the checkpoint keeps no task state; its counters restart at 0")
        best = state.get("best") or {}
        self.best_ap = float(best.get("AP", -math.inf))
        self.best_epoch = int(best.get("epoch", 0))

    def save(self) -> Path:
        """Atomically write run_dir/last.pth and run `on_save` (rank 0 only)."""
        from distilpose.models import save_checkpoint

        path = self.run_dir / "last.pth"
        if self.is_main:
            state = self.state_dict()
            save_checkpoint(
                path,
                self.model,
                meta=self.meta,
                extra={k: v for k, v in state.items() if k != "state_dict"},
            )
            # With the checkpoint, but at most every SAVE_HOOK_EVERY_S.
            if time.perf_counter() - self._hooked >= SAVE_HOOK_EVERY_S:
                self._run_save_hook()
        return path

    def _run_save_hook(self) -> None:
        if self.on_save is not None:
            self.on_save(self.run_dir)
        self._hooked = time.perf_counter()

    def _resume(self) -> None:
        path = self.run_dir / "last.pth"
        if not path.exists():
            log.info(f"resume: no {path} yet; starting from scratch")
            return
        try:
            # CPU first: RNG states must stay CPU tensors; the optimizer moves its own state.
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadCheckpointError(f"{path}: cannot resume ({first})") from e
        self._check_global_batch(path, state)
        old = state.get("train_config", {})
        changed = [k for k, v in asdict(self.config).items() if k in old and old[k] != v]
        if changed:
            log.warning(f"resume: train config differs from the checkpoint's in {changed}")
        if self.run is not None:
            changed = [k for k in run_changes(self.run_dir, self.run) if k not in PER_INVOCATION]
            if changed:
                log.warning(f"resume: run differs from the one saved in config.json in {changed}")
        log.info(f"resume: {path} at epoch {self.epoch}, step {self.step}")

    def _check_global_batch(self, path: Path, state: dict) -> None:
        """A mid-epoch checkpoint resumes only with its global batch: the epoch's batches are
        planned for the global batch, so replaying `epoch_step` batches of another one would
        skip or repeat samples. At an epoch boundary nothing is replayed: the run continues
        exactly where it stopped, with the new world size (logged)."""
        saved = (state.get("scheduler") or {}).get("global_batch")
        ranks = state.get("world_size")  # absent in checkpoints written before it was saved
        if saved is None or int(saved) == self.global_batch:
            if ranks is not None and int(ranks) != self.world_size:
                log.info(f"resume: {ranks} process(es) before, {self.world_size} now")
            return
        before = f"{ranks} process(es)" if ranks is not None else "the saved run"
        now = f"{self.world_size} process(es) x batch {self.config.batch_size}"
        if self.epoch_step:
            raise BadCheckpointError(
                f"{path}: saved mid-epoch (epoch {self.epoch + 1}, after {self.epoch_step} "
                f"batches) by {before} with a global batch of {saved}; {now} x "
                f"{self.config.accum_steps} accumulation is a global batch of "
                f"{self.global_batch}, which would skip or repeat samples; expected the same "
                "number of processes, --batch-size and --accum-steps until the epoch ends"
            )
        log.warning(
            f"resume: at the start of epoch {self.epoch + 1} the global batch changes from "
            f"{saved} ({before}) to {self.global_batch} ({now})"
        )

    # ---- loop -------------------------------------------------------------------------------
    def train_step(self, batch: dict, step_now: bool = True) -> dict:
        """Forward and backward of one batch (its loss / accum_steps); with `step_now` (the
        accumulation's last batch) the optimizer step. Returns the task's loss dict."""
        batch = to_device(batch, self.device, self.channels_last)
        # DDP: gradients are all-reduced only with the backward of the step's last batch
        accumulating = self.world_size > 1 and not step_now
        with self.train_model.no_sync() if accumulating else contextlib.nullcontext():
            with (
                torch.autocast(
                    self.device.type,
                    dtype=self.amp_dtype or torch.bfloat16,
                    enabled=self.amp_dtype is not None,
                ),
                across_ranks(self.world_size > 1),  # normalisers and BatchNorm: global batch
            ):
                losses = self.task(self.train_model, batch)
            self.scaler.scale(losses["loss"] / self.config.accum_steps).backward()
        if step_now:
            self.optimizer_step()
        if self.world_size > 1:  # log the global batch's losses, not rank 0's slice
            scalars = {k: v for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1}
            losses = {**losses, **mean_over_ranks(scalars)}
        return losses

    def optimizer_step(self) -> None:
        """Adam on the accumulated gradients at this step's lr, then the EMA update."""
        lr = lr_at(self.config, self.epoch, self.step, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.world_size > 1 and self.task_params:  # DDP averages only the model's
            average_gradients(self.task_params)
        if self.config.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    def _log_row(self, kind: str, meter: Meter, extra: dict | None = None) -> dict:
        means = meter.means()
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(
                f"{self.run_dir}: non-finite loss at epoch {self.epoch}, step {self.step}: "
                f"{means}; expected finite losses (lower lr or disable amp)"
            )
        row = {
            "kind": kind,
            "epoch": self.epoch,
            "step": self.step,
            "lr": f"{lr_at(self.config, self.epoch, max(self.step - 1, 0), self.peak_lr):.6g}",
            **{k: f"{v:.6g}" for k, v in means.items()},
            "samples_per_s": f"{meter.rate() * self.world_size:.1f}",
            **(extra or {}),
        }
        if self.is_main:
            self.metrics.append(row)
            terms = " ".join(f"{k}={v}" for k, v in row.items() if k.startswith("loss"))
            log.info(
                f"{kind} epoch {self.epoch} step {self.step} lr {row['lr']} {terms} "
                f"{row['samples_per_s']} samples/s"
            )
        return row

    def train_epoch(self) -> dict:
        """Run (the rest of) epoch `self.epoch`; returns its metrics row."""
        cfg = self.config
        seed_epoch(cfg.seed, self.epoch)
        data = self.batches(self.epoch)
        try:
            total = len(data) * cfg.batch_size  # type: ignore[arg-type]
        except TypeError:  # an iterable (or a DataLoader over one) of unknown length
            total = None
        it = iter(data)
        for _ in range(self.epoch_step):  # resumed mid-epoch: these were trained before the kill
            next(it)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        self.train_model.train()
        window, epoch_meter = Meter(), self._epoch_meter
        desc = f"epoch {self.epoch + 1}/{cfg.epochs}"
        with ProgressCounter(total, desc, "samples") if self.is_main else _NoBar() as bar:
            bar.advance(self.epoch_step * cfg.batch_size)
            for batch in it:
                n = batch_len(batch)
                self.epoch_step += 1
                step_now = self.epoch_step % cfg.accum_steps == 0
                losses = self.train_step(batch, step_now)
                window.add(losses, n)
                epoch_meter.add(losses, n)
                bar.advance(n)
                if not step_now:
                    continue
                if self.step % cfg.log_every == 0:
                    self._log_row("step", window)
                    window = Meter()
                if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0:
                    self.save()
        if self.epoch_step % cfg.accum_steps:  # the epoch's last, shorter accumulation
            self.optimizer_step()
        if window.steps:
            self._log_row("step", window)
        extra = {}
        if self.on_epoch_end is not None and self.is_main:
            extra = self.on_epoch_end(self.epoch, self.model) or {}
            self.train_model.train()
        if self._validates_now() and self.is_main:
            extra.update(self._validate())
        if self.world_size > 1:  # the other ranks wait for rank 0's evaluation
            wait_for_ranks(f"rank 0's end of epoch {self.epoch + 1} (its validation, if any)")
        row = self._log_row("epoch", epoch_meter, extra)
        self.epoch += 1
        self.epoch_step = 0
        self._epoch_meter = Meter()
        if self.epoch % cfg.ckpt_every == 0 or self.epoch == cfg.epochs:
            self.save()
        return row

    def _validates_now(self) -> bool:
        every, done = self.config.val_every, self.epoch + 1
        return self.validate is not None and (done % every == 0 or done == self.config.epochs)

    def _validate(self) -> dict:
        """Validate the EMA (else the model); a new best AP rewrites best.pth. -> epoch row
        columns val_AP, ..., best_AP."""
        from distilpose.models import save_checkpoint

        model = self.ema.module if self.ema is not None else self.model
        metrics = self.validate(model)
        self.train_model.train()  # the EMA copy is never trained: it stays in eval mode
        ap = float(metrics["AP"])
        if ap > self.best_ap:
            self.best_ap, self.best_epoch = ap, self.epoch + 1
            best = {"AP": ap, "epoch": self.best_epoch, "ema": self.ema is not None}
            save_checkpoint(self.run_dir / "best.pth", model, meta={**self.meta, "best": best})
        log.info(
            f"validation epoch {self.epoch + 1}: AP {ap:.4f} (best {self.best_ap:.4f} at epoch "
            f"{self.best_epoch}){' EMA weights' if self.ema is not None else ''}"
        )
        row = {f"val_{k}": f"{float(metrics[k]):.6g}" for k in VAL_COLUMNS if k in metrics}
        return {**row, "best_AP": f"{self.best_ap:.6g}"}

    def fit(self, resume: bool = False) -> dict:
        """Train to `config.epochs`; with `resume`, continue exactly from run_dir/last.pth."""
        handler = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.is_main:
                handler = logging.FileHandler(self.run_dir / "train.log")
        except OSError as e:  # read-only or full disk, a file in the way: say so before training
            raise BadConfigError(
                f"{self.run_dir}: cannot write the run directory ({e.strerror or e}); "
                "expected a writable folder"
            ) from e
        if self.is_main:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        try:
            if resume:
                if self.is_main:  # temp files of atomic writes (distilpose.io) a kill cut short
                    for tmp in self.run_dir.glob(".*.tmp"):
                        tmp.unlink(missing_ok=True)
                self._resume()
            if self.is_main:
                done_epoch, done_step = self.epoch, self.step
                self.metrics.keep(
                    lambda r: (
                        int(r["step"]) <= done_step
                        if r["kind"] == "step"
                        else int(r["epoch"]) < done_epoch
                    )
                )
                self._write_config()
                cfg = self.config
                log.info(
                    f"global batch {self.global_batch} = {cfg.batch_size} per process x "
                    f"{self.world_size} process(es) x {cfg.accum_steps} accumulation step(s); "
                    f"lr {self.peak_lr:.6g} (lr_scale {cfg.lr_scale}: the given lr {cfg.lr:.6g}"
                    + (f" x {self.global_batch}/{REFERENCE_BATCH})" if cfg.lr_scale == "linear"
                       else f", the paper's lr is for a global batch of {REFERENCE_BATCH})")
                )  # fmt: skip
            start, row = time.perf_counter(), {}
            while self.epoch < self.config.epochs:
                row = self.train_epoch()
            if self.is_main:
                self._run_save_hook()
            return {
                "run_dir": str(self.run_dir),
                "checkpoint": str(self.run_dir / "last.pth"),
                "epochs": self.epoch,
                "steps": self.step,
                "time_s": round(time.perf_counter() - start, 3),
                "final": row,
                **(
                    {
                        "best": str(self.run_dir / "best.pth"),
                        "best_AP": self.best_ap,
                        "best_epoch": self.best_epoch,
                    }
                    if self.validate is not None
                    else {}
                ),
            }
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()

    def _write_config(self) -> None:
        doc = {
            "train_config": asdict(self.config),
            "meta": self.meta,
            **({"run": self.run} if self.run is not None else {}),
            "world_size": self.world_size,
            "device": str(self.device),
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            "torch": torch.__version__,
        }
        write_text_atomic(
            self.run_dir / "config.json", json.dumps(doc, indent=2, default=str) + "\n"
        )
