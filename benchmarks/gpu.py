"""The GPU check: the CUDA paths run once, and the paper's speed figures measured.

    python -m benchmarks.gpu [--dry-run] [--out FILE]

On a CUDA machine (one GPU or more; sized for under 8 minutes on one) it runs, and records in
benchmarks/results/gpu.md:

1. inference FPS of DistilPose-S and its teacher TokenPose-L/W48 at batch 1 and 32, in fp32 (the
   paper's setting: 40.2 vs 8.2 FPS, 4.9x, on a V100) and with AMP + channels-last;
2. `dump_teacher` throughput against the teacher's forward pass alone (goal >= 0.85), with
   TokenPose-L/W48 (`benchmarks.dump_bench.bench_one`);
3. a multi-rank dump: `distilpose dump-teacher` under torchrun on every visible GPU, checked
   against the one-process store array for array;
4. `train_student` of DistilPose-S from the store with AMP in bf16 and in fp16 (GradScaler) and
   channels-last: finite losses, samples/s; and the same with the teacher online (the official
   method): from-store vs online speed (goal >= 3x);
5. DDP: `distilpose train-student` under torchrun on all visible GPUs (one GPU: one rank, which
   runs the torchrun path without the DDP wrapper; said so in the record);
6. GPU JPEG decoding of the store's crop pixels, where this build's stores hold pixels; else one
   line saying it was skipped and why.

`--dry-run` runs the same functions on the CPU with the tiny models, tiny data and 2 gloo ranks,
so none of this is dead code (a test runs it); its numbers mean nothing and it writes a file
only with `--out`. Teachers and students are randomly initialised: speed does not depend on
the weights, and no trained weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from benchmarks.__main__ import machine_line
from benchmarks.dump_bench import GOAL as DUMP_GOAL
from benchmarks.dump_bench import bench_one
from benchmarks.model_bench import PAPER_SPEEDUP, _best_time
from distilpose.data import make_demo_data
from distilpose.geometry import SMOKE, Geometry
from distilpose.models import build_model, save_checkpoint
from distilpose.training.engine import amp_dtype
from distilpose.training.runs import DumpRun, StudentRun
from student_train.data import StudentBatches
from student_train.train import train_student
from teacher_dump.dump import dump_teacher

RESULTS = Path(__file__).resolve().parent / "results"
ONLINE_GOAL = 3.0  # from-store training vs teacher online (issue 6)
PAPER_FPS = {"distilpose_s": 40.2, "tokenpose_l_w48": 8.2}  # paper Table 3, V100, batch 1


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real GPU check or the CPU dry run."""

    device: str
    student: str
    teacher: str
    people: int  # demo people dumped and trained on
    batch: int  # training batch per process
    dump_batch: int
    dump_batches: int  # forward-vs-dump measurement: batches of `dump_batch`
    fps_iters: tuple[int, int]  # (warm-up, timed) per FPS figure
    epochs: int  # training epochs per mode (the last one is timed)
    workers: int
    ranks: int  # processes for the torchrun checks
    geometry: Geometry | None  # None: the models' own sizes

    @classmethod
    def for_run(cls, dry_run: bool) -> Plan:
        if dry_run:
            return cls("cpu", "distilpose_tiny", "tokenpose_tiny", 32, 8, 8, 2, (0, 1), 1, 0, 2,
                       SMOKE)  # fmt: skip
        ranks = max(1, torch.cuda.device_count())
        return cls("cuda", "distilpose_s", "tokenpose_l_w48", 2048, 64, 32, 20, (10, 50), 2, 8,
                   ranks, None)  # fmt: skip


def overrides(plan: Plan) -> dict:
    return plan.geometry.size_overrides() if plan.geometry else {}


# ---------------------------------------------------------------------------------- 1. FPS


def inference_fps(
    model: torch.nn.Module, batch: int, device: torch.device, amp: bool, iters: tuple[int, int]
) -> float:
    """Images/s of `model` in eval mode at `batch` (fp32, or AMP + channels-last)."""
    w, h = model.config.input_size
    x = torch.randn(batch, 3, h, w, device=device)
    model = model.to(device).eval()
    dtype = amp_dtype(device, amp)
    if amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return batch / _best_time(step, *iters)


