"""`distilpose eval`: a checkpoint, a COCO annotation file and images in; COCO keypoint AP out.

The protocol is the official top-down one: GT boxes or person detections, evaluation crops,
flip test, rescoring (box score x mean keypoint score above 0.2), OKS-NMS at 0.9, pycocotools.
The predictions are written as a COCO results JSON (by default `<ckpt_stem>_results.json` next to
the checkpoint, or in the working directory for a checkpoint shipped inside the package) so
that other tools can score or draw them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn

from distilpose.data import load_coco_instances
from distilpose.device import resolve_device
from distilpose.errors import BadConfigError
from distilpose.evaluation.metrics import coco_keypoint_eval, load_coco, oks_nms, to_coco_results
from distilpose.inference.config import InferConfig
from distilpose.inference.topdown import default_use_scores, predict_instances
from distilpose.io import write_json_atomic
from distilpose.models import build_from_checkpoint

log = logging.getLogger(__name__)

OKS_NMS_THR = 0.9  # MMPose 0.x / official DistilPose test config


def default_results_json(checkpoint: Path) -> Path:
    """`<ckpt_stem>_results.json` beside the checkpoint; in the working directory when the
    checkpoint ships inside this package, whose folder is not the user's to write in."""
    name = f"{checkpoint.stem}_results.json"
    packaged = checkpoint.resolve().is_relative_to(Path(__file__).resolve().parents[1])
    return Path(name) if packaged else checkpoint.with_name(name)


def run_eval(
    checkpoint: str | Path,
    ann_file: str | Path,
    image_root: str | Path,
    *,
    dets_file: str | Path | None = None,
    det_score_thr: float = 0.0,
    config: InferConfig = InferConfig(),
    out_json: str | Path | None = None,
    num_workers: int = 0,
) -> dict:
    """Evaluate a student or teacher checkpoint with COCO keypoint AP.

    Args:
        checkpoint: this project's checkpoint or an official MMPose 0.x one.
        ann_file: COCO person-keypoints annotations (the ground truth).
        image_root: folder the annotation's `file_name`s are relative to.
        dets_file: person detections (COCO results format); None -> ground-truth boxes.
        det_score_thr: detections scoring below it are dropped.
        config: the test-time settings (`InferConfig`); its `use_scores=None` is read from the
            checkpoint meta: False for a student trained without the confidence loss "cs" (its
            untrained score must not rank people), else True.
        out_json: where the COCO results go; default `<ckpt_stem>_results.json` beside the
            checkpoint (in the working directory for a packaged one, e.g. the demo teacher).

    Returns:
        {"model", "role", "AP", "AP50", "AP75", "APm", "APl", "AR", "samples_per_s",
        "forward_samples_per_s", "device", "num_instances", "num_results", "results_json",
        "use_scores", "flip", "flip_mode", "dark", "boxes"}.
    """
    checkpoint = Path(checkpoint)
    model, meta = build_from_checkpoint(checkpoint, map_location="cpu")
    return evaluate_model(
        model,
        meta,
        ann_file,
        image_root,
        dets_file=dets_file,
        det_score_thr=det_score_thr,
        config=config,
        out_json=Path(out_json) if out_json else default_results_json(checkpoint),
        num_workers=num_workers,
        name=checkpoint.name,
    )


def evaluate_model(
    model: nn.Module,
    meta: dict,
    ann_file: str | Path,
    image_root: str | Path,
    *,
    out_json: str | Path,
    dets_file: str | Path | None = None,
    det_score_thr: float = 0.0,
    config: InferConfig = InferConfig(),
    num_workers: int = 0,
    name: str = "model",
) -> dict:
    """`run_eval` on a model in memory (validation while training); `meta` is what its
    checkpoint would hold (for the default `use_scores`). The model is left in eval mode."""
    dev = resolve_device(config.device)
    if config.use_scores is None:
        config = replace(config, use_scores=default_use_scores(model.config.role, meta))
        if not config.use_scores:
            log.warning(
                "%s: student trained without the confidence loss 'cs' (losses %s): ranking "
                "people by box score only (use_scores=False)",
                name,
                meta.get("losses"),
            )
    width, height = model.config.input_size
    instances = load_coco_instances(
        ann_file,
        image_root,
        dets_file=dets_file,
        det_score_thr=det_score_thr,
        aspect_ratio=width / height,
    )
    stats: dict = {}
    predictions = predict_instances(
        model,
        instances,
        replace(config, device=dev),
        num_workers=num_workers,
        stats=stats,
        desc=f"eval {model.config.name}",
    )
    kept = [predictions[i] for i in oks_nms(predictions, thr=OKS_NMS_THR)]
    results = to_coco_results(kept)
    write_json_atomic(out_json, results)
    metrics = coco_keypoint_eval(load_coco(ann_file), results)
    return {
        "model": model.config.name,
        "role": model.config.role,
        **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APm", "APl", "AR")},
        "samples_per_s": stats.get("samples_per_s", 0.0),
        "forward_samples_per_s": stats.get("forward_samples_per_s", 0.0),
        "device": str(dev),
        "num_instances": len(instances),
        "num_results": len(results),
        "results_json": str(out_json),
        "use_scores": bool(config.use_scores),
        "flip": config.flip,
        "flip_mode": config.flip_mode,
        "dark": config.dark,
        "boxes": "detections" if dets_file else "ground truth",
    }


def format_metrics_table(result: dict) -> str:
    """A readable summary of `run_eval`'s result for the console."""
    header = ["AP", "AP50", "AP75", "APm", "APl", "AR"]

    def cell(v: float) -> str:
        return "n/a" if v < 0 else f"{100 * v:.1f}"

    rows = [
        " | ".join(f"{h:>5}" for h in header),
        " | ".join(f"{cell(result[h]):>5}" for h in header),
    ]
    flip = "off"
    if result.get("flip"):
        flip = "on" if result.get("role") == "teacher" else f"on ({result.get('flip_mode')})"
    lines = [
        f"model {result['model']} ({result['role']}), {result['num_instances']} people "
        f"({result.get('boxes', '?')} boxes), flip test {flip}"
        + (", DARK" if result.get("dark") else "")
        + ("" if result.get("use_scores", True) else ", ranked by box score only"),
        *rows,
        f"speed on {result['device']}: {result['samples_per_s']:.1f} samples/s end to end, "
        f"{result.get('forward_samples_per_s', 0.0):.1f} samples/s model only",
        f"results: {result['results_json']}",
    ]
    return "\n".join(lines)


def coco_validator(
    ann_file: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    meta: dict,
    *,
    dets_file: str | Path | None = None,
    batch_size: int = 32,
) -> Callable[[nn.Module], dict]:
    """The trainer's `validate`: `evaluate_model` with `eval`'s defaults (flip test, OKS-NMS,
    pycocotools) on `ann_file`, its results in out_dir/val_results.json. The files are
    checked here, before training starts."""
    for what, path in (("val_ann", ann_file), ("val_images", image_root), ("val_dets", dets_file)):
        if path is not None and not Path(path).exists():
            raise BadConfigError(f"{what}: {path} does not exist; expected a file or folder")

    def validate(model: nn.Module) -> dict:
        device = next(model.parameters()).device
        return evaluate_model(
            model,
            meta,
            ann_file,
            image_root,
            dets_file=dets_file,
            config=InferConfig(batch_size=batch_size, device=device),
            out_json=Path(out_dir) / "val_results.json",
            name=str(meta.get("model", "model")),
        )

    return validate
