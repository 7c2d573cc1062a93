"""The dump on a Dask cluster of worker processes (one killed mid-dump) equals the one-process
dump; store-info and store-verify read through the checked reader, on threads or the cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from distilpose.cluster import parse_cluster
from distilpose.data import make_demo_data
from distilpose.errors import BadConfigError
from distilpose.training.runs import DumpRun
from teacher_dump import dump_teacher

distributed = pytest.importorskip("distributed")

# 40 instances, 2 views, units of 8 samples: 5 units per view, 10 in all
DUMP = dict(views=2, seed=2, batch_size=4, workers=0, device="cpu", chunk_samples=8, shard_chunks=1)
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_demo_data(tmp_path_factory.mktemp("demo"), num_train=40, num_val=4)


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Path:
    return tiny_teacher


def run_for(teacher, data, out, **kw) -> DumpRun:
    return DumpRun(teacher, data["train_ann"], data["train_images"], str(out), **{**DUMP, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher, data) -> Path:
    """The one-process dump (one torch thread, as every cluster worker runs)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert dump_teacher(run_for(teacher, data, out))["units"] == 10
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes as `--cluster local:2` makes them; the scheduler here, so the test
    can find the workers."""
    from distributed import Client

    from distilpose.cluster import local_cluster

    with (
        local_cluster(2) as lc,
        Client(lc) as client,
    ):  # fmt: skip
        yield client


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store but the group's metadata (its creation time differs) and the
    writers' claim and lock files (gone once a dump ends)."""
    out = {}
    for f in sorted(store.rglob("*")):
        rel = str(f.relative_to(store))
        if f.is_file() and rel != "zarr.json" and not f.name.startswith("."):
            out[rel] = f.read_bytes()
    return out


def stored_meta(store: Path) -> dict:
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["distilpose_store"]
    return {**meta, "created": ""}


def busy_worker_pid(client, store: Path) -> int:
    """pid of a worker process that started a unit not yet marked complete (0: none)."""
    done = {int(f.stem[1:]) for f in (store / "complete").glob("u*.json")}
    started = [msg for _, msg in client.get_events("dump-unit") if msg["unit"] not in done]
    if not started:
        return 0
    return client.run(os.getpid).get(started[-1]["worker"], 0)


@pytest.mark.reliability(
    case="dump-teacher --cluster: one of 2 Dask worker processes SIGKILLed mid-unit",
    outcome="its unit reruns on another worker; every array and marker equals the plain dump",
)
def test_cluster_dump_with_a_killed_worker_equals_the_plain_dump(
    tmp_path, reference, teacher, data, cluster, record_property
):
    out = tmp_path / "store"
    address = cluster.scheduler.address
    result: dict = {}

    def dump() -> None:
        try:
            result["summary"] = dump_teacher(run_for(teacher, data, out, cluster=address))
        except BaseException as e:  # handed to the test's thread
            result["error"] = e

    thread = threading.Thread(target=dump)
    thread.start()
    deadline, victim = time.time() + 60, 0
    while thread.is_alive() and time.time() < deadline:
        done = len(list((out / "complete").glob("u*.json"))) if out.is_dir() else 0
        victim = busy_worker_pid(cluster, out) if done >= 2 else 0  # teachers loaded by then
        if victim:
            break
        time.sleep(0.01)
    assert victim, "no worker was busy after 2 units (the dump finished or never started)"
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["units"] == 10 and summary["samples"] == 80 and summary["units_failed"] == 0
    assert summary["units_retried"] >= 1  # the killed worker's unit ran again
    assert files(out) == files(reference)  # every shard file and completion marker
    assert stored_meta(out) == stored_meta(reference)
    record_property("kills_survived", 1)

    # the store checks on the same cluster: every chunk and unit read through the checked reader
    verify = runner.invoke(cli.app, ["store-verify", str(out), "--all", "--cluster", address])
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.stdout)["ok"] == 80


def test_store_info_names_a_deleted_shard(tmp_path, reference):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    info = runner.invoke(cli.app, ["store-info", str(store), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["samples_complete"] == 80
    shard = next(p for p in (store / "heatmaps" / "c" / "3").rglob("*") if p.is_file())  # unit 3
    shard.unlink()
    result = runner.invoke(cli.app, ["store-info", str(store)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert f"heatmaps/{shard.relative_to(store / 'heatmaps')}" in lines[0]
    assert "missing" in lines[0]


@pytest.mark.parametrize("spec", ["local:0", "local:x", "nowhere"])
def test_bad_cluster_names_are_refused(spec):
    with pytest.raises(BadConfigError, match="--cluster"):
        parse_cluster(spec)


def test_bad_cluster_option_is_one_line_before_any_store(tmp_path, teacher, data):
    out = tmp_path / "store"
    args = ["--teacher", str(teacher), "--ann", data["train_ann"], "--images"]
    args += [data["train_images"], "--out", str(out), "--device", "cpu", "--cluster", "local:0"]
    result = runner.invoke(cli.app, ["dump-teacher", *args])
    assert result.exit_code == 1 and not out.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cluster 'local:0'"), result.output


def test_local_cluster_leaves_the_environment_as_it_was():
    """Dask's nanny writes its workers' environment (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS,
    ...) into this process's; local_cluster puts it back, so processes started after a cluster
    dump (the students train_many spawns) do not inherit it."""
    import os

    from distilpose.cluster import local_cluster

    before = dict(os.environ)
    with local_cluster(1):
        assert "MALLOC_TRIM_THRESHOLD_" in os.environ or "OMP_NUM_THREADS" in os.environ
    assert dict(os.environ) == before
