"""Crop pixels in the store: codecs, schema rule, what the teacher saw, training without images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import cli
from distilpose.data import (
    AugmentRecipe,
    crop_digest,
    load_coco_instances,
    make_demo_data,
    normalize,
    read_image,
    render_crop,
    sample_crop_spec,
)
from distilpose.errors import BadConfigError, StoreFormatError
from distilpose.models import build_from_checkpoint, build_model, save_checkpoint
from distilpose.training.runs import DumpRun
from store import SCHEMA_VERSION, StoreMeta, StoreReader, StoreWriter, store_info, store_verify
from store.checks import format_store_info
from store.pixels import decode_crop, decode_rgb_batch, encode_crop
from store.schema import rows_crc32c
from store.writer import accept_metadata
from student_train.data import OnDevice, StudentBatches, decode_on_device
from teacher_dump.dump import dump_teacher

COCO = Path(__file__).parent / "data" / "coco_mini"
SIZE = (96, 128)  # the tiny models' crop
DUMP = dict(views=2, seed=1, batch_size=4, workers=0, device="cpu", chunk_samples=8, shard_chunks=1)


def coco_crops(n_views: int = 2) -> list[np.ndarray]:
    ann = COCO / "annotations" / "person_keypoints.json"
    insts = load_coco_instances(ann, COCO / "images", train=True)
    return [
        render_crop(
            read_image(i.image_path), sample_crop_spec(i, AugmentRecipe(), 0, v, SIZE), i.keypoints,
            SIZE,
        ).image
        for v in range(n_views)
        for i in insts
    ]  # fmt: skip


def test_codecs_round_trip_on_real_coco_crops():
    crops = coco_crops()
    for crop in crops[:6]:
        assert np.array_equal(decode_crop(encode_crop(crop, "lossless"), "lossless", SIZE), crop)
        jpeg = decode_crop(encode_crop(crop, "jpeg", 95), "jpeg", SIZE)
        assert jpeg.shape == crop.shape and np.abs(jpeg.astype(int) - crop).mean() < 3
        assert not np.array_equal(jpeg, crop)  # lossy, hence the teacher sees the decoded crop
    for fmt in ("jpeg", "lossless"):  # the batch decoder (RGB [B, 3, H, W]) = the reference
        datas = [encode_crop(c, fmt) for c in crops[:5]]
        rgb = decode_rgb_batch(datas, fmt, SIZE)
        ref = np.stack([decode_crop(d, fmt, SIZE) for d in datas])
        assert rgb.dtype == torch.uint8 and rgb.shape == (5, 3, SIZE[1], SIZE[0])
        assert np.array_equal(rgb.permute(0, 2, 3, 1).flip(-1).numpy(), ref)
    with pytest.raises(ValueError, match="does not decode"):
        decode_crop(b"not a jpeg", "jpeg", SIZE)


def test_schema_1_stores_read_as_without_pixels():
    base = dict(teacher_name="t", teacher_sha256="a" * 64, num_instances=3)
    old = StoreMeta.from_dict({**base, "schema_version": 1, "pixels": "jpeg"})
    assert old.pixels == "none" and old.jpeg_quality == 0
    new = StoreMeta.from_dict({**base, "schema_version": 2, "pixels": "jpeg"})
    assert new.pixels == "jpeg" and new.jpeg_quality == 95
    assert StoreMeta(**base, pixels="lossless", jpeg_quality=80).jpeg_quality == 0
    with pytest.raises(StoreFormatError, match="pixels"):
        StoreMeta(**base, pixels="png")
    diff = StoreMeta(**base, pixels="jpeg").mismatches(StoreMeta(**base))
    assert diff and diff[0].startswith("pixels:")


@pytest.fixture(scope="module")
def dumped(tmp_path_factory) -> dict:
    """Demo data and a random tiny teacher dumped with the default pixels (JPEG)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pixels")
    data = make_demo_data(root / "data", num_train=16, num_val=6, seed=2)
    torch.manual_seed(0)
    ckpt = root / "teacher.pth"
    save_checkpoint(ckpt, build_model("tokenpose_tiny"), meta={"role": "teacher"})
    summary = dump_teacher(
        DumpRun(ckpt, data["train_ann"], data["train_images"], root / "store", **DUMP)
    )
    assert summary["pixels"] == "jpeg" and summary["skipped"] == 0
    return {**data, "root": root, "teacher": ckpt, "store": root / "store"}


