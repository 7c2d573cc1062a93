"""The command line's plumbing: the one error handler, `--config` files, option types, runs.

Every command runs inside one error handler (`OneLineErrors`): whatever fails (bad files,
mismatched or damaged stores, a library such as zarr, OpenCV or the JSON parser, a DataLoader
worker, memory) prints one line `error: <what>, <where>, <what to do>` and exits with code 1;
`--debug` or DISTILPOSE_DEBUG=1 adds the traceback. A run command's options default to None and
only the options given become fields of its run (`RunOptions`), so each default is written
once, in the run type (distilpose/training/runs.py).
"""

from __future__ import annotations

import json
import operator
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer.core

from distilpose.errors import BadConfigError, DistilPoseError
from distilpose.geometry import Geometry
from distilpose.limits import read_config_text
from distilpose.training.runs import (
    PER_INVOCATION,
    DumpRun,
    StudentRun,
    TeacherRun,
    check_field,
    saved_run,
)

_OWN_PACKAGES = ("distilpose", "store", "student_train", "teacher_dump", "benchmarks")
_OWN_MODULES = ("cli", "cli_support", "cli_viz", "demo")  # top-level modules beside them
MAX_CONFIG_NODES = 10_000  # YAML values of a --config file (PyYAML: ~1 kB each while parsing)
DEBUG_ENV = "DISTILPOSE_DEBUG"  # =1: print the traceback behind an error line
# libraries whose exceptions mean "your data or environment", named in the error line
_LIBRARIES = {  # module -> (what failed, what to do)
    "zarr": ("the zarr store library", "an intact store (run store-verify on it)"),
    "numcodecs": ("the store's codecs (numcodecs)", "an intact store (run store-verify on it)"),
    "fsspec": ("remote file access (fsspec)", "a valid, reachable store path or URL"),
    "aiohttp": ("the HTTP client (aiohttp)", "a reachable http(s) store"),
    "botocore": ("the S3 client", "a reachable s3 store and valid credentials"),
    "cv2": ("OpenCV", "readable images of ordinary size"),
    "PIL": ("the image header reader (Pillow)", "readable images"),
    "json": ("the JSON parser", "valid JSON files"),
    "numpy": ("numpy", "input arrays of the documented shapes"),
}


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _worker_error(e: BaseException) -> tuple[str, str, str] | None:
    """(worker, exception type, message) of an error torch re-raised from a DataLoader worker,
    whose text carries the worker's whole traceback; None otherwise."""
    text = str(e)
    if "in DataLoader worker process" not in text:
        return None
    head = _first_line(text)
    worker = head.split(" in ", 1)[1].rstrip(".") if " in " in head else "DataLoader worker"
    last = [line for line in text.splitlines() if line.strip()][-1]
    kind, _, message = last.partition(": ")
    return worker, kind.rsplit(".", 1)[-1], message or kind


def _library(e: BaseException) -> tuple[str, str] | None:
    """The library (from `_LIBRARIES`) the exception was raised in, from its type or frames."""
    names = [type(e).__module__.split(".")[0]]
    tb = e.__traceback__
    while tb is not None:
        names.append(str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0])
        tb = tb.tb_next
    for name in reversed(names):  # the innermost frame wins
        if name in _LIBRARIES:
            return _LIBRARIES[name]
    return None


