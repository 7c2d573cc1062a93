"""Teacher store benchmark: sizes, write speed, and the training data path with and without pixels.

    python -m benchmarks.store_bench [--quick]

Teacher outputs have the real per-sample size of a DistilPose store (K=17 heatmaps of 64x48,
D=192, 17 keypoint + 256 visual tokens) and are synthetic: one Gaussian peak (sigma 2, height
0.3-1) per joint on a dense noise floor (std 1e-3), tokens standard normal; this reproduces the
fp16 + zstd sizes measured on real TokenPose outputs (the lossy sizes depend on the real
heatmaps' noise floor: `distilpose store-info` reports a real store's). Pixels are real: the
four COCO val2017 images of tests/data/coco_mini copied to a COCO-like image folder (640x425
class JPEGs, about 3 people each) and cropped at 192x256 with the paper's augmentation.

What is timed (all in one run, side by side, on a machine other engineers share):
1. The real training data path, exactly what one DataLoader worker of `train-student` runs
   (`StudentBatches.dataset(epoch)`: `_StoreSource` -> `StoreReader.iter_batches` -> crop
   renderer), batches of 64 with every teacher target, for stores with `--pixels none`, `jpeg`
   and `lossless`. Per data-loading core = samples per CPU-second of the process (torch and
   OpenCV limited to one thread, as in DataLoader workers; the reader's two I/O threads
   counted). `none` re-renders from the images without an image cache (COCO train2017 has
   64k images with people: a worker's 256 MB LRU of decoded images hits well under 1%). Two
   outputs: uint8 crops (what a worker hands over on CUDA, normalized on the GPU) and normalized
   float images (CPU runs).
2. The store's target read alone (`_StoreSource`, no pixels) against random batches of 64 from a
   flat fp16 memmap of the same arrays, one process, warm page cache, with a breakdown: zstd
   decompression of the same bytes timed alone, the rest is zarr and the batch gather.
3. `dump-teacher` end to end per pixel format (tiny teacher, the COCO-like data, 2 workers).
4. Bytes per sample per mode and the COCO train2017 size for 1 and 20 views.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from distilpose.geometry import PAPER
from distilpose.training.runs import DumpRun
from store import StoreMeta, StoreWriter
from store.pixels import decode_crop, decode_rgb_batch, encode_crop
from store.quantize import (
    dequantize_heatmaps,
    dequantize_tokens,
    quantize_heatmaps,
    quantize_tokens,
)
from store.schema import COMPACT_LAYOUT, DEFAULT_COMPACT, LAYOUT, default_layout

K, D = 17, 192  # COCO joints, DistilPose-S token dim
(WH, HH), P = PAPER.heatmap_size, PAPER.num_patches
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
        "keypoints": rng.uniform(0, PAPER.input_size[0], (n, K, 2)).astype(np.float32),
        "weights": np.ones((n, K), np.float32),
    }


def meta_for(n: int, mode: str, **kw) -> StoreMeta:
    return StoreMeta(
        teacher_name="synthetic",
        teacher_sha256="0" * 64,
        num_instances=n,
        views=1,
        mode=mode,
        created="2024-01-01T00:00:00+00:00",
        **kw,
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


def memmap_epoch(path: Path, n: int, epoch: int = 0) -> int:
    """Random batches of 64 rows (sorted fancy indexing) of the memmap, split into arrays."""
    sizes = np.cumsum((K * HH * WH, K * D))
    mm = np.load(path, mmap_mode="r")
    order = np.random.default_rng([0, epoch]).permutation(n)
    done = 0
    for a in range(0, n, 64):
        rows = mm[np.sort(order[a : a + 64])].view(np.float16)
        hm, kt, vt = np.split(rows, sizes, axis=1)
        batch = (hm.reshape(-1, K, HH, WH), kt.reshape(-1, K, D), vt.reshape(-1, P, D))
        done += len(batch[0])
    return done


# ---- COCO-like data with real pixels -----------------------------------------------------------


def coco_like(root: Path, n_images: int) -> tuple[Path, Path]:
    """The coco_mini images hard-linked to `n_images` files, their people annotated in each."""
    src_dir = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco_mini"
    src = json.loads((src_dir / "annotations" / "person_keypoints.json").read_text())
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for k in range(n_images):
        im = src["images"][k % len(src["images"])]
        name = f"{k:012d}.jpg"
        os.link(src_dir / "images" / im["file_name"], images_dir / name)
        images.append({**im, "id": k + 1, "file_name": name})
        for a in src["annotations"]:
            if a["image_id"] == im["id"]:
                anns.append({**a, "id": len(anns) + 1, "image_id": k + 1})
    ann = root / "person_keypoints.json"
    ann.write_text(json.dumps({**src, "images": images, "annotations": anns}))
    return ann, images_dir


def render_all(ann: Path, images: Path, seed: int = 0) -> tuple[list, dict]:
    """Every training instance's view-0 crop (spec, uint8 BGR crop, keypoints, weights)."""
    from distilpose.data import (
        AugmentRecipe,
        load_coco_instances,
        read_image,
        render_crop,
        sample_crop_spec,
    )

    insts = load_coco_instances(
        ann, images, train=True, aspect_ratio=PAPER.input_size[0] / PAPER.input_size[1]
    )
    recipe = AugmentRecipe()
    out = {}
    for inst in insts:
        spec = sample_crop_spec(inst, recipe, seed, 0, PAPER.input_size)
        crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, PAPER.input_size)
        out[inst.index] = (spec.to_array(), crop.image, crop.keypoints, crop.weights)
    return insts, out


