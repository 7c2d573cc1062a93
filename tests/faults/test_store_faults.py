"""Store reliability: killed writers, full or read-only disks, newer schemas, bad teacher outputs,
readers racing a writer that adds views.

Run as a script it plays the child processes:
`python test_store_faults.py write PATH VIEWS DELAY` (a writer printing each finished unit) and
`python test_store_faults.py read PATH STOP_FILE` (a reader checking every sample it sees).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distilpose.errors import StoreFormatError  # noqa: E402
from distilpose.geometry import Geometry  # noqa: E402
from store import SCHEMA_VERSION, StoreMeta, StoreWriter  # noqa: E402

K, D, P, HH, WH = 3, 8, 4, 8, 6
ENV = {**os.environ, "DISTILPOSE_NO_PROGRESS": "1"}
KILLS = 5  # SIGKILLs at random moments, each followed by a resume


def small_meta(views: int = 2, n: int = 100) -> StoreMeta:
    return StoreMeta(
        teacher_name="tiny",
        teacher_sha256="a" * 64,
        num_instances=n,
        views=views,
        seed=11,
        geometry=Geometry((24, 32), (WH, HH), (WH // 2, HH // 2)),
        token_dim=D,
        num_keypoints=K,
        ann_digest="f" * 64,
        chunk_samples=8,
        shard_chunks=2,
        created="2024-01-01T00:00:00+00:00",
    )


def expected(inst: int, view: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([inst, view, 5])
    return {
        "heatmaps": rng.random((K, HH, WH)).astype(np.float32),
        "keypoint_tokens": rng.normal(size=(K, D)).astype(np.float32),
        "visual_tokens": rng.normal(size=(P, D)).astype(np.float32),
        "keypoints": rng.uniform(0, 24, (K, 2)).astype(np.float32),
        "weights": np.ones(K, np.float32),
    }


def unit_arrays(w: StoreWriter, unit: int) -> dict:
    insts, view = w.unit_instances(unit), w.unit_view(unit)
    per = [expected(int(i), view) for i in insts]
    spec = np.zeros((len(insts), 8))
    spec[:, 0], spec[:, 1] = insts, view
    return {
        **{k: np.stack([p[k] for p in per]) for k in per[0]},
        "spec": spec,
        "image_id": insts,
        "ann_id": insts,
        "crop_digest": np.zeros((len(insts), 32), np.uint8),
    }


def fill(w: StoreWriter, units=None) -> None:
    for u in w.pending_units() if units is None else units:
        w.write_unit(u, unit_arrays(w, u))


def tree(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            if f != ".lock":
                p = os.path.join(d, f)
                out[os.path.relpath(p, path)] = Path(p).read_bytes()
    return out


def check_complete_samples(path) -> int:
    """Read every complete sample and compare it with what the writer wrote; returns a count."""
    from store import StoreReader

    r = StoreReader.open(path)
    seen = 0
    for batch in r.iter_batches(None, 16, allow_incomplete=True):
        for i, slot in enumerate(batch["slot"]):
            inst, view = r.layout.slot_instance(int(slot))
            assert batch["instance"][i] == inst and batch["spec"][i, 1] == view, slot
            ref = expected(inst, view)
            for k in ("heatmaps", "keypoint_tokens", "visual_tokens"):
                assert np.array_equal(batch[k][i], ref[k].astype(np.float16)), (slot, k)
            assert np.array_equal(batch["keypoints"][i], ref["keypoints"]), slot
            seen += 1
    return seen


@pytest.fixture()
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "s"
    fill(StoreWriter.create_or_open(path, small_meta()))
    return path


# ---- kills -----------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="store writer SIGKILLed inside a unit, 5 kills in a row",
    outcome="readers see only whole samples; the resumed store is byte-identical",
)
def test_killed_writer_resumes_to_the_uninterrupted_store(tmp_path, reference, record_property):
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    kills = mid_store = 0
    while True:
        proc = subprocess.Popen(
            [sys.executable, __file__, "write", str(path), "2", "0"],
            stdout=subprocess.PIPE,
            env=ENV,
        )
        wait_units = int(rng.integers(0, 2)) if kills < KILLS else 10**6
        finished = 0
        for line in proc.stdout:
            if line.startswith(b"unit"):
                finished += 1
                if finished > wait_units:
                    time.sleep(rng.uniform(0, 0.03))  # land somewhere inside the next unit
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=60)
        proc.stdout.close()
        if proc.returncode == 0:
            break
        kills += 1
        assert proc.returncode == -signal.SIGKILL
        if path.exists():  # whatever is marked complete is exactly what was meant
            seen = check_complete_samples(path)
            mid_store += 0 < seen < 200
    assert kills == KILLS and mid_store >= KILLS - 1
    assert tree(path) == tree(reference)  # byte for byte, no temp files left
    record_property("kills_survived", kills)


# ---- disk full, read-only --------------------------------------------------------------------


def _failing_put(monkeypatch, err: int, when: str):
    import zarr.storage._local as local

    real = local._put

    def put(path, value, exclusive=False):
        if when in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)


@pytest.mark.reliability(
    case="store write on a full or read-only disk",
    outcome="error naming the chunk file; unit pending, earlier units intact; a rerun completes",
)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS], ids=["disk full", "read-only"])
def test_disk_full_or_read_only_names_the_path_and_marks_nothing(
    tmp_path, reference, monkeypatch, err
):
    from store import StoreReader

    path = tmp_path / "s"
    w = StoreWriter.create_or_open(path, small_meta())
    fill(w, [0, 1])
    before = tree(path)
    _failing_put(monkeypatch, err, "visual_tokens/c/2/")
    with pytest.raises(StoreFormatError, match=os.strerror(err)) as info:
        w.write_unit(2, unit_arrays(w, 2))
    assert "visual_tokens/c/2/" in str(info.value) and "stays pending" in str(info.value)
    assert w.complete_units() == {0, 1}
    after = tree(path)
    assert all(after[p] == b for p, b in before.items())  # nothing already written was lost
    r = StoreReader.open(path)
    with pytest.raises(StoreFormatError, match="not complete"):
        r.read_slots(32, 48)
    assert check_complete_samples(path) == 32
    monkeypatch.undo()
    fill(StoreWriter.create_or_open(path, small_meta()))
    assert tree(path) == tree(reference)


@pytest.mark.reliability(
    case="disk full while marking a store unit complete",
    outcome="StoreFormatError naming the marker file; the unit is not marked complete",
)
def test_marker_write_failure_leaves_the_unit_pending(tmp_path, monkeypatch):
    path = tmp_path / "s"
    w = StoreWriter.create_or_open(path, small_meta())
    real = os.replace

    def replace(src, dst, *a, **kw):
        if str(dst).endswith(".json") and "complete" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreFormatError, match=r"complete/u0000000\.json"):
        w.write_unit(0, unit_arrays(w, 0))
    assert w.complete_units() == set()


@pytest.mark.reliability(
    case="store path below a file, or a folder that is not a store",
    outcome="StoreFormatError naming the path",
)
def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreFormatError, match=str(blocker)):
        StoreWriter.create_or_open(blocker / "store", small_meta())
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(StoreFormatError, match=str(ro)):
            StoreWriter.create_or_open(ro / "store", small_meta())
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "photo.jpg").write_text("x")
    with pytest.raises(StoreFormatError, match="not a store"):
        StoreWriter.create_or_open(other, small_meta())


@pytest.mark.reliability(
    case="store creation killed before its metadata was written",
    outcome="the next run starts the store afresh; equals a clean store",
)
def test_interrupted_creation_starts_again(tmp_path, reference):
    import zarr

    path = tmp_path / "s"
    group = zarr.open_group(path, mode="w")  # killed after the group, before arrays and metadata
    group.create_array("spec", shape=(3, 8), dtype="float64")
    fill(StoreWriter.create_or_open(path, small_meta()))
    assert tree(path) == tree(reference)


# ---- untrusted or bad content ----------------------------------------------------------------


@pytest.mark.reliability(
    case="store of a newer schema version than the code",
    outcome="reader and writer refuse it naming the version",
)
def test_newer_schema_is_refused(tmp_path):
    from store import StoreReader

    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(views=1)), [0])
    meta_file = path / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["distilpose_store"]["schema_version"] = SCHEMA_VERSION + 1
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        StoreReader.open(path)
    with pytest.raises(StoreFormatError, match="newer"):
        StoreWriter.create_or_open(path, small_meta(views=1))


@pytest.mark.reliability(
    case="non-finite teacher output written to the store",
    outcome="refused at write time naming slot, instance, view and array; nothing marked complete",
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6], ids=["NaN", "Inf", "1e6 overflows fp16"])
def test_nonfinite_teacher_outputs_are_refused_at_write_time(tmp_path, bad):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta())
    arrays = unit_arrays(w, 1)
    arrays["visual_tokens"][3, 1, 2] = bad
    slot = w.unit_slots(1)[0] + 3
    inst = int(w.unit_instances(1)[3])
    what = "overflows float16" if bad == 1e6 else "holds NaN/Inf"
    with pytest.raises(
        StoreFormatError, match=rf"slot {slot} \(instance {inst}, view 0\) 'visual_tokens' {what}"
    ):
        w.write_unit(1, arrays)
    assert w.complete_units() == set()


# ---- concurrent readers ----------------------------------------------------------------------


@pytest.mark.reliability(
    case="two training readers while another process adds views",
    outcome="readers only ever see whole, correct samples",
)
def test_readers_never_see_partial_samples_while_views_are_added(tmp_path):
    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(views=1)))
    stop = tmp_path / "stop"
    readers = [
        subprocess.Popen(
            [sys.executable, __file__, "read", str(path), str(stop)],
            stdout=subprocess.PIPE,
            env=ENV,
        )
        for _ in range(2)
    ]
    for r in readers:  # each has read the one-view store once
        assert r.stdout.readline().strip() == b"ready"
    writer = subprocess.run(
        [sys.executable, __file__, "write", str(path), "4", "0.05"], capture_output=True, env=ENV
    )
    stop.write_text("")
    outs = [r.communicate(timeout=60)[0].decode() for r in readers]
    assert writer.returncode == 0, writer.stderr.decode()
    assert [r.returncode for r in readers] == [0, 0], outs
    for out in outs:
        counts = [int(x) for x in out.split()]
        assert min(counts) >= 100 and max(counts) == 400  # first one view, at the end four
        assert any(100 < c < 400 for c in counts), counts  # and states in between


def _write_main(path: str, views: int, delay: float) -> None:
    w = StoreWriter.create_or_open(path, small_meta(views=views))
    for u in w.pending_units():
        w.write_unit(u, unit_arrays(w, u))
        print(f"unit {u}", flush=True)
        time.sleep(delay)


def _read_main(path: str, stop: str) -> None:
    counts = [check_complete_samples(path)]
    print("ready", flush=True)
    while True:
        last = os.path.exists(stop)
        counts.append(check_complete_samples(path))
        if last:
            break
    print(" ".join(map(str, counts)), flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "write":
        _write_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif role == "read":
        _read_main(sys.argv[2], sys.argv[3])
