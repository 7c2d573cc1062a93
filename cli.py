"""The `distilpose` command line: one command per verb, each a thin call into a stage package.

Every command takes `--config FILE` (TOML, or YAML when PyYAML is installed): its keys are the
command's option names (dashes or underscores), optionally inside a table named after the
command; options given on the command line win over the file. Every command runs inside one
error handler (`_OneLineErrors`): whatever fails (bad files, mismatched or damaged stores, a
library such as zarr, OpenCV or the JSON parser, a DataLoader worker, memory) prints one line
`error: <what>, <where>, <what to do>` and exits with code 1; `--debug` or DISTILPOSE_DEBUG=1
adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
import typer.core

from distilpose.errors import BadConfigError, DistilPoseError
from distilpose.geometry import PAPER, Geometry
from distilpose.training.runs import (
    PER_INVOCATION,
    DumpRun,
    StudentRun,
    TeacherRun,
    check_field,
    saved_run,
)
from distilpose.weights import DEMO_TEACHER_RECIPE

AnyRun = TypeVar("AnyRun", TeacherRun, StudentRun)
_OWN_PACKAGES = ("distilpose", "store", "student_train", "teacher_dump", "cli", "benchmarks")
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
        if name.split(".")[0] in _OWN_PACKAGES:  # not an optional extra: a broken install
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


class _OneLineErrors(typer.core.TyperGroup):
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
            typer.echo(f"error: {describe_error(e, command)}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_OneLineErrors,
    help="DistilPose: dump a heatmap teacher once into a zarr store; train regression students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Print the traceback behind an error ({DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """DistilPose: dump a heatmap teacher once into a zarr store; train regression students."""


viz_app = typer.Typer(
    help="Pictures (PNG) of heatmaps, confidences, attention, predictions, curves."
)
app.add_typer(viz_app, name="viz")


# ----------------------------------------------------------------------------- config files


def load_config_file(path: Path, command: str) -> dict[str, Any]:
    """Read a TOML/YAML config file into a flat {option_name: value} dict for one command."""
    try:
        text = path.read_text()
    except OSError as e:
        raise BadConfigError(f"{path}: cannot read config file ({e.strerror})") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise BadConfigError(f"{path}: YAML config needs PyYAML; use TOML instead") from e
        try:
            data = yaml.safe_load(text) or {}  # safe_load: a config file is data, never code
        except yaml.YAMLError as e:  # its text spans lines; keep the problem and where
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise BadConfigError(f"{path}: not valid YAML ({problem}{where})") from e
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise BadConfigError(f"{path}: not valid TOML ({e})") from e
    if not isinstance(data, dict):
        raise BadConfigError(f"{path}: expected a table of option = value pairs")
    section = data.get(command, data.get(command.replace("-", "_")))
    if isinstance(section, dict):
        data = section
    return {str(k).replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}


def _config_callback(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is None:
        return value
    try:
        values = load_config_file(value, ctx.info_name or "")
    except DistilPoseError as e:
        _fail(e)
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(values) - known)
    if unknown:
        _fail(
            BadConfigError(f"{value}: unknown option(s) {', '.join(unknown)} for '{ctx.info_name}'")
        )
    _check_run_values(ctx.info_name or "", values, value)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


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


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


VERIFY_SAMPLE = 1000  # store-verify's default sample: a minute on a laptop, --all for everything


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise typer.BadParameter(
            f"expected i/n such as 0/2, got {text!r}", param_hint="--shard"
        ) from None
    if not 0 <= i < n:
        raise typer.BadParameter(f"expected 0 <= i < n, got {text!r}", param_hint="--shard")
    return i, n


def _parse_size(text: str, option: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(
            f"expected WxH such as 192x256, got {text!r}", param_hint=option
        ) from None
    return w, h


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


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


def _recipe(augment: Augment):
    """None keeps each stage's paper default; 'mild' is for data that varies pose itself."""
    from distilpose.data import MILD_RECIPE

    return MILD_RECIPE if augment == Augment.mild else None


def _size_overrides(input_size: str | None) -> dict | None:
    """--input-size WxH -> model overrides; the heatmap / feature map is a quarter of it."""
    if input_size is None:
        return None
    return Geometry(_parse_size(input_size, "--input-size")).size_overrides()


class Schedule(str, Enum):
    step = "step"
    cosine = "cosine"


class StoreMode(str, Enum):
    fp16 = "fp16"
    lossy = "lossy"


class Pixels(str, Enum):
    jpeg = "jpeg"
    lossless = "lossless"
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


# Options shared by train-student and train-teacher; None: the run type's default (runs.py).
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
    int | None, typer.Option(help="Epochs between validations (default 10); the last always.")
]
EmaOpt = Annotated[
    float | None,
    typer.Option(help="EMA decay of the weights, e.g. 0.9998; the EMA is validated and kept."),
]
AccumOpt = Annotated[
    int | None, typer.Option(help="Batches per optimizer step (gradient accumulation; default 1).")
]
LrScaleOpt = Annotated[
    LrScale | None,
    typer.Option(
        help="linear: lr x global batch / 512 (the paper's lr is for 8 GPUs x 64 = 512); "
        "none (default): lr as given."
    ),
]
BackboneWeightsOpt = Annotated[
    Path | None,
    typer.Option(
        help="ImageNet backbone checkpoint, torchvision/timm keys (conv1.weight, layer1.0...; "
        "fc.* ignored), e.g. resnet50's.",
        exists=True,
        dir_okay=False,
    ),
]


