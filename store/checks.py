"""Whole-store statistics (`store_info`, dask) and crop checks (`store_verify`: stored crops
decoded, or re-rendered from the images for stores without pixels)."""

from __future__ import annotations

import os
from collections.abc import Callable

import dask
import numpy as np

from distilpose.errors import StoreCorruptError
from distilpose.progress import progress
from store.compact import BASIS_SUFFIX
from store.reader import StoreReader, load_store_instances
from store.schema import (
    CANVAS,
    JPEG_PIXELS,
    PIXELS,
    TEACHER_OUTPUTS,
    output_shapes,
    read_fields,
    shard_key,
)


def _array_bytes(reader: StoreReader, name: str) -> int:
    """Bytes on disk of one array's files."""
    loc = reader.location
    root = loc.join(name)
    if loc.is_local:
        return sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
        )
    return int(loc.fs.du(root, total=True)) if loc.fs.exists(root) else 0


def bytes_per_view(reader: StoreReader) -> dict:
    """Stored bytes per sample (one view of one person), measured from the shard files of the
    complete units (their manifests' sizes; file sizes for version-1 markers), split into
    target (teacher outputs with their scales or codes), pixel and label bytes (spec, ids,
    ground truth, digest), plus the bytes stored once per store (a compact store's bases).
    NaN without complete units. A unit's padding slots store nothing (all fill values)."""
    units = reader.complete_units().tolist()
    samples = sum(reader.layout.unit_valid(u) for u in units)
    kinds = {"target": 0, "pixel": 0, "label": 0}
    for unit in units:
        manifest = reader.unit_manifest(unit) or {}
        for name, array in reader.arrays.items():
            size = manifest.get(name, [None])[0]
            if size is None:
                size = reader.location.file_size(shard_key(array, name, unit))
            kind = (
                "pixel" if name in (PIXELS, CANVAS)
                else "target" if name.removesuffix("_scale") in TEACHER_OUTPUTS
                else "label"
            )  # fmt: skip
            kinds[kind] += int(size)
    once = sum(_array_bytes(reader, o + BASIS_SUFFIX) for o in reader.bases)
    per = {
        f"{k}_bytes_per_view": v / samples if samples else float("nan") for k, v in kinds.items()
    }
    return {**per, "bytes_once": once}


def _complete_slots(reader: StoreReader) -> np.ndarray:
    chunks = reader.chunks(None, allow_incomplete=True)
    if not chunks:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b) for a, b in chunks])


def _reader_for(path: str, options: dict | None, token: str) -> StoreReader:
    """This process's reader of one check (`token`): opened once per worker, never reused by
    another check (a reader caches what it checked, and the store may have changed since)."""
    key = (path, repr(sorted((options or {}).items())), token)
    if _READERS.get("key") != key:
        _READERS.clear()
        _READERS.update(key=key, reader=StoreReader.open(path, options))
    return _READERS["reader"]


_READERS: dict = {}


def _on_chunks(reader: StoreReader, task, jobs: list, cluster: str | None) -> list:
    """[task(reader, *job) for job in jobs], in parallel: local threads sharing `reader`, or
    the processes of a Dask cluster, each opening the store once. The first failing job's error
    is raised as it is (a checked read's error names store, array and chunk)."""
    if not jobs:
        return []
    if cluster is None:
        tasks = [dask.delayed(task)(reader, *job) for job in jobs]
        return list(dask.compute(*tasks, scheduler="threads", num_workers=CHECK_THREADS))
    import uuid

    from distilpose.cluster import dask_client

    token = uuid.uuid4().hex
    path, options = reader.path, reader.location.storage_options or None

    def remote(*job):  # ships path and options, never the reader (its zarr handles)
        return task(_reader_for(path, options, token), *job)

    with dask_client(cluster) as client:
        return client.gather(client.map(remote, *zip(*jobs, strict=True), pure=False))


# threads for the checks without a cluster: reads release the GIL (I/O, zstd, crc32c)
CHECK_THREADS = max(2, min(8, os.cpu_count() or 2))