def test_stored_pixels_and_targets_are_what_the_teacher_saw(dumped):
    reader = StoreReader.open(dumped["store"])
    m = reader.meta
    assert m.pixels == "jpeg" and m.jpeg_quality == 95 and m.schema_version == SCHEMA_VERSION
    assert m.pixel_decoder == "opencv"  # the digest is of the dump's decoder's pixels
    x = reader.read_slots(0, reader.layout.num_slots(m.views))
    real = np.flatnonzero(x["instance"] >= 0)
    assert len(real) == 2 * m.num_instances
    pixels = reader.read_chunk(0, reader.layout.num_slots(m.views), ("pixels",))["pixels"]
    seen = np.stack([decode_crop(pixels[s], "jpeg", SIZE) for s in real])
    # the digest proves the pixels ...
    assert [crop_digest(c) for c in seen] == [x["crop_digest"][s].tobytes() for s in real]
    # ... and the stored targets are the teacher's outputs on exactly those pixels
    teacher, _ = build_from_checkpoint(dumped["teacher"])
    with torch.no_grad():
        out = teacher.eval()(normalize(seen))
    for name in ("heatmaps", "keypoint_tokens", "visual_tokens"):
        np.testing.assert_allclose(
            x[name][real].astype(np.float32), getattr(out, name).numpy(), atol=3e-3, rtol=1e-2
        )
    info = store_info(dumped["store"])
    assert info["pixels"] == "jpeg" and 1e3 < info["pixel_bytes_per_sample"] < 30e3
    assert info["pixel_bytes"] < info["bytes_on_disk"]
    assert "pixels           jpeg quality 95" in format_store_info(info)


def test_store_verify_decodes_crops_and_catches_a_swapped_one(dumped, tmp_path):
    good = store_verify(dumped["store"], sample=10)
    assert good["crops"] == "decoded" and good["ok"] == good["checked"] == 10
    bad = tmp_path / "store"
    shutil.copytree(dumped["store"], bad)
    arr = zarr.open_array(str(bad / "pixels"), mode="r+")
    first = arr[0:8]  # one whole chunk: swap two crops
    first[0], first[1] = first[1], first[0]
    arr[0:8] = first
    result = store_verify(bad)  # the chunk holds other rows than its unit's marker recorded
    assert not result["ok_all"] and "array 'pixels' chunk 0" in result["problems"][-1]
    # ... and with a marker made to agree (and signed), the crops' digests still tell
    w = StoreWriter.create_or_open(bad, StoreReader.open(bad).meta)
    marker = w.location.read_marker(0)
    marker["chunk_crc32c"]["pixels"][0] = rows_crc32c(arr[0:8])
    w.location.write_marker(0, {**marker, "manifest": w.manifest(0)})
    accept_metadata(bad)
    result = store_verify(bad)
    assert result["mismatched"] == 2 and result["mismatched_slots"] == [0, 1]
    out = CliRunner().invoke(cli.app, ["store-verify", str(bad)])
    assert out.exit_code == 1


