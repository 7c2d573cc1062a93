"""Checkpoints: official MMPose 0.x layouts load strictly, clear errors, safe and atomic files."""

from __future__ import annotations

import os

import pytest
import torch

from distilpose.errors import BadCheckpointError, BadConfigError
from distilpose.models import (
    build_from_checkpoint,
    build_model,
    checkpoint_filter_fn,
    identify_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def official_layout(model, head_prefix: str, module: bool = False) -> dict:
    """The model's tensors as the official code saves them: an mmcv dict with `state_dict`
    (`backbone.*`, `keypoint_head.<tokenpose|tokenhead>.*`), `meta` and `optimizer`."""
    lead = "module." if module else ""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            key = f"keypoint_head.{head_prefix}." + key[len("head.") :]
        state[lead + key] = value.clone()
    meta = {"epoch": 300, "mmcv_version": "1.3.9", "CLASSES": None}
    return {"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_filter_fn_renames_official_keys():
    state = {
        "module.backbone.conv1.weight": 1,
        "keypoint_head.tokenhead.mlp_head.1.bias": 2,
        "module.keypoint_head.tokenpose.keypoint_token": 3,
        "head.transformer.layers.0.0.fn.norm.weight": 4,
    }
    assert checkpoint_filter_fn(state) == {
        "backbone.conv1.weight": 1,
        "head.mlp_head.1.bias": 2,
        "head.keypoint_token": 3,
        "head.transformer.layers.0.0.fn.norm.weight": 4,
    }


def test_official_distilpose_s_loads_strictly(tmp_path):
    torch.manual_seed(0)
    source = build_model("distilpose_s")
    with torch.no_grad():  # make BN buffers differ from a fresh model's
        source.backbone.bn1.running_mean.normal_()
    target = build_model("distilpose_s")
    for module in (False, True):  # as saved, and with DataParallel's `module.` prefix
        path = tmp_path / f"distilpose_s_{module}.pth"
        torch.save(official_layout(source, "tokenhead", module), path)

        info = identify_checkpoint(path)
        assert info["model"] == "distilpose_s" and info["fits"] and info["role"] == "student"
        assert info["params"] == 5_364_101 and info["num_tensors"] == 230
        assert info["official_head_prefix"] == "keypoint_head.tokenhead"
        assert info["keys"] == {"backbone": 90, "head": 140}

        with torch.no_grad():
            target.head.keypoint_token.zero_()
        meta = load_checkpoint(target, path)
        assert meta["epoch"] == 300
        assert_same_tensors(source, target)

    rebuilt, meta = build_from_checkpoint(path)
    assert rebuilt.config.name == "distilpose_s" and not rebuilt.training
    assert_same_tensors(source, rebuilt)


@pytest.mark.reliability(
    case="teacher weights loaded into a student",
    outcome="BadCheckpointError naming the model the file fits",
)
def test_official_teacher_layout_loads_strictly(tmp_path):
    torch.manual_seed(0)
    source = build_model("tokenpose_tiny")
    path = tmp_path / "teacher.pth"
    torch.save(official_layout(source, "tokenpose"), path)
    info = identify_checkpoint(path)
    assert info["model"] == "tokenpose_tiny" and info["role"] == "teacher"
    assert info["official_head_prefix"] == "keypoint_head.tokenpose"
    target = build_model("tokenpose_tiny")
    load_checkpoint(target, path)
    assert_same_tensors(source, target)
    # the same content passed as a dict; a student refuses it and the error names the fit
    with pytest.raises(BadCheckpointError, match="fit built-in model 'tokenpose_tiny'"):
        load_checkpoint(build_model("distilpose_tiny"), official_layout(source, "tokenpose"))


@pytest.mark.reliability(
    case="checkpoint of another model",
    outcome="one-line BadCheckpointError listing missing, unexpected and mismatched keys",
)
def test_wrong_checkpoint_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    torch.manual_seed(0)
    state = official_layout(build_model("distilpose_tiny"), "tokenhead")
    state["state_dict"]["keypoint_head.tokenhead.extra_token"] = torch.zeros(3)
    path = tmp_path / "student.pth"
    torch.save(state, path)
    with pytest.raises(BadCheckpointError) as err:
        load_checkpoint(build_model("tokenpose_tiny"), path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'tokenpose_tiny'" in message
    assert "missing keys [head.transformer.layers.2." in message  # teacher depth 4 vs 2
    assert "1 unexpected keys [head.extra_token]" in message
    assert "head.mlp_head.1.weight: file (5, 64) vs model (768, 64)" in message
    assert "(+" in message  # long lists are cut with a count


def test_non_strict_loads_what_fits(tmp_path):
    torch.manual_seed(0)
    source = build_model("distilpose_tiny")
    target = build_model("distilpose_tiny", depth=3)
    with pytest.warns(UserWarning, match="non-strictly"):
        load_checkpoint(target, {"state_dict": source.state_dict()}, strict=False)
    assert torch.equal(target.head.keypoint_token, source.head.keypoint_token)
    assert torch.equal(target.backbone.conv1.weight, source.backbone.conv1.weight)


def test_missing_bn_counters_are_tolerated():
    """Older files lack `num_batches_tracked`; they still load strictly."""
    source = build_model("distilpose_tiny")
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    load_checkpoint(build_model("distilpose_tiny"), state)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # would create a folder if the loader ran pickled code
        return (os.makedirs, (self.marker,))


@pytest.mark.reliability(
    case="checkpoint pickle with code in it",
    outcome="refused (weights_only=True); the code never runs",
)
def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "meta": _Payload(marker)}, path)
    with pytest.raises(BadCheckpointError, match="refused") as err:
        load_checkpoint(build_model("distilpose_tiny"), path)
    assert str(path) in str(err.value)
    with pytest.raises(BadCheckpointError, match="refused"):
        identify_checkpoint(path)
    assert not marker.exists()


@pytest.mark.reliability(
    case="checkpoint file that is not a checkpoint",
    outcome="BadCheckpointError 'not a PyTorch checkpoint'",
)
@pytest.mark.parametrize(
    "content", [b"", b"hello, not a checkpoint", os.urandom(512)], ids=["empty", "text", "random"]
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(BadCheckpointError, match="not a PyTorch checkpoint"):
        identify_checkpoint(path)


@pytest.mark.reliability(
    case="checkpoint missing, a list, without weights, or of a foreign network",
    outcome="BadCheckpointError naming the file and what was expected",
)
def test_other_bad_files(tmp_path):
    with pytest.raises(BadCheckpointError, match="no such file"):
        identify_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(BadCheckpointError, match="holds a list"):
        identify_checkpoint(tmp_path / "list.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "dict.pth")
    with pytest.raises(BadCheckpointError, match="no 'state_dict'"):
        build_from_checkpoint(tmp_path / "dict.pth")
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    info = identify_checkpoint(tmp_path / "foreign.pth")
    assert info["model"] is None and not info["fits"] and info["params"] == 2
    with pytest.raises(BadCheckpointError, match="fit no built-in model"):
        build_from_checkpoint(tmp_path / "foreign.pth")


def test_own_checkpoint_round_trip_keeps_overrides(tmp_path):
    torch.manual_seed(0)
    model = build_model("distilpose_tiny", depth=3, single_sigma=True, teacher_dim=32)
    path = tmp_path / "run" / "last.pth"
    save_checkpoint(path, model, meta={"epoch": 7, "losses": ["reg", "kt"]}, extra={"step": 70})

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "distilpose/1" and raw["step"] == 70
    assert raw["model"]["depth"] == 3 and raw["model"]["teacher_dim"] == 32

    rebuilt, meta = build_from_checkpoint(path)
    assert meta == {"epoch": 7, "losses": ["reg", "kt"]}
    assert rebuilt.config == model.config
    assert_same_tensors(model, rebuilt)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        a, b = model.eval()(x), rebuilt(x)
    torch.testing.assert_close(a.coords, b.coords)
    torch.testing.assert_close(a.keypoint_tokens, b.keypoint_tokens)

    info = identify_checkpoint(path)
    assert info["model"] == "distilpose_tiny" and info["fits"] and info["config"]["depth"] == 3
    assert info["format"] == "distilpose/1" and info["meta_keys"] == ["epoch", "losses"]


@pytest.mark.reliability(
    case="checkpoint save fails midway (disk full), or meta not loadable",
    outcome="error naming the path; no temp file left; the previous file loads unchanged",
)
def test_save_is_atomic_and_refuses_unloadable_meta(tmp_path, monkeypatch):
    model = build_model("distilpose_tiny")
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, model, meta={"epoch": 1})
    save_checkpoint(path, model, meta={"epoch": 2})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]

    with pytest.raises(BadConfigError, match=r"meta\['when'\]"):
        save_checkpoint(path, model, meta={"when": object()})
    with pytest.raises(BadConfigError, match="reserved"):
        save_checkpoint(path, model, meta={}, extra={"state_dict": {}})

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(BadCheckpointError, match="disk full") as err:
        save_checkpoint(path, model, meta={"epoch": 3})
    assert str(err.value).startswith(f"{path}: cannot write the checkpoint")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # no tmp left behind
    assert load_checkpoint(build_model("distilpose_tiny"), path) == {"epoch": 2}
