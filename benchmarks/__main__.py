"""Run every benchmark and write benchmarks/results/latest.md.

    python -m benchmarks [--quick] [--only model,store,dump,train,predict,scale,compact]

Each benchmark module exposes `run(quick: bool) -> str` (a Markdown section) and also writes its
own file in benchmarks/results/. This runner adds the machine it ran on, so the numbers can be
rerun and compared honestly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = {
    "model": "benchmarks.model_bench",
    "store": "benchmarks.store_bench",
    "dump": "benchmarks.dump_bench",
    "train": "benchmarks.train_bench",
    "predict": "benchmarks.predict_bench",
    "scale": "benchmarks.scale_bench",
    "compact": "benchmarks.compact_bench",
    "canvas": "benchmarks.canvas_bench",
}


def machine_line() -> str:
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cuda}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run all benchmarks.")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--only", default=None, help="comma list of: " + ",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"error: unknown benchmark(s) {', '.join(unknown)}; expected {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 1
    sections = [f"# Benchmark results\n\nMachine: {machine_line()}\n"]
    for name in names:
        started = time.perf_counter()
        print(f"== {name} ==", flush=True)
        section = importlib.import_module(BENCHMARKS[name]).run(quick=args.quick)
        print(section, flush=True)
        sections.append(section + f"\n\n_{name}: {time.perf_counter() - started:.0f} s_\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text("\n".join(sections))
    print(f"wrote {RESULTS / 'latest.md'}")
    from benchmarks.perf_doc import write as write_perf_doc

    write_perf_doc()  # docs/performance.md's summary, from the records just written
    return 0


if __name__ == "__main__":
    sys.exit(main())
