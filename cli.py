"""The `distilpose` command line: one command per verb, each a thin call into a stage package.

Every command takes `--config FILE` (TOML, or YAML when PyYAML is installed): its keys are the
command's option names (dashes or underscores), optionally inside a table named after the
command; options given on the command line win over the file. Every command runs inside one
error handler (`cli_support.OneLineErrors`): whatever fails prints one line `error: ...` and
exits with code 1; `--debug` or DISTILPOSE_DEBUG=1 adds the traceback. The options of a run
command (train-teacher, dump-teacher, train-student) default to None: only the options given
reach the run, whose type holds every default (`cli_support.RunOptions`).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

import cli_support as support
from cli_support import (
    DEBUG_ENV,
    DUMP_OPTIONS,
    STUDENT_OPTIONS,
    TEACHER_OPTIONS,
    AccumOpt,
    AmpDtype,
    Augment,
    BackboneWeightsOpt,
    ConfigOpt,
    Decode,
    Device,
    EmaOpt,
    FlipMode,
    LrScaleOpt,
    OneLineErrors,
    Pixels,
    Schedule,
    StoreMode,
    ValAnnOpt,
    ValDetsOpt,
    ValEveryOpt,
    ValImagesOpt,
    fail,
    given,
    parse_size,
    run_option,
    size_overrides,
)
from cli_viz import viz_app
from distilpose.training.runs import DumpRun, StudentRun, TeacherRun

app = typer.Typer(
    cls=OneLineErrors,
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


app.add_typer(viz_app, name="viz")


VERIFY_SAMPLE = 1000  # store-verify's default sample: a minute on a laptop, --all for everything


_teacher = partial(run_option, TeacherRun)  # an option of a run field, its default in the help
_dump = partial(run_option, DumpRun)
_student = partial(run_option, StudentRun)
T, S = support.TrainOpts(TeacherRun), support.TrainOpts(StudentRun)  # the options both share


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def _echo_json(obj: Any) -> None:
    typer.echo(_json_text(obj))


# ----------------------------------------------------------------------------- models


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """List the built-in models with params and GFLOPs measured now (1 crop at their input size)."""
    from distilpose.models.complexity import format_model_infos, list_model_infos

    infos = list_model_infos()
    if as_json:
        _echo_json(infos)
        return
    typer.echo(format_model_infos(infos))


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
    size = parse_size(input_size, "--input-size")
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
    ] = "tokenpose_tiny",  # TeacherRun.model has no default: this one is the command line's
    epochs: T.epochs = None,
    batch_size: T.batch_size = None,
    lr: T.lr = None,
    warmup_iters: Annotated[
        int | None, _teacher("warmup_iters", "Linear warmup steps (at most a quarter of the run).")
    ] = None,
    device: T.device = None,
    seed: Annotated[
        int | None, _teacher("seed", "Seed of augmentation and initialisation.")
    ] = None,
    workers: T.workers = None,
    resume: T.resume = None,
    input_size: Annotated[
        str | None, typer.Option(help="Crop size WxH instead of the model's (e.g. 48x64).")
    ] = None,
    augment: Annotated[
        Augment | None,
        typer.Option(
            help="paper (the teacher recipe) or mild (flip, small scale) (default: paper)."
        ),
    ] = None,
    sync_bn: T.sync_bn = None,
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

    run = TEACHER_OPTIONS.run(ctx.params)
    typer.echo(json.dumps(train(run), default=str))


@app.command("dump-teacher")
def dump_teacher(
    ctx: typer.Context,
    teacher: Annotated[
        Path, typer.Option(help="Teacher checkpoint (official or ours).", exists=True)
    ],
    ann: Annotated[Path, typer.Option(help="Train annotation file (COCO keypoints).", exists=True)],
    images: Annotated[Path, typer.Option(help="Train image folder.", exists=True, file_okay=False)],
    out: Annotated[str, typer.Option(help="Store directory (created, or resumed if it exists).")],
    views: Annotated[
        int | None, _dump("views", "Augmented views per person; raise later to add views.")
    ] = None,
    seed: Annotated[
        int | None, _dump("seed", "Store seed: crop specs come from (seed, person, view).")
    ] = None,
    batch_size: Annotated[
        int | None, _dump("batch_size", "Crops per teacher forward pass.")
    ] = None,
    workers: Annotated[
        int | None, _dump("workers", "Processes decoding and warping images.")
    ] = None,
    device: Annotated[Device | None, _dump("device", "auto = CUDA when available.")] = None,
    shard: Annotated[str | None, _dump("shard", "Fill part i of n of the store, e.g. 0/2.")] = None,
    model: Annotated[str | None, typer.Option(help="Teacher model name if not recognised.")] = None,
    mode: Annotated[
        StoreMode | None,
        _dump("mode", "fp16 (exact half), lossy, compact (new: compact-hq), compact-s|m|l|xl."),
    ] = None,
    chunk_samples: Annotated[int | None, _dump("chunk_samples", "Samples per zarr chunk.")] = None,
    augment: Annotated[
        Augment | None,
        typer.Option(
            help="paper (the student recipe) or mild (flip, small scale) (default: paper)."
        ),
    ] = None,
    pixels: Annotated[
        Pixels | None,
        _dump(
            "pixels",
            "Keep each crop in the store (jpeg, lossless) so students train without the images; "
            "the teacher sees the decoded crop. canvas: each person's region once (JPEG), every "
            "view warped from it (bytes do not grow with --views). none: re-render from the "
            "images. auto: canvas from 3 views on, else jpeg (an existing store keeps its own).",
        ),
    ] = None,
    jpeg_quality: Annotated[
        int | None,
        typer.Option(
            help="JPEG quality of kept crops, 1-100 (default: store.schema.JPEG_QUALITY)."
        ),
    ] = None,
    raw_targets: Annotated[
        bool | None,
        typer.Option(
            "--raw-targets",
            help="fp16 teacher outputs without zstd: 8% more bytes, no decompression on reads.",
        ),
    ] = None,
    storage_options: support.StorageOpt = None,
    cluster: support.ClusterOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run the teacher once over seeded augmented crops and write its outputs to a zarr store."""
    from teacher_dump import dump_teacher as dump

    run = DUMP_OPTIONS.run(ctx.params)
    typer.echo(json.dumps(dump(run), default=str))