def skipped_rows(reader: StoreReader, start: int, stop: int, rows: dict) -> np.ndarray:
    """bool [stop - start]: the rows of slots the dump could not read; recorded in the markers
    (schema 3), or for older stores told by their mark: zero keypoint weights and an all-zero
    crop digest (`rows` holds "weights" and "crop_digest")."""
    if reader.signed:
        unit_size = reader.layout.unit_samples
        units = range(start // unit_size, (stop - 1) // unit_size + 1)
        skipped = reader.skipped_slots(list(units))
        return np.isin(np.arange(start, stop), np.fromiter(skipped, dtype=np.int64))
    weights = np.asarray(rows["weights"]).reshape(stop - start, -1)
    digest = np.asarray(rows["crop_digest"]).reshape(stop - start, -1)
    return ~weights.any(1) & ~digest.any(1)


def _chunk_summary(reader: StoreReader, start: int, stop: int) -> dict:
    """One complete chunk read through the checked reader: heatmap peaks [n, K] of the samples
    the dump could read, their count and NaN/Inf counts of the float arrays (a missing or
    damaged shard raises, never reads as zeros)."""
    m = reader.meta
    names = [
        n
        for n in ("spec", "keypoints", "weights", "crop_digest", *m.teacher_outputs)
        if n in reader.specs
    ]
    x = reader.read_chunk(start, stop, names, dtype=np.float32)
    skipped = skipped_rows(reader, start, stop, x)
    out = {"peak": x["heatmaps"][~skipped].max(axis=(2, 3)), "skipped": int(skipped.sum())}
    for name in names:
        if x[name].dtype.kind == "f":
            out[f"nan:{name}"] = int(np.isnan(x[name]).sum())
            out[f"inf:{name}"] = int(np.isinf(x[name]).sum())
    return out


def store_info(
    path: object, storage_options: dict | None = None, cluster: str | None = None
) -> dict:
    """Summary of a store: completeness, size on disk, compression, teacher confidence, NaN/Inf.

    Teacher confidence: per joint, the heatmap maximum of each complete sample, summarized as
    mean and 5/50/95th percentiles over samples. Every complete chunk is read through the
    checked reader (crc32c, the unit's manifest), in parallel: local threads, or the Dask
    cluster `cluster` names (local[:N], tcp://...); a damaged store raises, naming the chunk.
    """
    reader = StoreReader.open(path, storage_options)
    reader.check_markers()
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
    disk = reader.location.tree_bytes()
    fixed = [s for s in reader.specs.values() if s.name != PIXELS]
    stored = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in fixed)
    decoded = output_shapes(m)  # what a compact store's codes stand for
    fp32 = sum(
        int(np.prod(decoded.get(s.name, s.shape), dtype=np.int64))
        * (4 if s.name in TEACHER_OUTPUTS else np.dtype(s.dtype).itemsize)
        for s in fixed
        if not s.name.endswith("_scale")
    )
    pixel_bytes = reader.location.tree_bytes(PIXELS) if PIXELS in reader.specs else 0
    disk_targets = disk - pixel_bytes  # compression ratios are of the fixed-size arrays
    info = {
        "path": str(path),
        "schema_version": m.schema_version,
        "checksums": reader.checksums,
        "signed": reader.signed,
        "teacher": m.teacher_name,
        "teacher_outputs": list(m.teacher_outputs),
        "teacher_sha256": m.teacher_sha256,
        "mode": m.mode,
        "num_instances": m.num_instances,
        "views": m.views,
        "views_complete": views_complete,
        "units": lay.num_units(m.views),
        "units_complete": len(done),
        "units_unsigned": len(reader.unsigned),
        "samples": m.num_instances * m.views,
        "samples_complete": samples,
        "complete": samples == m.num_instances * m.views,
        "bytes_on_disk": disk,
        "bytes_per_sample": disk / samples if samples else float("nan"),
        "raw_bytes_per_sample": stored,
        "compression_ratio": (
            stored * samples / disk_targets if samples and disk_targets else float("nan")
        ),
        "ratio_vs_float32": fp32 * samples / disk_targets
        if samples and disk_targets
        else float("nan"),
        "pixels": m.pixels,
        "jpeg_quality": m.jpeg_quality,
        "pixel_bytes": pixel_bytes,
        "pixel_bytes_per_sample": pixel_bytes / samples if samples else float("nan"),
        **bytes_per_view(reader),
    }
    if not samples:
        info.update(nonfinite={}, confidence={}, skipped=0)
        return info

    parts = _on_chunks(reader, _chunk_summary, chunks, cluster)
    res = {k: sum(p[k] for p in parts) for k in parts[0] if k != "peak"}
    res["peak"] = np.concatenate([p["peak"] for p in parts])
    peak = np.asarray(res.pop("peak"), dtype=np.float64)
    info["skipped"] = int(res.pop("skipped"))  # images the dump could not read
    if not len(peak):
        info.update(nonfinite={k: int(v) for k, v in res.items()}, confidence={})
        info["nonfinite_total"] = int(sum(res.values()))
        return info
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
    cluster: str | None = None,
) -> dict:
    """Check a store's sampled slots through every array, then their crops against the stored
    digests: decode them (stores with pixels), or re-render them from their specs and the
    images (stores without).

    sample: check this many complete samples drawn at random (seeded), or all if None.
    First `check_integrity`: every array of each chunk holding a sampled slot is read and
    checked (chunk crc32c, instances and specs against the slot layout, finite values), and
    each touched unit's shard files are compared with its manifest (size and whole-file
    crc32c); each failure is a `problems` line naming array and chunk, counted in `corrupt`.
    These reads run in parallel: local threads, or the Dask cluster `cluster` names.
    ann_file / image_root override the paths recorded in the store (its digest must match);
    images(instance) -> uint8 BGR image overrides reading `instance.image_path`.
    Returns counts: checked, ok, mismatched (crop pixels), keypoints_mismatched (stored crop
    keypoints/weights differ from the re-rendered ones; not checked for stores with pixels,
    which need no images), skipped (samples the dump could not read, all-zero digest), corrupt,
    the first problems and mismatched slots, how the crops were checked ("decoded" or
    "re-rendered"), and whether the store has checksums and manifests (version-1 stores have
    neither). `ok_all` is False on any failure of any kind.
    """
    reader = StoreReader.open(path, storage_options)
    reader.check_markers()
    m = reader.meta
    by_chunk = _sample_slots(reader, sample, seed)
    integrity = check_integrity(reader, by_chunk, cluster)
    readable = {c: v for c, v in by_chunk.items() if c not in integrity["bad_chunks"]}
    if m.pixels != "none":
        result = _verify_pixels(reader, path, readable)
    else:
        result = _verify_rendered(reader, path, readable, ann_file, image_root, images)
    problems = integrity["problems"]
    failed = result["mismatched"] or result["keypoints_mismatched"] or problems
    return {
        **result,
        "corrupt": len(problems),
        "problems": problems[:20],
        "checksums": reader.checksums,
        "manifests": integrity["manifests"],
        "signed": reader.signed,
        "ok_all": not failed,
    }