def write_pixel_store(
    path: Path,
    pixels: str,
    targets: str,
    ann: Path,
    images: Path,
    insts: list,
    crops: dict,
    pool: dict,
) -> float:
    """A store of the COCO-like people with pixels `pixels` (a canvas per person for "canvas",
    every crop warped from it) and targets `targets` (TARGETS: fp16 zstd or raw, or the
    default compact mode, its bases fitted on the pool); returns kB of pixels per sample."""
    from distilpose.data import AugmentRecipe, annotation_digest, crop_digest, read_image
    from store.pixels import canvas_crop, encode_canvas

    mode = DEFAULT_COMPACT if targets == "compact" else "fp16"  # what --mode compact writes
    chunk_samples, shard_chunks = default_layout(mode)  # as a dump lays this mode's store out
    meta = meta_for(
        len(crops), mode, pixels=pixels, chunk_samples=chunk_samples, shard_chunks=shard_chunks,
        ann_file=str(ann), image_root=str(images), ann_digest=annotation_digest(ann), recipe={},
        targets_zstd=targets != "raw",
    )  # fmt: skip
    m = len(pool["heatmaps"])

    def fit(samples: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        rows = np.array([i for _, i, _ in samples]) % m
        return {k: pool[k][rows] for k in TEACHER[1:]}

    w = StoreWriter.create_or_open(path, meta, fit=fit)
    by_index = {inst.index: inst for inst in insts}
    pixel_bytes = 0
    for u in w.pending_units():
        index = w.unit_instances(u)
        rows = [crops[int(i)] for i in index]
        batch = {k: pool[k][index % m].astype(np.float16) for k in TEACHER}
        batch.update(
            spec=np.stack([r[0] for r in rows]),
            image_id=index,
            ann_id=index,
            keypoints=np.stack([r[2] for r in rows]),
            weights=np.stack([r[3] for r in rows]),
        )
        if pixels == "none":
            seen = [r[1] for r in rows]
        elif pixels == "canvas":
            canvases, geometry = zip(*(
                encode_canvas(read_image(by_index[int(i)].image_path), by_index[int(i)],
                              AugmentRecipe(), PAPER.input_size)
                for i in index
            ), strict=True)  # fmt: skip
            batch["pixels"], batch["canvas"] = list(canvases), np.stack(geometry)
            pixel_bytes += sum(len(b) for b in canvases)
            seen = [canvas_crop(c, g, r[0], PAPER.input_size)
                    for c, g, r in zip(canvases, geometry, rows, strict=True)]  # fmt: skip
        else:
            batch["pixels"] = [encode_crop(r[1], pixels) for r in rows]
            pixel_bytes += sum(len(b) for b in batch["pixels"])
            seen = [decode_crop(b, pixels, PAPER.input_size) for b in batch["pixels"]]
        batch["crop_digest"] = [crop_digest(c) for c in seen]
        w.write_unit(u, batch)
    return pixel_bytes / len(crops) / 1e3


TEACHER = ("heatmaps", "keypoint_tokens", "visual_tokens")
# how the targets are stored: fp16 zstd (the default), fp16 raw (--raw-targets), compact
TARGETS = ("zstd", "raw", "compact")
# (pixels, targets) stores, and the cells timed: (pixels, targets, worker output)
VARIANTS = (
    ("none", "zstd"), ("jpeg", "zstd"), ("lossless", "zstd"), ("canvas", "zstd"),
    ("none", "raw"), ("jpeg", "raw"), ("none", "compact"), ("jpeg", "compact"),
    ("canvas", "compact"),
)  # fmt: skip
CELLS = (
    *((p, "zstd", "crops") for p in ("none", "jpeg", "lossless", "canvas")),
    ("jpeg", "raw", "crops"),
    *((p, "compact", "crops") for p in ("none", "jpeg", "canvas")),
    ("jpeg", "zstd", "jpeg"),
    ("jpeg", "raw", "jpeg"),
    ("jpeg", "compact", "jpeg"),
    *((p, "zstd", "images") for p in ("none", "jpeg", "lossless", "canvas")),
    ("jpeg", "raw", "images"),
    *((p, "compact", "images") for p in ("none", "jpeg", "canvas")),
)


def worker_epoch(store: Path, output: str, epoch: int) -> tuple[int, float, float]:
    """One epoch of what a DataLoader worker of train-student runs: (samples, wall s, CPU s)."""
    from student_train.data import StudentBatches

    data = StudentBatches(store, batch_size=64, workers=0, cache_mb=0)  # all five losses
    data.renderer.output = output  # "crops"/"jpeg" (a CUDA run's workers), "images" (CPU runs)
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(len(b["instance"]) for b in data.dataset(epoch))
    return n, time.perf_counter() - wall, time.process_time() - cpu


def target_epoch(store: Path, epoch: int) -> tuple[float, float]:
    """The store's target read alone (the real path's `_StoreSource`), in-process: (wall s,
    CPU s of the process, its reader threads included)."""
    from student_train.data import INDEX_FIELDS, _StoreSource

    src = _StoreSource(str(store), 0, 64, 0, epoch, INDEX_FIELDS + TEACHER, False, 10**9)
    t, c = time.perf_counter(), time.process_time()
    sum(len(b["instance"]) for b in src)
    return time.perf_counter() - t, time.process_time() - c


def zstd_share(pool: dict, n: int) -> float:
    """Seconds to zstd-decompress, alone, the target bytes an epoch of `n` samples reads: the
    same arrays compressed chunk by chunk with the store's codec settings."""
    from numcodecs import Zstd

    from store.schema import ZSTD_LEVEL

    z = Zstd(level=ZSTD_LEVEL)
    m = len(pool["heatmaps"])
    frames = [
        z.encode(np.ascontiguousarray(pool[k][np.arange(a, a + 64) % m].astype(np.float16)))
        for a in (0, 64)
        for k in TEACHER
    ]
    t = time.process_time()
    reps = max(1, n // 128)
    for _ in range(reps):
        for f in frames:
            z.decode(f)
    return (time.process_time() - t) * n / (reps * 128)


def cpu_jpeg_decoders(crops: dict, reps: int = 7) -> dict[str, float]:
    """CPU ms per crop to decode a batch of 64 JPEG crops to uint8 RGB [64, 3, H, W]
    (process time, best of `reps`, the two decoders in turn)."""
    datas = [encode_crop(c[1], "jpeg") for c in list(crops.values())[:64]]
    times: dict[str, list[float]] = {"torchvision": [], "opencv": []}
    for _ in range(reps):
        for decoder, got in times.items():
            t = time.process_time()
            decode_rgb_batch(datas, "jpeg", PAPER.input_size, decoder=decoder)
            got.append(time.process_time() - t)
    return {d: min(t) / len(datas) * 1e3 for d, t in times.items()}


def dump_rates(root: Path, ann: Path, images: Path, rounds: int, limit: int) -> dict:
    """Per format: dump-teacher loop samples/s (best of `rounds`), CPU ms per sample (main
    process, writer thread and the DataLoader workers, reaped at the end of each call; lowest
    of `rounds`) and store bytes per sample."""
    import resource

    import torch

    from distilpose.models import build_model, save_checkpoint
    from teacher_dump.dump import dump_teacher

    def cpu_s() -> float:
        own, kids = (
            resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    torch.manual_seed(0)
    ckpt = root / "teacher.pth"
    save_checkpoint(ckpt, build_model("tokenpose_tiny"), meta={"role": "teacher"})
    got: dict[str, list[tuple[float, float]]] = {p: [] for p in ("none", "jpeg", "lossless")}
    size: dict[str, float] = {}
    for r in range(rounds):  # formats in turn, so load changes hit all alike
        for pixels in got:
            out = root / f"dump_{pixels}_{r}"
            c0 = cpu_s()
            s = dump_teacher(
                DumpRun(
                    ckpt, ann, images, out, pixels=pixels, device="cpu", workers=2, batch_size=32,
                    max_instances=limit,
                )
            )  # fmt: skip
            got[pixels].append((s["loop_samples_per_s"], (cpu_s() - c0) / s["samples"] * 1e3))
            size[pixels] = s["bytes"] / s["samples"]
            shutil.rmtree(out)
    return {p: (max(r for r, _ in v), min(c for _, c in v), size[p]) for p, v in got.items()}


# ---- the run --------------------------------------------------------------------------------


def run(quick: bool = False) -> str:
    """Run the benchmark; returns a Markdown section and writes results/store_bench.md."""
    import cv2
    import torch

    os.environ.setdefault("DISTILPOSE_NO_PROGRESS", "1")
    torch.set_num_threads(1)  # one data-loading core, as a DataLoader worker
    cv2.setNumThreads(1)
    n_images = 120 if quick else 300
    rounds = 2 if quick else 3
    n_mode = 512 if quick else 1024
    pool = teacher_pool(512)
    tmp = Path(tempfile.mkdtemp(prefix="store_bench_", dir=os.environ.get("STORE_BENCH_DIR")))
    load = [os.getloadavg()[0]]
    try:
        # sizes and write speed of the target modes
        rows, sizes = [], {}
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

        # COCO-like data, one store per pixel format and target codec (same targets)
        ann, images = coco_like(tmp / "coco", n_images)
        insts, crops = render_all(ann, images)
        n = len(insts)
        stores, pixel_kb = {}, {}
        for p, z in VARIANTS:
            stores[(p, z)] = tmp / f"pixels_{p}_{z}.zarr"
            pixel_kb[p] = write_pixel_store(stores[(p, z)], p, z, ann, images, insts, crops, pool)
        decoders = cpu_jpeg_decoders(crops)

        # 1. the real path per core, cells in turn
        got: dict[tuple, list] = {k: [] for k in CELLS}
        for r in range(rounds):
            for p, z, o in CELLS:
                got[(p, z, o)].append(worker_epoch(stores[(p, z)], o, epoch=r))
            load.append(os.getloadavg()[0])
        per_core = {k: max(s / c for s, _, c in v) for k, v in got.items()}
        wall = {k: max(s / w for s, w, _ in v) for k, v in got.items()}

        # 2. target read vs memmap, in-process, warm (the first pass warms the page cache)
        mm = tmp / "ref.npy"
        write_memmap(mm, n, pool)
        times: dict[str, list] = {z: [] for z in (*TARGETS, "memmap")}  # (wall, CPU) s
        for r in range(rounds + 2):
            for z in TARGETS:
                times[z].append(target_epoch(stores[("none", z)], r))
            t0, c0 = time.perf_counter(), time.process_time()
            memmap_epoch(mm, n, r)
            times["memmap"].append((time.perf_counter() - t0, time.process_time() - c0))
        target_rate = {k: n / min(w for w, _ in v[1:]) for k, v in times.items()}
        target_cpu = {k: n / min(c for _, c in v[1:]) for k, v in times.items()}
        zstd_frac = zstd_share(pool, n) / min(c for _, c in times["zstd"][1:])

        # 3. dump throughput per format
        dumps = dump_rates(tmp, ann, images, rounds=1 if quick else 3, limit=256 if quick else 384)
        load.append(os.getloadavg()[0])
        write_fp16 = rows[0][2]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio_jpeg = per_core[("jpeg", "zstd", "crops")] / per_core[("none", "zstd", "crops")]
    ratio_raw = per_core[("jpeg", "raw", "crops")] / per_core[("none", "zstd", "crops")]
    # the compact store's CPU training path (normalized floats) against re-rendering
    compact_cpu = per_core[("jpeg", "compact", "images")]
    ratio_compact = compact_cpu / per_core[("none", "zstd", "images")]
    target_kb = sizes["fp16"] / 1e3
    lines = [
        "## Teacher store (store_bench)",
        "",
        f"Synthetic teacher outputs of real size (K=17, 64x48 heatmaps, D=192, P=256); {n_mode} "
        "samples per mode; chunks of 64 samples, shards of 512.",
        "",
        "| mode | kB/sample on disk | write samples/s | error |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {m} | {b / 1e3:.1f} | {s:,.0f} | {e} |" for m, b, s, e in rows]
    lines += [
        "",
        f"### The training data path per data-loading core ({n:,} COCO-like people, "
        f"{n_images} images)",
        "",
        "Batches of 64 with pixels and all teacher targets (heatmaps, keypoint and visual tokens),"
        " through `StudentBatches.dataset` (what a train-student DataLoader worker runs). "
        f"Best of {rounds} epochs per cell, cells in turn. Targets: fp16, zstd (the default) or "
        "raw (`--raw-targets`), or `--mode compact` (decoded back to the full arrays by the "
        "reader). Each store has the layout a dump gives its mode (`store.schema.default_layout`"
        f": chunks of {LAYOUT[0]} samples, {COMPACT_LAYOUT[0]} in the compact modes). "
        "vs none: against re-rendering from the images (`--pixels none`, fp16 zstd "
        "targets) with the same worker output.",
        "",
        "| --pixels | pixels kB/sample | targets | worker output | samples/s per core (CPU-s) "
        "| samples/s wall, 1 process | vs none |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for p, z, o in CELLS:
        rel = (
            per_core[(p, z, o)] / per_core[("none", "zstd", "images" if o == "images" else "crops")]
        )
        what = {
            "crops": "uint8 crops (CUDA, `--decode cpu`)",
            "jpeg": "JPEG bytes (CUDA, `--decode gpu`, the default)",
            "images": "normalized floats (CPU runs)",
        }[o]
        lines.append(
            f"| {p} | {pixel_kb[p]:.1f} | {z} | {what} | "
            f"{per_core[(p, z, o)]:,.0f} | {wall[(p, z, o)]:,.0f} | {rel:.1f}x |"
        )
    lines += [
        "",
        f"Per sample, CPU: none {1e3 / per_core[('none', 'zstd', 'crops')]:.2f} ms, jpeg "
        f"{1e3 / per_core[('jpeg', 'zstd', 'crops')]:.2f} ms (raw targets "
        f"{1e3 / per_core[('jpeg', 'raw', 'crops')]:.2f} ms, compact "
        f"{1e3 / per_core[('jpeg', 'compact', 'crops')]:.2f} ms), canvas "
        f"{1e3 / per_core[('canvas', 'zstd', 'crops')]:.2f} ms, of which the crop's decode "
        f"{decoders['torchvision']:.2f} ms; the rest, the target read and batch assembly, is "
        "the same work in every mode and bounds the ratio to none. With the GPU decode "
        "(`--decode gpu`, a CUDA run's default) a worker only reads and packs the JPEG bytes "
        "(the rows 'JPEG bytes'); the decode then runs on the GPU, which is not measured here "
        "(no GPU), nor is how far nvJPEG's pixels differ from libjpeg-turbo's (a test bounds it "
        "where CUDA exists).",
        "",
        f"CPU JPEG decoders, a batch of 64 crops to uint8 RGB [64, 3, {PAPER.input_size[1]}, "
        f"{PAPER.input_size[0]}], CPU time: "
        f"torchvision "
        f"{decoders['torchvision']:.3f} ms/crop, OpenCV (+ flip, transpose) "
        f"{decoders['opencv']:.3f} ms/crop.",
        "",
        "### The store's target read vs a flat memmap (one process, warm)",
        "",
        "| path (all teacher outputs, fp16, batches of 64) | samples per CPU-s | vs memmap "
        "| samples/s wall | vs memmap |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "zstd": "store, zstd targets (`_StoreSource`, the default)",
        "raw": "store, raw targets (`--raw-targets`)",
        "compact": "store, compact targets (`--mode compact`, decoded to the full arrays)",
        "memmap": "flat fp16 memmap, random batches",
    }
    for k, name in names.items():
        lines.append(
            f"| {name} | {target_cpu[k]:,.0f} | {target_cpu[k] / target_cpu['memmap']:.0%} | "
            f"{target_rate[k]:,.0f} | {target_rate[k] / target_rate['memmap']:.0%} |"
        )
    lines += [
        "",
        f"Best of {rounds + 1} warm epochs each. Where the zstd store's CPU goes: zstd "
        f"decompression of the same bytes alone takes {zstd_frac:.0%} of it; the rest is zarr "
        "(shard index, per-chunk tasks, copies into the output) and the batch gather, which is "
        "all the raw store pays.",
        "",
        "### dump-teacher per pixel format (tokenpose_tiny, CPU, 2 workers, batch 32)",
        "",
        "| --pixels | dump loop samples/s | vs none | CPU ms/sample (all processes) | vs none "
        "| store kB/sample (tiny teacher) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p, (rate, cpu, b) in dumps.items():
        lines.append(
            f"| {p} | {rate:,.0f} | {rate / dumps['none'][0]:.0%} | {cpu:.2f} | "
            f"{cpu / dumps['none'][1]:.0%} | {b / 1e3:.1f} |"
        )
    lines += [
        "",
        "The tiny teacher makes the dump data-bound on a CPU (its forward is cheap), the worst "
        "case for the extra encode + decode; a real teacher hides it behind its forward pass.",
        "",
        f"### COCO train2017 store size ({COCO_INSTANCES:,} people), fp16 targets "
        f"({target_kb:.1f} kB/sample) plus pixels",
        "",
        "| --pixels | kB/sample | 1 view | 20 views |",
        "|---|---:|---:|---:|",
    ]
    for p in ("none", "jpeg", "lossless"):
        kb = target_kb + pixel_kb[p]
        cells = " | ".join(f"{COCO_INSTANCES * v * kb / 1e6:,.1f} GB" for v in (1, 20))
        lines.append(f"| {p} | {kb:.1f} | {cells} |")
    best_jpeg = max(per_core[("jpeg", z, "crops")] for z in TARGETS)
    ratio_gpu = per_core[("jpeg", "zstd", "jpeg")] / per_core[("none", "zstd", "crops")]
    goals = [
        (
            f"jpeg >= 5x none per core, CPU decode ({ratio_jpeg:.1f}x; raw targets "
            f"{ratio_raw:.1f}x)",
            max(ratio_jpeg, ratio_raw) >= 5,
        ),
        (f"the same, decode on the GPU: workers only read ({ratio_gpu:.1f}x)", ratio_gpu >= 5),
        ("jpeg >= 1,500 samples/s per core (uint8 crops)", best_jpeg >= 1500),
        (
            "compact store (jpeg pixels, compact targets), CPU training path: >= 1,500 samples/s"
            f" per core ({compact_cpu:,.0f}) and >= 5x none ({ratio_compact:.1f}x)",
            compact_cpu >= 1500 and ratio_compact >= 5,
        ),
        (
            "target read >= 50% of memmap in-process (CPU-s; zstd "
            f"{target_cpu['zstd'] / target_cpu['memmap']:.0%}, raw "
            f"{target_cpu['raw'] / target_cpu['memmap']:.0%})",
            max(target_cpu["zstd"], target_cpu["raw"]) >= 0.5 * target_cpu["memmap"],
        ),
        (
            "dump with jpeg pixels within 10% of none, wall "
            f"({dumps['jpeg'][0] / dumps['none'][0]:.0%}; CPU cost "
            f"{dumps['jpeg'][1] / dumps['none'][1]:.0%})",
            dumps["jpeg"][0] >= 0.9 * dumps["none"][0],
        ),
        ("writes >= 1,000 samples/s", write_fp16 >= 1000),
        ("fp16 <= 200 kB/sample", sizes["fp16"] <= 200e3),
        ("a lossy mode <= 64 kB/sample", min(sizes["lossy"], sizes["lossy16"]) <= 64e3),
    ]
    lines += [
        "",
        "Goals: " + "; ".join(f"{g}: {'met' if ok else 'MISSED'}" for g, ok in goals),
        "",
        f"Machine: {os.cpu_count()} cores, load average {min(load):.1f}-{max(load):.1f} "
        "during the run (1.0 is this benchmark's own process); compare the side-by-side ratios, "
        "not the absolute rates, across machines.",
    ]
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