# ----------------------------------------------------------------------------- store


@app.command("store-info")
def store_info(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    storage_options: support.StorageOpt = None,
    cluster: support.ClusterOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Samples and views complete, bytes (pixels too), compression, teacher confidence, NaN/Inf."""
    from store.checks import format_store_info
    from store.checks import store_info as info

    result = info(store, storage_options, cluster=cluster)
    typer.echo(_json_text(result) if as_json else format_store_info(result))


@app.command("store-verify")
def store_verify(
    store: Annotated[str, typer.Argument(help="Store path or fsspec URL.")],
    sample: Annotated[
        int | None, typer.Option(help="Check this many random samples (default 1000).")
    ] = None,
    all_slots: Annotated[bool, typer.Option("--all", help="Check every sample.")] = False,
    accept_metadata: support.AcceptMetadataOpt = False,
    storage_options: support.StorageOpt = None,
    cluster: support.ClusterOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check sampled slots (signatures, checksums, manifests, layout, crop digests); exit 1."""
    from store.checks import store_verify as verify
    from store.checks import verify_failure

    support.accept_metadata(store, storage_options, accept_metadata)
    sample = None if all_slots else (sample or VERIFY_SAMPLE)
    result = verify(store, sample=sample, storage_options=storage_options, cluster=cluster)
    typer.echo(json.dumps(result, default=str))
    if failure := verify_failure(result):
        fail(failure)


# ----------------------------------------------------------------------------- stage 2


@app.command("train-student")
def train_student(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run directory.")],
    store: Annotated[str | None, typer.Option(help="Teacher store; none: crops of --ann.")] = None,
    augment: Annotated[Augment | None, typer.Option(help="No --store: the crop recipe.")] = None,
    model: Annotated[str | None, _student("model", "Student model name.")] = None,
    losses: Annotated[
        str | None, _student("losses", "Loss terms, e.g. reg,kt=5e-4; 'reg' alone: the baseline.")
    ] = None,
    epochs: S.epochs = None,
    views: Annotated[int | None, _student("views", "Train on the store's first N views.")] = None,
    batch_size: S.batch_size = None,
    lr: S.lr = None,
    warmup_iters: Annotated[
        int | None,
        typer.Option(
            help="Linear warmup steps (default: the paper's 500, at most a tenth of the run)."
        ),
    ] = None,
    device: S.device = None,
    seed: Annotated[int | None, _student("seed", "Seed of initialisation and data order.")] = None,
    workers: S.workers = None,
    resume: S.resume = None,
    teacher_online: Annotated[
        Path | None, typer.Option(help="Run this teacher on every batch instead of stored targets.")
    ] = None,
    official_sh_weight: Annotated[
        bool | None,
        _student("official_sh_weight", "The official batch-averaged simulated-heatmap weight."),
    ] = None,
    input_size: Annotated[
        str | None, typer.Option(help="Crop size WxH instead of the model's (must fit the store).")
    ] = None,
    schedule: Annotated[
        Schedule | None,
        _student("schedule", "step (paper: x0.1 at 2/3, 13/15) or cosine (short runs)."),
    ] = None,
    allow_store_change: Annotated[
        bool | None,
        _student("allow_store_change", "With --resume: go on though the store's views changed."),
    ] = None,
    decode: Annotated[
        Decode | None,
        _student("decode", "Where a JPEG pixel store's crops are decoded; auto = gpu on CUDA."),
    ] = None,
    sync_bn: S.sync_bn = None,
    ckpt_every_steps: Annotated[
        int | None,
        _student("ckpt_every_steps", "Also save last.pth every N steps (0: at epoch ends only)."),
    ] = None,
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
            help="Annotations (--pixels none store, or no --store).", exists=True, dir_okay=False
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Image folder (--pixels none store, or no --store).", exists=True, file_okay=False
        ),
    ] = None,
    allow_incomplete: Annotated[
        bool | None,
        _student("allow_incomplete", "Train on an unfinished store.", "--allow-incomplete"),
    ] = None,
    verify_digest: Annotated[
        bool | None,
        _student("verify_digest", "Check --ann is the file the store was made from."),
    ] = None,
    amp_dtype: Annotated[
        AmpDtype | None, _student("amp_dtype", "CUDA autocast dtype; auto = bf16 where supported.")
    ] = None,
    channels_last: Annotated[
        bool | None,
        _student("channels_last", "CUDA: NHWC layout (faster convolutions).", "--channels-last"),
    ] = None,
    input_jitter: Annotated[
        float | None,
        _student(
            "input_jitter",
            "Cheap views: colour change and noise of this strength (0-1) on the student's "
            "input alone, new every step; no keypoint moves, stored targets stay exact.",
        ),
    ] = None,
    storage_options: support.StorageOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train a regression student from a teacher store (Eq. 7 losses), or without one from --ann."""
    from student_train.train import train_student as train

    run = STUDENT_OPTIONS.run(ctx.params)
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
    typer.echo(_json_text(result) if as_json else format_metrics_table(result))


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
        str | None, typer.Option(help="Student (default: deeppose_tiny for table6, else _tiny).")
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
    from student_train.ablate import ablate as run

    table = run(
        store, grid, out, model=model, epochs=epochs, batch_size=batch_size, val_ann=val_ann,
        val_images=val_images, val_dets=val_dets, device=device.value, seed=seed,
        parallel=parallel, model_overrides=size_overrides(input_size), weights=weights, lr=lr,
        schedule=schedule.value,
    )  # fmt: skip
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
    from distilpose.inference.predict import format_predict_summary, predict_source

    inferencer = Inferencer(
        checkpoint, BoxesFile(boxes) if boxes is not None else detector,
        detector_weights=detector_weights, det_thr=det_thr, det_size=det_size,
        max_people=max_people,
        **given(box_thr=box_thr, nms_thr=nms_thr),
        config=InferConfig(flip=flip, device=device.value, batch_size=batch_size),
    )  # fmt: skip
    summary = predict_source(
        inferencer, source, out_json=out, overlay_dir=overlay_dir, max_frames=max_frames
    )
    typer.echo(format_predict_summary(summary, out, overlay_dir))


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


# ----------------------------------------------------------------------------- demo, bench


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for all the demo makes.")] = Path("demo_run"),
    quick: Annotated[bool, typer.Option(help="Smaller data, fewer epochs (about 3 min).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final table as JSON.")] = False,
    device: Annotated[Device, typer.Option(help="auto = CUDA when available.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Seed of data, store and training.")] = 0,
    train_teacher: Annotated[
        bool,
        typer.Option(help="Train the teacher by the shipped one's recipe (90 min on 2 cores)."),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """The whole job on built-in demo data: data, teacher, store, two students, eval, table."""
    from demo import format_demo_table, run_demo

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
