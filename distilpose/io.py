"""Atomic file writes: the one home of temp-file-then-rename.

Every file the toolkit writes for a user (checkpoints, metrics.csv, config.json, results JSON,
figures, ONNX files, store completion markers) is written to a temporary file beside its
destination and `os.replace`d into place, so a crash or a full disk leaves either the old file
or the new one, never half of one. `durable=True` also fsyncs the file before the rename and the
directory after it (checkpoints and store markers, whose presence others rely on).
`MetricsLog` is a run's metrics.csv (the trainer appends to it, the curves read it back).

    with atomic_open(run_dir / "metrics.csv", "w", newline="") as f:
        f.write(text)
    with atomic_path(out_png) as tmp:          # for writers that want a path
        fig.savefig(tmp, format="png")
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it is durable; not possible everywhere."""
    try:
        fsync_path(path)
    except OSError:  # some filesystems refuse fsync on directories; the data files are synced
        pass


def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _temp_beside(path: Path, durable: bool) -> Path:
    """A new empty file `.{name}.<random>.tmp` beside `path`, with the mode a plain open() gives.
    Durable writes (checkpoints, store markers) take theirs from `tempfile.mkstemp`."""
    prefix = f".{path.name}."
    if durable:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600 files
    else:
        name = str(path.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}.tmp")
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception the
    temporary file replaces `path`, otherwise it is removed. The parent folder is created.
    OSErrors (read-only or full disk) propagate to the caller."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path, durable)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, durable: bool = False, **open_kwargs: Any
) -> Iterator[IO]:
    """`open(path, mode)` that writes atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    with atomic_open(path, "w", durable=durable) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as compact JSON atomically."""
    return write_text_atomic(path, json.dumps(obj))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MetricsLog:
    """metrics.csv: appended row by row; a row with new columns rewrites the file once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] = []
        if path.exists():
            with path.open(newline="") as f:
                self.fields = list(csv.DictReader(f).fieldnames or [])

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields, restval="")
            w.writeheader()
            w.writerows(rows)

    def keep(self, keep: Callable[[dict], bool]) -> None:
        """Drop the rows a killed run logged after its last checkpoint."""
        if self.path.exists():
            self._rewrite([r for r in self.rows() if keep(r)])

    def append(self, row: dict) -> None:
        new = [k for k in row if k not in self.fields]
        if new or not self.path.exists():
            rows = self.rows()
            self.fields += new
            self._rewrite(rows + [row])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, restval="").writerow(row)
