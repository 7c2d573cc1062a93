"""Each demo plan keeps its own folder under `--out`: `--quick` after the full demo leaves the
full one's files alone, a rerun with the same settings keeps (and so resumes) its folder, and one
with other settings starts over and says which settings changed."""

from __future__ import annotations

from dataclasses import asdict

import pytest

import demo
from distilpose.errors import BadConfigError


def _settings(plan: demo.DemoPlan, seed: int = 0) -> dict:
    return {**asdict(plan), "seed": seed, "train_teacher": False}


def test_plans_keep_their_own_folders(tmp_path):
    said: list[str] = []
    full = demo.plan_folder(tmp_path, demo.DemoPlan(), _settings(demo.DemoPlan()), said.append)
    (full / "store").mkdir()
    quick = demo.plan_folder(tmp_path, demo.QUICK_DEMO, _settings(demo.QUICK_DEMO), said.append)
    assert full != quick and full.parent == quick.parent == tmp_path
    assert (full / "store").is_dir() and not said


def test_same_settings_resume_other_settings_start_over(tmp_path):
    said: list[str] = []
    plan = demo.QUICK_DEMO
    folder = demo.plan_folder(tmp_path, plan, _settings(plan), said.append)
    (folder / "student_distilled").mkdir()
    assert demo.plan_folder(tmp_path, plan, _settings(plan), said.append) == folder
    assert (folder / "student_distilled").is_dir() and not said
    demo.plan_folder(tmp_path, plan, _settings(plan, seed=1), said.append)
    assert not (folder / "student_distilled").exists()
    assert len(said) == 1 and "starting over" in said[0] and "seed" in said[0], said


def test_a_folder_the_demo_did_not_make_is_refused(tmp_path):
    mine = tmp_path / "full" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("keep me")
    with pytest.raises(BadConfigError, match="demo_settings.json"):
        demo.plan_folder(tmp_path, demo.DemoPlan(), _settings(demo.DemoPlan()), print)
    assert mine.read_text() == "keep me"


def test_teacher_free_best_equal_to_reg_alone_trains_once(tmp_path):
    """When the grid's teacher-free best is `reg` alone from the store, the two table rows are
    one run (one folder, trained once); any other teacher-free setting is its own run, and
    `fresh` data trains from the images with the store's recipe instead of the store."""
    from distilpose.data import MILD_RECIPE

    data = {"train_ann": "a.json", "train_images": "imgs"}
    same = demo.DemoPlan(free_losses="reg", free_data="store", free_lr=None)
    runs = demo.student_runs(same, tmp_path, data, 0, "cpu")
    assert runs["student_teacher_free"] is runs["student_baseline"]
    assert len({r.out_dir for r in runs.values()}) == 2
    fresh = demo.student_runs(
        demo.DemoPlan(free_losses="rle", free_data="fresh"), tmp_path, data, 0, "cpu"
    )
    free = fresh["student_teacher_free"]
    assert free is not fresh["student_baseline"] and free.losses == "rle"
    assert free.store is None and free.ann_file == "a.json" and free.recipe == MILD_RECIPE
    assert fresh["student_baseline"].store == str(tmp_path / "store")


def test_one_run_in_two_rows_is_evaluated_once(tmp_path, capsys):
    """The teacher-free row that is the `reg` run shows that run's evaluation, not a second one
    (an evaluation is the same checkpoint on the same val split: 10-20 s of the demo)."""
    tiny = demo.DemoPlan(
        name="quick", num_train=16, num_val=4, views=1, student_epochs=1, batch_size=8,
        free_losses="reg", free_data="store",
    )  # fmt: skip
    rows = demo.run_demo(tmp_path, plan=tiny, device="cpu")
    said = capsys.readouterr().out
    by_role = {r["role"]: r for r in rows}
    free, base = by_role["student_teacher_free"], by_role["student_baseline"]
    assert {**free, "role": base["role"]} == base
    assert said.count("on the val split") == 3  # teacher, distilled, the shared run
    assert said.count("run's checkpoint, evaluated above") == 1
    results = tmp_path / "quick" / "results"
    assert (results / "student_teacher_free.json").read_bytes() == (
        results / "student_baseline.json"
    ).read_bytes()


def test_demo_plans_dump_the_views_their_curves_recommend():
    """Each plan's view count is what its recorded views curve recommends (the fewest views,
    on as many seeds as the online teacher, that reach its seed range): a new record that moves
    the answer fails here until the plan follows it."""
    import json

    from benchmarks.demo_grids import VIEWS_RECORDS, recommended_views

    for quick, plan in ((False, demo.DemoPlan()), (True, demo.QUICK_DEMO)):
        record = json.loads(VIEWS_RECORDS[quick].read_text())
        assert plan.views == recommended_views(record)["views"], plan.name


def test_train_student_views_hint_follows_the_full_curve():
    """train-student's hint (a run that reads each view far more often than the curve found
    enough) quotes the full demo's recorded epochs per view, and stays quiet within twice it."""
    import json

    from benchmarks.demo_grids import VIEWS_RECORDS, epochs_per_view
    from student_train.train import EPOCHS_PER_VIEW_MATCHED, views_hint

    _, per_view = epochs_per_view(json.loads(VIEWS_RECORDS[False].read_text()))
    assert EPOCHS_PER_VIEW_MATCHED == round(per_view, 1)
    assert "300 times" in views_hint(300, 1)
    assert views_hint(int(2 * per_view), 1) is None


def test_the_demos_teacher_free_row_is_the_recorded_grids_best():
    """DemoPlan's teacher-free settings (losses, data, lr) are the best row of the recorded
    teacher-free grid (benchmarks/results/teacher_free_grid_quick.json), as the table says."""
    import json
    from pathlib import Path

    from benchmarks.demo_grids import best_row

    record = Path(__file__).resolve().parents[1] / "benchmarks/results/teacher_free_grid_quick.json"
    _, best = best_row(json.loads(record.read_text())["rows"])
    plan = demo.DemoPlan()
    assert plan.free_losses == best["losses"], best["name"]
    assert plan.free_data == best.get("data", "store"), best["name"]
    assert plan.free_lr in (None, best.get("lr")), best["name"]
