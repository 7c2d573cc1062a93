"""Dask distributed clusters named by one string: `local[:N]` or a scheduler address.

    with dask_client("local:2") as client:      # 2 worker processes
        client.submit(...)
    with dask_client("tcp://10.0.0.5:8786"):     # a running cluster (SLURM, cloud, ...)

`local` without N: one worker per GPU through dask-cuda's LocalCUDACluster where CUDA is
present and dask_cuda is installed (an optional import, not a dependency), else one worker per
CPU core. Workers are processes of 2 threads (THREADS_PER_WORKER): the dump runs one forward
pass at a time per worker and writes the previous unit beside it; a worker process that dies
takes only its own tasks with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from distilpose.errors import BadConfigError

# 2 threads per worker process: one runs a unit's forward pass (the dump holds a per-worker lock
# around it) while the other writes the previous unit (encode, zstd, checksums, sync)
THREADS_PER_WORKER = 2


def parse_cluster(spec: str) -> tuple[str, int | None]:
    """("local", N or None) or ("address", None); BadConfigError for anything else."""
    text = spec.strip()
    if text == "local":
        return "local", None
    if text.startswith("local:"):
        n = text.split(":", 1)[1]
        if n.isdigit() and int(n) >= 1:
            return "local", int(n)
    elif "://" in text or (":" in text and text.rsplit(":", 1)[1].isdigit()):
        return text, None
    raise BadConfigError(
        f"--cluster {spec!r}: expected local, local:N (N >= 1 worker processes) or a scheduler "
        "address such as tcp://host:8786"
    )


def _cuda_cluster(n: int | None):
    """dask-cuda's one-worker-per-GPU cluster, or None where there is no GPU or no dask_cuda."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return None
    gpus = torch.cuda.device_count()
    visible = ",".join(str(i) for i in range(min(n or gpus, gpus)))
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=visible, threads_per_worker=THREADS_PER_WORKER)


@contextlib.contextmanager
def local_cluster(n: int | None) -> Iterator[object]:
    """N worker processes of THREADS_PER_WORKER threads (one per GPU with dask-cuda), closed on
    exit, and this process's environment put back as it was.

    Dask's nanny writes its workers' environment (MALLOC_TRIM_THRESHOLD_=65536,
    OMP/MKL/OPENBLAS_NUM_THREADS=1, PYTHONHASHSEED) into this process's `os.environ` and leaves
    it there, so every process started later inherits it: students trained in spawned processes
    after a cluster dump ran 1.4x slower (tests/test_demo_distill.py after test_cluster.py:
    156 s against 110 s; which of the variables costs it was not isolated).
    """
    from distributed import LocalCluster

    saved = dict(os.environ)
    try:
        cluster = _cuda_cluster(n) or LocalCluster(
            n_workers=n or os.cpu_count() or 1,
            threads_per_worker=THREADS_PER_WORKER,
            processes=True,
            dashboard_address=None,  # no web server nobody looks at (and no port to collide on)
            silence_logs=40,  # errors only: a worker killed on purpose is not news
        )
        with cluster:
            yield cluster
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def dask_client(spec: str) -> Iterator[object]:
    """A distributed Client on the cluster `spec` names; a local cluster is closed on exit."""
    from distributed import Client

    where, n = parse_cluster(spec)
    if where != "local":
        try:
            client = Client(where, timeout="30s")
        except OSError as e:
            raise BadConfigError(
                f"--cluster {spec}: no Dask scheduler answers there ({e}); expected a running "
                "scheduler (dask scheduler, dask-jobqueue, ...)"
            ) from None
        with client:
            yield client
        return
    with local_cluster(n) as cluster, Client(cluster) as client:
        yield client
