"""The compact modes (store/compact.py): the codecs both ways, their error bounds, a compact
store written, read, checked and trained from with no extra flag, and older stores still read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_store import D, K, P, fill, sample_outputs, small_meta, tree

from distilpose.data.codecs import HeatmapCodec
from distilpose.errors import StoreCorruptError, StoreFormatError
from distilpose.geometry import PAPER
from store import StoreReader, StoreWriter
from store.compact import HeatmapWindows, TokenBasis
from store.schema import (
    COMPACT,
    COMPACT_LAYOUT,
    DEFAULT_COMPACT,
    SCHEMA_VERSION,
    StoreMeta,
    dump_mode,
)

TOKENS = ("keypoint_tokens", "visual_tokens")


def teacher_like_heatmaps(n: int = 6, seed: int = 0, noise: float = 2e-3) -> np.ndarray:
    """[n, 17, 64, 48]: the MSRA Gaussian (sigma 2) of random joints; with noise, a second
    weaker peak and a noise floor, as a teacher's heatmaps look."""
    rng = np.random.default_rng(seed)
    codec = HeatmapCodec(PAPER)
    w, h = PAPER.input_size
    maps = []
    for _ in range(n):
        kp = rng.uniform([0, 0], [w, h], (17, 2))
        main, _ = codec.encode(kp, np.ones(17))
        other, _ = codec.encode(rng.uniform([0, 0], [w, h], (17, 2)), np.ones(17))
        maps.append(main * rng.uniform(0.4, 1.0, (17, 1, 1)) + 0.2 * other * (noise > 0))
    return (np.stack(maps) + rng.normal(0, noise, (n, 17, 64, 48))).astype(np.float32)


def fit_from_samples(samples):
    """The `fit` of the small test stores: the tokens sample_outputs gives those slots."""
    outs = [sample_outputs(i, v) for _, i, v in samples]
    return {o: np.stack([x[o] for x in outs]) for o in TOKENS}


def test_heatmap_windows_round_trip_both_ways():
    """keypoints -> heatmaps -> windows -> heatmaps -> keypoints: the keypoints the full maps
    decode to (on a teacher-like map, the quarter-pixel step may flip where the two neighbours
    differ by less than a code step); and the codes are a fixed point (decode, then encode)."""
    keypoints = HeatmapCodec(PAPER)
    codec = HeatmapWindows(11)
    for noise in (0.0, 2e-3):
        hm = teacher_like_heatmaps(noise=noise)
        codes, params = codec.encode(hm)
        assert codes.shape == (6, 17, 11, 11) and codes.dtype == np.uint8
        back = codec.decode(codes, params, PAPER.heatmap_size)
        assert back.shape == hm.shape
        moved = np.abs(keypoints.decode(back)[0] - keypoints.decode(hm)[0])
        assert moved.max() <= (0.25 * PAPER.stride[0] if noise else 0.0)
        again, params2 = codec.encode(back)
        assert np.array_equal(again, codes)
        np.testing.assert_allclose(params2, params, rtol=1e-5, atol=1e-7)


def test_heatmap_window_error_bound():
    """Inside the window: within half a code step; outside: the mean it replaces, so the total
    mass is kept; the argmax pixel never moves (also at the map's borders)."""
    hm = teacher_like_heatmaps(seed=1)
    hm[0, 0] = 0.0
    hm[0, 0, 0, 0] = 1.0  # a peak in the corner: the window is shifted inside the map
    codec = HeatmapWindows(9)
    codes, params = codec.encode(hm)
    back = codec.decode(codes, params, PAPER.heatmap_size)
    x0, y0, step = params[..., 0].astype(int), params[..., 1].astype(int), params[..., 3]
    assert x0[0, 0] == 0 and y0[0, 0] == 0
    for s, k in np.ndindex(*hm.shape[:2]):
        window = (slice(y0[s, k], y0[s, k] + 9), slice(x0[s, k], x0[s, k] + 9))
        err = np.abs(back[s, k][window] - hm[s, k][window])
        assert err.max() <= step[s, k] / 2 + 1e-6
        outside = np.ones(hm.shape[2:], bool)
        outside[window] = False
        assert np.allclose(back[s, k][outside], hm[s, k][outside].mean(), atol=1e-7)
    np.testing.assert_allclose(back.sum((2, 3)), hm.sum((2, 3)), rtol=1e-3, atol=1e-3)
    flat = (6, 17, -1)
    assert np.array_equal(back.reshape(flat).argmax(-1), hm.reshape(flat).argmax(-1))


