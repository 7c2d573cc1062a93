"""`train_many`: several student runs on one machine; one process pool, one thread rule.

The demo's two students and `ablate`'s loss combinations train through it. Runs that share a
CPU train in spawned processes, each with its share of the cores as torch threads and (the
caller's part: `shares_cpu` tells it when) no loader workers: on 2 cores, threads fighting over
cores cost more than the model (measured 13x, `demo.DemoPlan`). On CUDA each run trains on its
own `run.device`, with torch's own thread count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

from distilpose.device import resolve_device
from distilpose.training.runs import StudentRun


def cpu_threads(parallel: int) -> int:
    """torch threads per process when `parallel` processes share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // parallel)


def shares_cpu(device: str, parallel: int) -> bool:
    """Whether `parallel` runs at a time on `device` share the CPU's cores."""
    return parallel > 1 and resolve_device(device).type == "cpu"


def _train_one(job: dict) -> dict:
    """Train one run (in this process or a spawned one); returns its summary."""
    import torch

    from student_train.train import train_student

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if job["quiet"]:
        os.environ["DISTILPOSE_NO_PROGRESS"] = "1"  # several bars at once would garble stderr
    return train_student(job["run"])


def train_many(runs: list[StudentRun], device: str, parallel: int | None = None) -> list[dict]:
    """Train `runs` and return their summaries (train_student's), in order.

    `parallel` runs train at a time, in spawned processes when more than one; None: all at
    once on a CPU with 2+ cores, else one after another. Runs sharing the CPU get
    `cpu_threads(parallel)` torch threads each."""
    if parallel is None:
        on_cpu = resolve_device(device).type == "cpu"
        parallel = len(runs) if on_cpu and (os.cpu_count() or 1) >= 2 else 1
    shared = shares_cpu(device, parallel)
    threads = cpu_threads(parallel) if shared else 0
    jobs = [{"run": run, "threads": threads, "quiet": parallel > 1} for run in runs]
    if parallel <= 1:
        return [_train_one(job) for job in jobs]
    with ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_train_one, jobs))
