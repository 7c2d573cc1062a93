"""`python -m benchmarks.gpu --dry-run`: the GPU check's code, run on the CPU with tiny models.

Every step of the GPU check runs (FPS, dump vs forward, a 2-rank torchrun dump compared with
the 1-rank one, training from the store in both AMP settings and with the teacher online,
train-student under torchrun with 2 gloo ranks, the JPEG-decode detection), so none of it is
dead code; the numbers themselves mean nothing here.
"""

from benchmarks import gpu


def test_gpu_check_dry_run_runs_every_step(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    assert "--dry-run: CPU, tiny models" in text
    expected = ["| distilpose_tiny |", "| tokenpose_tiny |", "Dump vs forward alone",
                "Multi-rank dump (2 ranks", "float arrays within", "| store_bf16 |",
                "| store_fp16 |", "| online |", "| DDP, 2 rank(s) |",
                "GPU JPEG decode: "]  # fmt: skip
    for line in expected:
        assert line in text, line


def test_gpu_check_without_a_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 1
    assert capsys.readouterr().err.startswith("error: no CUDA device; `--dry-run`")


def test_bench_gpu_from_the_cli_without_a_gpu(monkeypatch):
    from typer.testing import CliRunner

    import cli

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli.app, ["bench", "--gpu"])
    assert result.exit_code == 1
    assert "error: no CUDA device" in result.output


def _group(path, heatmaps, slots):
    import zarr

    g = zarr.open_group(path, mode="w")
    g.create_array("heatmaps", data=heatmaps)
    g.create_array("slot", data=slots)
    return path


def test_multi_rank_dump_comparison_fails_past_the_tolerance(tmp_path):
    import numpy as np
    import pytest

    hm = np.random.default_rng(0).random((4, 3, 8, 6)).astype(np.float16)
    slots = np.arange(4, dtype=np.int64)
    one = _group(tmp_path / "one", hm, slots)
    rounding = hm + np.float16(gpu.RANK_TOLERANCE / 4)
    assert gpu.compare_dumps(one, _group(tmp_path / "close", rounding, slots)) < gpu.RANK_TOLERANCE
    with pytest.raises(RuntimeError, match="differ from the 1-rank dump by"):
        gpu.compare_dumps(one, _group(tmp_path / "far", hm[::-1].copy(), slots))
    with pytest.raises(RuntimeError, match="array 'slot' differs"):
        gpu.compare_dumps(one, _group(tmp_path / "slots", hm, slots[::-1].copy()))
