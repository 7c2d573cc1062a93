"""Round two of bad inputs (issue 24): values of the wrong type or range, memory bounds,
messages that name the file, store, array and slot, and waits that end.

Each case is one `error: ...` line and exit code 1 (or a BadConfigError / StoreFormatError line
from the Python API), reproduced as a user meets it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_student_train import build_tiny_store  # noqa: E402

import cli  # noqa: E402
from cli_support import MAX_CONFIG_NODES, load_config_file  # noqa: E402
from distilpose.data.crop import AugmentRecipe  # noqa: E402
from distilpose.errors import BadConfigError, StoreCorruptError, StoreFormatError  # noqa: E402
from store import StoreReader  # noqa: E402

runner = CliRunner()


def one_line_error(result) -> str:
    """The single line a failing command printed; asserts exit code 1 and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_store(tmp_path_factory.mktemp("tiny"), views=1, num_train=8, num_val=2)
    torch.set_num_threads(n)


def copy_store(tiny: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "store.zarr"
    shutil.copytree(tiny["store"], dst)
    return dst


def edit_meta(store: Path, **changes) -> None:
    """Edit the store's metadata and sign the edit (as `store-verify --accept-metadata` would
    for a user who meant it): the checks after the signature's must still refuse bad values."""
    from store.signature import sign

    doc = json.loads((store / "zarr.json").read_text())
    meta = doc["attributes"]["distilpose_store"]
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = meta
        for p in parents:
            target = target[p]
        target[last] = value
    doc["attributes"]["distilpose_signature"] = sign(meta)
    (store / "zarr.json").write_text(json.dumps(doc))


# ---- config files: encoding and memory ------------------------------------------------------


@pytest.mark.reliability(
    case="--config file that is not UTF-8",
    outcome="one line naming the file and the offending byte, exit 1",
)
def test_non_utf8_config_names_the_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b"ep\xffochs = 3\n")
    line = one_line_error(runner.invoke(cli.app, ["train-student", "--config", str(config)]))
    assert line == (
        f"error: {config}: not UTF-8 text (byte 0xff at offset 2); expected a TOML or YAML "
        "file saved as UTF-8"
    )


