"""The paper's CNN pair (Table 6): SimpleBaseline teacher, DeepPose student.

Sizes are checked against MMPose 0.x's model zoo, docs/en/inference_speed_summary.md of
open-mmlab/mmpose (0.x, measured with mmpose 0.20.0 / mmcv-full 1.3.17), rows
`topdown_heatmap | ResNet-50 | res50_coco_256x192` (5.46 GFLOPs, 34 M params) and
`DeepPose | ResNet-50 | deeppose/coco/res50_coco_256x192` (4.04 GFLOPs, 23.58 M params).
MMPose-layout state dicts are written here from MMPose 0.x's module names (ResNet backbone,
TopdownHeatmapSimpleHead `deconv_layers` / `final_layer`, DeepposeRegressionHead `fc`), not
derived from our models.
"""

from __future__ import annotations

import pytest
import torch

from distilpose.errors import BadCheckpointError, BadConfigError, StoreFormatError
from distilpose.models import (
    build_from_checkpoint,
    build_model,
    identify_checkpoint,
    load_checkpoint,
    model_config,
    model_info,
)

MMPOSE_ZOO = {  # name: (params, GFLOPs) from MMPose 0.x's inference_speed_summary.md
    "simplebaseline_r50": (34.0e6, 5.46),
    "deeppose_r50": (23.58e6, 4.04),
}


@pytest.mark.parametrize("name", sorted(MMPOSE_ZOO))
def test_sizes_within_1_5_percent_of_mmpose(name):
    info = model_info(name)
    params, gflops = MMPOSE_ZOO[name]
    assert info["input_size"] == [192, 256]
    assert abs(info["params"] / params - 1) < 0.015, info
    assert abs(info["gflops"] / gflops - 1) < 0.015, info


def test_tiny_pair_outputs():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 96)
    teacher = build_model("simplebaseline_tiny").eval()
    out = teacher(images)
    assert out.heatmaps.shape == (2, 17, 32, 24)
    assert out.keypoint_tokens is None and out.visual_tokens is None
    small = build_model("simplebaseline_tiny", input_size=(48, 64), heatmap_size=(12, 16))
    assert small(torch.randn(1, 3, 64, 48)).heatmaps.shape == (1, 17, 16, 12)
    student = build_model("deeppose_tiny").eval()
    s = student(images)
    assert s.coords.shape == (2, 17, 2) and s.scores.shape == (2, 17)
    assert s.sigmas.shape == (2, 17, 2) and bool((s.sigmas > 0).all())
    assert s.keypoint_tokens is None and s.visual_tokens is None
    # a fresh student starts near the crop centre with the teacher's sigma and a unit score
    assert abs(float(s.coords.detach().mean()) - 0.5) < 0.1
    assert torch.allclose(s.sigmas, torch.full_like(s.sigmas, 2.0))
    assert torch.allclose(s.scores, torch.ones_like(s.scores))
    with pytest.raises(ValueError, match="heatmap_size"):
        teacher(torch.randn(1, 3, 64, 48))


def test_config_refuses_mixed_heads():
    with pytest.raises(BadConfigError, match="'head' 'deconv' is a teacher's head"):
        model_config("deeppose_tiny", head="deconv")
    with pytest.raises(BadConfigError, match="does not fit 'head'"):
        model_config("distilpose_tiny", backbone="resnet_tiny")
    assert not model_config("deeppose_r50").has_tokens
    assert model_config("distilpose_s").has_tokens


# --------------------------------------------------------------------------- MMPose layouts


def _bn(prefix: str, c: int) -> dict:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def mmpose_resnet50_keys() -> dict:
    """MMPose 0.x `ResNet(depth=50)` under `backbone.`: {key: shape}."""
    keys = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64)}
    inplanes = 64
    for stage, (blocks, planes) in enumerate(
        zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=1
    ):
        for j in range(blocks):
            p = f"backbone.layer{stage}.{j}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys.update(_bn(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{p}.bn2", planes))
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            keys.update(_bn(f"{p}.bn3", planes * 4))
            if j == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    return keys


def mmpose_simplebaseline_keys() -> dict:
    keys = mmpose_resnet50_keys()
    in_ch = 2048
    for i in range(3):  # ConvTranspose2d (no bias), BN, ReLU
        keys[f"keypoint_head.deconv_layers.{3 * i}.weight"] = (in_ch, 256, 4, 4)
        keys.update(_bn(f"keypoint_head.deconv_layers.{3 * i + 1}", 256))
        in_ch = 256
    keys["keypoint_head.final_layer.weight"] = (17, 256, 1, 1)
    keys["keypoint_head.final_layer.bias"] = (17,)
    return keys


