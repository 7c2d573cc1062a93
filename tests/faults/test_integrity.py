"""Nothing silently wrong (issue 14): damaged or missing store data, hostile inputs, remote
stores that drop or hang, concurrent writers, resumed runs on a changed store.

Each case asserts the one line a user sees. Stores are tiny (8 demo people, chunks of 8).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_faults import one_line_error  # noqa: E402
from test_store_faults import check_complete_samples, fill, small_meta  # noqa: E402
from test_student_train import build_tiny_store  # noqa: E402

import cli  # noqa: E402
from distilpose.data import load_coco_instances, read_image  # noqa: E402
from distilpose.errors import (  # noqa: E402
    BadAnnotationError,
    BadImageError,
    StoreConnectionError,
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from distilpose.training.runs import DumpRun, StudentRun  # noqa: E402
from store import StoreReader, StoreWriter  # noqa: E402
from store.checks import store_verify  # noqa: E402
from store.schema import rows_crc32c  # noqa: E402
from student_train.data import StudentBatches  # noqa: E402
from student_train.train import train_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
MODES = ("fp16", "lossy", "pixels")  # pixels: a fp16 store with JPEG crops, by dump-teacher
ALL_LOSSES = ("reg", "kt", "vt", "sh", "cs")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for mode in ("fp16", "lossy"):
        root = tmp_path_factory.mktemp(mode)
        out[mode] = build_tiny_store(root, views=2, num_train=8, num_val=2, mode=mode)
    out["pixels"] = pixel_store(tmp_path_factory.mktemp("pixels"))
    yield out
    torch.set_num_threads(n)


def pixel_store(root: Path) -> dict:
    """8 demo people, 2 views, through `dump_teacher` with JPEG crops kept in the store."""
    from distilpose.data import make_demo_data
    from distilpose.models import build_model, save_checkpoint
    from teacher_dump.dump import dump_teacher

    data = make_demo_data(root / "data", num_train=8, num_val=2, seed=0)
    torch.manual_seed(0)
    ckpt = root / "teacher.pth"
    save_checkpoint(ckpt, build_model("tokenpose_tiny"), meta={"role": "teacher"})
    dump_teacher(
        DumpRun(
            ckpt, data["train_ann"], data["train_images"], root / "store.zarr", views=2,
            batch_size=8, workers=0, device="cpu", chunk_samples=8, shard_chunks=1, pixels="jpeg",
        )
    )  # fmt: skip
    return {**data, "store": str(root / "store.zarr")}


def copy_store(paths: dict, tmp_path: Path) -> tuple[Path, StoreReader]:
    dst = tmp_path / "store.zarr"
    shutil.copytree(paths["store"], dst)
    return dst, StoreReader.open(dst)


def shard(reader: StoreReader, name: str, unit: int = 0) -> Path:
    from store.schema import shard_key

    return Path(reader.location.root) / shard_key(reader.arrays[name], name, unit)


def flip_bytes(path: Path, offsets=(1, 2, 3)) -> None:
    data = bytearray(path.read_bytes())
    for i in offsets:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def train_batches(store: Path, epochs=(0,)) -> None:
    batches = StudentBatches(store, batch_size=8, workers=0, losses=ALL_LOSSES)
    for epoch in epochs:
        for _ in batches(epoch):
            pass


def invoke(*args) -> object:
    return runner.invoke(cli.app, [str(a) for a in args])


def cli_train(store: Path, out: Path, *extra) -> str:
    """The one error line of a tiny `train-student` run on `store`."""
    return one_line_error(
        invoke(
            "train-student", "--store", store, "--model", "distilpose_tiny", "--out", out,
            "--batch-size", 8, "--device", "cpu", "--epochs", 1, *extra,
        )
    )  # fmt: skip


# ---- damaged and missing store data ---------------------------------------------------------


@pytest.mark.reliability(
    case="three flipped bytes in a completed shard, every array of the store",
    outcome="store-verify and training fail with one line naming store, array and chunk 0",
)
@pytest.mark.parametrize("mode", MODES)
def test_flipped_bytes_in_any_array_are_caught(stores, tmp_path, mode):
    paths = stores[mode]
    clean = StoreReader.open(paths["store"])
    assert clean.checksums
    read_by_training = set(StudentBatches(paths["store"], batch_size=8, workers=0).fields)
    for name in clean.arrays:
        case = tmp_path / name
        store, reader = copy_store(paths, case)
        flip_bytes(shard(reader, name))
        where = f"array '{name}' chunk 0 (slots 0..7"
        result = store_verify(store)
        assert not result["ok_all"] and result["corrupt"] >= 1, (name, result)
        assert any(where in p and "crc32c" in p for p in result["problems"]), (name, result)
        base = name.removesuffix("_scale")
        if base in read_by_training or base in ("heatmaps", "keypoint_tokens", "visual_tokens"):
            with pytest.raises(StoreCorruptError) as info:
                train_batches(store)
            assert f"{store}: {where}" in str(info.value) and "crc32c" in str(info.value)
        shutil.rmtree(case)


@pytest.mark.reliability(
    case="store-verify and store-info on a store with one flipped byte in its heatmaps",
    outcome="one line naming array and chunk, exit 1 (verify prints its JSON counts first)",
)
def test_store_verify_cli_exits_1_on_a_flipped_byte(stores, tmp_path):
    store, reader = copy_store(stores["fp16"], tmp_path)
    flip_bytes(shard(reader, "heatmaps"), offsets=(5,))
    result = invoke("store-verify", store, "--all")
    assert result.exit_code == 1, result.output
    err = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "array 'heatmaps' chunk 0" in err[0], result.output
    assert "Traceback" not in result.output
    assert "array 'heatmaps' chunk 0" in one_line_error(invoke("store-info", store))


@pytest.mark.reliability(
    case="a shard file of a completed unit deleted (heatmaps, keypoints)",
    outcome="error naming the missing shard file (never zeros); store-verify exits 1",
)
@pytest.mark.parametrize("name", ["heatmaps", "keypoints"])
def test_deleted_shard_of_complete_unit_is_an_error(stores, tmp_path, name):
    store, reader = copy_store(stores["fp16"], tmp_path)
    shard(reader, name).unlink()
    with pytest.raises(StoreCorruptError, match=f"array '{name}'.*of complete unit 0 is missing"):
        train_batches(store)
    result = invoke("store-verify", store)
    assert result.exit_code == 1
    err = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"array '{name}'" in err[0] and "is missing" in err[0], result.output


@pytest.mark.reliability(
    case="store-verify when only the stored keypoints differ from the re-rendered crop",
    outcome="one line 'keypoint rows differ', exit 1 (was exit 0)",
)
def test_store_verify_exits_1_on_keypoint_mismatch(stores, tmp_path):
    store, reader = copy_store(stores["fp16"], tmp_path)
    w = StoreWriter.create_or_open(store, reader.meta)
    w.arrays["keypoints"][0:8] = np.asarray(w.arrays["keypoints"][0:8]) + 1.0
    payload = reader.location.read_marker(0)
    prints = {**payload["chunk_crc32c"], "keypoints": [rows_crc32c(w.arrays["keypoints"][0:8])]}
    w.location.write_marker(0, {**payload, "manifest": w.manifest(0), "chunk_crc32c": prints})
    line = one_line_error(invoke("store-verify", store, "--all"))
    assert "u0000000.json of unit 0 differs from what was signed: " in line
    assert "manifest.keypoints" in line and "chunk_crc32c.keypoints" in line
    result = invoke("store-verify", store, "--all", "--accept-metadata")  # a consistent edit
    assert result.exit_code == 1
    err = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "keypoint rows differ" in err[0], result.output


@pytest.mark.reliability(
    case="the instance shard of a completed unit of view 1 deleted",
    outcome="training fails at the first chunk of view 1 naming array 'instance' (not only at "
    "the first batch)",
)
def test_missing_instance_chunk_in_view_1_fails_training(stores, tmp_path):
    store, reader = copy_store(stores["fp16"], tmp_path)
    shard(reader, "instance", unit=reader.layout.units_per_view).unlink()
    train_batches(store, epochs=(0,))  # view 0 is intact
    with pytest.raises(StoreCorruptError, match="array 'instance'.*is missing"):
        train_batches(store, epochs=(1,))


@pytest.mark.reliability(
    case="train-student on a store whose 'spec' shard was deleted",
    outcome="one line naming array 'spec' (was ZeroDivisionError in the crop code)",
)
def test_deleted_spec_shard_train_student_cli(stores, tmp_path):
    store, reader = copy_store(stores["fp16"], tmp_path)
    shard(reader, "spec").unlink()
    line = cli_train(store, tmp_path / "run", "--workers", 0)
    assert "array 'spec'" in line and "is missing" in line


@pytest.mark.reliability(
    case="error raised inside a DataLoader worker (a damaged chunk, --workers 1)",
    outcome="one line with the worker named, no 16-line worker traceback",
)
def test_dataloader_worker_error_is_one_line(stores, tmp_path):
    store, reader = copy_store(stores["fp16"], tmp_path)
    flip_bytes(shard(reader, "heatmaps"))
    line = cli_train(store, tmp_path / "run", "--workers", 1)
    assert "array 'heatmaps' chunk 0" in line and "DataLoader worker process 0" in line


@pytest.mark.reliability(
    case="schema-1 store (no checksums, no manifests): reads; zstd damage in it",
    outcome="reads as before with checksums false; damage named by array and chunk",
)
def test_version_1_store_reads_and_zstd_damage_is_named(tmp_path, monkeypatch):
    from zarr.codecs import ZstdCodec

    import store.writer as writer_module

    monkeypatch.setattr(writer_module, "array_compressors", lambda s: [ZstdCodec(level=1)])
    monkeypatch.setattr(StoreWriter, "manifest", lambda self, unit: None)
    meta = small_meta(views=1, n=16)
    meta.schema_version = 1
    w = StoreWriter.create_or_open(tmp_path / "v1", meta)
    fill(w)
    monkeypatch.undo()
    reader = StoreReader.open(tmp_path / "v1")
    assert not reader.checksums and reader.meta.schema_version == 1
    assert check_complete_samples(tmp_path / "v1") == 16
    flip_bytes(shard(reader, "heatmaps"), offsets=(0, 1, 2, 3))  # the zstd frame's magic
    with pytest.raises(StoreCorruptError, match=r"array 'heatmaps' chunk 0 .*damaged"):
        StoreReader.open(tmp_path / "v1").read_slots(0, 8)


# ---- hostile inputs --------------------------------------------------------------------------


def _ann(tmp_path: Path, text: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "ann.json"
    path.write_text(text)
    return path


def _show_crops(tmp_path: Path, ann: Path):
    return invoke(
        "show-crops", "--ann", ann, "--images", tmp_path / "images", "--out", tmp_path / "c.png"
    )


@pytest.mark.reliability(
    case="annotation file of deeply nested JSON (200k levels)",
    outcome="one line 'JSON nested more than about N levels', exit 1 (was RecursionError)",
)
def test_deeply_nested_json(tmp_path):
    ann = _ann(tmp_path, "[" * 200_000 + "]" * 200_000)
    line = one_line_error(_show_crops(tmp_path, ann))
    assert str(ann) in line and "nested more than" in line


@pytest.mark.reliability(
    case="annotation file holding a 100,000-digit integer",
    outcome="one line 'number too long to read', exit 1 (was ValueError: Exceeds the limit)",
)
def test_overlong_json_number(tmp_path):
    ann = _ann(tmp_path, '{"images": [{"id": ' + "9" * 100_000 + "}]}")
    line = one_line_error(_show_crops(tmp_path, ann))
    assert str(ann) in line and "number too long" in line


@pytest.mark.reliability(
    case="JSON file over the size limit (DISTILPOSE_MAX_JSON_MB)",
    outcome="one line naming the file, its size and the limit, read nothing",
)
def test_json_size_limit(tmp_path, monkeypatch):
    ann = _ann(tmp_path, json.dumps({"images": [], "annotations": [], "pad": "x" * 3_000_000}))
    monkeypatch.setenv("DISTILPOSE_MAX_JSON_MB", "2")
    line = one_line_error(_show_crops(tmp_path, ann))
    assert str(ann) in line and "exceeds the limit of 2,097,152" in line


def _coco(width, height) -> str:
    kp = [10, 10, 2] * 17
    return json.dumps(
        {
            "images": [{"id": 1, "file_name": "a.jpg", "width": width, "height": height}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 40],
                 "area": 800, "iscrowd": 0, "num_keypoints": 17, "keypoints": kp}
            ],
            "categories": [{"id": 1, "name": "person"}],
        }
    ).replace('"INF"', "Infinity")  # fmt: skip


@pytest.mark.reliability(
    case="image width/height of Infinity, 0 or -5 in the annotation file",
    outcome="one line naming the image and 'expected finite positive' (was NaN training)",
)
@pytest.mark.parametrize("size", [("INF", 480), (640, 0), (-5, 480)], ids=["inf", "zero", "neg"])
def test_image_size_must_be_finite_positive(tmp_path, size):
    ann = _ann(tmp_path, _coco(*size))
    with pytest.raises(BadAnnotationError, match="image 1 has width .* expected finite positive"):
        load_coco_instances(ann, tmp_path / "images", train=True)
    assert "expected finite positive" in one_line_error(_show_crops(tmp_path, ann))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decoder sees first."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.reliability(
    case="a 30000x30000 PNG among the images",
    outcome="refused from its header before decoding (limit ~89 Mpixel, configurable)",
)
def test_huge_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(30000, 30000))
    with pytest.raises(BadImageError, match="30000x30000 pixels exceeds the limit of 89,478,485"):
        read_image(path)
    monkeypatch.setenv("DISTILPOSE_MAX_IMAGE_PIXELS", str(30000 * 30000))
    with pytest.raises(BadImageError, match="cannot decode"):  # past the guard: no pixels here
        read_image(path)
    monkeypatch.setenv("DISTILPOSE_MAX_IMAGE_PIXELS", "100")
    small = tmp_path / "small.png"
    small.write_bytes(_png_header(20, 20))
    with pytest.raises(BadImageError, match="20x20 pixels exceeds the limit of 100"):
        read_image(small)


@pytest.mark.reliability(
    case="store metadata claiming 2^40 samples (store-info), unsigned and re-signed",
    outcome="one line naming num_instances: as an edit, and (re-signed) as outside its limit, "
    "nothing allocated (was MemoryError)",
)
def test_store_claiming_2_pow_40_samples(stores, tmp_path):
    from store.signature import sign

    store, _ = copy_store(stores["fp16"], tmp_path)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["distilpose_store"]["num_instances"] = 1 << 40
    (store / "zarr.json").write_text(json.dumps(doc))
    for name in ("heatmaps", "instance"):
        meta = json.loads((store / name / "zarr.json").read_text())
        meta["shape"][0] = 1 << 41
        (store / name / "zarr.json").write_text(json.dumps(meta))
    line = one_line_error(invoke("store-info", store))
    assert "differs from what was signed: num_instances;" in line
    assert "num_instances=1099511627776 is outside" in one_line_error(
        invoke("store-verify", store, "--accept-metadata")
    )  # an edit is signed only if it is still valid metadata
    attrs = doc["attributes"]
    attrs["distilpose_signature"] = sign(attrs["distilpose_store"])  # signed by hand
    (store / "zarr.json").write_text(json.dumps(doc))
    line = one_line_error(invoke("store-info", store))
    assert "num_instances=1099511627776 is outside" in line


@pytest.mark.reliability(
    case="store array shorter than its views x unit layout",
    outcome="one line naming the array, its shape and the expected one",
)
def test_array_shape_inconsistent_with_layout(stores, tmp_path):
    store, _ = copy_store(stores["fp16"], tmp_path)
    meta = json.loads((store / "weights" / "zarr.json").read_text())
    meta["shape"][0] -= 3
    (store / "weights" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="array 'weights' is float32 \\[13, 17\\]"):
        StoreReader.open(store)


@pytest.mark.reliability(
    case="schema-2 store whose array metadata had its crc32c codec removed",
    outcome="refused at open, naming the array (checksums cannot be switched off silently)",
)
def test_checksum_codec_removed_from_a_schema_2_store(stores, tmp_path):
    store, _ = copy_store(stores["fp16"], tmp_path)
    meta = json.loads((store / "heatmaps" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    meta["codecs"][0]["configuration"]["codecs"] = [c for c in inner if c["name"] != "crc32c"]
    (store / "heatmaps" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=r"array\(s\) \['heatmaps'\] lack the crc32c"):
        StoreReader.open(store)


# ---- the one error handler ------------------------------------------------------------------


def _zarr():
    import zarr

    zarr.open_group(store=zarr.storage.MemoryStore(), mode="r")


def _numcodecs():
    import numcodecs

    numcodecs.Zstd().decode(b"not a zstd frame at all")


def _fsspec():
    fsspec.filesystem("no-such-protocol")


def _json():
    json.loads("{")


def _cv2():
    import cv2

    cv2.resize(np.zeros((0, 0), np.uint8), (1, 1))


def _memory():
    np.empty(1 << 62, np.uint8)


class _BadSamples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise ValueError(f"sample {i} is bad")


def _worker():
    batches = iter(torch.utils.data.DataLoader(_BadSamples(), num_workers=1))
    try:
        next(batches)
    finally:
        batches._shutdown_workers()  # the worker ends now, not at some later garbage collection


@pytest.mark.reliability(
    case="exception from a library inside a command",
    outcome="one line 'error: <what>, while running <command>; <what to do>', exit 1; "
    "the traceback only with --debug or DISTILPOSE_DEBUG=1",
)
@pytest.mark.parametrize(
    "raise_it, expect",
    [
        (_zarr, "the zarr store library failed (GroupNotFoundError"),
        (_numcodecs, "numcodecs) failed (RuntimeError: Zstd decompression error"),
        (_fsspec, "remote file access (fsspec) failed (ValueError: Protocol not known"),
        (_json, "the JSON parser failed (JSONDecodeError"),
        (_cv2, "OpenCV failed (error: OpenCV"),
        (_memory, "out of memory while running 'store-info'"),
        (_worker, "ValueError: sample 0 is bad, in DataLoader worker process 0"),
    ],
    ids=["zarr", "numcodecs", "fsspec", "json", "cv2", "MemoryError", "DataLoader worker"],
)
def test_every_exception_class_is_one_line(monkeypatch, tmp_path, raise_it, expect):
    monkeypatch.setattr("store.checks.store_info", lambda *a, **k: raise_it())
    line = one_line_error(invoke("store-info", tmp_path))
    assert expect in line and "while running 'store-info'" in line, line
    if raise_it is _worker:
        return  # its traceback is the worker's: shown the same way, one worker start is enough
    debug = invoke("--debug", "store-info", tmp_path)
    assert debug.exit_code == 1 and "Traceback" in debug.output
    monkeypatch.setenv("DISTILPOSE_DEBUG", "1")
    assert "Traceback" in invoke("store-info", tmp_path).output


# ---- remote stores ---------------------------------------------------------------------------


def _to_memory(store: Path, prefix: str) -> None:
    fs = fsspec.filesystem("memory")
    for d, _, files in os.walk(store):
        for f in files:
            full = os.path.join(d, f)
            fs.pipe(f"/{prefix}/" + os.path.relpath(full, store), Path(full).read_bytes())


class _Memory(MemoryFileSystem):
    """The memory filesystem under another protocol name."""

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).split("://", 1)[-1])


class _DroppingFS(_Memory):
    """The memory filesystem, except that a path containing `drop` resets the connection."""

    protocol = ("dropping",)
    drop = "zarr.json"

    def info(self, path, **kw):
        if self.drop in path:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().info(path, **kw)

    def cat_file(self, path, start=None, end=None, **kw):
        if self.drop in path:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().cat_file(path, start, end, **kw)


class _SilentFS(_Memory):
    """The memory filesystem, except that reading any file never answers (until released)."""

    protocol = ("silent",)
    release = threading.Event()

    def info(self, path, **kw):
        self.release.wait(30)  # bounded: a stuck test thread ends by itself
        return super().info(path, **kw)

    def cat_file(self, path, start=None, end=None, **kw):
        self.release.wait(30)
        return super().cat_file(path, start, end, **kw)


@pytest.fixture()
def memory_store(stores):
    fsspec.register_implementation("dropping", _DroppingFS, clobber=True)
    fsspec.register_implementation("silent", _SilentFS, clobber=True)
    _SilentFS.release.clear()
    _to_memory(Path(stores["fp16"]["store"]), "m14")
    yield "m14"
    _SilentFS.release.set()
    fsspec.filesystem("memory").rm("/m14", recursive=True)


@pytest.mark.reliability(
    case="remote store (fsspec) whose connection drops: at open and during chunk reads",
    outcome="one line 'cannot reach the store' naming the URL (was 'no store here')",
)
def test_dropped_connection_is_named(memory_store, monkeypatch):
    assert StoreReader.open(f"memory://{memory_store}").read_slots(0, 8)["instance"].size == 8
    _DroppingFS.drop = "zarr.json"
    line = one_line_error(invoke("store-info", f"dropping://{memory_store}"))
    assert "cannot reach the store (ConnectionResetError" in line and "dropping://" in line
    _DroppingFS.drop = "heatmaps/c"
    with pytest.raises(StoreConnectionError, match="cannot reach the store.*heatmaps/c/0"):
        StoreReader.open(f"dropping://{memory_store}").read_slots(0, 8)


@pytest.mark.reliability(
    case="remote store that never answers (DISTILPOSE_REMOTE_TIMEOUT=0.5)",
    outcome="one line 'no answer within 0.5 s' after the timeout (was a hang)",
)
def test_silent_remote_store_times_out(memory_store, monkeypatch):
    monkeypatch.setenv("DISTILPOSE_REMOTE_TIMEOUT", "0.5")
    t0 = time.perf_counter()
    line = one_line_error(invoke("store-info", f"silent://{memory_store}"))
    assert "no answer within 0.5 s" in line and time.perf_counter() - t0 < 10


@pytest.mark.reliability(
    case="http server on 127.0.0.1 that accepts and never answers",
    outcome="one line 'no answer within 0.5 s' (needs the remote extra, skipped without it)",
)
def test_local_http_server_that_never_answers(monkeypatch):
    pytest.importorskip("aiohttp")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(10)
    held = []

    def accept():  # accept connections, never reply; ends with the socket
        try:
            while True:
                held.append(server.accept()[0])
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("DISTILPOSE_REMOTE_TIMEOUT", "0.5")
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/store"
        line = one_line_error(invoke("store-info", url))
        assert "no answer within 0.5 s" in line
    finally:
        server.close()
        for c in held:
            c.close()


@pytest.mark.reliability(
    case="http store on a port nobody listens on (connection refused)",
    outcome="one line 'cannot reach the store' (was 'no store here')",
)
def test_http_connection_refused():
    pytest.importorskip("aiohttp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and closed again: nothing listens there
    line = one_line_error(invoke("store-info", f"http://127.0.0.1:{port}/store"))
    assert "cannot reach the store (ClientConnectorError" in line


@pytest.mark.reliability(
    case="http:// and s3:// store URLs without the fsspec extras installed",
    outcome="one line naming pip install 'distilpose[remote]' (was ImportError)",
)
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/store", "s3://bucket/store"])
def test_remote_url_without_the_extra(monkeypatch, url):
    registry = sys.modules["fsspec.registry"]._registry
    for mod in ("aiohttp", "s3fs", "fsspec.implementations.http"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    for proto in ("http", "https", "s3"):
        monkeypatch.delitem(registry, proto, raising=False)
    line = one_line_error(invoke("store-info", url))
    assert "stores need the remote extra" in line and "pip install 'distilpose[remote]'" in line


# ---- concurrent writers ----------------------------------------------------------------------

_WRITER = """
import sys, time
sys.path[:0] = [{root!r}, {faults!r}]
from test_store_faults import small_meta, unit_arrays
from store import StoreWriter
w = StoreWriter.create_or_open(sys.argv[1], small_meta(views=2, n=100))
mine, others = w.claim(w.pending_units())
for u in mine:
    time.sleep(0.02)
    w.write_unit(u, unit_arrays(w, u))
