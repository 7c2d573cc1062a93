"""The teacher store's on-disk format, written down in one place.

(Where a store lives, local or an fsspec URL, and how its markers are listed and written:
`store.location`. The lossy modes' quantizers: `store.quantize`; the compact modes' codecs:
`store.compact`.)

A store is a zarr v3 group. Its attribute `distilpose_store` holds `StoreMeta`; its arrays all
have the sample slot as first axis; `complete/u<unit>.json` files mark finished write units.

Slot layout. View v of the N instances occupies one *view block* of `block_samples` slots,
`block_samples = ceil(N / unit_samples) * unit_samples`, starting at slot `v * block_samples`.
Slot `v * block_samples + j` holds instance `perm_v[j]` for `j < N`, with
`perm_v = np.random.default_rng([seed, v]).permutation(N)`: consecutive slots are shuffled
instances, so every chunk is a random subset of the dataset. Slots `j >= N` are padding:
`instance = -1`, never returned by the reader's training path. Padding exists so that every
view block is a whole number of write units: a unit never spans two views, and raising `views`
later appends new blocks without touching a byte of the old ones.

Write unit = one zarr shard = `shard_chunks` chunks of `chunk_samples` slots. Several writers
fill disjoint units (different shard files) of one store; a unit is complete once its marker
exists, and the marker is written only after the unit's shards are fsynced.

Arrays, per slot (K joints, D token dim, P patches, heatmaps Hh x Wh):

| name              | shape       | fp16 mode | lossy modes                                       |
|-------------------|-------------|-----------|---------------------------------------------------|
| spec              | [8]         | float64   | float64 (CropSpec.to_array)                       |
| instance          | []          | int64     | int64 (-1 = padding)                              |
| image_id, ann_id  | []          | int64     | int64                                             |
| keypoints         | [K, 2]      | float32   | float32 (crop pixels)                             |
| weights           | [K]         | float32   | float32                                           |
| crop_digest       | [32]        | uint8     | uint8 (sha256 bytes of the crop the teacher saw)  |
| heatmaps          | [K, Hh, Wh] | float16   | uint8 (lossy) / uint16 (lossy16)                  |
| heatmaps_scale    | [K, 2]      | -         | float32 (offset, step) per sample and joint       |
| keypoint_tokens   | [K, D]      | float16   | int8                                              |
| keypoint_tokens_scale | [K]     | -         | float32 per token                                 |
| visual_tokens     | [P, D]      | float16   | int8                                              |
| visual_tokens_scale   | [P]     | -         | float32 per token                                 |
| pixels            | []          | bytes     | bytes (only if `pixels` != "none", schema 2)      |

Compact modes (since schema 3; `COMPACT` names them, window w and basis rank r, each row part of
the format): `heatmaps` uint8 [K, w, w] is the window around each joint's peak and
`heatmaps_scale` float32 [K, 5] its corner, code offset and step and the mean outside it
(`store.compact.HEATMAP_PARAMS`); `keypoint_tokens` int8 [K, r] and `visual_tokens` int8
[P, r] are coefficients in the store's token bases, `*_tokens_scale` float16 per token. The
bases are stored once per store, not per slot: arrays `keypoint_tokens_basis` [K + r, D] and
`visual_tokens_basis` [P + r, D] float32 (the mean token of each position, then r orthonormal
directions), fitted when the store is created on the teacher's outputs for its first
`FIT_SAMPLES` slots (view 0: a random subset of the people) and written before the metadata;
`StoreMeta.basis_sha256` is their digest, and a reader refuses bases that do not match it.
Readers decode every mode back into the arrays above, so the losses need no change.

Geometry: `StoreMeta.geometry` is the teacher's `distilpose.geometry.Geometry`, kept in the
metadata as its fields (`"geometry": {"input_size": [W, H], "heatmap_size": [Wh, Hh],
"patch_size": [pw, ph]}`); P = its number of patches, 0 in a store without visual tokens.
Reader rule: metadata written before this field holds `input_size`, `heatmap_size` and
`patch_grid` instead; the Geometry is derived from them (patch size = heatmap size / patch grid,
the default patch size where the grid is (0, 0)), and sizes that give none are refused.

`crop_digest` rows are the 32 bytes `distilpose.data.crop_digest` returns; they stay bytes on
every path (written from bytes, compared as bytes), hex only in what a user reads.

Teacher outputs: `StoreMeta.teacher_outputs` names those the store holds (since schema 2). A
teacher without tokens (SimpleBaseline) gives heatmaps only, and its store has no token arrays.
Reader rule: a version-1 store has no such field and holds all three outputs.

All arrays are zstd compressed, level 1 (measured on realistic data, higher levels or blosc
shuffle gain under 1% on dense half floats and int8 tokens and cost write speed) except the
quantized heatmap codes, where level 9 saves about 10% (1.4 kB per sample in lossy mode).
`StoreMeta.targets_zstd = False` (schema 2, `dump-teacher --raw-targets`) stores the fp16
teacher outputs without zstd: 8% more bytes (209 instead of 193 kB per sample), and no
decompression, about half the CPU of reading them (zstd decodes these near-incompressible half
floats at about 1 GB/s per core; benchmarks/results/store_bench.md).

Pixels (schema version 2). `StoreMeta.pixels` is "jpeg", "lossless" or "none": with pixels, the
`pixels` array holds each slot's encoded crop (store/pixels.py: the formats and why) as zarr's
variable-length bytes, chunked and sharded like every other array (the `vlen-bytes` codec runs
inside the sharding codec; zarr-python marks this data type as not yet in the v3 spec, so
another zarr implementation may not read that one array), without zstd (JPEG and the lossless
format are compressed already). `crop_digest` is then the sha256 of the decoded pixels.
Reader rule: a store of schema version 1 has no pixels: it reads as `pixels = "none"`.

Integrity (schema version 2). Every chunk of every array ends with a crc32c of its compressed
bytes (zarr v3's `crc32c` codec, built by `array_compressors`, the one place codecs are made):
crc32c because zarr ships it, it runs at several GB/s (hardware instruction) and catches any
flipped byte, where zstd's own optional checksum covers only decompressed frames and sha256
would cost about 20x more per read. The shard index carries its own crc32c (zarr's default).
Each completion marker also holds the unit's *manifest*: per array, the byte size and crc32c
of its shard file (size 0 = not stored because every value is the fill value). A reader refuses
a complete unit whose shard file is missing or of another size, so a deleted shard never reads
back as zeros; `store-verify` also compares the whole file's crc32c.
Reader rule for version-1 stores (no chunk checksums, no manifests): they still read, and
`store-verify` reports `checksums: false` / `manifests: false` for them. From schema 2 on, a
marker without a manifest is an error (never "nothing to check").

Schema version 3 (every format change of issue 24; written by this code, read with the rules
below for every older store):

- Signatures. The metadata that says what a store means is signed (`store/signature.py`): a
  signature of a JSON object is `{"fields": {name: h}, "sha256": H}`, H the sha256 of its
  canonical JSON (sorted keys, no spaces), h the first 16 hex digits of the sha256 of each
  field's canonical JSON, nested objects flattened (`recipe.flip_prob`). The `distilpose_store`
  attribute is signed by the group attribute `distilpose_signature`, written in the same update
  of zarr.json (a reader never sees one without the other); every completion marker carries its
  own under `signature`. `complete/signed.json` lists the signed units, `{"units": {"<unit>":
  the marker's H}, "sha256": of the units}`, rewritten after each marker is written (local
  stores: under the store's lock file; object stores: each writer signs what it lists, and the
  dump signs once more at its end). A reader checks the metadata's signature at open (an edit
  names the fields that differ, before anything is parsed from them), reads `signed.json`
  *before* listing the markers, and counts a unit complete only when its marker exists and is
  listed with the marker's H. A listed unit whose marker is gone is an error (a deleted marker
  never makes a smaller store); a marker not yet listed is a unit not yet complete (its writer is
  between marker and signature, or was stopped there: the next writer of the store, or
  `store-verify --accept-metadata`, signs it). Markers are read once per reader and checked
  against their signatures and `signed.json` on first use (store-info, store-verify and
  train-student check them all at the start). Edits are signed only on request:
  `distilpose store-verify STORE --accept-metadata` (`store.writer.accept_metadata`) prints what
  changed and writes new signatures.
- Chunk fingerprints. Each marker holds `chunk_crc32c`: per array, the crc32c (`rows_crc32c`)
  of the decoded rows of each of the unit's chunks (real slots only, `StoreLayout.unit_chunks`).
  Every read of a whole chunk of a complete unit compares them, so a shard file swapped with
  another of the same size (two units' `--raw-targets` heatmaps) fails at its first read (cost:
  benchmarks/results/integrity_bench.md): the chunks' own crc32c prove their bytes intact but
  not which slots they belong to. (A whole-file crc32c per shard on first open would read every
  shard once more in every DataLoader worker, each of which reads only part of it.)
- Skipped images. Each marker holds `skipped`: `[[slot, why], ...]`, the slots whose image the
  dump could not read. Their rows hold zeros (keypoint weights 0, crop digest 0; a black crop
  in pixel stores, only so that the row is well-formed); readers leave them out of training
  batches (`StoreReader.iter_batches`), `store-verify` counts them skipped, `store-info` shows
  the count.
- `StoreMeta.pixel_decoder`: the decoder whose pixels `crop_digest` hashes ("opencv" for JPEG
  pixels: `store.pixels.decode_crop`; empty for lossless pixels, which our own code decodes
  exactly, and stores without pixels).

Schema version 4: canvas pixels (issue 28). `StoreMeta.pixels = "canvas"` keeps each
person's pixels once, whatever the views: the canvas of `distilpose.data.canvas` (the region
that holds every crop the store's recipe can draw of that person), JPEG-encoded like `jpeg`
crops (quality `jpeg_quality`, 4:4:4, OpenCV), and every view's crop is warped from it by its
spec (`warp_from_canvas`), by the teacher at dump time and the student at training time. The
canvas of the person in slot j of view 0 is the `pixels` row of that slot, and the array
`canvas` [5] float64 (origin x, y in image px, density, width, height in canvas px;
`Canvas.to_array`) beside it; the rows of every other view are empty (b"" and zeros: stored as
nothing). Every view of a canvas store uses view 0's permutation (`StoreLayout.view_permutation`),
so slot `v * block_samples + j` holds the same person for every v and its canvas is at slot j:
a chunk of any view reads its canvases from one chunk of view 0. `crop_digest` is the sha256 of
the crop warped from the decoded canvas. A unit of view v > 0 is usable for training only once
view 0's unit at the same place is complete (`StoreReader.chunks`). Reader rule: stores of
schema 1-3 have no canvas pixels and one permutation per view, as written above.

Schema version 5: the `compact-hq` mode, whose heatmaps keep the outside of each window as a
grid of cell means (`CompactSettings.grid`, `store.compact.HeatmapWindows`): `heatmaps` uint8
[K, w * w + gy * gx] (a joint's window codes row by row, then its cells' row by row) and
`heatmaps_scale` float32 [K, 7] (the five params above, then the cells' code offset and step);
and `compact-m`, the name new stores give window 11 and rank 16, which `compact` names in the
stores that hold it (a new store asked for `compact` gets `DEFAULT_COMPACT`: `dump_mode`).
Reader rule: stores of schema 1-4 have neither mode (one in their metadata is refused); every
other mode, `compact` included, reads as written above.

Reader rules for schema 1 and 2: no signatures (`store-verify` reports `signed: false`; the
metadata, the markers and the set of complete units are taken as they are), no chunk
fingerprints (shard sizes are checked on every read, whole-file crc32c by `store-verify`), no
skip records (a skipped sample of a schema-2 dump has zero keypoint weights and an all-zero
crop digest: `store-verify` counts it skipped; training leaves it out too, by that mark), JPEG
digests of OpenCV's decode. A schema-3 store without its signatures, or a marker without its
signature, manifest or fingerprints, is an error.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from distilpose import __version__
from distilpose.data.crop import AugmentRecipe
from distilpose.errors import BadConfigError, StoreFormatError
from distilpose.geometry import PAPER, Geometry

# 2: teacher_outputs (heatmap-only stores); crop pixels (`pixels` array); crc32c per chunk and
# unit manifests. Version-1 stores read as before (no pixels, no checksums).
# 3: signatures, chunk fingerprints, skipped images, pixel_decoder; the compact modes
# (token bases stored once, `basis_sha256`). Older stores read by the rules in the docstring.
# 4: canvas pixels (one canvas per person, view 0's permutation for every view).
# 5: compact heatmaps with a grid of the outside (`compact-hq`); nothing else changed, so
# stores of 4 read as before, and code of schema 4 refuses a schema-5 store by its version.
SCHEMA_VERSION = 5
CHECKSUMS_SINCE = 2  # stores of this schema version or later carry crc32c per chunk
SIGNED_SINCE = 3  # ... signatures, chunk fingerprints and skip records
META_KEY = "distilpose_store"  # group attribute holding StoreMeta
SIGNATURE_KEY = "distilpose_signature"  # group attribute signing META_KEY
COMPLETE_DIR = "complete"  # one marker file per finished write unit


class CompactSettings(NamedTuple):
    window: int  # heatmap window side (clipped to the heatmap's shorter side)
    rank: int  # token basis rank (clipped to the token dim)
    grid: tuple[int, int] = (0, 0)  # (gy, gx) cells of the outside map; (0, 0): one mean


# The compact modes (`store.compact`; why these sizes: docs/store.md, measured by
# benchmarks/compact_bench.py). Bytes per view at the paper's sizes: about 4, 7, 13 and 17 kB
# (uncompressed bound; stored with zstd: compact_bench.md).
_WINDOW_11 = CompactSettings(11, 16)
COMPACT = {
    "compact-s": CompactSettings(7, 8),
    # `compact` names window 11, rank 16 in every store that holds it (schema 3 on); a new
    # store asked for `compact` gets DEFAULT_COMPACT (`dump_mode`), and `compact-m` this setting
    "compact": _WINDOW_11,
    "compact-m": _WINDOW_11,
    "compact-l": CompactSettings(15, 32),
    # rank 48: the demo teacher's 64-dim tokens keep 90% of their variation about the
    # position means at 48 directions against 77% at 32 (docs/store.md); still <= 16 kB a view
    # at the paper's sizes
    "compact-xl": CompactSettings(13, 48),
    # compact-xl's sizes with the outside of each heatmap kept as an 8 x 6 grid of cell means
    # (48 bytes a joint whatever the heatmap's size; since schema 5): the single mean's sh
    # gradient error was the field farthest from fp16 at rank 48 (docs/store.md)
    "compact-hq": CompactSettings(13, 48, (8, 6)),
}
# What `--mode compact` writes into a new store: the compact setting whose distilled AP on the
# demo stayed within fp16's seed range side by side (benchmarks/results/modes_grid_hq.md)
DEFAULT_COMPACT = "compact-hq"


def dump_mode(requested: str, existing: str | None) -> str:
    """The mode a dump writes: `requested`, but `compact` is DEFAULT_COMPACT for a new store
    and the existing store's own mode where that is `compact` or DEFAULT_COMPACT (a store made
    before the default changed keeps its setting, as `--pixels auto` keeps a store's pixels)."""
    if requested != "compact":
        return requested
    return existing if existing in ("compact", DEFAULT_COMPACT) else DEFAULT_COMPACT