def mmpose_deeppose_keys() -> dict:
    return {
        **mmpose_resnet50_keys(),
        "keypoint_head.fc.weight": (34, 2048),
        "keypoint_head.fc.bias": (34,),
    }


def mmpose_file(keys: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.randint(0, 9, s, dtype=torch.int64)
        if k.endswith("num_batches_tracked")
        else torch.rand(s, generator=g).half() + 0.5  # half: smaller files, faster tests
        for k, s in keys.items()
    }
    return {"meta": {"epoch": 210}, "state_dict": state, "optimizer": {}}


@pytest.mark.parametrize(
    "name, keys",
    [("simplebaseline_r50", mmpose_simplebaseline_keys), ("deeppose_r50", mmpose_deeppose_keys)],
)
def test_mmpose_layout_loads_strictly(tmp_path, name, keys):
    obj = mmpose_file(keys())
    path = tmp_path / f"{name}_mmpose.pth"
    torch.save(obj, path)
    info = identify_checkpoint(path)
    assert (
        info["model"] == name and info["fits"] and info["official_head_prefix"] == "keypoint_head"
    )
    model, meta = build_from_checkpoint(path)
    assert model.config.name == name and meta == {"epoch": 210}
    state = model.state_dict()
    for key, value in obj["state_dict"].items():
        ours = key.replace("keypoint_head.", "head.")
        assert torch.equal(state[ours], value.to(state[ours].dtype)), key
    if name == "deeppose_r50":  # MMPose's DeepPose has no score/sigma head: it keeps its init
        fresh = build_model(name).head.confidence
        assert torch.equal(model.head.confidence.weight, fresh.weight)
        assert torch.equal(model.head.confidence.bias, fresh.bias)


def test_mismatched_mmpose_file_gives_the_one_line_key_report():
    with pytest.raises(BadCheckpointError) as err:
        load_checkpoint(build_model("deeppose_r50"), mmpose_file(mmpose_simplebaseline_keys()))
    message = str(err.value)
    assert "\n" not in message and "'deeppose_r50'" in message
    assert "missing keys [head.fc.weight, head.fc.bias]" in message
    assert "unexpected keys [head.deconv_layers.0.weight" in message
    assert "the keys fit built-in model 'simplebaseline_r50'" in message


def test_backbone_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = build_model("deeppose_tiny")
    state = {k: v + 1 for k, v in source.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 128)  # a classifier, as in torchvision's files
    torch.save(state, tmp_path / "trunk.pth")
    model = build_model("simplebaseline_tiny", weights=tmp_path / "trunk.pth")
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(BadCheckpointError, match=r"1 missing keys \[layer1.0.conv1.weight\]"):
        build_model("deeppose_tiny", weights=tmp_path / "bad.pth")


# --------------------------------------------------------------------------- heatmap-only stores


def _invoke(*args: object, code: int = 0) -> str:
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == code, f"{args[0]} exited {result.exit_code}:\n{result.output}"
    return result.output


