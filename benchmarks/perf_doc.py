"""docs/performance.md's summary table, written from the benchmark records (never by hand).

    python -m benchmarks.perf_doc

Reads the tables of benchmarks/results/{model,store,dump,train}_bench.md (what
`python -m benchmarks` writes) and puts the summary between docs/performance.md's
`<!-- perf-table -->` markers; a test keeps the page equal to what this writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import update_readme_block

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
DATA_PATH_GOAL = (1500, 5.0)  # samples/s per core, and times --pixels none (issue 28)
TARGET_READ_GOAL = 0.5  # in-process target read vs a flat memmap
WRITE_GOAL = 1000  # store writes, samples/s
DUMP_GOAL = 0.85  # dump loop vs forward pass alone
DEMO_GOAL_S = 300  # `distilpose demo`, wall (issue 29)
TRAIN_GOALS = (0.90, 3.0)  # from store vs no distillation; vs teacher online (TokenPose-L)


def md_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table of `text`, as rows keyed by the header's cells (a repeated header
    cell gets " (2)", " (3)" ...)."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not (line.startswith("|") and nxt.startswith("|---")):
            continue
        head: list[str] = []
        for cell in (c.strip() for c in line.strip("|").split("|")):
            seen = sum(h == cell or h.startswith(f"{cell} (") for h in head)
            head.append(f"{cell} ({seen + 1})" if seen else cell)
        rows = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip("|").split("|")]
            rows.append(dict(zip(head, cells, strict=True)))
        tables.append(rows)
    return tables


def number(cell: str) -> float:
    """'1,531' / '95%' / '1.33x' / '7.2' -> float (a percentage as a fraction)."""
    text = cell.replace(",", "").strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text.rstrip("x"))


def table_with(path: Path, column: str) -> list[dict[str, str]]:
    """The first table of a record that has `column`; a KeyError naming both otherwise."""
    for table in md_tables(path.read_text()):
        if table and column in table[0]:
            return table
    raise KeyError(f"{path.name}: no table with a '{column}' column")


def row_where(table: list[dict], column: str, value: str, **more: str) -> dict:
    for row in table:
        if row[column] == value and all(row.get(k) == v for k, v in more.items()):
            return row
    raise KeyError(f"no row with {column} = {value!r} {more}")


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def model_rows() -> list[str]:
    path = RESULTS / "model_bench.md"
    models = table_with(path, "paper params")
    speed = table_with(path, "teacher / student speed")
    rows = []
    for name, label in (("distilpose_s", "DistilPose-S"), ("distilpose_l", "DistilPose-L"),
                        ("tokenpose_l_w48", "teacher TokenPose-L/W48")):  # fmt: skip
        r = row_where(models, "model", name)
        rows.append(
            f"| {label} params / GFLOPs | {r['params']} / {r['GMACs (paper-style)']} | "
            f"{r['paper params']} / {r['paper GFLOPs']} |"
        )
    s, t = row_where(models, "model", "distilpose_s"), row_where(models, "model", "tokenpose_l_w48")
    vs = row_where(speed, "teacher / student speed", "distilpose_s vs tokenpose_l_w48")
    rows.append(
        f"| DistilPose-S vs teacher inference speed, batch 1 / 32 | {vs['batch 1']} / "
        f"{vs['batch 32']} ({s['samples/s b1']} vs {t['samples/s b1']}, {s['samples/s b32']} vs "
        f"{t['samples/s b32']} samples/s) | 4.9x (40.2 vs 8.2 FPS, V100 GPU): not measured here |"
    )
    large = row_where(speed, "teacher / student speed", "distilpose_l vs tokenpose_l_w48")
    rows.append(
        f"| DistilPose-L vs teacher, batch 1 / 32 | {large['batch 1']} / {large['batch 32']} | "
        "1.72x (GPU) |"
    )
    return rows


def store_rows() -> list[str]:
    path = RESULTS / "store_bench.md"
    modes = table_with(path, "write samples/s")
    data = table_with(path, "worker output")
    read = table_with(path, "vs memmap")
    dump = table_with(path, "dump loop samples/s")
    col = "samples/s per core (CPU-s)"

    def rate(pixels: str, targets: str, output_starts: str) -> float:
        for r in data:
            if (
                r["--pixels"] == pixels
                and r["targets"] == targets
                and r["worker output"].startswith(output_starts)
            ):
                return number(r[col])
        raise KeyError(f"store_bench.md: no data-path row {pixels}/{targets}/{output_starts}")

    none, gpu = rate("none", "zstd", "uint8"), rate("jpeg", "zstd", "JPEG bytes")
    cpu, raw = rate("jpeg", "zstd", "uint8"), rate("jpeg", "raw", "uint8")
    lossless = rate("lossless", "zstd", "uint8")
    floats_none = rate("none", "zstd", "normalized")
    c_jpeg, c_canvas = (
        rate("jpeg", "compact", "normalized"),
        rate("canvas", "compact", "normalized"),
    )
    goal_rate, goal_x = DATA_PATH_GOAL
    fp16, lossy = row_where(modes, "mode", "fp16"), row_where(modes, "mode", "lossy")
    path_of = {next(iter(r.values())).split(" (")[0]: r for r in read}  # the first cell
    zstd, raw_read = path_of["store, zstd targets"], path_of["store, raw targets"]
    memmap = path_of["flat fp16 memmap, random batches"]
    pixel_kb = {r["--pixels"]: r["pixels kB/sample"] for r in data}
    d_none, d_jpeg = row_where(dump, "--pixels", "none"), row_where(dump, "--pixels", "jpeg")
    jpeg_cpu = number(d_jpeg["CPU ms/sample (all processes)"]) / number(
        d_none["CPU ms/sample (all processes)"]
    )
    jpeg_wall = number(d_jpeg["dump loop samples/s"]) / number(d_none["dump loop samples/s"])
    return [
        "| training data path per data-loading core (crops + all teacher targets, batches of "
        "64, COCO crops), `--pixels jpeg` vs `none` † | decode on the GPU (a CUDA run's "
        f"default), worker side: {gpu:,.0f} vs {none:,.0f} samples/s per CPU-second, "
        f"{gpu / none:.1f}x; decode in the worker: {cpu:,.0f}, {cpu / none:.1f}x ({raw:,.0f} = "
        f"{raw / none:.1f}x with `--raw-targets`) | >= {goal_rate:,} and >= {goal_x:g}x: "
        f"{verdict(gpu >= goal_rate and gpu / none >= goal_x)} with the GPU decode (its decode "
        f"time not measured: no GPU); {verdict(cpu >= goal_rate and cpu / none >= goal_x)} "
        "with a CPU decode |",
        f"| same, `--pixels lossless` † | {lossless:,.0f} samples/s per CPU-second "
        f"({lossless / none:.1f}x) | - |",
        "| CPU training path (normalized crops, a CPU run's workers), `--mode compact` targets, "
        "`--pixels jpeg` / `canvas` vs `none` (fp16) † | "
        f"{c_jpeg:,.0f} / {c_canvas:,.0f} vs {floats_none:,.0f} samples/s per CPU-second "
        f"({c_jpeg / floats_none:.1f}x / {c_canvas / floats_none:.1f}x) | >= {goal_rate:,} and "
        f">= {goal_x:g}x on a compact store: "
        f"{verdict(c_jpeg >= goal_rate and c_jpeg / floats_none >= goal_x)} |",
        "| store target read, one process, vs a flat fp16 memmap "
        f"({number(memmap['samples per CPU-s']):,.0f} samples per CPU-s, warm) † | per CPU-s "
        f"{zstd['vs memmap']} (zstd targets, default) / {raw_read['vs memmap']} "
        f"(`--raw-targets`); wall {zstd['vs memmap (2)']} / {raw_read['vs memmap (2)']} | "
        f">= {TARGET_READ_GOAL:.0%}: "
        f"{verdict(number(zstd['vs memmap']) >= TARGET_READ_GOAL)} in CPU cost |",
        f"| dump-teacher, `--pixels jpeg` vs `none` (tiny teacher, CPU) † | CPU per sample "
        f"{jpeg_cpu - 1:+.0%}; wall {jpeg_wall:.0%} | within 10%: "
        f"{verdict(jpeg_cpu <= 1.10)} in CPU cost; {verdict(jpeg_wall >= 0.90)} in wall time |",
        f"| store write, fp16, fsync included | {number(fp16['write samples/s']):,.0f} samples/s "
        f"| >= {WRITE_GOAL:,}: {verdict(number(fp16['write samples/s']) >= WRITE_GOAL)} |",
        f"| bytes per sample, fp16 / lossy targets; pixels jpeg / lossless | "
        f"{fp16['kB/sample on disk']} kB / {lossy['kB/sample on disk']} kB; "
        f"{pixel_kb['jpeg']} kB / {pixel_kb['lossless']} kB | <= 200 kB / <= 64 kB |",
    ]


def dump_rows() -> list[str]:
    table = table_with(RESULTS / "dump_bench.md", "ratio (loop / forward)")
    tiny = row_where(table, "teacher", "tokenpose_tiny")
    large = row_where(table, "teacher", "tokenpose_l_w48")
    met = min(number(tiny["ratio (loop / forward)"]), number(large["ratio (loop / forward)"]))
    return [
        f"| dump vs teacher forward alone, tiny teacher / TokenPose-L | "
        f"{tiny['ratio (loop / forward)']} / {large['ratio (loop / forward)']} | "
        f">= {DUMP_GOAL:.0%}: {verdict(met >= DUMP_GOAL)} on CPU |"
    ]


def train_rows() -> list[str]:
    table = table_with(RESULTS / "train_bench.md", "store / no-distill")
    tiny, full = table
    share, online = TRAIN_GOALS
    low = min(number(r["store / no-distill"]) for r in table)
    return [
        "| student training from the store vs no distillation (tiny / DistilPose-S) | "
        f"{tiny['store / no-distill']} / {full['store / no-distill']} | >= {share:.0%}: "
        f"{verdict(low >= share)} |",
        "| student training from the store vs teacher online (tiny / DistilPose-S with "
        f"TokenPose-L) | {tiny['store / online']} / {full['store / online']} | >= {online:g}x "
        f"with TokenPose-L: {verdict(number(full['store / online']) >= online)} on CPU |",
    ]


def step_rows() -> list[str]:
    """The demo student's step on one thread, each variant against the demo's (train_bench),
    and the speed-up the demo's 300 s goal asks of it (its fastest full run, demo_run.json)."""
    ratio = "vs the demo's step"
    base, *others = table_with(RESULTS / "train_bench.md", ratio)
    runs = json.loads((RESULTS / "demo_run.json").read_text())
    walls = [r["wall_s"] for r in runs if not r["quick"]]
    need = min(walls) / DEMO_GOAL_S
    best = max(number(r[ratio]) for r in others)
    return [
        f"| the demo student's training step, one CPU thread ({base['samples/s']} samples/s at "
        "batch 8): each variant against it | "
        + ", ".join(f"{r['variant']} {r[ratio]}" for r in others)
        + f" | the demo in {DEMO_GOAL_S} s (issue 29) needs {need:.1f}x (its fastest run, "
        f"{min(walls):.0f} s): {verdict(best >= need)} by one of these |"
    ]


