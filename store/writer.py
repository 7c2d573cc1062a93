"""Fill a teacher store, one write unit (= one zarr shard per array) at a time.

Safety rules, in the order a unit is written:
1. the unit's arrays are checked (shapes, instance/view against the slot layout, NaN/Inf),
   encoded (fp16 or quantized) and written as whole shards: zarr writes each shard to a temp
   file and renames it, and no two units share a shard file, so concurrent writers
   (`shard=(i, n)`, e.g. one per GPU) never touch the same file;
2. the shard files and their directories reach the disk (one Linux `syncfs` of the store's
   filesystem, or an fsync per file and directory where syncfs is unavailable);
3. only then the unit's marker `complete/u<unit>.json` is written (temp file, fsync, rename).
The marker holds the unit's manifest (per array: shard file size and crc32c), which readers
check, so a shard deleted or truncated later is an error, never zeros.
Writers started together on one store never work on the same unit: each takes a unit by
creating `complete/.u<unit>.claim` (exclusive: a hard link to its writer file, which holds
its pid) and skips units a live writer holds (live = it holds the flock on its
`complete/.writer.<pid>.lock`, which the kernel drops when it dies); temp files carry the
writer's pid and only dead writers' ones are removed.
A killed writer leaves finished units marked and at most its current unit unmarked; a rerun
rewrites exactly the pending units, and zstd output is deterministic, so the resumed store is
byte-for-byte the uninterrupted one. Store metadata changes (creation, more views) happen under
an exclusive lock file, arrays first and the metadata attribute last.
On an object store (S3) step 1 is one PUT per shard file (atomic: no temp file, no rename),
step 2 is those PUTs having returned, step 3 one PUT of the marker; there are no claims and no
lock file: one writer per unit range (`shard=(i, n)` or a Dask cluster), see store/remote.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import zarr

from distilpose.errors import StoreFormatError, StoreMismatchError
from distilpose.io import fsync_dir, fsync_path
from distilpose.limits import env_seconds
from store import compact
from store.location import StoreLocation, marker_name, run_settled, syncfs
from store.quantize import heatmap_bits, quantize_heatmaps, quantize_tokens
from store.remote import check_bucket
from store.schema import (
    CANVAS,
    COMPLETE_DIR,
    META_KEY,
    PIXELS,
    READ_FIELDS,
    SIGNATURE_KEY,
    SIGNED_FILE,
    SIGNED_SINCE,
    StoreLayout,
    StoreMeta,
    array_compressors,
    array_specs,
    check_chunk_layout,
    digest_rows,
    output_shapes,
    quiet_vlen_bytes,
    read_fields,
    rows_crc32c,
    shard_key,
)
from store.signature import (
    body_of,
    changed_fields,
    check_meta_signature,
    read_signed_units,
    sha256_of,
    sign,
    signed_payload,
    write_signed_units,
)

# what a writer must hand over per unit: every readable field except those the layout derives
# (and, in a store without tokens, the token arrays: see `required_fields`)
REQUIRED = tuple(f for f in READ_FIELDS if f not in ("slot", "view", "instance"))
# a compact store's creator: (slot, instance, view) of `compact.fit_samples` -> the teacher's
# tokens there {output: [n, T, D]} (rows of samples it could not read may be left out)
FitTokens = Callable[[list[tuple[int, int, int]]], dict[str, np.ndarray]]


CLAIM_TIMEOUT_ENV = "DISTILPOSE_CLAIM_TIMEOUT"
CLAIM_TIMEOUT_S = 1800.0


def required_fields(meta: StoreMeta) -> tuple[str, ...]:
    """REQUIRED for a store made with `meta`: only the teacher outputs it holds."""
    return tuple(f for f in REQUIRED if f in read_fields(meta))


class StoreWriter:
    """Writes units of one store; see `create_or_open`."""

    def __init__(self, location: StoreLocation, group: zarr.Group, meta: StoreMeta, views: int):
        self.location = location
        self.path = str(location)
        self.group = group
        self.meta = meta  # the store's metadata (meta.views: view blocks it has room for)
        self.views = views  # the views this writer was asked to fill
        self.layout = StoreLayout(meta)
        self.specs = array_specs(meta)
        self.arrays = {name: group[name] for name in self.specs}
        for name, spec in self.specs.items():
            check_chunk_layout(self.path, name, self.arrays[name], spec, meta)
        self.required = required_fields(meta)
        self.shapes = output_shapes(meta)  # the teacher outputs as handed over (not as stored)
        self.bases = compact.read_bases(group, meta, self.path) if meta.compact() else {}
        self.signed = int(meta.schema_version) >= SIGNED_SINCE  # signatures (schema 3)

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create_or_open(
        cls, path: object, meta: StoreMeta, *, fit: FitTokens | None = None, **storage_options
    ) -> StoreWriter:
        """Create the store at `path`, or reopen it to resume or to add views.

        A compact store with tokens is created with its token bases, fitted on what `fit`
        returns for `compact.fit_samples` (called only when the store is created).

        Refuses (StoreMismatchError) a store whose teacher sha256, seed, annotation digest,
        mode or sizes differ from `meta`; a newer schema is a StoreFormatError. If
        `meta.views` exceeds the store's, view blocks are appended; old units are not touched.
        The store's chunk layout wins over the one in `meta` when reopening.
        """
        loc = _location(path, storage_options)
        try:
            with _locked(loc):
                group, stored = _open_existing(loc)
                if stored is None:
                    stored = _create(loc, meta, fit)
                    group = zarr.open_group(store=loc.zarr_store(read_only=False), mode="r+")
                else:
                    diff = stored.mismatches(meta)
                    if diff:
                        raise StoreMismatchError(
                            f"{loc}: store was made with other settings ({'; '.join(diff)}); "
                            "expected the same teacher, seed, annotation file, mode, pixels and "
                            "sizes (write to another path to start a new store)"
                        )
                    if meta.views > stored.views:
                        stored = _add_views(loc, group, stored, meta.views)
                    elif meta.views < stored.views:
                        _check_fewer_views(loc, stored, int(meta.views))
        except OSError as e:
            raise StoreFormatError(
                f"{_where(e, loc)}: cannot create or open the store ({_why(e)})"
            ) from e
        writer = cls(loc, group, stored, views=int(meta.views))
        writer.sign_units()  # units a writer stopped between marking and signing left
        return writer

    # ---- the plan ------------------------------------------------------------------------

    def units(self, view: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Write units of `view` (or of all views this writer fills) owned by shard i of n."""
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: expected 0 <= i < n")
        per = self.layout.units_per_view
        views = range(self.views) if view is None else [view]
        return [u for v in views for u in range(v * per, (v + 1) * per) if u % n == i]

    def complete_units(self) -> set[int]:
        return set(self.location.list_markers())

    def pending_units(self, shard: tuple[int, int] = (0, 1), view: int | None = None) -> list[int]:
        done = self.complete_units()
        return [u for u in self.units(view, shard) if u not in done]

    def is_complete(self) -> bool:
        return not self.pending_units()

    def unit_slots(self, unit: int) -> tuple[int, int]:
        return self.layout.unit_slots(unit)

    def unit_view(self, unit: int) -> int:
        return self.layout.unit_view(unit)

    def unit_instances(self, unit: int) -> np.ndarray:
        """[n] instance indices the unit's real slots hold, in slot order (write rows in it)."""
        return self.layout.unit_instances(unit)

    def slot_instance(self, slot: int) -> tuple[int, int]:
        return self.layout.slot_instance(slot)

    # ---- writing -------------------------------------------------------------------------

    def write_unit(self, unit: int, arrays: Mapping[str, object]) -> None:
        """Write one unit's samples, then mark it complete (durably).

        arrays: per real slot of the unit, in the order of `unit_instances(unit)` (rows beyond
        those, e.g. a padded last batch, are ignored): "spec" [n, 8], "image_id" [n],
        "ann_id" [n], "keypoints" [n, K, 2] crop px, "weights" [n, K], "crop_digest" (n
        32-byte `crop_digest`s or uint8 [n, 32]), "heatmaps" [n, K, Hh, Wh], "keypoint_tokens"
        [n, K, D], "visual_tokens" [n, P, D] (the tokens only if the store holds them: extra
        arrays are ignored); optionally "instance" [n] (checked against the layout).
        NumPy arrays or CPU tensors.
        """
        if not 0 <= unit < self.layout.num_units(self.meta.views):
            raise StoreFormatError(
                f"{self.path}: unit {unit} is outside the store's "
                f"{self.layout.num_units(self.meta.views)} units"
            )
        encoded = self._encode(unit, arrays)
        start, stop = self.layout.unit_slots(unit)
        try:
            self._clear_partials(unit)

            async def write_all() -> None:
                await asyncio.gather(
                    *(
                        self.arrays[name]._async_array.setitem(slice(start, stop), value)
                        for name, value in encoded.items()
                    )
                )

            run_settled(write_all())
            if self.location.is_local:
                self._fsync_unit(unit)
            body = {
                "unit": unit,
                "view": self.unit_view(unit),
                "slots": [start, stop],
                "valid": self.layout.unit_valid(unit),
                "manifest": self.manifest(unit),
                "chunk_crc32c": self._fingerprints(unit, encoded),
                "skipped": self._skipped(unit, arrays.get("error")),
            }
            self.location.write_marker(unit, signed_payload(body) if self.signed else body)
            if self.signed:
                self.sign_units([unit])
            self.release(unit)
        except OSError as e:
            raise StoreFormatError(
                f"{_where(e, self.location)}: writing unit {unit} of {self.path} failed "
                f"({_why(e)}); the unit stays pending and a rerun resumes it"
            ) from e

    def _fingerprints(self, unit: int, encoded: dict[str, np.ndarray]) -> dict[str, list[int]]:
        """Per array, `rows_crc32c` of each of the unit's chunks (real slots only)."""
        start, _ = self.layout.unit_slots(unit)
        chunks = [(a - start, b - start) for a, b in self.layout.unit_chunks(unit)]
        return {name: [rows_crc32c(a[i:j]) for i, j in chunks] for name, a in encoded.items()}

    def _skipped(self, unit: int, errors: object) -> list[list]:
        """[[slot, why], ...] of the unit's rows whose image could not be read (`errors`: one
        string per row, "" where it was read)."""
        if errors is None:
            return []
        start, _ = self.layout.unit_slots(unit)
        rows = list(errors)[: self.layout.unit_valid(unit)]
        return [[start + i, str(e).splitlines()[0][:300]] for i, e in enumerate(rows) if e]

    def sign_units(self, mine: list[int] | None = None) -> list[int]:
        """Add completed units to `complete/signed.json` (schema 3): the units in `mine` (just
        written here) and every other marked unit it does not list yet whose marker carries
        its own valid signature (a writer stopped between marker and signature). A unit it lists
        keeps its signed hash unless written here: an edited marker is never signed silently.
        Local stores: under the store's lock, so that writers started together never lose one
        another's units. Returns the units newly signed."""
        if not self.signed:
            return []
        mine, added = set(mine or ()), []
        with _locked(self.location):
            _clear_signed_temps(self.location)
            # object stores: another writer's PUT of the file may hide ours; read it back
            for _ in range(1 if self.location.is_local else 3):
                units = read_signed_units(self.location)
                new = [u for u in self.location.list_markers() if u not in units or u in mine]
                fresh = {u: h for u, h in self._signed_markers(new).items() if units.get(u) != h}
                if not fresh:
                    break
                write_signed_units(self.location, {**units, **fresh})
                added += [u for u in fresh if u not in added]
                mine = set()
        return added

    def _signed_markers(self, units: list[int]) -> dict[int, str]:
        """{unit: sha256} of those markers that carry their own valid signature (a damaged
        or unsigned one is left for readers to report)."""
        out = {}
        for unit, data in self.location.read_markers(units).items():
            payload = _marker_payload(data)
            if payload is not None and not changed_fields(
                body_of(payload), payload.get("signature")
            ):
                out[unit] = sha256_of(body_of(payload))
        return out

    def shard_key(self, name: str, unit: int) -> str:
        """Path of array `name`'s shard file for `unit`, relative to the store root."""
        return shard_key(self.arrays[name], name, unit)

    def manifest(self, unit: int) -> dict[str, list[int]]:
        """{array: [shard bytes, crc32c]} of a written unit ([0, 0]: not stored, all fill)."""
        return {
            name: list(self.location.file_crc32c(self.shard_key(name, unit)))
            for name in self.arrays
        }

    # ---- claims: writers started together share the work ------------------------------------

    def _claim_path(self, unit: int) -> str:
        return os.path.join(self.location.root, COMPLETE_DIR, f".{marker_name(unit)}.claim")

    def _writer_lock(self, pid: int) -> str:
        return os.path.join(self.location.root, COMPLETE_DIR, f".writer.{pid}.lock")

    def _alive(self, pid: int) -> bool:
        """Whether writer `pid` still runs: it holds an flock on its writer file for its whole
        life (the kernel drops it when the process dies, so a reused pid is never mistaken)."""
        if pid == os.getpid():
            return getattr(self, "_lock_fd", None) is not None
        import fcntl

        try:
            fd = os.open(self._writer_lock(pid), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def claim(self, units: list[int]) -> tuple[list[int], list[int]]:
        """Take the units no live process holds; returns (mine, held by others). Local stores
        only (a remote store's writers split the work with `shard=(i, n)`)."""
        if not self.location.is_local:
            return list(units), []

        mine, others = [], []
        os.makedirs(os.path.join(self.location.root, COMPLETE_DIR), exist_ok=True)
        if getattr(self, "_lock_fd", None) is None:
            self._lock_fd = self._open_writer_file()
            self._clear_dead_writers()
        for unit in units:
            (mine if self._take(unit) else others).append(unit)
        # added to, not replaced: a Dask worker claims one unit per task while it writes others
        self._claimed = getattr(self, "_claimed", set()) | set(mine)
        return mine, others

    def _open_writer_file(self) -> int:
        """Create and flock our writer file (holding our pid). Another writer clearing dead
        writers' files may unlink it between creation and flock: then it is created again."""
        import fcntl

        path = self._writer_lock(os.getpid())
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)  # its content: our pid, which every claim links to
                os.write(fd, str(os.getpid()).encode())
                return fd
            os.close(fd)

    def _clear_dead_writers(self) -> None:
        """Remove the writer files and claims killed writers left (a writer is dead when
        nobody holds the flock on its file); taken under that flock, so a live one is never hit."""
        import fcntl

        d = os.path.join(self.location.root, COMPLETE_DIR)
        for path in glob.glob(os.path.join(glob.escape(d), ".writer.*.lock")):
            if path == self._writer_lock(os.getpid()):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # alive
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
        for claim in glob.glob(os.path.join(glob.escape(d), ".u*.json.claim")):
            holder = _claim_holder(claim)
            if holder and not self._alive(holder):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claim)

    def _take(self, unit: int) -> bool:
        path = self._claim_path(unit)
        for _ in range(3):
            try:
                # A claim is a hard link to our writer file, which holds our pid before any claim
                # exists: a claim is never empty, whenever its writer is killed.
                os.link(self._writer_lock(os.getpid()), path)
                return True
            except FileExistsError:
                holder = _claim_holder(path)
                if holder and self._alive(holder):
                    return holder == os.getpid()
                with contextlib.suppress(FileNotFoundError):  # a dead writer's claim
                    os.unlink(path)
        return False

    def claim_holder(self, unit: int) -> int:
        """pid of the live process holding `unit` (0: none)."""
        pid = _claim_holder(self._claim_path(unit))
        return pid if pid and self._alive(pid) else 0

    def release(self, unit: int | None = None) -> None:
        """Drop our claim on `unit` (None: on every unit we still hold)."""
        claimed = getattr(self, "_claimed", set())
        for u in list(claimed) if unit is None else [unit] if unit in claimed else []:
            claimed.discard(u)
            if _claim_holder(self._claim_path(u)) == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._claim_path(u))
        if unit is None and getattr(self, "_lock_fd", None) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._writer_lock(os.getpid()))
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def wait_for(
        self, units: list[int], poll_s: float = 0.2, timeout_s: float | None = None
    ) -> None:
        """Wait until units other live writers claimed are complete; a claimer that died leaves
        its units pending (StoreFormatError: rerunning the dump resumes them), and one alive but
        finishing none of them for `timeout_s` (default `claim_timeout()`) is an error naming
        it: a stuck writer must not hang this one forever."""
        import time

        timeout_s = claim_timeout() if timeout_s is None else timeout_s
        waiting, since = set(units), time.monotonic()
        while waiting:
            dead = [u for u in waiting if not self.claim_holder(u)]
            left = (
                waiting - self.complete_units()
            )  # after the claims: a finisher marks, then releases
            if len(left) < len(waiting):
                since = time.monotonic()  # progress: the other writer is not stuck
            waiting = left
            dead = [u for u in dead if u in waiting]
            if dead:
                raise StoreFormatError(
                    f"{self.path}: the writer that took unit {min(dead)} stopped before "
                    "finishing it; expected it to complete (rerun the same dump to resume)"
                )
            if waiting and time.monotonic() - since > timeout_s:
                unit = min(waiting)
                pid = self.claim_holder(unit)
                raise StoreFormatError(
                    f"{self.path}: waited {timeout_s:g} s for {len(waiting)} unit(s) claimed by "
                    f"other writers (unit {unit}: pid {pid}, alive) with none finished; "
                    f"expected them to finish (is pid {pid} stuck? stop it and rerun the dump "
                    f"to resume; or raise {CLAIM_TIMEOUT_ENV})"
                )
            if waiting:
                time.sleep(poll_s)

    def _encode(self, unit: int, arrays: Mapping[str, object]) -> dict[str, np.ndarray]:
        required = self.required + ((PIXELS,) if PIXELS in self.specs else ())
        if CANVAS in self.specs and self.unit_view(unit) == 0:
            required += (CANVAS,)  # canvases live in view 0's slots only
        missing = [k for k in required if k not in arrays]
        if missing:
            raise StoreFormatError(f"{self.path}: write_unit({unit}) lacks arrays {missing}")
        n = self.layout.unit_valid(unit)
        size = self.layout.unit_samples
        start, _ = self.layout.unit_slots(unit)
        view = self.unit_view(unit)
        instances = self.unit_instances(unit)
        where = f"{self.path}: unit {unit}"

        def rows(name: str) -> np.ndarray:
            value = arrays[name]
            if name == "crop_digest":
                value = digest_rows(value)
            a = _numpy(value)
            want = self.shapes.get(name) or self.specs[name].shape
            if a.ndim != len(want) + 1 or a.shape[1:] != want or a.shape[0] < n:
                raise StoreFormatError(
                    f"{where} '{name}' has shape {list(a.shape)}; expected [{n}, "
                    f"{', '.join(map(str, want))}]".replace(", ]", "]")
                )
            return a[:n]

        got = {name: rows(name) for name in self.required}
        spec = got["spec"].astype(np.float64)
        self._check_order(unit, arrays.get("instance"), spec, n)
        fp16 = self.meta.mode == "fp16"
        outputs = self.meta.teacher_outputs
        for name in ("spec", "keypoints", "weights", *(() if fp16 else outputs)):
            self._check_finite(got[name], name, start, instances, view)

        out: dict[str, np.ndarray] = (
            {} if PIXELS not in self.specs else self._pixels(arrays, n, view, where)
        )
        out |= {
            "spec": spec,
            "instance": instances.astype(np.int64),
            "image_id": got["image_id"].astype(np.int64),
            "ann_id": got["ann_id"].astype(np.int64),
            "keypoints": got["keypoints"].astype(np.float32),
            "weights": got["weights"].astype(np.float32),
            "crop_digest": got["crop_digest"].astype(np.uint8),
        }
        for name in outputs:
            out |= self._encode_output(name, got[name], start, instances, view)
        return self._pad_unit(out, size)

    def _check_order(self, unit: int, given: object, spec: np.ndarray, n: int) -> None:
        """Rows must come in unit_instances(unit) order, each spec naming its instance and the
        unit's view: a row written to another sample's slot would be silently wrong data."""
        start, _ = self.layout.unit_slots(unit)
        view = self.unit_view(unit)
        instances = self.unit_instances(unit)
        where = f"{self.path}: unit {unit}"
        if given is not None:
            given = _numpy(given)[:n].astype(np.int64)
            if not np.array_equal(given, instances):
                bad = int(np.flatnonzero(given != instances)[0])
                raise StoreFormatError(
                    f"{where}: slot {start + bad} holds instance {int(instances[bad])}, "
                    f"got {int(given[bad])}; expected rows in unit_instances({unit}) order"
                )
        bad = np.flatnonzero((spec[:, 0] != instances) | (spec[:, 1] != view))
        if bad.size:
            i = int(bad[0])
            raise StoreFormatError(
                f"{where}: slot {start + i} 'spec' names instance {spec[i, 0]:g} view "
                f"{spec[i, 1]:g}; expected instance {int(instances[i])} view {view}"
            )

    def _encode_output(
        self, name: str, a: np.ndarray, start: int, instances: np.ndarray, view: int
    ) -> dict[str, np.ndarray]:
        """One teacher output in the store's mode: fp16 as half floats (checked finite after
        the cast); lossy as integers plus per-sample scales (`name` and `name_scale`), heatmaps
        at the mode's bits, tokens (keypoint or visual) at 8 bits."""
        if self.meta.mode == "fp16":
            half = _half(a)  # NaN stays NaN, overflow becomes inf: both refused
            self._check_finite(half, name, start, instances, view, original=a)
            return {name: half}
        if self.meta.compact():
            codec = compact.heatmap_codec(self.meta) if name == "heatmaps" else self.bases[name]
            q, scale = codec.encode(a)
            self._check_finite(scale, name + "_scale", start, instances, view, original=a)
            return {name: q, name + "_scale": scale}
        if name == "heatmaps":
            q, scale = quantize_heatmaps(a, heatmap_bits(self.meta.mode))
        else:
            q, scale = quantize_tokens(a)
        return {name: q, name + "_scale": scale}

    def _pad_unit(self, out: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """Pad every array to the whole unit: padding slots hold the fill values (instance -1)."""
        for name, a in out.items():
            if len(a) < size:
                spec_ = self.specs[name]
                pad = np.full((size - len(a), *a.shape[1:]), spec_.fill_value, dtype=a.dtype)
                out[name] = np.concatenate([a, pad])
        return out

    def _pixels(self, arrays: Mapping[str, object], n: int, view: int, where: str) -> dict:
        """ "pixels": n encoded crops (bytes each) as an object array, an empty crop refused; a
        canvas store's view 0 also "canvas" [n, 5] (each canvas's geometry), its other views
        nothing (empty rows: their canvases are view 0's, schema docstring)."""
        out = np.empty(n, dtype=object)
        if self.meta.pixels == "canvas" and view > 0:
            out[:] = [b""] * n
            return {PIXELS: out, CANVAS: np.zeros((n, 5), np.float64)}
        rows = list(arrays[PIXELS])[:n]
        bad = [i for i, b in enumerate(rows) if not isinstance(b, bytes | bytearray) or not b]
        if len(rows) < n or bad:
            raise StoreFormatError(
                f"{where} 'pixels': {len(rows)} rows, row {bad[:1]} empty or not bytes; expected "
                f"{n} non-empty encoded crops ({self.meta.pixels})"
            )
        out[:] = [bytes(b) for b in rows]
        if self.meta.pixels != "canvas":
            return {PIXELS: out}
        geo = _numpy(arrays[CANVAS])[:n].astype(np.float64)
        sane = np.isfinite(geo).all(1) & (geo[:, 2] > 0) & (geo[:, 3:] >= 1).all(1)
        if geo.shape != (n, 5) or not sane.all():
            raise StoreFormatError(
                f"{where} 'canvas' has shape {list(geo.shape)} or a row that is not a canvas; "
                f"expected [{n}, 5] (origin x, y, density > 0, width, height >= 1)"
            )
        return {PIXELS: out, CANVAS: geo}

    def _check_finite(self, a, name, start, instances, view, original=None) -> None:
        if a.dtype.kind != "f":
            return
        finite = np.isfinite(a.reshape(len(a), -1)).all(1)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            overflow = original is not None and np.isfinite(original[i]).all()
            what = "overflows float16 (" if overflow else "holds NaN/Inf ("
            raise StoreFormatError(
                f"{self.path}: slot {start + i} (instance {int(instances[i])}, view {view}) "
                f"'{name}' {what}{int((~finite).sum())} sample(s)); expected finite teacher "
                "outputs, refused at write time"
            )

    def _shard_file(self, name: str, unit: int) -> str:
        return os.path.join(self.location.root, *self.shard_key(name, unit).split("/"))

    def _clear_partials(self, unit: int) -> None:
        """Remove temp files (shards, marker) a killed writer left for this unit. Only while we
        hold the unit's claim (or no other writer is live on it): a live writer's are its own."""
        if not self.location.is_local or self.claim_holder(unit) not in (0, os.getpid()):
            return
        stale = [
            tmp
            for name in self.arrays
            for tmp in glob.glob(glob.escape(self._shard_file(name, unit)) + ".*.partial")
        ]
        marker = os.path.join(self.location.root, COMPLETE_DIR, f".{marker_name(unit)}.")
        stale += glob.glob(glob.escape(marker) + "*.tmp")
        for tmp in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _fsync_unit(self, unit: int) -> None:
        if syncfs(self.location.root):
            return
        dirs = set()
        for name in self.arrays:
            f = self._shard_file(name, unit)
            if os.path.exists(f):  # an all-fill-value shard is not stored at all
                fsync_path(f)
                d = os.path.dirname(f)
                while len(d) > len(self.location.root) and d not in dirs:
                    dirs.add(d)  # new shard directories must reach the disk too
                    d = os.path.dirname(d)
        for d in sorted(dirs, key=len, reverse=True):
            fsync_dir(d)


# ---- helpers -------------------------------------------------------------------------------


def _claim_holder(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def _half(a: np.ndarray) -> np.ndarray:
    """float -> float16. Through torch when it is loaded: numpy's cast is about 5x slower and
    was the writer's bottleneck (pass float16, e.g. `.half()` on the GPU, to skip it)."""
    if a.dtype == np.float16:
        return a
    torch = sys.modules.get("torch")
    if torch is not None and a.dtype in (np.float32, np.float64):
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float16).numpy()
    with np.errstate(over="ignore"):
        return a.astype(np.float16)


def _numpy(x: object) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _where(e: OSError, loc: StoreLocation) -> str:
    return str(e.filename) if getattr(e, "filename", None) else str(loc)


@contextlib.contextmanager
def _locked(
    loc: StoreLocation, timeout_s: float | None = None, poll_s: float = 0.1
) -> Iterator[None]:
    """Exclusive lock for metadata changes, so writers started together agree on the store;
    held for a moment by each, so `timeout_s` (default `claim_timeout()`) of waiting is an
    error naming the lock file, not a hang behind a stuck process."""
    if not loc.is_local:
        yield
        return
    import fcntl
    import time

    os.makedirs(loc.root, exist_ok=True)
    path = os.path.join(loc.root, ".lock")
    timeout_s = claim_timeout() if timeout_s is None else timeout_s
    with open(path, "a+") as f:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout_s:
                    raise StoreFormatError(
                        f"{path}: waited {timeout_s:g} s for the store's metadata lock, held by "
                        "another process; expected it released within moments (a stuck dump "
                        f"of this store? stop it and rerun; or raise {CLAIM_TIMEOUT_ENV})"
                    ) from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def claim_timeout() -> float:
    """Seconds a writer waits for another live writer's units (or the metadata lock) with no
    progress before it stops with an error: DISTILPOSE_CLAIM_TIMEOUT, default 30 minutes
    (a unit of 512 crops takes the paper's teacher seconds on a GPU, minutes on a CPU)."""
    return env_seconds(CLAIM_TIMEOUT_ENV, CLAIM_TIMEOUT_S)


def _location(path: object, storage_options: dict) -> StoreLocation:
    """Where a writer opens a store; on S3 its bucket checked first (a PUT into a missing
    bucket reads "no such file")."""
    loc = StoreLocation(path, storage_options)
    if not loc.is_local and loc.text.startswith(("s3://", "s3a://")):
        check_bucket(loc.fs, loc.text)
    return loc


def existing_meta(path: object, **storage_options) -> StoreMeta | None:
    """The metadata of the store at `path`; None when there is none yet (or only a
    half-created one, which the next writer starts again)."""
    loc = _location(path, storage_options)
    if loc.is_local and not os.path.isdir(loc.root):
        return None
    try:
        return _open_existing(loc)[1]
    except OSError as e:
        raise StoreFormatError(f"{_where(e, loc)}: cannot open the store ({_why(e)})") from e


def _open_existing(loc: StoreLocation) -> tuple[zarr.Group | None, StoreMeta | None]:
    """The store at `loc` and its meta; (None, None) if there is none or only a half-created one."""
    if not loc.exists("zarr.json"):
        if loc.is_local:
            junk = [n for n in os.listdir(loc.root) if n != ".lock"]
            if junk:
                raise StoreFormatError(
                    f"{loc}: directory exists and is not a store (holds {sorted(junk)[:3]}); "
                    "expected an empty or missing directory"
                )
        return None, None
    group = zarr.open_group(store=loc.zarr_store(read_only=False), mode="r+")
    attrs = group.attrs.asdict()
    if META_KEY not in attrs:
        if loc.list_markers():
            raise StoreFormatError(f"{loc}: store metadata '{META_KEY}' is missing")
        return None, None  # creation was interrupted before the metadata: start again
    check_meta_signature(loc, attrs)  # never re-sign an edit by adding views to it
    return group, StoreMeta.from_dict(attrs[META_KEY], source=str(loc))


@quiet_vlen_bytes()  # pixel stores: the one array of variable-length bytes
def _create(loc: StoreLocation, meta: StoreMeta, fit: FitTokens | None = None) -> StoreMeta:
    meta = StoreMeta.from_dict(meta.to_dict())
    # a small dataset gets smaller units rather than mostly padding
    meta.shard_chunks = max(
        1, min(meta.shard_chunks, math.ceil(meta.num_instances / meta.chunk_samples))
    )
    layout = StoreLayout(meta)
    # mode "a", never "w": "w" deletes the whole directory, lock file included, and a second
    # writer waiting on that lock would then start creating the store beside us
    group = zarr.open_group(store=loc.zarr_store(read_only=False), mode="a")
    slots = layout.num_slots(meta.views)
    for spec in array_specs(meta).values():
        group.create_array(
            spec.name,
            shape=(slots, *spec.shape),
            chunks=(meta.chunk_samples, *spec.shape),
            shards=(meta.unit_samples, *spec.shape),
            dtype=spec.dtype,
            fill_value=spec.fill_value,
            compressors=array_compressors(spec),
            overwrite=True,  # only an interrupted creation left anything here
        )
    bases = _fit_bases(loc, meta, layout, fit)
    if bases:
        meta.basis_sha256 = compact.write_bases(group, bases)
    names = [*array_specs(meta), *(o + compact.BASIS_SUFFIX for o in bases)]
    if loc.is_local:  # the bases' data must reach the disk before the metadata names them
        for o in bases:
            for d, _, files in os.walk(os.path.join(loc.root, o + compact.BASIS_SUFFIX)):
                for f in files:
                    fsync_path(os.path.join(d, f))
    group.attrs.update(_meta_attrs(meta))  # last: a store is valid once this exists
    _sync_metadata(loc, ["zarr.json", *(f"{n}/zarr.json" for n in names)])
    return meta


def _fit_bases(
    loc: StoreLocation, meta: StoreMeta, layout: StoreLayout, fit: FitTokens | None
) -> dict:
    """A new compact store's token bases, fitted on `fit`'s tokens ({} for other stores)."""
    if not meta.compact() or not compact.token_outputs(meta):
        return {}
    if fit is None:
        raise StoreFormatError(
            f"{loc}: a {meta.mode} store's token bases are fitted on the teacher's first outputs "
            "when it is created; expected it created by dump-teacher (StoreWriter fit=...)"
        )
    return compact.fit_bases(meta, fit(compact.fit_samples(layout)))


@quiet_vlen_bytes()
def _add_views(loc: StoreLocation, group: zarr.Group, meta: StoreMeta, views: int) -> StoreMeta:
    """Grow every array to `views` blocks (metadata only), then record the new view count."""
    slots = StoreLayout(meta).num_slots(views)
    for spec in array_specs(meta).values():
        group[spec.name].resize((slots, *spec.shape))
    _sync_metadata(loc, [f"{n}/zarr.json" for n in array_specs(meta)])
    new = StoreMeta.from_dict({**meta.to_dict(), "views": views})
    group.attrs.update(_meta_attrs(new))
    _sync_metadata(loc, ["zarr.json"])
    return new


def _sync_metadata(loc: StoreLocation, keys: list[str]) -> None:
    if not loc.is_local:
        return
    for key in keys:
        fsync_path(os.path.join(loc.root, key))
    for d in {os.path.dirname(os.path.join(loc.root, k)) for k in keys}:
        fsync_dir(d)
    os.makedirs(os.path.join(loc.root, COMPLETE_DIR), exist_ok=True)


def _meta_attrs(meta: StoreMeta) -> dict:
    """The group attributes of `meta`: the metadata, and from schema 3 on its signature beside
    it (one update of zarr.json: never one without the other)."""
    body = meta.to_dict()
    signed = int(meta.schema_version) >= SIGNED_SINCE
    return {META_KEY: body, **({SIGNATURE_KEY: sign(body)} if signed else {})}


def _clear_signed_temps(loc: StoreLocation) -> None:
    """Remove temp files of `complete/signed.json` a killed writer left: only the holder of the
    store's lock writes that file, so under the lock every one of them is stale."""
    if not loc.is_local:
        return
    pattern = os.path.join(glob.escape(loc.join(COMPLETE_DIR)), f".{SIGNED_FILE}.*.tmp")
    for tmp in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _check_fewer_views(loc: StoreLocation, stored: StoreMeta, views: int) -> None:
    """A dump asking for fewer views than the store has room for would finish without the
    rest: refused while any of those views is unfinished (nothing to do once they are)."""
    layout = StoreLayout(stored)
    done = set(loc.list_markers())
    pending = [
        v
        for v in range(views, int(stored.views))
        if any(
            u not in done for u in range(v * layout.units_per_view, (v + 1) * layout.units_per_view)
        )
    ]
    if pending:
        raise StoreMismatchError(
            f"{loc}: the store has room for {stored.views} views and views {pending} are "
            f"unfinished; --views {views} would leave them so; expected --views "
            f"{stored.views} (or more) to finish the store"
        )


def _marker_payload(data: bytes) -> dict | None:
    """A marker's JSON object (None if it is not one)."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def accept_metadata(path: object, storage_options: dict | None = None) -> list[str]:
    """Sign a schema-3 store's metadata and markers as they are now (`store-verify
    --accept-metadata`): the user's explicit word that an edit is meant. Returns one line per
    change signed: metadata fields, marker fields, units signed anew, markers that vanished
    (their units are dropped from the signed list: pending, a rerun of the dump writes them).
    The edited metadata must still be valid metadata (StoreFormatError otherwise)."""
    loc = StoreLocation(path, storage_options)
    if not loc.exists("zarr.json"):
        raise StoreFormatError(f"{loc}: no store here (zarr.json missing)")
    group = zarr.open_group(store=loc.zarr_store(read_only=False), mode="r+")
    attrs = group.attrs.asdict()
    body = attrs.get(META_KEY)
    if not isinstance(body, dict):
        raise StoreFormatError(f"{loc}: not a distilpose store (no '{META_KEY}' attribute)")
    meta = StoreMeta.from_dict(body, source=str(loc))  # an edit must still be valid metadata
    if int(meta.schema_version) < SIGNED_SINCE:
        raise StoreFormatError(
            f"{loc}: a schema {meta.schema_version} store has no signatures to accept; expected "
            f"a store of schema {SIGNED_SINCE} or later (its metadata is read as it is)"
        )
    changes = []
    with _locked(loc):
        _clear_signed_temps(loc)
        fields = changed_fields(body, attrs.get(SIGNATURE_KEY))
        if fields:
            group.attrs.update({SIGNATURE_KEY: sign(body)})
            _sync_metadata(loc, ["zarr.json"])
            changes.append(f"store metadata: {', '.join(fields)}")
        changes += _accept_markers(loc)
    return changes


def _accept_markers(loc: StoreLocation) -> list[str]:
    """Re-sign edited markers and rewrite `complete/signed.json` for the markers there are."""
    from distilpose.errors import StoreCorruptError

    try:
        before = read_signed_units(loc)
    except StoreCorruptError:
        before = None  # damaged: rebuilt from the markers
    changes = [] if before is not None else ["complete/signed.json: damaged, rebuilt"]
    before = before or {}
    units: dict[int, str] = {}
    listed = loc.list_markers()
    for unit, data in loc.read_markers(listed).items():
        payload = _marker_payload(data)
        if payload is None:
            raise StoreFormatError(
                f"{loc}: marker {COMPLETE_DIR}/{marker_name(unit)} is not a JSON object; "
                "expected one to sign (restore it from a copy, or delete it: its unit is then "
                "pending)"
            )
        body = body_of(payload)
        fields = changed_fields(body, payload.get("signature"))
        if fields:
            loc.write_marker(unit, signed_payload(body))
            changes.append(f"marker of unit {unit}: {', '.join(fields)}")
        units[unit] = sha256_of(body)
        if unit in before and before[unit] != units[unit] and not fields:
            changes.append(f"marker of unit {unit}: another signed marker than before")
        elif unit not in before:
            changes.append(f"unit {unit}: marked and now signed")
    gone = sorted(set(before) - set(units))
    if gone:
        changes.append(
            f"units {gone}: marker deleted, dropped from the signed units (pending: rerunning "
            "the dump writes them again)"
        )
    if changes:
        write_signed_units(loc, units)
    return changes
