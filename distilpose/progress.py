"""Progress bars for every loop over data that can take more than a few seconds.

Rich comes with typer, so no extra dependency. Bars go to stderr, show rate and time left, and
switch themselves off when stderr is not a terminal (CI logs, pipes) or when
`DISTILPOSE_NO_PROGRESS=1`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


def progress_enabled() -> bool:
    """True when a bar would be useful: an interactive stderr and not switched off by env."""
    if os.environ.get("DISTILPOSE_NO_PROGRESS", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool | None = None,
) -> Iterator[T]:
    """Yield from `iterable` while drawing a bar with `unit`/s and time left."""
    if disable is None:
        disable = not progress_enabled()
    if disable:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with ProgressCounter(total, desc=desc, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.advance()


class ProgressCounter:
    """A bar advanced by hand, for loops that count samples rather than iterations."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "samples") -> None:
        self.unit = unit
        self._bar: Progress | None = None
        if progress_enabled():
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task(desc, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)
            speed = self._bar.tasks[0].speed
            if speed:
                self._bar.update(self._task, rate=f"{speed:,.1f} {self.unit}/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
