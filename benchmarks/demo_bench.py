"""The demo as a user runs it, over several seeds: `distilpose demo --json` (and `--quick`).

    python -m benchmarks.demo_bench [--seeds 0,1,2] [--quick-seeds 0] [--out runs/demo_bench]

Each run is the real command in a subprocess, timed wall to wall. Writes
benchmarks/results/demo_run.md: every seed's table, the spread of each figure across seeds, and
the issue's checks (teacher AP >= 0.6; distilled - baseline >= 0.5 x (teacher - baseline);
each figure within +-0.03 of its mean over seeds; --quick keeps teacher > distilled > baseline
with gaps > 0.05; full run <= 10 min, quick <= 3 min).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROLES = ("teacher", "student_distilled", "student_baseline")
COLUMNS = ("ap", "ap50", "ap75", "pck", "pixel_error")
DEMO_TIMEOUT_S = 3600  # the full demo takes minutes on 2 CPU cores; an hour means it hangs


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


def checks(full: list[dict], quick: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    for run in full:
        t, d, b = (by_role(run)[r]["ap"] for r in ROLES)
        s = run["seed"]
        out.append((f"seed {s}: teacher AP >= 0.6", t >= 0.6, f"{t:.3f}"))
        gain, need = d - b, 0.5 * (t - b)
        out.append(
            (f"seed {s}: distilled - baseline >= 0.5 x (teacher - baseline)", gain >= need,
             f"{gain:.3f} vs {need:.3f}")
        )  # fmt: skip
        out.append((f"seed {s}: wall <= 600 s", run["wall_s"] <= 600, f"{run['wall_s']:.0f} s"))
    if len(full) > 1:
        for role in ROLES:
            aps = [by_role(r)[role]["ap"] for r in full]
            mean = sum(aps) / len(aps)
            dev = max(abs(a - mean) for a in aps)
            out.append(
                (f"{role} AP within +-0.03 of its mean", dev <= 0.03, f"max deviation {dev:.3f}")
            )
    for run in quick:
        t, d, b = (by_role(run)[r]["ap"] for r in ROLES)
        ok = t - d > 0.05 and d - b > 0.05
        out.append(
            (f"quick seed {run['seed']}: teacher > distilled > baseline, gaps > 0.05", ok,
             f"{t:.3f} / {d:.3f} / {b:.3f}")
        )  # fmt: skip
        out.append(
            (f"quick seed {run['seed']}: wall <= 180 s", run["wall_s"] <= 180,
             f"{run['wall_s']:.0f} s")
        )  # fmt: skip
    return out


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
    text = "\n".join(md) + "\n"
    (RESULTS / "demo_run.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
