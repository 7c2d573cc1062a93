"""Whole-store statistics (`store_info`, dask) and crop re-rendering checks (`store_verify`)."""

from __future__ import annotations

import os
from collections.abc import Callable

import dask
import dask.array as da
import numpy as np

from distilpose.progress import progress
from store.reader import StoreReader, load_store_instances
from store.schema import TEACHER_OUTPUTS, digest_hex


def _disk_bytes(reader: StoreReader) -> int:
    loc = reader.location
    if loc.is_local:
        return sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(loc.root) for f in files
        )
    return int(loc.fs.du(loc.root, total=True))


def _complete_slots(reader: StoreReader) -> np.ndarray:
    chunks = reader.chunks(None, allow_incomplete=True)
    if not chunks:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b) for a, b in chunks])


def _dask(reader: StoreReader, name: str, chunks: list[tuple[int, int]]) -> da.Array:
    """The complete real slots of one stored array as a dask array, one block per chunk."""
    arr = reader.arrays[name]
    full = da.from_array(arr, chunks=(reader.meta.chunk_samples, *arr.shape[1:]))
    return da.concatenate([full[a:b] for a, b in chunks]) if chunks else full[:0]


def store_info(path: object, storage_options: dict | None = None) -> dict:
    """Summary of a store: completeness, size on disk, compression, teacher confidence, NaN/Inf.

    Teacher confidence: per joint, the heatmap maximum of each complete sample, summarized as
    mean and 5/50/95th percentiles over samples.
    """
    reader = StoreReader.open(path, storage_options)
    m, lay = reader.meta, reader.layout
    done = set(reader.complete_units().tolist())
    units_per_view = lay.units_per_view
    views_complete = [
        v
        for v in range(m.views)
        if all(u in done for u in range(v * units_per_view, (v + 1) * units_per_view))
    ]
    chunks = reader.chunks(None, allow_incomplete=True)
    samples = sum(b - a for a, b in chunks)
    disk = _disk_bytes(reader)
    stored = sum(
        int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
        for s in reader.specs.values()
    )
    fp32 = sum(
        int(np.prod(s.shape, dtype=np.int64))
        * (4 if s.name in TEACHER_OUTPUTS else np.dtype(s.dtype).itemsize)
        for s in reader.specs.values()
        if not s.name.endswith("_scale")
    )
    info = {
        "path": str(path),
        "schema_version": m.schema_version,
        "teacher": m.teacher_name,
        "teacher_outputs": list(m.teacher_outputs),
        "teacher_sha256": m.teacher_sha256,
        "mode": m.mode,
        "num_instances": m.num_instances,
        "views": m.views,
        "views_complete": views_complete,
        "units": lay.num_units(m.views),
        "units_complete": len(done),
        "samples": m.num_instances * m.views,
        "samples_complete": samples,
        "complete": samples == m.num_instances * m.views,
        "bytes_on_disk": disk,
        "bytes_per_sample": disk / samples if samples else float("nan"),
        "raw_bytes_per_sample": stored,
        "compression_ratio": stored * samples / disk if samples and disk else float("nan"),
        "ratio_vs_float32": fp32 * samples / disk if samples and disk else float("nan"),
    }
    if not samples:
        info.update(nonfinite={}, confidence={})
        return info

    with dask.config.set(scheduler="threads", num_workers=2):
        hm = _dask(reader, "heatmaps", chunks)
        peak = hm.max(axis=(2, 3)).astype(np.float32)  # [S, K]
        if m.mode != "fp16":  # codes -> values: the peak code maps through the joint's scale
            scale = _dask(reader, "heatmaps_scale", chunks)
            peak = peak * scale[..., 1] + scale[..., 0]
        checks = {"peak": peak}
        for name in ("spec", "keypoints", "weights", *m.teacher_outputs):
            s = reader.specs[name]
            if np.dtype(s.dtype).kind == "f":
                x = _dask(reader, name, chunks)
                checks[f"nan:{name}"] = da.isnan(x).sum()
                checks[f"inf:{name}"] = da.isinf(x).sum()
        (res,) = dask.compute(checks)
    peak = np.asarray(res.pop("peak"), dtype=np.float64)
    info["nonfinite"] = {k: int(v) for k, v in res.items()}
    info["nonfinite_total"] = int(sum(res.values()))
    info["confidence"] = {
        "mean": peak.mean(0).round(4).tolist(),
        "p5": np.percentile(peak, 5, axis=0).round(4).tolist(),
        "p50": np.percentile(peak, 50, axis=0).round(4).tolist(),
        "p95": np.percentile(peak, 95, axis=0).round(4).tolist(),
    }
    return info