SINCE_5 = ("compact-m", "compact-hq")  # modes no store of schema 1-4 can hold
FIT_SAMPLES = 256  # a compact store's token bases are fitted on its first slots
# A new store's layout when the dump names none, (chunk_samples, shard_chunks): a write unit of
# 512 samples in every mode. The compact modes' samples are a few kB, and zarr's cost per array
# read hardly depends on the chunk's size, so at 64 samples that fixed cost was a large part of
# the training data path (store_bench); their chunks hold 256 samples instead.
LAYOUT = (64, 8)
COMPACT_LAYOUT = (256, 2)
SIGNED_FILE = "signed.json"  # in COMPLETE_DIR: the signed units
MODES = ("fp16", "lossy", "lossy16", *COMPACT)


def default_layout(mode: str) -> tuple[int, int]:
    """(chunk_samples, shard_chunks) of a new store of target mode `mode` (see LAYOUT)."""
    return COMPACT_LAYOUT if mode in COMPACT else LAYOUT


ZSTD_LEVEL = 1
ZSTD_LEVEL_CODES = 9  # quantized heatmaps: smooth small integers that reward a harder search
TEACHER_OUTPUTS = ("heatmaps", "keypoint_tokens", "visual_tokens")
# Fields that identify what a store contains: opening it for writing with any other value is a
# mismatch. Layout (chunk_samples, shard_chunks) is taken from the existing store instead.
IDENTITY_FIELDS = (
    "teacher_sha256",
    "seed",
    "ann_digest",
    "num_instances",
    "input_size",  # this and heatmap_size: of the geometry
    "heatmap_size",
    "token_dim",
    "num_patches",  # this and patch_grid: of the geometry; 0 without visual tokens
    "patch_grid",
    "num_keypoints",
    "recipe",
    "mode",
    "teacher_outputs",
    "pixels",
    "jpeg_quality",
)
# what each teacher output is called in messages ("kt needs keypoint tokens; ...")
OUTPUT_WORDS = {
    "heatmaps": "heatmaps",
    "keypoint_tokens": "keypoint tokens",
    "visual_tokens": "visual tokens",
}
PIXEL_FORMATS = ("jpeg", "lossless", "canvas", "none")  # store/pixels.py codes them
JPEG_PIXELS = ("jpeg", "canvas")  # formats kept as JPEG (quality, decoder)
CANVAS = "canvas"  # the array of a canvas store's canvas geometry (view 0's slots)
JPEG_QUALITY = 95  # default quality of JPEG pixels
JPEG_DECODER = "opencv"  # the decoder of the dump (store.pixels.decode_crop)


