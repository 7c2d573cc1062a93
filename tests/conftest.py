"""Shared test settings, and the reliability report written from the test suite's own run.

Tests of faults and bad inputs carry `@pytest.mark.reliability(case, outcome)`; a test that
survives kills records `record_property("kills_survived", n)`. When the whole suite runs
(`pytest` with no narrowing), the outcomes are written to benchmarks/results/reliability.md,
the table docs/reliability.md and the README link: figures from a run, not from prose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reliability.md"

os.environ.setdefault("DISTILPOSE_NO_PROGRESS", "1")
os.environ["DISTILPOSE_OFFLINE"] = "1"  # no test may download detector weights


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability(case, outcome): a fault or bad-input case for the report"
    )
    config._reliability = []  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or report.when != "call":
        return
    case = marker.kwargs.get("case", marker.args[0] if marker.args else item.name)
    param = getattr(getattr(item, "callspec", None), "id", None)
    props = dict(report.user_properties)
    item.config._reliability.append(  # type: ignore[attr-defined]
        {
            "case": f"{case}: {param}" if param else case,
            "outcome": marker.kwargs.get("outcome", marker.args[1] if len(marker.args) > 1 else ""),
            "result": report.outcome,
            "kills": props.get("kills_survived"),
            "test": item.nodeid,
        }
    )


def _whole_suite(config: pytest.Config) -> bool:
    tests_dir = Path(__file__).resolve().parent
    narrowed = config.getoption("keyword") or config.getoption("markexpr")
    args = [Path(a).resolve() for a in config.args]
    return not narrowed and all(a == tests_dir for a in args)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    records = session.config._reliability  # type: ignore[attr-defined]
    if not records or not _whole_suite(session.config):
        return
    kills = sum(r["kills"] or 0 for r in records if r["result"] == "passed")
    passed = sum(r["result"] == "passed" for r in records)
    lines = [
        "## Reliability (written by the test suite's last full run)",
        "",
        f"{len(records)} fault and bad-input cases tried, {passed} behaved as stated; "
        f"{kills} SIGKILLs survived with results equal to uninterrupted runs.",
        "",
        "| case | what happens | result | kills |",
        "|---|---|---|---:|",
    ]
    for r in sorted(records, key=lambda r: r["case"]):
        lines.append(f"| {r['case']} | {r['outcome']} | {r['result']} | {r['kills'] or ''} |")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """An untrained `tokenpose_tiny` teacher checkpoint (seed 0): for dump plumbing tests."""
    from distilpose.models import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    save_checkpoint(path, build_model("tokenpose_tiny"), meta={"role": "teacher"})
    return path
