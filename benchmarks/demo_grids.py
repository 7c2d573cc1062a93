"""Grids on the demo's student and budget: the teacher-free baseline and the views curve.

    python -m benchmarks.demo_grids teacher-free [--seeds 0,1,2] [--quick] [--out DIR]
    python -m benchmarks.demo_grids views [--seeds 0,1,2] [--quick] [--out DIR]
    python -m benchmarks.demo_grids modes [--seeds 0,1,2] [--rows NAMES] [--out DIR]

Each grid is a file, `benchmarks/grids/<name>.toml`, run by `student_train.ablate.ablate` (what
`distilpose ablate --grid FILE` runs) on the demo's data (`demo.DemoPlan` sizes, data seed 0)
and one store of the shipped demo teacher, dumped with as many views as the grid reads, with
the demo student's model, epochs, batch, lr and cosine schedule; a row's own settings (lr,
batch_size, views, data) override these. Every row trains on the first seed; the rows named by
`REPEAT` (the grid's reference rows, and the best row of the first seed) train on every seed.

The record, `benchmarks/results/<name>_grid.{md,json}`: per row its settings, AP (mean and
spread = max - min over the seeds it ran), AP50, PCK, px error, train wall time and teacher
forwards (a store row: the views it reads x people, paid once at dump time; an online row: one
per sample per step). The views grid also draws AP against views with the online teacher's
line (docs/images/views_curve.png). The modes grid trains the demo's student from one store
per target mode (a row's name is its mode), every row on every seed, and draws AP against
bytes per view (benchmarks/results/modes_grid.{md,json}, docs/images/modes_curve.png). Two
students train at a time, one per core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import update_readme_block
from store.schema import DEFAULT_COMPACT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRIDS = ROOT / "benchmarks" / "grids"
PLOT = ROOT / "docs" / "images" / "views_curve.png"
# rows trained on every seed besides the first seed's best: the references a reader compares
REPEAT = {"teacher-free": ("reg",), "views": ("v2", "online"), "modes": ()}
PAPER_EPOCHS = 300  # the paper's schedule (and train-student's default epochs)


def demo_store(out: Path, plan: object, views: int, mode: str = "fp16") -> dict:
    """The demo's data (seed 0) and a store of the shipped teacher with `views` views in target
    `mode` (views are added to an existing store, the old ones untouched)."""
    from demo import DEMO_PIXELS
    from distilpose.data import MILD_RECIPE, make_demo_data
    from distilpose.training.runs import DumpRun
    from distilpose.weights import demo_teacher_path
    from teacher_dump.dump import dump_teacher

    data = make_demo_data(out / "data", num_train=plan.num_train, num_val=plan.num_val, seed=0)
    store = out / ("store" if mode == "fp16" else f"store_{mode}")
    run = DumpRun(
        demo_teacher_path(), data["train_ann"], data["train_images"], store,
        views=views, seed=0, device="cpu", recipe=MILD_RECIPE, workers=0, mode=mode,
        pixels=DEMO_PIXELS,
    )  # fmt: skip
    dump_teacher(run)
    return {**data, "store": str(store)}


def store_bytes(data: dict) -> float:
    """Stored bytes per view of the grid's store (teacher targets, pixels, labels)."""
    from store.checks import store_info

    info = store_info(data["store"])
    return sum(info[f"{k}_bytes_per_view"] for k in ("target", "pixel", "label"))


def grid_views(rows: list[dict], plan: object) -> int:
    """The most views any row of a grid reads (store rows without `views` read the plan's)."""
    return max(int(r.get("views", plan.views)) for r in rows)


def run_seed(grid: list[dict], data: dict, plan: object, seed: int, folder: Path) -> list[dict]:
    """Every row of `grid` trained and evaluated with `seed` (a row's own seed wins) by ablate,
    two at a time, in `folder`; their results in the grid's order."""
    from student_train.ablate import ablate

    path = folder / "grid.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": grid}))
    ablate(
        data["store"], path, folder, model="distilpose_demo",
        epochs=plan.student_epochs, batch_size=plan.batch_size, lr=plan.lr, schedule="cosine",
        val_ann=data["val_ann"], val_images=data["val_images"], val_dets=data["val_dets"],
        device="cpu", seed=seed, parallel=min(2, len(grid)), workers=0,
    )  # fmt: skip
    return json.loads((folder / "ablation.json").read_text())["runs"]


