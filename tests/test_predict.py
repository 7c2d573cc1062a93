"""`distilpose predict` and `Inferencer` (issue 18): images, folders, globs and videos in, a
detector in front, COCO results JSON, overlays and annotated videos out; one error line offline.

No test downloads anything: conftest sets DISTILPOSE_OFFLINE=1, and the detector here is
torchvision's fasterrcnn_mobilenet_v3_large_fpn, randomly initialised with its "person" class
biased up (so it finds people at random places), saved to a local weights file and run at a
tiny input size.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from distilpose import Inferencer, PoseResult
from distilpose.data import load_coco_instances
from distilpose.data.demo import make_demo_video
from distilpose.data.keypoints import NUM_KEYPOINTS
from distilpose.errors import BadAnnotationError, BadConfigError, BadImageError
from distilpose.evaluation.metrics import coco_keypoint_eval, to_coco_results
from distilpose.inference.config import InferConfig
from distilpose.inference.detector import PERSON_LABEL, BoxesFile, TorchvisionDetector
from distilpose.inference.sources import Frame, ImageSource, open_source
from distilpose.inference.topdown import predict_instances
from distilpose.models import build_from_checkpoint, build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tests" / "data" / "coco_mini"
ANN = MINI / "annotations" / "person_keypoints.json"
IMAGES = MINI / "images"
DETECTOR = "fasterrcnn_mobilenet_v3_large_fpn"
TINY_DET = ["--det-size", "64", "--max-people", "3"]  # fast: a 64 px detector, 3 people
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    paths = {"student": root / "student.pth", "teacher": root / "teacher.pth"}
    save_checkpoint(
        paths["student"], build_model("distilpose_tiny"), meta={"losses": ["reg", "cs"]}
    )
    save_checkpoint(paths["teacher"], build_model("tokenpose_tiny"), meta={})
    return paths


@pytest.fixture(scope="module")
def det_weights(tmp_path_factory) -> Path:
    """Random detector weights whose classifier always says "person" (about 0.996)."""
    torch.manual_seed(0)
    detector = TorchvisionDetector(DETECTOR, "random", size=64)
    with torch.no_grad():
        detector.model.roi_heads.box_predictor.cls_score.bias[PERSON_LABEL] = 10.0
    path = tmp_path_factory.mktemp("det") / "detector.pth"
    torch.save(detector.model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> dict[str, Path]:
    return make_demo_video(
        tmp_path_factory.mktemp("video") / "people.mp4", num_frames=5, size=(160, 120)
    )


def _ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _gt_boxes_file(path: Path, instances) -> Path:
    entries = [
        {"image_id": inst.image_id, "bbox": list(inst.bbox), "score": 1.0} for inst in instances
    ]
    path.write_text(json.dumps(entries))
    return path


def ordered(results: list[dict]) -> np.ndarray:
    """[N, 1 + 4 + 3K] image id, box and keypoints, sorted by image and box."""
    results = sorted(results, key=lambda r: (r["image_id"], r["bbox"]))
    return np.array([[r["image_id"], *r["bbox"], *r["keypoints"]] for r in results])


# ------------------------------------------------------------------------- real COCO images


def test_predict_coco_images_with_gt_boxes_scores_and_matches_eval(ckpts, tmp_path):
    """GT boxes as the detector's output, through the CLI (--boxes) and through the Python API
    (a stand-in detector): the JSON scores with pycocotools, and the keypoints are those of the
    evaluation path (`predict_instances` on the same boxes)."""
    model, _ = build_from_checkpoint(ckpts["student"])
    instances = load_coco_instances(ANN, IMAGES, aspect_ratio=0.75)  # 12 labelled people
    expected = to_coco_results(predict_instances(model, instances, InferConfig(device="cpu")))

    out = tmp_path / "gt.json"
    args = ["predict", "--checkpoint", str(ckpts["student"]), str(IMAGES), "--out", str(out)]
    _ok(
        runner.invoke(
            cli.app, [*args, "--boxes", str(_gt_boxes_file(tmp_path / "b.json", instances))]
        )
    )
    results = json.loads(out.read_text())
    assert len(results) == len(expected) == 12
    for r, inst in zip(expected, instances, strict=True):
        r["bbox"] = [round(v, 2) for v in inst.bbox]
    np.testing.assert_allclose(ordered(results), ordered(expected), atol=2e-3)
    metrics = coco_keypoint_eval(ANN, results)
    assert metrics == pytest.approx(coco_keypoint_eval(ANN, expected), abs=1e-3)
    assert 0.0 <= metrics["AP"] <= 1.0 and 0.0 <= metrics["AR"] <= 1.0

    by_image: dict[int, list] = {}
    for inst in instances:
        by_image.setdefault(inst.image_id, []).append(inst)

    def gt_detector(frames: list[Frame]):  # a detector stand-in that returns the GT boxes
        out = []
        for f in frames:
            people = by_image.get(f.image_id, [])
            out.append((np.array([p.bbox for p in people]), np.ones(len(people))))
        return out

    cpu = InferConfig(device="cpu")
    pose = Inferencer(ckpts["student"], detector=gt_detector, config=cpu, frames_per_batch=3)
    api = [r for res in pose(str(IMAGES)) for r in res.to_coco()]
    assert len(api) == 12

    np.testing.assert_allclose(ordered(api), ordered(results), atol=2e-3)


def test_predict_coco_images_with_a_detector(ckpts, det_weights, tmp_path):
    out = tmp_path / "det.json"
    args = ["predict", "--checkpoint", str(ckpts["student"]), str(IMAGES / "*.jpg")]
    args += ["--detector", DETECTOR, "--detector-weights", str(det_weights), *TINY_DET]
    output = _ok(runner.invoke(cli.app, [*args, "--out", str(out), "--overlay-dir", str(tmp_path)]))
    assert re.search(r"\d+ people in 4 frames .* frames/s; per frame: detector \d+ ms", output)
    results = json.loads(out.read_text())
    sizes = {p.stem: cv2.imread(str(p)).shape for p in IMAGES.glob("*.jpg")}
    assert {r["image_id"] for r in results} <= {int(s) for s in sizes}
    for image_id in {r["image_id"] for r in results}:
        assert sum(r["image_id"] == image_id for r in results) <= 3  # --max-people
    for r in results:
        h, w = sizes[r["file_name"][:-4]][:2]
        x, y, bw, bh = r["bbox"]
        assert -1 <= x and -1 <= y and x + bw <= w + 1 and y + bh <= h + 1
        assert len(r["keypoints"]) == 3 * NUM_KEYPOINTS and 0.0 <= r["score"] <= 1.0
    for stem, shape in sizes.items():  # one PNG overlay per image, the image's size
        assert cv2.imread(str(tmp_path / f"{stem}_pose.png")).shape == shape
    assert 0.0 <= coco_keypoint_eval(ANN, results)["AP"] <= 1.0


# ------------------------------------------------------------------------------------ video


def test_predict_video_with_a_detector_and_with_gt_boxes(ckpts, det_weights, video, tmp_path):
    out = tmp_path / "video.json"
    args = ["predict", "--checkpoint", str(ckpts["teacher"]), str(video["video"]), "--no-flip"]
    det = ["--detector-weights", str(det_weights), *TINY_DET]
    _ok(runner.invoke(cli.app, [*args, *det, "--out", str(out), "--overlay-dir", str(tmp_path)]))
    results = json.loads(out.read_text())
    assert results and {r["frame_index"] for r in results} <= set(range(5))
    assert all(
        r["image_id"] == r["frame_index"] and r["file_name"] == "people.mp4" for r in results
    )
    annotated = cv2.VideoCapture(str(tmp_path / "people_pose.mp4"))
    assert annotated.get(cv2.CAP_PROP_FRAME_COUNT) == 5
    assert (annotated.get(cv2.CAP_PROP_FRAME_WIDTH), annotated.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
        160,
        120,
    )
    annotated.release()

    # the video's ground-truth boxes as the detector's output: scored against its labels
    _ok(runner.invoke(cli.app, [*args, "--boxes", str(video["boxes"]), "--out", str(out)]))
    results = json.loads(out.read_text())
    gt = json.loads(video["ann"].read_text())["annotations"]
    for frame in range(5):
        assert sum(r["frame_index"] == frame for r in results) == sum(
            a["image_id"] == frame for a in gt
        )
    metrics = coco_keypoint_eval(video["ann"], results)
    assert 0.0 <= metrics["AP"] <= 1.0 and 0.0 <= metrics["AR"] <= 1.0

    # --max-frames stops early
    _ok(
        runner.invoke(
            cli.app, [*args, "--detector", "none", "--max-frames", "2", "--out", str(out)]
        )
    )
    assert [r["frame_index"] for r in json.loads(out.read_text())] == [0, 1]


# ---------------------------------------------------------------------------------- offline


@pytest.mark.reliability(
    case="predict offline without detector weights",
    outcome="one line naming the detector, the file to fetch and --detector-weights, exit 1; "
    "nothing downloaded",
)
@pytest.mark.parametrize("how", ["DISTILPOSE_OFFLINE", "network down"])
def test_offline_without_weights_is_one_error_line(ckpts, tmp_path, monkeypatch, how):
    import distilpose.inference.detector as detector_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    if how == "network down":
        monkeypatch.delenv("DISTILPOSE_OFFLINE")

        def no_network(url, target):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

        monkeypatch.setattr(detector_module, "_download", no_network)
    args = ["predict", "--checkpoint", str(ckpts["student"]), str(IMAGES / "000000000785.jpg")]
    result = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: detector " + DETECTOR), result.output
    assert (
        "--detector-weights PATH" in lines[0] and "fasterrcnn_mobilenet_v3_large_fpn-" in lines[0]
    )
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "torch").exists()


# ------------------------------------------------------------------------------- Inferencer


def test_readme_inferencer_example_runs(ckpts, det_weights, tmp_path, monkeypatch):
    """The README's example, extracted and run as written (from a folder laid out like the
    repository after `distilpose demo`; the detector's weights sit in torch's cache)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- inferencer-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README has no <!-- inferencer-example --> python block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 6
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth").symlink_to(det_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    student = tmp_path / "demo_run" / "full" / "student_distilled" / "student.pth"
    student.parent.mkdir(parents=True)
    student.symlink_to(ckpts["student"])
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    import distilpose.inference.inferencer

    # the test's detector runs small, to be quick
    real = distilpose.inference.inferencer.build_detector
    monkeypatch.setattr(
        distilpose.inference.inferencer,
        "build_detector",
        lambda *args, **kw: real(*args, **{**kw, "size": 64, "max_people": 3}),
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert isinstance(result, PoseResult) and len(result) > 0
    n = len(result)
    assert result.keypoints.shape == (n, NUM_KEYPOINTS, 2) and result.boxes.shape == (n, 4)
    assert result.keypoint_scores.shape == (n, NUM_KEYPOINTS) and result.box_scores.shape == (n,)


def test_inferencer_arrays_lists_batches_and_teachers(ckpts, tmp_path):
    image = cv2.imread(str(IMAGES / "000000000785.jpg"))
    box = np.array([[280.0, 44.0, 218.0, 346.0]], np.float32)

    def one_box(frames):
        return [(box, np.array([0.9], np.float32)) for _ in frames]

    for role in ("student", "teacher"):  # a teacher's heatmaps decode the same way
        pose = Inferencer(ckpts[role], one_box, config=InferConfig(flip=False, device="cpu"))
        single = pose(image)
        assert isinstance(single, PoseResult) and single.image_id == 0 and single.name == ""
        assert single.keypoints.shape == (1, NUM_KEYPOINTS, 2)
        assert single.box_scores.tolist() == [pytest.approx(0.9)]
        xs = single.keypoints[0, :, 0]
        assert np.all((xs > 280 - 60) & (xs < 280 + 218 + 60))  # inside the padded box
        batched = pose([image, IMAGES / "000000000785.jpg", image[..., 0]])  # BGR, path, gray
        assert [r.image_id for r in batched] == [0, 785, 2]
        np.testing.assert_allclose(batched[0].keypoints, single.keypoints, atol=1e-4)
        np.testing.assert_allclose(batched[1].keypoints, single.keypoints, atol=1e-4)
        assert pose.timings["frames"] == 4

    whole = Inferencer(ckpts["student"], detector=None, config=InferConfig(device="cpu"))(image)
    assert whole.boxes.tolist() == [[0.0, 0.0, image.shape[1], image.shape[0]]]
    nobody = Inferencer(
        ckpts["student"], detector=lambda fs: [(np.zeros((0, 4)), np.zeros(0))] * len(fs)
    )
    empty = nobody(image)
    assert len(empty) == 0 and empty.keypoints.shape == (0, NUM_KEYPOINTS, 2)
    assert empty.to_coco() == [] and empty.draw(image).shape == image.shape
    with pytest.raises(BadImageError, match="expected \\[H, W, 3\\] uint8"):
        nobody(image.astype(np.float32))
    with pytest.raises(BadConfigError, match="detector: got 'yolo'"):
        Inferencer(ckpts["student"], detector="yolo")


def test_sources_and_boxes_file(tmp_path, video):
    assert isinstance(open_source(str(IMAGES / "*.jpg")), ImageSource)
    assert [f.image_id for f in open_source([str(IMAGES)])] == [785, 40083, 196141, 197388]
    frames = list(open_source(video["video"], max_frames=3))
    assert [f.frame_index for f in frames] == [0, 1, 2] and frames[0].image.shape == (120, 160, 3)
    with pytest.raises(BadConfigError, match="one video or camera at a time"):
        open_source([str(IMAGES), str(video["video"])])
    with pytest.raises(BadImageError, match="matches no images"):
        open_source(str(tmp_path / "*.png"))
    with pytest.raises(BadImageError, match="cannot open"):
        open_source(7)  # no camera here

    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps(
            [
                {"file_name": "people.mp4", "bbox": [9, 9, 9, 9]},  # names no frame
                {"image_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5},  # frame 1
                {"image_id": 785, "bbox": [10.0, 10.0, 100.0, 200.0]},
            ]
        )
    )
    found = BoxesFile(boxes)(
        [Frame(np.zeros((4, 4, 3), np.uint8), "000000000785.jpg", 785)]
        + frames[:2]  # frames are matched by index, never by the video's name
    )
    assert found[0][0].tolist() == [[10.0, 10.0, 100.0, 200.0]] and found[0][1].tolist() == [1.0]
    assert len(found[1][0]) == 0 and found[2][0].tolist() == [[1.0, 1.0, 5.0, 5.0]]
    assert found[2][1].tolist() == [0.5]


BAD_BOXES = {  # issue 24: NaN passed "w <= 0"; a text score or category was a bare ValueError
    "NaN x": ({"file_name": "a.jpg", "bbox": [math.nan, 0, 9, 9]}, r"entry 0 'bbox' is \[nan"),
    "1e30 w": ({"file_name": "a.jpg", "bbox": [0, 0, 1e30, 9]}, r"within 1e\+06 px"),
    "all zero": ({"file_name": "a.jpg", "bbox": [0, 0, 0, 0]}, r"with w, h > 0"),
    "text score": ({"file_name": "a.jpg", "bbox": [0, 0, 9, 9], "score": "x"}, "'score' is 'x'"),
    "text category": (
        {"file_name": "a.jpg", "bbox": [0, 0, 9, 9], "category_id": "person"},
        "'category_id' is 'person'; expected an integer",
    ),
    "text image_id": ({"image_id": "785", "bbox": [0, 0, 9, 9]}, "'image_id' is '785'"),
}


@pytest.mark.reliability(
    case="boxes file entry with a NaN, huge or empty box, or a text score, category or id",
    outcome="one BadAnnotationError line naming the file and the entry, when it is opened",
)
@pytest.mark.parametrize("case", sorted(BAD_BOXES))
def test_bad_boxes_file_entries(tmp_path, case):
    entry, pattern = BAD_BOXES[case]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"file_name": "b.jpg", "bbox": [1, 1, 5, 5]}, entry]))
    with pytest.raises(BadAnnotationError, match=pattern.replace("entry 0", "entry 1")) as e:
        BoxesFile(boxes)
    assert str(e.value).startswith(f"{boxes}: entry 1 ") and "\n" not in str(e.value)


