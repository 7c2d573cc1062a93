"""`distilpose predict`: every person's pose in images, folders, globs, videos or a camera.

One path: `predict_source` opens the SOURCE (`distilpose.inference.sources`), runs an
`Inferencer` (detector in front, `distilpose.inference.detector`; or a boxes file; or the whole
image as one person) and writes what it returns:

- a COCO keypoint results JSON (`image_id`, `category_id` 1, flat `keypoints`, `score`, plus
  `bbox`, `file_name` and, for video frames, `frame_index`; a frame's `image_id` is its index);
- optionally overlays in `overlay_dir`: one PNG per image (`<stem>_pose.png`), or for a video or
  camera one annotated video (`<stem>_pose.mp4`, OpenCV's writer, the source's frame rate), with
  each person's box, skeleton and joints above `kpt_thr`;
- a progress bar with frames/s, and a summary with the detector's share of the time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from distilpose.errors import BadAnnotationError, BadImageError
from distilpose.inference.detector import BoxesFile
from distilpose.inference.sources import ImageSource, VideoSource, open_source
from distilpose.io import write_json_atomic
from distilpose.progress import ProgressCounter

if TYPE_CHECKING:  # predict_source takes one; building it is the caller's (the CLI, a script)
    from distilpose.inference.inferencer import Inferencer

KPT_DRAW_THR = 0.3
VIDEO_FOURCC = "mp4v"  # in every OpenCV FFmpeg build; H.264 encoders often are not


def _video_writer(path: Path, fps: float, image: np.ndarray) -> cv2.VideoWriter:
    h, w = image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*VIDEO_FOURCC), fps or 30.0, (w, h))
    if not writer.isOpened():
        raise BadImageError(f"{path}: OpenCV cannot write a {VIDEO_FOURCC} video here")
    return writer


def predict_source(
    inferencer: Inferencer,
    sources: str | Path | int | list[str | Path | int],
    *,
    out_json: str | Path = "predictions.json",
    overlay_dir: str | Path | None = None,
    max_frames: int | None = None,
    kpt_thr: float = KPT_DRAW_THR,
) -> dict:
    """Predict every person's keypoints in SOURCE(s) with `inferencer` and write the outputs
    (module docstring).

    Args:
        inferencer: the detector (or boxes file) and pose model, with its `InferConfig`.
        sources: images, folders, globs, or one video file or camera index.
        max_frames: stop a video or camera after this many frames.
        kpt_thr: overlays draw joints scoring above it.

    Returns:
        {"results": the COCO results written, "frames", "people", "seconds", "frames_per_s",
        "detector_ms_per_frame", "pose_ms_per_frame", "out_json", "overlays": [paths]}
        (timings of this call only).
    """
    source = open_source(sources, max_frames=max_frames)
    frames_per_batch, before = inferencer.frames_per_batch, dict(inferencer.timings)
    if isinstance(source, VideoSource) and source.camera:
        inferencer.frames_per_batch = 1  # live: answer every frame as it comes
    try:
        return _write_outputs(inferencer, source, Path(out_json), overlay_dir, kpt_thr, before)
    finally:
        inferencer.frames_per_batch = frames_per_batch


def _write_outputs(
    inferencer: Inferencer,
    source: ImageSource | VideoSource,
    out_json: Path,
    overlay_dir: str | Path | None,
    kpt_thr: float,
    before: dict,
) -> dict:
    overlay = Path(overlay_dir) if overlay_dir is not None else None
    if overlay is not None:
        overlay.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    written: list[str] = []
    writer: cv2.VideoWriter | None = None
    started = time.perf_counter()
    with ProgressCounter(len(source) or None, desc="predict", unit="frames") as bar:
        try:
            for frame, result in inferencer.stream(source):
                results.extend(result.to_coco())
                if overlay is not None:
                    canvas = result.draw(frame.image, kpt_thr)
                    if isinstance(source, VideoSource):
                        if writer is None:
                            target = overlay / f"{source.stem}_pose.mp4"
                            writer = _video_writer(target, source.fps, canvas)
                            written.append(str(target))
                        writer.write(canvas)
                    else:
                        target = overlay / f"{Path(frame.name).stem}_pose.png"
                        if not cv2.imwrite(str(target), canvas):
                            raise BadImageError(f"{target}: could not write the overlay image")
                        written.append(str(target))
                bar.advance()
        except KeyboardInterrupt:
            if not (isinstance(source, VideoSource) and source.camera):
                raise
            # a camera runs until stopped: Ctrl-C ends it and keeps what was seen
        finally:
            if writer is not None:
                writer.release()
    seconds = time.perf_counter() - started
    boxes_file = inferencer.detector if isinstance(inferencer.detector, BoxesFile) else None
    read = inferencer.timings["frames"] - before["frames"]
    if boxes_file is not None and not boxes_file.matched and read:
        raise BadAnnotationError(
            f"{boxes_file.path}: no entry names any of the {read} "
            f"{'frames' if isinstance(source, VideoSource) else 'images'} read; expected entries "
            "whose 'file_name' (base name) or 'image_id' (image id or frame index) match them"
        )
    write_json_atomic(out_json, results)
    spent = {k: v - before[k] for k, v in inferencer.timings.items()}
    frames = spent["frames"]
    per_frame = 1000.0 / frames if frames else 0.0
    return {
        "results": results,
        "frames": frames,
        "people": len(results),
        "seconds": seconds,
        "frames_per_s": frames / seconds if seconds > 0 else 0.0,
        "detector_ms_per_frame": spent["detector_s"] * per_frame,
        "pose_ms_per_frame": spent["pose_s"] * per_frame,
        "out_json": str(out_json),
        "overlays": written,
    }


def format_predict_summary(summary: dict, out_json: object, overlay_dir: object) -> str:
    """`predict_source`'s summary as the one line `distilpose predict` prints."""
    where = f"; overlays in {overlay_dir}" if summary["overlays"] else ""
    return (
        f"{summary['people']} people in {summary['frames']} frames -> {out_json}{where} "
        f"({summary['frames_per_s']:.1f} frames/s; per frame: detector "
        f"{summary['detector_ms_per_frame']:.0f} ms, pose {summary['pose_ms_per_frame']:.0f} ms)"
    )