def row_jobs(spec: str, rows: list[dict], seeds: list[int]) -> list[tuple[dict, int]]:
    """`--rows` -> (row, seed) pairs: a name alone runs on every seed of `seeds`, `name@0+2`
    on those seeds only. An unknown name or a bad seed is a ValueError naming it."""
    by_name = {r["name"]: r for r in rows}
    jobs = []
    for item in filter(None, spec.split(",")):
        name, _, on = item.partition("@")
        if name not in by_name:
            raise ValueError(f"--rows {item}: expected a row name of {sorted(by_name)}")
        try:
            own = [int(x) for x in on.split("+")] if on else seeds
        except ValueError:
            raise ValueError(f"--rows {item}: expected name@seed+seed, e.g. v4@0+1") from None
        jobs += [(by_name[name], seed) for seed in own]
    return jobs


def run_jobs(jobs: list[tuple[dict, int]], data: dict, plan: object, out: Path) -> list[dict]:
    """(row, seed) pairs trained as one grid (each row with its own seed, `<name>_s<seed>`), two
    at a time whatever their seeds, so both cores stay busy; results in the pairs' order."""
    grid = [{**row, "name": f"{row['name']}_s{seed}", "seed": seed} for row, seed in jobs]
    return run_seed(grid, data, plan, 0, out / "rows")


def summarize(rows: list[dict], results: dict[str, list[dict]], people: int, plan) -> list[dict]:
    """Per row: settings, AP mean / spread over its seeds, the other figures' means."""
    table = []
    for row in rows:
        got = results.get(row["name"], [])
        if not got:
            continue
        aps = [r["ap"] for r in got]
        views = int(row.get("views", plan.views))
        forwards = got[0]["teacher_forwards"] or (
            views * people if row.get("data", "store") == "store" else 0
        )
        table.append(
            {
                **{k: v for k, v in row.items()},
                # the views it read, kept in the record: a later plan may read another number
                "views": views,
                "seeds": [r["settings"]["seed"] for r in got],
                "ap": statistics.fmean(aps),
                "ap_spread": max(aps) - min(aps),
                "aps": aps,
                "ap50": statistics.fmean(r["metrics"]["AP50"] for r in got),
                "pck": statistics.fmean(r["pck"] for r in got),
                "pixel_error": statistics.fmean(r["pixel_error"] for r in got),
                # median: a run found finished (resumed at its end) reports only its reload
                "train_s": statistics.median(r["train_s"] for r in got),
                "teacher_forwards": forwards,
            }
        )
    return table


def data_cell(row: dict) -> str:
    """A row's data source, with its input jitter (cheap views) when it has one."""
    jitter = row.get("input_jitter", 0)
    return row.get("data", "store") + (f" + jitter {jitter:g}" if jitter else "")


