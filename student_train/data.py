"""Student training batches: the teacher's targets and the crop's pixels from the store.

A store with pixels (`dump-teacher --pixels jpeg|lossless`, the default) keeps each crop as the
teacher saw it: DataLoader workers read it with the targets and decode it (CPU), or, on CUDA
with JPEG pixels, hand the JPEG bytes to the main process, which decodes the batch on the GPU
(`torchvision.io.decode_jpeg(device="cuda")`) and normalizes it there. No image folder, no
annotation file and no image cache are needed. A store without pixels (`--pixels none`, or
schema version 1) keeps each sample's crop spec (instance, view, centre, scale, rotation, flip):
workers read the image, replay the spec with `render_crop` and normalize it. Either way the
student sees exactly the pixels the teacher saw when the store was written (the crop digest
proves it; a GPU JPEG decode may differ by a few levels in a few pixels, see store/pixels.py).
On CUDA, workers ship uint8 crops and the GPU normalizes them: 4x less to copy.

Views and epochs: a store holds V views (augmentations) of every instance, and epoch e (0-based)
reads view `e mod V` (`view_for_epoch`). With V = 1 every epoch replays the same augmentation;
with V >= epochs every epoch sees a fresh one. Within an epoch the store's chunk-shuffled reader
orders the samples, seeded by (seed, epoch), so a run is reproducible for any number of workers.

Several processes (DDP under torchrun, R ranks, `batch_size` B per rank): the epoch's order is
planned for the global batch R x B, exactly as one process with batch R x B would plan it, and
rank r trains on slice r of every global batch (`distilpose.training.distributed.rank_share`).
So the global batches, and with the trainer's global normalisers the run, do not depend on R; every
sample is trained exactly once per epoch across all ranks (a short last batch is spread over
the ranks, padded with a `valid = False` row only where a rank would get nothing); every rank
takes ceil(N / (R x B)) steps. DataLoader worker w of W takes global batches w, w + W, ... and
the loader interleaves workers round-robin, so a rank sees its slices in the global order.

Online mode (`online=True`, the official method, kept for comparison): the same samples in the
same order, but the spec is re-sampled with `sample_crop_spec(instance, recipe, store_seed, view)`
and no teacher target is read; the trainer's task runs the teacher on each batch instead. Both
modes therefore feed identical pixels for the same epoch. Without a store (`OnlineSource`) the
instances come from the annotation file and each epoch draws a fresh view.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distilpose.data import (
    AugmentRecipe,
    CropSpec,
    PersonInstance,
    crop_digest,
    load_coco_instances,
    normalize,
    normalize_rgb,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.data.codecs import RegressionCodec
from distilpose.device import resolve_device
from distilpose.errors import (
    BadConfigError,
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from distilpose.geometry import Geometry
from distilpose.training.distributed import rank_rows, world
from distilpose.training.losses import LOSS_NAMES, LOSS_TERMS
from store import StoreReader
from store.pixels import CPU_JPEG_DECODER, decode_rgb_batch, decode_rgb_crops
from store.reader import load_store_instances
from store.schema import CANVAS, JPEG_DECODER, OUTPUT_WORDS, PIXELS, TEACHER_OUTPUTS

log = logging.getLogger("distilpose.train")

TOKEN_FIELDS = ("keypoint_tokens", "visual_tokens")
# Always read: where the sample comes from (its slot names it in errors) and its target.
INDEX_FIELDS = ("slot", "spec", "instance", "view", "keypoints", "weights")


def view_for_epoch(epoch: int, views: int) -> int:
    """The cached view epoch `epoch` (0-based) trains on: `epoch mod views`."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    return epoch % views


def check_targets(
    losses: Iterable[str], outputs: Sequence[str], teacher_name: str, student: object
) -> None:
    """Refuse, by name, a loss term whose target the teacher's `outputs` lack (a store of a
    teacher without tokens) or whose output the student lacks (DeepPose has no tokens)."""
    for name in losses:
        for f in _term_targets(name):
            if f not in outputs:
                raise BadConfigError(
                    f"{name} needs {OUTPUT_WORDS[f]}; this store's teacher ({teacher_name}) "
                    "has none"
                )
            if f in TOKEN_FIELDS and not student.has_tokens:
                raise BadConfigError(
                    f"{name} needs {OUTPUT_WORDS[f]}; the student ({student.name}) has none"
                )


