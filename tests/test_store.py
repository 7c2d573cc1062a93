"""The teacher store: layout, exact and lossy round trips, shuffled reading, writers, checks.

Synthetic teacher outputs (K=3 joints, D=8, P=4 patches, 8x6 heatmaps) keep every test to a
few seconds. Run as a script (`python tests/test_store.py write PATH VIEWS I N`) it is the
writer process of the two-writer test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distilpose.errors import StoreFormatError, StoreMismatchError  # noqa: E402
from distilpose.geometry import Geometry  # noqa: E402
from store import StoreMeta, StoreWriter  # noqa: E402
from store.quantize import (  # noqa: E402
    dequantize_heatmaps,
    dequantize_tokens,
    quantize_heatmaps,
    quantize_tokens,
)

K, D, P, HH, WH = 3, 8, 4, 8, 6
CREATED = "2024-01-01T00:00:00+00:00"  # fixed, so stores made at different times are equal


def small_meta(n: int = 50, views: int = 2, mode: str = "fp16", **kw) -> StoreMeta:
    base = dict(
        teacher_name="tiny",
        teacher_sha256="a" * 64,
        num_instances=n,
        views=views,
        seed=3,
        geometry=Geometry((24, 32), (WH, HH), (WH // 2, HH // 2)),
        token_dim=D,
        num_keypoints=K,
        recipe={"flip_prob": 0.5},
        ann_digest="f" * 64,
        mode=mode,
        chunk_samples=8,
        shard_chunks=2,
        created=CREATED,
    )
    base.update(kw)
    return StoreMeta(**base)


def sample_outputs(inst: int, view: int) -> dict[str, np.ndarray]:
    """Deterministic fake teacher outputs of one (instance, view): a Gaussian peak plus noise."""
    rng = np.random.default_rng([inst, view, 7])
    yy, xx = np.mgrid[0:HH, 0:WH]
    c = rng.uniform([0, 0], [WH, HH], (K, 2))
    amp = rng.uniform(0.3, 1.0, (K, 1, 1))
    d2 = (xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2
    hm = amp * np.exp(-d2 / 8) + rng.normal(0, 1e-3, (K, HH, WH))
    return {
        "heatmaps": hm.astype(np.float32),
        "keypoint_tokens": rng.normal(0, 1, (K, D)).astype(np.float32),
        "visual_tokens": rng.normal(0, 1, (P, D)).astype(np.float32),
        "keypoints": rng.uniform(0, 24, (K, 2)).astype(np.float32),
        "weights": (rng.random(K) > 0.3).astype(np.float32),
        "center": rng.uniform(0, 100, 2),
    }


def unit_arrays(writer: StoreWriter, unit: int) -> dict:
    insts = writer.unit_instances(unit)
    view = writer.unit_view(unit)
    per = [sample_outputs(int(i), view) for i in insts]
    spec = np.zeros((len(insts), 8))
    spec[:, 0], spec[:, 1] = insts, view
    spec[:, 2:4] = [p["center"] for p in per]
    spec[:, 4:6] = 1.0
    out = {k: np.stack([p[k] for p in per]) for k in per[0] if k != "center"}
    out.update(
        spec=spec,
        image_id=insts * 10 + 1,
        ann_id=insts + 1000,
        crop_digest=[(int(i) * 1000 + view).to_bytes(32, "big") for i in insts],
    )
    return out


def fill(writer: StoreWriter, units=None) -> None:
    for u in writer.pending_units() if units is None else units:
        writer.write_unit(u, unit_arrays(writer, u))


def tree(path) -> dict[str, bytes]:
    """Every file of a store (but the lock file), relative path -> bytes."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            if f != ".lock":
                p = os.path.join(d, f)
                out[os.path.relpath(p, path)] = Path(p).read_bytes()
    return out