def peer_rows() -> list[str]:
    """Our loader against WebDataset and LitData on one core (peer_bench.md)."""
    rows = {r["loader"].split(" (")[0]: r for r in table_with(RESULTS / "peer_bench.md", "loader")}
    rate = {k: number(r["samples per CPU-s"]) for k, r in rows.items()}
    kb = {k: r["kB per view on disk"] for k, r in rows.items()}
    peers = {k: v for k, v in rate.items() if not k.startswith("ours")}
    compact = next(k for k in rate if "compact" in k)
    return [
        "| our store vs peer loaders, one core, the same batch (normalized crops + all "
        "targets) ‡ | ours "
        + " / ".join(f"{rate[k]:,.0f}" for k in rate if k.startswith("ours"))
        + f" (fp16 zstd / raw / compact; {kb['ours']} / {kb[compact]} kB per view) vs "
        + ", ".join(f"{k} {v:,.0f} ({kb[k]} kB)" for k, v in peers.items())
        + " samples per CPU-s | ahead of each on a compact store (issue 28): "
        + f"{verdict(all(rate[compact] > v for v in peers.values()))} |"
    ]


def table() -> str:
    lines = ["| what | ours (2 CPU cores) | paper / goal |", "|---|---:|---:|"]
    lines += model_rows() + store_rows() + peer_rows() + dump_rows() + train_rows()
    lines += step_rows()
    lines.append(
        "| AP on COCO val2017 (paper: teacher 72.5 / 75.2 with DARK, DistilPose-S 71.6, "
        "DistilPose-L 74.4) | not measured: no COCO or released weights here | - |"
    )
    return "\n".join(lines)


