"""End-to-end `distilpose predict` on a 640x480 video: detector + pose model + drawing, on CPU.

    python -m benchmarks.predict_bench [--quick] [--frames N]

What users run: `predict_source` (the code behind `distilpose predict`) on a synthetic demo
video (1-3 people per frame, OpenCV's writer), writing the results JSON and an annotated video,
flip test on (the default). Pose models: DistilPose-S and its teacher TokenPose-L/W48, randomly
initialised (speed does not depend on the weights). The detector in front is torchvision's
`fasterrcnn_mobilenet_v3_large_fpn` at its default input size (800 px shorter side), also
randomly initialised, since no released weights can be downloaded here: it runs its full
forward pass on every frame, but its random boxes are replaced by the frame's ground-truth
boxes, so that both pose models see the same people (a trained detector finds about the same).
Detector, pose and drawing + video writing are timed apart; a second table times the detectors
alone (the accurate `fasterrcnn_resnet50_fpn_v2` too). Writes benchmarks/results/predict_bench.md
and the short table between the README's `<!-- predict-bench -->` markers; `run(quick)` returns
the Markdown section. The machine may be shared with other work: compare
the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import update_readme_block
from distilpose.data.demo import make_demo_video
from distilpose.inference.config import InferConfig
from distilpose.inference.detector import BoxesFile, TorchvisionDetector
from distilpose.inference.inferencer import Inferencer
from distilpose.inference.predict import predict_source
from distilpose.inference.sources import open_source
from distilpose.models import build_model, save_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
POSE_MODELS = ["distilpose_s", "tokenpose_l_w48"]
DETECTORS = [
    ("fasterrcnn_mobilenet_v3_large_fpn", None),
    ("fasterrcnn_mobilenet_v3_large_fpn", 480),
    ("fasterrcnn_resnet50_fpn_v2", None),
]
SIZE = (640, 480)


class TimedStandIn:
    """Runs a real (random-weight) detector on every frame for its time, and returns the
    frame's ground-truth boxes as the people found."""

    def __init__(self, detector: TorchvisionDetector, boxes: BoxesFile) -> None:
        self.detector, self.boxes = detector, boxes

    def __call__(self, frames):
        self.detector(frames)
        return self.boxes(frames)


def _detector_ms(name: str, size: int | None, video: Path, frames: int) -> float:
    """Fastest per-frame time of the detector alone over `frames` frames (the first one warms
    up: take at least 2)."""
    detector = TorchvisionDetector(name, "random", size=size, device="cpu")
    images = list(open_source(video, max_frames=frames))
    times = []
    for frame in images:
        started = time.perf_counter()
        detector([frame])
        times.append(time.perf_counter() - started)
    return 1000.0 * min(times)


def run(quick: bool = False, frames: int | None = None) -> str:
    frames = frames or (3 if quick else 8)
    started = time.perf_counter()
    torch.manual_seed(0)
    rows, det_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        video = make_demo_video(root / "people.mp4", num_frames=frames, size=SIZE, seed=1)
        people = len(json.loads(Path(video["ann"]).read_text())["annotations"])
        detector = TorchvisionDetector(DETECTORS[0][0], "random", device="cpu")
        stand_in = TimedStandIn(detector, BoxesFile(video["boxes"]))
        for name in POSE_MODELS:
            ckpt = root / f"{name}.pth"
            save_checkpoint(ckpt, build_model(name), meta={"losses": ["reg", "cs"]})
            inferencer = Inferencer(ckpt, stand_in, config=InferConfig(device="cpu"))
            summary = predict_source(
                inferencer,
                [str(video["video"])],
                out_json=root / f"{name}.json",
                overlay_dir=root / name,
            )
            n = summary["frames"]
            det_ms, pose_ms = summary["detector_ms_per_frame"], summary["pose_ms_per_frame"]
            total_ms = 1000.0 * summary["seconds"] / n
            rest_ms = total_ms - det_ms - pose_ms
            rows.append((name, n, summary["frames_per_s"], det_ms, pose_ms, rest_ms))
        for det_name, size in DETECTORS:
            ms = _detector_ms(det_name, size, video["video"], 2 if quick else 3)
            det_rows.append((det_name, size, ms))
    lines = [
        "## predict: end to end on a 640x480 video (CPU)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {frames} frames of a "
        f"synthetic demo video, {people} people in all; flip test on; detector "
        f"`{DETECTORS[0][0]}` at 800 px (random weights, its boxes replaced by the ground "
        "truth); annotated video written with OpenCV. The machine may be shared: compare the "
        "rows of one run.",
        "",
        "| pose model | frames | frames/s end to end | detector ms/frame | pose ms/frame "
        "| drawing, reading, writing ms/frame |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, fps, det, pose, rest in rows:
        lines.append(f"| {name} | {n} | {fps:.2f} | {det:.0f} | {pose:.0f} | {rest:.0f} |")
    if len(rows) == 2 and rows[0][4] > 0 and rows[1][2] > 0:
        lines += [
            "",
            f"Pose time per frame, {rows[1][0]} / {rows[0][0]}: {rows[1][4] / rows[0][4]:.1f}x; "
            f"end to end {rows[0][2] / rows[1][2]:.1f}x, the detector's time being the same "
            "work for both.",
        ]
    lines += [
        "",
        "| detector alone (random weights) | input shorter side | ms/frame (fastest) |",
        "|---|---:|---:|",
    ]
    for det_name, size, ms in det_rows:
        lines.append(f"| `{det_name}` | {size or 800} | {ms:.0f} |")
    took = time.perf_counter() - started
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    run_line = (
        f"This run took {took:.0f} s; load average {load:.1f} on {os.cpu_count()} cores at its end."
    )
    lines += ["", run_line]
    section = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict_bench.md").write_text(section + "\n")
    update_readme_block("predict-bench", readme_table(rows, frames, run_line))
    return section


def readme_table(rows: list[tuple], frames: int, run_line: str) -> str:
    """The README's short version: end-to-end frames/s and where the time goes."""
    lines = [
        f"| pose model (CPU, {torch.get_num_threads()} threads) | frames/s end to end | detector "
        "| pose | drawing, I/O |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, _, fps, det, pose, rest in rows:
        lines.append(f"| `{name}` | {fps:.2f} | {det:.0f} ms | {pose:.0f} ms | {rest:.0f} ms |")
    lines.append(
        f"\n_Written by `python -m benchmarks.predict_bench` ({frames} frames of a 640x480 video, "
        f"flip test on; the detectors alone and the full record: "
        "[benchmarks/results/predict_bench.md](benchmarks/results/predict_bench.md)). "
        f"{run_line}_"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 frames instead of 8")
    parser.add_argument("--frames", type=int, default=None, help="frames of video to run")
    args = parser.parse_args()
    print(run(quick=args.quick, frames=args.frames))


if __name__ == "__main__":
    main()
