"""`ablate`: one student per loss combination from one store, evaluated, tabulated (Table 4).

`--grid table6` is the paper's Table 6 (a token-free DeepPose student distilled from a
SimpleBaseline teacher's heatmaps): `reg` vs `reg,sh` vs `reg,sh,cs`, with the store's teacher
evaluated as the table's first row when its checkpoint (recorded in the store) is at hand.

Every run uses the same store, model, seed, epochs and batch size, so the only difference
between rows is the set of distillation terms. The store is opened read-only and never written.
A finished run (its result.json present and made with the same settings) is reused, so an
interrupted ablation continues where it stopped.

Grid file (TOML or JSON), data only, never executed:
    [[run]]                      # TOML; JSON: {"run": [{"name": ..., "losses": ...}, ...]},
    name = "none"                # a list of such objects, or {"name": "losses", ...}
    losses = "reg"               # same syntax as --losses: "reg,kt" or "reg=1,kt=5e-4"
    lr = 0.01                    # optional, per run (ROW_SETTINGS): lr, batch_size, epochs,
    views = 4                    # views (train on the store's first N views) and data
    data = "store"               # (ROW_DATA: the store's views, or fresh crops every epoch)
    input_jitter = 0.4           # and the student input's colour jitter (StudentRun's)
    seed = 1                     # and its own seed (seeds of one setting trained side by side)
    store = "stores/compact"     # and its own store of the same people (a store mode, teacher
                                 # or recipe against the command's store; a path as on the CLI)

A row's own settings override the command's for that row, so one grid can compare learning
rates, batch sizes, view counts or data sources as well as loss terms.
"""

from __future__ import annotations

import json
from pathlib import Path

from distilpose.errors import BadConfigError
from distilpose.limits import read_config_text
from distilpose.training.losses import parse_losses
from distilpose.training.runs import StudentRun
from student_train.many import shares_cpu, train_many

# The paper's Table 4 (DistilPose-S student, COCO val): row name, loss spec, paper AP (%).
# The paper's extracted table shows two all-ticked rows; the text ("TDE ... brings 11.5%")
# makes the 67.5 row TDE alone, i.e. L_KT + L_VT.
TABLE4: list[tuple[str, str, float]] = [
    ("none", "reg", 56.0),
    ("cs", "reg,cs", 63.2),
    ("sh", "reg,sh", 56.4),
    ("cs+sh", "reg,cs,sh", 64.1),
    ("kt", "reg,kt", 67.1),
    ("vt", "reg,vt", 61.7),
    ("kt+vt", "reg,kt,vt", 67.5),
    ("all", "reg,cs,sh,kt,vt", 71.6),
]
COLUMNS = (("cs", "L_CS"), ("sh", "L_SH"), ("kt", "L_KT"), ("vt", "L_VT"))
# The paper's Table 6 (DeepPose-R50 student, SimpleBaseline-R50 teacher at 70.4 AP): the
# student alone and with Simulated Heatmaps (sh, with the confidence loss cs, as the text's
# "Simulated Heatmaps ... combined with the confidence prediction"); reg,sh alone is not in it.
TABLE6: list[tuple[str, str, float | None]] = [
    ("none", "reg", 52.6),
    ("sh", "reg,sh", None),
    ("sh+cs", "reg,sh,cs", 59.7),
]
TABLE6_TEACHER_AP = 70.4
TABLE6_COLUMNS = (("sh", "L_SH"), ("cs", "L_CS"))
PAPER_GRIDS = {"table4": TABLE4, "table6": TABLE6}
# Settings a grid row may set for itself, with the type each must have.
ROW_SETTINGS = {"lr": float, "batch_size": int, "epochs": int, "views": int, "data": str,
                "input_jitter": float, "seed": int, "store": str}  # fmt: skip
# Where a row's crops and targets come from: "store" (the store's cached views and targets),
# "fresh" (a new augmentation of every person each epoch, rendered from the images with the
# store's recipe: teacher-free, or with "teacher_online" the store's teacher run on it), and
# "online" (fresh crops, the store's teacher run at every step: the reference the cache is for).
ROW_DATA = ("store", "fresh", "online")