def describe_error(e: BaseException, command: str) -> str:
    """One line `<what>, <where>, <what to do>` for any exception a command can end with."""
    where = f"while running '{command}'"
    debug = f"rerun with --debug (or {DEBUG_ENV}=1) for the traceback"
    worker = _worker_error(e)
    if worker is not None:
        name, kind, message = worker
        if isinstance(e, DistilPoseError):
            return f"{message} (raised in {name})"
        return (
            f"{kind}: {message}, in {name} {where}; rerun with --workers 0 to raise it in the "
            f"main process, or {debug}"
        )
    if isinstance(e, DistilPoseError):
        return _first_line(str(e))
    if isinstance(e, MemoryError):
        return (
            f"out of memory {where}; expected a smaller --batch-size or --workers, smaller "
            f"inputs, or more memory ({debug})"
        )
    if isinstance(e, RecursionError):
        return f"input nested too deeply to read {where}; expected a flat file ({debug})"
    if isinstance(e, ImportError):
        name = e.name or _first_line(str(e))
        if name.split(".")[0] in (
            *_OWN_PACKAGES,
            *_OWN_MODULES,
        ):  # not an optional extra: a broken install
            return (
                f"missing module '{name}' of distilpose itself {where}; expected a complete "
                "install of one version (reinstall it; do not update it under a running job)"
            )
        return (
            f"missing module '{name}' {where}; expected it installed "
            "(pip install 'distilpose[remote]' for http:// and s3:// stores, "
            "'distilpose[export]' for ONNX)"
        )
    if isinstance(e, RuntimeError) and "DataLoader worker" in str(e):
        return (
            f"{_first_line(str(e))} {where} (killed for lack of memory?); expected fewer "
            f"--workers or a smaller --batch-size ({debug})"
        )
    message = f"{type(e).__name__}: {_first_line(str(e)) or 'no message'}"
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return f"{e.filename}: {e.strerror or message} {where}; expected a readable file ({debug})"
    library = _library(e)
    if library is not None:
        return f"{library[0]} failed ({message}) {where}; expected {library[1]} ({debug})"
    if isinstance(e, OSError | TimeoutError):
        return f"{message} {where}; expected a reachable, readable location ({debug})"
    return f"unexpected {message} {where}; this may be a bug: {debug} and report it"


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _pass_through() -> tuple[type[BaseException], ...]:
    """Exit and usage exceptions of click and of typer's own copy of click: not errors."""
    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    for mod in (click.exceptions, getattr(getattr(typer, "_click", None), "exceptions", None)):
        if mod is not None:
            kinds += [
                getattr(mod, n) for n in ("Exit", "Abort", "ClickException") if hasattr(mod, n)
            ]
    return tuple(kinds)


_PASS_THROUGH = _pass_through()