@pytest.fixture()
def full_store(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter.create_or_open(path, small_meta())
    fill(w)
    return path


# ---- layout ----------------------------------------------------------------------------------


def test_layout_views_are_seeded_permutations_and_units_stay_in_a_view(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(n=50, views=2))
    lay = w.layout
    assert lay.unit_samples == 16 and lay.block_samples == 64 and lay.units_per_view == 4
    for v in range(2):
        slots = range(v * 64, v * 64 + 64)
        insts = [w.slot_instance(s) for s in slots]
        assert all(view == v for _, view in insts)
        real = [i for i, _ in insts[:50]]
        assert real == np.random.default_rng([3, v]).permutation(50).tolist()
        assert all(i == -1 for i, _ in insts[50:])  # padding
    assert w.units() == list(range(8))
    assert w.units(view=1, shard=(1, 2)) == [5, 7]
    assert [w.unit_view(u) for u in range(8)] == [0] * 4 + [1] * 4
    assert len(w.unit_instances(3)) == 2  # 50 = 3 * 16 + 2
    assert w.layout.unit_chunks(3) == [(48, 50)]


def test_small_dataset_gets_smaller_units(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(n=5, chunk_samples=4, shard_chunks=8))
    assert w.meta.shard_chunks == 2 and w.layout.block_samples == 8


# ---- round trips -----------------------------------------------------------------------------


def test_fp16_round_trip_is_bit_exact(full_store):
    from store import StoreReader

    r = StoreReader.open(full_store)
    assert r.complete_mask().all() and r.is_complete()
    got = r.read_slots(0, r.layout.num_slots(2))
    for slot in range(len(got["slot"])):
        inst, view = r.layout.slot_instance(slot)
        assert got["instance"][slot] == inst
        if inst < 0:
            assert got["image_id"][slot] == -1
            continue
        ref = sample_outputs(inst, view)
        for name in ("heatmaps", "keypoint_tokens", "visual_tokens"):
            assert got[name].dtype == np.float16
            assert np.array_equal(
                got[name][slot].view(np.uint16), ref[name].astype(np.float16).view(np.uint16)
            )
        assert np.array_equal(got["keypoints"][slot], ref["keypoints"])
        assert np.array_equal(got["weights"][slot], ref["weights"])
        assert got["spec"][slot][0] == inst and got["spec"][slot][1] == view
        assert np.array_equal(got["spec"][slot][2:4], ref["center"])
        assert got["image_id"][slot] == inst * 10 + 1 and got["ann_id"][slot] == inst + 1000
        assert got["crop_digest"][slot].tobytes().hex() == f"{inst * 1000 + view:064x}"
        assert got["view"][slot] == view


@pytest.mark.parametrize("mode,hm_rel,tok_rel", [("lossy", 2.5e-2, 1e-2), ("lossy16", 1e-4, 1e-2)])
def test_lossy_round_trip_within_stated_error(tmp_path, mode, hm_rel, tok_rel):
    from store import StoreReader

    w = StoreWriter.create_or_open(tmp_path / "s", small_meta(mode=mode))
    fill(w)
    r = StoreReader.open(tmp_path / "s")
    got = r.read_slots(0, 50)  # view 0, all real slots
    ref = {
        k: np.stack([sample_outputs(int(i), 0)[k] for i in got["instance"]])
        for k in ("heatmaps", "keypoint_tokens", "visual_tokens")
    }

    def rel_rms(a, b):
        return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))

    assert got["heatmaps"].dtype == np.float32
    assert 0 < rel_rms(got["heatmaps"], ref["heatmaps"]) < hm_rel
    for name in ("keypoint_tokens", "visual_tokens"):
        assert 0 < rel_rms(got[name], ref[name]) < tok_rel
    # no peak moves: the argmax of every joint survives quantization
    flat_got = got["heatmaps"].reshape(50, K, -1).argmax(-1)
    flat_ref = ref["heatmaps"].reshape(50, K, -1).argmax(-1)
    assert np.array_equal(flat_got, flat_ref)


def test_quantizers_bound_the_error_per_step():
    rng = np.random.default_rng(0)
    hm = rng.random((20, K, HH, WH)).astype(np.float32)
    hm[0, 0] = 0.5  # a flat joint must not divide by zero
    hm[1, 1, 2, 3] = hm[1, 1, 2, 4] = hm[1, 1].max() + 0.1  # a tie at the peak keeps the first
    codes, scale = quantize_heatmaps(hm, 8)
    back = dequantize_heatmaps(codes, scale)
    assert np.all(np.abs(back - hm) <= scale[..., 1, None, None] * 1.0001)
    assert np.array_equal(back.reshape(20, K, -1).argmax(-1), hm.reshape(20, K, -1).argmax(-1))
    assert np.allclose(back[0, 0], 0.5)
    tok = rng.normal(size=(5, 7, D)).astype(np.float32)
    tok[0, 0] = 0
    c, s = quantize_tokens(tok)
    assert c.dtype == np.int8 and np.all(
        np.abs(dequantize_tokens(c, s) - tok) <= s[..., None] / 2 + 1e-7
    )