@pytest.mark.reliability(
    case="train-student with a loss whose target the store lacks (kt on a SimpleBaseline store)",
    outcome="one-line error naming the loss, the missing output and the teacher; nothing written",
)
def test_simplebaseline_store_trains_and_evaluates_a_deeppose_student(tmp_path):
    """dump-teacher (simplebaseline_tiny) -> heatmap-only store -> train-student deeppose_tiny
    with reg,sh,cs -> eval, all from the command line; kt/vt are refused by name."""
    import json

    from distilpose.data import make_demo_data
    from distilpose.models import save_checkpoint
    from store import SCHEMA_VERSION, StoreReader

    torch.set_num_threads(1)
    data = make_demo_data(tmp_path / "data", num_train=12, num_val=4, seed=1)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    meta = {"role": "teacher", "model": "simplebaseline_tiny"}
    save_checkpoint(teacher, build_model("simplebaseline_tiny"), meta=meta)
    store = tmp_path / "store"
    _invoke(
        "dump-teacher", "--teacher", teacher, "--ann", data["train_ann"],
        "--images", data["train_images"], "--out", store, "--workers", 0, "--device", "cpu",
    )  # fmt: skip
    reader = StoreReader.open(store)
    assert (
        reader.meta.teacher_outputs == ("heatmaps",)
        and reader.meta.schema_version == SCHEMA_VERSION
    )
    assert not any("tokens" in name for name in reader.arrays)
    assert "heatmaps" in reader.read_chunk(0, 2) and "visual_tokens" not in reader.read_chunk(0, 2)
    with pytest.raises(StoreFormatError, match="teacher .simplebaseline_tiny. has no keypoint tok"):
        reader.read_chunk(0, 2, ("heatmaps", "keypoint_tokens"))
    info = json.loads(_invoke("store-info", store, "--json"))
    assert info["complete"] and info["nonfinite_total"] == 0
    assert info["teacher_outputs"] == ["heatmaps"]

    run = tmp_path / "student"
    train = ("train-student", "--store", store, "--model", "deeppose_tiny", "--out", run)
    opts = ("--epochs", 2, "--batch-size", 4, "--workers", 0, "--device", "cpu")
    for losses, missing in (("reg,kt", "keypoint tokens"), ("reg,sh,vt", "visual tokens")):
        out = _invoke(*train, "--losses", losses, *opts, code=1)
        term = losses.rsplit(",", 1)[1]
        line = f"{term} needs {missing}; this store's teacher (simplebaseline_tiny) has none"
        assert line in out and len(out.strip().splitlines()) == 1
    assert not run.exists()
    _invoke(*train, "--losses", "reg,sh,cs", *opts)
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss_reg", "loss_sh", "loss_cs"} <= set(header) and "loss_kt" not in header
    out = _invoke(
        "eval", "--checkpoint", run / "student.pth", "--ann", data["val_ann"],
        "--images", data["val_images"], "--device", "cpu", "--json",
    )  # fmt: skip
    result = json.loads(out[out.index("{") :])
    assert 0.0 <= result["AP"] <= 1.0 and result["model"] == "deeppose_tiny"


def test_schema_records_teacher_outputs_and_reads_version_1_as_all():
    from store.schema import TEACHER_OUTPUTS, StoreMeta, array_specs, read_fields

    v1 = {"teacher_name": "tokenpose_tiny", "teacher_sha256": "0" * 64, "num_instances": 3}
    old = StoreMeta.from_dict({**v1, "schema_version": 1})
    assert old.teacher_outputs == TEACHER_OUTPUTS and old.has("visual_tokens")
    only = StoreMeta(**v1, teacher_outputs=["heatmaps"], mode="lossy")
    assert StoreMeta.from_dict(only.to_dict()).teacher_outputs == ("heatmaps",)
    assert set(array_specs(only)) >= {"heatmaps", "heatmaps_scale"}
    assert not any("tokens" in name for name in array_specs(only))
    assert "keypoint_tokens" not in read_fields(only) and "heatmaps" in read_fields(only)
    assert "teacher_outputs: store=" in old.mismatches(only)[-1]
    with pytest.raises(StoreFormatError, match="teacher_outputs"):
        StoreMeta(**v1, teacher_outputs=["keypoint_tokens"])


def test_table6_grid_and_table_beside_the_paper():
    from student_train.ablate import TABLE6_COLUMNS, format_table, load_grid

    runs = load_grid("table6")
    assert [(r["losses"], r["paper_ap"]) for r in runs] == [
        ("reg", 52.6),
        ("reg,sh", None),
        ("reg,sh,cs", 59.7),
    ]
    results = [
        {**r, "losses": dict.fromkeys(r["losses"].split(","), 1.0), "ap": ap}
        for r, ap in zip(runs, (0.30, 0.33, 0.361), strict=True)
    ]
    teacher = {"name": "simplebaseline_tiny", "ap": 0.5, "paper_ap": 70.4}
    lines = format_table(results, paper=True, columns=TABLE6_COLUMNS, teacher=teacher)
    lines = lines.splitlines()
    assert lines[0] == "| Run | L_SH | L_CS | AP | Improv. | Paper AP |"
    assert lines[2] == "| teacher (simplebaseline_tiny) | - | - | 50.0% | - | 70.4% |"
    assert lines[3] == "| none | - | - | 30.0% | - | 52.6% |"
    assert lines[4] == "| sh | ✓ | - | 33.0% | +3.0% | - |"
    assert lines[5] == "| sh+cs | ✓ | ✓ | 36.1% | +6.1% | 59.7% |"


