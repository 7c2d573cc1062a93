"""What the store's checksums cost: the training data path with and without them, side by side.

    python -m benchmarks.integrity_bench [--quick] [--people N] [--repeats R]

Two stores of the same samples, written in one run: schema 2 (crc32c on every chunk, shard
manifests, per-chunk layout checks: what `dump-teacher` writes now) and a schema-1 store (zstd
only, no manifests: what it wrote before). Samples have DistilPose-S's real per-sample size
(K=17 heatmaps of 64x48, 17 keypoint + 256 visual tokens of D=192, fp16); crop specs, crop
digests and keypoints are real (demo images, the paper's augmentation); teacher outputs are
synthetic (a Gaussian peak per joint on a noise floor, normal tokens), which compress like real
ones. Three paths are timed, the two stores in adjacent pairs (ABBA order), `repeats` pairs;
the cost is the median of the pairs' costs.
Throughput is samples per CPU second (process time, all threads), so that neighbours on a
shared machine do not decide the comparison:

- training data path: `StudentBatches` exactly as `train-student` builds it (all five losses,
  digest check on), in-process (workers=0): samples/s per data-loading core. This is the figure
  the goal is about.
- store read alone: `StoreReader.iter_batches` with the fields training reads, in-process,
  warm page cache: the part the checksums touch.
- teacher arrays alone: every chunk of heatmaps and tokens through `read_chunk`, nothing else:
  the worst case of the checksums' relative cost (the bytes they cover, and no other work).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from distilpose.geometry import PAPER
from distilpose.training.losses import LOSS_NAMES

RESULTS = Path(__file__).resolve().parent / "results"
K, D = 17, 192  # COCO joints, DistilPose-S token dim
INPUT, (WH, HH), P = PAPER.input_size, PAPER.heatmap_size, PAPER.num_patches
LOSSES = LOSS_NAMES


def _outputs(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:HH, 0:WH].astype(np.float32)
    c = rng.uniform([0, 0], [WH, HH], (n, K, 2)).astype(np.float32)
    d2 = (xx - c[..., 0, None, None]) ** 2 + (yy - c[..., 1, None, None]) ** 2
    hm = np.exp(-d2 / 8) + rng.normal(0, 1e-3, (n, K, HH, WH)).astype(np.float32)
    return {
        "heatmaps": hm.astype(np.float32),
        "keypoint_tokens": rng.normal(size=(n, K, D)).astype(np.float32),
        "visual_tokens": rng.normal(size=(n, P, D)).astype(np.float32),
    }


def _samples(root: Path, people: int) -> tuple[dict, list, dict]:
    """Demo data, and per instance the real crop spec / keypoints / digest of view 0."""
    from distilpose.data import (
        AugmentRecipe,
        crop_digest,
        load_coco_instances,
        make_demo_data,
        read_image,
        render_crop,
        sample_crop_spec,
    )

    paths = make_demo_data(root / "data", num_train=people, num_val=4, seed=0)
    ann, images = str(paths["train_ann"]), str(paths["train_images"])
    instances = load_coco_instances(ann, images, train=True, aspect_ratio=INPUT[0] / INPUT[1])
    recipe = AugmentRecipe()
    from store.pixels import decode_crop, encode_crop

    names = ("spec", "keypoints", "weights", "crop_digest", "jpeg", "jpeg_digest")
    rows: dict[str, list] = {k: [] for k in names}
    for inst in instances:
        spec = sample_crop_spec(inst, recipe, 0, 0, INPUT)
        crop = render_crop(read_image(inst.image_path), spec, inst.keypoints, INPUT)
        jpeg = encode_crop(crop.image, "jpeg")  # what dump-teacher --pixels jpeg keeps
        rows["spec"].append(spec.to_array())
        rows["keypoints"].append(crop.keypoints)
        rows["weights"].append(crop.weights)
        rows["crop_digest"].append(crop_digest(crop.image))
        rows["jpeg"].append(jpeg)
        rows["jpeg_digest"].append(crop_digest(decode_crop(jpeg, "jpeg", INPUT)))
    return paths, instances, {"recipe": recipe.to_dict(), **rows}


def _write(
    path: Path, paths: dict, instances: list, rows: dict, checksums: bool, pixels: bool
) -> None:
    import store.writer as writer_module
    from distilpose.data import annotation_digest
    from store import StoreMeta, StoreWriter

    meta = StoreMeta(
        teacher_name="synthetic", teacher_sha256="0" * 64, num_instances=len(instances),
        geometry=PAPER, token_dim=D,
        num_keypoints=K, recipe=rows["recipe"], ann_digest=annotation_digest(paths["train_ann"]),
        ann_file=str(paths["train_ann"]), image_root=str(paths["train_images"]),
        schema_version=2 if checksums or pixels else 1, pixels="jpeg" if pixels else "none",
    )  # fmt: skip
    with contextlib.ExitStack() as undo:
        if not checksums:  # what the writer did before schema 2
            from zarr.codecs import ZstdCodec

            saved = writer_module.array_compressors, writer_module.StoreWriter.manifest
            writer_module.array_compressors = lambda spec: (
                [ZstdCodec(level=spec.zstd_level)] if spec.zstd_level else []
            )
            writer_module.StoreWriter.manifest = lambda self, unit: None
            undo.callback(
                lambda: (
                    setattr(writer_module, "array_compressors", saved[0]),
                    setattr(writer_module.StoreWriter, "manifest", saved[1]),
                )
            )
        w = StoreWriter.create_or_open(path, meta)
        rng = np.random.default_rng(0)
        for unit in w.pending_units():
            idx = w.unit_instances(unit)
            arrays = {k: [rows[k][i] for i in idx] for k in ("keypoints", "weights")}
            spec = np.stack([rows["spec"][i] for i in idx])
            w.write_unit(
                unit,
                {
                    **{k: np.stack(v) for k, v in arrays.items()},
                    "spec": spec,
                    "image_id": np.array([instances[i].image_id for i in idx]),
                    "ann_id": np.array([instances[i].ann_id for i in idx]),
                    "crop_digest": [
                        rows["jpeg_digest" if pixels else "crop_digest"][i] for i in idx
                    ],
                    **({"pixels": [rows["jpeg"][i] for i in idx]} if pixels else {}),
                    **_outputs(len(idx), rng),
                },
            )


def _timed(fn, min_s: float) -> float:
    """Samples per CPU second of `fn() -> samples` (all of this process's threads: zarr decodes
    in its own), repeated until `min_s` CPU seconds have passed. CPU time rather than wall time:
    on a shared machine wall time measures the neighbours; CPU time per sample is the cost."""
    n, start = 0, time.process_time()
    while True:
        n += fn()
        elapsed = time.process_time() - start
        if elapsed >= min_s:
            return n / elapsed


def _train_path(store: Path, epoch: list[int]) -> int:
    from student_train.data import StudentBatches

    data = StudentBatches(store, batch_size=64, workers=0, losses=LOSSES)
    epoch[0] += 1
    return sum(len(b["instance"]) for b in data(epoch[0]))


def _read_path(store: Path, epoch: list[int]) -> int:
    from store import StoreReader
    from student_train.data import INDEX_FIELDS, target_fields

    fields = (*INDEX_FIELDS, "crop_digest", *target_fields(LOSSES))
    epoch[0] += 1
    batches = StoreReader.open(store).iter_batches(0, 64, 0, epoch[0], fields=fields)
    return sum(len(b["instance"]) for b in batches)


def _targets_only(store: Path, epoch: list[int]) -> int:
    """Every chunk of the three teacher arrays, nothing else: crc32c's share at its largest."""
    from store import StoreReader

    reader = StoreReader.open(store)
    n = 0
    for a, b in reader.chunks(0):
        reader.read_chunk(a, b, ("heatmaps", "keypoint_tokens", "visual_tokens"))
        n += b - a
    return n


