"""The distributed sampler and the global-batch rules, in one process (ranks simulated).

The runs under torchrun are in test_torchrun.py; here every world size 1..5 is checked on the
store's real chunk-shuffled plan: every sample exactly once per epoch across ranks, every rank
the same number of steps, and the global batches those of one process with the global batch.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_student_train import build_tiny_store  # noqa: E402

from distilpose.geometry import Geometry  # noqa: E402
from distilpose.models import build_model  # noqa: E402
from distilpose.training.distributed import (  # noqa: E402
    CrossRankBatchNorm2d,
    across_ranks,
    global_mean,
    rank_rows,
    rank_share,
    sync_batchnorm,
)
from distilpose.training.losses import DistillationLoss  # noqa: E402
from store import StoreReader  # noqa: E402
from student_train.data import OnlineBatches, StudentBatches  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    # 30 people in chunks of 8: the last chunk is short, as in real stores
    return build_tiny_store(tmp_path_factory.mktemp("dist"), views=1, num_train=30, num_val=2)


def test_rank_share_partitions_any_batch():
    for n in range(0, 21):
        for world in range(1, 6):
            parts = [rank_share(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    rows, valid = rank_rows(np.arange(2), 2, 3)  # 2 samples, 3 ranks: rank 2 gets padding
    assert rows.tolist() == [0] and valid.tolist() == [False]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_sample_once_per_epoch_for_any_world_size(tiny, workers):
    reader = StoreReader.open(tiny["store"])
    n, batch = tiny["num_instances"], 3
    for world in range(1, 6):
        step = batch * world
        one = [
            b["instance"].tolist()
            for b in reader.iter_batches(0, step, seed=5, epoch=2, fields=("instance",))
        ]
        steps = math.ceil(n / step)
        assert len(one) == steps
        seen = []
        global_batches = [[] for _ in range(steps)]
        for rank in range(world):
            mine = []
            for w in range(workers):  # the DataLoader interleaves workers round-robin
                part = reader.iter_batches(
                    0, step, 5, 2, fields=("instance",), part=(w, workers), rank=(rank, world)
                )
                mine.append(list(part))
            order = [mine[k % workers][k // workers] for k in range(steps)]
            assert sum(len(m) for m in mine) == steps  # every rank takes every step
            for k, b in enumerate(order):
                keep = b.get("valid", np.ones(len(b["instance"]), dtype=bool))
                valid = b["instance"][keep].tolist()
                global_batches[k] += valid
                seen += valid
        assert sorted(seen) == list(range(n)), world  # exactly once across ranks
        assert global_batches == one, world  # the global batches of one process, in order


def test_student_batches_under_two_ranks_are_slices_of_the_global_batch(tiny, monkeypatch):
    one = list(StudentBatches(tiny["store"], batch_size=8, workers=0)(0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    slices = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        data = StudentBatches(tiny["store"], batch_size=4, workers=0)
        batches = list(data(0))
        assert len(data) == len(batches) == len(one)
        slices.append(batches)
    for k, whole in enumerate(one):
        a, b = slices[0][k], slices[1][k]
        assert bool(a["valid"].all() and b["valid"].all())
        for key in ("instance", "images", "coords", "weights", "heatmaps"):
            torch.testing.assert_close(torch.cat([a[key], b[key]]), whole[key])


def test_online_batches_split_the_same_way(tiny, monkeypatch):
    kw = dict(batch_size=4, geometry=Geometry((96, 128)), workers=0)
    ann, images = str(tiny["train_ann"]), str(tiny["train_images"])
    one = [
        b["instance"].tolist() for b in OnlineBatches(ann, images, **{**kw, "batch_size": 12})(1)
    ]
    monkeypatch.setenv("WORLD_SIZE", "3")
    ranks = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        ranks.append(list(OnlineBatches(ann, images, **kw)(1)))
    assert [len(r) for r in ranks] == [len(one)] * 3
    for k, whole in enumerate(one):
        got = sum((r[k]["instance"][r[k]["valid"]].tolist() for r in ranks), [])
        assert got == whole


def test_padding_rows_count_in_no_loss():
    torch.manual_seed(0)
    student = build_model("distilpose_tiny").eval()
    cfg = student.config
    k, (wh, hh) = cfg.num_keypoints, cfg.heatmap_size
    images = torch.randn(3, 3, cfg.input_size[1], cfg.input_size[0])
    targets = {
        "coords": torch.rand(3, k, 2),
        "weights": (torch.rand(3, k) > 0.3).float(),
        "heatmaps": torch.rand(3, k, hh, wh),
        "keypoint_tokens": torch.randn(3, k, cfg.dim),
        "visual_tokens": torch.randn(
            3, (wh // cfg.patch_size[0]) * (hh // cfg.patch_size[1]), cfg.dim
        ),
    }
    loss = DistillationLoss("reg,kt,vt,sh,cs", geometry=cfg.geometry)
    official = DistillationLoss("sh", geometry=cfg.geometry, official_sh_weight=True)
    with torch.no_grad():
        out3, out2 = student(images), student(images[:2])
    padded = {**targets, "valid": torch.tensor([True, True, False])}
    two = {k: v[:2] for k, v in targets.items()}
    for fn in (loss, official):
        a, b = fn(out3, padded), fn(out2, two)
        for name in b:
            torch.testing.assert_close(a[name], b[name], msg=name)


def test_global_mean_and_cross_rank_batchnorm_in_one_process():
    total = torch.tensor(6.0)
    assert float(global_mean(total, torch.tensor(3))) == 2.0
    assert float(global_mean(total, 0)) == 6.0  # an empty set: clamped count, as before
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    ref = copy.deepcopy(model)
    sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], CrossRankBatchNorm2d)
    assert isinstance(model[2][0], CrossRankBatchNorm2d)
    assert model.state_dict().keys() == ref.state_dict().keys()  # checkpoints unchanged
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model.train()(x), ref.train()(x))  # one process: plain BN
    torch.testing.assert_close(model.state_dict(), ref.state_dict())


def _batch(seed: int = 0) -> tuple[torch.Tensor, dict]:
    """6 samples whose visible joints differ a lot between the halves (masks matter)."""
    g = torch.Generator().manual_seed(seed)
    cfg = build_model("distilpose_tiny").config
    k, (wh, hh), (w, h) = cfg.num_keypoints, cfg.heatmap_size, cfg.input_size
    weights = (torch.rand(6, k, generator=g) > 0.2).float()
    weights[3:, 4:] = 0  # the second rank's samples have few visible joints
    patches = (wh // cfg.patch_size[0]) * (hh // cfg.patch_size[1])
    targets = {
        "coords": torch.rand(6, k, 2, generator=g),
        "weights": weights,
        "heatmaps": torch.rand(6, k, hh, wh, generator=g),
        "keypoint_tokens": torch.randn(6, k, cfg.dim, generator=g),
        "visual_tokens": torch.randn(6, patches, cfg.dim, generator=g),
    }
    return torch.randn(6, 3, h, w, generator=g), targets


def _gradients(images: torch.Tensor, targets: dict, sync: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("distilpose_tiny").train()
    if sync:
        sync_batchnorm(model, torch.device("cpu"))
    loss_fn = DistillationLoss("reg,kt,vt,sh,cs", geometry=model.config.geometry)
    with across_ranks():
        loss_fn(model(images), targets)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    images, targets = _batch()
    start, stop = rank_share(len(images), rank, 2)
    grads = _gradients(images[start:stop], {k: v[start:stop] for k, v in targets.items()}, True)
    for g in grads.values():  # what DDP does: the mean over ranks
        dist.all_reduce(g)
        g /= 2
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_two_ranks_give_the_gradient_of_the_global_batch(tmp_path):
    """2 gloo processes, 3 samples each, masks unequal: DDP's averaged gradient equals one
    process's on all 6 samples (global normalisers and cross-rank BatchNorm); per-rank means
    would not."""
    ctx = mp.get_context("fork")
    out = tmp_path / "grads.pt"
    procs = [
        ctx.Process(target=_rank, args=(r, f"file://{tmp_path / 'rdzv'}", str(out))) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    two = torch.load(out, weights_only=True)
    images, targets = _batch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _gradients(images, targets, False)
    finally:
        torch.set_num_threads(threads)
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