w.release()
w.wait_for(others)
print(",".join(map(str, mine)))
"""


@pytest.mark.reliability(
    case="two writers started at once on a new store",
    outcome="one creates, both share the units (each written once), both exit 0, no false error",
)
def test_concurrent_starters_share_a_new_store(tmp_path):
    code = _WRITER.format(root=str(ROOT), faults=str(Path(__file__).resolve().parent))
    env = {**os.environ, "DISTILPOSE_NO_PROGRESS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "s")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    written = [[int(u) for u in o.strip().split(",") if u] for o, _ in outs]
    assert sorted(written[0] + written[1]) == list(range(14))  # every unit exactly once
    assert check_complete_samples(tmp_path / "s") == 200
    assert not list((tmp_path / "s" / "complete").glob(".*"))  # no claims or temp files left


_HOLDER = """
import sys, time
sys.path[:0] = [{root!r}, {faults!r}]
from test_store_faults import small_meta
from store import StoreWriter
w = StoreWriter.create_or_open(sys.argv[1], small_meta(views=1, n=16))
print(w.claim([0])[0], flush=True)
time.sleep(30)
"""


@pytest.mark.reliability(
    case="temp files (shard partials, temp marker) of a unit a live writer holds",
    outcome="left alone by another writer of that unit; removed once their writer is dead",
)
def test_temp_files_of_a_live_writer_are_left_alone(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=16))
    code = _HOLDER.format(root=str(ROOT), faults=str(Path(__file__).resolve().parent))
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "[0]"  # it holds unit 0
        temps = [
            tmp_path / "s" / "complete" / ".u0000000.json.k3j2.tmp",
            Path(w._shard_file("heatmaps", 0) + ".5d1f.partial"),
        ]
        for t in temps:
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_text("in progress")
        assert w.claim([0]) == ([], [0])
        w._clear_partials(0)
        assert all(t.exists() for t in temps)
    finally:
        holder.kill()
        holder.wait()
    assert w.claim([0]) == ([0], [])  # its writer died: the unit and its leftovers are ours
    w._clear_partials(0)
    assert not any(t.exists() for t in temps)


# ---- resume on a changed store ---------------------------------------------------------------


@pytest.mark.reliability(
    case="train-student --resume after the store gained a view",
    outcome="refused naming 'views: run=1 store=2'; runs with --allow-store-change",
)
def test_resume_refuses_a_store_that_gained_views(tmp_path):
    paths = build_tiny_store(tmp_path / "d", views=1, num_train=8, num_val=2)
    kw = dict(batch_size=8, device="cpu", workers=0, epochs=1, amp=False)
    train_student(StudentRun(paths["store"], "distilpose_tiny", tmp_path / "run", **kw))
    meta = StoreReader.open(paths["store"]).meta
    meta.views = 2
    StoreWriter.create_or_open(paths["store"], meta)  # the store now has room for view 1
    # an unfinished view 1 changes nothing: training takes the complete views only
    run = StudentRun(paths["store"], "distilpose_tiny", tmp_path / "run", resume=True, **kw)
    assert train_student(run)["epochs"] == 1
    build_tiny_store(tmp_path / "d", views=2, num_train=8, num_val=2)  # view 1 written
    with pytest.raises(StoreMismatchError, match=r"views: run=1 store=2.*--allow-store-change"):
        train_student(
            StudentRun(paths["store"], "distilpose_tiny", tmp_path / "run", resume=True, **kw)
        )
    line = cli_train(paths["store"], tmp_path / "run", "--workers", 0, "--resume")
    assert "views: run=1 store=2" in line
    summary = train_student(
        StudentRun(
            paths["store"], "distilpose_tiny", tmp_path / "run", resume=True,
            allow_store_change=True, allow_incomplete=True, **kw,
        )
    )  # fmt: skip
    assert summary["epochs"] == 1


@pytest.mark.reliability(
    case="claims left by a killed writer, one naming a pid now reused by another process",
    outcome="taken over by the next writer, which completes the store",
)
def test_stale_claims_are_taken_over(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=32))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        d = tmp_path / "s" / "complete"
        (d / ".u0000000.json.claim").write_text(str(sleeper.pid))  # live pid, not a writer
        (d / ".u0000001.json.claim").write_text("999999999")  # a dead one
        mine, others = w.claim(w.pending_units())
        assert mine == [0, 1] and others == []
        fill(w, mine)
        w.release()
        assert check_complete_samples(tmp_path / "s") == 32
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.reliability(
    case="empty claim left by a writer killed between creating it and writing its pid",
    outcome="taken over at once by the resumed dump (claims are named only once they hold the pid)",
)
def test_empty_claim_is_taken_over_at_once(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(views=1, n=32))
    d = tmp_path / "s" / "complete"
    (d / ".u0000001.json.claim").write_text("")  # as older versions could leave it
    mine, others = w.claim(w.pending_units())
    assert mine == [0, 1] and others == []
    assert not [p.name for p in d.iterdir() if p.name.endswith(f".{os.getpid()}")]
    fill(w, mine)
    w.release()
    assert check_complete_samples(tmp_path / "s") == 32
