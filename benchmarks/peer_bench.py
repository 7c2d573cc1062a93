"""Our store's training read against the loaders a researcher would pick instead, side by side.

    pip install -e ".[peers]"   # webdataset, litdata (benchmark-only extras)
    python -m benchmarks.peer_bench [--quick]

The same people (store_bench's COCO-like set: the coco_mini people over 300 images, each
person's view-0 crop at 192x256), the same JPEG crops (q95 4:4:4, `store.pixels.encode_crop`)
and the same fp16 teacher targets (heatmaps 17x64x48, keypoint tokens 17x192, visual tokens
256x192; synthetic values of real size, `store_bench.teacher_pool`) with keypoints and
weights, written four ways:

- ours: a `--pixels jpeg` store (`store_bench.write_pixel_store`, zstd targets, the default;
  `--raw-targets`; and `--mode compact`, whose reader decodes the targets back to the same
  full arrays), read by `StudentBatches.dataset`, what a train-student DataLoader
  worker runs (a CPU run's output: normalized crops);
- WebDataset: tar shards of about 64 MB, one sample per key (jpg + .npy per field), read by
  `webdataset.WebDataset` (shard shuffle, a 1,000-sample shuffle buffer), decoded here;
- LitData (Lightning): `litdata.optimize` chunks of 64 MB, read by `StreamingDataset`
  (shuffled);
- FFCV's `.beton`: not measured; the record says whether `ffcv` imports here (it compiles
  against the system's OpenCV 4 and libjpeg-turbo development files).

Every loader ends in the same batch of 64: the crops decoded with torchvision's CPU decoder
(`store.pixels.decode_rgb_crops`) and normalized (`normalize_rgb`), as ours, and all teacher
targets, keypoints and weights as float32 tensors (what ours hands a CPU run's losses; the
first record left the peers' half floats unconverted). One process, one thread, no workers:
samples per CPU-second, best of 3 epochs, the loaders in turn (so they share the machine's load
alike).
Bytes per view: each format's bytes on disk over its samples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

from benchmarks.store_bench import (
    TEACHER,
    coco_like,
    disk_bytes,
    render_all,
    teacher_pool,
    worker_epoch,
    write_pixel_store,
)
from store.pixels import encode_crop

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 64
SHARD_BYTES = 64 * 2**20
FIELDS = (*TEACHER, "keypoints", "weights")  # what every loader's batch carries besides pixels


def samples(crops: dict, pool: dict) -> list[dict]:
    """Every person's record as the peers store it: JPEG bytes, fp16 targets, keypoints."""
    m = len(pool["heatmaps"])
    out = []
    for i, (_spec, image, keypoints, weights) in sorted(crops.items()):
        rec = {k: pool[k][i % m].astype(np.float16) for k in TEACHER}
        rec.update(jpg=encode_crop(image, "jpeg"), keypoints=keypoints, weights=weights)
        out.append(rec)
    return out


def _npy(a: np.ndarray) -> bytes:
    buf = BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_webdataset(root: Path, recs: list[dict]) -> Path:
    """Tar shards of about SHARD_BYTES: `<key>.jpg` and `<key>.<field>.npy` per sample."""
    root.mkdir(parents=True)
    shard, size, tar = 0, 0, None
    for i, rec in enumerate(recs):
        if tar is None or size > SHARD_BYTES:
            if tar:
                tar.close()
            tar, size = tarfile.open(root / f"shard-{shard:05d}.tar", "w"), 0
            shard += 1
        files = {"jpg": rec["jpg"]}
        files.update({f"{k}.npy": _npy(rec[k]) for k in FIELDS})
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{i:08d}.{ext}")
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
            size += len(data) + 512
    tar.close()
    return root


def batches(samples, to_batch) -> int:
    """Group a loader's samples into batches of BATCH (the last one short), each turned into
    the common batch by `to_batch`; the samples seen."""
    n, batch = 0, []
    for sample in samples:
        batch.append(sample)
        if len(batch) == BATCH:
            n += to_batch(batch)
            batch = []
    return n + (to_batch(batch) if batch else 0)


def webdataset_epoch(root: Path, epoch: int) -> int:
    import webdataset as wds

    urls = sorted(str(p) for p in root.glob("*.tar"))
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=epoch, empty_check=False)
        .shuffle(1000, rng=random.Random(epoch))
        .to_tuple("jpg", *(f"{k}.npy" for k in FIELDS))
    )
    return batches(ds, _wds_batch)


def _wds_batch(batch: list[tuple]) -> int:
    """WebDataset samples (jpg bytes, then each field's .npy bytes) -> the common batch."""
    arrays = {k: [np.load(BytesIO(s[j + 1])) for s in batch] for j, k in enumerate(FIELDS)}
    return _assemble([s[0] for s in batch], arrays)


def _assemble(jpegs: list[bytes], fields: dict[str, list]) -> int:
    """The common batch: decoded, normalized crops and every field as a tensor (built to be
    paid for, then dropped); its size."""
    import torch

    from distilpose.data import normalize_rgb
    from distilpose.geometry import PAPER
    from store.pixels import decode_rgb_crops

    # float32 like ours (a CPU run's workers hand the losses float32 targets: `CropRenderer`);
    # the peers' half floats kept as half would skip a conversion ours pays
    batch = {k: torch.from_numpy(np.stack(v)).float() for k, v in fields.items()}
    batch["images"] = normalize_rgb(decode_rgb_crops(jpegs, "jpeg", PAPER.input_size))
    return len(jpegs)


