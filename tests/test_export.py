"""ONNX export: ONNX Runtime gives PyTorch's outputs for tiny student and teacher checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distilpose.errors import BadCheckpointError, BadConfigError
from distilpose.inference.export import check_onnx, export_onnx, output_names

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    from distilpose.models import build_model, save_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("export") / "student.pth"
    save_checkpoint(path, build_model("distilpose_tiny"), meta={"note": "random tiny student"})
    return path


def test_student_onnx_matches_pytorch(tmp_path, student_ckpt):
    from distilpose.data import normalize
    from distilpose.models import build_from_checkpoint

    path = export_onnx(student_ckpt, tmp_path / "student.onnx")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["distilpose.model"])["name"] == "distilpose_tiny"
    assert meta["distilpose.outputs"] == "coords,scores,sigmas"

    assert check_onnx(student_ckpt, path, atol=1e-4) <= 1e-4
    # a real crop batch of 3 (the graph was exported at batch 1): each output within 1e-4
    model, _ = build_from_checkpoint(student_ckpt)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 128, 96, 3), dtype=np.uint8)
    images = normalize(crops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.numpy()})
    got = dict(zip(output_names("student"), outputs, strict=True))
    with torch.no_grad():
        ref = model.eval()(images)
    for name in ("coords", "scores", "sigmas"):
        expected = getattr(ref, name).numpy()
        assert got[name].shape == expected.shape
        np.testing.assert_allclose(got[name], expected, atol=1e-4, rtol=0)


def test_teacher_with_tokens_and_fixed_batch(tmp_path):
    from distilpose.models import build_model

    torch.manual_seed(1)
    teacher = build_model("tokenpose_tiny").eval()
    path = export_onnx(teacher, tmp_path / "t.onnx", dynamic_batch=False, tokens=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [
        "heatmaps",
        "keypoint_tokens",
        "visual_tokens",
    ]
    assert session.get_inputs()[0].shape == [1, 3, 128, 96]
    assert check_onnx(teacher, path) <= 1e-4


def test_check_onnx_catches_a_wrong_model(tmp_path, student_ckpt):
    from distilpose.models import build_from_checkpoint, build_model

    path = export_onnx(student_ckpt, tmp_path / "s.onnx")
    torch.manual_seed(123)
    other = build_model("distilpose_tiny")  # same graph, other weights
    with pytest.raises(BadCheckpointError, match="differs"):
        check_onnx(other, path)
    teacher = build_model("tokenpose_tiny")
    with pytest.raises(BadCheckpointError, match="outputs"):
        check_onnx(teacher, path)
    model, _ = build_from_checkpoint(student_ckpt)
    with pytest.raises(BadConfigError, match="opset"):
        export_onnx(model, tmp_path / "old.onnx", opset=11)
