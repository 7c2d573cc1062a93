"""A run is one typed object: `TeacherRun`, `DumpRun`, `StudentRun` (torchtitan style).

Each holds exactly the parameters of one stage run; `train_teacher(run)`, `dump_teacher(run)`
and `train_student(run)` take it. The CLI, `ablate`, the demo and the benchmarks build one and
pass it on. A training run saves its object under "run" in the run directory's `config.json`;
`--resume` reads it back (`saved_run`), so a resumed run is the run that was started, with only
the options given again on top.

    run = StudentRun("teacher_store", "distilpose_s", "runs/s", epochs=300)
    StudentRun.from_json(run.to_json()) == run  # plain JSON: paths as str, tuples as lists

Reading is strict: an unknown field or a missing required one is one `BadConfigError` line,
and so is a value of the wrong type or out of range (`check_field`: epochs="ten",
batch_size=0, lr=nan, an integer beyond int64), whether it came from a config file, JSON or
Python.
"""

from __future__ import annotations

import functools
import json
import math
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from distilpose.data.crop import AugmentRecipe
from distilpose.errors import BadConfigError
from distilpose.limits import load_json, loads_json

R = TypeVar("R", bound="_Run")

INT64_MAX = 2**63 - 1  # torch, numpy and the checkpoint keep counters as int64
# Range of each bounded field (inclusive lower bound, or "> 0" for floats), one table for all runs.
AT_LEAST_1 = ("epochs", "batch_size", "log_every", "views", "chunk_samples", "shard_chunks",
              "val_every", "accum_steps", "jpeg_quality")  # fmt: skip
AT_LEAST_0 = ("workers", "warmup_iters", "seed", "ckpt_every_steps", "max_instances")
POSITIVE = ("lr",)  # finite and > 0
CHOICES = {
    "lr_scale": ("linear", "none"),
    "amp_dtype": ("auto", "bf16", "fp16"),
    "schedule": ("step", "cosine"),
    "decode": ("auto", "gpu", "cpu"),
}


def _type_name(kind: object) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if kind in names:
        return names[kind]
    return getattr(kind, "__name__", str(kind))


def _fits(value: object, kind: object) -> bool:
    """Whether `value` (as normalised by `_Run.__post_init__`) has the annotated type `kind`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # True is an int in Python, not an epoch count
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(kind)
        return (
            isinstance(value, tuple)
            and len(value) == len(args)
            and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        )
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    return isinstance(value, kind) if isinstance(kind, type) else True


@functools.cache
def _hints(kind: type) -> dict[str, object]:
    return typing.get_type_hints(kind)


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: an error line stays one short line, whatever
    a config file put in the field."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_field(kind: type, name: str, value: object) -> None:
    """One BadConfigError line if `value` is not a valid `kind.name` (type, then range)."""
    expected = _hints(kind)[name]
    if not _fits(value, expected):
        options = [a for a in typing.get_args(expected) if a is not type(None)] or [expected]
        what = " or ".join(_type_name(a) for a in options)
        none = " (or null)" if type(None) in typing.get_args(expected) else ""
        raise BadConfigError(
            f"{kind.__name__}.{name}: got {shown(value)} ({type(value).__name__}); "
            f"expected {what}{none}"
        )
    problem = _range_problem(name, value)
    if problem:
        raise BadConfigError(f"{kind.__name__}.{name}: got {shown(value)}; expected {problem}")


def _range_problem(name: str, value: object) -> str | None:
    """What `value` should be when it is out of `name`'s range, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return f"an integer within int64 (at most {INT64_MAX})"
    if value is None:
        return None
    if name in AT_LEAST_1 and value < 1:
        return "an integer of at least 1"
    if name in AT_LEAST_0 and value < 0:
        return "an integer of at least 0"
    if name in POSITIVE and not (math.isfinite(value) and value > 0):
        return "a finite number > 0"
    if name == "input_jitter" and not (math.isfinite(value) and 0 <= value <= 1):
        return "a strength from 0 (off) to 1"
    if name == "ema" and not (math.isfinite(value) and 0 < value < 1):
        return "a decay between 0 and 1 (e.g. 0.9999), or null for no EMA"
    if name in CHOICES and value not in CHOICES[name]:
        return f"one of {', '.join(CHOICES[name])}"
    return None


