"""Teacher store benchmark: size per sample and error per mode, write speed, training read speed.

    python -m benchmarks.store_bench [--quick]

Samples have the real per-sample size of a DistilPose teacher store (K=17 heatmaps of 64x48,
D=192 tokens, 17 keypoint + 256 visual tokens). The teacher outputs are synthetic: heatmaps are
one Gaussian peak (sigma 2, height 0.3-1) per joint on a dense noise floor (std 1e-3), tokens
are standard normal. This reproduces the fp16 + zstd sizes measured on real TokenPose outputs
(96 kB heatmaps, 91 kB visual tokens: dense floats barely compress); the lossy sizes depend on
the real heatmaps' noise floor and should be re-measured with `distilpose store-info` on a real
store. The training path is `StoreDataset` (shuffled exactly as training uses it) inside a torch
DataLoader, next to the reference: random batches of 64 read from a flat fp16 numpy memmap
holding the same teacher arrays, in the same run. Warm = page cache filled by the write; cold =
every store / memmap file dropped from the page cache with posix_fadvise(DONTNEED) first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from store import StoreMeta, StoreWriter
from store.schema import (
    dequantize_heatmaps,
    dequantize_tokens,
    quantize_heatmaps,
    quantize_tokens,
)

K, HH, WH, D, P = 17, 64, 48, 192, 256
COCO_INSTANCES = 149_813  # person instances with keypoints in COCO train2017
RESULTS = Path(__file__).resolve().parent / "results"


def teacher_pool(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n distinct synthetic samples (float32), reused cyclically by the writer."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HH, 0:WH].astype(np.float32)
    c = rng.uniform([0, 0], [WH, HH], (n, K, 2)).astype(np.float32)
    amp = rng.uniform(0.3, 1.0, (n, K, 1, 1)).astype(np.float32)
    d2 = (xx - c[..., 0, None, None]) ** 2 + (yy - c[..., 1, None, None]) ** 2
    hm = amp * np.exp(-d2 / 8) + rng.normal(0, 1e-3, (n, K, HH, WH)).astype(np.float32)
    return {
        "heatmaps": hm.astype(np.float32),
        "keypoint_tokens": rng.normal(size=(n, K, D)).astype(np.float32),
        "visual_tokens": rng.normal(size=(n, P, D)).astype(np.float32),
        "keypoints": rng.uniform(0, 192, (n, K, 2)).astype(np.float32),
        "weights": np.ones((n, K), np.float32),
    }


def meta_for(n: int, mode: str) -> StoreMeta:
    return StoreMeta(
        teacher_name="synthetic",
        teacher_sha256="0" * 64,
        num_instances=n,
        views=1,
        mode=mode,
        created="2024-01-01T00:00:00+00:00",
    )


def write_store(path: Path, n: int, mode: str, pool: dict) -> float:
    """Write an n-sample store; returns samples/s (encoding, zstd, shard writes, fsync)."""
    shutil.rmtree(path, ignore_errors=True)
    w = StoreWriter.create_or_open(path, meta_for(n, mode))
    m = len(pool["heatmaps"])
    units = w.pending_units()
    batches = []
    for u in units:  # prepared outside the timed loop: the teacher's forward pass makes these
        insts = w.unit_instances(u)
        rows = insts % m
        spec = np.zeros((len(insts), 8))
        spec[:, 0] = insts
        batch = {k: v[rows] for k, v in pool.items()}
        if mode == "fp16":  # the dump casts on the GPU (`.half()`), as teacher_dump does
            for k in ("heatmaps", "keypoint_tokens", "visual_tokens"):
                batch[k] = batch[k].astype(np.float16)
        batch.update(
            spec=spec,
            image_id=insts,
            ann_id=insts,
            crop_digest=np.zeros((len(insts), 32), np.uint8),
        )
        batches.append(batch)
    t = time.perf_counter()
    for u, batch in zip(units, batches, strict=True):
        w.write_unit(u, batch)
    return n / (time.perf_counter() - t)


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def drop_cache(path: Path) -> None:
    """Evict a file or every file under a directory from the page cache."""
    files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def lossy_errors(pool: dict, bits: int) -> dict[str, float]:
    hm = pool["heatmaps"]
    codes, scale = quantize_heatmaps(hm, bits)
    back = dequantize_heatmaps(codes, scale)
    err = back - hm
    n = len(hm)
    peaks_ref = hm.reshape(n, K, -1).argmax(-1)
    peaks = back.reshape(n, K, -1).argmax(-1)
    tok_err = []
    for name in ("keypoint_tokens", "visual_tokens"):
        c, s = quantize_tokens(pool[name])
        e = dequantize_tokens(c, s) - pool[name]
        tok_err.append(np.sqrt((e**2).mean() / (pool[name] ** 2).mean()))
    return {
        "hm_rel_rms": float(np.sqrt((err**2).mean() / (hm**2).mean())),
        "hm_max_abs_rel_peak": float(np.abs(err).max((2, 3)).max() / hm.max()),
        "peak_moves": float((peaks != peaks_ref).mean()),
        "tok_rel_rms": float(max(tok_err)),
    }


def _rate(make_loader, epochs: int) -> float:
    """Samples/s over `epochs`, clock started at the first batch (worker start-up excluded)."""
    n, t0 = 0, 0.0
    for epoch in range(epochs):
        for i, batch in enumerate(make_loader(epoch)):
            if epoch == 0 and i == 0:
                t0 = time.perf_counter()
                continue
            n += len(batch["slot"])
    return n / (time.perf_counter() - t0)


def training_path(path: Path, workers: int, epochs: int = 1) -> float:
    """Samples/s of StoreDataset batches (64, all training fields) through a DataLoader."""
    from torch.utils.data import DataLoader

    from store import StoreDataset

    fields = ("slot", "spec", "instance", "keypoints", "weights", "heatmaps")
    fields += ("keypoint_tokens", "visual_tokens")
    ds = StoreDataset(path, batch_size=64, seed=0, fields=fields, num_threads=2)

    def loader(epoch):
        ds.set_epoch(epoch)
        return DataLoader(ds, batch_size=None, num_workers=workers)

    return _rate(loader, epochs)


def write_memmap(path: Path, n: int, pool: dict) -> None:
    """A flat fp16 file [N, bytes] of the same teacher arrays, the simplest possible cache."""
    m = len(pool["heatmaps"])
    names = ("heatmaps", "keypoint_tokens", "visual_tokens")
    flat = np.concatenate([pool[k].astype(np.float16).reshape(m, -1) for k in names], axis=1)
    flat = flat.view(np.uint8)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, flat.shape[1]))
    for a in range(0, n, m):
        mm[a : a + m] = flat[: min(m, n - a)]
    mm.flush()
    del mm


def _memmap_dataset(path: Path, n: int):
    """Random batches of 64 rows (fancy indexing) from the memmap, split across workers."""
    from torch.utils.data import IterableDataset, get_worker_info

    sizes = (K * HH * WH, K * D, P * D)

    class MemmapBatches(IterableDataset):
        epoch = 0

        def __iter__(self):
            info = get_worker_info()
            w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            mm = np.load(path, mmap_mode="r")
            order = np.random.default_rng([0, self.epoch]).permutation(n)
            for b, a in enumerate(range(0, n, 64)):
                if b % nw != w:
                    continue
                idx = np.sort(order[a : a + 64])
                rows = mm[idx].view(np.float16)
                hm, kt, vt = np.split(rows, np.cumsum(sizes)[:2], axis=1)
                yield {
                    "slot": idx,
                    "heatmaps": hm.reshape(-1, K, HH, WH),
                    "keypoint_tokens": kt.reshape(-1, K, D),
                    "visual_tokens": vt.reshape(-1, P, D),
                }

    return MemmapBatches()


def memmap_reference(path: Path, n: int, workers: int, epochs: int = 1) -> float:
    from torch.utils.data import DataLoader

    ds = _memmap_dataset(path, n)

    def loader(epoch):
        ds.epoch = epoch
        return DataLoader(ds, batch_size=None, num_workers=workers)

    return _rate(loader, epochs)


def run(quick: bool = False) -> str:
    """Run the benchmark; returns a Markdown section and writes results/store_bench.md."""
    os.environ.setdefault("DISTILPOSE_NO_PROGRESS", "1")
    n_read = 2048 if quick else 6144
    n_mode = 512 if quick else 1024
    pool = teacher_pool(512)
    tmp = Path(tempfile.mkdtemp(prefix="store_bench_", dir=os.environ.get("STORE_BENCH_DIR")))
    try:
        rows = []
        sizes = {}
        for mode in ("fp16", "lossy", "lossy16"):
            path = tmp / f"{mode}.zarr"
            speed = write_store(path, n_mode, mode, pool)
            sizes[mode] = disk_bytes(path) / n_mode
            if mode == "fp16":
                err = "bit-exact to float16"
            else:
                e = lossy_errors(pool, 8 if mode == "lossy" else 16)
                err = (
                    f"heatmaps rel. RMS {e['hm_rel_rms']:.1e}, "
                    f"max err {e['hm_max_abs_rel_peak']:.1e} of peak, "
                    f"peak moves {e['peak_moves']:.1%}; tokens rel. RMS {e['tok_rel_rms']:.1e}"
                )
            rows.append((mode, sizes[mode], speed, err))
            shutil.rmtree(path)

        main = tmp / "read.zarr"
        write_fp16 = write_store(main, n_read, "fp16", pool)
        mm_path = tmp / "ref.npy"
        write_memmap(mm_path, n_read, pool)
        load = os.getloadavg()[0]
        warm = {
            "store1": training_path(main, 0),
            "store2": training_path(main, 2, epochs=2),
            "mm1": memmap_reference(mm_path, n_read, 0),
            "mm2": memmap_reference(mm_path, n_read, 2, epochs=2),
        }
        cold = {}
        for key, fn in (
            ("store1", lambda: training_path(main, 0)),
            ("store2", lambda: training_path(main, 2)),
            ("mm1", lambda: memmap_reference(mm_path, n_read, 0)),
            ("mm2", lambda: memmap_reference(mm_path, n_read, 2)),
        ):
            drop_cache(main)
            drop_cache(mm_path)
            cold[key] = fn()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "## Teacher store (store_bench)",
        "",
        f"Synthetic samples of real size (K=17, 64x48 heatmaps, D=192, P=256); {n_mode} samples"
        f" per mode, {n_read} for the read test; chunks of 64 samples, shards of 512.",
        "",
        "| mode | kB/sample on disk | write samples/s | error |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {m} | {b / 1e3:.1f} | {s:,.0f} | {e} |" for m, b, s, e in rows]
    two = warm["store2"]
    ratio = two / warm["mm2"]
    lines += [
        "",
        "| read path, batches of 64, fp16 | warm 1 process | warm 2 workers | cold 1 process "
        "| cold 2 workers |",
        "|---|---:|---:|---:|---:|",
        "| StoreDataset (shuffled as in training) | "
        + " | ".join(f"{d[k]:,.0f}" for d in (warm, cold) for k in ("store1", "store2"))
        + " |",
        "| reference: flat fp16 memmap, random batches | "
        + " | ".join(f"{d[k]:,.0f}" for d in (warm, cold) for k in ("mm1", "mm2"))
        + " |",
        "",
        f"Samples/s through a torch DataLoader (batch_size=None), clock from the first batch. "
        f"StoreDataset with 2 workers delivers {ratio:.0%} of the memmap reference (warm). "
        f"Write speed, fp16, {n_read} samples, fsync included: {write_fp16:,.0f} samples/s. "
        f"Machine load average during the run: {load:.1f} on {os.cpu_count()} cores.",
        "",
        f"COCO store size estimate ({COCO_INSTANCES:,} instances):",
        "",
        "| mode | 1 view | 5 views | 20 views |",
        "|---|---:|---:|---:|",
    ]
    for mode, b in sizes.items():
        cells = " | ".join(f"{COCO_INSTANCES * v * b / 1e9:.1f} GB" for v in (1, 5, 20))
        lines.append(f"| {mode} | {cells} |")
    goals = [
        ("2 workers >= 2,000 samples/s", two >= 2000),
        ("2 workers >= 75% of memmap", ratio >= 0.75),
        ("writes >= 1,000 samples/s", write_fp16 >= 1000),
        ("fp16 <= 200 kB/sample", sizes["fp16"] <= 200e3),
        ("a lossy mode <= 64 kB/sample", min(sizes["lossy"], sizes["lossy16"]) <= 64e3),
    ]
    lines += ["", "Goals: " + "; ".join(f"{g}: {'met' if ok else 'MISSED'}" for g, ok in goals)]
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store_bench.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(run(quick=parser.parse_args().quick))


if __name__ == "__main__":
    main()
