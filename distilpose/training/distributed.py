"""Several processes as one run: the global batch, its loss normalisers, and BatchNorm.

The rule (data-parallel training, DDP under torchrun): `--batch-size B` is per process and R
processes train on global batches of G = R * B samples. The global batches are exactly the ones a
single process with batch size G would draw, in the same order; each is cut into R contiguous
slices (`rank_share`) and rank r trains on slice r. So that the world size is an implementation
detail and not a different experiment, everything computed over a batch is computed over the
global batch:

- Loss normalisers. A mean over a masked set (visible joints, joints predicted inside the crop)
  is `sum / count` with the count taken over the global batch: `global_mean` all-reduces the
  count, and scales by R so that DDP's averaging of the gradients over ranks gives exactly
  `d(global sum / global count)`. Without this, each rank divides by its own count and a rank
  with few visible joints weighs them more than one process would.
- BatchNorm. Per-rank statistics over B samples differ from one process's over G, so under DDP
  the trainer converts BatchNorm to a cross-rank one by default (`sync_batchnorm`): torch's
  `SyncBatchNorm` on CUDA, and on CPU (gloo, where torch's has no kernel) `CrossRankBatchNorm2d`
  below, which all-reduces the per-channel sums with autograd. `TrainConfig.sync_bn=False`
  (`--no-sync-bn`) keeps per-GPU BatchNorm as MMPose's configs do at 64 crops per GPU: faster
  on many GPUs, but then R x B is not the same run as 1 x G.
- The logged losses are averaged over ranks (`mean_over_ranks`), so metrics.csv shows the
  global batch's loss whatever R is.

Joining (`init_group`): each process first makes its own GPU the current device
(`torch.cuda.set_device(local_rank)`, before any NCCL call: otherwise every rank's NCCL
communicator and current-device calls land on GPU 0), then joins the group with a stated
timeout, `barrier_timeout()` (DISTILPOSE_BARRIER_TIMEOUT, default 3 h: the other ranks wait at
a barrier while rank 0 validates on COCO val, and the dump's ranks for the slowest one; torch's
default would be 30 min). `wait_for_ranks(what)` is that barrier: past the timeout (or when a
rank died) it is one `RankError` line saying what it waited for.

The last global batch of an epoch may be short; `rank_share` spreads it (sizes differ by at
most one) so every sample is trained exactly once per epoch. If it has fewer samples than there
are ranks, a rank with nothing left trains on a copy of the batch's first sample with
`valid = False`: it counts in no loss (zero weight and not counted in any normaliser; only
cross-rank BatchNorm statistics see it), and every rank still takes the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distilpose.errors import RankError
from distilpose.limits import env_seconds

_ACROSS_RANKS = False  # set only inside a training step of a multi-process run
BARRIER_TIMEOUT_ENV = "DISTILPOSE_BARRIER_TIMEOUT"
BARRIER_TIMEOUT_S = 3 * 3600.0  # COCO val on rank 0 takes minutes; a slow dump rank, more


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process, from torchrun's environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def barrier_timeout() -> float:
    """Seconds a rank waits for the others: DISTILPOSE_BARRIER_TIMEOUT, default 3 hours."""
    return env_seconds(BARRIER_TIMEOUT_ENV, BARRIER_TIMEOUT_S)


def init_group(device: torch.device, backend: str | None = None) -> bool:
    """Join torchrun's process group (if not joined yet): this rank's GPU made current first,
    then `backend` (default: nccl on CUDA, else gloo) with `barrier_timeout()`. Returns
    whether this call joined it (the caller then leaves it with `dist.destroy_process_group`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any NCCL use: each rank on its own GPU
    if dist.is_initialized():
        return False
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=barrier_timeout())
    dist.init_process_group(backend, timeout=timeout)
    return True


