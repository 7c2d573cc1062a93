"""A run is one typed object: `TeacherRun`, `DumpRun`, `StudentRun` (torchtitan style).

Each holds exactly the parameters of one stage run; `train_teacher(run)`, `dump_teacher(run)`
and `train_student(run)` take it. The CLI, `ablate`, the demo and the benchmarks build one and
pass it on. A training run saves its object under "run" in the run directory's `config.json`;
`--resume` reads it back (`saved_run`), so a resumed run is the run that was started, with only
the options given again on top.

    run = StudentRun("teacher_store", "distilpose_s", "runs/s", epochs=300)
    StudentRun.from_json(run.to_json()) == run  # plain JSON: paths as str, tuples as lists

Reading is strict: an unknown field or a missing required one is one `BadConfigError` line.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from distilpose.data.crop import AugmentRecipe
from distilpose.errors import BadConfigError
from distilpose.limits import load_json, loads_json

R = TypeVar("R", bound="_Run")


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
    eval_every: int = 10  # epochs between calls of the eval function, if one is given
    sync_bn: bool = True


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
    chunk_samples: int = 64
    shard_chunks: int = 8
    max_instances: int | None = None
    recipe: AugmentRecipe | None = None  # None: the paper's student recipe
    pixels: str = "jpeg"
    jpeg_quality: int | None = None  # None: the store's default (store.schema.JPEG_QUALITY)
    targets_zstd: bool = True


@dataclass
class StudentRun(_Run):
    """`train_student`: a regression student from a teacher store (student_train.train)."""

    store: str | None
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