# Metadata sanity limits, checked before anything is allocated from the metadata: a damaged or
# hostile zarr.json claiming 2^40 samples must fail with a message, never with a MemoryError.
META_LIMITS = {
    "num_instances": 1 << 26,  # 67M people; COCO train has 150k
    "views": 1 << 12,
    "chunk_samples": 1 << 16,
    "shard_chunks": 1 << 16,
    "num_keypoints": 1 << 10,
    "token_dim": 1 << 14,
    "num_patches": 1 << 16,
}
MAX_SIDE = 1 << 14  # input / heatmap side, pixels
MAX_SLOTS = 1 << 32  # views x view block
MAX_CHUNK_BYTES = 1 << 31  # one decoded chunk of one array


@dataclass
class StoreMeta:
    """Store-level metadata, kept in the group attribute `distilpose_store`.

    Sizes follow the project convention: (width, height); `geometry` holds the teacher's crop,
    heatmap and patch sizes (kept in the metadata as the Geometry's fields; a store without token
    outputs has no patches: `patch_grid` (0, 0), `num_patches` 0). `views` is the number of view
    blocks the store has room for; which units are written is tracked by the completion markers.
    """

    teacher_name: str
    teacher_sha256: str
    num_instances: int
    views: int = 1
    seed: int = 0
    geometry: Geometry = PAPER
    token_dim: int = 192
    num_keypoints: int = 17
    recipe: dict = field(default_factory=dict)  # AugmentRecipe.to_dict() of the dumped views
    ann_digest: str = ""  # sha256 of the annotation file
    ann_file: str = ""
    image_root: str = ""
    mode: str = "fp16"
    chunk_samples: int = LAYOUT[0]  # read granularity: one zarr chunk
    shard_chunks: int = LAYOUT[1]  # chunks per shard = per write unit
    code_version: str = __version__
    created: str = ""  # ISO time, set when the store is created
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # free-form, e.g. the dump's options
    # the teacher outputs stored, in TEACHER_OUTPUTS order; absent in version 1 = all three
    teacher_outputs: tuple[str, ...] = TEACHER_OUTPUTS
    pixels: str = "none"  # crop pixels kept in the store: "jpeg", "lossless" or "none"
    jpeg_quality: int = 0  # JPEG quality of the kept crops (0 unless pixels == "jpeg")
    targets_zstd: bool = True  # fp16 teacher outputs zstd-compressed (False: raw, faster reads)
    basis_sha256: str = ""  # compact modes: digest of the stored token bases (since schema 3)
    pixel_decoder: str = ""  # decoder of the pixels crop_digest hashes ("opencv" for JPEG)

    def __post_init__(self) -> None:
        self.teacher_outputs = tuple(str(v) for v in self.teacher_outputs)
        if "heatmaps" not in self.teacher_outputs or not set(self.teacher_outputs) <= set(
            TEACHER_OUTPUTS
        ):
            raise StoreFormatError(
                f"StoreMeta.teacher_outputs: {list(self.teacher_outputs)}; expected 'heatmaps' "
                f"and any of {list(TEACHER_OUTPUTS[1:])}"
            )
        self.teacher_outputs = tuple(o for o in TEACHER_OUTPUTS if o in self.teacher_outputs)
        if self.pixels not in PIXEL_FORMATS:
            raise StoreFormatError(
                f"StoreMeta.pixels: '{self.pixels}'; expected one of {PIXEL_FORMATS}"
            )
        jpeg = self.pixels in JPEG_PIXELS
        self.jpeg_quality = (int(self.jpeg_quality) or JPEG_QUALITY) if jpeg else 0
        # the dump decodes JPEG crops with OpenCV (every schema): the digest is of its pixels
        self.pixel_decoder = (self.pixel_decoder or JPEG_DECODER) if jpeg else ""
        if jpeg and not 1 <= self.jpeg_quality <= 100:
            raise StoreFormatError(
                f"StoreMeta.jpeg_quality: {self.jpeg_quality}; expected 1..100 for JPEG pixels"
            )
        if not isinstance(self.geometry, Geometry):
            raise StoreFormatError(f"StoreMeta.geometry: {self.geometry!r}; expected a Geometry")
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.mode not in MODES:
            raise StoreFormatError(f"StoreMeta.mode: '{self.mode}'; expected one of {MODES}")
        for name in ("num_instances", "views", "chunk_samples", "shard_chunks"):
            if int(getattr(self, name)) < 1:
                raise StoreFormatError(f"StoreMeta.{name}: {getattr(self, name)}; expected >= 1")
        check_meta_sane(self)

    @property
    def unit_samples(self) -> int:
        return self.chunk_samples * self.shard_chunks

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Visual-token patches (across, down); (0, 0) in a store without visual tokens."""
        return self.geometry.patch_grid if self.has("visual_tokens") else (0, 0)

    @property
    def num_patches(self) -> int:
        """Visual tokens per sample; 0 in a store without visual tokens."""
        return self.patch_grid[0] * self.patch_grid[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["geometry"] = {k: list(v) for k, v in d["geometry"].items()}
        d["teacher_outputs"] = list(d["teacher_outputs"])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "store") -> StoreMeta:
        version = int(d.get("schema_version", 0))
        if version > SCHEMA_VERSION:
            raise StoreFormatError(
                f"{source}: schema version {version} is newer than this code's {SCHEMA_VERSION}; "
                "expected an upgrade of distilpose to read it"
            )
        known = {f.name for f in fields(cls)}
        if version < 2:  # schema 1 predates pixels (crops re-rendered from the images); its
            # teacher_outputs, absent, default to all three
            d = {**d, "pixels": "none", "jpeg_quality": 0}
        if version < 4 and d.get("pixels") == "canvas":
            raise StoreFormatError(
                f"{source}: pixels 'canvas' in a schema {version} store; canvas pixels exist "
                "since schema 4 (was its zarr.json edited?)"
            )
        if version < 5 and d.get("mode") in SINCE_5:
            raise StoreFormatError(
                f"{source}: mode {d['mode']!r} in a schema {version} store; that mode exists "
                "since schema 5 (was its zarr.json edited?)"
            )
        missing = {"teacher_name", "teacher_sha256", "num_instances"} - set(d)
        if missing:
            raise StoreFormatError(f"{source}: store metadata lacks {sorted(missing)}")
        d = {**d, "geometry": _read_geometry(d, source)}
        try:  # the dump wrote AugmentRecipe.to_dict(): anything else is an edit or damage
            AugmentRecipe.from_dict(d.get("recipe", {}))
        except BadConfigError as e:
            raise StoreFormatError(
                f"{source}: store metadata {e}, as the dump writes it (was its zarr.json "
                "edited or damaged?)"
            ) from None
        return cls(**{k: v for k, v in d.items() if k in known})

    def compact(self) -> CompactSettings | None:
        """A compact mode's window and rank, clipped to the store's sizes (None: other modes)."""
        if self.mode not in COMPACT:
            return None
        window, rank, (gy, gx) = COMPACT[self.mode]
        wh, hh = self.geometry.heatmap_size
        grid = (min(gy, hh), min(gx, wh))
        return CompactSettings(min(window, wh, hh), min(rank, max(self.token_dim, 1)), grid)

    def has(self, output: str) -> bool:
        """Whether the store holds teacher output `output` (e.g. "keypoint_tokens")."""
        return output in self.teacher_outputs

    def identity(self) -> dict:
        """The IDENTITY_FIELDS and their values (sizes from the geometry)."""
        geo = ("input_size", "heatmap_size")
        return {n: getattr(self.geometry if n in geo else self, n) for n in IDENTITY_FIELDS}

    def mismatches(self, other: StoreMeta) -> list[str]:
        """Identity fields whose values differ, as 'name: store=... requested=...'."""
        mine, theirs = self.identity(), other.identity()
        return [
            f"{name}: store={mine[name]!r} requested={theirs[name]!r}"
            for name in IDENTITY_FIELDS
            if _norm(mine[name]) != _norm(theirs[name])
        ]


def _read_geometry(d: dict, source: str) -> Geometry:
    """The Geometry of stored metadata `d`: its `geometry` fields, or for a store written before
    they existed, derived from its `input_size`, `heatmap_size` and `patch_grid`."""
    geo = d.get("geometry")
    if geo is None:  # the older form: patch size = heatmap / patch grid ((0, 0): no tokens)
        sizes = {k: d[k] for k in ("input_size", "heatmap_size") if k in d}
        grid, heatmap = d.get("patch_grid"), sizes.get("heatmap_size", PAPER.heatmap_size)
        try:
            if grid is not None and any(grid):
                if any(h % g for h, g in zip(heatmap, grid, strict=True)):
                    raise ValueError
                sizes["patch_size"] = [h // g for h, g in zip(heatmap, grid, strict=True)]
            geo = sizes
        except (TypeError, ValueError, ZeroDivisionError):
            raise StoreFormatError(
                f"{source}: store metadata patch_grid={grid!r} does not tile heatmap_size="
                f"{heatmap!r}; expected a whole number of patches across and down"
            ) from None
    if not isinstance(geo, dict) or not set(geo) <= {"input_size", "heatmap_size", "patch_size"}:
        raise StoreFormatError(
            f"{source}: store metadata geometry={geo!r}; expected input_size, heatmap_size and "
            "patch_size as [width, height]"
        )
    try:
        return Geometry(**geo)
    except BadConfigError as e:
        raise StoreFormatError(f"{source}: store metadata geometry: {e}") from None


def check_meta_sane(meta: StoreMeta) -> None:
    """Refuse metadata whose sizes would make a reader allocate absurd amounts (before it does)."""

    def bad(what: str, value: object, limit: str) -> StoreFormatError:
        return StoreFormatError(
            f"store metadata {what}={value!r} is outside {limit}; expected a value within the "
            "limits (for an existing store: is its zarr.json damaged?)"
        )

    token_sizes = ("token_dim", "num_patches", "patch_grid")  # 0 in heatmap-only stores
    geo = meta.geometry
    for name, limit in META_LIMITS.items():
        value = getattr(meta, name)
        low = 0 if name in token_sizes else 1
        if (
            not isinstance(value, int | np.integer)
            or isinstance(value, bool)
            or not (low <= value <= limit)
        ):
            raise bad(name, value, f"{low}..{limit}")
    for name in ("input_size", "heatmap_size", "patch_grid"):
        sides = meta.patch_grid if name == "patch_grid" else getattr(geo, name)
        low = 0 if name in token_sizes else 1
        if len(sides) != 2 or not all(low <= v <= MAX_SIDE for v in sides):
            raise bad(name, list(sides), f"two sides in {low}..{MAX_SIDE}")
    slots = StoreLayout(meta).num_slots(int(meta.views))
    if slots > MAX_SLOTS:
        raise bad("views x slots per view", slots, f"1..{MAX_SLOTS}")
    wh, hh = geo.heatmap_size
    per_sample = (
        max(meta.num_keypoints * wh * hh, meta.num_patches * meta.token_dim) * 4
    )  # the largest per-sample array, decoded to float32
    if per_sample * meta.chunk_samples > MAX_CHUNK_BYTES:
        raise bad("chunk_samples", meta.chunk_samples, f"chunks of at most {MAX_CHUNK_BYTES} bytes")


def _norm(v: object) -> object:
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in sorted(v.items())}
    return v


@dataclass(frozen=True)
class ArraySpec:
    """One store array: per-slot shape, stored dtype and the fill value of unwritten slots."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    fill_value: int | float | bytes = 0
    zstd_level: int = ZSTD_LEVEL  # 0: no zstd (data compressed already)


