"""The demo: the whole job on built-in demo data, through the very functions the commands call.

`run_demo` makes demo data, loads (or trains) the teacher, dumps it to a store, trains the
students of STUDENT_ROLES (`student_train.many.train_many`: at once on a multi-core CPU),
evaluates them and the teacher and writes `demo_table.json` in the plan's folder;
`distilpose demo` prints it (`format_demo_table`). It calls both stages, so it sits at the top
level beside cli.py (distilpose/ imports no stage).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distilpose.errors import BadConfigError
from distilpose.training.runs import DumpRun, StudentRun, TeacherRun
from distilpose.weights import DEMO_TEACHER_RECIPE
from student_train.many import cpu_threads, train_many


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run, and the folder under `--out` it keeps them in (`name`): the full
    one and --quick each have their own (benchmarks/results/demo_run.md has their times).

    The teacher is the shipped `tokenpose_demo` (trained once, `distilpose.weights`); it is
    dumped to a store, and the `distilpose_demo` students train with the same seed, steps and
    schedule: one with the paper's full objective from the store, the teacher-free best (the
    best row of the recorded grid, benchmarks/results/teacher_free_grid_quick.md: its loss,
    and fresh crops from the images every epoch or the store's views), and `reg` alone from the
    store. Crops are 96x128 (heatmap grid 24x32: perfect heatmaps would score AP ~0.92 there).
    The students train at the same time, one torch thread each and no loader workers: on 2
    cores, threads fighting over cores cost more than the model (measured 13x). `teacher_*`
    fields are used by `--train-teacher` only.
    """

    name: str = "full"
    num_train: int = 2000
    num_val: int = 600
    # the views curve's answer at each plan's schedule (benchmarks/results/views_grid.md: 8
    # views matched the online teacher over 3 seeds at 35 epochs, 2 fell short; --quick: 1)
    views: int = 8
    student_epochs: int = 35  # 8,750 steps of 8: many cheap steps beat fewer big ones here
    batch_size: int = 8
    lr: float = 3e-3  # at --quick's size: AP 0.059 here against 0.013 with 1e-3 and 16 per step
    # token terms weighted for this teacher's token scale (the paper's 5e-4 hardly moves them);
    # kt=1 pulled the student down (AP 0.153 at 20 epochs against 0.262 here: docs/notes.md)
    losses: str = "reg,kt=0.1,vt=0.1,sh,cs"
    # the teacher-free student: the grid's best row (its loss, data, lr; None: the plan's lr).
    # `reg` and `rle` alone do not learn at this budget (AP < 0.001, teacher_free_grid_quick.md);
    # with DSNT's map regularizer `reg,dsnt` does (AP 0.094 at --quick, above the distilled 0.060)
    free_losses: str = "reg,dsnt"
    free_data: str = "store"  # "fresh": a new crop of every person each epoch; "store": views
    free_lr: float | None = None
    teacher_num_train: int = DEMO_TEACHER_RECIPE["num_train"]
    teacher_epochs: int = DEMO_TEACHER_RECIPE["epochs"]


QUICK_DEMO = DemoPlan(
    name="quick", num_train=1000, num_val=300, views=1, student_epochs=18,
    teacher_num_train=2000, teacher_epochs=2,
)  # fmt: skip
# the table's student rows, in order: distilled, the teacher-free best, reg alone
STUDENT_ROLES = ("student_distilled", "student_teacher_free", "student_baseline")
SETTINGS_FILE = "demo_settings.json"
# a crop per view, as the demo's records were made (the default `auto` would keep canvases at 8
# views; with the mild recipe a canvas is 1.1 crops, benchmarks/results/canvas_bench.md)
DEMO_PIXELS = "jpeg"