def test_benchmark_tables_are_written_into_the_readme_block(tmp_path):
    from benchmarks import update_readme_block

    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- predict-bench -->\nold\n<!-- /predict-bench -->\nend\n")
    assert update_readme_block("predict-bench", "| new |\n", readme)
    assert (
        readme.read_text() == "top\n<!-- predict-bench -->\n| new |\n<!-- /predict-bench -->\nend\n"
    )
    assert not update_readme_block("other", "x", readme)
    assert "<!-- predict-bench -->" in (ROOT / "README.md").read_text()  # the block is there


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('the pickle ran')",))


@pytest.mark.reliability(
    case="detector weights file that is not a state dict, or carries code",
    outcome="BadCheckpointError naming the file; the code never runs (weights_only=True)",
)
def test_detector_weights_are_never_unpickled(tmp_path):
    from distilpose.errors import BadCheckpointError
    from distilpose.inference.detector import load_detector_state

    evil = tmp_path / "evil.pth"
    torch.save({"model": _RunsCode()}, evil)
    with pytest.raises(BadCheckpointError, match="evil.pth: not a loadable"):
        load_detector_state(evil, DETECTOR)
    nested = tmp_path / "nested.pth"
    torch.save({"meta": {"a": 1}}, nested)
    with pytest.raises(BadCheckpointError, match="expected a .* state dict of tensors"):
        load_detector_state(nested, DETECTOR)
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert list(load_detector_state(plain, DETECTOR)) == ["w"]