def notes() -> str:
    """The paragraphs under the table: the footnote and why two goals are missed, with the
    records' figures."""
    dump = table_with(RESULTS / "dump_bench.md", "dump loop in forward")
    tiny, large = (row_where(dump, "teacher", t) for t in ("tokenpose_tiny", "tokenpose_l_w48"))
    full = table_with(RESULTS / "train_bench.md", "store / online")[1]
    return (
        "† Measured by `python -m benchmarks.store_bench` side by side in one run on this "
        "machine: rates per CPU-second and ratios, not wall-clock rates; the full tables, the "
        "GPU-decode caveat and the COCO sizes per mode are in "
        "[`benchmarks/results/store_bench.md`](../benchmarks/results/store_bench.md).\n\n"
        "‡ Measured by `python -m benchmarks.peer_bench`: the same crops (JPEG q95) and fp16 "
        "targets as WebDataset tar shards and a LitData optimized dataset, each read by its own "
        "loader on one core, loaders in turn; FFCV does not build here "
        "([`benchmarks/results/peer_bench.md`](../benchmarks/results/peer_bench.md)).\n\n"
        "Where goals are missed on this machine, the benchmarks say why. The dump's data work "
        "(JPEG decoding, warping, compression) runs on the same 2 cores as the teacher's forward "
        f"pass: the main thread spends {tiny['dump loop in forward']} (tiny) and "
        f"{large['dump loop in forward']} (TokenPose-L) of the dump loop in the forward pass, so "
        "the pipeline does not stall, but the cores are shared; on a GPU the forward pass leaves "
        "the CPU to the loaders. Online distillation on a CPU costs the teacher's forward (17 "
        "GFLOPs) next to the student's forward and backward, which on a CPU run slower per FLOP "
        f"than the HRNet forward, so the measured ratio ({full['store / online']}) stays under "
        "the FLOP ratio (benchmarks/train_bench.py derives it)."
    )


def write() -> bool:
    return update_readme_block("perf-table", f"{table()}\n\n{notes()}", readme=DOCS)


if __name__ == "__main__":
    raise SystemExit(0 if write() else 1)