@dataclass
class _Run:
    """Shared by the three run types: normalisation, JSON form, strict reading, comparison."""

    def __post_init__(self) -> None:
        # One form per value, so a run equals itself read back from JSON.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))
            elif isinstance(value, list):
                setattr(self, f.name, tuple(value))
            elif isinstance(value, dict) and f.name == "recipe":
                setattr(self, f.name, AugmentRecipe.from_dict(value))
            elif isinstance(value, dict):
                setattr(
                    self,
                    f.name,
                    {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()},
                )
        for f in fields(self):  # after normalising: a Path is a str, a list a tuple
            check_field(type(self), f.name, getattr(self, f.name))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the recipe as its dict, tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls: type[R], data: object, source: str = "") -> R:
        """The run `data` describes; one error line naming `source` and the bad fields."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise BadConfigError(
                f"{where}expected a {cls.__name__} object, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        unknown, missing = sorted(set(data) - known), sorted(required - set(data))
        if unknown or missing:
            problems = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"missing field(s) {', '.join(missing)}"] if missing else []
            raise BadConfigError(
                f"{where}{'; '.join(problems)} for {cls.__name__}; "
                f"expected fields among {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls: type[R], text: str | bytes, source: str = "") -> R:
        return cls.from_dict(loads_json(text, source or cls.__name__, BadConfigError), source)

    def replace(self: R, **changes: Any) -> R:
        return replace(self, **changes)


@dataclass
class TeacherRun(_Run):
    """`train_teacher`: fit a heatmap teacher on a COCO keypoints file (teacher_dump.train)."""

    model: str
    ann_file: str
    image_root: str
    out_dir: str
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup_iters: int = 500
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    workers: int = 2
    resume: bool = False
    model_overrides: dict | None = None
    max_instances: int | None = None
    recipe: AugmentRecipe | None = None  # None: the teacher recipe (TEACHER_RECIPE)
    log_every: int = 20
    sync_bn: bool = True
    val_ann: str | None = None  # COCO keypoints file to validate on; None: no validation
    val_images: str | None = None  # its image folder
    val_dets: str | None = None  # person detections for validation; None: ground-truth boxes
    val_every: int = 10  # epochs between validations (MMPose: interval=10); the last always
    ema: float | None = None  # EMA decay of the weights (timm: 0.9998); validated and in best.pth
    accum_steps: int = 1  # batches per optimizer step (gradient accumulation)
    lr_scale: str = "none"  # "linear": lr x global batch / 512 (the paper's 8 GPUs x 64)
    backbone_weights: str | None = None  # ImageNet backbone (torchvision/timm keys) to start from


@dataclass
class DumpRun(_Run):
    """`dump_teacher`: the teacher's outputs on seeded crops into a store (teacher_dump.dump)."""

    teacher_ckpt: str
    ann_file: str
    image_root: str
    out: str
    views: int = 1
    seed: int = 0
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    shard: tuple[int, int] = (0, 1)
    model: str | None = None
    mode: str = "fp16"
    chunk_samples: int | None = None  # None: store.schema.default_layout(mode)
    shard_chunks: int | None = None  # None: store.schema.default_layout(mode)
    max_instances: int | None = None
    recipe: AugmentRecipe | None = None  # None: the paper's student recipe
    pixels: str = "auto"  # store.pixels.PIXEL_CHOICES: canvas from 3 views on, else jpeg
    jpeg_quality: int | None = None  # None: the store's default (store.schema.JPEG_QUALITY)
    targets_zstd: bool = True
    storage_options: dict | None = None  # fsspec options of a remote `out` (endpoint, profile)
    cluster: str | None = None  # None: this process (or torchrun ranks); local[:N] / tcp://...


@dataclass
class StudentRun(_Run):
    """`train_student`: a regression student from a teacher store, or from the images with a
    fresh augmentation every epoch (`store=None`; student_train.train)."""

    store: str | None = None  # None: crops from ann_file / images, drawn anew every epoch
    model: str = "distilpose_s"
    out_dir: str = "runs/student"
    # every loss term at its official weight: `losses.DEFAULT_LOSSES`, written out here because
    # this module stays torch-free for the CLI (tests/test_losses.py keeps the two equal)
    losses: str = "reg,kt,vt,sh,cs"
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup_iters: int | None = None  # None: the paper's 500, capped at a tenth of the run
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    resume: bool = False
    teacher_online: str | None = None
    model_overrides: dict | None = None
    official_sh_weight: bool = False
    allow_incomplete: bool = False
    ann_file: str | None = None
    images: str | None = None
    verify_digest: bool = True
    amp: bool = True
    log_every: int = 20
    ckpt_every_steps: int = 0
    allow_store_change: bool = False
    decode: str = "auto"
    sync_bn: bool = True
    channels_last: bool = False
    amp_dtype: str = "auto"
    schedule: str = "step"
    val_ann: str | None = None  # COCO keypoints file to validate on; None: no validation
    val_images: str | None = None  # its image folder
    val_dets: str | None = None  # person detections for validation; None: ground-truth boxes
    val_every: int = 10  # epochs between validations (MMPose: interval=10); the last always
    ema: float | None = None  # EMA decay of the weights (timm: 0.9998); validated and in best.pth
    accum_steps: int = 1  # batches per optimizer step (gradient accumulation)
    lr_scale: str = "none"  # "linear": lr x global batch / 512 (the paper's 8 GPUs x 64)
    backbone_weights: str | None = None  # ImageNet backbone (torchvision/timm keys) to start from
    storage_options: dict | None = None  # fsspec options of a remote `store` (endpoint, profile)
    recipe: AugmentRecipe | None = None  # no store only: the fresh crops' (None: the paper's)
    views: int | None = None  # train on the store's first N views (None: all it holds)
    # cheap views: the student's input alone gets a random colour change and noise of this
    # strength per sample and step (distilpose.data.photometric_jitter; 0: off, 0.4: timm's
    # ColorJitter); no keypoint moves, so stored targets stay exact
    input_jitter: float = 0.0


# What a rerun decides for itself rather than inherits from the saved run.
PER_INVOCATION = ("resume", "allow_store_change")


def _saved(run_dir: str | Path) -> tuple[Path, object]:
    """`run_dir/config.json` and what it keeps under "run" (None: no such file or entry)."""
    path = Path(run_dir) / "config.json"
    doc = load_json(path, BadConfigError) if path.is_file() else None
    return path, doc.get("run") if isinstance(doc, dict) else None


def saved_run(kind: type[R], run_dir: str | Path) -> R | None:
    """The run saved in `run_dir/config.json`, or None (nothing started, or saved before runs
    were kept there)."""
    path, saved = _saved(run_dir)
    return None if saved is None else kind.from_dict(saved, f"{path} (run)")


def run_changes(run_dir: str | Path, run: dict) -> list[str]:
    """The fields of `run` (a run's dict) whose value differs from the run saved in
    `run_dir/config.json`; [] when none is saved there."""
    saved = _saved(run_dir)[1]
    if not isinstance(saved, dict):
        return []
    return [k for k, v in run.items() if k in saved and saved[k] != v]
