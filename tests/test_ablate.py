"""The loss ablation: grid parsing, one student per combination, the Table-4-like report."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from distilpose.errors import BadConfigError
from student_train.ablate import TABLE4, ablate, format_table, load_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_student_train import build_tiny_store  # noqa: E402


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root: the store must come out byte-identical."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def test_table4_grid_matches_the_paper():
    runs = load_grid("table4")
    assert [r["name"] for r in runs] == [n for n, _, _ in TABLE4]
    assert len(runs) == 8
    assert runs[0]["losses"] == "reg" and runs[0]["paper_ap"] == 56.0
    assert set(runs[-1]["losses"].split(",")) == {"reg", "cs", "sh", "kt", "vt"}
    assert runs[-1]["paper_ap"] == 71.6


def test_grid_files(tmp_path):
    js = tmp_path / "g.json"
    js.write_text(json.dumps({"base": "reg", "kt": "reg,kt=1e-3"}))
    assert load_grid(js) == [
        {"name": "base", "losses": "reg"},
        {"name": "kt", "losses": "reg,kt=1e-3"},
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[run]]\nname = "x"\nlosses = "reg,kd"\n')
    with pytest.raises(BadConfigError, match="unknown loss"):
        load_grid(bad)
    bad.write_text("[[run]\n")
    with pytest.raises(BadConfigError, match="not valid toml"):
        load_grid(bad)
    with pytest.raises(BadConfigError, match="neither 'table4'"):
        load_grid(tmp_path / "missing.toml")
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"name": "a", "losses": "reg"}, {"name": "a", "losses": "reg,kt"}]))
    with pytest.raises(BadConfigError, match="repeated"):
        load_grid(dup)


def test_format_table_improvement_over_reg_only():
    rows = [
        {"name": "none", "losses": {"reg": 1.0}, "ap": 0.5},
        {"name": "cs+sh", "losses": {"reg": 1.0, "cs": 0.01, "sh": 1.0}, "ap": 0.581},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| Run | L_CS | L_SH | L_KT | L_VT | AP | Improv. |"
    assert lines[2] == "| none | - | - | - | - | 50.0% | - |"
    assert lines[3] == "| cs+sh | ✓ | ✓ | - | - | 58.1% | +8.1% |"


def test_ablate_user_grid_on_a_tiny_store(tmp_path):
    torch.set_num_threads(1)
    tiny = build_tiny_store(tmp_path / "tiny", views=2, num_train=24, num_val=8)
    before = tree_digest(Path(tiny["store"]))
    grid = tmp_path / "grid.toml"
    grid.write_text('[[run]]\nname = "none"\nlosses = "reg"\n\n[[run]]\nname = "all"\n'
                    'losses = "reg,cs,sh,kt,vt"\n')  # fmt: skip
    kw = dict(
        model="distilpose_tiny", epochs=1, batch_size=8, val_ann=tiny["val_ann"],
        val_images=tiny["val_images"], device="cpu", workers=0,
    )  # fmt: skip
    md = ablate(tiny["store"], grid, tmp_path / "abl", **kw)
    assert md == tmp_path / "abl" / "ablation.md"
    text = md.read_text()
    assert "| Run | L_CS | L_SH | L_KT | L_VT | AP | Improv. |" in text
    rows = [
        line for line in text.splitlines() if line.startswith("| none") or line.startswith("| all")
    ]
    assert rows[0].startswith("| none | - | - | - | - |") and rows[0].endswith("| - |")
    assert rows[1].startswith("| all | ✓ | ✓ | ✓ | ✓ |")
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"none", "all"}
    for r in runs.values():
        assert 0.0 <= r["ap"] <= 1.0 and Path(r["checkpoint"]).is_file()
        assert (tmp_path / "abl" / "runs" / r["name"] / "results.json").is_file()
    ap_all = f"{runs['all']['ap'] * 100:.1f}%"
    assert f"| {ap_all} |" in rows[1]
    assert tree_digest(Path(tiny["store"])) == before  # the store is only read

    # Rerun: finished combinations are reused, not retrained.
    ckpt = Path(runs["all"]["checkpoint"])
    stamp = ckpt.stat().st_mtime_ns
    ablate(tiny["store"], grid, tmp_path / "abl", **kw)
    assert ckpt.stat().st_mtime_ns == stamp


def test_weights_override_the_grid_terms_it_names():
    from student_train.ablate import reweight

    assert reweight("reg,kt", "kt=1,vt=0.05") == "reg=1,kt=1"
    assert reweight("reg,cs,sh,kt,vt", "kt=1,vt=0.05") == "reg=1,cs=0.01,sh=1,kt=1,vt=0.05"
    with pytest.raises(BadConfigError, match="unknown loss"):
        reweight("reg", "kx=1")


def test_demo_weights_grid_file_loads():
    """The grid the demo's loss weights were chosen with (docs/notes.md) stays runnable."""
    grid = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "demo_weights.toml"
    runs = load_grid(grid)
    assert [r["name"] for r in runs][-1] == "kt01_vt01"
    import demo

    assert runs[-1]["losses"] == demo.DemoPlan().losses