# ---- reading for training --------------------------------------------------------------------


def test_iter_batches_visits_each_sample_once_in_a_seeded_order(full_store):
    from store import StoreReader

    r = StoreReader.open(full_store)

    def epoch(e, **kw):
        return list(r.iter_batches(view=1, batch_size=12, seed=5, epoch=e, **kw))

    a, b, c = epoch(0), epoch(0), epoch(1)
    slots = np.concatenate([x["slot"] for x in a])
    assert sorted(r.layout.slot_instance(s)[0] for s in slots) == list(range(50))
    assert all(r.layout.slot_instance(s)[1] == 1 for s in slots)
    assert [len(x["slot"]) for x in a] == [12] * 4 + [2]
    assert all(np.array_equal(x["slot"], y["slot"]) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(slots, np.concatenate([x["slot"] for x in c]))
    # rows stay aligned: every field of a row belongs to that row's slot
    x = a[0]
    for i, s in enumerate(x["slot"]):
        inst, view = r.layout.slot_instance(int(s))
        assert x["instance"][i] == inst and x["spec"][i, 1] == view
        ref = sample_outputs(inst, view)["visual_tokens"].astype(np.float16)
        assert np.array_equal(x["visual_tokens"][i], ref)
    # part=(i, n) yields every n-th batch of the same order
    parts = [epoch(0, part=(i, 3), fields=("slot",)) for i in range(3)]
    merged = [parts[i % 3][i // 3]["slot"] for i in range(len(a))]
    assert all(np.array_equal(m, x["slot"]) for m, x in zip(merged, a, strict=True))
    # all views: both view blocks, drop_last gives whole batches only
    allv = list(r.iter_batches(None, 16, seed=0, epoch=0, drop_last=True, fields=("slot",)))
    assert all(len(x["slot"]) == 16 for x in allv) and len(allv) == 100 // 16


def test_geometry_round_trips_and_stores_of_the_older_metadata_form_derive_it(tmp_path):
    """StoreMeta keeps a Geometry as its fields; a store written before that field existed
    (input_size, heatmap_size, patch_grid, num_patches) reads with the same Geometry, and one
    whose sizes give none is refused with a schema message."""
    import json

    from store import StoreReader

    meta = small_meta(views=1)
    stored_form = {"input_size": [24, 32], "heatmap_size": [WH, HH], "patch_size": [3, 4]}
    assert meta.to_dict()["geometry"] == stored_form
    assert StoreMeta.from_dict(meta.to_dict()).geometry == meta.geometry
    assert json.loads(json.dumps(meta.to_dict())) == meta.to_dict()
    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, meta))
    doc = json.loads((path / "zarr.json").read_text())
    stored = doc["attributes"]["distilpose_store"]
    del stored["geometry"]
    stored.update(input_size=[24, 32], heatmap_size=[WH, HH], patch_grid=[2, 2], num_patches=4)
    stored["schema_version"] = 2  # that form predates schema 3, and its signatures
    del doc["attributes"]["distilpose_signature"]
    (path / "zarr.json").write_text(json.dumps(doc))
    r = StoreReader.open(path)
    assert r.meta.geometry == meta.geometry and r.meta.num_patches == P
    assert r.meta.patch_grid == (2, 2) and not r.meta.mismatches(meta)
    assert len(r.read_slots(0, 16)["slot"]) == 16
    heatmaps_only = {**stored, "patch_grid": [0, 0], "num_patches": 0, "token_dim": 0}
    heatmaps_only["teacher_outputs"] = ["heatmaps"]
    old = StoreMeta.from_dict(heatmaps_only)
    assert old.geometry.heatmap_size == (WH, HH) and old.num_patches == 0
    for bad, field in (({"patch_grid": [4, 3]}, "patch_grid"), ({"input_size": "x"}, "input_size")):
        (path / "zarr.json").write_text(json.dumps(doc | {"attributes": {
            **doc["attributes"], "distilpose_store": {**stored, **bad}}}))  # fmt: skip
        with pytest.raises(StoreFormatError, match=f"store metadata.*{field}"):
            StoreReader.open(path)


def test_schema_1_store_reads_as_without_pixels_and_takes_more_views(tmp_path):
    """Reader rule (store/schema.py): a schema-1 store predates pixels and reads as 'none'."""
    import json

    from store import StoreReader

    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(views=1)))
    doc = json.loads((path / "zarr.json").read_text())
    stored = doc["attributes"]["distilpose_store"]
    for key in ("pixels", "jpeg_quality", "targets_zstd"):
        del stored[key]  # the fields schema 2 added
    stored["schema_version"] = 1
    del doc["attributes"]["distilpose_signature"]  # schema 3's
    (path / "zarr.json").write_text(json.dumps(doc))
    r = StoreReader.open(path)
    assert r.meta.pixels == "none" and r.meta.schema_version == 1 and "pixels" not in r.specs
    assert len(r.read_slots(0, 16)["slot"]) == 16
    fill(StoreWriter.create_or_open(path, small_meta(views=2)))  # a dump adds a view to it
    assert StoreReader.open(path).is_complete()