def array_compressors(spec: ArraySpec) -> list:
    """The bytes-to-bytes codecs of every store array (inside each shard, per chunk): zstd, then
    a crc32c of the compressed chunk, so any flipped byte fails the read (see the docstring)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    zstd = [ZstdCodec(level=spec.zstd_level)] if spec.zstd_level else []  # 0: compressed already
    return [*zstd, Crc32cCodec()]


def has_checksums(array: object) -> bool:
    """Whether a zarr array's chunks carry a crc32c (schema >= 2) or not (version-1 stores)."""
    codecs = getattr(array.metadata, "codecs", ())
    inner = [c for s in codecs for c in getattr(s, "codecs", ())] or list(codecs)
    return any(type(c).__name__ == "Crc32cCodec" for c in inner)


def shard_key(array: object, name: str, unit: int) -> str:
    """Store-relative path of a zarr array's shard file for write unit `unit`."""
    key = array.metadata.encode_chunk_key((unit,) + (0,) * (array.ndim - 1))
    return f"{name}/{key}"


def array_specs(meta: StoreMeta) -> dict[str, ArraySpec]:
    """Every array of a store made with `meta`, in write order."""
    if meta.compact():
        return _compact_specs(meta)
    k, d, p = meta.num_keypoints, meta.token_dim, meta.num_patches
    wh, hh = meta.geometry.heatmap_size
    hm_dtype = {"fp16": "float16", "lossy": "uint8", "lossy16": "uint16"}[meta.mode]
    mode_fp16 = meta.mode == "fp16"
    tok_dtype = "float16" if mode_fp16 else "int8"
    target_level = ZSTD_LEVEL if meta.targets_zstd or not mode_fp16 else 0
    specs = [
        *_label_specs(k),
        ArraySpec(
            "heatmaps", (k, hh, wh), hm_dtype, 0, target_level if mode_fp16 else ZSTD_LEVEL_CODES
        ),
        ArraySpec("keypoint_tokens", (k, d), tok_dtype, 0, target_level),
        ArraySpec("visual_tokens", (p, d), tok_dtype, 0, target_level),
    ]
    if meta.mode != "fp16":
        specs += [
            ArraySpec("heatmaps_scale", (k, 2), "float32"),
            ArraySpec("keypoint_tokens_scale", (k,), "float32"),
            ArraySpec("visual_tokens_scale", (p,), "float32"),
        ]
    return _with_pixels(meta, specs)


