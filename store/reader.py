"""Read a teacher store: exact slot ranges and shuffled training batches.

Why chunks, not samples. A zarr read costs about 1 ms per chunk whatever its size, while
decompressing one sample costs 0.1-0.2 ms; reading one sample at a time at random would give a
few hundred samples/s. So the training path only ever reads whole chunks (64 slots by default),
several at once from a thread pool, and gets its randomness from three sources instead:

1. Dump time: within each view block the slots hold the instances in a random permutation,
   seeded by (store seed, view). Every chunk is therefore a uniformly random subset of the
   dataset, and different views partition the dataset into different chunks.
2. Every epoch: the list of (complete) chunks is permuted with `default_rng([seed, epoch])`.
3. Shuffle groups: consecutive groups of `shuffle_buffer_chunks` chunks (4 by default) are
   loaded together, their rows are permuted as one pool (rows left over after the last whole
   batch join the next group's pool) and cut into batches.

What this gives: every sample appears exactly once per epoch and view; every instance is
equally likely at every position of the epoch; batches are random subsets of the dataset. The
one departure from a full shuffle is that two samples sharing a chunk share a batch with
probability about B / (k * C) (B batch, k group chunks, C chunk slots: 1/4 by default) instead
of about B / N. That correlation is fixed per view, symmetric and independent of the labels, so
the minibatch gradient stays an unbiased estimate of the epoch gradient and only its noise
structure changes slightly; with several views each view re-partitions the dataset. For
training a pose regressor (per-sample losses, BatchNorm statistics over random subsets) this
is indistinguishable from a full shuffle; ImageNet-scale loaders (WebDataset shard shuffling,
tf.data shuffle buffers) rely on the same argument with far weaker mixing.

Several data-parallel ranks (`iter_batches(rank=(r, R))`, the training path): the plan is made
for the global batch R x B, exactly as one process with batch R x B would make it, and each
global batch is cut into R contiguous slices, rank r reading only the chunks its slice needs.
So every sample is trained exactly once per epoch across ranks, for any R, and the global
batches do not depend on R (see `distilpose.training.distributed` for the short last batch).

Determinism: the order depends only on (seed, epoch). `iter_batches(part=(i, n))` yields every
n-th batch of the single-process order (reading only the chunks those batches need): the same
global order for any number of workers, at the cost of reading a chunk in up to n workers. This
is the one read path: training (`student_train.data`) and the store benchmark use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from distilpose.errors import (
    StoreConnectionError,
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from distilpose.limits import loads_json, max_json_bytes
from distilpose.models.layers import ModelConfig
from distilpose.training.distributed import rank_rows
from store import compact
from store.location import (
    StoreLocation,
    first_line,
    is_connection_error,
    marker_name,
    run_settled,
)
from store.quantize import dequantize_heatmaps, dequantize_tokens
from store.schema import (
    CANVAS,
    CHECKSUMS_SINCE,
    COMPLETE_DIR,
    META_KEY,
    OUTPUT_WORDS,
    PIXELS,
    READ_FIELDS,
    SIGNED_SINCE,
    TEACHER_OUTPUTS,
    StoreLayout,
    StoreMeta,
    array_specs,
    check_chunk_layout,
    has_checksums,
    read_fields,
    rows_crc32c,
    shard_key,
    stored_dtype,
)
from store.signature import (
    body_of,
    changed_fields,
    check_meta_signature,
    read_signed_units,
    sha256_of,
)

DEFAULT_FIELDS = READ_FIELDS
# the ModelConfig fields check_student compares (dim and teacher_dim: the token width)
STUDENT_SIZES = ("input_size", "heatmap_size", "patch_size", "num_keypoints", "dim", "teacher_dim")
Views = int | Sequence[int] | None


class StoreReader:
    """A read-only view of a store (local path or any fsspec URL zarr accepts)."""

    def __init__(self, location: StoreLocation, group: zarr.Group, meta: StoreMeta) -> None:
        self.location = location
        self.path = str(location)
        self.meta = meta
        self.layout = StoreLayout(meta)
        self.specs = array_specs(meta)
        self.fields = read_fields(meta)  # what DEFAULT_FIELDS means for this store
        slots = self.layout.num_slots(meta.views)
        self.arrays = {}
        for name, spec in self.specs.items():
            try:
                arr = group[name]
            except KeyError:
                raise StoreFormatError(f"{self.path}: array '{name}' is missing") from None
            dtype = stored_dtype(spec)
            if (
                arr.shape[1:] != spec.shape
                or arr.shape[0] < slots
                or arr.shape[0] % self.layout.block_samples
                or str(arr.dtype) != dtype
            ):
                raise StoreFormatError(
                    f"{self.path}: array '{name}' is {arr.dtype} {list(arr.shape)}; expected "
                    f"{dtype} [{slots}, {', '.join(map(str, spec.shape))}]"
                )
            check_chunk_layout(self.path, name, arr, spec, meta)
            self.arrays[name] = arr
        self._complete: np.ndarray | None = None
        self._units_checked: set[int] = set()
        # compact modes: the token bases, checked against the metadata's digest
        self.bases = compact.read_bases(group, meta, self.path) if meta.compact() else {}
        self._markers: dict[int, dict] = {}  # checked marker payloads, read once per reader
        self.signed = int(meta.schema_version) >= SIGNED_SINCE  # signatures (schema 3)
        self._signed_units: dict[int, str] = {}  # unit -> its marker's signed sha256
        self.unsigned: list[int] = []  # marked units not signed yet (a writer between the two)
        # version-1 stores have neither: they read, and store-verify says so
        self.checksums = all(has_checksums(a) for a in self.arrays.values())
        if meta.schema_version >= CHECKSUMS_SINCE and not self.checksums:
            bare = [n for n, a in self.arrays.items() if not has_checksums(a)]
            raise StoreCorruptError(
                f"{self.path}: schema {meta.schema_version} store whose array(s) {bare} lack the "
                "crc32c codec; expected every array checksummed (its zarr.json was edited?)"
            )
        # NaN/Inf were refused at write time, so with checksums intact bytes are finite values:
        # reads check finiteness only without checksums; store-verify always does
        self.check_finite = not self.checksums

    @classmethod
    def open(cls, path_or_url: object, storage_options: dict | None = None) -> StoreReader:
        loc = StoreLocation(path_or_url, storage_options)
        if not loc.exists("zarr.json"):
            raise StoreFormatError(f"{loc}: no store here (zarr.json missing)")
        if loc.is_local and loc.file_size("zarr.json") > max_json_bytes():
            raise StoreFormatError(
                f"{loc}: zarr.json of {loc.file_size('zarr.json'):,} bytes exceeds the JSON limit "
                f"of {max_json_bytes():,}; expected a store written by distilpose"
            )
        try:
            if loc.is_local:
                group = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r")
            else:
                group = loc.remote(
                    lambda: zarr.open_group(store=loc.zarr_store(read_only=True), mode="r"),
                    what="opening the store",
                )
        except StoreFormatError:
            raise
        except RecursionError:
            raise StoreFormatError(f"{loc}: zarr.json nested too deeply to read") from None
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreFormatError(
                f"{loc}: not a readable zarr v3 group ({first_line(e)})"
            ) from None
        attrs = group.attrs.asdict()
        if META_KEY not in attrs:
            raise StoreFormatError(f"{loc}: not a distilpose store (no '{META_KEY}' attribute)")
        check_meta_signature(loc, attrs)
        loc.check_ranges()
        return cls(loc, group, StoreMeta.from_dict(attrs[META_KEY], source=str(loc)))

    # ---- completeness ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the cached completion state (another process may have written units)."""
        self._complete = None

    def complete_units(self) -> np.ndarray:
        """Sorted unit ids marked complete (within this reader's views); in a signed store
        (schema 3) marked *and* signed, and a signed unit whose marker is gone is an error."""
        if self._complete is None:
            limit = self.layout.num_units(self.meta.views)
            # signed units first, markers after: a writer marks, then signs, so every unit
            # signed before the listing has its marker in it
            signed = read_signed_units(self.location) if self.signed else {}
            listed = [u for u in self.location.list_markers() if u < limit]
            if self.signed:
                marked = set(listed)
                gone = sorted(u for u in signed if u < limit and u not in marked)
                if gone:
                    more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
                    raise StoreCorruptError(
                        f"{self.path}: unit {gone[0]}{more} is signed complete but its marker "
                        f"{COMPLETE_DIR}/{marker_name(gone[0])} is missing; expected every "
                        "signed unit's marker (restore it from a copy, rerun the dump to write "
                        "the unit again, or accept the smaller store with `distilpose "
                        "store-verify STORE --accept-metadata`)"
                    )
                self._signed_units = signed
                self.unsigned = [u for u in listed if u not in signed]
                listed = [u for u in listed if u in signed]
            self._complete = np.array(listed, dtype=np.int64)
        return self._complete

    def complete_views(self) -> list[int]:
        """The views all of whose units are complete."""
        done = set(self.complete_units().tolist())
        return [v for v in range(self.meta.views) if all(u in done for u in self._units(v))]

    def complete_mask(self) -> np.ndarray:
        """bool [views, num_instances]: sample (view v, instance i) is written and complete."""
        mask = np.zeros((self.meta.views, self.meta.num_instances), dtype=bool)
        for u in self.complete_units():
            mask[self.layout.unit_view(int(u)), self.layout.unit_instances(int(u))] = True
        return mask

    def is_complete(self, view: Views = None) -> bool:
        done = set(self.complete_units().tolist())
        return all(u in done for u in self._units(view))

    def _views(self, view: Views) -> list[int]:
        if view is None:
            return list(range(self.meta.views))
        views = [int(view)] if np.ndim(view) == 0 else [int(v) for v in view]
        for v in views:
            if not 0 <= v < self.meta.views:
                raise StoreMismatchError(
                    f"{self.path}: view {v} asked for; the store has views 0..{self.meta.views - 1}"
                )
        return views

    def _units(self, view: Views) -> list[int]:
        per = self.layout.units_per_view
        return [u for v in self._views(view) for u in range(v * per, (v + 1) * per)]

    def chunks(self, view: Views = None, allow_incomplete: bool = False) -> list[tuple[int, int]]:
        """(start, stop) slot ranges of the complete chunks of `view` (None: all views)."""
        units = self._units(view)
        done = set(self.complete_units().tolist())
        missing = [u for u in units if u not in done]
        if missing and not allow_incomplete:
            raise StoreFormatError(
                f"{self.path}: {len(units) - len(missing)} of {len(units)} write units complete "
                f"(views {self._views(view)}){self.unsigned_note()}; expected a finished dump: "
                "resume it, or use the complete part (allow_incomplete=True, train-student "
                "--allow-incomplete)"
            )
        if self.meta.pixels == "canvas":  # a unit's canvases are in view 0's unit there
            done = {u for u in done if self.layout.canvas_unit(u) in done}
        return [c for u in units if u in done for c in self.layout.unit_chunks(u)]

    def unsigned_note(self) -> str:
        """', N unit(s) marked but not signed yet (...)' where there are any, else ''."""
        if not self.unsigned:
            return ""
        return (
            f", {len(self.unsigned)} unit(s) marked but not signed yet (a writer between the "
            "two, or stopped there: rerunning the dump signs them)"
        )

    def num_samples(self, view: Views = None, allow_incomplete: bool = False) -> int:
        return sum(b - a for a, b in self.chunks(view, allow_incomplete))

    # ---- fit to a student -----------------------------------------------------------------

    def check_student(self, config: ModelConfig | dict) -> None:
        """Refuse (StoreMismatchError) a store whose sizes do not fit a student's ModelConfig
        (or its `to_dict()`).

        Checks input_size, heatmap_size, num_keypoints, and where both store and student have
        tokens (`ModelConfig.has_tokens`), the token dim (`ModelConfig.token_dim`: teacher_dim if
        the student projects its tokens, else dim) and the patch grid and count. A dict must
        give every size (a missing one is refused, never taken from a default or the store).
        """
        if not isinstance(config, ModelConfig):
            missing = [k for k in STUDENT_SIZES if k not in config]
            if missing:
                raise StoreMismatchError(
                    f"{self.path}: student config lacks {', '.join(missing)}; expected every "
                    f"size ({', '.join(STUDENT_SIZES)}) given, as ModelConfig.to_dict() has them"
                )
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        m, mine, theirs = self.meta, self.meta.geometry, cfg.geometry
        problems = []

        def check(name: str, store_value: object, student_value: object) -> None:
            if list(np.atleast_1d(store_value)) != list(np.atleast_1d(student_value)):
                problems.append(f"{name} store={store_value} student={student_value}")

        check("input_size", list(mine.input_size), list(theirs.input_size))
        check("heatmap_size", list(mine.heatmap_size), list(theirs.heatmap_size))
        check("num_keypoints", m.num_keypoints, cfg.num_keypoints)
        # no tokens on one side (SimpleBaseline store, DeepPose student): no token sizes to compare
        if m.has("keypoint_tokens") and cfg.has_tokens:
            check("token dim (teacher_dim or dim)", m.token_dim, cfg.token_dim)
            if m.has("visual_tokens"):
                check("patch grid", list(m.patch_grid), list(theirs.patch_grid))
                check("num_patches", m.num_patches, theirs.num_patches)
        if problems:
            raise StoreMismatchError(
                f"{self.path}: teacher store does not fit student '{cfg.name}': "
                f"{'; '.join(problems)}; expected equal sizes (set teacher_dim to project tokens)"
            )

    # ---- reading --------------------------------------------------------------------------

    def _fields(self, fields: Sequence[str]) -> tuple[str, ...]:
        """DEFAULT_FIELDS -> the fields this store has; a teacher output it lacks is refused; a
        canvas store's pixels come with their geometry (CANVAS)."""
        if fields is DEFAULT_FIELDS:
            return self.fields
        for f in fields:
            if f in TEACHER_OUTPUTS and not self.meta.has(f):
                raise StoreFormatError(
                    f"{self.path}: no field '{f}': this store's teacher ({self.meta.teacher_name}) "
                    f"has no {OUTPUT_WORDS[f]}; it holds {list(self.meta.teacher_outputs)}"
                )
        fields = tuple(fields)
        if PIXELS in fields and CANVAS in self.specs and CANVAS not in fields:
            fields += (CANVAS,)
        return fields

    def _stored_names(self, fields: Sequence[str]) -> list[str]:
        names = []
        for f in fields:
            if f in ("slot", "view"):
                continue
            if f not in self.specs:
                raise StoreFormatError(
                    f"{self.path}: no field '{f}'; expected one of {READ_FIELDS}"
                )
            names.append(f)
            if self.meta.mode != "fp16" and f in TEACHER_OUTPUTS:
                names.append(f + "_scale")
        return names

    def read_chunk(
        self,
        start: int,
        stop: int,
        fields: Sequence[str] = DEFAULT_FIELDS,
        dtype=None,
        check: bool = True,
        decode: bool = True,
    ) -> dict[str, np.ndarray]:
        """Slots [start, stop) of the given fields, teacher outputs decoded (decode=False: as
        stored, codes under the output's name and their `<output>_scale` beside them, for
        `decode_targets` to decode later).

        Teacher outputs come back as float16 in fp16 mode (bit-exact) and as float32 in lossy
        modes, unless `dtype` says otherwise. All arrays of the range are read concurrently.
        Every chunk is checked (StoreCorruptError naming store, array and chunk): its crc32c
        (zarr), its unit's shard files against the unit's manifest, and, within complete units,
        cheap consistency of what was read (instances and specs against the slot layout,
        finite values) and, in schema 3, each whole chunk's rows against the fingerprints in
        its unit's marker. check=False skips the last three (readers racing a writer).
        """
        fields = self._fields(fields)
        names = self._stored_names(fields)
        # a canvas store's pixels are view 0's: slots [c0, c1) (schema docstring)
        canvas = {PIXELS, CANVAS} & set(names) if self.meta.pixels == "canvas" else set()
        c0, c1 = self.layout.canvas_slots(start, stop) if canvas else (start, stop)
        units = self._unit_range(start, stop)
        done = set(self.complete_units().tolist())
        if canvas and c0 != start and stop > start:
            self._need_canvases(done, c0, c1, start, stop)
        complete = check and stop > start and all(u in done for u in units)
        if complete:
            for unit in sorted({*units, *(self._unit_range(c0, c1) if canvas else ())}):
                self.check_unit_files(unit)

        async def read_one(name: str):
            a, b = (c0, c1) if name in canvas else (start, stop)
            try:
                getter = self.arrays[name]._async_array.getitem(slice(a, b))
                if self.location.is_local:
                    return await getter
                return await asyncio.wait_for(getter, self.location.timeout)
            except Exception as e:  # noqa: BLE001 - named and classified in read_error
                raise self.read_error(name, start, stop, e) from e

        async def read_all():
            return await asyncio.gather(*(read_one(n) for n in names))

        raw = dict(zip(names, run_settled(read_all()), strict=True))
        if complete:
            own = {n: a for n, a in raw.items() if n not in canvas}
            self.check_rows(own, start, stop)
            self.check_fingerprints(own, start, stop)
            if canvas:
                self.check_fingerprints({n: raw[n] for n in canvas}, c0, c1)
        out: dict[str, np.ndarray] = {}
        for f in fields:
            if f == "slot":
                out[f] = np.arange(start, stop, dtype=np.int64)
            elif f == "view":
                out[f] = self.layout.slot_views(np.arange(start, stop))
            else:
                out[f] = np.asarray(raw[f])
        out |= {n: a for n, a in raw.items() if n not in out}  # the codes' scale arrays
        return self.decode_targets(out, fields, dtype) if decode else out

    def decode_targets(
        self, raw: dict[str, np.ndarray], fields: Sequence[str], dtype=None
    ) -> dict[str, np.ndarray]:
        """Rows as `read_chunk(decode=False)` returns them -> the same rows with the teacher
        outputs among `fields` decoded and their scale arrays dropped."""
        out = dict(raw)
        for f in fields:
            if f in TEACHER_OUTPUTS:
                out[f] = self._decode(f, raw, dtype)
                out.pop(f + "_scale", None)
        return out

    def _unit_range(self, start: int, stop: int) -> range:
        return range(start // self.layout.unit_samples, (stop - 1) // self.layout.unit_samples + 1)

    def _need_canvases(self, done: set[int], c0: int, c1: int, start: int, stop: int) -> None:
        """Refuse to read a view's pixels before view 0's units holding its canvases are done."""
        missing = [u for u in self._unit_range(c0, c1) if u not in done]
        if missing:
            raise StoreFormatError(
                f"{self.path}: slots [{start}, {stop}) take their canvases from view 0's unit "
                f"{missing[0]}, which is not complete; expected view 0 dumped first (resume "
                "the dump)"
            )

    # ---- integrity --------------------------------------------------------------------------

    def where(self, name: str, start: int, stop: int) -> str:
        """'array X chunk c (slots a..b-1, shard file K)': the unit of blame in messages."""
        c0, c1 = start // self.layout.chunk_samples, (stop - 1) // self.layout.chunk_samples
        u0, u1 = start // self.layout.unit_samples, (stop - 1) // self.layout.unit_samples
        chunk = f"chunk {c0}" if c0 == c1 else f"chunks {c0}..{c1}"
        key = shard_key(self.arrays[name], name, u0)
        shard = f"shard file {key}" if u0 == u1 else f"shard files of units {u0}..{u1}"
        return f"array '{name}' {chunk} (slots {start}..{stop - 1}, {shard})"

    def read_error(self, name: str, start: int, stop: int, e: BaseException) -> Exception:
        """A failed chunk read as one of our errors: connection, unreadable file, or corrupt."""
        where = f"{self.path}: {self.where(name, start, stop)}"
        if isinstance(e, StoreFormatError):
            return e
        if isinstance(e, asyncio.TimeoutError | TimeoutError) and not self.location.is_local:
            return StoreConnectionError(
                f"{where}: no answer within {self.location.timeout:g} s; expected a reachable "
                "store (check the network, or raise DISTILPOSE_REMOTE_TIMEOUT)"
            )
        if not self.location.is_local and is_connection_error(e):
            return StoreConnectionError(
                f"{where}: cannot reach the store ({type(e).__name__}: {first_line(e)}); "
                "expected a reachable store (check the URL and the network)"
            )
        if isinstance(e, OSError):
            return StoreFormatError(
                f"{where}: cannot read ({e.strerror or first_line(e)}); expected a readable disk"
            )
        if isinstance(e, MemoryError):
            return StoreCorruptError(f"{where}: decoding needs more memory than there is")
        why = (
            "crc32c checksum mismatch"
            if "checksum" in str(e)
            else f"{type(e).__name__}: {first_line(e)[:120]}"
        )
        return StoreCorruptError(
            f"{where}: stored bytes are damaged ({why}); "
            "expected intact data: restore the store from a copy or rerun the dump into a new one"
        )

    def marker(self, unit: int) -> dict:
        """`unit`'s marker payload, checked (read once per reader; see `check_marker`)."""
        if unit not in self._markers:
            self._markers[unit] = self.check_marker(unit, self.location.read_marker(unit))
        return self._markers[unit]

    def check_markers(self) -> int:
        """Read and check the marker of every complete unit (remote: concurrently); returns
        how many. store-info, store-verify and train-student call it before anything else."""
        units = [int(u) for u in self.complete_units() if int(u) not in self._markers]
        for unit, data in self.location.read_markers(units).items():
            where = f"{self.path}: {COMPLETE_DIR}/{marker_name(unit)}"
            payload = loads_json(data, where, StoreCorruptError) if data.strip() else {}
            self._markers[unit] = self.check_marker(unit, payload)
        for unit in units:
            self.marker(unit)  # one that vanished since the listing: named there
        return len(self.complete_units())

    def check_marker(self, unit: int, payload: object) -> dict:
        """A marker as it must be: a JSON object agreeing with the slot layout; from schema 2
        on with a manifest; from schema 3 on with chunk fingerprints and skip records, intact
        against its own signature and the one `complete/signed.json` holds for the unit."""
        where = f"{self.path}: marker {COMPLETE_DIR}/{marker_name(unit)} of unit {unit}"
        if not isinstance(payload, dict):
            raise StoreCorruptError(f"{where} is not a JSON object")
        if self.signed:
            changed = changed_fields(body_of(payload), payload.get("signature"))
            if changed:
                raise StoreCorruptError(
                    f"{where} differs from what was signed: {', '.join(changed)}; expected the "
                    "marker the dump wrote (restore it from a copy, or sign the edit with "
                    "`distilpose store-verify STORE --accept-metadata`)"
                )
            if (
                unit in self._signed_units
                and sha256_of(body_of(payload)) != (self._signed_units[unit])
            ):
                raise StoreCorruptError(
                    f"{where} is not the marker {COMPLETE_DIR}/signed.json signed for the unit "
                    "(another unit's or store's marker copied over it?); expected the marker "
                    "the dump wrote (restore it, or `distilpose store-verify STORE "
                    "--accept-metadata` to sign it)"
                )
        start, stop = self.layout.unit_slots(unit)
        if "slots" in payload and (
            payload.get("slots") != [start, stop]
            or payload.get("valid") != self.layout.unit_valid(unit)
        ):
            raise StoreCorruptError(
                f"{self.path}: marker of unit {unit} says slots {payload.get('slots')} "
                f"(valid {payload.get('valid')}); expected [{start}, {stop}] (valid "
                f"{self.layout.unit_valid(unit)}) from the store's layout"
            )
        want = {"manifest": CHECKSUMS_SINCE, "chunk_crc32c": SIGNED_SINCE}
        for key, since in want.items():
            if self.meta.schema_version >= since and not isinstance(payload.get(key), dict):
                raise StoreCorruptError(
                    f"{where} has no '{key}' (schema {self.meta.schema_version} markers hold "
                    "one); expected the marker the dump wrote: without it the unit's data "
                    "cannot be checked (restore the marker from a copy, or rerun the dump into "
                    "a new store)"
                )
        if self.signed and not isinstance(payload.get("skipped"), list):
            raise StoreCorruptError(f"{where} has no 'skipped' list; expected one (schema 3)")
        return payload

    def skipped_slots(self, units: Sequence[int] | None = None) -> dict[int, str]:
        """{slot: why} of the complete units' (or `units`') samples the dump could not read
        (schema 3 records them; older stores record none). In a canvas store a sample whose
        person's canvas could not be read (view 0's slot skipped) is skipped in every view,
        even where a later view's dump could read the image: its stored canvas is black."""
        if not self.signed:
            return {}
        done = set(self.complete_units().tolist())
        units = sorted(done) if units is None else units
        out: dict[int, str] = {}
        for unit in units:
            out.update(self._unit_skips(int(unit)))
            view = self.layout.unit_view(int(unit))
            first = self.layout.canvas_unit(unit)
            if self.meta.pixels == "canvas" and view > 0 and first in done:
                shift = view * self.layout.block_samples  # view-0 slot j is slot shift + j here
                out.update({slot + shift: f"view 0's canvas: {why}"
                            for slot, why in self._unit_skips(first).items()})  # fmt: skip
        return out

    def _unit_skips(self, unit: int) -> dict[int, str]:
        out: dict[int, str] = {}
        for entry in self.marker(unit)["skipped"]:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise StoreCorruptError(
                    f"{self.path}: marker of unit {unit}: skipped entry {entry!r:.80}; "
                    "expected [slot, why]"
                )
            out[int(entry[0])] = str(entry[1])
        return out

    def check_fingerprints(self, raw: dict[str, np.ndarray], start: int, stop: int) -> None:
        """Every whole chunk in [start, stop) against its unit's `chunk_crc32c` (schema 3): a
        shard file swapped with another one of the same size reads intact bytes of other
        slots, which only this catches."""
        if not self.signed:
            return
        for unit in range(
            start // self.layout.unit_samples, (stop - 1) // self.layout.unit_samples + 1
        ):
            prints = self.marker(unit)["chunk_crc32c"]
            for k, (a, b) in enumerate(self.layout.unit_chunks(unit)):
                if a < start or b > stop:
                    continue
                for name, rows in raw.items():
                    want = prints.get(name)
                    want = want[k] if isinstance(want, list) and len(want) > k else None
                    got = rows_crc32c(np.asarray(rows)[a - start : b - start])
                    if want == got:
                        continue
                    recorded = f"{want:08x}" if isinstance(want, int) else "none"
                    raise StoreCorruptError(
                        f"{self.path}: {self.where(name, a, b)} holds other rows than its unit's "
                        f"marker recorded (crc32c {got:08x}, recorded {recorded}): the shard file "
                        "was swapped with or replaced by another; expected the file written with "
                        "the unit (restore the store from a copy or rerun the dump into a new one)"
                    )

    def unit_manifest(self, unit: int) -> dict | None:
        """The manifest in `unit`'s marker ({array: [bytes, crc32c]}); None for version-1
        markers. The marker must agree with the slot layout."""
        manifest = self.marker(unit).get("manifest")
        return manifest if isinstance(manifest, dict) else None

    def check_unit_files(self, unit: int, crc: bool = False) -> None:
        """Every shard file of complete `unit` exists with the size (and, with crc=True, the
        crc32c) its manifest recorded. Sizes are checked once per reader; cheap (a stat each)."""
        if unit in self._units_checked and not crc:
            return
        manifest = self.unit_manifest(unit)
        if manifest is None:  # version-1 marker: nothing recorded to check against
            self._units_checked.add(unit)
            return
        start, stop = self.layout.unit_slots(unit)
        for name in self.arrays:
            want = manifest.get(name)
            if not (isinstance(want, list) and len(want) == 2):
                raise StoreCorruptError(
                    f"{self.path}: manifest of unit {unit} lacks array '{name}'; "
                    "expected one entry per array"
                )
            key = shard_key(self.arrays[name], name, unit)
            got = self.location.file_crc32c(key) if crc else (self.location.file_size(key), None)
            if got[0] != want[0] or (crc and got[1] != want[1]):
                what = (
                    "is missing"
                    if got[0] == 0
                    else f"has {got[0]} bytes, the manifest {want[0]}"
                    if got[0] != want[0]
                    else f"has crc32c {got[1]:08x}, the manifest {want[1]:08x}"
                )
                raise StoreCorruptError(
                    f"{self.path}: {self.where(name, start, stop)} of complete unit {unit} "
                    f"{what}; expected the file written with the unit (restore the store from "
                    "a copy or rerun the dump into a new one)"
                )
        self._units_checked.add(unit)

    def check_rows(self, raw: dict[str, np.ndarray], start: int, stop: int) -> None:
        """Cheap consistency of a chunk read from a complete unit: instance and spec columns
        against the slot layout, and no NaN/Inf in float arrays (the writer refused them)."""
        slots = np.arange(start, stop)
        views = self.layout.slot_views(slots)
        j = slots - views * self.layout.block_samples
        real = j < self.layout.n
        expect = np.full(len(slots), -1, dtype=np.int64)
        for view in np.unique(views).tolist():
            here = real & (views == view)
            expect[here] = self.layout.view_permutation(view)[j[here]]
        problems = []
        if "instance" in raw and not np.array_equal(np.asarray(raw["instance"]), expect):
            problems.append(("instance", "instances other than the slot layout's"))
        if "spec" in raw:
            spec = np.asarray(raw["spec"])
            if not (
                np.array_equal(spec[real, 0], expect[real])
                and np.array_equal(spec[real, 1], views[real])
            ):
                problems.append(("spec", "crop specs of other instances or views"))
        for name, a in raw.items():
            if self.check_finite and not all_finite(np.asarray(a)):
                problems.append((name, "NaN/Inf values"))
        if problems:
            name, what = problems[0]
            raise StoreCorruptError(
                f"{self.path}: {self.where(name, start, stop)} holds {what}; expected what the "
                "writer stored (restore the store from a copy or rerun the dump into a new one)"
            )

    def _decode(self, name: str, raw: dict, dtype) -> np.ndarray:
        codes = np.asarray(raw[name])
        if self.meta.mode == "fp16":
            return codes if dtype is None else codes.astype(dtype)
        scale = np.asarray(raw[name + "_scale"])
        if self.meta.compact():  # back to the full arrays: [n, K, Hh, Wh], [n, T, D]
            x = (
                compact.heatmap_codec(self.meta).decode(
                    codes, scale, self.meta.geometry.heatmap_size
                )
                if name == "heatmaps"
                else self.bases[name].decode(codes, scale)
            )
        elif name == "heatmaps":
            x = dequantize_heatmaps(codes, scale)
        else:
            x = dequantize_tokens(codes, scale)
        return x if dtype is None else x.astype(dtype, copy=False)

    def read_slots(
        self,
        start: int,
        stop: int,
        fields: Sequence[str] = DEFAULT_FIELDS,
        allow_incomplete: bool = False,
        dtype=None,
    ) -> dict[str, np.ndarray]:
        """Slots [start, stop) as dict of arrays [stop - start, ...], padding slots included
        (instance -1). Refuses a range touching an incomplete unit unless allow_incomplete."""
        total = self.layout.num_slots(self.meta.views)
        if not 0 <= start <= stop <= total:
            raise StoreFormatError(f"{self.path}: slots [{start}, {stop}) outside [0, {total})")
        if not allow_incomplete and stop > start:
            u0, u1 = start // self.layout.unit_samples, (stop - 1) // self.layout.unit_samples
            done = set(self.complete_units().tolist())
            missing = [u for u in range(u0, u1 + 1) if u not in done]
            if missing:
                raise StoreFormatError(
                    f"{self.path}: slots [{start}, {stop}) include unit {missing[0]}, which is "
                    "not complete; expected complete units (or allow_incomplete=True)"
                )
        return self.read_chunk(start, stop, fields, dtype)

    def iter_batches(
        self,
        view: Views = None,
        batch_size: int = 64,
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer_chunks: int = 4,
        allow_incomplete: bool = False,
        fields: Sequence[str] = DEFAULT_FIELDS,
        *,
        drop_last: bool = False,
        part: tuple[int, int] = (0, 1),
        rank: tuple[int, int] = (0, 1),
        num_threads: int = 2,
        dtype=None,
        shared: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Shuffled batches (dicts of arrays [B, ...]) of one epoch; see the module docstring.

        part=(i, n): only batches i, i + n, ... of this order, reading only their chunks.
        rank=(r, R): `batch_size` is the global batch of R data-parallel ranks, and only rank
        r's slice of each is read and yielded, with a "valid" [b] bool array
        (`distilpose.training.distributed.rank_rows`: a rank left without samples gets one
        padding row). Samples the dump could not read (schema 3's skip records) are left out of
        the planned batches (`drop_skipped`), which then carry "valid" too.
        """
        chunks = self.chunks(view, allow_incomplete)
        order = epoch_chunk_order(len(chunks), seed, epoch)
        chunks = [chunks[i] for i in order]
        rng = np.random.default_rng([seed, epoch, 0, 1])
        plan = plan_batches(
            [b - a for a, b in chunks], batch_size, shuffle_buffer_chunks, rng, drop_last
        )
        i, n = part
        plan = plan[i::n]
        fields = self._fields(fields)
        skipped = self.skipped_slots(sorted({a // self.layout.unit_samples for a, _ in chunks}))
        if rank[1] == 1 and not skipped:
            yield from run_plan(self, chunks, plan, fields, num_threads, dtype, shared)
            return
        plan, kept = drop_skipped(plan, chunks, skipped)
        shares = [rank_rows(b, *rank) for b in plan]
        for (_, valid), any_kept in zip(shares, kept, strict=True):
            valid &= any_kept  # a batch of skipped samples only keeps one row, invalid
        batches = run_plan(
            self, chunks, [rows for rows, _ in shares], fields, num_threads, dtype, shared
        )
        for (_, valid), batch in zip(shares, batches, strict=True):
            yield {**batch, "valid": valid}


def drop_skipped(
    plan: list[np.ndarray], chunks: Sequence[tuple[int, int]], skipped: dict[int, str]
) -> tuple[list[np.ndarray], list[bool]]:
    """The plan without the rows of skipped slots (images the dump could not read), and per
    batch whether it keeps any real row: a batch of skipped rows only keeps its first row, to
    be marked invalid, so that every rank still takes every step (the batch count is kept)."""
    if not skipped:
        return plan, [True] * len(plan)
    starts = np.array([a for a, _ in chunks], dtype=np.int64)
    skip = np.fromiter(skipped, dtype=np.int64)
    out, kept = [], []
    for batch in plan:
        keep = ~np.isin(starts[batch[:, 0]] + batch[:, 1], skip)
        out.append(batch[keep] if keep.any() else batch[:1])
        kept.append(bool(keep.any()))
    return out, kept


def all_finite(a: np.ndarray) -> bool:
    """No NaN/Inf in `a` (True for integer arrays). float16 through its bits: numpy's isfinite
    on float16 converts every value and is about 10x slower than this test."""
    if a.dtype.kind != "f" or a.size == 0:
        return True
    if a.dtype == np.float16:  # exponent bits all ones = Inf or NaN
        return int(np.max(np.ascontiguousarray(a).view(np.uint16) & 0x7FFF)) < 0x7C00
    return bool(np.isfinite(a).all())


def epoch_chunk_order(num_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's chunk order: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_chunks)


def plan_batches(
    sizes: Sequence[int],
    batch_size: int,
    group_chunks: int,
    rng: np.random.Generator,
    drop_last: bool,
) -> list[np.ndarray]:
    """Index-only shuffle plan: each batch is [n, 2] int64 (chunk position, row in the chunk).

    Chunks are taken in groups of `group_chunks`; each group's rows, plus the rows left over from
    the previous group, are permuted together and cut into whole batches.
    """
    if batch_size < 1 or group_chunks < 1:
        raise ValueError("batch_size and shuffle_buffer_chunks must be >= 1")
    batches: list[np.ndarray] = []
    carry = np.empty((0, 2), dtype=np.int64)
    for g in range(0, len(sizes), group_chunks):
        parts = [carry] + [
            np.stack([np.full(s, c, dtype=np.int64), np.arange(s, dtype=np.int64)], 1)
            for c, s in enumerate(sizes[g : g + group_chunks], start=g)
        ]
        pool = np.concatenate(parts)
        pool = pool[rng.permutation(len(pool))]
        whole = len(pool) // batch_size * batch_size
        batches.extend(np.split(pool[:whole], whole // batch_size) if whole else [])
        carry = pool[whole:]
    if len(carry) and not drop_last:
        batches.append(carry)
    return batches


def run_plan(
    reader: StoreReader,
    chunks: Sequence[tuple[int, int]],
    plan: Sequence[np.ndarray],
    fields: tuple[str, ...],
    num_threads: int = 2,
    dtype=None,
    shared: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Execute a plan: read each needed chunk once (concurrently, a few ahead), gather batches."""
    first_use: list[int] = []
    last_use: dict[int, int] = {}
    for b, batch in enumerate(plan):
        for c in np.unique(batch[:, 0]).tolist():
            if c not in last_use:
                first_use.append(c)
            last_use[c] = b
    position = {c: i for i, c in enumerate(first_use)}
    ahead = max(1, num_threads) + 1
    futures: dict[int, Future] = {}
    loaded: dict[int, dict[str, np.ndarray]] = {}
    # compact codes are gathered and decoded batch by batch: a batch's rows go straight into
    # their full arrays, instead of a whole chunk's decoded arrays being copied row by row
    late = reader.meta.compact() is not None
    names = tuple(fields)
    if late:
        names += tuple(f + "_scale" for f in fields if f in TEACHER_OUTPUTS)
    submitted = 0
    with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="store_read") as pool:
        try:
            for b, batch in enumerate(plan):
                needed = np.unique(batch[:, 0]).tolist()
                target = max(position[c] for c in needed) + ahead
                while submitted < min(target, len(first_use)):
                    c = first_use[submitted]
                    futures[c] = pool.submit(
                        reader.read_chunk, *chunks[c], fields, dtype, decode=not late
                    )
                    submitted += 1
                for c in needed:
                    if c not in loaded:
                        loaded[c] = futures.pop(c).result()
                rows = gather_rows(batch, loaded, names, shared and not late)
                yield reader.decode_targets(rows, fields, dtype) if late else rows
                for c in needed:
                    if last_use[c] == b:
                        del loaded[c]
        finally:
            for f in futures.values():
                f.cancel()


def gather_rows(
    batch: np.ndarray, loaded: dict, fields: Sequence[str], shared: bool = False
) -> dict[str, np.ndarray]:
    """Rows (chunk, row) of loaded chunks -> one dict of arrays [len(batch), ...].

    shared=True (inside DataLoader workers) gathers straight into shared-memory torch tensors,
    which the DataLoader then hands to the main process without another 13 MB copy per batch.
    """
    cids, rows = batch[:, 0], batch[:, 1]
    groups = [(c, np.flatnonzero(cids == c)) for c in np.unique(cids).tolist()]
    out = {}
    for f in fields:
        first = loaded[groups[0][0]][f]
        shape = (len(batch), *first.shape[1:])
        if shared and first.dtype != object:  # encoded pixels stay Python bytes
            import torch

            tensor = torch.empty(shape, dtype=torch.from_numpy(first[:0]).dtype).share_memory_()
            arr = tensor.numpy()
        else:
            arr = np.empty(shape, dtype=first.dtype)
        for c, where in groups:
            arr[where] = loaded[c][f][rows[where]]
        out[f] = tensor if shared and first.dtype != object else arr
    return out


def load_store_instances(
    meta: StoreMeta, store: object, ann_file: str | None = None, images: str | None = None
) -> list:
    """The dataset instances (PersonInstance) the store's slots index, checked against its meta.

    ann_file / images override the paths recorded in the store (a store moved to another
    machine); the annotation file must still be byte-identical (same digest).
    """
    from distilpose.data import annotation_digest, load_coco_instances

    ann = str(ann_file or meta.ann_file)
    root = str(images or meta.image_root)
    if not Path(ann).is_file():
        raise StoreMismatchError(
            f"{store}: annotation file '{ann}' named by the store does not exist; "
            "expected it in place, or pass ann_file=/--ann"
        )
    digest = annotation_digest(ann)
    if meta.ann_digest and digest != meta.ann_digest:
        raise StoreMismatchError(
            f"{ann}: sha256 {digest[:12]}... differs from the store's {meta.ann_digest[:12]}...; "
            "expected the annotation file the teacher was dumped with"
        )
    w, h = meta.geometry.input_size
    instances = load_coco_instances(ann, root, train=True, aspect_ratio=w / h)
    if len(instances) != meta.num_instances:
        raise StoreMismatchError(
            f"{ann}: {len(instances)} training instances, the store {store} has "
            f"{meta.num_instances}; expected the same annotation file and filters"
        )
    return instances