def measure_fps(plan: Plan) -> list[dict]:
    device = torch.device(plan.device)
    rows = []
    for name in (plan.student, plan.teacher):
        torch.manual_seed(0)
        model = build_model(name, **overrides(plan))
        row = {"model": name}
        for batch in (1, 32):
            for amp in (False, True):
                row[f"b{batch}{'_amp' if amp else ''}"] = inference_fps(
                    model, batch, device, amp, plan.fps_iters
                )
        rows.append(row)
        del model
    return rows


# ------------------------------------------------------------------- 2-3. dump, several ranks


def teacher_checkpoint(plan: Plan, root: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(plan.teacher, **overrides(plan))
    path = root / "teacher_for_the_store.pth"  # bench_one uses <name>.pth
    save_checkpoint(path, model, meta={"role": "teacher", "model": plan.teacher})
    return path


# A torchrun check that takes longer than this has hung (a rank waiting on a dead peer): the whole
# check is sized for under 8 minutes, so one torchrun call never needs more than 4.
TORCHRUN_TIMEOUT_S = 240
# Ranks run the same teacher on the same batches, so their outputs differ only by kernel choice
# and reduction order (cuDNN autotuning, TF32); a stored float that moves by more than this
# fraction of its array's largest magnitude (at least 1) means the ranks dumped something else
# (a wrong slot, view or seed), not rounding.
RANK_TOLERANCE = 1e-2


def distilpose_command() -> list[str]:
    """This environment's `distilpose` (the console script beside the interpreter)."""
    script = Path(sys.executable).parent / "distilpose"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def torchrun(plan: Plan, args: list[str], cwd: Path) -> float:
    """Run `distilpose ARGS` under torchrun with `plan.ranks` processes; returns seconds."""
    cmd = distilpose_command()
    no_python = ["--no-python"] if len(cmd) == 1 else []
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(plan.ranks), *no_python, *cmd, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1" if plan.device == "cpu" else "4"}
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TORCHRUN_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"torchrun ran over {TORCHRUN_TIMEOUT_S} s: {' '.join(argv)}") from e
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def dump_args(plan: Plan, ckpt: Path, data: dict, out: Path) -> list[str]:
    return ["dump-teacher", "--teacher", str(ckpt), "--ann", str(data["train_ann"]),
            "--images", str(data["train_images"]), "--out", str(out), "--batch-size",
            str(plan.dump_batch), "--chunk-samples", str(plan.dump_batch), "--device",
            plan.device, "--workers", str(plan.workers)]  # fmt: skip


def measure_dump(plan: Plan, root: Path, data: dict, ckpt: Path) -> dict:
    """Forward alone vs the dump (one process), then the same dump under torchrun."""
    row = bench_one(
        plan.teacher, data, root, batch=plan.dump_batch, batches=plan.dump_batches,
        device=plan.device, rounds=1, unit_batches=2,
    )  # fmt: skip
    one, many = root / "store_1rank", root / "store_ranks"
    dump_teacher(
        DumpRun(
            ckpt, data["train_ann"], data["train_images"], one, batch_size=plan.dump_batch,
            chunk_samples=plan.dump_batch, device=plan.device, workers=plan.workers,
        )
    )  # fmt: skip
    row["ranks_s"] = torchrun(plan, dump_args(plan, ckpt, data, many), root)
    row["ranks_max_abs_diff"] = compare_dumps(one, many)
    return row


