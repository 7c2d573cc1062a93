"""Student training throughput in three modes: no distillation, from the store, teacher online.

    python -m benchmarks.train_bench [--quick]

Same student, batch and machine in each mode; samples/s of the median optimizer step, the
three modes stepped in turn after untimed warm-up steps, data loading included (store read +
crop re-rendering, workers=0 so the figure is the whole CPU cost per sample):

- no distillation: `--losses reg`, crops and keypoints from the store, no teacher output read;
- from store: all five loss terms, teacher heatmaps and tokens read from the store;
- teacher online: all five terms, the teacher runs on every batch (the official method).

Each step is `distilpose.training.engine.Trainer.train_step` with
`student_train.train.build_task`, i.e. exactly what `train-student` runs. Goals (issue 6):
from-store >= 90% of no-distillation, and >= 3x teacher-online for tokenpose_l_w48 ->
distilpose_s (the FLOP ratio allows ~3.4x).

Stores are written by `teacher_dump.dump.dump_teacher` on demo data. For the full-size pair the
store is dumped with `tokenpose_s` (randomly initialised), whose outputs have the shapes of
`tokenpose_l_w48`'s (17 heatmaps of 48x64, 192-d tokens) at a fraction of its dump cost:
throughput does not depend on the target values. The online mode runs the real
`tokenpose_l_w48` (randomly initialised; speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distilpose.data import make_demo_data
from distilpose.models import build_model, save_checkpoint
from distilpose.training.engine import TrainConfig, Trainer
from distilpose.training.losses import DEFAULT_LOSSES, DistillationLoss, parse_losses
from distilpose.training.runs import DumpRun
from student_train.data import StudentBatches
from student_train.train import build_task
from teacher_dump.dump import dump_teacher

RESULTS = Path(__file__).resolve().parent / "results"
ALL = DEFAULT_LOSSES

# (label, online teacher, teacher that dumps the store, student, batch, warm-up steps,
#  timed steps, quick timed steps)
PAIRS = [
    ("tiny", "tokenpose_tiny", "tokenpose_tiny", "distilpose_tiny", 16, 2, 15, 8),
    ("full 256x192", "tokenpose_l_w48", "tokenpose_s", "distilpose_s", 8, 1, 4, 1),
]


def make_store(root: Path, dump_model: str, instances: int) -> str:
    """Demo data + a randomly initialised `dump_model` dumped to a one-view store."""
    paths = make_demo_data(root / "data", num_train=instances, num_val=1, seed=0)
    torch.manual_seed(0)
    ckpt = root / f"{dump_model}.pth"
    save_checkpoint(ckpt, build_model(dump_model), meta={"role": "teacher", "model": dump_model})
    store = root / "store.zarr"
    dump_teacher(
        DumpRun(
            ckpt, paths["train_ann"], paths["train_images"], store, views=1, batch_size=8,
            workers=0, device="cpu", chunk_samples=16, shard_chunks=1,
        )
    )  # fmt: skip
    ckpt.unlink()
    return str(store)


class Mode:
    """One training mode, ready to step: model, data iterator and the engine's train step."""

    def __init__(
        self,
        store: str,
        student: str,
        losses: str,
        batch: int,
        run_dir: Path,
        teacher: torch.nn.Module | None = None,
        variant: str = "",
    ) -> None:
        torch.manual_seed(0)
        model = build_model(student)
        weights = parse_losses(losses)
        self.data = StudentBatches(
            store, batch_size=batch, losses=weights, online=teacher is not None, workers=0,
            verify_digest=False,
        )  # fmt: skip
        loss_fn = DistillationLoss(weights, geometry=model.config.geometry)
        config = TrainConfig(epochs=1, batch_size=batch, warmup_iters=1, device="cpu")
        self.trainer = Trainer(model, build_task(loss_fn, teacher), self.data, config, run_dir, {})
        if variant == "channels_last":  # the engine keeps NHWC for CUDA: set here on the CPU
            self.trainer.model.to(memory_format=torch.channels_last)
            self.trainer.channels_last = True
        elif variant == "compile":
            self.trainer.train_model = torch.compile(self.trainer.train_model)
        self.trainer.train_model.train()
        self.batch = batch
        self.times: list[float] = []
        self._it = self._batches()
        self.same_batch = next(self._it) if variant == "same batch" else None

    def _batches(self):
        epoch = 0
        while True:
            yield from self.data(epoch)
            epoch += 1

    def step(self, timed: bool = True) -> None:
        start = time.perf_counter()
        # the batch fetch (read, decode) included, but for the variant without loading
        self.trainer.train_step(self.same_batch or next(self._it))
        if timed:
            self.times.append(time.perf_counter() - start)

    def rate(self) -> float:
        """Samples/s of the median step: robust to other processes taking the CPU a moment."""
        return self.batch / statistics.median(self.times)


