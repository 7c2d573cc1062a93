"""The dump on a Dask distributed cluster: each pending write unit is one task.

    teacher_dump.dump_teacher(DumpRun(..., cluster="local:2"))   # 2 worker processes here
    teacher_dump.dump_teacher(DumpRun(..., cluster="tcp://sched:8786"))  # SLURM, cloud, ...

The client (this process) creates or reopens the store and lists its pending units (of
`--shard i/n` when given); every unit becomes a task `dump_unit(job, unit)`. A worker loads the
teacher once (cached by the checkpoint's sha256, with the instances and the store handle) and
then renders and runs units one at a time (one torch thread; a second task thread writes the
previous unit meanwhile).

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
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from distilpose.cluster import dask_client, parse_cluster
from distilpose.device import resolve_device
from distilpose.errors import BadConfigError
from distilpose.progress import ProgressCounter
from distilpose.training.distributed import world
from distilpose.training.runs import DumpRun
from store.schema import StoreMeta
from store.writer import StoreWriter
from teacher_dump.dump import (
    DumpPlan,
    DumpTally,
    dump_loader,
    dump_setup,
    dump_summary,
    fit_tokens,
    load_teacher,
    on_device,
    plan_units,
    run_batch,
    store_bytes,
    unit_arrays,
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


_TEACHERS: dict = {}  # per worker process: sha256 -> teacher on its device (one at a time)
_DUMP: dict = {}  # per worker process: the dump it serves (instances, store handle)


def _teacher(job: UnitJob, dev: torch.device) -> torch.nn.Module:
    """The job's teacher, loaded once per worker process for every dump that uses it."""
    if job.teacher_sha256 not in _TEACHERS:
        _TEACHERS.clear()  # one teacher in memory: a worker serves one dump at a time
        teacher = load_teacher(job.run.teacher_ckpt, job.run.model)
        _TEACHERS[job.teacher_sha256] = on_device(teacher, dev)
    return _TEACHERS[job.teacher_sha256]


def _worker_state(job: UnitJob) -> tuple:
    """(setup, teacher on its device, device, writer) of `job`'s dump, built once per worker
    process and dump: later units reuse it, later dumps the loaded teacher."""
    key = (job.token, job.run.out)
    with _SETUP:  # both task threads start at once: one builds, the other waits and reuses
        if _DUMP.get("key") != key:
            _DUMP.update(key=key, state=_build_state(job))
    return _DUMP["state"]


def _build_state(job: UnitJob) -> tuple:
    """Teacher (cached), instances and the store's writer for a dump this worker starts on."""
    release_claims()  # a previous dump's writer file, if release_claims did not run
    _DUMP.clear()
    # one torch thread per worker process: the cluster's processes share the cores, and every
    # worker computes a unit's batches exactly as a one-thread plain dump does
    torch.set_num_threads(1)
    dev = resolve_device(job.run.device, 0)  # dask-cuda: each worker sees one GPU
    teacher = _teacher(job, dev)
    setup = dump_setup(job.run, teacher=teacher)
    # one writer per process: a second one would wait forever on the first's writer flock
    writer = StoreWriter.create_or_open(job.run.out, job.meta, **(job.run.storage_options or {}))
    return setup, teacher, dev, writer


def dump_unit(job: UnitJob, unit: int) -> dict:
    """Compute and write one unit on this worker; {"unit", "samples", "skipped", "forward_s",
    "elsewhere"} (elsewhere: a live writer outside this dump held the unit, now complete).

    The task ends once the unit is durable (marker written), so a worker that dies loses
    nothing the scheduler does not rerun. Rendering and the forward pass hold the worker's
    compute lock; the write (encode, zstd, checksums, sync) does not, so with 2 threads per
    worker the next unit's forward overlaps this unit's write, as the plain dump's writer
    thread does."""
    from distributed import get_worker

    worker = get_worker()
    worker.log_event(EVENT, {"unit": unit, "dump": job.token, "worker": worker.address})
    setup, teacher, dev, writer = _worker_state(job)
    empty = {"unit": unit, "samples": 0, "skipped": 0, "forward_s": 0.0}
    if unit in writer.complete_units():  # done by an earlier attempt that died after its marker
        return {**empty, "elsewhere": False}
    with _CLAIMS:
        mine, elsewhere = writer.claim([unit])
    if elsewhere:  # another dump of this store (not this cluster) is writing it
        writer.wait_for(elsewhere)
        return {**empty, "elsewhere": True}
    plan = plan_units(writer, mine, [], job.run.batch_size)
    tally = DumpTally()
    with _COMPUTE:
        loader = dump_loader(setup, plan, writer.meta, job.run.seed, 0, dev)  # no processes here
        parts = [run_batch(teacher, b, setup.outputs, dev, writer, tally) for b in loader]
    writer.write_unit(unit, unit_arrays(parts))  # marks the unit complete and drops its claim
    return {**empty, "samples": plan.unit_size[unit], "skipped": tally.skipped,
            "forward_s": tally.forward_s, "elsewhere": False}  # fmt: skip


_COMPUTE = threading.Lock()  # one forward pass at a time per worker process
_SETUP = threading.Lock()  # one dump state per worker process
_CLAIMS = threading.Lock()  # a writer's claims are not thread-safe on their own


def release_claims() -> None:
    """Drop this worker's writer file (run on every worker when a dump ends)."""
    if "state" in _DUMP:
        _DUMP["state"][3].release()


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
    parse_cluster(run.cluster)  # a bad name fails before the store is touched
    if world()[1] > 1:
        raise BadConfigError(
            f"--cluster {run.cluster} under torchrun ({world()[1]} ranks); expected one or the "
            "other: the cluster's scheduler spreads the units itself"
        )
    setup = dump_setup(run)
    # a compact store's bases are fitted here, on the CPU, when this creates the store
    fit = fit_tokens(setup, setup.teacher, torch.device("cpu"), run.batch_size)
    writer = StoreWriter.create_or_open(run.out, setup.meta, fit=fit, **(run.storage_options or {}))
    units = writer.pending_units(shard=tuple(run.shard))
    job = UnitJob(run, setup.meta, setup.meta.teacher_sha256, uuid.uuid4().hex[:12])
    name = str(run.out).rstrip("/").rsplit("/")[-1]
    with dask_client(run.cluster) as client:
        workers = len(client.scheduler_info()["workers"])
        tally, results = _run_units(client, job, units, name)
        client.run(release_claims)  # no writer files left behind by live workers
    writer.sign_units()  # every unit the workers marked (on object stores they race to sign)
    print(
        f"dump-teacher --cluster {run.cluster}: {tally.done} units done, {tally.failed} failed, "
        f"{tally.retried} retried on {workers} workers",
        file=sys.stderr,
    )
    if tally.error is not None:
        raise tally.error
    loop = DumpTally(
        # a unit's real samples, also where a retry found it marked by the attempt that died
        written=sum(writer.layout.unit_valid(r["unit"]) for r in results if not r["elsewhere"]),
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
