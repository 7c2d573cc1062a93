"""Make the README's pictures (docs/images/*.png) with `distilpose.viz`.

    python docs/make_pictures.py                      # random tiny models on tests/data/coco_mini
    python docs/make_pictures.py demo_run             # a trained demo directory (found by content)
    python docs/make_pictures.py --student S.pth --teacher T.pth --store STORE --run RUN_DIR ...

Given a directory, the script looks inside it for this project's checkpoints (a teacher and a
student, told apart by the role saved in them), a teacher store, a run directory with
metrics.csv, COCO results JSON and a validation annotation file with its images; explicit
options override what it finds. Anything not found is made from random tiny models on the
four COCO images in tests/data (a store by dumping the random teacher, a short training run
from it, results by evaluating the random student), so every picture can always be drawn; the
pictures then show the plumbing, not a trained model, and say so in the console.

Each PNG is kept under MAX_BYTES by reducing it to a 256-colour palette (and, if still too big,
by halving it), since they are committed to the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from distilpose import viz  # noqa: E402
from distilpose.data import load_coco_instances  # noqa: E402
from distilpose.training.runs import DumpRun, StudentRun  # noqa: E402

MAX_BYTES = 150_000
COCO_MINI = REPO / "tests" / "data" / "coco_mini"
NAMES = ("heatmaps", "confidence", "attention", "predictions", "curves")


def say(msg: str) -> None:
    print(f"make_pictures: {msg}", flush=True)


# --------------------------------------------------------------------------- finding demo files


def checkpoint_role(path: Path) -> str | None:
    """'teacher' / 'student' for this project's checkpoint files, else None."""
    import torch

    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a checkpoint we can read safely: not a candidate
        return None
    if isinstance(d, dict) and isinstance(d.get("model"), dict) and "state_dict" in d:
        return d["model"].get("role")
    return None


def find_checkpoints(root: Path) -> dict[str, Path]:
    """The newest teacher and student checkpoints under `root` (final files before last.pth)."""
    found: dict[str, list[Path]] = {"teacher": [], "student": []}
    for path in sorted(root.rglob("*.pth")):
        role = checkpoint_role(path)
        if role in found:
            found[role].append(path)

    def rank(p: Path) -> tuple:
        return (p.name != "last.pth", p.stat().st_mtime)

    return {role: max(paths, key=rank) for role, paths in found.items() if paths}


def find_store(root: Path) -> Path | None:
    from store.reader import StoreReader

    for marker in sorted(root.rglob("zarr.json"), key=lambda p: len(p.parts)):
        try:
            StoreReader.open(marker.parent)
        except Exception:  # a sub-array or another zarr group, not a store root
            continue
        return marker.parent
    return None