def _alias_bomb(levels: int = 9) -> str:
    """`losses:` a list of lists of aliases: 10^levels values once expanded."""
    lines = ["losses:", "  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.reliability(
    case="YAML alias bomb under a known option (losses: lists of lists of aliases)",
    outcome="one line naming the file and the alias's line, exit 1, within 20 MB of memory",
)
def test_yaml_alias_bomb_is_refused_within_a_memory_bound(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "bomb.yaml"
    config.write_text(_alias_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(BadConfigError, match=r"YAML alias at line 3, column 10"):
            load_config_file(config, "train-student")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak
    line = one_line_error(runner.invoke(cli.app, ["train-student", "--config", str(config)]))
    assert line.startswith(f"error: {config}: YAML alias at line 3")


@pytest.mark.reliability(
    case="YAML config of 300,000 values or nested 3,000 deep (no alias, under 1 MiB)",
    outcome="one line naming the file (the value cap / nesting); the 300,000 values within "
    "20 MB of memory",
)
@pytest.mark.parametrize("shape", ["wide", "deep"])
def test_large_yaml_config_is_refused_within_a_memory_bound(tmp_path, shape):
    pytest.importorskip("yaml")
    config = tmp_path / "c.yaml"
    n = 300_000 if shape == "wide" else 3_000  # under the 1 MiB limit; 3x too deep
    body = ",".join(["[]"] * n) if shape == "wide" else "[" * n + "]" * n
    config.write_text(f"losses: [{body}]\n")
    if shape == "deep":  # the parser stops at the recursion limit: memory of 1000 levels
        with pytest.raises(BadConfigError, match=f"{config}: values nested more than about"):
            load_config_file(config, "train-student")
        return
    tracemalloc.start()
    try:
        with pytest.raises(BadConfigError, match=f"more than {MAX_CONFIG_NODES:,} values"):
            load_config_file(config, "train-student")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak


@pytest.mark.reliability(
    case="--config file above the size limit (1 MiB)",
    outcome="one line naming the file and the limit; it is not read beyond the limit",
)
def test_config_file_size_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILPOSE_MAX_CONFIG_KB", "1")
    config = tmp_path / "c.toml"
    config.write_text("# padding\n" * 200 + "epochs = 3\n")
    line = one_line_error(runner.invoke(cli.app, ["train-student", "--config", str(config)]))
    assert "larger than the limit of 1,024 bytes" in line and "DISTILPOSE_MAX_CONFIG_KB" in line


def test_a_huge_bad_value_gives_a_short_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("losses = [" + ", ".join(["[]"] * 50_000) + "]\n")
    line = one_line_error(runner.invoke(cli.app, ["train-student", "--config", str(config)]))
    assert line.startswith(f"error: {config}: StudentRun.losses: got [[], [],") and len(line) < 300


# ---- augmentation recipes -------------------------------------------------------------------

BAD_RECIPES = [
    ({"flip_prob": "yes"}, "recipe.flip_prob: got 'yes' (str); expected a number"),
    ({"flip_prob": 1.5}, "recipe.flip_prob: got 1.5; expected a probability between 0 and 1"),
    ({"rotation_factor": float("nan")}, "recipe.rotation_factor: got nan; expected finite"),
    ({"scale_factor": 1.0}, "recipe.scale_factor: got 1.0; expected at least 0 and below 1"),
    ({"half_body_min_joints": 8.5}, "recipe.half_body_min_joints: got 8.5 (float); expected an"),
    ({"rotation_prob": True}, "recipe.rotation_prob: got True (bool); expected a number"),
    ({"flip": 0.5}, "recipe: unknown key(s) flip; expected keys among"),
]


@pytest.mark.parametrize("recipe, error", BAD_RECIPES, ids=[str(r) for r, _ in BAD_RECIPES])
def test_recipe_values_are_checked(recipe, error):
    with pytest.raises(BadConfigError) as e:
        AugmentRecipe.from_dict(recipe)
    assert str(e.value).startswith(error)


@pytest.mark.reliability(
    case='store metadata recipe.flip_prob edited to "yes"',
    outcome="refused at open (store-info and train-student): one line naming store and field",
)
def test_store_recipe_of_the_wrong_type_is_refused(tiny, tmp_path):
    store = copy_store(tiny, tmp_path)
    edit_meta(store, **{"recipe.flip_prob": "yes"})
    expect = f"{store}: store metadata recipe.flip_prob: got 'yes' (str); expected a number"
    with pytest.raises(StoreFormatError, match="recipe.flip_prob"):
        StoreReader.open(store)
    args = ["train-student", "--store", str(store), "--model", "distilpose_tiny", "--out"]
    args += [str(tmp_path / "run"), "--device", "cpu", "--workers", "0", "--epochs", "1"]
    assert one_line_error(runner.invoke(cli.app, args)).startswith(f"error: {expect}")
    assert one_line_error(runner.invoke(cli.app, ["store-info", str(store)])).startswith(
        f"error: {expect}"
    )


# ---- JSON memory ----------------------------------------------------------------------------

COCO_MINI = Path(__file__).resolve().parents[1] / "data" / "coco_mini"
JUNK = {  # one element of each shape, repeated: from 1.5 to 30 bytes of memory per byte parsed
    "empty lists": "[]",
    "empty objects": "{}",
    "nested": '{"a":{"b":[[0]]}}',
    "short strings": '"ab"',
    "distinct keys": None,  # {"k0":1,"k1":1,...}
    "floats": "1.5e300",
    "ints": "9" * 18,
    "wide strings": '"\U0001f600a"',
}


def _junk(shape: str, n: int = 20_000) -> str:
    if shape == "distinct keys":
        return "{" + ",".join(f'"k{i}":1' for i in range(n)) + "}"
    return "[" + ",".join([JUNK[shape]] * n) + "]"


def test_json_memory_estimate_bounds_what_parsing_costs():
    """The estimate is an upper bound of json.loads's allocations (tracemalloc), on the test
    data's real COCO files and on junk of every shape; a real file estimates under 8 bytes
    per byte, so the 2048 MiB default takes COCO train (238 MB) and refuses 512 MiB of junk."""
    from distilpose.limits import json_memory_estimate, max_json_bytes, max_json_memory

    assert max_json_bytes() == 512 << 20 and max_json_memory() == 2048 << 20
    real = sorted((COCO_MINI / "annotations").glob("*.json"))
    texts = {p.name: p.read_bytes() for p in real} | {s: _junk(s).encode() for s in JUNK}
    for name, data in texts.items():
        for form in (data, data.decode()):
            tracemalloc.start()
            json.loads(form)
            cost = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert cost <= json_memory_estimate(form), (name, type(form), cost)
    for p in real:
        assert json_memory_estimate(texts[p.name]) < 8 * len(texts[p.name])
    assert json_memory_estimate(_junk("empty lists").encode()) > 30 * 60_000


@pytest.mark.reliability(
    case="annotation file with one huge junk value (a list of 1M empty lists, 3 MB)",
    outcome="refused before parsing: one line naming the file, the estimate and the memory "
    "limit (DISTILPOSE_MAX_JSON_MEMORY_MB); memory used: the file's bytes",
)
def test_huge_junk_json_value_is_refused_before_parsing(tmp_path, monkeypatch):
    from distilpose.data import load_coco_instances
    from distilpose.errors import BadAnnotationError

    doc = json.loads((COCO_MINI / "annotations" / "person_keypoints.json").read_text())
    text = json.dumps(doc)[:-1] + ', "junk": ' + _junk("empty lists", 1_000_000) + "}"
    ann = tmp_path / "ann.json"
    ann.write_text(text)
    monkeypatch.setenv("DISTILPOSE_MAX_JSON_MEMORY_MB", "64")  # the 3 MB file needs ~120 MB
    tracemalloc.start()
    try:
        with pytest.raises(BadAnnotationError) as e:
            load_coco_instances(ann, COCO_MINI / "images")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{ann}: JSON would take about ")
    assert "over the limit of 64 MiB" in str(e.value) and "DISTILPOSE_MAX_JSON_MEMORY_MB" in str(
        e.value
    )
    assert peak < 2 * len(text), peak  # the bytes read, never the parse


# ---- messages that name the store, array and slot -------------------------------------------


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> dict:
    from faults.test_integrity import pixel_store

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield pixel_store(tmp_path_factory.mktemp("pixels"))
    torch.set_num_threads(n)


def _raw_batch(store: str) -> tuple[object, dict]:
    from student_train.data import StudentBatches

    batches = StudentBatches(store, batch_size=8, workers=0)
    return batches, next(iter(batches.dataset(0).source))


@pytest.mark.reliability(
    case="corrupt JPEG (truncated, or 0 bytes) inside a pixel shard whose crc32c is valid",
    outcome="one StoreCorruptError line naming store, array 'pixels', slot and instance",
)
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_undecodable_stored_crop_names_store_array_and_slot(pixels, damage):
    from student_train.data import decode_on_device

    batches, raw = _raw_batch(pixels["store"])
    data = raw["pixels"][2]
    half = data[: len(data) // 2]
    raw["pixels"] = raw["pixels"].copy()
    raw["pixels"][2] = half + bytes(len(data) - len(half)) if damage == "truncated" else b""
    slot, inst = int(raw["slot"][2]), int(raw["instance"][2])
    size = len(data) if damage == "truncated" else 0
    expect = (
        f"{pixels['store']}: array 'pixels' slot {slot} (instance {inst}): the stored jpeg crop "
        f"of {size} bytes does not decode ("
    )
    with pytest.raises(StoreCorruptError) as e:
        batches.renderer(raw)
    assert str(e.value).startswith(expect) and "\n" not in str(e.value)
    # the GPU path's worker output (JPEG bytes), decoded here on the CPU: the same line
    batches.renderer.output = "jpeg"
    try:
        batch = batches.renderer(raw)
    finally:
        batches.renderer.output = "images"
    with pytest.raises(StoreCorruptError) as e:
        decode_on_device(batch, torch.device("cpu"), pixels["store"])
    assert str(e.value).startswith(expect)


def test_crops_of_another_format_than_the_metadata_says_blame_the_metadata(pixels):
    """A metadata `pixels` edit (jpeg -> lossless) was a bare zstd error."""
    batches, raw = _raw_batch(pixels["store"])
    batches.renderer.pixels = "lossless"
    with pytest.raises(StoreFormatError) as e:
        batches.renderer(raw)
    assert str(e.value) == (
        f"{pixels['store']}: array 'pixels' slot {int(raw['slot'][0])} (instance "
        f"{int(raw['instance'][0])}) holds a jpeg crop, but the store metadata says pixels "
        "'lossless'; expected the metadata the dump wrote (was zarr.json edited?)"
    )


@pytest.mark.reliability(
    case="edited chunk shape in an array's zarr.json (heatmaps: 8 -> 4 slots per chunk)",
    outcome="refused at open (store-verify, training): the metadata disagrees with the layout, "
    "not 'damaged data'",
)
def test_edited_chunk_shape_is_named_as_a_layout_mismatch(tiny, tmp_path):
    store = copy_store(tiny, tmp_path)
    path = store / "heatmaps" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["codecs"][0]["configuration"]["chunk_shape"][0] = 4
    path.write_text(json.dumps(doc))
    expect = f"{store}: array 'heatmaps' has chunks [4, 17, "
    with pytest.raises(StoreFormatError) as e:
        StoreReader.open(store)
    assert str(e.value).startswith(expect) and "needs chunks [8, 17, " in str(e.value)
    line = one_line_error(runner.invoke(cli.app, ["store-verify", str(store)]))
    assert line.startswith(f"error: {expect}")
    from store import StoreWriter
    from store.schema import META_KEY, StoreMeta

    meta = StoreMeta.from_dict(
        json.loads((store / "zarr.json").read_text())["attributes"][META_KEY]
    )
    with pytest.raises(StoreFormatError) as e:  # a dump rerun: refused before it writes
        StoreWriter.create_or_open(store, meta)
    assert str(e.value).startswith(expect)


# ---- nothing after the error line -----------------------------------------------------------

# The fault injection, and only it, wraps zarr's local store: from the FAIL_AT-th shard request
# on, requests fail (ENOSPC writing, EIO reading), the later ones only after a second, as a full
# disk's or a failing drive's sibling requests of one shard still under way would.
_FAULTY_STORE = """
import asyncio, errno, os, sys
import zarr.storage

op, fail_at = os.environ["FAULT_OP"], int(os.environ["FAIL_AT"])
seen = [0]
code = errno.ENOSPC if op == "_set" else errno.EIO
original = getattr(zarr.storage.LocalStore, op)

async def faulty(self, key, *args, **kwargs):
    if "/c/" in key:
        seen[0] += 1
        if seen[0] >= fail_at:
            if seen[0] > fail_at:
                await asyncio.sleep(1.0)
            raise OSError(code, os.strerror(code), os.path.join(str(self.root), key))
    return await original(self, key, *args, **kwargs)

setattr(zarr.storage.LocalStore, op, faulty)
import cli
sys.argv = ["distilpose", *sys.argv[1:]]
cli.app()
"""


@pytest.mark.reliability(
    case="disk full mid-dump (ENOSPC on a shard while its siblings are still being written), "
    "and a read error mid-training",
    outcome="the one error line and nothing after it: no traceback, no 'Task was destroyed "
    "but it is pending!' (the store's pending requests are awaited)",
)
@pytest.mark.parametrize("command", ["dump-teacher", "train-student"])
def test_nothing_is_printed_after_the_error_line(tiny, tmp_path, command):
    import subprocess

    if command == "dump-teacher":
        op, fail_at = "_set", 3
        args = ["dump-teacher", "--teacher", tiny["teacher"], "--ann", tiny["train_ann"]]
        args += ["--images", tiny["train_images"], "--out", str(tmp_path / "store"), "--views"]
        args += ["2", "--chunk-samples", "8", "--workers", "0", "--device", "cpu"]
        expect = "error: "
    else:
        op, fail_at = "get", 2
        args = ["train-student", "--store", tiny["store"], "--model", "distilpose_tiny"]
        args += ["--out", str(tmp_path / "run"), "--batch-size", "8", "--device", "cpu"]
        args += ["--epochs", "1", "--workers", "0"]
        expect = f"error: {tiny['store']}"
    env = {"FAULT_OP": op, "FAIL_AT": str(fail_at), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _FAULTY_STORE, *args],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith(expect) and ("No space left" in lines[0] or op == "get"), lines


# ---- every wait ends ------------------------------------------------------------------------

_STUCK = """
import fcntl, os, sys, time
sys.path[:0] = [{root!r}, {faults!r}]
from test_store_faults import small_meta
from store import StoreWriter
w = StoreWriter.create_or_open(sys.argv[1], small_meta(views=1, n=16))
print(w.claim([0])[0], flush=True)  # holds unit 0, alive, and never writes it
lock = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # and the metadata lock
time.sleep(60)
"""


@pytest.mark.reliability(
    case="a writer's unit claimed (and the metadata lock held) by a live but stuck process",
    outcome="the waiting writer stops after DISTILPOSE_CLAIM_TIMEOUT (30 min) with one line "
    "naming the unit, the pid and the lock file",
)
def test_a_stuck_writer_is_waited_for_only_so_long(tmp_path, monkeypatch):
    import subprocess

    from faults.test_store_faults import small_meta
    from store import StoreWriter

    faults = Path(__file__).resolve().parent
    code = _STUCK.format(root=str(faults.parents[1]), faults=str(faults))
    store = tmp_path / "s"
    writer = StoreWriter.create_or_open(store, small_meta(views=1, n=16))
    holder = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"[0]"
        assert writer.claim([0]) == ([], [0])
        with pytest.raises(StoreFormatError) as e:
            writer.wait_for([0], poll_s=0.05, timeout_s=0.5)
        assert str(e.value).startswith(
            f"{store}: waited 0.5 s for 1 unit(s) claimed by other writers (unit 0: pid "
            f"{holder.pid}, alive) with none finished"
        )
        monkeypatch.setenv("DISTILPOSE_CLAIM_TIMEOUT", "0.5")
        with pytest.raises(StoreFormatError) as e:
            StoreWriter.create_or_open(store, small_meta(views=1, n=16))
        assert str(e.value).startswith(
            f"{store / '.lock'}: waited 0.5 s for the store's metadata lock"
        )
    finally:
        holder.kill()
        holder.wait()
        writer.release()


@pytest.mark.reliability(
    case="remote store-info whose size listing (du) never answers, all reads answering",
    outcome="one line 'no answer within 0.5 s (sizing it)' after DISTILPOSE_REMOTE_TIMEOUT "
    "(the size went around the remote timeouts: a hang)",
)
def test_remote_store_info_size_has_the_remote_timeout(tiny, monkeypatch):
    import threading
    import time

    import fsspec

    from faults.test_integrity import _Memory, _to_memory

    release = threading.Event()

    class SilentSize(_Memory):
        protocol = ("silentsize",)

        def du(self, path, *args, **kwargs):
            release.wait(30)  # bounded: the stuck thread ends by itself
            return super().du(path, *args, **kwargs)

    fsspec.register_implementation("silentsize", SilentSize, clobber=True)
    _to_memory(Path(tiny["store"]), "h2du")
    monkeypatch.setenv("DISTILPOSE_REMOTE_TIMEOUT", "0.5")
    try:
        t0 = time.perf_counter()
        line = one_line_error(runner.invoke(cli.app, ["store-info", "silentsize://h2du"]))
        assert line.startswith("error: silentsize://h2du: no answer within 0.5 s (sizing it)")
        assert time.perf_counter() - t0 < 20
    finally:
        release.set()
        fsspec.filesystem("memory").rm("/h2du", recursive=True)


@pytest.fixture()
def local_http(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www, and a socket that accepts and never
    answers: (base URL, silent URL)."""
    import functools
    import http.server
    import socket
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        yield www, f"http://127.0.0.1:{server.server_port}", silent.getsockname()[1]
    finally:
        server.shutdown()
        silent.close()


@pytest.mark.reliability(
    case="detector weight download from a server that accepts and never answers",
    outcome="one line naming the detector, 'no answer from the server within 0.5 s' "
    "(DISTILPOSE_DOWNLOAD_TIMEOUT) and the file to fetch; nothing left in the cache",
)
def test_detector_download_stalls_only_so_long(local_http, tmp_path, monkeypatch):
    import hashlib
    import time
    import types

    import distilpose.inference.detector as detector

    www, base, silent_port = local_http
    payload = b"weights" * 1000
    name = f"det-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (www / name).write_bytes(payload)
    (www / "det-0badc0de.pth").write_bytes(payload)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DISTILPOSE_OFFLINE")
    monkeypatch.setenv("DISTILPOSE_DOWNLOAD_TIMEOUT", "0.5")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    for url, outcome in (
        (f"http://127.0.0.1:{silent_port}/{name}", "no answer from the server within 0.5 s"),
        (f"{base}/det-0badc0de.pth", "ValueError: sha256 "),
        (f"{base}/{name}", None),
    ):
        monkeypatch.setattr(
            detector, "_weights_enum", lambda _, u=url: types.SimpleNamespace(url=u)
        )
        t0 = time.perf_counter()
        if outcome is None:  # the real download: checked, renamed into the cache
            assert detector.released_weights_file("det").read_bytes() == payload
            continue
        with pytest.raises(BadConfigError) as e:
            detector.released_weights_file("det")
        assert str(e.value).startswith(f"detector det: its COCO weights are not in {cache}")
        assert outcome in str(e.value) and url in str(e.value), str(e.value)
        assert time.perf_counter() - t0 < 10
        assert not list(cache.glob("*"))  # no partial file left


# ---- several processes ----------------------------------------------------------------------


def _late_rank(rank: int, port: int, out: str) -> None:
    """Rank 1 waits at the barrier (DISTILPOSE_BARRIER_TIMEOUT=2) for rank 0, which is late."""
    import os
    import time

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), DISTILPOSE_BARRIER_TIMEOUT="2",
    )  # fmt: skip
    from distilpose.training.distributed import init_group, wait_for_ranks

    torch.set_num_threads(1)
    init_group(torch.device("cpu"))
    if rank == 0:
        time.sleep(12)  # "validating" past the other rank's timeout
        return
    start = time.perf_counter()
    try:
        wait_for_ranks("rank 0's end of epoch 1 (its validation, if any)")
    except Exception as e:  # noqa: BLE001 - the test reads what was raised
        Path(out).write_text(f"{type(e).__name__}|{time.perf_counter() - start:.1f}|{e}")


@pytest.mark.reliability(
    case="ranks waiting at the barrier while rank 0 validates, past the barrier timeout",
    outcome="one RankError line saying what it waited for and the timeout "
    "(DISTILPOSE_BARRIER_TIMEOUT, default 3 h; torch's own default was 30 min, unstated)",
)
def test_barrier_timeout_says_what_it_waited_for(tmp_path):
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "error.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_late_rank, args=(r, port, str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[1].join(60)
    procs[0].kill()
    procs[0].join()
    kind, waited, message = out.read_text().split("|", 2)
    assert kind == "RankError" and float(waited) < 10, (kind, waited)
    expect = (
        "gave up waiting for rank 0's end of epoch 1 (its validation, if any) after at most 2 s"
    )
    assert message.startswith(expect + " (") and "\n" not in message, message


def test_each_rank_makes_its_gpu_current_before_joining(monkeypatch):
    """torch.cuda.set_device(local rank's device) comes before init_process_group (NCCL binds
    its communicator to the current device); on a GPU machine `benchmarks/gpu.py`'s DDP check
    runs the real thing. Here the two torch calls are recorded, in order."""
    import torch.distributed as dist

    from distilpose.training import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout))
    )
    monkeypatch.setenv("DISTILPOSE_BARRIER_TIMEOUT", "120")
    assert distributed.init_group(torch.device("cuda", 3)) is True
    assert [c[0] for c in calls] == ["set_device", "nccl"] and calls[0][1] == "cuda:3"
    assert calls[1][1].total_seconds() == 120


@pytest.mark.reliability(
    case="train-student --resume of a mid-epoch checkpoint with another global batch "
    "(another number of ranks or --batch-size)",
    outcome="one line naming last.pth, the saved and the new global batch; refused before "
    "training (the same global batch resumes exactly, tested under torchrun)",
)
def test_mid_epoch_checkpoint_refuses_another_global_batch(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["train-student", "--store", tiny["store"], "--model", "distilpose_tiny", "--out"]
    args += [str(out), "--device", "cpu", "--workers", "0", "--epochs", "2"]
    assert runner.invoke(cli.app, [*args, "--batch-size", "4"]).exit_code == 0
    last = out / "last.pth"
    state = torch.load(last, map_location="cpu", weights_only=True)
    # as if 2 ranks x 4 had been killed after 1 of the second epoch's batches
    state.update(epoch=1, epoch_step=1, world_size=2)
    state["scheduler"]["global_batch"] = 8
    torch.save(state, last)
    before = last.read_bytes()
    line = one_line_error(runner.invoke(cli.app, [*args, "--batch-size", "4", "--resume"]))
    assert line == (
        f"error: {last}: saved mid-epoch (epoch 2, after 1 batches) by 2 process(es) with a "
        "global batch of 8; 1 process(es) x batch 4 x 1 accumulation is a global batch of 4, "
        "which would skip or repeat samples; expected the same number of processes, "
        "--batch-size and --accum-steps until the epoch ends"
    )
    assert last.read_bytes() == before


def test_error_lines_under_torchrun_name_the_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = one_line_error(runner.invoke(cli.app, ["store-info", "/nonexistent/store"]))
    assert line.startswith("error: [rank 1 of 2] /nonexistent/store: no store here")