class OneLineErrors(typer.core.TyperGroup):
    """Every command runs inside this one handler: any exception becomes `error: ...` and
    exit code 1 (130 for Ctrl-C); the traceback only with --debug or DISTILPOSE_DEBUG=1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: rerun the same command (with --resume where offered) to continue",
                err=True,
            )
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - this is the one place errors are reported
            if _debug(ctx):
                traceback.print_exc()
            command = ctx.invoked_subcommand or ctx.info_name or "distilpose"
            typer.echo(f"error: {_rank_prefix()}{describe_error(e, command)}", err=True)
            raise typer.Exit(1) from None


def _rank_prefix() -> str:
    """'[rank R of N] ' under torchrun (each rank prints its own line; torchrun's report of
    the failed rank follows them, see docs/multi-gpu.md), else ''."""
    size = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')} of {size}] " if size not in ("", "1") else ""


# ----------------------------------------------------------------------------- config files


def load_config_file(path: Path, command: str) -> dict[str, Any]:
    """Read a TOML/YAML config file into a flat {option_name: value} dict for one command.

    Memory stays bounded: at most `max_config_bytes()` of UTF-8 text (1 MiB: about 100 MB
    to parse as TOML), and YAML of at most MAX_CONFIG_NODES values (a few MB) with aliases
    refused (a list of lists of aliases expands without bound as it is walked; a config file
    needs none)."""
    text = read_config_text(path)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = _load_yaml(text, path)
        else:
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise BadConfigError(f"{path}: not valid TOML ({e})") from e
    except RecursionError:
        raise BadConfigError(
            f"{path}: values nested more than about {sys.getrecursionlimit()} levels deep; "
            "expected a flat file of options"
        ) from None
    if not isinstance(data, dict):
        raise BadConfigError(f"{path}: expected a table of option = value pairs")
    section = data.get(command, data.get(command.replace("-", "_")))
    if isinstance(section, dict):
        data = section
    return {str(k).replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as e:
        raise BadConfigError(f"{path}: YAML config needs PyYAML; use TOML instead") from e

    class Loader(yaml.SafeLoader):  # safe: a config file is data, never code
        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise BadConfigError(
                    f"{path}: YAML alias at line {mark.line + 1}, column {mark.column + 1}; "
                    "expected every value written out (aliases are refused: nested ones "
                    "expand without bound)"
                )
            self.nodes += 1
            if self.nodes > MAX_CONFIG_NODES:
                mark = self.peek_event().start_mark
                raise BadConfigError(
                    f"{path}: YAML of more than {MAX_CONFIG_NODES:,} values (at line "
                    f"{mark.line + 1}); expected a small file of options"
                )
            return super().compose_node(parent, index)

    loader = Loader(text)
    loader.nodes = 0
    try:
        return loader.get_single_data() or {}
    except yaml.YAMLError as e:  # its text spans lines; keep the problem and where
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadConfigError(f"{path}: not valid YAML ({problem}{where})") from e
    finally:
        loader.dispose()


def _config_callback(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is None:
        return value
    try:
        values = load_config_file(value, ctx.info_name or "")
    except DistilPoseError as e:
        fail(e)
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(values) - known)
    if unknown:
        fail(
            BadConfigError(f"{value}: unknown option(s) {', '.join(unknown)} for '{ctx.info_name}'")
        )
    _check_run_values(ctx.info_name or "", values, value)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _check_run_values(command: str, values: dict[str, Any], path: Path) -> None:
    """A run command's config-file values checked by the run type before click converts them
    (so `epochs = "ten"` is one `error:` line naming the file and the field)."""
    options = RUN_COMMANDS.get(command)
    if options is None:
        return
    names = {f.name for f in fields(options.kind)}
    for option, v in values.items():
        field = options.renamed.get(option, option)
        if field in names and option not in options.convert:  # converted: not the field's value
            try:
                check_field(options.kind, field, v)
            except BadConfigError as e:
                fail(BadConfigError(f"{path}: {e}"))


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML/YAML file of this command's options; command-line options override it.",
        is_eager=True,
        callback=_config_callback,
        exists=True,
        dir_okay=False,
    ),
]


def fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


# ----------------------------------------------------------------------------- option types


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class FlipMode(str, Enum):
    corrected = "corrected"
    official = "official"


class Augment(str, Enum):
    paper = "paper"
    mild = "mild"


class Schedule(str, Enum):
    step = "step"
    cosine = "cosine"


class StoreMode(str, Enum):
    fp16 = "fp16"
    lossy = "lossy"
    compact = "compact"  # store.schema.DEFAULT_COMPACT; and the sizes of store.schema.COMPACT
    compact_s = "compact-s"
    compact_m = "compact-m"
    compact_l = "compact-l"
    compact_xl = "compact-xl"
    compact_hq = "compact-hq"


class Pixels(str, Enum):  # store.pixels.PIXEL_CHOICES (a test keeps the two equal)
    auto = "auto"
    jpeg = "jpeg"
    lossless = "lossless"
    canvas = "canvas"
    none = "none"


class Decode(str, Enum):
    auto = "auto"
    gpu = "gpu"
    cpu = "cpu"


class LrScale(str, Enum):
    linear = "linear"
    none = "none"


class AmpDtype(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise typer.BadParameter(
            f"expected i/n such as 0/2, got {text!r}", param_hint="--shard"
        ) from None
    if not 0 <= i < n:
        raise typer.BadParameter(f"expected 0 <= i < n, got {text!r}", param_hint="--shard")
    return i, n


def parse_storage_options(text: str | dict) -> dict:
    """--storage-options: a JSON object of fsspec options (endpoint_url, profile, anon, ...);
    a --config file may give it as a table."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(
            f'expected a JSON object such as \'{{"endpoint_url": "http://..."}}\' ({e})',
            param_hint="--storage-options",
        ) from None
    if not isinstance(value, dict):
        raise typer.BadParameter(
            f"expected a JSON object, got {type(value).__name__}", param_hint="--storage-options"
        )
    return value