def test_grid_rows_set_their_own_lr_views_and_data(tmp_path):
    """A row's lr / views / data reach its run: the first N views of the store, or fresh crops
    (teacher-free) and the online teacher, both drawn with the store's recipe; bad values are
    one error naming the row."""
    torch.set_num_threads(1)
    tiny = build_tiny_store(tmp_path / "tiny", views=2, num_train=16, num_val=4)
    grid = tmp_path / "grid.toml"
    grid.write_text(
        '[[run]]\nname = "v1"\nlosses = "reg,kt"\nviews = 1\nlr = 0.01\n\n'
        '[[run]]\nname = "fresh"\nlosses = "rle"\ndata = "fresh"\nbatch_size = 4\n\n'
        '[[run]]\nname = "online"\nlosses = "reg,kt"\ndata = "online"\n\n'
        f'[[run]]\nname = "own"\nlosses = "reg"\nstore = "{tmp_path / "copy"}"\n'
    )
    shutil.copytree(tiny["store"], tmp_path / "copy")  # a row's own store (a mode, a teacher)
    kw = dict(
        model="distilpose_tiny", epochs=1, batch_size=8, val_ann=tiny["val_ann"],
        val_images=tiny["val_images"], device="cpu", workers=0,
    )  # fmt: skip
    ablate(tiny["store"], grid, tmp_path / "abl", **kw)
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    runs = {r["name"]: r for r in result["runs"]}
    meta = {
        name: json.loads((tmp_path / "abl" / "runs" / name / "config.json").read_text())
        for name in runs
    }
    assert meta["v1"]["run"]["views"] == 1 and meta["v1"]["run"]["lr"] == 0.01
    assert meta["fresh"]["run"]["store"] is None and meta["fresh"]["run"]["batch_size"] == 4
    assert meta["online"]["run"]["teacher_online"]
    assert meta["own"]["run"]["store"] == str(tmp_path / "copy")
    assert meta["v1"]["run"]["store"] == str(tiny["store"])
    stored = load_grid(grid)
    assert stored[1] == {"name": "fresh", "losses": "rle", "data": "fresh", "batch_size": 4}
    for bad, match in (("views = 0", "views = 0"), ('data = "cached"', "data"),
                       ("lr = true", "lr"), ("seeds = 3", "unknown key")):  # fmt: skip
        grid.write_text(f'[[run]]\nname = "x"\nlosses = "reg"\n{bad}\n')
        with pytest.raises(BadConfigError, match=match):
            load_grid(grid)
    grid.write_text('[[run]]\nname = "x"\nlosses = "reg"\nstore = "no/such/store"\n')
    with pytest.raises(BadConfigError, match="run 'x' store = 'no/such/store'; expected an"):
        ablate(tiny["store"], grid, tmp_path / "abl2", **kw)


def test_demo_grid_files_load_and_train_the_demo_objective():
    """benchmarks/grids/views.toml trains the demo's distilled objective at every V (and
    online, and cheap views); teacher_free.toml holds only teacher-free terms."""
    import demo
    from distilpose.training.losses import TEACHER_FREE

    grids = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"
    views = load_grid(grids / "views.toml")
    assert {r["losses"] for r in views} == {demo.DemoPlan().losses}
    plain = [r for r in views if "input_jitter" not in r]
    assert [r.get("views") for r in plain] == [1, 2, 4, 8, 16, None]
    assert plain[-1]["data"] == "online"
    assert all(r["input_jitter"] > 0 for r in views if r not in plain)  # cheap-view rows
    from store.schema import MODES

    modes = load_grid(grids / "modes.toml")  # a row per store mode, at the demo's views
    assert {r["name"] for r in modes} <= set(MODES) and "compact" in {r["name"] for r in modes}
    assert {(r["losses"], r["views"]) for r in modes} == {(demo.DemoPlan().losses,
                                                           demo.DemoPlan().views)}  # fmt: skip
    for r in load_grid(grids / "teacher_free.toml"):
        assert set(parse_losses_names(r["losses"])) <= set(TEACHER_FREE), r