def test_train_student_and_ablate_from_the_store_alone(dumped, tmp_path):
    """The Done-when of the issue: no image folder, no annotation file, only the store."""
    root = tmp_path / "moved"
    store = root / "store"
    shutil.copytree(dumped["store"], store)
    train_dir = Path(dumped["train_images"]).parent
    gone = tmp_path / "gone"
    shutil.move(str(train_dir), str(gone))  # train images and
    shutil.move(str(dumped["train_ann"]), str(gone / "ann.json"))  # annotations gone
    try:
        run = CliRunner().invoke(
            cli.app,
            [
                "train-student", "--store", str(store), "--out", str(root / "student"),
                "--model", "distilpose_tiny", "--epochs", "1", "--batch-size", "8",
                "--workers", "0", "--device", "cpu", "--warmup-iters", "1",
            ],
        )  # fmt: skip
        assert run.exit_code == 0, run.output
        assert (root / "student" / "student.pth").is_file()
        grid = tmp_path / "grid.toml"
        grid.write_text('[[run]]\nname = "all"\nlosses = "reg,cs,sh,kt,vt"\n')
        abl = CliRunner().invoke(
            cli.app,
            [
                "ablate", "--store", str(store), "--out", str(root / "abl"), "--grid", str(grid),
                "--val-ann", str(dumped["val_ann"]), "--val-images", str(dumped["val_images"]),
                "--model", "distilpose_tiny", "--epochs", "1", "--batch-size", "8",
                "--device", "cpu",
            ],
        )  # fmt: skip
        assert abl.exit_code == 0, abl.output
        runs = json.loads((root / "abl" / "ablation.json").read_text())["runs"]
        assert [r["name"] for r in runs] == ["all"]
    finally:
        shutil.move(str(gone / "ann.json"), str(dumped["train_ann"]))
        shutil.move(str(gone), str(train_dir))


def test_training_batches_carry_the_stored_pixels(dumped):
    """Batches: the decoded stored crops, normalized, in the store's order, for any workers."""
    reader = StoreReader.open(dumped["store"])
    lay = reader.layout
    pixels = reader.read_chunk(0, lay.num_slots(reader.meta.views), ("pixels",))["pixels"]
    batches = list(StudentBatches(dumped["store"], batch_size=8, workers=0)(1))
    view = 1 % reader.meta.views
    where = np.argsort(lay.view_permutation(view))  # instance -> position in the view block
    for b in batches:
        slots = view * lay.block_samples + where[b["instance"].numpy()]
        ref = normalize(np.stack([decode_crop(pixels[s], "jpeg", SIZE) for s in slots]))
        assert torch.equal(b["images"], ref)
    two = list(StudentBatches(dumped["store"], batch_size=8, workers=2)(1))
    assert all(torch.equal(a["images"], c["images"]) for a, c in zip(batches, two, strict=True))


def test_cuda_run_hand_offs_give_the_same_batches(dumped):
    """What a CUDA run's workers hand over (uint8 crops, or the JPEG bytes of the batch in one
    buffer) and `OnDevice` turns into model input, run here with the CPU as the device: the
    same images and targets as a CPU run's batches, bit for bit."""
    ref = list(StudentBatches(dumped["store"], batch_size=8, workers=0)(0))
    for output in ("crops", "jpeg"):
        data = StudentBatches(dumped["store"], batch_size=8, workers=0)
        data.renderer.output = output
        loader = data(0)  # the DataLoader wrapped in OnDevice (device: the CPU here)
        assert isinstance(loader, OnDevice)
        got = list(loader)
        assert len(got) == len(ref)
        for a, b in zip(ref, got, strict=True):
            assert set(a) == set(b) and b["heatmaps"].dtype == torch.float32
            assert all(torch.equal(a[k], b[k]) for k in a), output


def test_gpu_decode_option_needs_cuda(dumped):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: covered by test_gpu_decode_matches_the_cpu_decode")
    with pytest.raises(BadConfigError, match="decode 'gpu'"):
        StudentBatches(dumped["store"], batch_size=8, workers=0, decode="gpu")


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_decode(dumped):
    """nvJPEG may round differently from libjpeg-turbo: the two may differ by a few levels."""
    dev = torch.device("cuda")
    cpu = next(iter(StudentBatches(dumped["store"], batch_size=8, workers=0)(0)))
    data = StudentBatches(dumped["store"], batch_size=8, workers=0, device=dev, decode="gpu")
    assert data.renderer.output == "jpeg"
    gpu = next(iter(data(0)))
    assert gpu["images"].device.type == "cuda"
    diff = (gpu["images"].cpu() - cpu["images"]).abs() * 0.226 * 255  # back to pixel levels
    assert float(diff.max()) <= 8 and float(diff.mean()) < 0.5
    assert decode_on_device({"crops": torch.zeros(1, 3, 2, 2, dtype=torch.uint8)}, dev)[
        "images"
    ].is_cuda