def test_heatmap_grid_round_trip_and_error_bound():
    """With a grid: the window as without one, every outside pixel its cell's mean over the
    pixels outside the window (within half a grid code step), the argmax pixel never moves
    (also where a cell's mean ties the peak), the codes a fixed point; and the sh-relevant
    error is smaller than the single mean's on a teacher-like map."""
    hm = teacher_like_heatmaps(seed=2)
    hm[1, 2] = 0.5  # a flat map: every cell's mean ties the peak
    codec, plain = HeatmapWindows(9, (8, 6)), HeatmapWindows(9)
    codes, params = codec.encode(hm)
    assert codes.shape == (6, 17, 81 + 48) and params.shape == (6, 17, 7)
    back = codec.decode(codes, params, PAPER.heatmap_size)
    x0, y0, step = params[..., 0].astype(int), params[..., 1].astype(int), params[..., 3]
    cell = (np.arange(64)[:, None] * 8 // 64) * 6 + np.arange(48)[None, :] * 6 // 48  # [H, W]
    for s, k in np.ndindex(*hm.shape[:2]):
        window = (slice(y0[s, k], y0[s, k] + 9), slice(x0[s, k], x0[s, k] + 9))
        assert np.abs(back[s, k][window] - hm[s, k][window]).max() <= step[s, k] / 2 + 1e-6
        outside = np.ones(hm.shape[2:], bool)
        outside[window] = False
        for c in np.unique(cell[outside]):
            where = outside & (cell == c)
            err = np.abs(back[s, k][where] - hm[s, k][where].mean())
            assert err.max() <= params[s, k, 6] / 2 + 1e-6 or (s, k) == (1, 2)
    flat = (6, 17, -1)
    assert np.array_equal(back.reshape(flat).argmax(-1), hm.reshape(flat).argmax(-1))
    again, params2 = codec.encode(back)
    assert np.array_equal(again[..., :81], codes[..., :81])
    moved = np.abs(again.astype(int) - codes)  # cells: the means of decoded means
    moved[1, 2] = 0  # (the flat map's cells were lowered below its peak: a new code range)
    assert moved.max() <= 1
    single = plain.decode(*plain.encode(hm), PAPER.heatmap_size)
    assert np.linalg.norm(back - hm) < 0.8 * np.linalg.norm(single - hm)


def test_compact_is_the_default_setting_for_a_new_store_and_a_store_keeps_its_own():
    """`--mode compact`: DEFAULT_COMPACT for a new store; a store of the old `compact`
    (window 11, rank 16; schema 3-4) or of the default keeps its own; other modes as asked
    (a compact store of another setting is then refused as made with other settings)."""
    assert dump_mode("compact", None) == DEFAULT_COMPACT
    assert dump_mode("compact", "compact") == "compact"
    assert dump_mode("compact", DEFAULT_COMPACT) == DEFAULT_COMPACT
    assert dump_mode("compact", "compact-s") == DEFAULT_COMPACT
    assert dump_mode("compact-m", None) == "compact-m" and dump_mode("fp16", "compact") == "fp16"
    assert COMPACT["compact-m"] == COMPACT["compact"] == (11, 16, (0, 0))


def test_grid_mode_needs_schema_5(tmp_path):
    """A store whose metadata names a mode of schema 5 (a grid, or compact-m) with an older
    schema version is refused; the command line offers every compact mode."""
    from cli_support import StoreMode

    assert set(COMPACT) <= {m.value for m in StoreMode}
    meta = small_meta(mode="compact-hq").to_dict()
    assert StoreMeta.from_dict(meta).compact().grid == (8, 6)
    for mode in ("compact-hq", "compact-m"):
        with pytest.raises(StoreFormatError, match="since schema 5"):
            StoreMeta.from_dict({**meta, "mode": mode, "schema_version": 4}, "s")
    assert StoreMeta.from_dict({**meta, "mode": "compact", "schema_version": 4}).compact() == (
        6, 8, (0, 0)  # window 11 and rank 16, clipped to the small store's sizes
    )  # fmt: skip


def test_token_basis_round_trip_and_error_bound():
    """Tokens in a rank-r subspace (plus a mean per position) come back within half a step per
    coefficient; the codes are a fixed point; any other token's error is the part outside the
    basis plus that quantization bound."""
    rng = np.random.default_rng(0)
    t, d, r = 5, 16, 4
    mean = rng.normal(0, 3, (t, d))
    directions = np.linalg.qr(rng.normal(size=(d, r)))[0].T  # [r, d] orthonormal
    tokens = (mean + rng.normal(0, 1, (200, t, r)) @ directions).astype(np.float32)
    basis = TokenBasis.fit(tokens[:100], r)
    np.testing.assert_allclose(basis.basis @ basis.basis.T, np.eye(r), atol=1e-5)
    codes, scale = basis.encode(tokens[100:])
    assert codes.dtype == np.int8 and scale.dtype == np.float16
    back = basis.decode(codes, scale)
    bound = np.sqrt(r) * scale.astype(np.float32) / 2  # [n, T]: half a step per coefficient
    assert (np.linalg.norm(back - tokens[100:], axis=-1) <= bound + 1e-4).all()
    assert np.array_equal(basis.encode(back)[0], codes)
    other = rng.normal(0, 1, (10, t, d)).astype(np.float32)  # mostly outside the basis
    codes, scale = basis.encode(other)
    residual = other - basis.mean
    outside = residual - residual @ basis.basis.T @ basis.basis
    err = np.linalg.norm(basis.decode(codes, scale) - other, axis=-1)
    bound = np.linalg.norm(outside, axis=-1) + np.sqrt(r) * scale.astype(np.float32) / 2
    assert (err <= bound + 1e-4).all()
    same = TokenBasis.from_array(basis.to_array(), t)
    assert np.array_equal(same.basis, basis.basis) and np.array_equal(same.mean, basis.mean)


def test_fp16_token_scale_never_clips():
    """The float16 scale is rounded up: the largest coefficient stays within +-127 codes."""
    x = np.array([[[1.0009765625 * 127, -3.0, 0.0]]], np.float32)  # rounds down in float16
    from store.quantize import dequantize_tokens, quantize_tokens

    codes, scale = quantize_tokens(x, np.float16)
    back = dequantize_tokens(codes, scale.astype(np.float32))
    assert np.abs(back - x).max() <= float(scale[0, 0]) / 2 + 1e-6


@pytest.mark.parametrize("mode", list(COMPACT))
def test_compact_store_round_trip(tmp_path, mode):
    """Written through StoreWriter, read through StoreReader as full arrays; bases stored once,
    never refitted when a store is reopened (more views); bytes per view in store_info."""
    from store.checks import store_info

    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(mode=mode, views=1), fit=fit_from_samples))

    def no_refit(samples):
        raise AssertionError("bases refitted")

    fill(StoreWriter.create_or_open(path, small_meta(mode=mode, views=2), fit=no_refit))
    r = StoreReader.open(path)
    assert r.meta.schema_version == SCHEMA_VERSION >= 3 and len(r.meta.basis_sha256) == 64
    got = r.read_slots(0, 50)
    ref = {o: np.stack([sample_outputs(int(i), 0)[o] for i in got["instance"]]) for o in TOKENS}
    assert got["heatmaps"].shape == (50, K, 8, 6) and got["visual_tokens"].shape == (50, P, D)
    for o in TOKENS:  # rank 8 = D here: only the int8 step is lost
        assert np.abs(got[o] - ref[o]).max() < 0.05
    info = store_info(path)
    assert info["target_bytes_per_view"] > 0 and info["pixel_bytes_per_view"] == 0
    assert info["bytes_once"] > 0 and info["nonfinite_total"] == 0