def _verify_rendered(
    reader: StoreReader,
    path: object,
    by_chunk: dict[int, list[int]],
    ann_file: str | None,
    image_root: str | None,
    images: Callable[[object], np.ndarray] | None,
) -> dict:
    """Re-render crops from their specs and compare their sha256 with the stored digest."""
    from distilpose.data import CropSpec, read_image, render_crop
    from distilpose.data import crop_digest as digest_of

    m = reader.meta
    instances = load_store_instances(m, path, ann_file, image_root)
    fields = ("slot", "spec", "instance", "image_id", "keypoints", "weights", "crop_digest")
    ok = bad = bad_kp = skipped = 0
    bad_slots: list[int] = []
    load = images or (lambda inst: read_image(inst.image_path))
    chunk = m.chunk_samples
    for c in progress(list(by_chunk), desc="verify", unit="chunks"):
        start, stop = _chunk_range(reader, c)
        data = reader.read_chunk(start, stop, fields)
        unread = skipped_rows(reader, start, stop, data)
        for slot in by_chunk[c]:
            if unread[slot - start]:
                skipped += 1  # the dump could not read this image: nothing to re-render
                continue
            row = {k: v[slot - c * chunk] for k, v in data.items()}
            inst = instances[int(row["instance"])]
            spec = CropSpec.from_array(row["spec"])
            crop = render_crop(load(inst), spec, inst.keypoints, m.geometry.input_size)
            same = digest_of(crop.image) == row["crop_digest"].tobytes()
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
        "checked": ok + bad + skipped,
        "ok": ok,
        "mismatched": bad,
        "keypoints_mismatched": bad_kp,
        "mismatched_slots": bad_slots,
        "skipped": skipped,
        "crops": "re-rendered",
    }