def parse_losses_names(spec: str) -> list[str]:
    from distilpose.training.losses import parse_losses

    return list(parse_losses(spec))


def test_demo_grid_best_row_compares_rows_on_the_seed_every_row_ran():
    """A row repeated on 3 seeds is not beaten by a row run once on the strength of a mean over
    other seeds: rows are compared on the seed they all ran (the grid's repeat rule)."""
    from benchmarks.demo_grids import best_row

    repeated = {"name": "a", "seeds": [0, 1, 2], "aps": [0.5, 0.1, 0.1], "ap": 0.233}
    once = {"name": "b", "seeds": [0], "aps": [0.4], "ap": 0.4}
    assert best_row([repeated, once]) == (0, repeated)
    assert best_row([{**repeated, "aps": [0.3, 0.9, 0.9]}, once])[1] is once


def test_demo_grid_rows_on_more_seeds_merge_with_their_recorded_seeds():
    """`--rows name@1+2` beside a recorded seed 0: one row over seeds 0-2 (AP per seed, means
    weighted by seeds); overlapping seeds or other settings replace the recorded row."""
    from benchmarks.demo_grids import merge_seeds

    def row(seeds, aps, px, lr=0.003):
        return {"name": "a", "losses": "reg", "lr": lr, "seeds": seeds, "aps": aps,
                "ap": sum(aps) / len(aps), "ap_spread": max(aps) - min(aps), "ap50": 0.5,
                "pck": 0.5, "pixel_error": px, "train_s": 100.0}  # fmt: skip

    got = merge_seeds(row([0], [0.3], 10.0), row([2, 1], [0.1, 0.2], 13.0))
    assert got["seeds"] == [0, 1, 2] and got["aps"] == [0.3, 0.2, 0.1]
    assert got["ap"] == pytest.approx(0.2) and got["ap_spread"] == pytest.approx(0.2)
    assert got["pixel_error"] == pytest.approx(12.0)  # (10 x 1 + 13 x 2) / 3
    newer = row([0, 1], [0.4, 0.5], 9.0)
    assert merge_seeds(row([0], [0.3], 10.0), newer) is newer  # seed 0 again: replaced
    other = row([1], [0.2], 9.0, lr=0.01)
    assert merge_seeds(row([0], [0.3], 10.0), other) is other  # other settings: replaced
    assert merge_seeds(None, other) is other
    older = {k: v for k, v in row([0], [0.3], 10.0).items() if k != "lr"}  # a field added later
    assert merge_seeds(older, row([1], [0.1], 12.0))["seeds"] == [0, 1]


def test_demo_grid_record_without_a_shared_seed_says_so():
    from benchmarks.demo_grids import NO_BEST, format_record
    from demo import QUICK_DEMO

    rows = [{"name": n, "losses": "reg", "seeds": [s], "aps": [0.1], "ap": 0.1, "ap_spread": 0.0,
             "ap50": 0.2, "pck": 0.3, "pixel_error": 9.0, "train_s": 1.0, "teacher_forwards": 1}
            for n, s in (("a", 0), ("b", 1))]  # fmt: skip
    assert NO_BEST in format_record("teacher-free", rows, QUICK_DEMO, True, 1.0, "")


def test_views_record_recommends_the_fewest_views_that_reach_the_online_range():
    """The README's answer names the smallest plain store on as many seeds as the online
    teacher that reaches its seed range (not the best row, not a cheap-view row); with none,
    the best store row."""
    from benchmarks.demo_grids import recommended_views

    def row(name, views, ap, seeds=(0, 1, 2), **kw):
        return {"name": name, "views": views, "ap": ap, "aps": [ap] * len(seeds),
                "seeds": list(seeds), "data": "store", **kw}  # fmt: skip

    online = {"name": "online", "data": "online", "ap": 0.30, "aps": [0.28, 0.30, 0.32],
              "seeds": [0, 1, 2]}  # fmt: skip
    rows = [row("v1", 1, 0.20), row("v2", 2, 0.29), row("v4", 4, 0.35),
            row("v1_jitter", 1, 0.31, input_jitter=0.4), online]  # fmt: skip
    assert recommended_views({"rows": rows})["name"] == "v2"
    low = [row("v1", 1, 0.20), row("v2", 2, 0.25), online]
    assert recommended_views({"rows": low})["name"] == "v2"  # none reaches: the best
    assert recommended_views({"rows": [row("v1", 1, 0.27), *low[1:]]})["name"] == "v1"
    # a row on one seed is not compared with the online teacher's three
    once = [row("v1", 1, 0.31, seeds=(0,)), row("v2", 2, 0.29), online]
    assert recommended_views({"rows": once})["name"] == "v2"