def _given(**options: Any) -> dict[str, Any]:
    """The options given (not None), enum values as their strings, paths as str."""
    out = {}
    for name, value in options.items():
        if value is not None:
            out[name] = value.value if isinstance(value, Enum) else value
    return out


# The run field each option of a resumable command sets (the others have the field's name).
TEACHER_OPTIONS = {"ann": "ann_file", "images": "image_root", "out": "out_dir",
                   "input_size": "model_overrides", "augment": "recipe"}  # fmt: skip
STUDENT_OPTIONS = {"out": "out_dir", "input_size": "model_overrides", "ann": "ann_file"}


# Commands whose options set run fields: checked by the run type when a config file gives them,
# before click converts them (so epochs = "ten" is one `error:` line naming the field).
RUN_OPTIONS = {"train-student": (StudentRun, STUDENT_OPTIONS),
               "train-teacher": (TeacherRun, TEACHER_OPTIONS)}  # fmt: skip
NOT_RUN_VALUES = ("input_size", "augment")  # options whose value the CLI turns into the field's


def _check_run_values(command: str, values: dict[str, Any], path: Path) -> None:
    if command not in RUN_OPTIONS:
        return
    kind, renamed = RUN_OPTIONS[command]
    fields = set(kind.__dataclass_fields__)
    for option, v in values.items():
        name = renamed.get(option, option)
        if name in fields and option not in NOT_RUN_VALUES:
            try:
                check_field(kind, name, v)
            except BadConfigError as e:
                _fail(BadConfigError(f"{path}: {e}"))


def _resumed(ctx: typer.Context, run: AnyRun, renamed: dict[str, str]) -> AnyRun:
    """With --resume: the run saved in OUT/config.json, with the options given this time (on
    the command line or in --config) on top; options left at their defaults keep the saved
    values, so the run that continues is the run that started. The trainer logs what changed
    (train.log); the stage refuses a changed store unless --allow-store-change."""
    saved = saved_run(type(run), run.out_dir) if run.resume else None
    if saved is None:
        return run
    fields = set(run.to_dict())
    given = {
        renamed.get(name, name)
        for name in ctx.params
        if (source := ctx.get_parameter_source(name)) is not None and source.name != "DEFAULT"
    }
    kept = {f for f in (*given, *PER_INVOCATION) if f in fields}
    return saved.replace(**{f: getattr(run, f) for f in kept})


# ----------------------------------------------------------------------------- models


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """List the built-in models with params and GFLOPs measured now (1 crop at their input size)."""
    from distilpose.models import list_model_infos

    infos = list_model_infos()
    if as_json:
        _echo_json(infos)
        return
    header = (
        f"{'name':<19} {'role':<8} {'input (w x h)':<14} {'params':>12} "
        f"{'GFLOPs':>8} {'GFLOPs full':>12}"
    )
    typer.echo(header)
    typer.echo("-" * len(header))
    for m in infos:
        w, h = m["input_size"]
        typer.echo(
            f"{m['name']:<19} {m['role']:<8} {f'{w} x {h}':<14} {m['params']:>12,} "
            f"{m['gflops']:>8.2f} {m['gflops_full']:>12.2f}"
        )
    typer.echo(
        "GFLOPs counted as the paper did (MMCV: conv/linear MACs plus norms and activations,"
        " attention matmuls not counted); 'full' adds attention's matrix products."
    )