# ------------------------------------------------------------------------- box filtering (issue 27)

DETS = MINI / "annotations" / "person_detections.json"  # 118 boxes of the 56.4-AP detector


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def hand_count(entries: list[dict], box_thr: float = 0.3, nms_thr: float = 0.3) -> dict[int, int]:
    """People per image as MMPose's inferencer keeps them, in plain Python: scores above
    box_thr, then greedy NMS (highest score first; a box overlapping a kept one above nms_thr
    is dropped)."""
    kept: dict[int, list[list[float]]] = {}
    for d in sorted(entries, key=lambda d: -d["score"]):
        mine = kept.setdefault(d["image_id"], [])
        if d["score"] > box_thr and all(_iou(d["bbox"], k) <= nms_thr for k in mine):
            mine.append(d["bbox"])
    return {image: len(boxes) for image, boxes in kept.items()}


@pytest.mark.reliability(
    case="predict --boxes with a whole detections file (118 boxes, scores down to 0)",
    outcome="only boxes scoring above 0.3 after NMS at 0.3 are posed: 19 people",
)
def test_predict_with_the_detections_file_keeps_boxes_above_thr_after_nms(ckpts, tmp_path):
    entries = json.loads(DETS.read_text())
    want = hand_count(entries)
    assert len(entries) == 118 and want == {785: 1, 40083: 5, 196141: 8, 197388: 5}  # by hand
    out = tmp_path / "p.json"
    args = ["predict", "--checkpoint", str(ckpts["student"]), str(IMAGES), "--out", str(out)]
    _ok(runner.invoke(cli.app, [*args, "--boxes", str(DETS)]))
    results = json.loads(out.read_text())
    got: dict[int, int] = {}
    for r in results:
        got[r["image_id"]] = got.get(r["image_id"], 0) + 1
    assert got == want and len(results) == 19
    kept = {(d["image_id"], tuple(round(v, 2) for v in d["bbox"])) for d in entries}
    assert all((r["image_id"], tuple(r["bbox"])) in kept for r in results)  # the file's boxes
    # --box-thr 0 --nms-thr 1 keeps every box with a score above 0
    _ok(runner.invoke(cli.app, [*args, "--boxes", str(DETS), "--box-thr", "0", "--nms-thr", "1"]))
    assert len(json.loads(out.read_text())) == sum(d["score"] > 0 for d in entries)


@pytest.mark.reliability(
    case="predict --boxes with a file whose entries name none of the images",
    outcome="one error line naming the boxes file, exit 1",
)
def test_boxes_file_matching_no_image_is_an_error(ckpts, tmp_path):
    boxes = tmp_path / "other.json"
    boxes.write_text(json.dumps([{"image_id": 5, "bbox": [1, 1, 9, 9], "file_name": "x.jpg"}]))
    result = runner.invoke(
        cli.app, ["predict", "--checkpoint", str(ckpts["student"]), str(IMAGES),
                  "--boxes", str(boxes), "--out", str(tmp_path / "p.json")],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {boxes}: no entry names any of the 4")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.reliability(
    case="predict on a video cut off mid-way (MJPG AVI, 20 frames declared, 9 readable)",
    outcome="one error line naming the video and the frame index that failed, exit 1",
)
def test_video_read_failure_mid_way_names_the_frame(ckpts, tmp_path):
    path = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the second half is gone
    result = runner.invoke(
        cli.app, ["predict", "--checkpoint", str(ckpts["student"]), str(path),
                  "--detector", "none", "--out", str(tmp_path / "p.json")],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.match(rf"error: {re.escape(str(path))}: cannot decode frame 9 \(of 20", lines[0])