def test_views_rows_run_on_their_own_seeds_pooled():
    """`demo_grids --rows v2,v4@0`: a name alone on every seed, `name@0+2` on those seeds; the
    pairs train as one grid, each row with its own seed (a row setting ablate checks)."""
    from benchmarks.demo_grids import row_jobs
    from student_train.ablate import _row_settings

    rows = [{"name": "v2"}, {"name": "v4"}]
    jobs = row_jobs("v2,v4@0+2", rows, [0, 1])
    assert [(r["name"], s) for r, s in jobs] == [("v2", 0), ("v2", 1), ("v4", 0), ("v4", 2)]
    for bad in ("v3", "v4@one"):
        with pytest.raises(ValueError, match=bad):
            row_jobs(bad, rows, [0])
    assert _row_settings({"name": "a", "losses": "reg", "seed": 0}, "g") == {"seed": 0}
    with pytest.raises(BadConfigError, match="seed = -1; expected an integer >= 0"):
        _row_settings({"name": "a", "losses": "reg", "seed": -1}, "g")


def test_modes_record_sorts_by_bytes_and_judges_the_default_against_fp16(tmp_path):
    """The modes grid's table (a row per store mode with its bytes per view), the sentence on
    the default compact mode against fp16's seed range, the record and the plot."""
    from benchmarks import demo_grids as g

    def row(mode: str, aps: list[float]) -> dict:
        return {"name": mode, "losses": "reg", "views": 8, "seeds": list(range(len(aps))),
                "aps": aps, "ap": sum(aps) / len(aps), "ap_spread": max(aps) - min(aps),
                "ap50": 0.7, "pck": 0.6, "pixel_error": 9.0, "train_s": 600.0}  # fmt: skip

    best = g.DEFAULT_COMPACT  # the setting --mode compact gives a new store
    sizes = {m: {"target": kb * 1e3, "pixel": 20e3, "label": 160.0}
             for m, kb in (("fp16", 49.5), (best, 5.5), ("lossy", 17.7))}  # fmt: skip
    table = g.modes_table(
        [row("fp16", [0.39, 0.40, 0.41]), row("lossy", [0.4]), row(best, [0.38, 0.395])],
        sizes,
    )
    assert [r["mode"] for r in table] == [best, "lossy", "fp16"]
    text = g.modes_verdict(table)
    assert f"default `{best}` targets (5.50 kB per view against fp16's 49.50 kB, 9.0x" in text
    assert "below fp16's seed range (0.400, 0.390-0.410 over seeds [0, 1, 2])" in text
    table[0]["aps"], table[0]["ap"] = [0.395, 0.405], 0.4
    assert "within fp16's seed range" in g.modes_verdict(table)
    from demo import DemoPlan

    record = g.format_modes(table, DemoPlan(), 1.0)
    assert f"| `{best}` | 5.50 | 20.00 | 0,1 | 0.400 |" in record
    g.plot_modes(table, tmp_path / "modes.png")
    assert (tmp_path / "modes.png").stat().st_size > 1000
    # a record of rows rerun side by side, without the default setting: each one is judged
    rerun = [dict(r, mode="compact-xl") if r["mode"] == best else r for r in table]
    rerun = [r for r in rerun if r["mode"] != "lossy"]
    assert g.record_verdict(rerun).startswith("The `compact-xl` targets (5.50 kB per view")


@pytest.mark.parametrize("name", ["../x", "modes_grid_", "other", "modes_grid_a/b"])
def test_a_modes_record_name_outside_the_results_folder_is_refused(name, capsys):
    """`--record` names a file in benchmarks/results that the README block finds."""
    from benchmarks import demo_grids as g

    with pytest.raises(SystemExit) as e:
        g.main(["modes", "--record", name])
    assert e.value.code == 2
    assert f"--record {name}: expected modes_grid or modes_grid_NAME" in capsys.readouterr().err