def store_verify(
    path: object,
    sample: int | None = None,
    *,
    ann_file: str | None = None,
    image_root: str | None = None,
    images: Callable[[object], np.ndarray] | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
) -> dict:
    """Re-render crops from their stored specs and compare their sha256 with the stored digest.

    sample: check this many complete samples drawn at random (seeded), or all if None.
    ann_file / image_root override the paths recorded in the store (its digest must match);
    images(instance) -> uint8 BGR image overrides reading `instance.image_path`.
    Returns counts: checked, ok, mismatched (crop pixels), keypoints_mismatched (stored crop
    keypoints/weights differ from the re-rendered ones), and the first mismatched slots.
    """
    from distilpose.data import CropSpec, read_image, render_crop
    from distilpose.data import crop_digest as digest_of

    reader = StoreReader.open(path, storage_options)
    m = reader.meta
    instances = load_store_instances(m, path, ann_file, image_root)
    slots = _complete_slots(reader)
    if sample is not None and sample < len(slots):
        slots = np.sort(np.random.default_rng(seed).choice(slots, size=sample, replace=False))
    fields = ("slot", "spec", "instance", "image_id", "keypoints", "weights", "crop_digest")
    ok = bad = bad_kp = 0
    bad_slots: list[int] = []
    load = images or (lambda inst: read_image(inst.image_path))
    chunk = m.chunk_samples
    by_chunk: dict[int, list[int]] = {}
    for slot in slots.tolist():
        by_chunk.setdefault(slot // chunk, []).append(slot)
    for c in progress(list(by_chunk), desc="verify", unit="chunks"):
        data = reader.read_chunk(c * chunk, (c + 1) * chunk, fields)
        for slot in by_chunk[c]:
            row = {k: v[slot - c * chunk] for k, v in data.items()}
            inst = instances[int(row["instance"])]
            spec = CropSpec.from_array(row["spec"])
            crop = render_crop(load(inst), spec, inst.keypoints, tuple(m.input_size))
            same = digest_of(crop.image) == digest_hex(row["crop_digest"])
            same = same and inst.image_id == int(row["image_id"])
            kp_same = np.array_equal(crop.keypoints, row["keypoints"]) and np.array_equal(
                crop.weights, row["weights"]
            )
            ok += same
            bad += not same
            bad_kp += not kp_same
            if not (same and kp_same) and len(bad_slots) < 20:
                bad_slots.append(int(slot))
    return {
        "path": str(path),
        "checked": len(slots),
        "ok": ok,
        "mismatched": bad,
        "keypoints_mismatched": bad_kp,
        "mismatched_slots": bad_slots,
    }


def format_store_info(info: dict) -> str:
    """The readable form of `store_info`: one fact per line, per-joint confidence as a table."""
    from distilpose.data.keypoints import KEYPOINT_NAMES

    mib = info["bytes_on_disk"] / 2**20
    lines = [
        f"store            {info['path']} (schema {info['schema_version']}, mode {info['mode']})",
        f"teacher          {info['teacher']}  sha256 {str(info['teacher_sha256'])[:16]}...",
        f"teacher outputs  {', '.join(info.get('teacher_outputs', []))}",
        f"samples complete {info['samples_complete']:,} / {info['samples']:,} "
        f"({info['num_instances']:,} people x {info['views']} views; "
        f"views complete: {info['views_complete']})",
        f"on disk          {mib:,.1f} MiB, {info['bytes_per_sample'] / 1e3:,.1f} kB/sample, "
        f"compression x{info['compression_ratio']:.2f} "
        f"(x{info['ratio_vs_float32']:.2f} vs float32)",
    ]
    if "nonfinite_total" in info:
        lines.append(f"NaN/Inf values   {info['nonfinite_total']}")
    conf = info.get("confidence")
    if conf:
        lines.append("teacher confidence (heatmap peak) per joint: mean / p5 / p50 / p95")
        for k, name in enumerate(KEYPOINT_NAMES):
            lines.append(
                f"  {name:<15} {conf['mean'][k]:.3f} / {conf['p5'][k]:.3f} / "
                f"{conf['p50'][k]:.3f} / {conf['p95'][k]:.3f}"
            )
    return "\n".join(lines)
