"""The dump on a Dask distributed cluster: each pending write unit is one task.

    dump_teacher(DumpRun(..., cluster="local:2"))       # 2 worker processes here
    dump_teacher(DumpRun(..., cluster="tcp://sched:8786"))  # a cluster (SLURM, cloud, ...)

The client (this process) creates or reopens the store and lists its pending units (of
`--shard i/n` when given); every unit becomes a task `dump_unit(job, unit)`. A worker loads the
teacher once (cached by the checkpoint's sha256, with the instances and the store handle) and
then renders, runs and writes units one at a time, one thread per worker process.

Why a unit is safe to run twice: its bytes depend only on (store seed, unit, batch size,
device), its shards are written whole and its marker last (store/writer.py). So when a worker
dies mid-unit, the scheduler reruns the unit on another worker (up to its `allowed-failures`,
3 by default), which takes over the dead worker's claim, clears its partial files and writes
the same bytes. A unit whose task raises (bad data, a full disk) is counted failed; the others
still finish, and the first failure is raised at the end (a rerun resumes the failed units).
Progress counts units done / failed / retried (a retry: a unit's task started again after its
worker died, told by the workers' "dump-unit" events).
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass

import torch

from distilpose.cluster import dask_client
from distilpose.device import resolve_device
from distilpose.progress import ProgressCounter
from distilpose.training.runs import DumpRun
from store.schema import StoreMeta
from store.writer import StoreWriter
from teacher_dump.dump import (
    DumpPlan,
    DumpTally,
    dump_loader,
    dump_loop,
    dump_setup,
    dump_summary,
    on_device,
    plan_units,
    store_bytes,
)

EVENT = "dump-unit"  # the topic workers log each unit's start under


@dataclass(frozen=True)
class UnitJob:
    """What a worker needs for any unit of one dump: the run, the store's metadata and the
    teacher's sha256 (its cache key)."""

    run: DumpRun
    meta: StoreMeta
    teacher_sha256: str
    token: str  # this dump's task keys and events, apart from any other on the cluster


_WORKER_CACHE: dict = {}  # per worker process: the one dump it serves


def _worker_state(job: UnitJob) -> tuple:
    """(setup, teacher on its device, device, writer) of `job`'s dump, built once per worker
    process (keyed by teacher sha256 and store): later units reuse the loaded teacher."""
    key = (job.teacher_sha256, job.run.out, job.run.views)
    if _WORKER_CACHE.get("key") != key:
        _WORKER_CACHE.clear()
        # one thread per worker process: the cluster's processes share the cores, and every
        # worker computes a unit's batches exactly as a one-thread plain dump does
        torch.set_num_threads(1)
        setup = dump_setup(job.run)
        dev = resolve_device(job.run.device, 0)  # dask-cuda: each worker sees one GPU
        opts = job.run.storage_options or {}
        writer = StoreWriter.create_or_open(job.run.out, job.meta, **opts)
        _WORKER_CACHE.update(key=key, state=(setup, on_device(setup.teacher, dev), dev, writer))
    return _WORKER_CACHE["state"]


def dump_unit(job: UnitJob, unit: int) -> dict:
    """Compute and write one unit on this worker; {"unit", "samples", "skipped", "forward_s",
    "elsewhere"} (elsewhere: a live writer outside this dump holds the unit)."""
    from distributed import get_worker

    get_worker().log_event(EVENT, {"unit": unit, "dump": job.token})
    setup, teacher, dev, writer = _worker_state(job)
    if unit in writer.complete_units():  # done by an earlier attempt that died after its marker
        return {"unit": unit, "samples": 0, "skipped": 0, "forward_s": 0.0, "elsewhere": False}
    mine, elsewhere = writer.claim([unit])
    plan = plan_units(writer, mine, [], job.run.batch_size)
    loader = dump_loader(setup, plan, writer, job.run.seed, 0, dev)  # no processes in a worker
    tally = dump_loop(teacher, loader, plan, writer, setup.outputs, dev, f"unit {unit}")
    if elsewhere:
        writer.wait_for(elsewhere)
    return {
        "unit": unit,
        "samples": tally.written,
        "skipped": tally.skipped,
        "forward_s": tally.forward_s,
        "elsewhere": bool(elsewhere),
    }


@dataclass
class ClusterTally:
    """Units done, failed and retried, and the first failure (raised at the end)."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    error: BaseException | None = None


def _run_units(client, job: UnitJob, units: list[int], name: str) -> tuple[ClusterTally, list]:
    """Submit one task per unit and collect them as they finish; a task that raises is
    counted failed (its error kept), the rest go on."""
    from distributed import as_completed

    tally, results = ClusterTally(), []
    futures = [client.submit(dump_unit, job, u, key=f"{EVENT}-{u}-{job.token}") for u in units]
    with ProgressCounter(len(units), f"dump {name} (cluster)", "units") as bar:
        for future in as_completed(futures):
            try:
                results.append(future.result())
                tally.done += 1
            except Exception as e:  # noqa: BLE001 - counted, the first one raised at the end
                tally.failed += 1
                tally.error = tally.error or e
            bar.advance()
    starts = [msg["unit"] for _, msg in client.get_events(EVENT) if msg["dump"] == job.token]
    tally.retried = len(starts) - len(set(starts))
    return tally, results


def dump_on_cluster(run: DumpRun) -> dict:
    """`dump_teacher` with `run.cluster` set: the pending units of shard `run.shard` as tasks on
    the cluster; returns the plain dump's summary plus workers, units_failed, units_retried."""
    start = time.perf_counter()
    setup = dump_setup(run)
    writer = StoreWriter.create_or_open(run.out, setup.meta, **(run.storage_options or {}))
    units = writer.pending_units(shard=tuple(run.shard))
    job = UnitJob(run, setup.meta, setup.meta.teacher_sha256, uuid.uuid4().hex[:12])
    name = str(run.out).rstrip("/").rsplit("/")[-1]
    with dask_client(run.cluster) as client:
        workers = len(client.scheduler_info()["workers"])
        tally, results = _run_units(client, job, units, name)
    print(
        f"dump-teacher --cluster {run.cluster}: {tally.done} units done, {tally.failed} failed, "
        f"{tally.retried} retried on {workers} workers",
        file=sys.stderr,
    )
    if tally.error is not None:
        raise tally.error
    loop = DumpTally(
        written=sum(r["samples"] for r in results),
        skipped=sum(r["skipped"] for r in results),
        forward_s=sum(r["forward_s"] for r in results) / max(workers, 1),  # per worker
        loop_s=time.perf_counter() - start,
    )
    info = {
        "shard": f"{run.shard[0]}/{run.shard[1]}",
        "teacher": setup.config.name,
        "device": f"cluster {run.cluster}",
        "pixels": writer.meta.pixels,
        "bytes": store_bytes(writer),
    }
    summary = dump_summary(run, DumpPlan(units, []), loop, time.perf_counter() - start, info)
    return {**summary, "workers": workers, "units_failed": 0, "units_retried": tally.retried}
