"""Benchmarks: each module measures one speed or size goal and records its table in results/."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def update_readme_block(name: str, text: str, readme: Path = README) -> bool:
    """Put `text` (a table a benchmark just measured) between the README's `<!-- name -->` and
    `<!-- /name -->` markers, so the README shows the last run's figures, never hand-copied ones.
    Returns False (and changes nothing) when the README has no such block."""
    if not readme.is_file():
        return False
    old = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
    if not pattern.search(old):
        return False
    readme.write_text(
        pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), old)
    )
    return True