def test_losses_are_checked_against_teacher_and_student():
    from store.schema import TEACHER_OUTPUTS
    from student_train.data import check_targets

    deeppose, distilpose = model_config("deeppose_tiny"), model_config("distilpose_tiny")
    check_targets(["reg", "sh", "cs"], ("heatmaps",), "simplebaseline_r50", deeppose)
    check_targets(["reg", "sh", "cs", "kt", "vt"], TEACHER_OUTPUTS, "tokenpose_tiny", distilpose)
    with pytest.raises(BadConfigError) as err:
        check_targets(["reg", "kt"], ("heatmaps",), "simplebaseline_r50", distilpose)
    assert (
        str(err.value)
        == "kt needs keypoint tokens; this store's teacher (simplebaseline_r50) has none"
    )
    with pytest.raises(
        BadConfigError, match=r"^vt needs visual tokens; the student \(deeppose_tiny\)"
    ):
        check_targets(["reg", "vt"], TEACHER_OUTPUTS, "tokenpose_tiny", deeppose)


# --------------------------------------------------------------------------- --backbone-weights


def test_torchvision_resnet50_file_loads_into_the_r50_pair(tmp_path):
    """torchvision's own layout (resnet50(weights=None).state_dict(), fc included): every
    trunk tensor of both R50 models comes from the file."""
    from torchvision.models import resnet50

    torch.manual_seed(1)
    state = resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    for name in ("deeppose_r50", "simplebaseline_r50"):
        trunk = build_model(name, weights=tmp_path / "resnet50.pth").backbone.state_dict()
        assert set(trunk) == set(state) - {"fc.weight", "fc.bias"}
        assert all(torch.equal(v, state[k]) for k, v in trunk.items())


def _torchvision_layout_file(path, seed: int = 3) -> dict[str, torch.Tensor]:
    """The tiny trunk's keys as torchvision names them (conv1, bn1, layerN.i..., fc), values
    far from any initialisation: weights +1, BN means 5, num_batches_tracked 1000."""
    torch.manual_seed(seed)
    state = {}
    for k, v in build_model("deeppose_tiny").backbone.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000)
        else:
            state[k] = v + (5.0 if k.endswith("running_mean") else 1.0)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    torch.save(state, path)
    return state


def test_cnn_pair_trains_from_the_cli_with_backbone_weights(tmp_path):
    """train-teacher simplebaseline_tiny and train-student deeppose_tiny with --backbone-weights:
    at a negligible lr every trunk parameter still equals the file's (so each was loaded, none
    left at its initialisation), BatchNorm counters continue from the file's, and --resume
    keeps the option (the run in config.json)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_student_train import build_tiny_store

    torch.set_num_threads(1)
    tiny = build_tiny_store(tmp_path / "tiny", views=1, num_train=8, num_val=2)
    weights = tmp_path / "trunk.pth"
    state = _torchvision_layout_file(weights)
    opts = ("--epochs", 1, "--batch-size", 4, "--workers", 0, "--device", "cpu", "--lr", 1e-12)
    runs = {
        "teacher": ("train-teacher", "--model", "simplebaseline_tiny", "--ann", tiny["train_ann"],
                    "--images", tiny["train_images"]),
        "student": ("train-student", "--model", "deeppose_tiny", "--store", tiny["store"],
                    "--losses", "reg,sh,cs"),
    }  # fmt: skip
    for role, args in runs.items():
        out = tmp_path / role
        _invoke(*args, "--out", out, *opts, "--backbone-weights", weights)
        last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
        steps = int(last["step"])
        trunk = {k[len("backbone.") :]: v for k, v in last["state_dict"].items()
                 if k.startswith("backbone.")}  # fmt: skip
        assert set(trunk) == set(state) - {"fc.weight", "fc.bias"} and steps == 2
        for k, v in trunk.items():
            if k.endswith("num_batches_tracked"):
                assert int(v) == 1000 + steps, k
            elif "running" not in k:  # BN statistics move with every batch
                assert torch.allclose(v, state[k], atol=1e-6), k
        saved = json.loads((out / "config.json").read_text())["run"]
        assert saved["backbone_weights"] == str(weights)
        _invoke(*args, "--out", out, "--resume", "--epochs", 2)  # the file again, from the run
        again = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
        assert int(again["epoch"]) == 2
        key = "backbone.bn1.num_batches_tracked"
        assert int(again["state_dict"][key]) == 1000 + 2 * steps
    bad = tmp_path / "bad.pth"
    torch.save({**state, "layer9.weight": torch.zeros(1)}, bad)
    out = _invoke(*runs["student"], "--out", tmp_path / "bad", *opts, "--backbone-weights", bad,
                  code=1)  # fmt: skip
    assert len(out.strip().splitlines()) == 1 and "1 unexpected keys [layer9.weight]" in out