@pytest.mark.parametrize("mode", ["compact", "compact-hq"])
def test_training_batches_decode_like_whole_chunks(tmp_path, mode):
    """iter_batches decodes a compact store's codes per batch, after the gather (run_plan);
    every batch equals the same slots read and decoded a chunk at a time (with a grid too)."""
    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(mode=mode), fit=fit_from_samples))
    r = StoreReader.open(path)
    fields = ("slot", "heatmaps", *TOKENS)
    whole = {k: np.concatenate([r.read_chunk(a, b, fields)[k] for a, b in r.chunks()])
             for k in fields}  # fmt: skip
    row = {int(s): i for i, s in enumerate(whole["slot"])}
    seen = 0
    for batch in r.iter_batches(batch_size=7, seed=3, fields=fields):
        assert not any(k.endswith("_scale") for k in batch)
        rows = [row[int(s)] for s in batch["slot"]]
        for k in ("heatmaps", *TOKENS):
            assert batch[k].dtype == np.float32
            np.testing.assert_array_equal(batch[k], whole[k][rows])
        seen += len(rows)
    assert seen == len(whole["slot"])


def test_compact_unit_rewritten_after_a_loss_is_byte_identical(tmp_path):
    """A unit lost (marker and shards gone) and rewritten by a rerun gives the same bytes: its
    codes depend only on its samples and the stored bases, which a rerun reads, never refits."""
    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(mode="compact"), fit=fit_from_samples))
    before = tree(path)
    writer = StoreWriter.create_or_open(path, small_meta(mode="compact"))
    for name in writer.arrays:
        (path / writer.shard_key(name, 1)).unlink(missing_ok=True)
    (path / "complete" / "u0000001.json").unlink()
    fill(StoreWriter.create_or_open(path, small_meta(mode="compact")))
    assert tree(path) == before