def _term_targets(name: str) -> tuple[str, ...]:
    """The store arrays a loss term reads (the loss table's `targets`; a reg-only run reads no
    teacher output at all)."""
    return LOSS_TERMS[name].targets if name in LOSS_TERMS else ()


def target_fields(losses: Iterable[str]) -> tuple[str, ...]:
    """Teacher arrays the given loss terms need, in a stable order."""
    fields: list[str] = []
    for name in losses:
        for f in _term_targets(name):
            if f not in fields:
                fields.append(f)
    return tuple(fields)


class ImageCache:
    """A per-worker LRU of decoded images bounded by bytes: many crops share one image."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, path: str) -> np.ndarray:
        image = self._items.get(path)
        if image is not None:
            self._items.move_to_end(path)
            self.hits += 1
            return image
        self.misses += 1
        image = read_image(path)
        if image.nbytes <= self.max_bytes:
            self._items[path] = image
            self.bytes += image.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes
        return image


# What a worker hands the main process as the crops: normalized floats (CPU runs), uint8 RGB
# crops or JPEG bytes (CUDA runs; `OnDevice` decodes and normalizes them on the GPU).
OUTPUTS = ("images", "crops", "jpeg")


@dataclass
class CropRenderer:
    """Turns one raw batch of store rows into training tensors (runs in DataLoader workers).

    raw: "instance" [B] and either "spec" [B, 8] (store mode) or "view" [B] (online mode), plus
    "keypoints" [B, K, 2] crop px and "weights" [B, K] in store mode, "pixels" [B] (encoded
    crops) when the store has them, and any teacher arrays.
    output: "images" -> "images" [B, 3, H, W] float32 normalized; "crops" -> "crops" uint8 RGB
    [B, 3, H, W]; "jpeg" (JPEG pixel stores) -> "jpeg" uint8 [total bytes] and "jpeg_sizes" [B].
    """

    instances: Sequence[PersonInstance]
    geometry: Geometry  # of the store (or of the student, online): its crop size is rendered
    online_recipe: AugmentRecipe | None = None  # set: re-sample specs (online mode)
    online_seed: int = 0
    cache_bytes: int = 256 << 20
    store_path: str = ""  # for error messages
    pixels: str = "none"  # the store's pixel format; "none": render from the images
    output: str = "images"
    decoder: str = ""  # CPU JPEG decoder ("": store.pixels.CPU_JPEG_DECODER)

    def __post_init__(self) -> None:
        self.codec = RegressionCodec(self.geometry)
        self.input_size = self.geometry.input_size
        self.cache = ImageCache(self.cache_bytes)
        if self.output not in OUTPUTS or (self.output == "jpeg" and self.pixels != "jpeg"):
            raise ValueError(f"output '{self.output}' with pixels '{self.pixels}'")

    def spec_for(self, raw: dict, i: int) -> CropSpec:
        if self.online_recipe is None:
            return CropSpec.from_array(np.asarray(raw["spec"][i], dtype=np.float64))
        inst = self.instances[int(raw["instance"][i])]
        view = int(raw["view"][i])
        return sample_crop_spec(inst, self.online_recipe, self.online_seed, view, self.input_size)

    def __call__(self, raw: dict, verify: bool = False) -> dict[str, torch.Tensor]:
        index = np.asarray(raw["instance"], dtype=np.int64)
        stored = self.online_recipe is None and PIXELS in raw
        unread = self.unread(raw)
        if unread.any():  # counts in no loss; "valid" says so to every term
            raw = {**raw, "valid": np.asarray(raw.get("valid", True), dtype=bool) & ~unread}
        pixels = (
            self._stored_pixels(raw, verify, unread)
            if stored
            else self._rendered(raw, verify, unread)
        )
        rendered = pixels.pop("_targets", None)  # (keypoints, weights) of re-rendered crops
        if self.online_recipe is None:  # the store's targets, as the teacher's run saw them
            kpts, vis = raw["keypoints"], raw["weights"]
        else:
            kpts, vis = np.stack([k for k, _ in rendered]), np.stack([w for _, w in rendered])
        coords, weights = self.codec.encode(kpts, vis)  # the whole batch at once
        batch = {
            **pixels,  # "images", "crops" or "jpeg" + "jpeg_sizes"
            "coords": torch.from_numpy(coords),  # [B, K, 2]
            "weights": torch.from_numpy(weights),  # [B, K]
            "instance": torch.from_numpy(index),  # [B]
        }
        if "slot" in raw:  # where each sample lives, for the GPU decoder's errors
            batch["slot"] = torch.from_numpy(np.asarray(raw["slot"], dtype=np.int64))  # [B]
        if "view" in raw:
            batch["view"] = torch.from_numpy(np.asarray(raw["view"], dtype=np.int64))  # [B]
        if "valid" in raw:  # DDP padding rows count in no loss
            batch["valid"] = torch.from_numpy(np.asarray(raw["valid"], dtype=bool))  # [B]
        if self.online_recipe is None:
            for name in TEACHER_OUTPUTS:
                if name in raw:  # stored as fp16 (or decoded lossy): train in fp32
                    t = torch.from_numpy(np.asarray(raw[name]))
                    # torch's half -> float is ~5x numpy's (it was a third of a pixel-store
                    # worker's time); CUDA runs ship half floats and cast on the GPU
                    batch[name] = t.float() if self.output == "images" else t
        return batch

    def unread(self, raw: dict) -> np.ndarray:
        """bool [B]: rows of samples the dump could not read (zero keypoint weights and an
        all-zero crop digest, its mark in every schema). The reader leaves the ones schema 3
        records out of batches; this catches the rest (schema 2, a batch of them only)."""
        n = len(raw["instance"])
        if self.online_recipe is not None or "crop_digest" not in raw:
            return np.zeros(n, dtype=bool)
        weights = np.asarray(raw["weights"]).reshape(n, -1)
        return ~weights.any(1) & ~np.asarray(raw["crop_digest"]).reshape(n, -1).any(1)

    def _rendered(self, raw: dict, verify: bool, unread: np.ndarray | None = None) -> dict:
        """Crops re-rendered from the images (stores without pixels, online mode); `unread`
        rows (images the dump could not read) get a black crop, their image is not read."""
        crops, targets = [], []
        for i, idx in enumerate(np.asarray(raw["instance"], dtype=np.int64)):
            inst = self.instances[int(idx)]
            if unread is not None and unread[i]:
                w, h = self.input_size
                crops.append(np.zeros((h, w, 3), np.uint8))
                k = len(inst.keypoints)
                targets.append((np.zeros((k, 2), np.float32), np.zeros(k, np.float32)))
                continue
            spec = self.spec_for(raw, i)
            image = self.cache.get(inst.image_path)
            crop = render_crop(image, spec, inst.keypoints, self.input_size)
            if verify and "crop_digest" in raw:
                if crop_digest(crop.image) != raw["crop_digest"][i].tobytes():
                    raise StoreMismatchError(
                        f"{self.store_path}: sample of instance {int(idx)} (image "
                        f"{inst.image_path}) renders to another crop than the teacher saw; "
                        "expected the store's images and annotation file unchanged"
                    )
            crops.append(crop.image)
            targets.append((crop.keypoints, crop.weights))
        return {**self._bgr_output(np.stack(crops)), "_targets": targets}

    def _bgr_output(self, stack: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 BGR crops [B, H, W, 3] -> "images" (normalized floats) or "crops" (uint8 RGB
        [B, 3, H, W])."""
        if self.output == "images":
            return {"images": normalize(stack)}
        rgb = np.ascontiguousarray(stack[..., ::-1].transpose(0, 3, 1, 2))
        return {"crops": torch.from_numpy(rgb)}

    def _canvas_crops(self, raw: dict, verify: bool, unread: np.ndarray | None = None) -> dict:
        """A canvas store's crops: each person's stored canvas decoded (OpenCV, the dump's
        decoder) and warped by the sample's spec, as the dump warped it for the teacher."""
        from store.pixels import canvas_crop

        crops = []
        for i, data in enumerate(raw[PIXELS]):
            if unread is not None and unread[i]:  # no crop was seen: black, in no loss
                crops.append(np.zeros((self.input_size[1], self.input_size[0], 3), np.uint8))
                continue
            try:
                crop = canvas_crop(data, raw[CANVAS][i], raw["spec"][i], self.input_size)
            except ValueError as e:
                raise StoreCorruptError(
                    f"{self.store_path}: {_sample(raw, i)}: {e}; expected the canvas view 0 "
                    "stored (run store-verify)"
                ) from None
            if verify and crop_digest(crop) != raw["crop_digest"][i].tobytes():
                raise StoreMismatchError(
                    f"{self.store_path}: {_sample(raw, i)} warps from its stored canvas to other "
                    "pixels than the teacher saw; expected an undamaged store (run store-verify)"
                )
            crops.append(crop)
        return self._bgr_output(np.stack(crops))

    def _stored_pixels(self, raw: dict, verify: bool, unread: np.ndarray | None = None) -> dict:
        """The store's encoded crops: JPEG bytes passed on, or decoded here (CPU)."""
        if self.pixels == "canvas":
            return self._canvas_crops(raw, verify, unread)
        datas = list(raw[PIXELS])
        if self.output == "jpeg":  # one buffer: one shared-memory handle per batch, not B
            sizes = torch.tensor([len(d) for d in datas], dtype=torch.int64)
            flat = torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8)
            return {"jpeg": flat, "jpeg_sizes": sizes}
        try:
            rgb = decode_rgb_crops(datas, self.pixels, self.input_size, self.decoder)
        except Exception as e:  # noqa: BLE001 - a damaged crop: find it and name its slot
            raise undecodable_crop(self.store_path, self.pixels, self.input_size, raw, e) from None
        if verify and "crop_digest" in raw:
            for i, crop in enumerate(rgb):  # [3, H, W] RGB each
                if unread is not None and unread[i]:
                    continue  # no crop was seen: nothing to compare
                # the digest's layout (BGR [H, W, 3]): torchvision's decoder returns an
                # [H, W, 3] buffer seen as [3, H, W], so this is one channel swap (0.01 ms a
                # crop; cv2.merge of the planes 0.06, a flipped contiguous copy 0.21)
                hwc = np.ascontiguousarray(crop.permute(1, 2, 0).numpy())
                bgr = cv2.cvtColor(hwc, cv2.COLOR_RGB2BGR)
                if crop_digest(bgr) != raw["crop_digest"][i].tobytes():
                    self._digest_mismatch(raw, i, datas[i])
                    return self._stored_pixels(raw, verify, unread)  # with the store's decoder
        if self.output == "images":
            return {"images": normalize_rgb(rgb)}
        return {"crops": torch.stack(rgb)}

    def _digest_mismatch(self, raw: dict, i: int, data: bytes) -> None:
        """Row i's decoded crop is not the one whose digest the store holds. Decoded with the
        store's own decoder (`pixel_decoder`, OpenCV: the dump's) it is: this worker's decoder
        differs (another libjpeg build); it decodes with the store's from now on, a warning
        said once. It is not: the crop is damaged (StoreMismatchError)."""
        from store.pixels import decode_crop

        if self.pixels == "jpeg" and self.decoder != JPEG_DECODER:
            try:
                bgr = decode_crop(data, self.pixels, self.input_size)
            except ValueError:
                bgr = None
            if bgr is not None and crop_digest(bgr) == raw["crop_digest"][i].tobytes():
                log.warning(
                    f"{self.store_path}: {CPU_JPEG_DECODER} decodes the stored JPEG crops to "
                    f"other pixels than {JPEG_DECODER}, whose pixels the teacher saw; decoding "
                    f"them with {JPEG_DECODER} (exact, a little slower)"
                )
                self.decoder = JPEG_DECODER
                return
        raise StoreMismatchError(
            f"{self.store_path}: the stored crop of instance {int(raw['instance'][i])} decodes "
            "to other pixels than the teacher saw (also with the dump's decoder "
            f"{JPEG_DECODER}); expected an undamaged store (run store-verify)"
        )