def _lit_item(rec: dict) -> dict:
    """One LitData sample (module level: optimize pickles it into its worker)."""
    return {"jpg": rec["jpg"], **{k: rec[k] for k in FIELDS}}


def write_litdata(root: Path, recs: list[dict]) -> Path:
    from litdata import optimize

    optimize(fn=_lit_item, inputs=recs, output_dir=str(root), chunk_bytes="64MB",
             num_workers=1, mode="overwrite")  # fmt: skip
    return root


def litdata_epoch(root: Path, epoch: int) -> int:
    from litdata import StreamingDataset

    return batches(StreamingDataset(str(root), shuffle=True, seed=epoch), _lit_batch)


def _lit_batch(batch: list[dict]) -> int:
    return _assemble(
        [s["jpg"] for s in batch], {k: [np.asarray(s[k]) for s in batch] for k in FIELDS}
    )


def timed(fn, *args) -> tuple[int, float]:
    c = time.process_time()
    n = fn(*args)
    return n, time.process_time() - c


def run(quick: bool = False, rounds: int = 3) -> str:
    import cv2
    import torch

    from benchmarks.__main__ import machine_line

    os.environ.setdefault("DISTILPOSE_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rounds, n_images = (min(rounds, 2), 120) if quick else (rounds, 300)
    tmp = Path(tempfile.mkdtemp(prefix="peer_bench_"))
    try:
        pool = teacher_pool(512)
        ann, images = coco_like(tmp / "coco", n_images)
        insts, crops = render_all(ann, images)
        recs = samples(crops, pool)
        ours = {z: tmp / f"ours_{z}.zarr" for z in ("zstd", "raw", "compact")}
        for z, path in ours.items():
            write_pixel_store(path, "jpeg", z, ann, images, insts, crops, pool)
        wds_root = write_webdataset(tmp / "wds", recs)
        lit_root = write_litdata(tmp / "lit", recs)
        loaders = {
            "ours (`--pixels jpeg` store, StudentBatches)": (
                lambda e: worker_epoch(ours["zstd"], "images", e)[0], ours["zstd"]),
            "ours, `--raw-targets`": (
                lambda e: worker_epoch(ours["raw"], "images", e)[0], ours["raw"]),
            "ours, `--mode compact` (targets decoded to full arrays)": (
                lambda e: worker_epoch(ours["compact"], "images", e)[0], ours["compact"]),
            "WebDataset tar shards": (lambda e: webdataset_epoch(wds_root, e), wds_root),
            "LitData optimized dataset": (lambda e: litdata_epoch(lit_root, e), lit_root),
        }  # fmt: skip
        got: dict[str, list] = {k: [] for k in loaders}
        for r in range(rounds):
            for name, (fn, _) in loaders.items():
                got[name].append(timed(fn, r))
        n = len(recs)
        rows = [
            {
                "loader": name,
                "samples": got[name][0][0],
                "per_core": max(s / c for s, c in got[name]),
                "bytes_per_view": disk_bytes(path) / n,
            }
            for name, (_, path) in loaders.items()
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ffcv = (
        "not built here: `ffcv` does not import (`pip install ffcv` stops at 'Could not find "
        "required package: opencv4': it compiles against the system's OpenCV 4 and "
        "libjpeg-turbo development files, found by pkg-config, which this machine lacks)"
        if not _ffcv()
        else "imports, but is not timed yet"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "## Our store against peer loaders (peer_bench)",
        "",
        f"`python -m benchmarks.peer_bench{' --quick' if quick else ''}`: {n} COCO-like people "
        f"({n_images} images), 192x256 JPEG q95 crops + fp16 teacher targets (all three) + "
        f"keypoints, batches of {BATCH} of normalized crops and target tensors, one process and "
        f"thread; best of {rounds} epochs, loaders in turn. {machine_line()}; load average "
        f"{load} at the end.",
        "",
        "| loader | samples/epoch | samples per CPU-s | vs ours | kB per view on disk |",
        "|---|---:|---:|---:|---:|",
    ]
    base = rows[0]["per_core"]
    for r in rows:
        lines.append(
            f"| {r['loader']} | {r['samples']} | {r['per_core']:,.0f} | "
            f"{r['per_core'] / base:.2f}x | {r['bytes_per_view'] / 1e3:.1f} |"
        )
    lines += ["", f"FFCV: {ffcv}."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "peer_bench.md").write_text(text)
    (RESULTS / "peer_bench.json").write_text(json.dumps({"rows": rows, "ffcv": ffcv}, indent=2))
    return text


def _ffcv() -> bool:
    try:
        import ffcv  # noqa: F401
    except Exception:  # noqa: BLE001 - a failed build raises anything from ImportError to OSError
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="Epochs per loader (best taken).")
    args = p.parse_args(argv)
    print(run(quick=args.quick, rounds=args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