def load_grid(grid: str | Path) -> list[dict]:
    """`"table4"`, `"table6"` or a TOML/JSON file -> [{"name", "losses", "paper_ap"?}], losses
    validated."""
    if str(grid) in PAPER_GRIDS:
        return [{"name": n, "losses": s, "paper_ap": ap} for n, s, ap in PAPER_GRIDS[str(grid)]]
    path = Path(grid)
    if not path.is_file():
        raise BadConfigError(
            f"{grid}: grid is neither 'table4', 'table6' nor an existing TOML/JSON file"
        )
    text = read_config_text(path)
    try:
        data = _load_toml(text, path) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
        raise BadConfigError(f"{grid}: not valid {path.suffix.lstrip('.')}: {e}") from None
    if isinstance(data, dict) and ("run" in data or "runs" in data):
        data = data.get("run", data.get("runs"))
    if isinstance(data, dict):  # {"name": "losses"}
        data = [{"name": k, "losses": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise BadConfigError(f"{grid}: expected a non-empty list of runs with 'name' and 'losses'")
    runs, names = [], set()
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("losses"), str):
            raise BadConfigError(f"{grid}: run {i} needs a 'losses' string, e.g. \"reg,kt\"")
        name = str(row.get("name") or row["losses"].replace(",", "+"))
        if name in names or not name.replace("+", "").replace("_", "").replace("-", "").isalnum():
            raise BadConfigError(f"{grid}: run {i} name '{name}' is repeated or not a plain name")
        names.add(name)
        parse_losses(row["losses"])  # unknown terms fail before any training starts
        settings = _row_settings(row, f"{grid}: run {i}")
        runs.append({"name": name, "losses": row["losses"], **settings})
    return runs


def _row_settings(row: dict, where: str) -> dict:
    """The ROW_SETTINGS a grid row sets, type-checked; any other key is an error."""
    unknown = sorted(set(row) - {"name", "losses", *ROW_SETTINGS})
    if unknown:
        raise BadConfigError(
            f"{where}: unknown key(s) {unknown}; expected name, losses and any of "
            f"{list(ROW_SETTINGS)}"
        )
    out = {}
    for key, kind in ROW_SETTINGS.items():
        if key not in row:
            continue
        value = row[key]
        number = kind is not str and not isinstance(value, bool)
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and number)
        # seed 0 is a seed; every other number must be > 0
        in_range = not (ok and number) or (value >= 0 if key == "seed" else value > 0)
        if not ok or not in_range or (key == "data" and value not in ROW_DATA):
            want = (
                f"one of {ROW_DATA}"
                if key == "data"
                else ("an integer >= 0" if key == "seed" else f"a positive {kind.__name__}")
            )
            raise BadConfigError(f"{where}: {key} = {value!r}; expected {want}")
        out[key] = kind(value)
    return out


def reweight(losses: str, weights: str) -> str:
    """`losses` with the weights of `weights`' terms replaced where `losses` has them:
    reweight("reg,kt", "kt=1,vt=0.05") == "reg=1,kt=1"."""
    new = parse_losses(weights)
    return ",".join(f"{k}={new.get(k, w):g}" for k, w in parse_losses(losses).items())


def _load_toml(text: str, path: Path) -> object:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        raise BadConfigError(f"{path}: TOML grids need Python 3.11+; use JSON") from None
    return tomllib.loads(text)


def _ap(metrics: dict) -> float:
    """AP from run_eval's result, whatever the key's case (0-1 scale)."""
    for key in ("AP", "ap"):
        if key in metrics:
            return float(metrics[key])
        if "metrics" in metrics and key in metrics["metrics"]:
            return float(metrics["metrics"][key])
    raise KeyError(f"no AP in evaluation result keys {sorted(metrics)}")


def _finished(job: dict) -> dict | None:
    """The result of a combination already trained and evaluated with the same settings."""
    done = Path(job["run_dir"]) / "result.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("settings") == job["settings"]:
            return prev
    return None


def _student_run(job: dict) -> StudentRun:
    """The training run of one combination."""
    s, run_dir = job["settings"], Path(job["run_dir"])
    fields = {"store": s["store"], **_data_fields(s)}
    return StudentRun(
        model=s["model"],
        out_dir=run_dir,
        losses=s["losses"],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        device=job["device"],
        seed=s["seed"],
        workers=s["workers"],
        warmup_iters=s["warmup_iters"],
        resume=(run_dir / "last.pth").is_file(),
        model_overrides=s.get("model_overrides"),
        lr=s.get("lr", 1e-3),
        schedule=s.get("schedule", "step"),
        input_jitter=s.get("input_jitter", 0.0),
        **fields,
    )