def _sample(raw: dict, i: int) -> str:
    """'slot S (instance I)' of row i of a raw batch, for messages."""
    slot = f"slot {int(raw['slot'][i])} " if "slot" in raw else ""
    return f"{slot}(instance {int(raw['instance'][i])})"


def _crop_format(head: bytes) -> str | None:
    """The pixel format whose magic number starts a stored crop (JPEG SOI, zstd frame)."""
    if head[:2] == b"\xff\xd8":
        return "jpeg"
    return "lossless" if head == b"\x28\xb5\x2f\xfd" else None


def undecodable_crop(
    store: str, pixels: str, input_size: tuple[int, int], raw: dict, error: Exception
) -> StoreFormatError:
    """The error for a batch of stored crops that failed to decode, naming the first crop
    that fails alone (its bytes passed their crc32c: they were written damaged, or edited)."""
    datas = list(raw[PIXELS])
    bad = None
    for i, data in enumerate(datas):
        try:
            decode_rgb_batch([data], pixels, input_size)
        except Exception as e:  # noqa: BLE001 - any decoder error means this crop
            bad, error = i, e
            break
    if bad is None:
        what, size, held = f"one of slots {list(raw.get('slot', []))}", "", None
    else:
        what, size = _sample(raw, bad), f" of {len(datas[bad])} bytes"
        held = _crop_format(bytes(datas[bad][:4]))
    if held not in (None, pixels):  # intact bytes of another format: the metadata is wrong
        return StoreFormatError(
            f"{store}: array 'pixels' {what} holds a {held} crop, but the store metadata says "
            f"pixels '{pixels}'; expected the metadata the dump wrote (was zarr.json edited?)"
        )
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return StoreCorruptError(
        f"{store}: array 'pixels' {what}: the stored {pixels} crop{size} does not decode "
        f"({reason}); expected an undamaged store (run store-verify --all; restore it from a "
        "copy or rerun the dump)"
    )