def output_shapes(meta: StoreMeta) -> dict[str, tuple[int, ...]]:
    """Per-slot shapes of the teacher outputs the store holds, as written and as read back in
    every mode (a compact store keeps smaller codes: `array_specs`)."""
    k, d, p = meta.num_keypoints, meta.token_dim, meta.num_patches
    wh, hh = meta.geometry.heatmap_size
    shapes = {"heatmaps": (k, hh, wh), "keypoint_tokens": (k, d), "visual_tokens": (p, d)}
    return {o: shapes[o] for o in meta.teacher_outputs}


def _label_specs(k: int) -> list[ArraySpec]:
    """The arrays every mode stores as they are: spec, ids, ground truth, crop digest."""
    return [
        ArraySpec("spec", (8,), "float64"),
        ArraySpec("instance", (), "int64", -1),
        ArraySpec("image_id", (), "int64", -1),
        ArraySpec("ann_id", (), "int64", -1),
        ArraySpec("keypoints", (k, 2), "float32"),
        ArraySpec("weights", (k,), "float32"),
        ArraySpec("crop_digest", (32,), "uint8"),
    ]


def _compact_specs(meta: StoreMeta) -> dict[str, ArraySpec]:
    """A compact store's arrays: the labels, then the codes and params of the module docstring."""
    k, p = meta.num_keypoints, meta.num_patches
    w, r, (gy, gx) = meta.compact()
    # with a grid: a joint's window codes, then its cells' (store.compact.HeatmapWindows)
    heatmaps = (k, w * w + gy * gx) if gy * gx else (k, w, w)
    specs = _label_specs(k) + [
        ArraySpec("heatmaps", heatmaps, "uint8", 0, ZSTD_LEVEL_CODES),
        ArraySpec("keypoint_tokens", (k, r), "int8"),
        ArraySpec("visual_tokens", (p, r), "int8"),
        ArraySpec("heatmaps_scale", (k, 7 if gy * gx else 5), "float32"),
        ArraySpec("keypoint_tokens_scale", (k,), "float16"),
        ArraySpec("visual_tokens_scale", (p,), "float16"),
    ]
    return _with_pixels(meta, specs)