def test_training_read_path_same_order_any_workers(full_store):
    """The one read path (what train-student uses): the same batches with 0 or 2 workers."""
    import torch
    from torch.utils.data import DataLoader

    from store import StoreReader
    from student_train.data import _StoreSource

    def slots(workers, epoch=0):
        src = _StoreSource(str(full_store), 1, 10, 1, epoch, ("slot", "heatmaps"), False, 5)
        batches = list(DataLoader(src, batch_size=None, num_workers=workers))
        assert isinstance(batches[0]["heatmaps"], torch.Tensor)
        return np.concatenate([np.asarray(b["slot"]) for b in batches])

    one, two = slots(0), slots(2)
    assert np.array_equal(one, two)  # the order depends on (seed, epoch), not on workers
    views = StoreReader.open(full_store).layout.slot_views(one)
    assert len(set(one.tolist())) == 50 and set(views.tolist()) == {1}  # view 1, each once
    assert not np.array_equal(one, slots(0, epoch=1))


@pytest.mark.reliability(
    case="incomplete store opened for training",
    outcome="StoreFormatError counting complete units, unless allow_incomplete",
)
def test_incomplete_store_refused_unless_asked(tmp_path):
    from store import StoreReader

    w = StoreWriter.create_or_open(tmp_path / "s", small_meta())
    fill(w, [0, 2, 5])
    r = StoreReader.open(tmp_path / "s")
    assert not r.is_complete()
    with pytest.raises(StoreFormatError, match="3 of 8 write units complete"):
        list(r.iter_batches())
    with pytest.raises(StoreFormatError, match="not complete"):
        r.read_slots(0, 40)
    got = np.concatenate([b["slot"] for b in r.iter_batches(allow_incomplete=True)])
    assert sorted(got.tolist()) == list(range(0, 16)) + list(range(32, 48)) + list(range(80, 96))
    mask = r.complete_mask()
    assert (
        mask.sum() == 48
        and mask[0, w.unit_instances(2)].all()
        and mask[1, w.unit_instances(5)].all()
    )


@pytest.mark.reliability(
    case="store check of a student's token dim, heatmap, patch or input size",
    outcome="StoreMismatchError naming the size",
)
def test_check_student_fits_sizes(full_store):
    from distilpose.models.layers import ModelConfig
    from store import StoreReader

    r = StoreReader.open(full_store)
    fit = ModelConfig(
        name="s",
        input_size=(24, 32),
        heatmap_size=(WH, HH),
        patch_size=(3, 4),
        dim=D,
        num_keypoints=K,
    )
    r.check_student(fit)
    r.check_student(fit.to_dict())
    wider = ModelConfig(**{**fit.to_dict(), "dim": 16})
    with pytest.raises(StoreMismatchError, match="token dim"):
        r.check_student(wider)
    r.check_student(ModelConfig(**{**fit.to_dict(), "dim": 16, "teacher_dim": D}))
    with pytest.raises(StoreMismatchError, match="heatmap_size"):
        r.check_student(ModelConfig(**{**fit.to_dict(), "heatmap_size": (12, 16)}))
    with pytest.raises(StoreMismatchError, match="patch"):
        r.check_student(ModelConfig(**{**fit.to_dict(), "patch_size": (3, 2)}))
    with pytest.raises(StoreMismatchError, match="input_size"):
        r.check_student(ModelConfig(**{**fit.to_dict(), "input_size": (48, 64)}))
    # a dict without a size is refused, not completed from ModelConfig's defaults (issue 24)
    partial = {k: v for k, v in fit.to_dict().items() if k != "heatmap_size"}
    with pytest.raises(StoreMismatchError, match="student config lacks heatmap_size"):
        r.check_student(partial)


