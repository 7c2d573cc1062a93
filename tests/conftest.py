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
_RECORDS: list[dict] = []  # the reliability cases' results, in the process that writes REPORT

os.environ.setdefault("DISTILPOSE_NO_PROGRESS", "1")
os.environ["DISTILPOSE_OFFLINE"] = "1"  # no test may download detector weights
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # the suite runs in xdist workers (pyproject's addopts), one per core: torch's default of a
    # thread per core in every worker would oversubscribe the cores
    _cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability(case, outcome): a fault or bad-input case for the report"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A reliability case's name and stated outcome go into its report's user properties: the
    report is what reaches the controller when the suite runs in xdist workers."""
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or report.when != "call":
        return
    case = marker.kwargs.get("case", marker.args[0] if marker.args else item.name)
    param = getattr(getattr(item, "callspec", None), "id", None)
    said = marker.kwargs.get("outcome", marker.args[1] if len(marker.args) > 1 else "")
    report.user_properties.append(("reliability", (f"{case}: {param}" if param else case, said)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    props = dict(report.user_properties)
    if report.when != "call" or "reliability" not in props:
        return
    case, said = props["reliability"]
    _RECORDS.append(
        {
            "case": case,
            "outcome": said,
            "result": report.outcome,
            "kills": props.get("kills_survived"),
            "test": report.nodeid,
        }
    )


def _whole_suite(config: pytest.Config) -> bool:
    tests_dir = Path(__file__).resolve().parent
    narrowed = config.getoption("keyword") or config.getoption("markexpr")
    args = [Path(a).resolve() for a in config.args]
    return not narrowed and all(a == tests_dir for a in args)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    records = _RECORDS
    worker = hasattr(session.config, "workerinput")  # an xdist worker: the controller writes
    if worker or not records or not _whole_suite(session.config):
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