def _crc32c_us(sample_bytes: int) -> float:
    """CPU microseconds of a crc32c over one sample's bytes (64 samples at once, best of 20)."""
    import google_crc32c

    data = np.random.default_rng(0).bytes(64 * sample_bytes)
    best = float("inf")
    for _ in range(20):
        t = time.process_time()
        google_crc32c.value(data)
        best = min(best, time.process_time() - t)
    return best / 64 * 1e6


def run(quick: bool = True, people: int | None = None, repeats: int | None = None) -> str:
    import torch

    torch.set_num_threads(1)  # one data-loading core, as one DataLoader worker has
    people = people or (128 if quick else 512)
    repeats = repeats or (6 if quick else 12)
    min_s = 0.4 if quick else 1.0
    with tempfile.TemporaryDirectory(prefix="integrity_bench_") as tmp:
        root = Path(tmp)
        paths, instances, rows = _samples(root, people)
        stores = {
            (c, px): root / f"{'crc' if c else 'plain'}{'_jpeg' if px else ''}.zarr"
            for c in (True, False)
            for px in (False, True)
        }
        for (checksums, pixels), path in stores.items():
            _write(path, paths, instances, rows, checksums, pixels)
        rates: dict[tuple[str, bool], list[float]] = {}
        epoch = [0]
        names = (
            ("train", _train_path, False),
            ("train_jpeg", _train_path, True),
            ("read", _read_path, False),
            ("targets", _targets_only, False),
        )
        # the unchecksummed pixel store has schema-2 metadata (pixels exist only there), which
        # readers refuse without checksums: let this run read it as the "before" side
        import store.reader as reader_module

        saved, reader_module.CHECKSUMS_SINCE = reader_module.CHECKSUMS_SINCE, 1 << 30
        try:
            for _, fn, pixels in names:  # warm-up: first calls load decoders and caches
                for checksums in (True, False):
                    fn(stores[(checksums, pixels)], epoch)
            for i in range(repeats):  # pairs, in ABBA order: drifting load hits both sides
                for name, fn, pixels in names:
                    for checksums in (True, False) if i % 2 == 0 else (False, True):
                        path = stores[(checksums, pixels)]
                        rate = _timed(lambda p=path, f=fn: f(p, epoch), min_s)
                        rates.setdefault((name, checksums), []).append(rate)
        finally:
            reader_module.CHECKSUMS_SINCE = saved
        disk = {
            c: sum(f.stat().st_size for f in stores[(c, False)].rglob("*") if f.is_file())
            for c in (True, False)
        }
    # the cost is judged pair by pair (the two runs of a pair are adjacent in time, so they saw
    # nearly the same neighbours): median and quartiles of the pairs' costs
    costs = {
        name: sorted(
            100 * (1 - a / b)
            for a, b in zip(rates[(name, True)], rates[(name, False)], strict=True)
        )
        for name, _, _ in names
    }

    def quartiles(xs: list[float]) -> tuple[float, float, float]:
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return q[0], statistics.median(xs), q[2]

    load = os.getloadavg()[0]
    lines = [
        "## Store checksums (integrity_bench)",
        "",
        f"{len(instances)} samples of DistilPose-S size, batches of 64, in-process (torch 1 "
        f"thread, workers=0); samples per CPU second of the process (all its threads), median "
        f"of {repeats} pairs of adjacent runs (ABBA order) of >= {min_s:g} CPU s each; the cost "
        "is the median of the pairs' costs, with its quartiles. Machine load average at the "
        f"end: {load:.1f} on {os.cpu_count()} cores (a shared machine: pairs, not absolute "
        "rates, carry the result).",
        "",
        "| path, samples/s per core | schema 2: crc32c + manifests + checks | schema 1: none "
        "| cost of the checks (quartiles) |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("train", "training data path (StudentBatches), crops re-rendered from the images"),
        ("train_jpeg", "training data path (StudentBatches), JPEG crops from the store"),
        ("read", "store read alone (iter_batches, training's fields)"),
        ("targets", "teacher arrays alone (read_chunk of heatmaps and tokens)"),
    ):
        on, off = statistics.median(rates[(name, True)]), statistics.median(rates[(name, False)])
        q1, med, q3 = quartiles(costs[name])
        lines.append(
            f"| {label} | {on:,.0f} | {off:,.0f} | {med:+.1f}% ({q1:+.1f}% .. {q3:+.1f}%) |"
        )
    cost = max(quartiles(costs["train"])[1], quartiles(costs["train_jpeg"])[1])
    per_sample = disk[True] / len(instances)
    crc_us = _crc32c_us(int(per_sample))
    train_us = 1e6 / statistics.median(rates[("train_jpeg", True)])
    read_us = 1e6 / statistics.median(rates[("targets", False)])
    lines += [
        "",
        f"The arithmetic, from figures that noise does not move: a crc32c of one sample's stored "
        f"bytes ({per_sample / 1e3:.0f} kB) takes {crc_us:.1f} CPU us here (best of 20), that is "
        f"{100 * crc_us / train_us:.1f}% of the (JPEG) training data path's {train_us:.0f} us "
        f"per sample and {100 * crc_us / read_us:.1f}% of reading the teacher arrays alone "
        f"({read_us:.0f} us).",
        "",
        f"Bytes on disk: {disk[True] / len(instances) / 1e3:.1f} kB/sample with checksums, "
        f"{disk[False] / len(instances) / 1e3:.1f} kB without (4 bytes per chunk and array, "
        "plus the markers' manifests).",
        "",
        f"Goal: checksums cost < 5% of the training data path's throughput: "
        f"{'met' if cost < 5 else 'MISSED'} (the worse of the two data paths: {cost:+.1f}%). "
        "The data paths re-render or decode every crop, which costs far more per sample than a "
        "crc32c of its bytes; the teacher-arrays row is the checksums' cost where nothing else "
        "is done.",
    ]
    section = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "integrity_bench.md").write_text(section + "\n")
    return section


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.integrity_bench")
    parser.add_argument("--quick", action="store_true", help="short run (the default)")
    parser.add_argument("--full", action="store_true", help="512 people, 12 pairs of 1 CPU s")
    parser.add_argument("--people", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    print(run(quick=not args.full, people=args.people, repeats=args.repeats))


if __name__ == "__main__":
    main()