def decode_on_device(batch: dict, device: torch.device, store: str = "") -> dict:
    """A worker's batch -> model-ready: crops or JPEG bytes decoded and normalized on `device`."""
    if "jpeg" in batch:
        from torchvision.io import ImageReadMode, decode_jpeg

        sizes = batch.pop("jpeg_sizes").tolist()
        parts = list(torch.split(batch.pop("jpeg"), sizes))
        try:
            decoded = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)
        except Exception as e:  # noqa: BLE001 - name the crop, found by decoding one at a time
            raw = {PIXELS: [p.numpy().tobytes() for p in parts], "instance": batch["instance"]}
            raw |= {"slot": batch["slot"]} if "slot" in batch else {}
            # torchvision's CPU decoder finds the crop (it takes no crop size)
            raise undecodable_crop(store, "jpeg", (0, 0), raw, e) from None
        batch["images"] = normalize_rgb(torch.stack(decoded))
    elif "crops" in batch:
        batch["images"] = normalize_rgb(batch.pop("crops").to(device, non_blocking=True))
    for name in TEACHER_OUTPUTS:
        if name in batch:
            batch[name] = batch[name].to(device, non_blocking=True).float()
    return batch


class OnDevice:
    """Batches of a DataLoader made model-ready on `device` in the main process (CUDA runs)."""

    def __init__(self, loader: DataLoader, device: torch.device, store: str = "") -> None:
        self.loader, self.device, self.store = loader, device, store

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield decode_on_device(batch, self.device, self.store)


