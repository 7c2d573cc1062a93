"""The demo as a user runs it, over several seeds: `distilpose demo --json` (and `--quick`).

    python -m benchmarks.demo_bench [--seeds 0,1,2] [--quick-seeds 0] [--out runs/demo_bench]

Each run is the real command in a subprocess, timed wall to wall. Writes
benchmarks/results/demo_run.md (every seed's table, the spread of each figure across seeds, and
the issue's checks: teacher AP >= 0.6; over the seeds, the distilled student above the
teacher-free best by more than either's seed spread, closing >= 50% of the gap from it to the
teacher; full run <= 300 s, quick <= 180 s) and demo_run.json, and the README's demo block from
them (`write_readme`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from demo import STUDENT_ROLES, format_demo_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
MARK = ("<!-- demo-table -->", "<!-- /demo-table -->")
ROLES = ("teacher", *STUDENT_ROLES)
COLUMNS = ("ap", "ap50", "ap75", "pck", "pixel_error")
DEMO_TIMEOUT_S = 3600  # the full demo takes minutes on 2 CPU cores; an hour means it hangs
WALL_GOAL_S = {False: 300, True: 180}  # full, --quick
GAP_GOAL = 0.5  # of the gap from the teacher-free best to the teacher, closed by distillation


def run_once(out: Path, seed: int, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "cli", "demo", "--json", "--out", str(out), "--seed", str(seed)]
    cmd += ["--quick"] if quick else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=DEMO_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:  # a hung demo must not hang the benchmark run
        raise RuntimeError(f"{' '.join(cmd)} ran over {DEMO_TIMEOUT_S} s") from e
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    rows = json.loads(proc.stdout)
    return {"seed": seed, "quick": quick, "wall_s": round(wall, 1), "rows": rows}


def by_role(run: dict) -> dict[str, dict]:
    return {r["role"]: r for r in run["rows"]}


def aps(runs: list[dict], role: str) -> list[float]:
    return [by_role(r)[role]["ap"] for r in runs]


def gap_closed(runs: list[dict]) -> float:
    """Mean over the runs of (distilled - teacher-free) / (teacher - teacher-free)."""
    t, d, f = (statistics.fmean(aps(runs, r)) for r in ROLES[:3])
    return (d - f) / (t - f)


def checks(full: list[dict], quick: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    for run in full + quick:
        kind = f"{'quick ' if run['quick'] else ''}seed {run['seed']}"
        goal = WALL_GOAL_S[run["quick"]]
        t = by_role(run)["teacher"]["ap"]
        out.append((f"{kind}: teacher AP >= 0.6", t >= 0.6, f"{t:.3f}"))
        out.append((f"{kind}: wall <= {goal} s", run["wall_s"] <= goal, f"{run['wall_s']:.0f} s"))
    for kind, runs in (("full", full), ("quick", quick)):
        if len(runs) < 2:
            continue
        d, f = aps(runs, "student_distilled"), aps(runs, "student_teacher_free")
        margin = statistics.fmean(d) - statistics.fmean(f)
        spread = max(max(d) - min(d), max(f) - min(f))
        out.append(
            (f"{kind}: distilled - teacher-free best > seed spread", margin > spread,
             f"{margin:.3f} vs {spread:.3f} ({len(runs)} seeds)")
        )  # fmt: skip
        closed = gap_closed(runs)
        out.append(
            (f"{kind}: gap closed from the teacher-free best >= {GAP_GOAL:.0%}",
             closed >= GAP_GOAL, f"{closed:.0%}")
        )  # fmt: skip
    return out


# what the record says when distillation closes less than GAP_GOAL of the gap (issue 29)
TRIED = (
    f"### Gap goal ({GAP_GOAL:.0%}) not met: what was tried\n\n"
    "- The distilled student's objective: every subset of Eq. 7's terms (table4_demo.md) and "
    "the token weights (`benchmarks/grids/demo_weights.toml`, docs/notes.md); the demo runs "
    "the best of them.\n"
    "- Its data: the views curve (views_grid.md): the demo's 8 views match the teacher run "
    "online, so more views would not raise it.\n"
    "- The teacher-free side was tuned as hard (teacher_free_grid_quick.md): its best row, "
    "`reg,dsnt`, is a trained model, which is why the gap to close is the larger one."
)


def table(run: dict) -> str:
    lines = [
        "| role | model | AP | AP50 | AP75 | PCK@0.05 | px err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in run["rows"]:
        lines.append(
            f"| {r['role']} | {r['model']} | {r['ap']:.3f} | {r['ap50']:.3f} | {r['ap75']:.3f} "
            f"| {r['pck']:.3f} | {r['pixel_error']:.2f} |"
        )
    return "\n".join(lines)


def spread(full: list[dict]) -> str:
    head = "| role | " + " | ".join(f"{c} (mean, min-max)" for c in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for role in ROLES:
        cells = []
        for c in COLUMNS:
            v = [by_role(r)[role][c] for r in full]
            cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}-{max(v):.3f})")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def free_text(full: list[dict], mean: dict, rng: dict) -> str:
    """The teacher-free rows' part of the README paragraph: one figure when the teacher-free
    best is `reg` alone (one run, `demo.student_runs`), else both."""
    same = all(
        by_role(r)["student_teacher_free"][c] == by_role(r)["student_baseline"][c]
        for r in full
        for c in COLUMNS
    )
    if same:
        return (
            f"teacher-free best {mean['student_baseline']:.3f} ({rng['student_baseline']}; the "
            "grid's best row at this budget is `reg` alone from the store, so the two rows are "
            "one run)"
        )
    return (
        f"teacher-free best {mean['student_teacher_free']:.3f} ({rng['student_teacher_free']}), "
        f"`reg` alone {mean['student_baseline']:.3f} ({rng['student_baseline']})"
    )


def readme_block(record: list[dict]) -> str:
    """The README's demo block from the record: seed 0's table, then one paragraph of the
    figures across seeds (every number from `record`)."""
    full = sorted((r for r in record if not r["quick"]), key=lambda r: r["seed"])
    quick = [r for r in record if r["quick"]]
    first = full[0]
    mean = {role: statistics.fmean(aps(full, role)) for role in ROLES}
    rng = {role: f"{min(aps(full, role)):.3f}-{max(aps(full, role)):.3f}" for role in ROLES}
    walls = [r["wall_s"] for r in full]
    seeds = ", ".join(str(r["seed"]) for r in full)
    text = (
        f"Seed {first['seed']} in {first['wall_s']:.0f} s wall on 2 cores (the goal is "
        f"{WALL_GOAL_S[False]} s: {'met' if max(walls) <= WALL_GOAL_S[False] else 'not met'}). "
        f"Over seeds {seeds} "
        f"({min(walls):.0f}-{max(walls):.0f} s each; other 2-core machines of this kind were "
        "measured 2.4x slower): AP teacher "
        f"{mean['teacher']:.3f} ({rng['teacher']}), distilled {mean['student_distilled']:.3f} "
        f"({rng['student_distilled']}), {free_text(full, mean, rng)}. The distilled student "
        f"closes {gap_closed(full):.0%} of the gap from the teacher-free best to the teacher "
        f"(the goal is {GAP_GOAL:.0%}: {'met' if gap_closed(full) >= GAP_GOAL else 'not met'})"
    )
    if quick:
        q = ", ".join(
            f"seed {r['seed']} {r['wall_s']:.0f} s: "
            + " / ".join(f"{by_role(r)[role]['ap']:.3f}" for role in ROLES)
            for r in quick
        )
        text += f". `--quick` ({q}, in the table's order)"
    return f"```\n{format_demo_table(first['rows'])}\n```\n\n{text}."


def write_readme(record: list[dict]) -> None:
    """Replace the README's block between MARK with `readme_block(record)`."""
    head, rest = README.read_text().split(MARK[0], 1)
    _, tail = rest.split(MARK[1], 1)
    README.write_text(f"{head}{MARK[0]}\n{readme_block(record)}\n{MARK[1]}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick-seeds", default="0")
    p.add_argument("--out", default="runs/demo_bench")
    p.add_argument("--note", default="", help="A line about the machine (e.g. shared, load).")
    p.add_argument(
        "--from-json", nargs="*", default=None,
        help="Only tabulate the runs saved by earlier invocations (their demo_bench.json).",
    )  # fmt: skip
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.from_json is not None:
        runs = [r for f in a.from_json for r in json.loads(Path(f).read_text())]
        full = sorted((r for r in runs if not r["quick"]), key=lambda r: r["seed"])
        quick = [r for r in runs if r["quick"]]
    else:
        seeds = [int(s) for s in a.seeds.split(",") if s]
        quick_seeds = [int(s) for s in a.quick_seeds.split(",") if s]
        full = [run_once(out / f"seed{s}", s, False) for s in seeds]
        quick = [run_once(out / f"quick{s}", s, True) for s in quick_seeds]
        (out / "demo_bench.json").write_text(json.dumps(full + quick, indent=2))
    from benchmarks.__main__ import machine_line

    md = [
        "## Demo run (recorded)\n",
        "`python -m benchmarks.demo_bench --seeds S,.. --quick-seeds S,..`: "
        "`distilpose demo --json --seed S` (and `--quick`), each timed wall to wall.",
        f"Machine: {machine_line()}. {a.note}\n",
    ]
    for run in full + quick:
        kind = "--quick" if run["quick"] else "full"
        md += [f"### {kind}, seed {run['seed']}: {run['wall_s']:.0f} s wall\n", table(run), ""]
    if full:
        md += ["### Across seeds\n", spread(full), ""]
    md += ["### Checks\n", "| check | met | measured |", "|---|---|---|"]
    md += [f"| {name} | {'yes' if ok else 'NO'} | {v} |" for name, ok, v in checks(full, quick)]
    if full and gap_closed(full) < GAP_GOAL:
        md += ["", TRIED]
    text = "\n".join(md) + "\n"
    (RESULTS / "demo_run.md").write_text(text)
    (RESULTS / "demo_run.json").write_text(json.dumps(full + quick, indent=2))
    write_readme(full + quick)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