def test_heatmap_only_compact_store_needs_no_bases(tmp_path):
    """A teacher without tokens (SimpleBaseline): windows only, nothing to fit, nothing once."""
    meta = small_meta(mode="compact", teacher_outputs=("heatmaps",))
    fill(StoreWriter.create_or_open(tmp_path / "s", meta))
    r = StoreReader.open(tmp_path / "s")
    assert r.bases == {} and r.meta.basis_sha256 == "" and "visual_tokens" not in r.specs
    assert r.read_slots(0, 50)["heatmaps"].shape == (50, K, 8, 6)


def test_compact_store_refuses_bad_bases(tmp_path):
    """A basis that is missing, deleted or edited fails at open, naming it; a compact store
    cannot be created without the teacher's tokens to fit on."""
    with pytest.raises(StoreFormatError, match="fitted on the teacher"):
        StoreWriter.create_or_open(tmp_path / "nofit", small_meta(mode="compact"))
    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(mode="compact"), fit=fit_from_samples))
    chunk = next(p for p in (path / "visual_tokens_basis" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="visual_tokens_basis"):
        StoreReader.open(path)
    chunk.unlink()  # zarr would read zeros: the digest refuses them
    with pytest.raises(StoreCorruptError, match="differ from the digest"):
        StoreReader.open(path)
    shutil.rmtree(path / "visual_tokens_basis")
    with pytest.raises(StoreCorruptError, match="missing"):
        StoreReader.open(path)


def test_schema_2_store_still_reads(tmp_path):
    """Reader rule (store/schema.py): a schema-2 store (no basis_sha256) reads as before."""
    path = tmp_path / "s"
    fill(StoreWriter.create_or_open(path, small_meta(mode="lossy", views=1)))
    doc = json.loads((path / "zarr.json").read_text())
    stored = doc["attributes"]["distilpose_store"]
    del stored["basis_sha256"]
    stored["schema_version"] = 2
    del doc["attributes"]["distilpose_signature"]  # schema 3's
    (path / "zarr.json").write_text(json.dumps(doc))
    r = StoreReader.open(path)
    assert r.meta.schema_version == 2 and r.read_slots(0, 50)["heatmaps"].shape == (50, K, 8, 6)


def test_dump_and_train_student_on_a_compact_store(tmp_path):
    """dump-teacher --mode compact (the shipped demo teacher over real COCO people), then
    train-student with the default losses and no flag: it reads the decoded targets."""
    from pathlib import Path

    from test_cli_pipeline import invoke, last_json

    from distilpose.weights import demo_teacher_path

    data = Path(__file__).parent / "data" / "coco_mini"
    stores = {}
    for mode in ("fp16", "compact"):
        stores[mode] = tmp_path / mode
        invoke(
            "dump-teacher", "--teacher", demo_teacher_path(),
            "--ann", data / "annotations" / "person_keypoints.json",
            "--images", data / "images", "--out", stores[mode], "--mode", mode,
            "--workers", 0, "--device", "cpu", "--batch-size", 4,
        )  # fmt: skip
    infos = {m: json.loads(invoke("store-info", s, "--json")) for m, s in stores.items()}
    assert infos["compact"]["complete"] and infos["compact"]["mode"] == DEFAULT_COMPACT
    small, full = (infos[m]["target_bytes_per_view"] for m in ("compact", "fp16"))
    assert 0 < small < full / 3
    # `--mode compact` again: the store's own setting, the dump resumes (nothing to do)
    again = invoke(
        "dump-teacher", "--teacher", demo_teacher_path(),
        "--ann", data / "annotations" / "person_keypoints.json",
        "--images", data / "images", "--out", stores["compact"], "--mode", "compact",
        "--workers", 0, "--device", "cpu", "--batch-size", 4,
    )  # fmt: skip
    assert "0 samples" in again
    # the same crops; only the chunk layout differs (a compact store's chunks hold 256 slots:
    # here 12 people and the padding slots' 4-byte lengths in the pixels array)
    pixels = {m: infos[m]["pixel_bytes_per_view"] for m in infos}
    assert pixels["compact"] == pytest.approx(pixels["fp16"], rel=0.01)
    assert StoreReader.open(stores["compact"]).meta.chunk_samples == COMPACT_LAYOUT[0]
    assert last_json(invoke("store-verify", stores["compact"]))["ok_all"]
    fp16 = StoreReader.open(stores["fp16"]).read_slots(0, 8)
    got = StoreReader.open(stores["compact"]).read_slots(0, 8)
    flat = (8, 17, -1)
    assert np.array_equal(
        got["heatmaps"].reshape(flat).argmax(-1), fp16["heatmaps"].reshape(flat).argmax(-1)
    )
    run = tmp_path / "student"
    invoke(
        "train-student", "--store", stores["compact"], "--model", "distilpose_demo",
        "--out", run, "--epochs", 1, "--batch-size", 4, "--workers", 0, "--device", "cpu",
    )  # fmt: skip
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert {"loss_kt", "loss_vt", "loss_sh", "loss_cs"} <= set(header)
    row = dict(zip(header, lines[-1].split(","), strict=True))
    assert all(np.isfinite(float(row[c])) for c in ("loss_kt", "loss_vt", "loss_sh", "loss_cs"))


def test_docs_table_is_the_benchmark_record():
    """docs/store.md shows benchmarks/results/compact_bench.json as compact_bench writes it."""
    from benchmarks import compact_bench

    record = json.loads(compact_bench.RECORD.read_text())
    assert compact_bench.docs_block(record) in compact_bench.DOCS.read_text()
    assert record["settings"] == compact_bench.settings_record()