def choose_output(pixels: str, device: torch.device, decode: str) -> str:
    """What workers hand over: floats on a CPU run; on CUDA uint8 crops, or JPEG bytes for the
    GPU's decoder (`decode` auto/gpu with JPEG pixels)."""
    if decode not in ("auto", "gpu", "cpu"):
        raise BadConfigError(f"decode '{decode}': expected auto, gpu or cpu")
    if device.type != "cuda":
        if decode == "gpu":
            raise BadConfigError(f"decode 'gpu' on device {device}; expected a CUDA device")
        return "images"
    return "jpeg" if pixels == "jpeg" and decode in ("auto", "gpu") else "crops"


class _RenderedBatches(IterableDataset):
    """Wraps a worker-aware source of raw batches and renders each in the worker.

    verify: check every rendered crop against its stored digest (a store dumped from other
    images or annotations, or a damaged digest, fails at once instead of training on noise;
    a sha256 per crop costs about 1% of rendering it). The store reader itself checks every
    chunk it reads (crc32c, shard manifest, layout, finite values).
    """

    def __init__(
        self, source: Iterable[dict], renderer: CropRenderer, verify: bool = False
    ) -> None:
        super().__init__()
        self.source = source
        self.renderer = renderer
        self.verify = verify

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[dict]:
        for raw in self.source:
            yield self.renderer(raw, verify=self.verify)


