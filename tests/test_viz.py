"""Pictures: each one rendered from tiny random models on tests/data and checked as a PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distilpose import viz
from distilpose.data.keypoints import KEYPOINT_NAMES, NUM_KEYPOINTS
from distilpose.errors import BadConfigError
from distilpose.training.runs import DumpRun

DATA = Path(__file__).parent / "data" / "coco_mini"
ANN = DATA / "annotations" / "person_keypoints.json"
IMAGES = DATA / "images"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> np.ndarray:
    """The PNG as BGR pixels, after checking it really is a PNG file."""
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def assert_png_size(path: Path, size: tuple[int, int]) -> np.ndarray:
    image = read_png(path)
    assert (image.shape[1], image.shape[0]) == size
    return image


def count_color(image_bgr: np.ndarray, hex_color: str, tol: int = 16) -> int:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image_bgr[..., ::-1].astype(int) - rgb).max(-1) < tol).sum())


@pytest.fixture(scope="module")
def models():
    from distilpose.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return build_model("tokenpose_tiny").eval(), build_model("distilpose_tiny").eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, models):
    from distilpose.models import save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    teacher, student = models
    paths = root / "teacher.pth", root / "student.pth"
    save_checkpoint(paths[0], teacher, meta={"note": "random tiny teacher"})
    save_checkpoint(paths[1], student, meta={"note": "random tiny student"})
    return paths


# ------------------------------------------------------------------------------------ heatmaps


def test_draw_heatmap_pairs_size_and_subset(tmp_path):
    rng = np.random.default_rng(0)
    sim, teacher = rng.random((2, NUM_KEYPOINTS, 32, 24), dtype=np.float32)
    sigmas = rng.uniform(1, 3, (NUM_KEYPOINTS, 2))
    crop = rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)
    out = viz.draw_heatmap_pairs(sim, teacher, sigmas, tmp_path / "all.png", crop_bgr=crop)
    full = viz.figure_pixels(viz.heatmap_figure_size(NUM_KEYPOINTS, with_crop=True))
    assert full == (1200, 580)
    assert_png_size(out, full)
    sub = viz.draw_heatmap_pairs(sim, teacher, sigmas, tmp_path / "sub.png", joints=["nose", 16])
    assert_png_size(sub, viz.figure_pixels(viz.heatmap_figure_size(2, with_crop=False)))


def test_draw_heatmap_pairs_rejects_bad_input(tmp_path):
    hm = np.zeros((NUM_KEYPOINTS, 32, 24), np.float32)
    with pytest.raises(BadConfigError, match="equal"):
        viz.draw_heatmap_pairs(hm, hm[:, :16], np.ones((17, 2)), tmp_path / "x.png")
    with pytest.raises(BadConfigError, match="sigmas"):
        viz.draw_heatmap_pairs(hm, hm, np.ones((17, 3)), tmp_path / "x.png")
    with pytest.raises(BadConfigError, match="unknown keypoint"):
        viz.draw_heatmap_pairs(hm, hm, np.ones((17, 2)), tmp_path / "x.png", joints=["tail"])


def test_viz_heatmaps_from_a_store(tmp_path, checkpoints):
    dump = pytest.importorskip("teacher_dump.dump")
    reader = pytest.importorskip("store.reader")
    teacher_ckpt, student_ckpt = checkpoints
    store = tmp_path / "store.zarr"
    dump.dump_teacher(
        DumpRun(
            teacher_ckpt, ANN, IMAGES, store, views=1, seed=0, batch_size=4, workers=0,
            device="cpu", max_instances=3,
        )
    )  # fmt: skip
    opened = reader.StoreReader.open(store)
    out = viz.viz_heatmaps(student_ckpt, opened, tmp_path / "hm.png", sample=1)
    full = viz.figure_pixels(viz.heatmap_figure_size(NUM_KEYPOINTS, with_crop=True))
    assert_png_size(out, full)
    with pytest.raises(BadConfigError, match="sample"):
        viz.viz_heatmaps(student_ckpt, opened, tmp_path / "bad.png", sample=10**6)
    with pytest.raises(BadConfigError, match="opened store"):
        viz.viz_heatmaps(student_ckpt, store, tmp_path / "bad.png")


# ---------------------------------------------------------------------------------- confidence


def test_oks_correct():
    gt = np.zeros((NUM_KEYPOINTS, 3))
    gt[:, 0], gt[:, 1], gt[:, 2] = np.arange(17) * 10.0, 50.0, 2
    gt[3, 2] = 0  # unlabelled
    pred = gt[:, :2].copy()
    pred[5] += 100.0  # far off for a 100x100 person
    pred[11] += 2.0  # close
    correct, labelled = viz.oks_correct(pred, gt, area=100.0 * 100.0)
    assert labelled.sum() == 16 and not labelled[3]
    assert not correct[5] and correct[11] and correct[0] and not correct[3]
    # the threshold is exp(-d^2 / (2 area k^2)) >= 0.5: just inside and just outside for joint 0
    k = 2 * 0.026
    d = np.sqrt(2 * np.log(2) * 10000.0 * k * k)
    for step, expect in ((0.99, True), (1.01, False)):
        p = gt[:, :2].copy()
        p[0, 0] += d * step
        assert viz.oks_correct(p, gt, 10000.0)[0][0] == expect


def test_draw_confidence_colours(tmp_path):
    crop = np.zeros((128, 96, 3), np.uint8)
    coords = np.stack([np.linspace(10, 86, 17), np.linspace(10, 118, 17)], 1)
    scores = np.linspace(0, 1, 17)
    size = viz.figure_pixels(viz.CONFIDENCE_SIZE)
    good = assert_png_size(
        viz.draw_confidence(crop, coords, scores, np.ones(17, bool), tmp_path / "g.png"), size
    )
    bad = assert_png_size(
        viz.draw_confidence(crop, coords, scores, np.zeros(17, bool), tmp_path / "b.png"), size
    )
    # box edges: many pixels of the verdict's colour, few of the other (limbs share some hues)
    green = count_color(good, viz.CORRECT_COLOR), count_color(bad, viz.CORRECT_COLOR)
    red = count_color(good, viz.WRONG_COLOR), count_color(bad, viz.WRONG_COLOR)
    assert green[0] > 500 and green[0] > 5 * green[1]
    assert red[1] > 500 and red[1] > 5 * red[0]
    with pytest.raises(BadConfigError, match="coords"):
        viz.draw_confidence(crop, coords[:5], scores, None, tmp_path / "x.png")


def test_viz_confidence_on_coco(tmp_path, checkpoints):
    out = viz.viz_confidence(checkpoints[1], ANN, IMAGES, tmp_path / "conf.png", instance=1)
    assert_png_size(out, viz.figure_pixels(viz.CONFIDENCE_SIZE))
    with pytest.raises(BadConfigError, match="expected a student"):
        viz.viz_confidence(checkpoints[0], ANN, IMAGES, tmp_path / "x.png")


# ----------------------------------------------------------------------------------- attention


def test_attention_weights_reproduce_the_layer_output(models):
    """The recomputed softmax(q k^T * scale) gives back the attention module's own output."""
    for model in models:
        attn = viz.attention_modules(model)[-1]
        assert len(viz.attention_modules(model)) == model.config.depth
        seen: dict[str, torch.Tensor] = {}

        def keep(key: str, store: dict = seen):
            return lambda _m, _i, value: store.__setitem__(key, value)

        hooks = [
            attn.to_qkv.register_forward_hook(keep("qkv")),
            attn.register_forward_hook(keep("out")),
        ]
        with torch.no_grad():
            model(torch.randn(2, 3, 128, 96))
            for h in hooks:
                h.remove()
            weights = viz.attention_weights(attn, seen["qkv"])  # [B, h, N, N]
            b, n, three_d = seen["qkv"].shape
            v = seen["qkv"].reshape(b, n, 3, attn.heads, -1)[:, :, 2].transpose(1, 2)
            out = attn.to_out((weights @ v).transpose(1, 2).reshape(b, n, three_d // 3))
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.allclose(out, seen["out"], atol=1e-5)


def test_keypoint_attention_grid(models):
    teacher, _ = models
    images = torch.randn(1, 3, 128, 96)
    grid, out = viz.keypoint_attention(teacher, images, KEYPOINT_NAMES.index("right_ankle"))
    assert grid.shape == (1, 8, 8)  # tiny: heatmap 24x32 in 3x4 patches
    assert (grid > 0).all() and grid.sum() < 1.0  # the rest goes to the keypoint tokens
    assert out.heatmaps.shape == (1, 17, 32, 24)
    with pytest.raises(BadConfigError, match="layer"):
        viz.keypoint_attention(teacher, images, 0, layer=4)


def test_viz_attention_teacher_and_student(tmp_path, checkpoints):
    _, crop = viz.render_instance(ANN, IMAGES, 0, (96, 128))
    out = viz.viz_attention(list(checkpoints), crop.image, tmp_path / "attn.png")
    w, h = viz.ATTENTION_PANEL_SIZE
    assert_png_size(out, viz.figure_pixels((2 * w, h)))
    one = viz.viz_attention(
        checkpoints[1], IMAGES / "000000000785.jpg", tmp_path / "one.png", keypoint="nose", layer=0
    )
    assert_png_size(one, viz.figure_pixels((w, h)))


# --------------------------------------------------------------------------------- predictions


def gt_results() -> list[dict]:
    data = json.loads(ANN.read_text())
    results = []
    for a in data["annotations"]:
        kpts = np.asarray(a["keypoints"], float).reshape(-1, 3)
        kpts[:, 2] = kpts[:, 2] > 0
        results.append(
            {"image_id": a["image_id"], "category_id": 1, "keypoints": kpts.ravel().tolist(),
             "score": 0.9 if a["num_keypoints"] else 0.1}
        )  # fmt: skip
    return results


def test_viz_predictions_draws_people(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(gt_results()))
    image_path = IMAGES / "000000196141.jpg"  # 640x429, id from the file name
    out = viz.viz_predictions(results, image_path, tmp_path / "pred.png", max_side=320)
    drawn = assert_png_size(out, (320, 214))
    plain = cv2.resize(cv2.imread(str(image_path)), (320, 214), interpolation=cv2.INTER_AREA)
    changed = (np.abs(drawn.astype(int) - plain).max(-1) > 30).mean()
    assert 0.005 < changed < 0.5
    # a threshold above every score draws nothing
    empty = viz.viz_predictions(
        results, image_path, tmp_path / "e.png", score_thr=0.95, max_side=320
    )
    assert np.abs(read_png(empty).astype(int) - plain).max() == 0


def test_viz_predictions_needs_an_image_id(tmp_path):
    results = [r for r in gt_results() if r["image_id"] in (785, 40083)]
    odd = tmp_path / "photo.jpg"
    odd.write_bytes((IMAGES / "000000000785.jpg").read_bytes())
    with pytest.raises(BadConfigError, match="image_id"):
        viz.viz_predictions(results, odd, tmp_path / "x.png")
    out = viz.viz_predictions(results, odd, tmp_path / "ok.png", image_id=785)
    assert_png_size(out, (viz.PREDICTIONS_MAX_SIDE, 425))


# -------------------------------------------------------------------------------------- curves


def write_metrics(path: Path, with_ap: bool) -> None:
    """metrics.csv as the trainer writes it: step rows, then an epoch row (AP if evaluated)."""
    columns = ["kind", "epoch", "step", "lr", "loss", "loss_reg", "loss_sh", "samples_per_s"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns + (["AP", "AP50"] if with_ap else []), restval="")
        w.writeheader()
        for step in range(1, 41):
            epoch = (step - 1) // 10
            losses = {"loss_reg": 1 / step, "loss_sh": 0.5 / step, "loss": 1.5 / step}
            w.writerow({"kind": "step", "epoch": epoch, "step": step, "lr": 1e-3, **losses})
            if step % 10 == 0:
                ap = {"AP": 0.1 * step / 10, "AP50": 0.2 * step / 10} if with_ap else {}
                w.writerow(
                    {"kind": "epoch", "epoch": epoch, "step": step, "lr": 1e-3, **losses, **ap}
                )


@pytest.mark.parametrize("with_ap", [True, False])
def test_viz_curves(tmp_path, with_ap):
    write_metrics(tmp_path / "metrics.csv", with_ap)
    out = viz.viz_curves(tmp_path, tmp_path / "curves.png")
    assert_png_size(out, viz.figure_pixels(viz.CURVES_SIZE))
    metrics = viz.read_metrics(tmp_path / "metrics.csv")
    assert list(metrics["kind"][9:11]) == ["step", "epoch"]
    if with_ap:
        assert np.isfinite(metrics["AP"]).sum() == 4
        assert metrics["AP"][metrics["kind"] == "epoch"].tolist() == pytest.approx(
            [0.1, 0.2, 0.3, 0.4]
        )
    else:
        assert "AP" not in metrics


def test_viz_curves_needs_metrics(tmp_path):
    with pytest.raises(BadConfigError, match="metrics"):
        viz.viz_curves(tmp_path, tmp_path / "x.png")


def test_display_crop_is_the_same_view():
    """A crop rendered larger (same aspect) is the model's crop scaled up: pictures rely on it."""
    size = (96, 128)
    big = viz.display_size(size, 640)
    assert big == (480, 640)
    _, small = viz.render_instance(ANN, IMAGES, 0, size)
    _, large = viz.render_instance(ANN, IMAGES, 0, big)
    labelled = small.weights > 0
    assert labelled.sum() > 5
    scaled = small.keypoints[labelled] * 5.0
    assert np.abs(large.keypoints[labelled] - scaled).max() < 3.0