# ---- writers ---------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="store reopened with another setting",
    outcome="StoreMismatchError naming the field",
)
@pytest.mark.parametrize(
    "change,field",
    [
        ({"teacher_sha256": "b" * 64}, "teacher_sha256"),
        ({"seed": 4}, "seed"),
        ({"ann_digest": "0" * 64}, "ann_digest"),
        ({"geometry": Geometry((24, 32), (12, 16))}, "heatmap_size"),
        ({"mode": "lossy"}, "mode"),
    ],
    ids=["teacher_sha256", "seed", "ann_digest", "heatmap_size", "mode"],
)
def test_reopening_with_other_settings_is_refused(full_store, change, field):
    with pytest.raises(StoreMismatchError, match=field):
        StoreWriter.create_or_open(full_store, small_meta(**change))


@pytest.mark.reliability(
    case="store unit written with a wrong shape, spec or missing array",
    outcome="StoreFormatError naming the array; nothing marked complete",
)
def test_write_unit_checks_its_input(tmp_path):
    w = StoreWriter.create_or_open(tmp_path / "s", small_meta())
    good = unit_arrays(w, 1)
    with pytest.raises(StoreFormatError, match="'heatmaps' has shape"):
        w.write_unit(1, {**good, "heatmaps": good["heatmaps"][:, :, :4]})
    spec = good["spec"].copy()
    spec[2, 0] += 1
    with pytest.raises(StoreFormatError, match=r"slot 18 'spec' names instance"):
        w.write_unit(1, {**good, "spec": spec})
    with pytest.raises(StoreFormatError, match="lacks arrays"):
        w.write_unit(1, {k: v for k, v in good.items() if k != "weights"})
    assert w.pending_units() == list(range(8))
    import torch

    w.write_unit(
        1, {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in good.items()}
    )
    assert 1 in w.complete_units()


def test_adding_views_appends_without_touching_old_units(tmp_path):
    from store import StoreReader

    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(views=1)))
    before = {p: (os.stat(path / p).st_mtime_ns, b) for p, b in tree(path).items()}
    data_before = StoreReader.open(path).read_slots(0, 64)
    w = StoreWriter.create_or_open(path, small_meta(views=3))
    assert w.meta.views == 3 and w.pending_units() == list(range(4, 12))
    fill(w)
    after = tree(path)
    for p, (mtime, data) in before.items():
        # shards and markers of view 0 (the list of signed units grows)
        if "/c/" in p or p.startswith("complete/u"):
            assert after[p] == data and os.stat(path / p).st_mtime_ns == mtime, p
    r = StoreReader.open(path)
    assert r.meta.views == 3 and r.is_complete()
    again = r.read_slots(0, 64)
    assert all(np.array_equal(again[k], data_before[k]) for k in data_before)
    # asking for fewer views later neither shrinks the store nor plans their units
    w1 = StoreWriter.create_or_open(path, small_meta(views=1))
    assert w1.meta.views == 3 and w1.units() == [0, 1, 2, 3]
    # and the result equals a store written with 3 views at once
    ref = tmp_path / "ref"
    fill(StoreWriter.create_or_open(ref, small_meta(views=3)))
    ref_tree = tree(ref)
    assert {k: v for k, v in tree(path).items() if k != "zarr.json"} == {
        k: v for k, v in ref_tree.items() if k != "zarr.json"
    }


def _writer_main(path: str, views: int, i: int, n: int) -> None:
    w = StoreWriter.create_or_open(path, small_meta(views=views))
    fill(w, w.pending_units(shard=(i, n)))