def compare_dumps(one: Path, many: Path) -> float:
    """Largest float difference of `many` from `one` relative to each array's scale; raises
    RuntimeError when an integer array differs or a float one moves past RANK_TOLERANCE."""
    g1, g2 = zarr.open_group(one, mode="r"), zarr.open_group(many, mode="r")
    worst = 0.0
    for name, arr in g1.arrays():
        a, b = np.asarray(arr[:]), np.asarray(g2[name][:])
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                raise RuntimeError(f"multi-rank dump: array '{name}' differs from the 1-rank dump")
            continue
        # relative to the array's scale: float16 tokens of magnitude 30 round in steps of 0.03
        a64 = a.astype(np.float64)
        scale = max(1.0, float(np.abs(a64).max(initial=0.0)))
        worst = max(worst, float(np.abs(a64 - b).max(initial=0.0)) / scale)
    if worst > RANK_TOLERANCE:
        raise RuntimeError(
            f"multi-rank dump: float arrays differ from the 1-rank dump by {worst:.3g} of their "
            f"scale (tolerance {RANK_TOLERANCE})"
        )
    return worst


# --------------------------------------------------------------------------- 4-5. training


def train_rate(plan: Plan, store: Path, out: Path, **kw) -> dict:
    """`train_student` for `plan.epochs` epochs; samples/s of its last epoch, losses finite."""
    summary = train_student(
        StudentRun(
            str(store), plan.student, out, epochs=plan.epochs, batch_size=plan.batch,
            warmup_iters=1, device=plan.device, workers=plan.workers, log_every=10**6,
            channels_last=True, model_overrides=overrides(plan) or None, **kw,
        )
    )  # fmt: skip
    with (out / "metrics.csv").open(newline="") as f:
        last = [r for r in csv.DictReader(f) if r["kind"] == "epoch"][-1]
    loss = float(last["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"{out}: non-finite loss {loss}")
    config = json.loads((out / "config.json").read_text())
    return {"samples_per_s": float(last["samples_per_s"]), "loss": loss,
            "amp_dtype": config["amp_dtype"], "steps": summary["steps"]}  # fmt: skip


def measure_training(plan: Plan, root: Path, store: Path, ckpt: Path) -> dict:
    runs = {}
    if plan.device != "cuda" or torch.cuda.is_bf16_supported():  # V100s have no bf16
        runs["store_bf16"] = train_rate(plan, store, root / "s_bf16", amp_dtype="bf16")
    runs["store_fp16"] = train_rate(plan, store, root / "s_fp16", amp_dtype="fp16")
    runs["online"] = train_rate(plan, store, root / "s_online", teacher_online=ckpt)
    args = ["train-student", "--store", str(store), "--model", plan.student,
            "--out", str(root / "s_ddp"), "--epochs", "1", "--batch-size", str(plan.batch),
            "--warmup-iters", "1", "--device", plan.device,
            "--workers", str(plan.workers)]  # fmt: skip
    if plan.geometry:
        args += ["--input-size", "{}x{}".format(*plan.geometry.input_size)]
    seconds = torchrun(plan, args, root)
    with (root / "s_ddp" / "metrics.csv").open(newline="") as f:
        last = [r for r in csv.DictReader(f) if r["kind"] == "epoch"][-1]
    runs["ddp"] = {"ranks": plan.ranks, "samples_per_s": float(last["samples_per_s"]),
                   "loss": float(last["loss"]), "seconds": seconds}  # fmt: skip
    return runs


# ------------------------------------------------------------------------- 6. JPEG decode


def jpeg_decode_check(plan: Plan, store: Path) -> str:
    """GPU vs CPU JPEG decoding of the store's crop pixels, if this build stores pixels."""
    if "decode" not in inspect.signature(StudentBatches).parameters:
        return ("skipped: this build's stores hold no crop pixels (no `decode` option in the "
                "student data path), so there is no JPEG to decode on the GPU")  # fmt: skip
    rates = {}
    for decode in ("cpu", "gpu") if plan.device == "cuda" else ("cpu",):
        data = StudentBatches(
            store, batch_size=plan.batch, workers=plan.workers, decode=decode, device=plan.device
        )
        start, n = time.perf_counter(), 0
        for batch in data(0):
            n += len(batch["images"])
        rates[decode] = n / (time.perf_counter() - start)
    return ", ".join(f"{k}: {v:,.0f} crops/s" for k, v in rates.items())


# ------------------------------------------------------------------------------- report


def report(plan: Plan, fps: list[dict], dump: dict, train: dict, jpeg: str, dry: bool) -> str:
    by = {r["model"]: r for r in fps}
    s, t = by[plan.student], by[plan.teacher]
    lines = [
        "## GPU check (`python -m benchmarks.gpu`"
        + (" --dry-run: CPU, tiny models; numbers meaningless)" if dry else ")"),  # fmt: skip
        "",
        f"Machine: {machine_line()}",
        "",
        "| model | b1 fp32 | b32 fp32 | b1 AMP+NHWC | b32 AMP+NHWC | paper b1 (V100) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in (s, t):
        paper = PAPER_FPS.get(r["model"], "-")
        lines.append(f"| {r['model']} | {r['b1']:.1f} | {r['b32']:.1f} | {r['b1_amp']:.1f} | "
                     f"{r['b32_amp']:.1f} | {paper} |")  # fmt: skip
    lines += [
        "",
        f"Student / teacher FPS: batch 1 {s['b1'] / t['b1']:.2f}x, batch 32 "
        f"{s['b32'] / t['b32']:.2f}x (fp32); paper {PAPER_SPEEDUP}x at batch 1.",
        "",
        f"Dump vs forward alone ({dump['teacher']}, batch {dump['batch']}): "
        f"{dump['dump_loop']:.1f} vs {dump['forward']:.1f} samples/s = {dump['ratio']:.2f} "
        f"(goal >= {DUMP_GOAL}: {'met' if dump['ratio'] >= DUMP_GOAL else 'missed'}).",
        f"Multi-rank dump ({plan.ranks} ranks, {dump['ranks_s']:.1f} s): integer arrays equal "
        f"to the 1-rank dump, float arrays within {dump['ranks_max_abs_diff']:.3g} of their scale "
        f"(tolerance {RANK_TOLERANCE}).",
        "",
        "| training (from the store unless online) | AMP dtype | samples/s | last loss |",
        "|---|---|---:|---:|",
    ]
    for name, r in train.items():
        dtype = r.get("amp_dtype", "auto (rank 0)") if name != "ddp" else "auto"
        label = f"DDP, {r['ranks']} rank(s)" if name == "ddp" else name
        lines.append(f"| {label} | {dtype} | {r['samples_per_s']:.1f} | {r['loss']:.4g} |")
    best = "store_bf16" if "store_bf16" in train else "store_fp16"
    ratio = train[best]["samples_per_s"] / train["online"]["samples_per_s"]
    lines += [
        "",
        f"From store ({best}) vs teacher online: {ratio:.2f}x (goal >= {ONLINE_GOAL}x: "
        f"{'met' if ratio >= ONLINE_GOAL else 'missed'}).",
    ]
    if train["ddp"]["ranks"] == 1:
        lines.append("DDP: one GPU visible, so torchrun ran one rank (no DDP wrapper).")
    lines += ["", f"GPU JPEG decode: {jpeg}", ""]
    return "\n".join(lines)


def run(dry_run: bool = False) -> str:
    plan = Plan.for_run(dry_run)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(tmp)
        data = make_demo_data(root / "data", num_train=plan.people, num_val=2, max_people=1)
        ckpt = teacher_checkpoint(plan, root)
        fps = measure_fps(plan)
        dump = measure_dump(plan, root, data, ckpt)
        store = root / "store_1rank"
        train = measure_training(plan, root, store, ckpt)
        jpeg = jpeg_decode_check(plan, store)
        shutil.rmtree(root / "data", ignore_errors=True)
    return report(plan, fps, dump, train, jpeg, dry_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models: check the code")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; `--dry-run` runs this check on the CPU", file=sys.stderr)
        return 1
    started = time.perf_counter()
    text = run(args.dry_run) + f"\n_{time.perf_counter() - started:.0f} s_\n"
    print(text)
    out = args.out or (None if args.dry_run else RESULTS / "gpu.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