def wait_for_ranks(what: str) -> None:
    """Barrier of all ranks; past `barrier_timeout()`, or when a rank died, one RankError line
    saying what it waited for."""
    try:
        dist.barrier()
    except Exception as e:  # noqa: BLE001 - gloo/NCCL errors: a timeout or a lost peer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankError(  # the command line names the rank ("[rank R of N] ")
            f"gave up waiting for {what} after at most "
            f"{barrier_timeout():g} s ({type(e).__name__}: {first[:160]}); expected every rank "
            f"to arrive (did one fail or hang? see its error line; raise {BARRIER_TIMEOUT_ENV} "
            "for longer waits)"
        ) from None


def rank_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s slice of a global batch of `n` samples.

    Contiguous slices whose sizes differ by at most one (the first n mod R ranks get the extra
    sample): a full global batch of R * B gives every rank exactly B.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_rows(rows: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank `rank`'s rows of a global batch `rows` [n, ...], and their `valid` flags [m] bool.

    A rank whose slice is empty (n < world_size) gets the batch's first row marked invalid, so
    every rank takes the step; see the module docstring.
    """
    start, stop = rank_share(len(rows), rank, world_size)
    if stop > start or len(rows) == 0:
        return rows[start:stop], np.ones(stop - start, dtype=bool)
    return rows[:1], np.zeros(1, dtype=bool)


def _multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def across_ranks(enabled: bool = True) -> Iterator[None]:
    """Inside: `global_mean` normalises over the global batch (all ranks must call it alike).

    The trainer wraps each training step's loss in it; evaluation on rank 0 alone runs outside
    it and so never waits for the other ranks.
    """
    global _ACROSS_RANKS
    before, _ACROSS_RANKS = _ACROSS_RANKS, enabled and _multi_process()
    try:
        yield
    finally:
        _ACROSS_RANKS = before


def global_mean(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """`total / count` over the global batch; `count` clamped at 1 (an empty set gives 0).

    `total` is this rank's differentiable sum; `count` how many elements it sums. Inside
    `across_ranks` the count is all-reduced and the result scaled by the world size, so the
    mean over ranks of what each returns (what DDP's gradient averaging differentiates) is the
    global sum over the global count.
    """
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device).detach()
    if not _ACROSS_RANKS:
        return total / count.clamp(min=1)
    count = global_total(count)
    return total * dist.get_world_size() / count.clamp(min=1)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalar tensors averaged over ranks in one all-reduce (for logging; no gradient)."""
    if not _multi_process() or not values:
        return values
    keys = list(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.unbind(), strict=True))


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of `params` over ranks in one all-reduce, as DDP does for the
    model's: for parameters trained outside the DDP module (the loss's RLE flow). A parameter
    without a gradient on this rank counts as a zero one, so every rank sends the same tensor."""
    if not _multi_process() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([q.numel() for q in params]), strict=True):
        p.grad = g.view_as(p).clone()


def global_total(x: torch.Tensor) -> torch.Tensor:
    """A constant (no gradient) summed over ranks inside `across_ranks`; else `x` itself."""
    x = x.detach().clone()
    if _ACROSS_RANKS:
        dist.all_reduce(x)
    return x


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with autograd (the backward sums the gradients over ranks too)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the samples of all ranks (CPU / gloo).

    Same parameters, buffers and state-dict keys as `nn.BatchNorm2d`; in eval mode, or in one
    process, it is exactly `nn.BatchNorm2d`. In training under a process group the mean and the
    biased variance come from per-channel sums all-reduced with autograd (two passes: mean, then
    squared deviations, as exact as one process's), and the running statistics get the unbiased
    global variance, as torch's SyncBatchNorm does. It synchronises only inside `across_ranks`
    (the trainer's steps), so a forward pass on one rank alone never waits for the others.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _ACROSS_RANKS):
            return super().forward(x)
        count = global_total(x.new_tensor(x.numel() / max(x.shape[1], 1)))
        mean = _all_reduce_sum(x.sum((0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = _all_reduce_sum(centred.pow(2).sum((0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                n = float(count)
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
                self.num_batches_tracked += 1
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm2d computing its statistics over all ranks.

    CUDA: torch's `SyncBatchNorm`. Elsewhere: `CrossRankBatchNorm2d`, converted in place (same
    object, same state-dict keys), so checkpoints are unchanged.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values()), torch.empty(0)).device)
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model