def find_results(root: Path, student: Path | None) -> Path | None:
    if student is not None and (student.with_name(f"{student.stem}_results.json")).is_file():
        return student.with_name(f"{student.stem}_results.json")
    for path in sorted(root.rglob("*results*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, list) and data and "keypoints" in data[0]:
            return path
    return None


def find_val_data(root: Path) -> tuple[Path, Path] | None:
    """make_demo_data's layout: annotations/person_keypoints_val.json with val/images."""
    for ann in sorted(root.rglob("person_keypoints_val.json")):
        images = ann.parent.parent / "val" / "images"
        if images.is_dir():
            return ann, images
    return None


def best_instance(ann: Path, images: Path, limit: int = 200) -> int:
    """The person with the most labelled joints (ties: the larger one) among the first `limit`."""
    people = load_coco_instances(ann, images)[:limit]
    return max(people, key=lambda p: (int((p.keypoints[:, 2] > 0).sum()), p.area)).index


# ------------------------------------------------------------------------- random tiny fallback


def random_models(work: Path) -> dict[str, Path]:
    import torch

    from distilpose.models import build_model, save_checkpoint

    torch.manual_seed(0)
    paths = {}
    for role, name in (("teacher", "tokenpose_tiny"), ("student", "distilpose_tiny")):
        paths[role] = work / f"random_{name}.pth"
        save_checkpoint(paths[role], build_model(name), meta={"note": "random, untrained"})
    say("using random (untrained) tiny models")
    return paths


def dump_store(teacher: Path, ann: Path, images: Path, work: Path) -> Path | None:
    try:
        from teacher_dump.dump import dump_teacher
    except ImportError:
        return None
    out = work / "store.zarr"
    dump_teacher(DumpRun(teacher, ann, images, out, views=1, workers=0, device="cpu", batch_size=8))
    return out


def short_run(store: Path, ann: Path, images: Path, work: Path) -> Path | None:
    """A few epochs of the tiny student from the store, with AP on `ann` after each epoch."""
    try:
        from student_train.train import train_student
    except ImportError:
        return None
    from distilpose.evaluation.metrics import coco_keypoint_eval, load_coco, to_coco_results
    from distilpose.inference.config import InferConfig
    from distilpose.inference.topdown import predict_instances

    people = load_coco_instances(ann, images, aspect_ratio=96 / 128)
    coco = load_coco(ann)

    def eval_fn(epoch: int, model) -> dict:
        preds = predict_instances(model, people, InferConfig(flip=False, device="cpu"), amp=False)
        return {"AP": coco_keypoint_eval(coco, to_coco_results(preds))["AP"]}

    run = work / "student_run"
    train_student(
        StudentRun(
            store, "distilpose_tiny", run, epochs=4, batch_size=4, device="cpu", workers=0,
            log_every=1, amp=False,
        ),
        eval_fn=eval_fn,
    )  # fmt: skip
    return run


def evaluate(student: Path, ann: Path, images: Path, work: Path) -> Path:
    from distilpose.inference.config import InferConfig
    from distilpose.inference.eval_run import run_eval

    out = work / "student_results.json"
    run_eval(student, ann, images, config=InferConfig(flip=False, device="cpu"), out_json=out)
    return out


# ------------------------------------------------------------------------------------- drawing


def shrink_png(path: Path, max_bytes: int = MAX_BYTES) -> None:
    """Palette-quantize (fewer colours, then halved, if needed) a PNG until under `max_bytes`."""
    from PIL import Image

    if path.stat().st_size <= max_bytes:
        return
    image = Image.open(path).convert("RGB")
    while True:
        for colors in (256, 128, 64):  # fewer colours first: halving makes labels unreadable
            image.quantize(colors=colors).save(path, optimize=True)
            if path.stat().st_size <= max_bytes:
                return
        if min(image.size) < 64:
            return
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def predictions_image(results: Path, ann: Path, images: Path) -> tuple[Path, int]:
    """The image with the most confident people in `results`, and its id."""
    data = json.loads(results.read_text())
    counts: dict[int, int] = {}
    for r in data:
        if float(r.get("score", 0)) >= 0.3:
            counts[int(r["image_id"])] = counts.get(int(r["image_id"]), 0) + 1
    if not counts:
        counts = {int(r["image_id"]): 1 for r in data}
    image_id = max(counts, key=lambda i: (counts[i], -i))
    files = {int(im["id"]): im["file_name"] for im in json.loads(Path(ann).read_text())["images"]}
    return Path(images) / files[image_id], image_id


def online_heatmaps(teacher: Path, student: Path, ann: Path, images: Path, out: Path, k: int):
    """Without a store: the teacher's heatmaps computed now for a person crop, then Fig. 5."""
    import torch

    from distilpose.data import normalize
    from distilpose.data.codecs import simulated_heatmaps
    from distilpose.models import build_from_checkpoint

    t_model, _ = build_from_checkpoint(teacher)
    s_model, _ = build_from_checkpoint(student)
    _, crop = viz.render_instance(ann, images, k, s_model.config.input_size)
    with torch.no_grad():
        x = normalize(crop.image[None])
        t_out, s_out = t_model.eval()(x), s_model.eval()(x)
    sim = simulated_heatmaps(s_out.coords, s_out.sigmas, s_model.config.heatmap_size)[0]
    coords_px = s_out.coords[0].numpy() * np.asarray(s_model.config.input_size, np.float32)
    return viz.draw_heatmap_pairs(
        sim, t_out.heatmaps[0], s_out.sigmas[0], out, crop_bgr=crop.image, coords_px=coords_px
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", nargs="?", type=Path, help="a trained demo directory to search")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--student", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--run", type=Path, help="run directory with metrics.csv")
    ap.add_argument("--results", type=Path, help="COCO keypoint results JSON")
    ap.add_argument("--ann", type=Path, help="validation annotations (for confidence/predictions)")
    ap.add_argument("--images", type=Path, help="their image folder")
    ap.add_argument("--sample", type=int, default=0, help="store slot for the heatmap picture")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = args.demo
        found = find_checkpoints(demo) if demo else {}
        teacher = args.teacher or found.get("teacher")
        student = args.student or found.get("student")
        random = teacher is None or student is None
        if random:
            rand = random_models(work)
            teacher, student = teacher or rand["teacher"], student or rand["student"]
        say(f"teacher {teacher}\nmake_pictures: student {student}")

        val = (args.ann, args.images) if args.ann and args.images else None
        val = (
            val
            or (find_val_data(demo) if demo else None)
            or (
                COCO_MINI / "annotations" / "person_keypoints.json",
                COCO_MINI / "images",
            )
        )
        ann, images = val
        say(f"validation data {ann}")

        store = args.store or (find_store(demo) if demo else None)
        if store is None:
            store = dump_store(teacher, ann, images, work)
        run = args.run or (next(iter(sorted(demo.rglob("metrics.csv"))), None) if demo else None)
        if run is not None and run.name == "metrics.csv":
            run = run.parent
        if student is not None and (student.parent / "metrics.csv").is_file() and not args.run:
            run = student.parent
        if run is None and store is not None:
            run = short_run(store, ann, images, work)
        results = args.results or (find_results(demo, student) if demo else None)
        if results is None:
            results = evaluate(student, ann, images, work)

        k = best_instance(ann, images)
        args.out.mkdir(parents=True, exist_ok=True)
        out = {name: args.out / f"{name}.png" for name in NAMES}
        if store is not None:
            say(f"store {store}")
            from store.reader import StoreReader

            viz.viz_heatmaps(student, StoreReader.open(store), out["heatmaps"], sample=args.sample)
        else:
            say("no store: teacher heatmaps computed online")
            online_heatmaps(teacher, student, ann, images, out["heatmaps"], k)
        viz.viz_confidence(student, ann, images, out["confidence"], instance=k)
        from distilpose.models import build_from_checkpoint

        input_size = build_from_checkpoint(student)[0].config.input_size
        shown = viz.display_size(input_size, viz.figure_pixels(viz.ATTENTION_PANEL_SIZE)[1])
        _, crop = viz.render_instance(ann, images, k, shown)
        viz.viz_attention([teacher, student], crop.image, out["attention"])
        image_path, image_id = predictions_image(results, ann, images)
        # Random models score below any sensible threshold: draw everything to show the plumbing.
        thr = {"score_thr": 0.0, "kpt_thr": -np.inf} if random else {}
        viz.viz_predictions(
            results, image_path, out["predictions"], image_id=image_id, max_side=480, **thr
        )
        if run is not None:
            say(f"run {run}")
            viz.viz_curves(run, out["curves"])
        else:
            say("no run directory and no store to train from: curves.png not made")
            out.pop("curves")
        for path in out.values():
            shrink_png(path)
            say(f"wrote {path} ({path.stat().st_size / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
