"""Stores on S3: written, killed, resumed, extended, trained from and verified against a real S3
server on 127.0.0.1 (moto's server mode, started and stopped here), never a mock of the client."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from benchmarks.scale_bench import local_s3
from distilpose.data import make_demo_data
from distilpose.errors import StoreConnectionError
from distilpose.training.runs import DumpRun, StudentRun
from store import StoreReader
from student_train.train import train_student
from teacher_dump.dump import dump_teacher

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

# 24 instances, units of 8 samples: 3 units per view
DUMP = dict(batch_size=4, workers=0, device="cpu", chunk_samples=8, shard_chunks=1, seed=3)
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same forward in every process; forking a torch child is safe
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3():
    with local_s3() as server:
        yield server


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_demo_data(tmp_path_factory.mktemp("demo"), num_train=24, num_val=4)


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Path:
    return tiny_teacher


def fs(s3):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3["endpoint_url"], skip_instance_cache=True)


def dump(teacher, data, out, s3, **kw) -> dict:
    run = DumpRun(teacher, data["train_ann"], data["train_images"], out, **{**DUMP, **kw})
    return dump_teacher(run.replace(storage_options=s3["options"]))


def objects(s3, url: str) -> dict[str, bytes]:
    """Every object of the store at `url`, by key relative to the store."""
    root = url.split("://", 1)[1]
    f = fs(s3)
    return {k[len(root) :]: f.cat_file(k) for k in f.find(root)}


def markers(s3, url: str) -> int:
    root = url.split("://", 1)[1] + "/complete"
    f = fs(s3)
    units = [k for k in f.find(root) if k.rsplit("/", 1)[-1].startswith("u")]  # not signed.json
    return len(units) if f.exists(root) else 0


def assert_same_objects(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Every shard, marker and array metadata object byte for byte; the group's metadata equal
    but for its creation time."""
    assert got.keys() == want.keys()
    differ = [k for k in got if got[k] != want[k] and k != "/zarr.json"]
    assert not differ, f"objects differ: {differ[:5]}"
    meta = [json.loads(x["/zarr.json"])["attributes"]["distilpose_store"] for x in (got, want)]
    assert [{**m, "created": ""} for m in meta] == [{**meta[1], "created": ""}] * 2


@pytest.fixture(scope="module")
def reference(s3, teacher, data) -> str:
    """An uninterrupted 2-view dump on S3."""
    url = f"s3://{s3['bucket']}/reference"
    assert dump(teacher, data, url, s3, views=2)["units"] == 6
    return url


@pytest.mark.reliability(
    case="dump-teacher to s3:// SIGKILLed after 2 of 6 units",
    outcome="the rerun writes only the pending units; every object equals the uninterrupted dump",
)
def test_s3_store_dumped_killed_resumed_extended_trained_verified(
    s3, reference, teacher, data, tmp_path
):
    url = f"s3://{s3['bucket']}/resumed"
    child = mp.get_context("fork").Process(
        target=dump, args=(teacher, data, url, s3), kwargs={"views": 2}, daemon=True
    )
    child.start()
    deadline = time.time() + 60
    while markers(s3, url) < 2 and child.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    assert child.is_alive(), "the dump finished before it could be killed"
    child.kill()
    child.join()
    done = markers(s3, url)
    assert 2 <= done < 6, f"expected a partial store, found {done} complete units"

    assert dump(teacher, data, url, s3, views=2)["units"] == 6 - done  # only the pending ones
    before, want = objects(s3, url), objects(s3, reference)
    assert_same_objects(before, want)

    # add a view: the old view blocks' shards and markers stay byte for byte
    assert dump(teacher, data, url, s3, views=3)["units"] == 3
    after = objects(s3, url)
    kept = [k for k in before if not k.endswith(("zarr.json", "signed.json"))]  # they grow
    assert all(after[k] == before[k] for k in kept)
    assert StoreReader.open(url, s3["options"]).complete_mask().shape == (3, 24)

    options = json.dumps(s3["options"])
    verify = runner.invoke(cli.app, ["store-verify", url, "--all", "--storage-options", options])
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.stdout)["ok"] == 72

    summary = train_student(
        StudentRun(
            url, "distilpose_tiny", str(tmp_path / "student"), epochs=1, batch_size=8,
            device="cpu", workers=0, log_every=1, storage_options=s3["options"],
        )
    )  # fmt: skip
    assert summary["steps"] == 3 and np.isfinite(float(summary["final"]["loss"]))


def test_missing_bucket_is_one_line(s3, teacher, data):
    result = runner.invoke(
        cli.app,
        [
            "dump-teacher", "--teacher", str(teacher), "--ann", data["train_ann"],
            "--images", data["train_images"], "--out", "s3://no-such-bucket/store",
            "--storage-options", json.dumps(s3["options"]), "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://no-such-bucket/store: bucket")


def test_server_stopped_mid_read_is_one_line_within_the_timeout(reference, s3):
    """Last in this module: it stops the module's server (each store read in another test
    would need a second dump on a second server)."""
    options = {**s3["options"], "timeout": 5}
    reader = StoreReader.open(reference, options)
    (a, b), *_ = reader.chunks()
    assert reader.read_chunk(a, b)["heatmaps"].shape[0] == b - a  # reads while the server runs
    s3["server"].stop()
    started = time.perf_counter()
    with pytest.raises(StoreConnectionError, match="s3://stores/reference"):
        reader.read_chunk(*reader.chunks()[1])
    assert time.perf_counter() - started < 5 + 3  # the request timeout, not a hang

    started = time.perf_counter()
    result = runner.invoke(
        cli.app, ["store-info", reference, "--storage-options", json.dumps(options)]
    )
    assert result.exit_code == 1 and time.perf_counter() - started < 5 + 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {reference}"), result.output