def run_line(wall: float) -> str:
    """A record's 'when, on what, how loaded, how long' line."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{when}; {os.cpu_count()} cores, load average {load} at the end; {wall:.0f} s in this "
        "invocation"
    )


def format_record(
    name: str, table: list[dict], plan: object, quick: bool, wall: float, note: str = ""
) -> str:
    lines = [
        f"## Demo grid: {name} (recorded)",
        "",
        f"`python -m benchmarks.demo_grids {name}{' --quick' if quick else ''}`: "
        f"distilpose_demo, {plan.num_train} people, {plan.student_epochs} epochs of batch "
        f"{plan.batch_size}, lr {plan.lr:g} (cosine) unless the row says otherwise; evaluated on "
        f"{plan.num_val} val people with detections and flip test.",
        f"{run_line(wall)} (rows trained before, with the same settings, are read back, not "
        "retrained).",
        "AP = mean over the seeds the row ran; spread = max - min over them; train s = median.",
        *([note] if note else []),
        "",
        "| row | losses | data | views | lr | batch | seeds | AP | spread | AP50 | PCK | px err "
        "| train s | teacher fwd |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['name']} | {r['losses']} | {data_cell(r)} | "
            f"{r.get('views', plan.views) if r.get('data', 'store') == 'store' else '-'} | "
            f"{r.get('lr', plan.lr):g} | {r.get('batch_size', plan.batch_size)} | "
            f"{','.join(map(str, r['seeds']))} | {r['ap']:.3f} | {r['ap_spread']:.3f} | "
            f"{r['ap50']:.3f} | {r['pck']:.3f} | {r['pixel_error']:.2f} | {r['train_s']:.0f} | "
            f"{r['teacher_forwards']:,} |"
        )
    if not set.intersection(*(set(r["seeds"]) for r in table)):
        return "\n".join([*lines, "", NO_BEST]) + "\n"
    seed, best = best_row(table)
    lines += [
        "",
        f"Best row: **{best['name']}**, chosen on seed {seed}, the one every row ran (AP "
        f"{best['aps'][best['seeds'].index(seed)]:.4f} there; {best['ap']:.3f} over seeds "
        f"{best['seeds']}).",
    ]
    return "\n".join(lines) + "\n"


NO_BEST = "Best row: none chosen: no seed is in every row (run `--rows` on a seed they share)."


def best_row(table: list[dict]) -> tuple[int, dict]:
    """The seed every row ran (the lowest, if several) and the row with the best AP on it: rows
    are compared on the same seed (a mean over more seeds is not comparable with one seed's
    AP), as the grid picks the row it repeats."""
    common = set.intersection(*(set(r["seeds"]) for r in table))
    seed = min(common)
    return seed, max(table, key=lambda r: r["aps"][r["seeds"].index(seed)])


README = ROOT / "README.md"
MARK = ("<!-- views-curve -->", "<!-- /views-curve -->")
VIEWS_RECORDS = {False: RESULTS / "views_grid.json", True: RESULTS / "views_grid_quick.json"}


def online_row(record: dict) -> dict:
    return next(r for r in record["rows"] if r["name"] == "online")


def reaches_range(row: dict, reference: dict) -> bool:
    """A row's mean AP at or above the lowest seed of `reference` (the online teacher, fp16)."""
    return row["ap"] >= min(reference["aps"])


def recommended_views(record: dict) -> dict:
    """The store row a views record recommends: of the rows run on as many seeds as the online
    teacher (a one-seed AP is not compared with a mean over three), the fewest plain views (no
    input jitter) whose mean AP reaches the online teacher's seed range (or above it); the best
    of those rows when none does."""
    online = online_row(record)
    store = [r for r in record["rows"] if r.get("data", "store") == "store"]
    store = [r for r in store if len(r["seeds"]) >= len(online["seeds"])] or store
    plain = sorted((r for r in store if not r.get("input_jitter")), key=lambda r: r["views"])
    enough = [r for r in plain if reaches_range(r, online)]
    return enough[0] if enough else max(store, key=lambda r: r["ap"])


