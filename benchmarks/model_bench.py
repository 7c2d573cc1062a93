"""Model sizes and CPU inference speed, next to the paper's figures.

    python -m benchmarks.model_bench [--quick]

For each model: trainable params, GMACs (paper-style, MMCV rules) and the full count with
attention's products, and inference samples/s at batch 1 and 32 on this machine's CPU
(`torch.inference_mode`, warm-up first, random input at the model's crop size). The teacher /
student speed ratio is put next to the paper's 4.9x (DistilPose-S vs its TokenPose-L teacher,
40.2 vs 8.2 FPS, measured on a GPU at batch 1, so a CPU ratio is only indicative).
Writes benchmarks/results/model_bench.md; `run(quick)` returns that Markdown section.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distilpose.models import build_model, model_info

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = ["distilpose_s", "distilpose_l", "tokenpose_l_w48", "tokenpose_s", "distilpose_tiny",
         "tokenpose_tiny"]  # fmt: skip
PAPER = {  # (params M, GFLOPs) from the paper's Tables 1 and 3
    "distilpose_s": (5.36, 2.38),
    "distilpose_l": (21.27, 10.33),
    "tokenpose_l_w48": (69.41, 17.03),
}
PAPER_SPEEDUP = 4.9  # DistilPose-S vs teacher FPS (Table 3)


def _iters(name: str, batch: int, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) iterations: a batch of 32 full-size crops takes seconds on 2 cores, so
    those get one warm-up and one timed pass (none warm-up with --quick)."""
    heavy = not name.endswith("_tiny") and batch > 1
    if heavy:
        return (0, 1) if quick else (1, 1)
    return (1, 3) if quick else (2, 10)


def _best_time(step, warmup: int, iters: int) -> float:
    """Fastest of `iters` timed calls after `warmup` calls: the least disturbed by other
    processes sharing the CPU (timeit's rule)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def samples_per_second(model: torch.nn.Module, batch: int, warmup: int, iters: int) -> float:
    """Inference samples/s (eval mode, `torch.inference_mode`)."""
    w, h = model.config.input_size
    x = torch.randn(batch, 3, h, w)

    @torch.inference_mode()
    def step() -> None:
        model(x)

    return batch / _best_time(step, warmup, iters)


def train_samples_per_second(model: torch.nn.Module, batch: int, warmup: int, iters: int) -> float:
    """Training samples/s: forward, a loss on every output, backward, Adam step."""
    w, h = model.config.input_size
    x = torch.randn(batch, 3, h, w)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        out = model(x)
        loss = sum(v.float().pow(2).mean() for v in vars(out).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    speed = batch / _best_time(step, warmup, iters)
    model.eval()
    return speed


def measure(quick: bool = False) -> list[dict]:
    """One row per model: info (params, gflops, gflops_full), inference samples/s at batch 1 and
    32, and for the tiny models training samples/s at batch 32."""
    warm = build_model("distilpose_tiny").eval()  # first calls in a process pay one-off setup
    samples_per_second(warm, 8, 3, 1)
    rows = []
    for name in NAMES:
        torch.manual_seed(0)
        model = build_model(name).eval()
        row = dict(model_info(name))
        for batch in (1, 32):
            warmup, iters = _iters(name, batch, quick)
            row[f"samples_per_s_b{batch}"] = samples_per_second(model, batch, warmup, iters)
        if name.endswith("_tiny"):
            row["train_samples_per_s_b32"] = train_samples_per_second(
                model, 32, 2, 3 if quick else 8
            )
        rows.append(row)
        del model
    return rows


def to_markdown(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    lines = [
        "## Models: size and CPU inference speed",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        "inference_mode, random input at each model's crop size.",
        "",
        "| model | role | input (w x h) | params | paper params | GMACs (paper-style) "
        "| paper GFLOPs | GMACs full | samples/s b1 | samples/s b32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper_p, paper_g = PAPER.get(r["name"], (None, None))
        w, h = r["input_size"]
        lines.append(
            f"| {r['name']} | {r['role']} | {w} x {h} | {r['params']:,} | "
            f"{f'{paper_p:.2f}M' if paper_p else '-'} | {r['gflops']:.2f} | "
            f"{paper_g if paper_g else '-'} | {r['gflops_full']:.2f} | "
            f"{r['samples_per_s_b1']:.1f} | {r['samples_per_s_b32']:.1f} |"
        )
    pairs = [("tokenpose_l_w48", "distilpose_s"), ("tokenpose_l_w48", "distilpose_l"),
             ("tokenpose_tiny", "distilpose_tiny")]  # fmt: skip
    lines += [
        "",
        "| teacher / student speed | batch 1 | batch 32 | paper |",
        "|---|---:|---:|---:|",
    ]
    for teacher, student in pairs:
        if teacher in by and student in by:
            s, t = by[student], by[teacher]
            r1 = s["samples_per_s_b1"] / t["samples_per_s_b1"]
            r32 = s["samples_per_s_b32"] / t["samples_per_s_b32"]
            paper = f"{PAPER_SPEEDUP}x (GPU)" if student == "distilpose_s" else "-"
            lines.append(f"| {student} vs {teacher} | {r1:.1f}x | {r32:.1f}x | {paper} |")
    lines += ["", "Training speed (forward + backward + Adam step, batch 32):", ""]
    for r in rows:
        if "train_samples_per_s_b32" in r:
            lines.append(f"- {r['name']}: {r['train_samples_per_s_b32']:.0f} samples/s")
    lines += ["", "Speeds are the fastest of the timed iterations (the CPU may be shared)."]
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    """Measure, write results/model_bench.md, return the Markdown section."""
    section = to_markdown(measure(quick))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model_bench.md").write_text(section + "\n")
    return section


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Model sizes and CPU inference speed.")
    parser.add_argument("--quick", action="store_true", help="one timed iteration per setting")
    print(run(quick=parser.parse_args().quick))