def _student_run(role: str, plan: DemoPlan, out: Path, data: dict, seed: int, device: str):
    """The StudentRun of one of STUDENT_ROLES: the plan's steps and schedule, its own losses
    and data (the demo store, or fresh crops of the train split with the store's recipe)."""
    from distilpose.data import MILD_RECIPE

    losses = {"student_distilled": plan.losses, "student_teacher_free": plan.free_losses}
    source: dict = {"store": str(out / "store")}
    if role == "student_teacher_free" and plan.free_data == "fresh":
        source = {"ann_file": data["train_ann"], "images": data["train_images"]}
        source.update(store=None, recipe=MILD_RECIPE)
    lr = plan.free_lr if role == "student_teacher_free" and plan.free_lr else plan.lr
    return StudentRun(
        model="distilpose_demo", out_dir=str(out / role), losses=losses.get(role, "reg"),
        epochs=plan.student_epochs, batch_size=plan.batch_size, lr=lr, schedule="cosine",
        device=device, seed=seed, workers=0, resume=(out / role / "last.pth").exists(),
        **source,
    )  # fmt: skip


def student_runs(plan: DemoPlan, out: Path, data: dict, seed: int, device: str) -> dict:
    """Role -> its StudentRun; the teacher-free best can be `reg` alone from the store (the
    grid's best at this budget): then both roles are that one run, trained once."""
    runs = {role: _student_run(role, plan, out, data, seed, device) for role in STUDENT_ROLES}
    free, base = runs["student_teacher_free"], runs["student_baseline"]
    if free.replace(out_dir=base.out_dir, resume=base.resume) == base:
        runs["student_teacher_free"] = base
    return runs


def plan_folder(out: Path, plan: DemoPlan, settings: dict, say) -> Path:
    """`out/plan.name`, kept for a rerun with the same settings (it resumes); one made with
    other settings is cleared first, and the run says so (its files are all the demo's)."""
    folder = out / plan.name
    path = folder / SETTINGS_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        if before != settings:
            changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
            say(f"{folder} was made with other settings ({', '.join(changed)}): starting over")
            shutil.rmtree(folder)
    elif folder.exists() and any(folder.iterdir()):
        raise BadConfigError(
            f"{folder}: holds files but no {SETTINGS_FILE}; expected a folder the demo made "
            "(or none): pass another --out"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True))
    return folder


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

    settings = {**asdict(plan), "seed": seed, "train_teacher": train_teacher}
    out = plan_folder(out, plan, settings, step)
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
            pixels=DEMO_PIXELS,
        )
    )  # fmt: skip
    runs = student_runs(plan, out, data, seed, device)
    for role, run in runs.items():
        where = "fresh crops" if run.store is None else "the store"
        step(f"{role}: distilpose_demo from {where}, losses {run.losses} -> {run.out_dir}")
    train_many(list({run.out_dir: run for run in runs.values()}.values()), device)
    torch.set_num_threads(cpu_threads(1))
    rows = []
    coco = load_coco(data["val_ann"])
    students = {role: Path(run.out_dir) / "student.pth" for role, run in runs.items()}
    checkpoints = {"teacher": teacher_ckpt, **students}
    evaluated: dict[Path, dict] = {}  # checkpoint -> its row: two roles of one run, one eval
    for role, ckpt in checkpoints.items():
        results_json = out / "results" / f"{role}.json"
        if ckpt in evaluated:
            step(f"eval {role}: the {evaluated[ckpt]['role']} run's checkpoint, evaluated above")
            shutil.copyfile(out / "results" / f"{evaluated[ckpt]['role']}.json", results_json)
            rows.append({**evaluated[ckpt], "role": role})
            continue
        step(f"eval {role} on the val split (detections, flip test)")
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
        evaluated[ckpt] = rows[-1]
    (out / "demo_table.json").write_text(json.dumps(rows, indent=2))
    step(f"done; table in {out / 'demo_table.json'}")
    return rows


def format_demo_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<16} {'role':<20} {'params':>9} {'GFLOPs':>7} {'AP':>6} {'AP50':>6} "
        f"{'AP75':>6} {'PCK@.05':>8} {'px err':>7} {'samples/s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<16} {r['role']:<20} {r['params']:>9,} {r['gflops']:>7.3f} "
            f"{r['ap']:>6.3f} {r['ap50']:>6.3f} {r['ap75']:>6.3f} {r['pck']:>8.3f} "
            f"{r['pixel_error']:>7.2f} {r['samples_per_s']:>10.1f}"
        )
    lines.append(
        "AP: COCO keypoint AP (detections, flip test); PCK@.05: joints within 5% of the box's "
        "longer side; px err: mean joint error in image pixels"
    )
    return "\n".join(lines)