def _data_fields(s: dict) -> dict:
    """The StudentRun fields of a row's `views` and `data` (ROW_DATA): fresh crops come from the
    store's dataset and recipe, the online teacher is the store's (as dump-teacher recorded)."""
    from distilpose.data import AugmentRecipe
    from store import StoreReader

    data = s.get("data", "store")
    if data == "store":
        return {"views": s["views"]} if "views" in s else {}
    meta = StoreReader.open(s["store"]).meta
    out = {"store": None, "ann_file": meta.ann_file, "images": meta.image_root}
    out["recipe"] = AugmentRecipe.from_dict(meta.recipe)
    if data == "online":
        ckpt = meta.extra.get("teacher_ckpt")
        if not ckpt or not Path(ckpt).is_file():
            raise BadConfigError(
                f"data = 'online': the store's teacher checkpoint {ckpt!r} is not at hand; "
                "expected the file dump-teacher recorded in the store's extra.teacher_ckpt"
            )
        out["teacher_online"] = str(ckpt)
    return out


def _evaluate(job: dict, summary: dict) -> dict:
    """Evaluate one trained combination; its result, also written to its result.json."""
    from distilpose.inference.config import InferConfig
    from distilpose.inference.eval_run import run_eval

    s, run_dir = job["settings"], Path(job["run_dir"])
    metrics = run_eval(
        summary["checkpoint"],
        s["val_ann"],
        s["val_images"],
        dets_file=s["val_dets"],
        config=InferConfig(device=job["device"]),
        out_json=run_dir / "results.json",
    )
    from distilpose.evaluation.metrics import keypoint_errors, load_coco

    errors = keypoint_errors(
        load_coco(s["val_ann"]), json.loads((run_dir / "results.json").read_text())
    )
    result = {
        "name": job["name"],
        "settings": s,
        "losses": parse_losses(s["losses"]),
        "ap": _ap(metrics),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
        "pck": round(errors["PCK"], 4),
        "pixel_error": round(errors["pixel_error"], 2),
        "train_s": summary.get("time_s"),
        "mode": summary.get("mode"),
        "teacher_forwards": summary.get("teacher_forwards", 0),
        "checkpoint": summary["checkpoint"],
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _run_all(jobs: list[dict], parallel: int) -> list[dict]:
    """Every combination's result, in order: finished ones reused, the others trained
    `parallel` at a time (`train_many`), then evaluated one after another."""
    results = [_finished(job) for job in jobs]
    todo = [job for job, result in zip(jobs, results, strict=True) if result is None]
    if todo:
        summaries = train_many([_student_run(j) for j in todo], todo[0]["device"], parallel)
        evaluated = iter([_evaluate(j, s) for j, s in zip(todo, summaries, strict=True)])
        results = [result or next(evaluated) for result in results]
    return results


def _devices(device: str, parallel: int) -> list[str]:
    """One device per parallel slot: CUDA devices round-robin, else the given device."""
    import torch

    n = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if n > 1 and parallel > 1:
        return [f"cuda:{i % n}" for i in range(parallel)]
    return [device] * max(1, parallel)


def format_table(
    results: list[dict],
    paper: bool = False,
    columns: tuple = COLUMNS,
    teacher: dict | None = None,
) -> str:
    """Markdown table like the paper's Table 4 (or Table 6 with `columns=TABLE6_COLUMNS` and the
    `teacher` row {"name", "ap", "paper_ap"}); Improv. = AP points over the reg-only run."""
    base = next((r["ap"] for r in results if set(r["losses"]) == {"reg"}), None)
    head = ["Run", *(c for _, c in columns), "AP", "Improv."] + (["Paper AP"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if teacher is not None:
        row = [
            f"teacher ({teacher['name']})",
            *("-" for _ in columns),
            f"{teacher['ap'] * 100:.1f}%",
        ]
        row += ["-"] + ([f"{teacher['paper_ap']:.1f}%"] if paper else [])
        lines.append("| " + " | ".join(row) + " |")
    for r in results:
        ticks = ["✓" if k in r["losses"] else "-" for k, _ in columns]
        if base is None or set(r["losses"]) == {"reg"}:
            improv = "-"
        else:
            improv = f"{(r['ap'] - base) * 100:+.1f}%"
        row = [r["name"], *ticks, f"{r['ap'] * 100:.1f}%", improv]
        if paper:
            row.append(f"{r['paper_ap']:.1f}%" if r.get("paper_ap") is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def ablate(
    store: str | Path,
    grid: str | Path = "table4",
    out_dir: str | Path = "runs/ablation",
    *,
    model: str | None = None,  # None: deeppose_tiny for table6 (token-free), else distilpose_tiny
    epochs: int = 30,
    batch_size: int = 32,
    val_ann: str | Path,
    val_images: str | Path,
    val_dets: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    parallel: int = 1,
    workers: int = 2,
    warmup_iters: int | None = None,
    model_overrides: dict | None = None,
    weights: str | None = None,
    lr: float = 1e-3,
    schedule: str = "step",
) -> Path:
    """Train + evaluate one student per combination of `grid`; returns out_dir/ablation.md.

    Also writes out_dir/ablation.json (every run's losses, AP and metrics) and keeps each run in
    out_dir/runs/<name>/. parallel=N runs N combinations at a time in spawned processes, each
    on its own CUDA device when several are present (on CPU, each gets its share of the cores).
    `weights` ("kt=1,vt=0.05") replaces the default weight of those terms in every run that has
    them (the grid names the terms, `weights` their strength); lr and schedule as train-student.
    """
    model = model or ("deeppose_tiny" if str(grid) == "table6" else "distilpose_tiny")
    runs = load_grid(grid)
    if weights:
        runs = [{**r, "losses": reweight(r["losses"], weights)} for r in runs]
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = {
        "store": str(store),
        "model": model,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "workers": workers,
        "warmup_iters": warmup_iters,
        "model_overrides": model_overrides,
        "lr": lr,
        "schedule": schedule,
        "val_ann": str(val_ann),
        "val_images": str(val_images),
        "val_dets": str(val_dets) if val_dets else None,
    }
    for r in runs:
        if "store" in r and not Path(r["store"]).exists() and "://" not in r["store"]:
            raise BadConfigError(
                f"{grid}: run '{r['name']}' store = {r['store']!r}; expected an existing store"
            )
    devices = _devices(device, parallel)
    if shares_cpu(devices[0], parallel):
        # each run renders its own crops: loader workers on top would oversubscribe the cores
        settings["workers"] = 0
    jobs = [
        {
            "name": r["name"],
            "run_dir": str(out / "runs" / r["name"]),
            "device": devices[i % len(devices)],
            "settings": {**settings, **{k: v for k, v in r.items() if k != "name"}},
        }
        for i, r in enumerate(runs)
    ]
    results = _run_all(jobs, parallel)
    for r, spec in zip(results, runs, strict=True):
        r["paper_ap"] = spec.get("paper_ap")

    table6 = str(grid) == "table6"
    teacher = _teacher_row(store, out, devices[0], settings) if table6 else None
    table = format_table(
        results,
        paper=str(grid) in PAPER_GRIDS,
        columns=TABLE6_COLUMNS if table6 else COLUMNS,
        teacher=teacher,
    )
    header = (
        f"# Loss ablation ({model}, {epochs} epochs, batch {batch_size}, seed {seed})\n\n"
        f"Store: `{store}`; evaluated on `{val_ann}`"
        f"{' with detections `' + str(val_dets) + '`' if val_dets else ' with GT boxes'}.\n"
        "Improv. = AP points over the reg-only (undistilled) run.\n\n"
    )
    md = out / "ablation.md"
    md.write_text(header + table)
    (out / "ablation.json").write_text(
        json.dumps(
            {"settings": settings, "runs": results, "teacher": teacher}, indent=2, default=str
        )
    )
    return md


def _teacher_row(store: str | Path, out: Path, device: str, settings: dict) -> dict | None:
    """Table 6's teacher row: the store's teacher checkpoint (as recorded by dump-teacher)
    evaluated like the students, reused from out/teacher/result.json; None if not at hand."""
    from distilpose.inference.config import InferConfig
    from distilpose.inference.eval_run import run_eval
    from store import StoreReader

    meta = StoreReader.open(str(store)).meta
    ckpt = meta.extra.get("teacher_ckpt")
    if not ckpt or not Path(ckpt).is_file():
        return None
    done = out / "teacher" / "result.json"
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("checkpoint") == str(ckpt) and prev.get("val_ann") == settings["val_ann"]:
            return prev
    done.parent.mkdir(parents=True, exist_ok=True)
    metrics = run_eval(
        ckpt,
        settings["val_ann"],
        settings["val_images"],
        dets_file=settings["val_dets"],
        config=InferConfig(device=device),
        out_json=done.parent / "results.json",
    )
    row = {
        "name": meta.teacher_name,
        "checkpoint": str(ckpt),
        "val_ann": settings["val_ann"],
        "ap": _ap(metrics),
        "paper_ap": TABLE6_TEACHER_AP,
    }
    done.write_text(json.dumps(row, indent=2))
    return row
