"""Store schema 3 (issue 24, the store part): signed metadata and markers, the list of signed
units, chunk fingerprints, skipped images, one read path for store-info, a Range-less HTTP
server, readers while views are added, a killed writer's files.

Stores are tiny (8 demo people, chunks of 8, one unit per view) or synthetic
(tests/faults/test_store_faults.py's `small_meta`); each case asserts the line a user sees.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_faults import one_line_error  # noqa: E402
from test_store_faults import fill, small_meta  # noqa: E402

import cli  # noqa: E402
from distilpose.errors import (  # noqa: E402
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from distilpose.training.runs import DumpRun  # noqa: E402
from store import StoreReader, StoreWriter  # noqa: E402
from store.checks import store_info  # noqa: E402
from store.schema import shard_key  # noqa: E402
from store.signature import read_signed_units, write_signed_units  # noqa: E402
from student_train.data import StudentBatches  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """8 demo people, a random tiny teacher, and three dumps of them: raw fp16 targets without
    pixels (2 views), and with one image made unreadable, JPEG and no pixels (1 view each)."""
    from distilpose.data import make_demo_data
    from distilpose.models import build_model, save_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("signed")
    data = make_demo_data(root / "data", num_train=8, num_val=2, seed=0)
    torch.manual_seed(0)
    ckpt = root / "teacher.pth"
    save_checkpoint(ckpt, build_model("tokenpose_tiny"), meta={"role": "teacher"})
    out = {**data, "teacher": ckpt, "raw": dump(ckpt, data, root / "raw.zarr", views=2)}
    broken = root / "broken"
    shutil.copytree(data["train_images"], broken)
    victim = sorted(broken.iterdir())[0]
    victim.write_bytes(b"not an image")  # the one bad file of a real dataset
    for pixels in ("jpeg", "none"):
        store = root / f"skip_{pixels}.zarr"
        out[f"skip_{pixels}"] = dump(ckpt, {**data, "train_images": broken}, store, pixels=pixels)
    out["broken_images"], out["victim"] = broken, victim.name
    yield out
    torch.set_num_threads(n)


def dump(ckpt: Path, data: dict, store: Path, views: int = 1, pixels: str = "none") -> str:
    from teacher_dump.dump import dump_teacher

    dump_teacher(
        DumpRun(
            ckpt, data["train_ann"], data["train_images"], store, views=views, batch_size=8,
            workers=0, device="cpu", chunk_samples=8, shard_chunks=1, pixels=pixels,
            targets_zstd=pixels != "none",  # the raw store: --raw-targets
        )
    )  # fmt: skip
    return str(store)


def copy(src: str, tmp_path: Path) -> Path:
    dst = tmp_path / "store.zarr"
    shutil.copytree(src, dst)
    return dst


def edit_meta(store: Path, **changes) -> None:
    """Edit the store's metadata in zarr.json as a user would (nested keys with dots)."""
    doc = json.loads((store / "zarr.json").read_text())
    meta = doc["attributes"]["distilpose_store"]
    for name, value in changes.items():
        *parents, key = name.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[key] = value
    (store / "zarr.json").write_text(json.dumps(doc))


def marker_file(store: Path, unit: int = 0) -> Path:
    return store / "complete" / f"u{unit:07d}.json"


def shard(store: Path, name: str, unit: int = 0) -> Path:
    reader = StoreReader.open(store)
    return store / shard_key(reader.arrays[name], name, unit)


def cli_train(store: Path, out: Path, *extra) -> object:
    return invoke(
        "train-student", "--store", store, "--model", "distilpose_tiny", "--out", out,
        "--batch-size", 8, "--device", "cpu", "--epochs", 1, "--workers", 0, *extra,
    )  # fmt: skip


# ---- metadata and markers, signed -----------------------------------------------------------