def bench_pair(pair: tuple, quick: bool, root: Path) -> dict:
    """Modes stepped round-robin (one step each per round), so slow phases of a shared machine
    hit all modes alike; untimed warm-up rounds first (allocator, oneDNN kernels)."""
    label, online_name, dump_name, student, batch, warmup, steps, quick_steps = pair
    steps = quick_steps if quick else steps
    store = make_store(root / label.split()[0], dump_name, batch * (steps + warmup))
    torch.manual_seed(0)
    teacher = build_model(online_name).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    run = root / "runs"
    modes = {
        "no distillation": Mode(store, student, "reg", batch, run),
        "from store": Mode(store, student, ALL, batch, run),
        "teacher online": Mode(store, student, ALL, batch, run, teacher),
    }
    for r in range(warmup + steps):
        for mode in modes.values():
            mode.step(timed=r >= warmup)
    rates = {name: mode.rate() for name, mode in modes.items()}
    return {"pair": f"{online_name} -> {student}", "label": label, "batch": batch, **rates}


# The demo student's step on one thread (issue 29: what makes it faster on a CPU), each variant
# against the demo's own (batch 8, eager, NCHW): (name, batch, Mode variant)
STEP_VARIANTS = [
    ("demo step (batch 8)", 8, ""),
    ("same batch every step (no loading)", 8, "same batch"),
    ("channels_last", 8, "channels_last"),
    ("torch.compile (inductor)", 8, "compile"),
    ("batch 16", 16, ""),
    ("batch 32", 32, ""),
]


def bench_steps(quick: bool, root: Path) -> list[dict]:
    """STEP_VARIANTS of distilpose_demo with the demo's losses, from a store of the demo
    teacher's shapes, one torch thread, stepped round-robin like the modes."""
    from demo import DemoPlan

    steps, warmup = (10, 3) if quick else (60, 5)
    store = make_store(root / "demo", "tokenpose_demo", 32 * 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        variants = {
            name: Mode(store, "distilpose_demo", DemoPlan().losses, b, root / "runs", None, v)
            for name, b, v in STEP_VARIANTS
        }
        for r in range(warmup + steps):
            for mode in variants.values():
                mode.step(timed=r >= warmup)
    finally:
        torch.set_num_threads(threads)
    return [{"variant": n, "batch": m.batch, "rate": m.rate()} for n, m in variants.items()]


def format_steps(rows: list[dict]) -> str:
    base = rows[0]["rate"]
    lines = [
        "\n## The demo student's training step on one CPU thread (samples/s)\n",
        "distilpose_demo with the demo's losses from a store of the demo teacher's shapes, "
        "workers=0, variants stepped in turn, median step after untimed warm-up steps "
        "(`STEP_VARIANTS`; what each would do to the demo's AP is not measured here).\n",
        "| variant | batch | samples/s | vs the demo's step |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['rate']:.1f} | {r['rate'] / base:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def format_results(rows: list[dict], quick: bool) -> str:
    lines = [
        "## Student training throughput (samples/s, CPU)\n",
        f"{torch.get_num_threads()} torch threads, workers=0 (data loading included), "
        f"{'quick run, ' if quick else ''}modes interleaved step by step, median step after "
        "untimed warm-up steps.\n",
        "| teacher -> student | batch | no distillation | from store | teacher online "
        "| store / no-distill | store / online |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base, store, online = r["no distillation"], r["from store"], r["teacher online"]
        lines.append(
            f"| {r['pair']} | {r['batch']} | {base:.1f} | {store:.1f} | {online:.1f} "
            f"| {store / base:.0%} | {store / online:.2f}x |"
        )
    lines.append(
        "\nGoals: from store >= 90% of no distillation; >= 3x teacher online for "
        "tokenpose_l_w48 -> distilpose_s."
    )
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    """Benchmark both pairs, write benchmarks/results/train_bench.md, return the table."""
    logging.getLogger("distilpose.training.engine").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        rows = [bench_pair(pair, quick, Path(tmp)) for pair in PAIRS]
        steps = bench_steps(quick, Path(tmp))
    text = format_results(rows, quick) + format_steps(steps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_bench.md").write_text(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    print(run(quick=parser.parse_args().quick))