def _chunk_range(reader: StoreReader, chunk: int) -> tuple[int, int]:
    """Slots [start, stop) of chunk `chunk` of the store's arrays."""
    start = chunk * reader.layout.chunk_samples
    return start, min(
        start + reader.layout.chunk_samples, reader.layout.num_slots(reader.meta.views)
    )


def _sample_slots(reader: StoreReader, sample: int | None, seed: int) -> dict[int, list[int]]:
    """Complete slots (a seeded random sample, or all), grouped by chunk."""
    slots = _complete_slots(reader)
    if sample is not None and sample < len(slots):
        slots = np.sort(np.random.default_rng(seed).choice(slots, size=sample, replace=False))
    by_chunk: dict[int, list[int]] = {}
    for slot in slots.tolist():
        by_chunk.setdefault(slot // reader.meta.chunk_samples, []).append(slot)
    return by_chunk


def _verify_pixels(reader: StoreReader, path: object, by_chunk: dict[int, list[int]]) -> dict:
    """Decode stored crops and compare the sha256 of the pixels with the stored digest."""
    from distilpose.data import crop_digest as digest_of
    from store.pixels import canvas_crop, decode_crop

    m = reader.meta
    chunk, size = m.chunk_samples, m.geometry.input_size
    ok = bad = skipped = 0
    bad_slots: list[int] = []
    for c in progress(list(by_chunk), desc="verify", unit="chunks"):
        start, stop = _chunk_range(reader, c)
        data = reader.read_chunk(start, stop, ("crop_digest", "weights", "spec", PIXELS))
        unread = skipped_rows(reader, start, stop, data)
        for slot in by_chunk[c]:
            i = slot - c * chunk
            stored = data["crop_digest"][i].tobytes()
            if unread[i]:
                skipped += 1  # the dump could not read this image: marked invalid, not a crop
                continue
            try:
                pixels = (
                    canvas_crop(data[PIXELS][i], data[CANVAS][i], data["spec"][i], size)
                    if m.pixels == "canvas"
                    else decode_crop(data[PIXELS][i], m.pixels, size)
                )
                same = digest_of(pixels) == stored
            except ValueError:  # bytes that do not decode are a mismatch, not a crash
                same = False
            ok += same
            bad += not same
            if not same and len(bad_slots) < 20:
                bad_slots.append(int(slot))
    return {
        "path": str(path),
        "checked": ok + bad + skipped,
        "ok": ok,
        "mismatched": bad,
        "keypoints_mismatched": 0,
        "mismatched_slots": bad_slots,
        "skipped": skipped,
        "crops": "decoded",
    }


def _stored_fields(reader: StoreReader) -> tuple[str, ...]:
    """Every field the store keeps (scales are read with their arrays), pixels included."""
    return tuple(f for f in (*read_fields(reader.meta), PIXELS) if f in reader.specs)


def _unit_problem(reader: StoreReader, unit: int) -> tuple[bool, str | None]:
    """(has a manifest, the problem line or None) of one unit's shard files (size, crc32c)."""
    try:
        manifest = reader.unit_manifest(unit) is not None
    except StoreCorruptError as e:
        return False, str(e)
    try:
        reader.check_unit_files(unit, crc=True)
    except StoreCorruptError as e:
        return manifest, str(e)
    return manifest, None


def _chunk_problem(reader: StoreReader, chunk: int) -> str | None:
    """The problem line of one chunk's checked read of every array (None: it reads clean)."""
    reader.check_finite = True  # store-verify checks values even where checksums hold
    start, stop = _chunk_range(reader, chunk)
    try:
        reader.read_chunk(start, stop, _stored_fields(reader))
    except StoreCorruptError as e:
        return str(e)
    return None


def check_integrity(
    reader: StoreReader, by_chunk: dict[int, list[int]], cluster: str | None = None
) -> dict:
    """Every array of the given chunks, read and checked (crc32c, layout, finite values), and
    their units' shard files against the manifests (size and whole-file crc32c), in parallel
    (local threads, or the Dask cluster `cluster` names).

    Returns problems (one line each, naming array and chunk), bad_chunks (chunk ids that cannot
    be read: not to use further) and manifests (whether the units have any: version-1 stores
    have none). A shard that differs from its manifest but still reads is a problem, and its
    chunks are checked on as well.
    """
    lay = reader.layout
    reader.check_finite = True
    units = sorted({c * lay.chunk_samples // lay.unit_samples for c in by_chunk})
    unit_results = _on_chunks(reader, _unit_problem, [(u,) for u in units], cluster)
    chunks = list(by_chunk)
    chunk_results = _on_chunks(reader, _chunk_problem, [(c,) for c in chunks], cluster)
    problems = [p for _, p in unit_results if p] + [p for p in chunk_results if p]
    return {
        "problems": list(dict.fromkeys(problems)),
        "bad_chunks": {c for c, p in zip(chunks, chunk_results, strict=True) if p},
        "manifests": any(m for m, _ in unit_results),
    }


def verify_failure(result: dict) -> str | None:
    """The one line a failed `store_verify` result deserves (None if it passed)."""
    if result["ok_all"]:
        return None
    if result["problems"]:
        more = len(result["problems"]) - 1
        return result["problems"][0] + (f" (and {more} more problem(s))" if more else "")
    return (
        f"{result['path']}: {result['mismatched']} of {result['checked']} crops and "
        f"{result['keypoints_mismatched']} keypoint rows differ from what the teacher saw "
        f"(first slots {result['mismatched_slots'][:5]}); expected the store's images and "
        "annotation file unchanged"
    )


def format_store_info(info: dict) -> str:
    """The readable form of `store_info`: one fact per line, per-joint confidence as a table."""
    from distilpose.data.keypoints import KEYPOINT_NAMES

    mib = info["bytes_on_disk"] / 2**20
    lines = [
        f"store            {info['path']} (schema {info['schema_version']}, mode {info['mode']}, "
        f"{'crc32c per chunk' if info.get('checksums') else 'no checksums'}, "
        f"{'signed metadata' if info.get('signed') else 'unsigned metadata'})",
        f"teacher          {info['teacher']}  sha256 {str(info['teacher_sha256'])[:16]}...",
        f"teacher outputs  {', '.join(info.get('teacher_outputs', []))}",
        f"samples complete {info['samples_complete']:,} / {info['samples']:,} "
        f"({info['num_instances']:,} people x {info['views']} views; "
        f"views complete: {info['views_complete']})",
        f"on disk          {mib:,.1f} MiB, {info['bytes_per_sample'] / 1e3:,.1f} kB/sample, "
        f"compression x{info['compression_ratio']:.2f} "
        f"(x{info['ratio_vs_float32']:.2f} vs float32)",
        f"per view         {info['target_bytes_per_view'] / 1e3:,.2f} kB teacher targets, "
        f"{info['pixel_bytes_per_view'] / 1e3:,.2f} kB pixels, "
        f"{info['label_bytes_per_view'] / 1e3:,.2f} kB labels (complete units; "
        f"{info['bytes_once'] / 1e3:,.1f} kB once per store)",
    ]
    if info.get("pixels", "none") != "none":
        quality = f" quality {info['jpeg_quality']}" if info["pixels"] in JPEG_PIXELS else ""
        once = (
            f" (a canvas per person, {info['pixel_bytes'] / info['num_instances'] / 1e3:,.1f} "
            "kB/person)"
            if info["pixels"] == "canvas"
            else ""
        )
        lines.append(
            f"pixels           {info['pixels']}{quality}{once}: "
            f"{info['pixel_bytes_per_sample'] / 1e3:,.1f} kB/sample, "
            f"{info['pixel_bytes'] / 2**20:,.1f} MiB in all"
        )
    else:
        lines.append("pixels           none (crops are re-rendered from the images)")
    if "nonfinite_total" in info:
        lines.append(f"NaN/Inf values   {info['nonfinite_total']}")
    if info.get("skipped"):
        lines.append(
            f"skipped images   {info['skipped']} sample(s) the dump could not read (left out of "
            "training)"
        )
    if info.get("units_unsigned"):
        lines.append(
            f"unsigned units   {info['units_unsigned']} marked but not signed yet (a dump "
            "running, or stopped between the two: rerunning it signs them)"
        )
    conf = info.get("confidence")
    if conf:
        lines.append("teacher confidence (heatmap peak) per joint: mean / p5 / p50 / p95")
        for k, name in enumerate(KEYPOINT_NAMES):
            lines.append(
                f"  {name:<15} {conf['mean'][k]:.3f} / {conf['p5'][k]:.3f} / "
                f"{conf['p50'][k]:.3f} / {conf['p95'][k]:.3f}"
            )
    return "\n".join(lines)
