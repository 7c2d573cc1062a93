"""The CLI end to end on tiny models, each stage as its own command (STYLE.md point 10):
make-demo-data -> train-teacher -> dump-teacher -> store-info/verify -> train-student -> eval."""

import json

from typer.testing import CliRunner

import cli

runner = CliRunner()


def last_json(output: str) -> dict:
    """The JSON summary line a command prints (logs may come before or after it)."""
    return next(json.loads(x) for x in reversed(output.splitlines()) if x.startswith("{"))


def invoke(*args: str) -> str:
    result = runner.invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}"
    return result.output


def test_every_stage_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    invoke("make-demo-data", data, "--num-train", 24, "--num-val", 8, "--seed", 3)
    train_ann = data / "annotations" / "person_keypoints_train.json"
    val_ann = data / "annotations" / "person_keypoints_val.json"
    invoke(
        "train-teacher",
        "--ann",
        train_ann,
        "--images",
        data / "train" / "images",
        "--out",
        tmp_path / "teacher",
        "--epochs",
        1,
        "--batch-size",
        8,
        "--workers",
        0,
        "--device",
        "cpu",
    )
    teacher = tmp_path / "teacher" / "teacher.pth"
    assert "tokenpose_tiny" in invoke("checkpoint-info", teacher)

    store = tmp_path / "store"
    summary = last_json(
        invoke(
            "dump-teacher",
            "--teacher",
            teacher,
            "--ann",
            train_ann,
            "--images",
            data / "train" / "images",
            "--out",
            store,
            "--views",
            2,
            "--workers",
            0,
            "--device",
            "cpu",
        )
    )
    assert summary["views"] == 2
    info = json.loads(invoke("store-info", store, "--json"))
    assert info["complete"] and info["samples_complete"] == 2 * info["num_instances"]
    assert info["pixels"] == "jpeg" and info["pixel_bytes_per_sample"] > 0  # the default
    text = invoke("store-info", store)
    assert "teacher confidence" in text and "pixels           jpeg quality 95" in text
    verify = last_json(invoke("store-verify", store, "--sample", 4))
    assert verify["mismatched"] == 0 and verify["crops"] == "decoded"

    run = tmp_path / "student"
    invoke(
        "train-student",
        "--store",
        store,
        "--model",
        "distilpose_tiny",
        "--out",
        run,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--workers",
        0,
        "--device",
        "cpu",
    )
    config = json.loads((run / "config.json").read_text())
    assert "reg" in json.dumps(config)
    for ckpt in (teacher, run / "student.pth"):
        out = invoke(
            "eval",
            "--checkpoint",
            ckpt,
            "--ann",
            val_ann,
            "--images",
            data / "val" / "images",
            "--dets",
            data / "annotations" / "person_detections_val.json",
            "--device",
            "cpu",
            "--json",
            "--out",
            tmp_path / f"{ckpt.stem}.json",
        )
        result = json.loads(out[out.index("{") :])
        assert 0.0 <= result["AP"] <= 1.0 and result["samples_per_s"] > 0
        assert (tmp_path / f"{ckpt.stem}.json").exists()


def test_demo_json_contract(tmp_path, monkeypatch):
    """`distilpose demo --json`: a list of rows with the documented keys and roles (here with
    `--train-teacher`, so the teacher-training path runs too)."""
    import demo

    tiny = demo.DemoPlan(
        name="quick", num_train=24, num_val=8, views=2, student_epochs=2, batch_size=8,
        teacher_num_train=40, teacher_epochs=1, free_losses="rle", free_data="fresh",
    )  # fmt: skip  # a teacher-free row of its own, on fresh crops: every demo path runs
    monkeypatch.setattr(demo, "QUICK_DEMO", tiny)
    out = invoke(
        "demo", "--quick", "--json", "--train-teacher", "--out", tmp_path / "demo",
        "--device", "cpu",
    )  # fmt: skip
    lines = out.splitlines()  # the runner mixes in stderr log lines before the JSON
    rows = json.loads("\n".join(lines[lines.index("[") :]))
    assert [r["role"] for r in rows] == ["teacher", *demo.STUDENT_ROLES]
    keys = {
        "model", "role", "params", "gflops", "ap", "ap50", "ap75", "pck", "pixel_error",
        "samples_per_s",
    }  # fmt: skip
    assert all(set(r) == keys for r in rows)
    assert rows[0]["model"] == "tokenpose_demo" and rows[1]["model"] == "distilpose_demo"
    assert rows[0]["params"] > rows[1]["params"] == rows[2]["params"] == rows[3]["params"] > 0
    assert all(0 <= r["pck"] <= 1 and r["pixel_error"] >= 0 for r in rows)
    assert (tmp_path / "demo" / "quick" / "demo_table.json").exists()
    # the demo's students trained from a store that keeps the crops (JPEG), not the images
    from store import StoreReader

    assert StoreReader.open(tmp_path / "demo" / "quick" / "store").meta.pixels == "jpeg"