def _with_pixels(meta: StoreMeta, specs: list[ArraySpec]) -> dict[str, ArraySpec]:
    """`specs` as array_specs returns them: pixels added where kept, absent outputs dropped."""
    if meta.pixels != "none":
        specs.append(ArraySpec(PIXELS, (), "bytes", b"", zstd_level=0))
    if meta.pixels == "canvas":
        specs.append(ArraySpec(CANVAS, (5,), "float64"))
    absent = set(TEACHER_OUTPUTS) - set(meta.teacher_outputs)  # and their scales
    return {s.name: s for s in specs if s.name.removesuffix("_scale") not in absent}


PIXELS = "pixels"  # the array of encoded crops (stores with pixels only)


@contextlib.contextmanager
def quiet_vlen_bytes() -> Iterator[None]:
    """Silence zarr-python's warning, on every metadata write of a variable-length bytes array,
    that the type is not in the v3 spec yet: the module docstring says it once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"The data type \(VariableLengthBytes", FutureWarning)
        yield


def stored_dtype(spec: ArraySpec) -> str:
    """The dtype zarr reports for an array of `spec` (variable-length bytes read as object)."""
    return "object" if spec.dtype == "bytes" else spec.dtype


# Fields a reader can return; "slot" and "view" are derived from the layout, never stored.
READ_FIELDS = (
    "slot",
    "view",
    "spec",
    "instance",
    "image_id",
    "ann_id",
    "keypoints",
    "weights",
    "crop_digest",
    "heatmaps",
    "keypoint_tokens",
    "visual_tokens",
)


def read_fields(meta: StoreMeta) -> tuple[str, ...]:
    """READ_FIELDS of a store made with `meta`: without the teacher outputs it lacks."""
    absent = set(TEACHER_OUTPUTS) - set(meta.teacher_outputs)
    return tuple(f for f in READ_FIELDS if f not in absent)


class StoreLayout:
    """Slot arithmetic: views -> blocks -> write units -> chunks (see the module docstring)."""

    def __init__(self, meta: StoreMeta) -> None:
        self.meta = meta
        self.n = int(meta.num_instances)
        self.unit_samples = meta.unit_samples
        self.chunk_samples = int(meta.chunk_samples)
        self.units_per_view = math.ceil(self.n / self.unit_samples)
        self.block_samples = self.units_per_view * self.unit_samples

    def num_slots(self, views: int) -> int:
        return views * self.block_samples

    def num_units(self, views: int) -> int:
        return views * self.units_per_view

    def unit_slots(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_samples
        return start, start + self.unit_samples

    def unit_view(self, unit: int) -> int:
        return unit // self.units_per_view

    def unit_valid(self, unit: int) -> int:
        """Number of real (non-padding) slots at the start of `unit`."""
        first = (unit % self.units_per_view) * self.unit_samples
        return max(0, min(self.unit_samples, self.n - first))

    def view_permutation(self, view: int) -> np.ndarray:
        # a canvas store keeps one person per slot position in every view (its canvas's slot)
        view = 0 if self.meta.pixels == "canvas" else int(view)
        return _permutation(int(self.meta.seed), view, self.n)

    def canvas_unit(self, unit: int) -> int:
        """The view-0 unit holding the canvases of write unit `unit` (a canvas store)."""
        return int(unit) % self.units_per_view

    def canvas_slots(self, start: int, stop: int) -> tuple[int, int]:
        """Slots [start, stop) of one view -> the view-0 slots holding their canvases; a range
        over several views is its own (the rows as stored: copies, whole-store checks)."""
        view = int(start) // self.block_samples
        if int(stop) > (view + 1) * self.block_samples:
            return int(start), int(stop)
        return int(start) - view * self.block_samples, int(stop) - view * self.block_samples

    def slot_instance(self, slot: int) -> tuple[int, int]:
        """(instance index, view) of a slot; instance -1 for padding."""
        view, j = divmod(int(slot), self.block_samples)
        inst = int(self.view_permutation(view)[j]) if j < self.n else -1
        return inst, view

    def unit_instances(self, unit: int) -> np.ndarray:
        """[unit_valid] instance index of each real slot of `unit`, in slot order."""
        view = self.unit_view(unit)
        first = (unit % self.units_per_view) * self.unit_samples
        return self.view_permutation(view)[first : first + self.unit_valid(unit)].copy()

    def unit_chunks(self, unit: int) -> list[tuple[int, int]]:
        """The (start, stop) slot ranges of `unit`'s chunks, clipped to its real slots."""
        start, _ = self.unit_slots(unit)
        end = start + self.unit_valid(unit)
        return [
            (a, min(a + self.chunk_samples, end)) for a in range(start, end, self.chunk_samples)
        ]

    def slot_views(self, slots: np.ndarray) -> np.ndarray:
        return np.asarray(slots, dtype=np.int64) // self.block_samples