def parse_size(text: str, option: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(
            f"expected WxH such as 192x256, got {text!r}", param_hint=option
        ) from None
    return w, h


def recipe(augment: Augment):
    """None keeps each stage's paper default; 'mild' is for data that varies pose itself."""
    from distilpose.data import MILD_RECIPE

    return MILD_RECIPE if augment == Augment.mild else None


def size_overrides(input_size: str | None) -> dict | None:
    """--input-size WxH -> model overrides; the heatmap / feature map is a quarter of it."""
    if input_size is None:
        return None
    return Geometry(parse_size(input_size, "--input-size")).size_overrides()


# ----------------------------------------------------------------------------- runs


def default(kind: type, field: str) -> str:
    """`(default: X)` for a help text, X the run type's default of `field` (the one place it
    is written; the option itself defaults to None so that only given options reach the run)."""
    value = next(f.default for f in fields(kind) if f.name == field)
    assert value is not MISSING, f"{kind.__name__}.{field} has no default"
    if isinstance(value, tuple):
        value = "/".join(map(str, value))
    # in parentheses: typer's rich help would take "[default: X]" for a style tag and drop it
    return f"(default: {str(value).lower() if isinstance(value, bool) else value})"


def run_option(kind: type, field: str, text: str, *names: str, **option: Any) -> Any:
    """The typer option of run field `field`, its help `text` ending in the field's default."""
    return typer.Option(*names, help=f"{text.rstrip('.')} {default(kind, field)}.", **option)


def given(**options: Any) -> dict[str, Any]:
    """The options given (not None), Enum members as their values."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class RunOptions:
    """How a run command's options become its run: an option sets the field of `kind` of its
    name, or `renamed[option]`; `convert[option]` turns its value into the field's (Enum
    members become their values)."""

    kind: type
    renamed: dict[str, str]
    convert: dict[str, Callable[[Any], Any]]

    def run(self, options: dict[str, Any]) -> Any:
        """The run made of the options the user gave (on the command line or in --config;
        None = not given) on top of the run type's defaults.

        With --resume the base is the run saved in OUT/config.json instead of the defaults, so
        the run that continues is the run that started, with the options given this time on
        top; `PER_INVOCATION` fields are this invocation's. The trainer logs what changed
        (train.log); the stage refuses a changed store unless --allow-store-change."""
        names = {f.name for f in fields(self.kind)}
        values = {
            self.renamed.get(option, option): self.convert.get(option, _same)(value)
            for option, value in given(**options).items()
            if self.renamed.get(option, option) in names
        }
        run = self.kind(**values)
        saved = saved_run(self.kind, run.out_dir) if getattr(run, "resume", False) else None
        if saved is None:
            return run
        kept = {*values, *(f for f in PER_INVOCATION if f in names)}
        return saved.replace(**{f: getattr(run, f) for f in kept})


def _same(value: Any) -> Any:
    return value


# How each run command's options become its run: the run field each renamed option sets (the
# others have the field's name), and how an option's value becomes the field's.
TEACHER_OPTIONS = RunOptions(
    TeacherRun,
    {"ann": "ann_file", "images": "image_root", "out": "out_dir", "input_size": "model_overrides",
     "augment": "recipe"},
    {"input_size": size_overrides, "augment": recipe},
)  # fmt: skip
DUMP_OPTIONS = RunOptions(
    DumpRun,
    {"teacher": "teacher_ckpt", "ann": "ann_file", "images": "image_root", "augment": "recipe",
     "raw_targets": "targets_zstd"},
    {"shard": parse_shard, "augment": recipe, "raw_targets": operator.not_},
)  # fmt: skip
STUDENT_OPTIONS = RunOptions(
    StudentRun,
    {"out": "out_dir", "input_size": "model_overrides", "ann": "ann_file", "augment": "recipe"},
    {"input_size": size_overrides, "augment": recipe},
)
# tests/test_cli.py checks that no option of these commands restates its run type's default
RUN_COMMANDS = {"train-teacher": TEACHER_OPTIONS, "dump-teacher": DUMP_OPTIONS,
                "train-student": STUDENT_OPTIONS}  # fmt: skip

# Where a store lives and where work runs: dump-teacher, train-student, store-info, store-verify.
StorageOpt = Annotated[
    dict | None,
    typer.Option(
        help='fsspec options of a remote store, JSON: {"endpoint_url": ..., "profile": ..., '
        '"anon": true, "timeout": seconds}.',
        parser=parse_storage_options,
        metavar="JSON",
    ),
]
ClusterOpt = Annotated[
    str | None,
    typer.Option(
        help="Dask cluster: local[:N] (N worker processes; one per GPU with dask-cuda) or "
        "tcp://scheduler:8786; none: this process."
    ),
]


class TrainOpts:
    """The options train-teacher and train-student share, as typer annotations of run type
    `kind` (the help ends in that type's default): one line each in cli.py, `lr: S.lr = None`."""

    def __init__(self, kind: type) -> None:
        opt = partial(run_option, kind)
        self.epochs = Annotated[int | None, opt("epochs", "Training epochs.")]
        self.batch_size = Annotated[int | None, opt("batch_size", "Crops per step (per GPU).")]
        self.lr = Annotated[float | None, opt("lr", "Adam learning rate.")]
        self.device = Annotated[Device | None, opt("device", "auto = CUDA when available.")]
        self.workers = Annotated[int | None, opt("workers", "Data loader worker processes.")]
        self.resume = Annotated[bool | None, opt("resume", "Continue from OUT/last.pth.")]
        self.sync_bn = Annotated[
            bool | None, opt("sync_bn", "Under torchrun: BatchNorm statistics over all ranks.")
        ]


AcceptMetadataOpt = Annotated[
    bool,
    typer.Option(
        "--accept-metadata",
        help="First sign the store's metadata and markers as they are now (an edit you mean); "
        "prints what changed.",
    ),
]


def accept_metadata(store: str, storage_options: dict | None, accept: bool) -> None:
    """`store-verify --accept-metadata` (`accept`): sign the store as it is, one stderr line
    per change."""
    if not accept:
        return
    from store.writer import accept_metadata as sign_as_is

    for line in sign_as_is(store, storage_options) or ["nothing: the store is as it was signed"]:
        typer.echo(f"store-verify: accepted {line}", err=True)


# Options of train-teacher and train-student alike (the same defaults in both run types).
ValAnnOpt = Annotated[
    Path | None,
    typer.Option(help="Validate on this COCO keypoints file while training (as `eval` does).",
                 exists=True, dir_okay=False),
]  # fmt: skip
ValImagesOpt = Annotated[
    Path | None, typer.Option(help="Image folder of --val-ann.", exists=True, file_okay=False)
]
ValDetsOpt = Annotated[
    Path | None,
    typer.Option(help="Person detections for validation; GT boxes if unset.", exists=True),
]
ValEveryOpt = Annotated[
    int | None,
    run_option(StudentRun, "val_every", "Epochs between validations; the last always."),
]
EmaOpt = Annotated[
    float | None,
    typer.Option(help="EMA decay of the weights, e.g. 0.9998; the EMA is validated and kept."),
]
AccumOpt = Annotated[
    int | None,
    run_option(StudentRun, "accum_steps", "Batches per optimizer step (gradient accumulation)."),
]
LrScaleOpt = Annotated[
    LrScale | None,
    run_option(
        StudentRun, "lr_scale",
        "linear: lr x global batch / 512 (the paper's lr is for 8 GPUs x 64 = 512); none: lr as "
        "given.",
    ),
]  # fmt: skip
BackboneWeightsOpt = Annotated[
    Path | None,
    typer.Option(
        help="ImageNet backbone checkpoint, torchvision/timm keys (conv1.weight, layer1.0...; "
        "fc.* ignored), e.g. resnet50's.",
        exists=True,
        dir_okay=False,
    ),
]
