"""The demo: the whole job on built-in demo data, through the very functions the commands call.

`run_demo` makes demo data, loads (or trains) the teacher, dumps it to a store, trains two
students from that store (`student_train.many.train_many`: at once on a multi-core CPU),
evaluates all three and writes `demo_table.json`; `distilpose demo` prints it
(`format_demo_table`). It calls both stages, so it sits at the top level beside cli.py
(distilpose/ imports no stage).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from distilpose.training.runs import DumpRun, StudentRun, TeacherRun
from distilpose.weights import DEMO_TEACHER_RECIPE
from student_train.many import cpu_threads, train_many


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
    say = (lambda text: print(text, flush=True)) if log else (lambda *a, **k: None)
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
    train_many(runs, device)
    torch.set_num_threads(cpu_threads(1))
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