@lru_cache(maxsize=64)
def _permutation(seed: int, view: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, view]).permutation(n)
    perm.flags.writeable = False
    return perm


def digest_rows(digests: object) -> np.ndarray:
    """A batch's crop digests as the store keeps them: n 32-byte `crop_digest`s (a list) ->
    uint8 [n, 32]; an array is passed on as it is (the writer checks its shape)."""
    if not isinstance(digests, list | tuple):
        return digests
    rows = list(digests)
    for i, d in enumerate(rows):
        if not isinstance(d, bytes | bytearray) or len(d) != 32:
            raise StoreFormatError(
                f"crop_digest[{i}] is {d!r:.80}; expected the 32-byte sha256 of crop_digest()"
            )
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 32)


def check_chunk_layout(store: str, name: str, array: object, spec: ArraySpec, meta: StoreMeta):
    """Refuse an array whose chunks or shards are not the metadata's layout (chunk_samples
    slots per chunk, shard_chunks chunks per shard = write unit): an edited zarr.json, whose
    reads would fail their checksums and whose writes would break units apart."""
    chunks = (int(meta.chunk_samples), *spec.shape)
    shards = (int(meta.unit_samples), *spec.shape)
    have = tuple(array.chunks), tuple(array.shards or array.chunks)
    if have != (chunks, shards):
        raise StoreFormatError(
            f"{store}: array '{name}' has chunks {list(have[0])} in shards {list(have[1])}; the "
            f"store metadata's layout (chunk_samples {meta.chunk_samples}, shard_chunks "
            f"{meta.shard_chunks}) needs chunks {list(chunks)} in shards {list(shards)} (was "
            "its zarr.json edited?)"
        )


def rows_crc32c(rows: np.ndarray) -> int:
    """The chunk fingerprint of a marker's `chunk_crc32c`: crc32c of decoded rows [n, ...] as
    stored (C order); for variable-length bytes (pixels), of each row's 4-byte little-endian
    length and bytes in turn."""
    import google_crc32c

    if rows.dtype != object:
        return int(google_crc32c.value(np.ascontiguousarray(rows)))
    crc = 0
    for b in rows:
        crc = google_crc32c.extend(crc, len(b).to_bytes(4, "little"))
        crc = google_crc32c.extend(crc, bytes(b))
    return int(crc)