def views_answer(record: dict, quick: bool) -> str:
    """The README's one-sentence answer from a views record (of the full demo's sizes, or
    --quick's): the fewest cached views that match the online teacher, within whose seed
    spread or not, at what store size and teacher cost; then every row."""
    online = online_row(record)
    store = [r for r in record["rows"] if r.get("data", "store") == "store"]
    plain = [r for r in store if not r.get("input_jitter")]
    cheap = [r for r in store if r.get("input_jitter")]
    best = recommended_views(record)
    low, high = min(online["aps"]), max(online["aps"])
    within = reaches_range(best, online)
    plan, per_view = record["plan"], record["bytes_per_view"]
    size = best["views"] * plan["num_train"] * per_view / 1e6
    share = best["teacher_forwards"] / online["teacher_forwards"]
    verdict = (
        ("above" if best["ap"] > high else "within") + " the online teacher's seed range"
        if within
        else "below the online teacher's seed range"
    )
    setting = f"{best['views']} cached view(s) per person" + (
        f" with input jitter {best['input_jitter']:g}" if best.get("input_jitter") else ""
    )
    lead = (
        f"the fewest of the rows on {len(online['seeds'])} seeds that match the online teacher"
        if within
        else "the best store row"
    )
    suffix = "_quick" if quick else ""
    return (
        f"On the demo{' at `--quick` size' if quick else ''} ({plan['num_train']} people, "
        f"{plan['student_epochs']} epochs; [record](benchmarks/results/views_grid{suffix}.md), "
        f"[plot](docs/images/views_curve{suffix}.png)), {setting} ({lead}) "
        f"train the distilled student to AP {best['ap']:.3f} (seeds {best['seeds']}, spread "
        f"{best['ap_spread']:.3f}), {verdict} ({online['ap']:.3f}, {low:.3f}-{high:.3f} over "
        f"seeds {online['seeds']}), from a store of {size:.0f} MB ({per_view / 1e3:.1f} kB per "
        f"view) and {share:.0%} of its teacher forwards ({best['teacher_forwards']:,} against "
        f"{online['teacher_forwards']:,}). Every store row: "
        + ", ".join(
            f"V={r['views']} {r['ap']:.3f}"
            + (f" ({len(r['seeds'])} seed)" if len(r["seeds"]) < len(online["seeds"]) else "")
            for r in sorted(plain, key=lambda r: r["views"])
        )
        + "".join(
            f"; V={r['views']} with input jitter {r['input_jitter']:g} (cheap views) "
            f"{r['ap']:.3f} (spread {r['ap_spread']:.3f}, {len(r['seeds'])} seeds)"
            for r in sorted(cheap, key=lambda r: r["views"])
        )
        + "."
    )


def plot_line(quick: bool) -> str:
    """The README's picture of one size's curve (drawn by plot_views)."""
    size, suffix = (" (--quick size)", "_quick") if quick else ("", "")
    return (
        f"![student AP against cached views, with the online teacher's line{size}]"
        f"(docs/images/views_curve{suffix}.png)"
    )


def views_block() -> str:
    """The README's views answers: one per recorded size, the full demo's first."""
    answers = [
        views_answer(json.loads(path.read_text()), quick) + "\n\n" + plot_line(quick)
        for quick, path in sorted(VIEWS_RECORDS.items())
        if path.is_file()
    ]
    if not VIEWS_RECORDS[False].is_file():
        answers.append("The curve at the full demo's size is not recorded yet.")
    return "\n\n".join(answers)


SCALE_OUT = ROOT / "docs" / "scale-out.md"


def epochs_per_view(record: dict) -> tuple[dict, float]:
    """The recommended row of a views record and its epochs per stored view."""
    best = recommended_views(record)
    return best, record["plan"]["student_epochs"] / best["views"]


def rule_block() -> str:
    """docs/scale-out.md's views rule, from the recorded curves (full demo, then --quick)."""
    lines, full_per_view = [], None
    for quick, path in sorted(VIEWS_RECORDS.items()):
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        best, per_view = epochs_per_view(record)
        full_per_view = full_per_view if quick else per_view
        verdict = "matched" if reaches_range(best, online_row(record)) else "came closest to"
        lines.append(
            f"- {'`--quick`' if quick else 'The full demo'} ({record['plan']['num_train']} "
            f"people, {record['plan']['student_epochs']} epochs): {best['views']} view(s) "
            f"{verdict} the online teacher over seeds {best['seeds']}, one view per "
            f"{per_view:.1f} epochs ([record](../benchmarks/results/views_grid"
            f"{'_quick' if quick else ''}.md))."
        )
    if full_per_view is not None:
        lines.append(
            f"- At the full demo's rule, a {PAPER_EPOCHS}-epoch schedule (the paper's) wants about "
            f"{math.ceil(PAPER_EPOCHS / full_per_view)} views (one per {full_per_view:.1f} "
            "epochs)."
        )
    return "\n".join(lines)