@app.command("checkpoint-info")
def checkpoint_info(
    path: Annotated[
        Path, typer.Argument(help="Checkpoint file (.pth): official MMPose 0.x or ours.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Say which model a checkpoint fits, its parameter count and a summary of its keys."""
    from distilpose.models import identify_checkpoint

    info = identify_checkpoint(path)
    if as_json:
        _echo_json(info)
        return
    for key, value in info.items():
        typer.echo(f"{key}: {value}")


# ----------------------------------------------------------------------------- data


@app.command("make-demo-data")
def make_demo_data(
    out: Annotated[
        Path, typer.Argument(help="Output folder for the synthetic COCO-format dataset.")
    ],
    num_train: Annotated[int, typer.Option(help="People in the train split.")] = 2000,
    num_val: Annotated[int, typer.Option(help="People in the val split.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed; equal seeds give equal bytes.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Write the built-in synthetic person-keypoint dataset (COCO format, JPEGs, detections)."""
    from distilpose.data import make_demo_data as make

    paths = make(out, num_train=num_train, num_val=num_val, seed=seed)
    for key, value in paths.items():
        typer.echo(f"{key}: {value}")


@app.command("show-crops")
def show_crops(
    ann: Annotated[Path, typer.Option(help="COCO person-keypoints annotation file.", exists=True)],
    images: Annotated[
        Path,
        typer.Option(
            help="Image folder the annotation's file_name is under.", exists=True, file_okay=False
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("crops.png"),
    num: Annotated[int, typer.Option(help="Number of people shown.")] = 16,
    views: Annotated[int, typer.Option(help="Augmented views per person.")] = 2,
    seed: Annotated[int, typer.Option(help="Augmentation seed (the store seed).")] = 0,
    input_size: Annotated[
        str, typer.Option(help="Crop size WxH in pixels (the model input; tiny models: 96x128).")
    ] = "192x256",
    config: ConfigOpt = None,
) -> None:
    """Draw a PNG grid of seeded augmented crops with their keypoints, to check augmentation."""
    size = _parse_size(input_size, "--input-size")
    from distilpose.data import show_crops as show

    typer.echo(show(ann, images, out, num=num, views=views, seed=seed, input_size=size))


# ----------------------------------------------------------------------------- stage 1


@app.command("train-teacher")
def train_teacher(
    ctx: typer.Context,
    ann: Annotated[Path, typer.Option(help="Train annotation file (COCO keypoints).", exists=True)],
    images: Annotated[Path, typer.Option(help="Train image folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, metrics, curves).")],
    model: Annotated[
        str, typer.Option(help="Teacher model name (see `distilpose models`).")
    ] = "tokenpose_tiny",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Crops per step (per GPU).")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    warmup_iters: Annotated[int, typer.Option(help="Linear warmup steps.")] = 500,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Seed of augmentation and initialisation.")] = 0,
    workers: Annotated[int, typer.Option(help="Data loader worker processes.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pth.")] = False,
    input_size: Annotated[
        str | None, typer.Option(help="Crop size WxH instead of the model's (e.g. 48x64).")
    ] = None,
    augment: Annotated[
        Augment, typer.Option(help="paper (the teacher recipe) or mild (flip, small scale).")
    ] = Augment.paper,
    sync_bn: Annotated[
        bool,
        typer.Option(help="Under torchrun: BatchNorm statistics over all ranks' samples."),
    ] = True,
    val_ann: ValAnnOpt = None,
    val_images: ValImagesOpt = None,
    val_dets: ValDetsOpt = None,
    val_every: ValEveryOpt = None,
    ema: EmaOpt = None,
    accum_steps: AccumOpt = None,
    lr_scale: LrScaleOpt = None,
    backbone_weights: BackboneWeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train a heatmap teacher (TokenPose) on a COCO-format dataset."""
    from teacher_dump.train import train_teacher as train

    run = TeacherRun(
        model,
        ann,
        images,
        out,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_iters=warmup_iters,
        device=device.value,
        seed=seed,
        workers=workers,
        resume=resume,
        model_overrides=_size_overrides(input_size),
        recipe=_recipe(augment),
        sync_bn=sync_bn,
        **_given(
            val_ann=val_ann, val_images=val_images, val_dets=val_dets, val_every=val_every,
            ema=ema, accum_steps=accum_steps, lr_scale=lr_scale, backbone_weights=backbone_weights,
        ),
    )  # fmt: skip
    run = _resumed(ctx, run, TEACHER_OPTIONS)
    typer.echo(json.dumps(train(run), default=str))


@app.command("dump-teacher")
def dump_teacher(
    teacher: Annotated[
        Path, typer.Option(help="Teacher checkpoint (official or ours).", exists=True)
    ],
    ann: Annotated[Path, typer.Option(help="Train annotation file (COCO keypoints).", exists=True)],
    images: Annotated[Path, typer.Option(help="Train image folder.", exists=True, file_okay=False)],
    out: Annotated[str, typer.Option(help="Store directory (created, or resumed if it exists).")],
    views: Annotated[
        int, typer.Option(help="Augmented views per person; raise later to add views.")
    ] = 1,
    seed: Annotated[
        int, typer.Option(help="Store seed: crop specs come from (seed, person, view).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Crops per teacher forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Processes decoding and warping images.")] = 2,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    shard: Annotated[str, typer.Option(help="Fill part i of n of the store, e.g. 0/2.")] = "0/1",
    model: Annotated[str | None, typer.Option(help="Teacher model name if not recognised.")] = None,
    mode: Annotated[
        StoreMode, typer.Option(help="fp16 (exact half) or lossy (smaller).")
    ] = StoreMode.fp16,
    chunk_samples: Annotated[int, typer.Option(help="Samples per zarr chunk.")] = 64,
    augment: Annotated[
        Augment, typer.Option(help="paper (the student recipe) or mild (flip, small scale).")
    ] = Augment.paper,
    pixels: Annotated[
        Pixels,
        typer.Option(
            help="Keep each crop in the store (jpeg, lossless) so students train without the "
            "images; the teacher sees the decoded crop. none: re-render from the images."
        ),
    ] = Pixels.jpeg,
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality of kept crops (1-100).")] = 95,
    raw_targets: Annotated[
        bool,
        typer.Option(
            help="fp16 teacher outputs without zstd: 8% more bytes, no decompression on reads."
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Run the teacher once over seeded augmented crops and write its outputs to a zarr store."""
    from teacher_dump.dump import dump_teacher as dump

    run = DumpRun(
        teacher,
        ann,
        images,
        out,
        views=views,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        device=device.value,
        shard=_parse_shard(shard),
        model=model,
        mode=mode.value,
        chunk_samples=chunk_samples,
        recipe=_recipe(augment),
        pixels=pixels.value,
        jpeg_quality=jpeg_quality,
        targets_zstd=not raw_targets,
    )
    typer.echo(json.dumps(dump(run), default=str))


# ----------------------------------------------------------------------------- store


@app.command("store-info")
def store_info(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Samples and views complete, bytes (pixels too), compression, teacher confidence, NaN/Inf."""
    from store.checks import format_store_info
    from store.checks import store_info as info

    result = info(store)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else format_store_info(result))


@app.command("store-verify")
def store_verify(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL.")],
    sample: Annotated[
        int | None, typer.Option(help="Check this many random samples (default 1000).")
    ] = None,
    all_slots: Annotated[bool, typer.Option("--all", help="Check every sample.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Check every array of sampled slots (checksums, manifests, layout, finite values), then
    decode the stored crops (or re-render them from their specs, for stores without pixels) and
    check them against the stored digests; exit 1 on any mismatch of any kind."""
    from store.checks import store_verify as verify
    from store.checks import verify_failure

    result = verify(store, sample=None if all_slots else (sample or VERIFY_SAMPLE))
    typer.echo(json.dumps(result, default=str))
    failure = verify_failure(result)
    if failure:
        _fail(failure)


# ----------------------------------------------------------------------------- stage 2


@app.command("train-student")
def train_student(
    ctx: typer.Context,
    store: Annotated[str, typer.Option(help="Teacher store (path or fsspec URL).")],
    out: Annotated[Path, typer.Option(help="Run directory.")],
    model: Annotated[str, typer.Option(help="Student model name.")] = "distilpose_s",
    losses: Annotated[
        str,
        typer.Option(
            help="Loss terms, e.g. reg,kt,vt,sh,cs or reg=1,kt=5e-4; "
            "'reg' alone is the undistilled baseline."
        ),
    ] = "reg,kt,vt,sh,cs",
    epochs: Annotated[int, typer.Option(help="Training epochs (view = epoch mod views).")] = 300,
    batch_size: Annotated[int, typer.Option(help="Crops per step (per GPU).")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    warmup_iters: Annotated[int, typer.Option(help="Linear warmup steps.")] = 500,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    workers: Annotated[int, typer.Option(help="Data loader worker processes.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pth.")] = False,
    teacher_online: Annotated[
        Path | None,
        typer.Option(
            help="Run this teacher checkpoint at every step instead of reading the store's targets."
        ),
    ] = None,
    official_sh_weight: Annotated[
        bool, typer.Option(help="Reproduce the official batch-averaged simulated-heatmap weight.")
    ] = False,
    input_size: Annotated[
        str | None, typer.Option(help="Crop size WxH instead of the model's (must fit the store).")
    ] = None,
    schedule: Annotated[
        Schedule, typer.Option(help="step (paper: x0.1 at 2/3, 13/15) or cosine (short runs).")
    ] = Schedule.step,
    allow_store_change: Annotated[
        bool,
        typer.Option(help="With --resume: continue even if the store's views or identity changed."),
    ] = False,
    decode: Annotated[
        Decode,
        typer.Option(help="Where a JPEG pixel store's crops are decoded; auto = gpu on CUDA."),
    ] = Decode.auto,
    sync_bn: Annotated[
        bool,
        typer.Option(help="Under torchrun: BatchNorm statistics over all ranks' samples."),
    ] = True,
    ckpt_every_steps: Annotated[
        int, typer.Option(help="Also save last.pth every N steps (0: at epoch ends only).")
    ] = 0,
    val_ann: ValAnnOpt = None,
    val_images: ValImagesOpt = None,
    val_dets: ValDetsOpt = None,
    val_every: ValEveryOpt = None,
    ema: EmaOpt = None,
    accum_steps: AccumOpt = None,
    lr_scale: LrScaleOpt = None,
    backbone_weights: BackboneWeightsOpt = None,
    ann: Annotated[
        Path | None,
        typer.Option(
            help="The dataset's annotation file now (a store made with --pixels none).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,  # fmt: skip
    images: Annotated[
        Path | None,
        typer.Option(
            help="The dataset's image folder now (a store made with --pixels none).",
            exists=True,
            file_okay=False,
        ),
    ] = None,  # fmt: skip
    allow_incomplete: Annotated[
        bool | None,
        typer.Option("--allow-incomplete", help="Train on a store whose dump has not finished."),
    ] = None,
    verify_digest: Annotated[
        bool | None,
        typer.Option(
            "--verify-digest/--no-verify-digest",
            help="Check the annotation file given by --ann is the one the store was made from.",
        ),
    ] = None,
    amp_dtype: Annotated[
        AmpDtype | None, typer.Option(help="CUDA autocast dtype; auto = bf16 where supported.")
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last", help="CUDA: NHWC layout (faster convolutions)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a regression student from the teacher store (paper Eq. 7 losses)."""
    from student_train.train import train_student as train

    run = StudentRun(
        store,
        model,
        out,
        losses=losses,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_iters=warmup_iters,
        device=device.value,
        seed=seed,
        workers=workers,
        resume=resume,
        teacher_online=teacher_online,
        official_sh_weight=official_sh_weight,
        model_overrides=_size_overrides(input_size),
        schedule=schedule.value,
        allow_store_change=allow_store_change,
        decode=decode.value,
        sync_bn=sync_bn,
        ckpt_every_steps=ckpt_every_steps,
        **_given(
            val_ann=val_ann, val_images=val_images, val_dets=val_dets, val_every=val_every,
            ema=ema, accum_steps=accum_steps, lr_scale=lr_scale, backbone_weights=backbone_weights,
            ann_file=ann, images=images, allow_incomplete=allow_incomplete,
            verify_digest=verify_digest, amp_dtype=amp_dtype, channels_last=channels_last,
        ),
    )  # fmt: skip
    run = _resumed(ctx, run, STUDENT_OPTIONS)
    typer.echo(json.dumps(train(run), default=str))


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Student or teacher checkpoint.", exists=True)],
    ann: Annotated[Path, typer.Option(help="Val annotation file (COCO keypoints).", exists=True)],
    images: Annotated[Path, typer.Option(help="Val image folder.", exists=True, file_okay=False)],
    dets: Annotated[
        Path | None,
        typer.Option(help="Person detections (COCO results); GT boxes if unset.", exists=True),
    ] = None,
    det_score_thr: Annotated[float, typer.Option(help="Drop detections scoring below this.")] = 0.0,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Flip test.")] = True,
    flip_mode: Annotated[
        FlipMode,
        typer.Option(
            help="Students: corrected (x'=1-x-1/W, scores swapped) or official (released code)."
        ),
    ] = FlipMode.corrected,
    dark: Annotated[bool, typer.Option(help="Teachers: DARK refinement of heatmap peaks.")] = False,
    batch_size: Annotated[int, typer.Option(help="Crops per forward pass.")] = 32,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Results JSON (COCO format); default <ckpt>_results.json beside the checkpoint "
            "(in the working directory for the shipped demo teacher)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Top-down COCO keypoint evaluation (AP, AP50, AP75, APm, APl, AR) and speed."""
    from distilpose.inference.config import InferConfig
    from distilpose.inference.eval_run import format_metrics_table, run_eval

    infer = InferConfig(flip, flip_mode.value, dark, device=device.value, batch_size=batch_size)
    result = run_eval(
        checkpoint, ann, images, dets_file=dets, det_score_thr=det_score_thr, config=infer,
        out_json=out,
    )  # fmt: skip
    typer.echo(
        json.dumps(result, indent=2, default=str) if as_json else format_metrics_table(result)
    )


@app.command()
def ablate(
    store: Annotated[str, typer.Option(help="Teacher store, read only.")],
    out: Annotated[Path, typer.Option(help="Output folder: one run per combination, ablation.md.")],
    val_ann: Annotated[Path, typer.Option(help="Val annotation file.", exists=True)],
    val_images: Annotated[
        Path, typer.Option(help="Val image folder.", exists=True, file_okay=False)
    ],
    grid: Annotated[
        str,
        typer.Option(
            help="'table4' (the paper's Table 4), 'table6' (Table 6: reg / reg,sh / reg,sh,cs "
            "for a token-free student, the store's teacher as first row) or a TOML/JSON file."
        ),
    ] = "table4",
    val_dets: Annotated[
        Path | None, typer.Option(help="Val detections; GT boxes if unset.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Student model name [default: deeppose_tiny for table6, else distilpose_tiny]."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Crops per step.")] = 32,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Same seed for every run.")] = 0,
    parallel: Annotated[int, typer.Option(help="Runs at a time (one per CUDA device).")] = 1,
    input_size: Annotated[
        str | None, typer.Option(help="Crop size WxH instead of the model's (must fit the store).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Weights for the grid's terms, e.g. kt=1,vt=0.05 (default: paper's)."),
    ] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    schedule: Annotated[
        Schedule, typer.Option(help="step (paper: x0.1 at 2/3, 13/15) or cosine (short runs).")
    ] = Schedule.step,
    config: ConfigOpt = None,
) -> None:
    """Train and evaluate one student per loss combination; write a Markdown table like Table 4."""
    overrides = _size_overrides(input_size)
    model = model or ("deeppose_tiny" if grid == "table6" else "distilpose_tiny")
    from student_train.ablate import ablate as run

    table = run(
        store,
        grid,
        out,
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        val_ann=val_ann,
        val_images=val_images,
        val_dets=val_dets,
        device=device.value,
        seed=seed,
        parallel=parallel,
        model_overrides=overrides,
        weights=weights,
        lr=lr,
        schedule=schedule.value,
    )
    typer.echo(Path(table).read_text())


# ----------------------------------------------------------------------------- use


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Option(help="Student or teacher checkpoint.", exists=True)],
    source: Annotated[
        list[str],
        typer.Argument(
            help="Images, folders, globs ('shots/*.jpg'), or one video file or camera index (0).",
            show_default=False,
        ),
    ],
    detector: Annotated[
        str,
        typer.Option(
            help="Person detector: fasterrcnn_mobilenet_v3_large_fpn (fast), "
            "fasterrcnn_resnet50_fpn_v2 (accurate), or none (each image is one person).",
        ),
    ] = "fasterrcnn_mobilenet_v3_large_fpn",
    detector_weights: Annotated[
        Path | None,
        typer.Option(
            help="Local detector weights; default: torchvision's COCO weights (cached, or "
            "downloaded when online).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    det_thr: Annotated[float, typer.Option(help="Detection score threshold.")] = 0.5,
    det_size: Annotated[
        int | None,
        typer.Option(help="Detector input shorter side in px (default: the model's, 800)."),
    ] = None,
    max_people: Annotated[
        int, typer.Option(help="The detector keeps at most this many people per image.", min=1)
    ] = 100,
    boxes: Annotated[
        Path | None,
        typer.Option(
            help="Person boxes JSON [{file_name|image_id, bbox: [x,y,w,h], score}] instead of "
            "a detector.",
            exists=True,
        ),
    ] = None,
    box_thr: Annotated[
        float | None,
        typer.Option(help="Keep boxes scoring above this, detector or --boxes (default 0.3)."),
    ] = None,
    nms_thr: Annotated[
        float | None,
        typer.Option(help="Then drop boxes overlapping a kept one above this IoU (default 0.3)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="COCO-format results JSON.")] = Path("predictions.json"),
    overlay_dir: Annotated[
        Path | None,
        typer.Option(help="Write a PNG per image, or an annotated .mp4 for a video, here."),
    ] = None,
    max_frames: Annotated[
        int | None, typer.Option(help="Stop a video or camera after this many frames.")
    ] = None,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Flip test.")] = True,
    batch_size: Annotated[int, typer.Option(help="Person crops per forward pass.")] = 32,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    config: ConfigOpt = None,
) -> None:
    """Poses of every person in images, folders, globs, a video or a camera (detector in front)."""
    from distilpose.inference.config import InferConfig
    from distilpose.inference.detector import BoxesFile
    from distilpose.inference.inferencer import Inferencer
    from distilpose.inference.predict import predict_source

    inferencer = Inferencer(
        checkpoint, BoxesFile(boxes) if boxes is not None else detector,
        detector_weights=detector_weights, det_thr=det_thr, det_size=det_size,
        max_people=max_people,
        **_given(box_thr=box_thr, nms_thr=nms_thr),
        config=InferConfig(flip=flip, device=device.value, batch_size=batch_size),
    )  # fmt: skip
    summary = predict_source(
        inferencer, source, out_json=out, overlay_dir=overlay_dir, max_frames=max_frames
    )
    where = f"; overlays in {overlay_dir}" if summary["overlays"] else ""
    typer.echo(
        f"{summary['people']} people in {summary['frames']} frames -> {out}{where} "
        f"({summary['frames_per_s']:.1f} frames/s; per frame: detector "
        f"{summary['detector_ms_per_frame']:.0f} ms, pose {summary['pose_ms_per_frame']:.0f} ms)"
    )


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="Student or teacher checkpoint.", exists=True)],
    out: Annotated[Path, typer.Option(help="Output .onnx file.")],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    check: Annotated[
        bool, typer.Option(help="Compare ONNX Runtime with PyTorch afterwards.")
    ] = True,
    config: ConfigOpt = None,
) -> None:
    """Export a model to ONNX (needs the `export` extra: onnx, onnxruntime)."""
    from distilpose.inference.export import check_onnx, export_onnx

    path = export_onnx(checkpoint, out, opset=opset)
    typer.echo(f"wrote {path}")
    if check:
        diff = check_onnx(checkpoint, path)
        typer.echo(f"max |onnxruntime - torch| = {diff:.2e}")


@viz_app.command("heatmaps")
def viz_heatmaps(
    checkpoint: Annotated[Path, typer.Option(help="Student checkpoint.", exists=True)],
    store: Annotated[str, typer.Option(help="Teacher store.")],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("heatmaps.png"),
    sample: Annotated[int, typer.Option(help="Store sample (slot) to show.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Simulated heatmaps beside the teacher's, with sigma_x, sigma_y (paper Fig. 5)."""
    from distilpose.viz import viz_heatmaps as draw
    from store.reader import StoreReader

    reader = StoreReader.open(store)
    typer.echo(draw(checkpoint, reader, out, sample=sample))


@viz_app.command("confidence")
def viz_confidence(
    checkpoint: Annotated[Path, typer.Option(help="Student checkpoint.", exists=True)],
    ann: Annotated[Path, typer.Option(help="Annotation file.", exists=True)],
    images: Annotated[Path, typer.Option(help="Image folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("confidence.png"),
    instance: Annotated[int, typer.Option(help="Person index in the annotation file.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Joints labelled with their scores, green when correct, red when not (paper Fig. 6)."""
    from distilpose.viz import viz_confidence as draw

    typer.echo(draw(checkpoint, ann, images, out, instance=instance))


@viz_app.command("attention")
def viz_attention(
    checkpoint: Annotated[
        list[Path],
        typer.Option(help="Teacher or student checkpoint; repeat for one panel each.", exists=True),
    ],
    ann: Annotated[Path, typer.Option(help="Annotation file.", exists=True)],
    images: Annotated[Path, typer.Option(help="Image folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("attention.png"),
    instance: Annotated[int, typer.Option(help="Person index in the annotation file.")] = 0,
    keypoint: Annotated[
        str, typer.Option(help="Keypoint token to show (COCO name).")
    ] = "right_ankle",
    layer: Annotated[int, typer.Option(help="Encoder layer (negative counts from the end).")] = -1,
    config: ConfigOpt = None,
) -> None:
    """Attention of one keypoint token over the visual tokens (paper Fig. 3b)."""
    from distilpose.viz import render_instance
    from distilpose.viz import viz_attention as draw

    # rendered larger than any model input (same aspect) so the picture is sharp
    _, crop = render_instance(ann, images, instance, tuple(3 * v // 2 for v in PAPER.input_size))
    typer.echo(draw(checkpoint, crop.image, out, keypoint=keypoint, layer=layer))


@viz_app.command("predictions")
def viz_predictions(
    results: Annotated[
        Path, typer.Option(help="COCO results JSON from eval or predict.", exists=True)
    ],
    image: Annotated[Path, typer.Option(help="The image.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("predictions.png"),
    image_id: Annotated[
        int | None, typer.Option(help="Image id in the results (else by file).")
    ] = None,
    score_thr: Annotated[float, typer.Option(help="Hide joints scoring below this.")] = 0.3,
    config: ConfigOpt = None,
) -> None:
    """Every person's skeleton on a whole image."""
    from distilpose.viz import viz_predictions as draw

    typer.echo(draw(results, image, out, image_id=image_id, score_thr=score_thr))


@viz_app.command("curves")
def viz_curves(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory with metrics.csv.", exists=True, file_okay=False)
    ],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("curves.png"),
    config: ConfigOpt = None,
) -> None:
    """Training curves per loss term and AP per evaluation."""
    from distilpose.viz import viz_curves as draw

    typer.echo(draw(run_dir, out))


# ----------------------------------------------------------------------------- demo, bench


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run: the full one takes about 9 minutes on 2 quiet CPU cores, --quick
    under 3 (benchmarks/results/demo_run.md).

    The teacher is the shipped `tokenpose_demo` (trained once, `distilpose.weights`); it is
    dumped to a store, and two `distilpose_demo` students train from that store with the same
    seed, steps and schedule: one with the paper's full objective, one with `reg` alone. Crops
    are 96x128 (heatmap grid 24x32: perfect heatmaps would score AP ~0.92 there). The students
    train at the same time, one per core, each with one torch thread and no loader workers:
    on 2 cores, threads fighting over cores cost more than the model (measured 13x). Epochs
    fill the time left: about 15 s per epoch of 2,000 crops per student on a 2-core CPU.
    `teacher_*` fields are used by `--train-teacher` only.
    """

    num_train: int = 2000
    num_val: int = 600
    views: int = 2
    student_epochs: int = 35  # 8,750 steps of 8: many cheap steps beat fewer big ones here
    batch_size: int = 8
    lr: float = 3e-3  # at --quick's size: AP 0.059 here against 0.013 with 1e-3 and 16 per step
    # token terms weighted for this teacher's token scale (the paper's 5e-4 hardly moves them);
    # kt=1 pulled the student down (AP 0.153 at 20 epochs against 0.262 here: docs/notes.md)
    losses: str = "reg,kt=0.1,vt=0.1,sh,cs"
    teacher_num_train: int = DEMO_TEACHER_RECIPE["num_train"]
    teacher_epochs: int = DEMO_TEACHER_RECIPE["epochs"]


QUICK_DEMO = DemoPlan(
    num_train=1000, num_val=300, student_epochs=18, teacher_num_train=2000, teacher_epochs=2
)
STUDENT_RUNS = {"student_distilled": "losses", "student_baseline": "reg"}


def _demo_threads(parallel: int) -> int:
    """torch threads per process when `parallel` processes share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // parallel)


def _demo_student(job: dict) -> dict:
    """Train one demo student (in this process or a spawned one); returns the run summary."""
    import torch

    from student_train.train import train_student

    torch.set_num_threads(job["threads"])
    if job["quiet"]:
        os.environ["DISTILPOSE_NO_PROGRESS"] = "1"  # two bars at once would garble stderr
    return train_student(job["run"])


def train_demo_students(runs: list[StudentRun], device: str) -> list[dict]:
    """Train `runs` (their summaries back, in order): on a CPU with 2+ cores all at once, one
    process and one torch thread each, else one after another with every core."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from distilpose.device import resolve_device

    on_cpu = resolve_device(device).type == "cpu"
    parallel = len(runs) if on_cpu and (os.cpu_count() or 1) >= 2 else 1
    jobs = [{"run": r, "threads": _demo_threads(parallel), "quiet": parallel > 1} for r in runs]
    if parallel == 1:
        return [_demo_student(job) for job in jobs]
    with ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_demo_student, jobs))


def _demo_teacher(out: Path, plan: DemoPlan, device: str, say) -> Path:
    """--train-teacher: the shipped teacher's recorded recipe (sizes from the plan)."""
    from distilpose.data import MILD_RECIPE
    from distilpose.data import make_demo_data as make
    from teacher_dump.train import train_teacher as train_t

    r = DEMO_TEACHER_RECIPE
    say(f"teacher data: {plan.teacher_num_train} people, seed {r['data_seed']}")
    data = make(
        out / "teacher_data", num_train=plan.teacher_num_train, num_val=1, seed=r["data_seed"]
    )
    say(f"train teacher {r['model']}, {plan.teacher_epochs} epochs -> {out / 'teacher'}")
    train_t(
        TeacherRun(
            r["model"], data["train_ann"], data["train_images"], out / "teacher",
            epochs=plan.teacher_epochs, batch_size=r["batch_size"], lr=r["lr"],
            warmup_iters=r["warmup_iters"], device=device, seed=r["seed"], workers=1,
            resume=(out / "teacher" / "last.pth").exists(), recipe=MILD_RECIPE,
        )
    )  # fmt: skip
    return out / "teacher" / "teacher.pth"


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    device: str = "auto",
    seed: int = 0,
    log: bool = True,
    train_teacher: bool = False,
    plan: DemoPlan | None = None,
) -> list[dict]:
    """The mission end to end on demo data, through the very functions the commands call."""
    import torch

    from distilpose.data import MILD_RECIPE
    from distilpose.data import make_demo_data as make
    from distilpose.evaluation.metrics import keypoint_errors, load_coco
    from distilpose.inference.config import InferConfig
    from distilpose.inference.eval_run import run_eval
    from distilpose.models import build_from_checkpoint, model_info
    from distilpose.weights import demo_teacher_path
    from teacher_dump.dump import dump_teacher as dump

    plan = plan or (QUICK_DEMO if quick else DemoPlan())
    say = typer.echo if log else (lambda *a, **k: None)
    started = time.perf_counter()

    def step(text: str) -> None:
        say(f"[{time.perf_counter() - started:6.0f} s] {text}")

    step(f"demo data: {plan.num_train} train / {plan.num_val} val people -> {out / 'data'}")
    data = make(out / "data", num_train=plan.num_train, num_val=plan.num_val, seed=seed)
    if train_teacher:
        teacher_ckpt = _demo_teacher(out, plan, device, step)
    else:
        teacher_ckpt = demo_teacher_path()
        step(f"teacher: the shipped {teacher_ckpt.name} (sha256 checked)")
    step(f"dump teacher, {plan.views} views -> {out / 'store'}")
    dump(
        DumpRun(
            teacher_ckpt, data["train_ann"], data["train_images"], out / "store",
            views=plan.views, seed=seed, device=device, recipe=MILD_RECIPE, workers=0,
        )
    )  # fmt: skip
    runs = []
    for role, losses in STUDENT_RUNS.items():
        losses = plan.losses if losses == "losses" else losses
        step(f"train distilpose_demo from the store, losses {losses} -> {out / role}")
        runs.append(
            StudentRun(
                out / "store", "distilpose_demo", out / role,
                losses=losses, epochs=plan.student_epochs, batch_size=plan.batch_size,
                lr=plan.lr, schedule="cosine", device=device, seed=seed, workers=0,
                resume=(out / role / "last.pth").exists(),
            )
        )  # fmt: skip
    train_demo_students(runs, device)
    torch.set_num_threads(_demo_threads(1))
    rows = []
    coco = load_coco(data["val_ann"])
    checkpoints = {"teacher": teacher_ckpt, **{r: out / r / "student.pth" for r in STUDENT_RUNS}}
    for role, ckpt in checkpoints.items():
        step(f"eval {role} on the val split (detections, flip test)")
        results_json = out / "results" / f"{role}.json"
        result = run_eval(
            ckpt, data["val_ann"], data["val_images"], dets_file=data["val_dets"],
            config=InferConfig(device=device), out_json=results_json,
        )  # fmt: skip
        errors = keypoint_errors(coco, json.loads(results_json.read_text()))
        info = model_info(build_from_checkpoint(ckpt, map_location="cpu")[0])
        rows.append(
            {
                "model": result["model"],
                "role": role,
                "params": info["params"],
                "gflops": round(info["gflops"], 4),
                "ap": result["AP"],
                "ap50": result["AP50"],
                "ap75": result["AP75"],
                "pck": round(errors["PCK"], 4),
                "pixel_error": round(errors["pixel_error"], 2),
                "samples_per_s": result["samples_per_s"],
            }
        )
    (out / "demo_table.json").write_text(json.dumps(rows, indent=2))
    step(f"done; table in {out / 'demo_table.json'}")
    return rows


def format_demo_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<16} {'role':<18} {'params':>9} {'GFLOPs':>7} {'AP':>6} {'AP50':>6} "
        f"{'AP75':>6} {'PCK@.05':>8} {'px err':>7} {'samples/s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<16} {r['role']:<18} {r['params']:>9,} {r['gflops']:>7.3f} "
            f"{r['ap']:>6.3f} {r['ap50']:>6.3f} {r['ap75']:>6.3f} {r['pck']:>8.3f} "
            f"{r['pixel_error']:>7.2f} {r['samples_per_s']:>10.1f}"
        )
    lines.append(
        "AP: COCO keypoint AP (detections, flip test); PCK@.05: joints within 5% of the box's "
        "longer side; px err: mean joint error in image pixels"
    )
    return "\n".join(lines)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for everything the demo makes.")] = Path(
        "demo_run"
    ),
    quick: Annotated[
        bool, typer.Option(help="Smaller data and fewer epochs (about 3 minutes).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final table as JSON.")] = False,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Seed of data, store and training.")] = 0,
    train_teacher: Annotated[
        bool,
        typer.Option(
            help="Train the teacher with the shipped one's recorded recipe instead of loading it "
            "(about 90 min on 2 CPU cores; with --quick a 2-epoch plumbing check)."
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """The whole job on built-in demo data: data, teacher, store, two students, eval, table."""
    rows = run_demo(
        out, quick=quick, device=device.value, seed=seed, log=not as_json,
        train_teacher=train_teacher,
    )  # fmt: skip
    typer.echo(json.dumps(rows, indent=2) if as_json else format_demo_table(rows))


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Fewer iterations.")] = False,
    only: Annotated[str | None, typer.Option(help="Comma list: model,store,dump,train.")] = None,
    gpu: Annotated[
        bool, typer.Option(help="Run the GPU check instead (python -m benchmarks.gpu).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="With --gpu: the same code on CPU with tiny models.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Run every benchmark and write benchmarks/results/latest.md (--gpu: the GPU check)."""
    if gpu:
        from benchmarks.gpu import main as gpu_check

        raise typer.Exit(gpu_check(["--dry-run"] if dry_run else []))
    from benchmarks.__main__ import main as run_benchmarks

    args = (["--quick"] if quick else []) + (["--only", only] if only else [])
    raise typer.Exit(run_benchmarks(args))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