def _worker() -> tuple[int, int]:
    """(index, count) of this DataLoader worker: worker w takes global batches w, w + W, ..."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _global_batches(num_samples: int, batch_size: int) -> int:
    """Steps per epoch on every rank: global batches of world_size x batch_size, tail kept."""
    return math.ceil(num_samples / (batch_size * world()[1]))


class _StoreSource(IterableDataset):
    """One epoch of raw store batches for this rank and worker.

    Uses `StoreReader.iter_batches(part=..., rank=...)` rather than `StoreDataset`'s per-worker
    chunk split, so the global batches depend only on (view, seed, epoch, R x B) and never on
    the number of workers (a run resumed with other `workers` stays exact) or of ranks. The
    cost: a chunk may be read by several workers and ranks.
    """

    def __init__(
        self,
        store: str,
        view: int,
        batch_size: int,
        seed: int,
        epoch: int,
        fields: tuple[str, ...],
        allow_incomplete: bool,
        num_batches: int,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.store, self.view, self.batch_size = store, view, batch_size
        self.storage_options = storage_options
        self.seed, self.epoch, self.fields = seed, epoch, fields
        self.allow_incomplete = allow_incomplete
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        rank, nranks, _ = world()
        yield from StoreReader.open(self.store, self.storage_options).iter_batches(
            self.view,
            self.batch_size * nranks,  # the global batch
            self.seed,
            self.epoch,
            allow_incomplete=self.allow_incomplete,
            fields=self.fields,
            part=_worker(),
            rank=(rank, nranks),
        )


class _OnlineSource(IterableDataset):
    """Store-less online mode: a seeded permutation of all instances per epoch, view = epoch."""

    def __init__(self, num_instances: int, batch_size: int, seed: int, epoch: int) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed, self.epoch = num_instances, batch_size, seed, epoch

    def __len__(self) -> int:
        return _global_batches(self.n, self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        rank, nranks, _ = world()
        w, nw = _worker()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        step = self.batch_size * nranks  # the global batch, cut into rank slices
        for start in range(w * step, self.n, nw * step):
            idx, valid = rank_rows(order[start : start + step], rank, nranks)
            raw = {"instance": idx, "view": np.full(len(idx), self.epoch, dtype=np.int64)}
            yield raw if nranks == 1 else {**raw, "valid": valid}


class StudentBatches:
    """`epoch -> batches`, the iterable factory `distilpose.training.engine.Trainer` takes.

    Batches: "images" [B, 3, H, W] float32 normalized, "coords" [B, K, 2] normalized crop
    coordinates, "weights" [B, K], "instance" [B], and in store mode the teacher targets the
    losses need: "heatmaps" [B, K, Hh, Wh], "keypoint_tokens" [B, K, D], "visual_tokens" [B, P, D].
    """

    def __init__(
        self,
        store: str | Path,
        *,
        batch_size: int,
        seed: int = 0,
        workers: int = 2,
        losses: Iterable[str] = LOSS_NAMES,
        online: bool = False,
        ann_file: str | None = None,
        images: str | None = None,
        verify_digest: bool = True,
        allow_incomplete: bool = False,
        cache_mb: int = 256,
        pin_memory: bool = False,
        device: str | torch.device = "cpu",
        decode: str = "auto",
        storage_options: dict | None = None,
        views: int | None = None,
    ) -> None:
        self.store = str(store)
        self.storage_options = storage_options  # fsspec options of a remote store
        self.reader = StoreReader.open(self.store, storage_options)
        self.meta = self.reader.meta
        self.device = resolve_device(device) if isinstance(device, str) else device
        # a store with pixels needs neither images nor annotations (online mode re-renders)
        self.pixels = "none" if online else self.meta.pixels
        output = choose_output(self.pixels, self.device, decode) if not online else "images"
        # the complete views (a dump adding views leaves the old ones trainable); all of them
        # with allow_incomplete (their complete units)
        complete = self.reader.complete_views()
        self.view_ids = list(range(self.meta.views)) if allow_incomplete else complete
        if not self.view_ids:
            raise StoreFormatError(
                f"{self.store}: no view of the store is complete{self.reader.unsigned_note()}; "
                "expected a finished dump (resume it), or --allow-incomplete to train on its "
                "complete units"
            )
        if views is not None:  # the first N views, each complete
            missing = [v for v in range(views) if v not in complete]
            if missing and not allow_incomplete:
                raise StoreFormatError(
                    f"{self.store}: views: the first {views} asked for, and view(s) {missing} are "
                    "not complete; expected complete views (resume the dump, or fewer views)"
                )
            self.view_ids = list(range(views))
        self.views = len(self.view_ids)
        self.batch_size, self.seed, self.workers = batch_size, seed, workers
        self.online = online
        # the crop digest also marks the samples the dump could not read (all zero)
        self.fields = INDEX_FIELDS + (("crop_digest",) if not online else ())
        if not online:
            self.fields += target_fields(losses)
        if self.pixels != "none":  # (a canvas store's reader adds their geometry)
            self.fields += (PIXELS,)
        self.allow_incomplete = allow_incomplete
        self.pin_memory = pin_memory
        self.instances = (
            load_store_instances(self.meta, self.store, ann_file, images)
            if self.pixels == "none"
            else []
        )
        self.renderer = CropRenderer(
            self.instances,
            self.meta.geometry,
            online_recipe=AugmentRecipe.from_dict(self.meta.recipe) if online else None,
            online_seed=int(self.meta.seed),
            cache_bytes=cache_mb << 20,
            store_path=self.store,
            pixels=self.pixels,
            output=output,
        )
        self.verify_digest = verify_digest and not online

    def __len__(self) -> int:
        """Batches per epoch on this rank: the global batches (the last one may be short)."""
        return _global_batches(self.meta.num_instances, self.batch_size)

    def view(self, epoch: int) -> int:
        return self.view_ids[view_for_epoch(epoch, self.views)]

    def skipped(self) -> int:
        """Samples of the training views the dump could not read (left out of every loss)."""
        slots = np.fromiter(self.reader.skipped_slots(), dtype=np.int64)
        return int(np.isin(self.reader.layout.slot_views(slots), self.view_ids).sum())

    def dataset(self, epoch: int) -> IterableDataset:
        source = _StoreSource(
            self.store,
            self.view(epoch),
            self.batch_size,
            self.seed,
            epoch,
            self.fields,
            self.allow_incomplete,
            len(self),
            self.storage_options,
        )
        return _RenderedBatches(source, self.renderer, verify=self.verify_digest)

    def __call__(self, epoch: int) -> DataLoader | OnDevice:
        loader = DataLoader(
            self.dataset(epoch),
            batch_size=None,  # the store reader batches; workers render whole batches
            num_workers=self.workers,
            pin_memory=self.pin_memory,
        )
        return (
            loader
            if self.renderer.output == "images"
            else OnDevice(loader, self.device, self.store)
        )


class OnlineBatches:
    """Store-less online mode: batches from the annotation file, a fresh view each epoch."""

    def __init__(
        self,
        ann_file: str,
        images: str,
        *,
        batch_size: int,
        geometry: Geometry,
        recipe: AugmentRecipe | None = None,
        seed: int = 0,
        workers: int = 2,
        cache_mb: int = 256,
        pin_memory: bool = False,
    ) -> None:
        w, h = geometry.input_size
        self.instances = load_coco_instances(ann_file, images, train=True, aspect_ratio=w / h)
        self.batch_size, self.seed, self.workers = batch_size, seed, workers
        self.pin_memory = pin_memory
        self.renderer = CropRenderer(
            self.instances,
            geometry,
            online_recipe=recipe or AugmentRecipe(),
            online_seed=seed,
            cache_bytes=cache_mb << 20,
        )

    def __len__(self) -> int:
        return _global_batches(len(self.instances), self.batch_size)

    def __call__(self, epoch: int) -> DataLoader:
        source = _OnlineSource(len(self.instances), self.batch_size, self.seed, epoch)
        return DataLoader(
            _RenderedBatches(source, self.renderer),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
        )