def write_readme() -> None:
    """Replace the README's block between MARK with `views_block()`."""
    text = README.read_text()
    head, rest = text.split(MARK[0], 1)
    _, tail = rest.split(MARK[1], 1)
    README.write_text(f"{head}{MARK[0]}\n{views_block()}\n{MARK[1]}{tail}")
    update_readme_block("views-rule", rule_block(), readme=SCALE_OUT)


def _ap_figure() -> tuple:
    """A (figure, axes) pair of the grids' AP plots (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5, 3.2), dpi=120)


def _seeds_bar(ax: object, xs: list[float], rows: list[dict], **style: object) -> None:
    """Each row's mean AP at its x, the bar spanning the row's seeds."""
    ax.errorbar(
        xs, [r["ap"] for r in rows],
        yerr=[[r["ap"] - min(r["aps"]) for r in rows], [max(r["aps"]) - r["ap"] for r in rows]],
        capsize=3, **style,
    )  # fmt: skip


def _save_ap_figure(fig: object, ax: object, xlabel: str, path: Path) -> None:
    """Label the AP axes, add the legend, write `path` and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("student AP (demo val)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_views(table: list[dict], path: Path) -> None:
    """AP against stored views (log 2 axis), with the online teacher's mean and spread."""
    store = sorted(
        (r for r in table if r.get("data", "store") == "store" and not r.get("input_jitter")),
        key=lambda r: r["views"],
    )
    fig, ax = _ap_figure()
    _seeds_bar(ax, [r["views"] for r in store], store, marker="o", label="cached views")
    cheap = [r for r in table if r.get("input_jitter")]
    if cheap:
        _seeds_bar(ax, [r["views"] for r in cheap], cheap, marker="s", linestyle="none",
                   label="cached views + input jitter")  # fmt: skip
    for r in table:
        if r.get("data") == "online":
            ax.axhline(r["ap"], color="C1", label="online teacher, fresh views")
            ax.axhspan(min(r["aps"]), max(r["aps"]), color="C1", alpha=0.15)
    ax.set_xscale("log", base=2)
    _save_ap_figure(fig, ax, "views per person in the store", path)


MODES_RECORD = RESULTS / "modes_grid.json"
MODES_PLOT = ROOT / "docs" / "images" / "modes_curve.png"


def mode_stores(jobs: list[tuple[dict, int]], out: Path, plan: object) -> tuple[list, dict, dict]:
    """The modes grid's (row, seed) pairs, each row with the store of its mode (a row's name is
    its mode), dumped here; the per-mode bytes per view (the fp16 store's too); the demo data
    with the fp16 store."""
    from store.checks import store_info

    data = demo_store(out, plan, grid_views([r for r, _ in jobs], plan))
    stores = {"fp16": data["store"]}
    for row in {r["name"]: r for r, _ in jobs}.values():
        stores[row["name"]] = demo_store(out, plan, grid_views([row], plan), row["name"])["store"]
    sizes = {
        mode: {k: store_info(path)[f"{k}_bytes_per_view"] for k in ("target", "pixel", "label")}
        for mode, path in stores.items()
    }
    return [({**row, "store": stores[row["name"]]}, seed) for row, seed in jobs], sizes, data


def modes_table(table: list[dict], sizes: dict) -> list[dict]:
    """The grid's rows, each with its mode's bytes per view, sorted by target bytes."""
    sized = [
        {**r, "mode": r["name"], **{f"{k}_bytes_per_view": v for k, v in sizes[r["name"]].items()}}
        for r in table
    ]
    return sorted(sized, key=lambda r: r["target_bytes_per_view"])


def modes_verdict(table: list[dict], mode: str = DEFAULT_COMPACT) -> str:
    """A compact setting's AP (the default one unless `mode` says) against fp16's seed range,
    in one sentence."""
    ref = next(r for r in table if r["mode"] == "fp16")
    row = next(r for r in table if r["mode"] == mode)
    low, high = min(ref["aps"]), max(ref["aps"])
    where = ("above" if row["ap"] > high else "within") if reaches_range(row, ref) else "below"
    which = "default " if mode == DEFAULT_COMPACT else ""
    return (
        f"The {which}`{mode}` targets ({row['target_bytes_per_view'] / 1e3:.2f} kB "
        f"per view against fp16's {ref['target_bytes_per_view'] / 1e3:.2f} kB, "
        f"{ref['target_bytes_per_view'] / row['target_bytes_per_view']:.1f}x less) train the "
        f"distilled student to AP {row['ap']:.3f} (seeds {row['seeds']}, spread "
        f"{row['ap_spread']:.3f}), {where} fp16's seed range ({ref['ap']:.3f}, "
        f"{low:.3f}-{high:.3f} over seeds {ref['seeds']})."
    )


def record_verdict(table: list[dict]) -> str:
    """A modes record's verdict: on the default compact setting where the record has it,
    otherwise on each of its settings besides fp16 (a record of rows rerun side by side)."""
    if any(r["mode"] == DEFAULT_COMPACT for r in table):
        return modes_verdict(table)
    return " ".join(modes_verdict(table, r["mode"]) for r in table if r["mode"] != "fp16")


def format_modes(table: list[dict], plan: object, wall: float) -> str:
    """The modes record: AP against bytes per view, one row per store mode."""
    lines = [
        "## Demo grid: modes (recorded)",
        "",
        f"`python -m benchmarks.demo_grids modes`: the demo's distilled student "
        f"(distilpose_demo, {table[0]['losses']}), {plan.num_train} people, "
        f"{plan.student_epochs} epochs of batch {plan.batch_size}, lr {plan.lr:g} (cosine), from "
        f"{table[0]['views']} views of the shipped demo teacher stored in each target mode (one "
        f"store per mode, same people and views); evaluated on {plan.num_val} val people with "
        "detections and flip test.",
        f"{run_line(wall)}; train s = median wall time of a run, two runs sharing the 2 cores.",
        "",
        "| mode | targets kB/view | pixels kB/view | seeds | AP | spread | AP50 | PCK | px err "
        "| train s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| `{r['mode']}` | {r['target_bytes_per_view'] / 1e3:.2f} | "
            f"{r['pixel_bytes_per_view'] / 1e3:.2f} | {','.join(map(str, r['seeds']))} | "
            f"{r['ap']:.3f} | {r['ap_spread']:.3f} | {r['ap50']:.3f} | {r['pck']:.3f} | "
            f"{r['pixel_error']:.2f} | {r['train_s']:.0f} |"
        )
    return "\n".join([*lines, "", record_verdict(table)]) + "\n"


def plot_modes(table: list[dict], path: Path) -> None:
    """AP against target bytes per view (log axis), the bars spanning the seeds, with fp16's
    seed range as a band."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = _ap_figure()
    kb = [r["target_bytes_per_view"] / 1e3 for r in table]
    _seeds_bar(ax, kb, table, marker="o", linestyle="none")
    for x, r in zip(kb, table, strict=True):
        ax.annotate(r["mode"], (x, r["ap"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ref = next(r for r in table if r["mode"] == "fp16")
    ax.axhspan(min(ref["aps"]), max(ref["aps"]), color="C1", alpha=0.15, label="fp16 seed range")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # one label per decade
    ax.xaxis.set_major_formatter(ScalarFormatter())
    _save_ap_figure(fig, ax, "teacher targets, kB per view", path)


def modes_block() -> str:
    """The README's answer on bytes per view, from the modes record (or that it is missing),
    and the verdict of every other modes record (`--record`: rows rerun side by side)."""
    if not MODES_RECORD.is_file():
        return "The modes curve is not recorded yet."
    table = json.loads(MODES_RECORD.read_text())["rows"]
    rows = ", ".join(
        f"`{r['mode']}` {r['target_bytes_per_view'] / 1e3:.1f} kB {r['ap']:.3f}"
        + (f" ({len(r['seeds'])} seed)" if len(r["seeds"]) == 1 else "")
        for r in table
    )
    # the verdict on the default compact setting where this record has it (else the records
    # rerun side by side below judge it)
    said = modes_verdict(table) + " " if any(r["mode"] == DEFAULT_COMPACT for r in table) else ""
    text = (
        f"{said}Targets per view and AP, every mode: {rows} "
        "([record](benchmarks/results/modes_grid.md))."
    )
    for path in sorted(RESULTS.glob(f"{MODES_RECORD.stem}_*.json")):
        other = json.loads(path.read_text())
        said = record_verdict(other["rows"])
        text += (
            f"\n\nRerun side by side ([record](benchmarks/results/{path.stem}.md), "
            f"{other['when']}): {said}"
        )
    return (
        f"{text}\n\n"
        "![student AP against teacher-target bytes per view](docs/images/modes_curve.png)"
    )


def run_modes(args: argparse.Namespace, rows: list[dict], plan: object, seeds: list[int]) -> str:
    """The modes grid: every (mode, seed) pair pooled, recorded with the fp16 reference."""
    start = time.perf_counter()
    out = args.out / "modes"
    # seed by seed: a run stopped early leaves every mode on as many seeds
    spec = args.rows or ",".join(f"{r['name']}@{s}" for s in seeds for r in rows)
    jobs = row_jobs(spec, rows, seeds)
    jobs, sizes, data = mode_stores(jobs, out, plan)
    results: dict[str, list[dict]] = {}
    for (row, _), r in zip(jobs, run_jobs(jobs, data, plan, out), strict=True):
        results.setdefault(row["name"], []).append(r)
    table = modes_table(summarize(rows, results, plan.num_train, plan), sizes)
    record = format_modes(table, plan, time.perf_counter() - start)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = RESULTS / f"{args.record}.json"
    path.with_suffix(".md").write_text(record)
    path.write_text(
        json.dumps({"plan": asdict(plan), "when": when, "rows": table}, indent=2, default=str)
    )
    if path == MODES_RECORD:  # the curve is the full grid's; another record adds its verdict
        plot_modes(table, MODES_PLOT)
    update_readme_block("modes-curve", modes_block())
    return record


MEANS = ("ap50", "pck", "pixel_error")  # a table row's figures that are means over its seeds


def merge_seeds(old: dict | None, new: dict) -> dict:
    """A row trained on more seeds (`--rows name@1+2`) beside its recorded seeds: one row over
    the union (AP per seed, means weighted by seeds). Seeds in both, or other settings: the
    new row replaces the recorded one (its means cannot be split by seed)."""
    if old is None or set(old["seeds"]) & set(new["seeds"]):
        return new
    # the settings both rows record (an older record may lack a later field, such as views)
    figures = {"seeds", "ap", "ap_spread", "aps", *MEANS, "train_s"}
    if any(old[k] != new[k] for k in new if k not in figures and k in old):
        return new
    n, m = len(old["seeds"]), len(new["seeds"])
    seeds, aps = old["seeds"] + new["seeds"], old["aps"] + new["aps"]
    order = sorted(range(len(seeds)), key=seeds.__getitem__)
    return {
        **new,
        "seeds": [seeds[i] for i in order],
        "aps": [aps[i] for i in order],
        "ap": statistics.fmean(aps),
        "ap_spread": max(aps) - min(aps),
        **{k: (old[k] * n + new[k] * m) / (n + m) for k in MEANS},
        "train_s": statistics.median([old["train_s"], new["train_s"]]),
    }


def merged(path: Path, rows: list[dict], new: list[dict], names: str) -> tuple[list, str]:
    """The recorded table at `path` with the rows of `new` in (replacing same-named ones), in
    the grid's order, and the record's line saying which rows were trained when."""
    old = {r["name"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    old.update({r["name"]: merge_seeds(old.get(r["name"]), r) for r in new})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"Rows {names} trained {when} (`--rows`, the time and load above are theirs) and "
        "merged into the earlier record; the other rows are as recorded before (AP is "
        "deterministic on one machine at one thread, but machines of this kind differ a little "
        "(docs/notes.md), so a small AP difference between rows recorded on different machines "
        "is not a ranking; train s is not comparable across the two)."
        if len(old) > len(new)
        else f"Rows {names} (`--rows`), recorded {when} from runs trained by this invocation "
        "or earlier ones with the same settings; train s is each run's own wall time, two runs "
        "sharing the 2 cores (and whatever else ran then). The grid's other rows are not "
        "recorded at this size."
    )
    return [old[r["name"]] for r in rows if r["name"] in old], note


def main(argv: list[str] | None = None) -> int:
    import torch

    from demo import QUICK_DEMO, DemoPlan
    from student_train.ablate import load_grid

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", choices=sorted(REPEAT))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="The --quick demo's sizes.")
    p.add_argument("--out", type=Path, default=Path("runs/demo_grids"))
    p.add_argument(
        "--rows", default="",
        help="Train only these rows (names, comma-separated; `name@0+2` on those seeds only, a "
        "name alone on every --seeds), two at a time whatever their seeds, and merge them into "
        "the grid's record; the record's other rows are kept as recorded.",
    )  # fmt: skip
    p.add_argument(
        "--record", default=MODES_RECORD.stem,
        help="modes: the record's name in benchmarks/results (another name keeps the full grid's "
        "record and curve, and the README adds this record's verdict).",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    plan = QUICK_DEMO if args.quick else DemoPlan()
    seeds = [int(s) for s in args.seeds.split(",")]
    suffix = "_quick" if args.quick else ""
    name = args.grid.replace("-", "_")
    rows = load_grid(GRIDS / f"{name}.toml")
    if args.grid == "modes":
        if args.quick:
            p.error("modes: the fp16 reference is the full demo's views record; drop --quick")
        stem = MODES_RECORD.stem
        if args.record != stem and not re.fullmatch(rf"{stem}_[a-z0-9_-]+", args.record):
            p.error(f"--record {args.record}: expected {stem} or {stem}_NAME (a-z, 0-9, _, -)")
        print(run_modes(args, rows, plan, seeds))
        return 0
    out = args.out / (args.grid + suffix)
    try:
        jobs = row_jobs(args.rows, rows, seeds)
    except ValueError as e:
        p.error(f"{e} ({GRIDS / (name + '.toml')})")
    only = list({row["name"]: row for row, _ in jobs}.values())
    start = time.perf_counter()
    # views are added to a store, the old ones untouched: a row reads the same first V views
    # from a store of fewer views, so --rows dumps only what its rows read
    data = demo_store(out, plan, grid_views(only or rows, plan))
    results: dict[str, list[dict]] = {}
    if jobs:
        for (row, _), r in zip(jobs, run_jobs(jobs, data, plan, out), strict=True):
            results.setdefault(row["name"], []).append(r)
    for i, seed in enumerate([] if jobs else seeds):
        if i == 0:
            todo = rows
        else:
            best = max(rows, key=lambda r: results[r["name"]][0]["ap"])["name"]
            todo = [r for r in rows if r["name"] in {*REPEAT[args.grid], best}]
        for r in run_seed(todo, data, plan, seed, out / f"seed{seed}"):
            results.setdefault(r["name"], []).append(r)
    people = plan.num_train
    table = summarize(rows, results, people, plan)
    wall = time.perf_counter() - start
    note = ""
    if only:
        table, note = merged(RESULTS / f"{name}_grid{suffix}.json", rows, table, args.rows)
    record = format_record(args.grid, table, plan, args.quick, wall, note)
    (RESULTS / f"{name}_grid{suffix}.md").write_text(record)
    (RESULTS / f"{name}_grid{suffix}.json").write_text(
        json.dumps(
            {"plan": asdict(plan), "rows": table, "bytes_per_view": store_bytes(data)},
            indent=2,
            default=str,
        )  # fmt: skip
    )
    if args.grid == "views":
        plot_views(table, PLOT.with_name(f"views_curve{suffix}.png"))
        write_readme()
    print(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
