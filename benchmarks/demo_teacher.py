"""Ship a trained demo teacher: half-precision copy into the package, sha256, evaluation record.

    python -m benchmarks.demo_teacher RUN_DIR [--val-data DIR]

RUN_DIR is the `train-teacher` run of the recorded recipe (`distilpose.weights.
DEMO_TEACHER_RECIPE`). Writes distilpose/weights/demo_teacher.pth (weights in float16, config
and meta as saved), prints its sha256 (to paste into `DEMO_TEACHER_SHA256`), evaluates it on the
demo val split (seed 0, with detections, flip test) and writes
benchmarks/results/demo_teacher.md with the command, the per-epoch log and the result.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from distilpose.weights import DEMO_TEACHER_FILE, DEMO_TEACHER_RECIPE, sha256_of

RESULTS = Path(__file__).resolve().parent / "results"


def ship(teacher: Path, dst: Path = DEMO_TEACHER_FILE) -> str:
    """Write the half-precision copy of `teacher` to `dst`; returns its sha256."""
    ckpt = torch.load(teacher, map_location="cpu", weights_only=True)
    slim = {k: ckpt[k] for k in ("format", "model", "meta") if k in ckpt}
    slim["state_dict"] = {
        k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
    }
    torch.save(slim, dst)
    return sha256_of(dst)


def command() -> str:
    r = DEMO_TEACHER_RECIPE
    return (
        f"distilpose make-demo-data teacher_data --num-train {r['num_train']} "
        f"--num-val {r['num_val']} --seed {r['data_seed']}\n"
        "OMP_NUM_THREADS=1 distilpose train-teacher "
        "--ann teacher_data/annotations/person_keypoints_train.json "
        f"--images teacher_data/train/images --out RUN_DIR --model {r['model']} "
        f"--augment {r['augment']} --epochs {r['epochs']} --batch-size {r['batch_size']} "
        f"--lr {r['lr']:g} --warmup-iters {r['warmup_iters']} --workers 1 --seed {r['seed']}\n"
        "python -m benchmarks.demo_teacher RUN_DIR"
    )


def main(argv: list[str] | None = None) -> int:
    from distilpose.data import make_demo_data
    from distilpose.evaluation.metrics import keypoint_errors, load_coco
    from distilpose.inference.config import InferConfig
    from distilpose.inference.eval_run import run_eval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--val-data", type=Path, default=Path("runs/demo_val_seed0"))
    p.add_argument("--num-val", type=int, default=600, help="The demo plan's val people.")
    a = p.parse_args(argv)
    digest = ship(a.run_dir / "teacher.pth")
    print(f"{DEMO_TEACHER_FILE}: {DEMO_TEACHER_FILE.stat().st_size} bytes, sha256 {digest}")
    data = make_demo_data(a.val_data, num_train=1, num_val=a.num_val, seed=0)
    out_json = a.val_data / "teacher_results.json"
    result = run_eval(
        DEMO_TEACHER_FILE, data["val_ann"], data["val_images"], dets_file=data["val_dets"],
        config=InferConfig(device="cpu"), out_json=out_json,
    )  # fmt: skip
    errors = keypoint_errors(load_coco(data["val_ann"]), json.loads(out_json.read_text()))
    with open(a.run_dir / "metrics.csv", newline="") as f:
        epochs = [r for r in csv.DictReader(f) if r["kind"] == "epoch"]
    md = [
        "## Demo teacher (recorded)\n",
        "`distilpose/weights/demo_teacher.pth`: `tokenpose_demo` trained once with the project's "
        "own `train-teacher` on synthetic people of their own seed, on the project's machine "
        "(2 CPU cores, shared), then stored in float16 by this script.\n",
        "```",
        command(),
        "```\n",
        f"File: {DEMO_TEACHER_FILE.stat().st_size:,} bytes, sha256 `{digest}`.\n",
        "| epoch | lr | heatmap loss | samples/s |",
        "|---:|---:|---:|---:|",
        *(
            f"| {int(r['epoch']) + 1} | {r['lr']} | {r['loss_heatmap']} | {r['samples_per_s']} |"
            for r in epochs
        ),
        "",
        f"Demo val split (seed 0, {a.num_val} people, detections, flip test): "
        f"AP {result['AP']:.3f}, AP50 {result['AP50']:.3f}, AP75 {result['AP75']:.3f}, "
        f"PCK@0.05 {errors['PCK']:.3f}, mean error {errors['pixel_error']:.2f} px.",
    ]
    (RESULTS / "demo_teacher.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