@pytest.mark.reliability(
    case="store metadata edited: teacher_sha256, recipe.flip_prob, ann_digest, jpeg_quality, extra",
    outcome="store-verify, store-info, StoreReader.open: one line naming the field that differs "
    "from what was signed (was: accepted silently)",
)
@pytest.mark.parametrize(
    "field, value",
    [
        ("teacher_sha256", "0" * 64),
        ("recipe.flip_prob", 0.25),
        ("ann_digest", "1" * 64),
        ("jpeg_quality", 80),
        ("extra.batch_size", 4),
    ],
)
def test_metadata_edit_is_named(tiny, tmp_path, field, value):
    store = copy(tiny["raw"], tmp_path)
    edit_meta(store, **{field: value})
    for command in ("store-verify", "store-info"):
        line = one_line_error(invoke(command, store))
        assert f"differs from what was signed: {field};" in line, line
        assert "--accept-metadata" in line
    with pytest.raises(StoreCorruptError, match=f"signed: {field};"):
        StoreReader.open(store)
    with pytest.raises(StoreFormatError, match=f"signed: {field};"):
        StoreWriter.create_or_open(store, small_meta())  # never re-signed by adding views


@pytest.mark.reliability(
    case="store metadata edited (teacher_sha256), then train-student; then re-signed",
    outcome="train-student: one line naming teacher_sha256; `store-verify --accept-metadata` "
    "prints the change and the store verifies and trains again",
)
def test_edit_refused_by_training_until_accepted(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    edit_meta(store, teacher_sha256="0" * 64)
    line = one_line_error(cli_train(store, tmp_path / "run"))
    assert "differs from what was signed: teacher_sha256;" in line
    result = invoke("store-verify", store, "--accept-metadata", "--all")
    assert result.exit_code == 0, result.output
    assert "store-verify: accepted store metadata: teacher_sha256" in result.output
    assert json.loads(result.output.splitlines()[-1])["ok_all"]
    assert StoreReader.open(store).meta.teacher_sha256 == "0" * 64
    again = invoke("store-verify", store, "--accept-metadata")
    assert "accepted nothing: the store is as it was signed" in again.output
    assert cli_train(store, tmp_path / "run").exit_code == 0


@pytest.mark.reliability(
    case="a completion marker's JSON edited (a manifest size, 'valid'), or replaced by another "
    "signed marker",
    outcome="store-verify, store-info and training: one line naming the marker and the field "
    "(or 'not the marker signed.json signed')",
)
def test_marker_edit_is_named(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    payload = json.loads(marker_file(store).read_text())
    payload["manifest"]["heatmaps"][0] += 1
    marker_file(store).write_text(json.dumps(payload))
    for command in ("store-verify", "store-info"):
        line = one_line_error(invoke(command, store))
        assert "u0000000.json of unit 0 differs from what was signed: manifest.heatmaps;" in line
    line = one_line_error(cli_train(store, tmp_path / "run"))
    assert "differs from what was signed: manifest.heatmaps" in line
    # a marker whose own signature is consistent, but not the one signed for the unit
    from store.signature import body_of, signed_payload

    body = body_of(payload)
    marker_file(store).write_text(json.dumps(signed_payload({**body, "skipped": [[0, "x"]]})))
    line = one_line_error(invoke("store-info", store))
    assert "is not the marker complete/signed.json signed for the unit" in line


@pytest.mark.reliability(
    case="a marker stripped of its manifest (schema 3, and schema 2)",
    outcome="an error naming the marker and 'manifest' in store-verify, store-info and reads "
    "(was: checks off, a deleted shard then read as zeros)",
)
def test_marker_without_manifest_is_an_error(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    payload = json.loads(marker_file(store).read_text())
    del payload["manifest"]
    marker_file(store).write_text(json.dumps(payload))
    for command in ("store-verify", "store-info"):
        assert "manifest.heatmaps (removed)" in one_line_error(invoke(command, store))
    # schema 2 (no signatures): the missing manifest itself is the error
    meta = small_meta(views=1, n=16)
    meta.schema_version = 2
    w = StoreWriter.create_or_open(tmp_path / "v2", meta)
    fill(w)
    path = marker_file(tmp_path / "v2")
    payload = json.loads(path.read_text())
    del payload["manifest"]
    path.write_text(json.dumps(payload))
    (tmp_path / "v2" / shard_key(w.arrays["heatmaps"], "heatmaps", 0)).unlink()
    with pytest.raises(StoreCorruptError, match=r"u0000000.json of unit 0 has no 'manifest'"):
        StoreReader.open(tmp_path / "v2").read_slots(0, 16)


@pytest.mark.reliability(
    case="a completion marker deleted",
    outcome="store-verify, store-info, train-student: one line 'unit 1 is signed complete but its "
    "marker ... is missing' (was: a smaller store, exit 0); --accept-metadata drops the unit, a "
    "rerun of the dump writes it again",
)
def test_deleted_marker_is_caught(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    marker_file(store, 1).unlink()
    for command in ("store-verify", "store-info"):
        line = one_line_error(invoke(command, store))
        assert "unit 1 is signed complete but its marker complete/u0000001.json is missing" in line
    assert "is missing" in one_line_error(cli_train(store, tmp_path / "run"))
    result = invoke("store-verify", store, "--accept-metadata")
    assert result.exit_code == 0 and "units [1]: marker deleted" in result.output
    assert StoreReader.open(store).complete_views() == [0]
    dump(tiny["teacher"], tiny, store, views=2)  # the rerun writes unit 1 again
    assert StoreReader.open(store).complete_views() == [0, 1]
    assert (store / "complete" / "u0000001.json").read_bytes() == marker_file(
        Path(tiny["raw"]), 1
    ).read_bytes()  # the same bytes as the first time


@pytest.mark.reliability(
    case="a reader while a writer is between writing a marker and signing it (or was killed there)",
    outcome="the unit reads as not yet complete (no false error); the next writer signs it",
)
def test_unsigned_marker_is_incomplete_until_signed(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=32))
    fill(w)
    units = read_signed_units(w.location)
    write_signed_units(w.location, {0: units[0]})  # unit 1 marked, not signed yet
    r = StoreReader.open(tmp_path / "s")
    assert r.complete_units().tolist() == [0] and r.unsigned == [1]
    with pytest.raises(StoreFormatError, match="1 unit.s. marked but not signed yet"):
        r.chunks(0)
    assert store_info(tmp_path / "s")["units_unsigned"] == 1
    assert w.sign_units() == [1]  # what a dump does at its end
    assert StoreReader.open(tmp_path / "s").is_complete()
    write_signed_units(w.location, {0: units[0]})
    StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=32))  # and a rerun at once
    assert StoreReader.open(tmp_path / "s").is_complete()
    assert read_signed_units(w.location) == units


# ---- one read path, swapped shards ----------------------------------------------------------


@pytest.mark.reliability(
    case="store-info on a store whose heatmaps shard was deleted",
    outcome="exit 1, one line naming the missing shard file (never zeros in the statistics)",
)
def test_store_info_on_a_deleted_shard(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    shard(store, "heatmaps", 1).unlink()
    line = one_line_error(invoke("store-info", store))
    assert "array 'heatmaps'" in line and "of complete unit 1 is missing" in line


@pytest.mark.slow  # a Dask cluster's start: ~10 s on 2 cores
@pytest.mark.reliability(
    case="store-info --cluster local:1 on a store whose heatmaps shard was deleted",
    outcome="the cluster's workers read through the same checked reader: one line, exit 1",
)
def test_store_info_on_a_deleted_shard_on_a_cluster(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    shard(store, "heatmaps", 1).unlink()
    line = one_line_error(invoke("store-info", store, "--cluster", "local:1"))
    assert "array 'heatmaps'" in line and "of complete unit 1 is missing" in line


@pytest.mark.reliability(
    case="two --raw-targets heatmaps shards (same size) swapped",
    outcome="train-student: one line naming array 'heatmaps' chunk 0 and its shard file, "
    "'swapped' (was: trained silently); store-verify too",
)
def test_swapped_raw_target_shards_fail_training(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    a, b = shard(store, "heatmaps", 0), shard(store, "heatmaps", 1)
    assert a.stat().st_size == b.stat().st_size  # raw targets: every shard has one size
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    line = one_line_error(cli_train(store, tmp_path / "run"))
    assert "array 'heatmaps' chunk 0" in line and "heatmaps/c/0/0/0/0" in line, line
    assert "swapped" in line
    result = invoke("store-verify", store, "--all")
    assert result.exit_code == 1 and "swapped" in result.output


# ---- skipped images --------------------------------------------------------------------------


@pytest.mark.reliability(
    case="one unreadable image in the dataset, dumped with JPEG pixels and without pixels",
    outcome="the dump records its slots in the markers; store-verify passes (counted skipped); "
    "store-info shows the count; train-student trains without them, saying how many",
)
@pytest.mark.parametrize("pixels", ["jpeg", "none"])
def test_unreadable_image_gives_a_trainable_store(tiny, tmp_path, pixels):
    store = tiny[f"skip_{pixels}"]
    reader = StoreReader.open(store)
    skipped = reader.skipped_slots()
    assert skipped and all(tiny["victim"] in why for why in skipped.values())
    extra = [] if pixels == "jpeg" else ["--images", tiny["broken_images"]]
    result = invoke("store-verify", store, "--all")
    assert result.exit_code == 0, result.output
    verified = json.loads(result.output.splitlines()[-1])
    assert verified["ok_all"] and verified["skipped"] == len(skipped)
    assert verified["ok"] == 8 - len(skipped)
    info = invoke("store-info", store, "--json")
    assert json.loads(info.output)["skipped"] == len(skipped)
    assert f"skipped images   {len(skipped)} sample(s)" in invoke("store-info", store).output
    seen = [
        int(s)
        for batch in reader.iter_batches(0, 3)
        for s, ok in zip(batch["slot"], batch["valid"], strict=True)
        if ok
    ]
    assert sorted(seen + list(skipped)) == list(range(8))  # every other sample, once
    kw = dict(batch_size=8, workers=0, losses=("reg", "kt", "vt", "sh", "cs"))
    if pixels == "none":
        kw.update(images=str(tiny["broken_images"]))
    (batch,) = list(StudentBatches(store, **kw)(0))
    assert len(batch["instance"]) == 8 - len(skipped) and bool(batch["valid"].all())
    result = cli_train(store, tmp_path / "run", *extra)
    assert result.exit_code == 0, result.output
    assert f"{len(skipped)} of 8 samples skipped (images the dump could not read" in result.output


def test_a_batch_of_skipped_samples_only_keeps_one_invalid_row():
    from store.reader import drop_skipped

    plan = [np.array([[0, 0], [0, 1]]), np.array([[0, 2], [1, 0]])]
    out, kept = drop_skipped(plan, [(0, 3), (8, 10)], {0: "x", 1: "x", 8: "x"})
    assert kept == [False, True] and out[0].tolist() == [[0, 0]] and out[1].tolist() == [[0, 2]]


@pytest.mark.reliability(
    case="the training JPEG decoder differs from the dump's (one pixel of every crop), and a "
    "damaged crop",
    outcome="training decodes with the store's decoder (OpenCV), a warning said once; a crop "
    "neither decodes to is an error naming it",
)
def test_pixel_digest_is_checked_with_the_dump_decoder(tiny, monkeypatch, caplog):
    import student_train.data as data_module

    real = data_module.decode_rgb_crops

    def other_libjpeg(datas, pixels, size, decoder=""):
        rgb = real(datas, pixels, size, decoder)
        if decoder != "opencv":
            for crop in rgb:
                crop[0, 0, 0] ^= 1  # another build: one level off in one pixel
        return rgb

    monkeypatch.setattr(data_module, "decode_rgb_crops", other_libjpeg)
    data = StudentBatches(tiny["skip_jpeg"], batch_size=8, workers=0)
    (batch,) = list(data(0))
    assert "decodes the stored JPEG crops to other pixels than opencv" in caplog.text
    assert data.renderer.decoder == "opencv"
    import store.pixels

    monkeypatch.setattr(store.pixels, "decode_crop", lambda d, p, s: np.zeros((128, 96, 3)))
    data = StudentBatches(tiny["skip_jpeg"], batch_size=8, workers=0)
    with pytest.raises(StoreMismatchError, match="also with the dump's decoder opencv"):
        list(data(0))


# ---- remote: a server without Range requests -------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


@pytest.mark.reliability(
    case="store served by Python's http.server on 127.0.0.1 (ignores Range requests)",
    outcome="one line 'the HTTP server ignores Range requests' (was: 'stored bytes are damaged', "
    "tracebacks from store-info)",
)
def test_range_less_http_server_is_named(tiny):
    pytest.importorskip("aiohttp")
    handler = functools.partial(_Quiet, directory=str(Path(tiny["raw"]).parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/raw.zarr"
        for command in ("store-info", "store-verify"):
            line = one_line_error(invoke(command, url))
            assert "the HTTP server ignores Range requests" in line and "damaged" not in line
    finally:
        server.shutdown()
        server.server_close()


# ---- views being added; fewer views asked for -----------------------------------------------


@pytest.mark.reliability(
    case="train-student while a dump adds a view (room for 3 views, 2 complete)",
    outcome="trains on the 2 complete views and says so (was: refused, naming an option the "
    "CLI lacked)",
)
def test_complete_views_stay_trainable_while_views_are_added(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    meta = StoreReader.open(store).meta
    meta.views = 3
    StoreWriter.create_or_open(store, meta)  # a dump adding view 2 has begun
    result = cli_train(store, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "views [2] of" in result.output and "training on the 2 complete view(s) [0, 1]" in (
        result.output
    )


@pytest.mark.reliability(
    case="dump-teacher --views 2 on a store whose metadata says 3 views (view 2 unfinished)",
    outcome="refused with one line naming views [2] and --views 3 (was: exit 0, '0 samples', a "
    "store no reader could open)",
)
def test_fewer_views_than_the_store_has_is_refused_while_unfinished(tiny, tmp_path):
    store = copy(tiny["raw"], tmp_path)
    meta = StoreReader.open(store).meta
    meta.views = 3
    StoreWriter.create_or_open(store, meta)
    args = ["dump-teacher", "--teacher", tiny["teacher"], "--ann", tiny["train_ann"]]
    args += ["--images", tiny["train_images"], "--out", store, "--device", "cpu"]
    args += ["--workers", 0, "--batch-size", 8, "--chunk-samples", 8, "--pixels", "none"]
    line = one_line_error(invoke(*args, "--views", 2))
    assert "views [2] are unfinished" in line and "expected --views 3" in line


# ---- a killed writer's files -----------------------------------------------------------------

_HOLDER = """
import sys, time
sys.path[:0] = [{root!r}, {faults!r}]
from test_store_faults import small_meta
from store import StoreWriter
w = StoreWriter.create_or_open(sys.argv[1], small_meta(views=1, n=32))
print(w.claim([0])[0], flush=True)
time.sleep(60)
"""


@pytest.mark.reliability(
    case="a writer SIGKILLed while it holds a unit: its complete/.writer.<pid>.lock and claim",
    outcome="removed by the rerun that takes over (was: left in the store)",
)
def test_killed_writers_lock_file_is_removed_by_the_rerun(tmp_path):
    StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=32))
    code = _HOLDER.format(root=str(ROOT), faults=str(Path(__file__).resolve().parent))
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "[0]"
    d = tmp_path / "s" / "complete"
    assert (d / f".writer.{holder.pid}.lock").exists()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=32))
    mine, _ = w.claim(w.pending_units())
    assert mine == [0, 1] and not (d / f".writer.{holder.pid}.lock").exists()
    fill(w, mine)
    w.release()
    assert not list(d.glob(".*"))  # no writer files or claims left