def test_two_writer_processes_on_disjoint_shards_equal_one(tmp_path):
    ref = tmp_path / "one"
    fill(StoreWriter.create_or_open(ref, small_meta(views=3)))
    two = tmp_path / "two"
    env = {**os.environ, "DISTILPOSE_NO_PROGRESS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, "write", str(two), "3", str(i), "2"], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert tree(two) == tree(ref)


# ---- other filesystems -----------------------------------------------------------------------


def test_fsspec_urls_read_like_local_paths(full_store):
    from store import StoreReader
    from student_train.data import _StoreSource

    local = StoreReader.open(full_store)
    url = StoreReader.open(f"file://{full_store}")
    assert not url.location.is_local
    assert np.array_equal(url.complete_units(), local.complete_units())
    a, b = local.read_slots(0, 64), url.read_slots(0, 64)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # a store written to and read from an in-memory fsspec filesystem
    mem = "memory://distilpose-test-store"
    fill(StoreWriter.create_or_open(mem, small_meta(views=1)))
    r = StoreReader.open(mem)
    assert r.is_complete() and r.location.list_markers() == [0, 1, 2, 3]
    got = np.concatenate([x["slot"] for x in _StoreSource(mem, 0, 16, 0, 0, ("slot",), False, 4)])
    assert sorted(got.tolist()) == list(range(50))
    m = r.read_slots(0, 64)
    assert all(np.array_equal(m[k], a[k]) for k in a)  # same bytes as the local store's view 0


# ---- checks ----------------------------------------------------------------------------------


def test_store_info_reports_completeness_size_and_confidence(tmp_path):
    from store import store_info

    w = StoreWriter.create_or_open(tmp_path / "s", small_meta())
    fill(w, range(4))  # view 0 only
    info = store_info(tmp_path / "s")
    assert info["samples_complete"] == 50 and info["samples"] == 100 and not info["complete"]
    assert info["views_complete"] == [0] and info["units_complete"] == 4
    assert info["bytes_on_disk"] > 0 and info["bytes_per_sample"] == info["bytes_on_disk"] / 50
    assert info["compression_ratio"] > 0.5
    assert info["nonfinite_total"] == 0
    peaks = np.stack([sample_outputs(int(i), 0)["heatmaps"].max((1, 2)) for i in range(50)]).astype(
        np.float16
    )
    assert np.allclose(info["confidence"]["mean"], peaks.astype(np.float64).mean(0), atol=1e-3)
    assert len(info["confidence"]["p95"]) == K


def test_store_verify_rerenders_crops(tmp_path):
    from distilpose.data import (
        AugmentRecipe,
        annotation_digest,
        crop_digest,
        load_coco_instances,
        read_image,
        render_crop,
        sample_crop_spec,
    )
    from store import store_verify

    data = ROOT / "tests" / "data" / "coco_mini"
    ann, images = data / "annotations" / "person_keypoints.json", data / "images"
    insts = load_coco_instances(ann, images, train=True, aspect_ratio=96 / 128)
    meta = small_meta(
        n=len(insts),
        views=2,
        geometry=Geometry((96, 128), (WH, HH), (WH // 2, HH // 2)),
        ann_file=str(ann),
        image_root=str(images),
        ann_digest=annotation_digest(ann),
        chunk_samples=4,
        num_keypoints=17,
    )
    w = StoreWriter.create_or_open(tmp_path / "s", meta)
    recipe, size = AugmentRecipe(), (96, 128)
    for u in w.pending_units():
        view, idx = w.unit_view(u), w.unit_instances(u)
        specs = [sample_crop_spec(insts[i], recipe, 3, view, size) for i in idx]
        crops = [
            render_crop(read_image(insts[i].image_path), s, insts[i].keypoints, size)
            for i, s in zip(idx, specs, strict=True)
        ]
        n = len(idx)
        digests = [crop_digest(c.image) for c in crops]
        if u == w.pending_units()[-1]:
            digests[0] = bytes(32)  # one tampered digest
        w.write_unit(
            u,
            {
                "spec": np.stack([s.to_array() for s in specs]),
                "image_id": np.array([insts[i].image_id for i in idx]),
                "ann_id": np.array([insts[i].ann_id for i in idx]),
                "keypoints": np.stack([c.keypoints for c in crops]),
                "weights": np.stack([c.weights for c in crops]),
                "crop_digest": digests,
                "heatmaps": np.zeros((n, 17, HH, WH), np.float32),
                "keypoint_tokens": np.zeros((n, 17, D), np.float32),
                "visual_tokens": np.zeros((n, P, D), np.float32),
            },
        )
    res = store_verify(tmp_path / "s")
    assert res["checked"] == 2 * len(insts) and res["mismatched"] == 1
    assert res["ok"] == res["checked"] - 1 and res["keypoints_mismatched"] == 0
    assert len(res["mismatched_slots"]) == 1
    part = store_verify(tmp_path / "s", sample=5)
    assert part["checked"] == 5 and part["ok"] + part["mismatched"] == 5


if __name__ == "__main__":
    if sys.argv[1] == "write":
        _writer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
