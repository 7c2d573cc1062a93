"""The README and docs/: every relative link resolves, and every document in docs/ is linked
from the README (a section moved out of the README must stay reachable from it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_document_is_linked_from_the_readme():
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    missing = [
        f"docs/{p.name}"
        for p in sorted((ROOT / "docs").glob("*.md"))
        if f"docs/{p.name}" not in linked
    ]
    assert not missing, f"documents the README does not link: {missing}"


def test_readme_views_answer_is_written_from_the_record():
    """The README's views answers are `benchmarks.demo_grids.views_block` of the records."""
    from benchmarks.demo_grids import MARK, views_block

    text = (ROOT / "README.md").read_text()
    block = text.split(MARK[0], 1)[1].split(MARK[1], 1)[0].strip()
    assert block == views_block()


def test_readme_modes_answer_is_written_from_the_record():
    """The README's bytes-per-view answer is `benchmarks.demo_grids.modes_block` of the record."""
    from benchmarks.demo_grids import modes_block

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- modes-curve -->\n", 1)[1].split("<!-- /modes-curve -->", 1)[0]
    assert block.strip() == modes_block()


def test_scale_out_views_rule_is_written_from_the_records():
    """docs/scale-out.md's views rule is `benchmarks.demo_grids.rule_block` of the records."""
    from benchmarks.demo_grids import SCALE_OUT, rule_block

    text = SCALE_OUT.read_text()
    block = text.split("<!-- views-rule -->\n", 1)[1].split("<!-- /views-rule -->", 1)[0]
    assert block.strip() == rule_block()


def test_readme_demo_block_is_written_from_the_record():
    """The README's demo table and its paragraph are `benchmarks.demo_bench.readme_block` of
    the recorded demo runs (benchmarks/results/demo_run.json)."""
    import json

    from benchmarks.demo_bench import MARK, readme_block

    record = ROOT / "benchmarks" / "results" / "demo_run.json"
    text = (ROOT / "README.md").read_text()
    block = text.split(MARK[0], 1)[1].split(MARK[1], 1)[0].strip()
    assert block == readme_block(json.loads(record.read_text()))


def test_performance_summary_is_written_from_the_records():
    """docs/performance.md's table and its notes are `benchmarks.perf_doc`'s, from the
    benchmark records (a rerun benchmark that changes a figure fails here until
    `python -m benchmarks.perf_doc` rewrites the page)."""
    from benchmarks.perf_doc import DOCS, notes, table

    text = DOCS.read_text()
    block = text.split("<!-- perf-table -->\n", 1)[1].split("<!-- /perf-table -->", 1)[0]
    assert block.strip() == f"{table()}\n\n{notes()}"
