"""Where a store lives: a local directory or an fsspec URL, its completion markers, and the
network rules of remote reads (timeouts, connection errors).

The format (which arrays, which metadata, the marker directory's name) is `store.schema`'s; this
module only finds and moves the bytes.
"""

from __future__ import annotations

import json
import os
import re

from distilpose.errors import StoreConnectionError, StoreFormatError
from distilpose.io import atomic_open
from store.schema import COMPLETE_DIR, SIGNED_FILE


class StoreLocation:
    """A store's address: a local directory or any fsspec URL (read; written on object stores
    such as S3: see store/remote.py).

    Completion markers are plain files under `complete/`; they are listed and written here
    rather than through zarr so that local writes can be fsynced and renamed into place.
    """

    def __init__(self, path_or_url: object, storage_options: dict | None = None) -> None:
        self.text = str(path_or_url)
        self.storage_options = dict(storage_options or {})
        # seconds a remote read may take before it is an error (not a hang)
        self.timeout = float(
            self.storage_options.pop("timeout", None)
            or os.environ.get("DISTILPOSE_REMOTE_TIMEOUT")
            or DEFAULT_REMOTE_TIMEOUT_S
        )
        self.is_local = "://" not in self.text
        if self.is_local:
            self.root = os.path.abspath(os.path.expanduser(self.text))
            self.fs = None
        else:
            import fsspec

            from store.remote import fsspec_options  # request timeouts and retries (S3)

            protocol = self.text.split("://", 1)[0]
            self.storage_options = fsspec_options(protocol, self.storage_options)
            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.text, **self.storage_options)
            except ImportError as e:
                protocol = self.text.split("://", 1)[0]
                raise StoreFormatError(
                    f"{self.text}: {protocol}:// stores need the remote extra ({e}); "
                    "expected it installed: pip install 'distilpose[remote]'"
                ) from None
            except ValueError as e:
                raise StoreFormatError(f"{self.text}: not a store URL fsspec knows ({e})") from None
            self.root = self.root.rstrip("/")

    def remote(self, fn, *args, what: str = "read"):
        """Call `fn(*args)` against a remote store within `timeout`; connection failures and
        silence become StoreConnectionError (FileNotFoundError passes through)."""
        import threading

        box: dict = {}

        def target() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e

        t = threading.Thread(target=target, daemon=True, name="store_remote")
        t.start()
        t.join(self.timeout)
        if t.is_alive():
            raise StoreConnectionError(
                f"{self}: no answer within {self.timeout:g} s ({what}); expected a reachable "
                "store (check the network, or raise DISTILPOSE_REMOTE_TIMEOUT)"
            )
        if "error" in box:
            e = box["error"]
            if isinstance(e, FileNotFoundError) and is_connection_error(e.__cause__):
                e = e.__cause__  # fsspec's http reports a refused connection as "not found"
            elif isinstance(e, FileNotFoundError) or not is_connection_error(e):
                raise e
            raise StoreConnectionError(
                f"{self}: cannot reach the store ({type(e).__name__}: {first_line(e)}) during "
                f"{what}; expected a reachable store (check the URL and the network)"
            ) from e
        return box.get("value")

    def __str__(self) -> str:
        return self.text

    def zarr_store(self, read_only: bool):
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(
            self.text, storage_options=self.storage_options or None, read_only=read_only
        )

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        p = self.join(*parts)
        if self.is_local:
            return os.path.exists(p)
        try:  # not fs.exists: it reads a dropped connection as "no such file"
            self.remote(self.fs.info, p, what=f"looking up {'/'.join(parts)}")
        except FileNotFoundError:
            return False
        return True

    def list_markers(self) -> list[int]:
        """Units whose completion marker exists."""
        d = self.join(COMPLETE_DIR)
        try:
            names = (
                os.listdir(d)
                if self.is_local
                else [
                    n.rsplit("/", 1)[-1]
                    for n in self.remote(self.fs.ls, d, False, what="listing markers")
                ]
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for n in names if (m := _MARKER.fullmatch(n)))

    def write_marker(self, unit: int, payload: dict) -> None:
        """Write unit's marker durably: temp file, fsync, rename, fsync the directory."""
        data = json.dumps(payload, sort_keys=True).encode()
        name = marker_name(unit)
        if not self.is_local:
            self.fs.makedirs(self.join(COMPLETE_DIR), exist_ok=True)
            self.fs.pipe_file(self.join(COMPLETE_DIR, name), data)
            return
        d = self.join(COMPLETE_DIR)
        os.makedirs(d, exist_ok=True)
        # temp markers a killed writer left are removed by the writer that holds the unit
        # (StoreWriter._clear_partials): never here, where another live writer's could be hit
        with atomic_open(os.path.join(d, name), "wb", durable=True) as f:
            f.write(data)

    def read_marker(self, unit: int) -> dict:
        """A unit's marker payload ({} for a legacy empty one); StoreFormatError if unreadable."""
        from distilpose.limits import loads_json

        path = self.join(COMPLETE_DIR, marker_name(unit))
        try:
            data = self._read_bytes(path)
        except FileNotFoundError:
            raise StoreFormatError(f"{self}: marker of unit {unit} vanished ({path})") from None
        return loads_json(data, path) if data.strip() else {}

    def read_markers(self, units: list[int]) -> dict[int, bytes]:
        """The raw bytes of several units' markers (remote: one concurrent request); a marker
        that vanished is missing from the result."""
        paths = {self.join(COMPLETE_DIR, marker_name(u)): u for u in units}
        if self.is_local or len(paths) < 2:
            out = {}
            for path, unit in paths.items():
                try:
                    out[unit] = self._read_bytes(path)
                except FileNotFoundError:
                    pass
            return out
        got = self.remote(
            self.fs.cat, list(paths), False, "omit", what=f"reading {len(paths)} markers"
        )
        return {paths[p]: data for p, data in got.items() if p in paths}

    def read_signed(self) -> bytes | None:
        """The bytes of `complete/signed.json` (None where there is none yet)."""
        try:
            return self._read_bytes(self.join(COMPLETE_DIR, SIGNED_FILE))
        except FileNotFoundError:
            return None

    def write_signed(self, data: bytes) -> None:
        """Replace `complete/signed.json` durably (local: temp file, fsync, rename)."""
        if not self.is_local:
            self.fs.makedirs(self.join(COMPLETE_DIR), exist_ok=True)
            self.fs.pipe_file(self.join(COMPLETE_DIR, SIGNED_FILE), data)
            return
        os.makedirs(self.join(COMPLETE_DIR), exist_ok=True)
        with atomic_open(self.join(COMPLETE_DIR, SIGNED_FILE), "wb", durable=True) as f:
            f.write(data)

    def check_ranges(self) -> None:
        """An http(s) store needs a server that answers Range requests (zarr reads each chunk
        and each shard index as a byte range): one line saying so where it ignores them, rather
        than every shard read as damaged bytes. Asked once, of zarr.json's first byte."""
        if self.is_local or not self.text.startswith(("http://", "https://")):
            return
        path = self.join("zarr.json")
        data = self.remote(self.fs.cat_file, path, 0, 1, what="a range request")
        if len(data) != 1:
            raise StoreConnectionError(
                f"{self}: the HTTP server ignores Range requests (asked for 1 byte of zarr.json, "
                f"got {len(data)}); expected a server that answers byte ranges (206 Partial "
                "Content), which zarr needs to read shards: serve the store with one that does "
                "(nginx, S3, `python -m RangeHTTPServer`), or copy it to a local disk"
            )

    def _read_bytes(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        return self.remote(self.fs.cat_file, path, what=f"reading {path}")

    def file_size(self, relpath: str) -> int:
        """Size in bytes of a file of the store; 0 if it does not exist."""
        path = self.join(relpath)
        try:
            if self.is_local:
                return os.path.getsize(path)
            return int(self.remote(self.fs.size, path, what=f"sizing {path}") or 0)
        except FileNotFoundError:
            return 0

    def tree_bytes(self, *parts: str) -> int:
        """Bytes of every file under a folder of the store (the whole store without `parts`);
        0 if it does not exist. Remote: one `du` within the remote timeout."""
        root = self.join(*parts) if parts else self.root
        if self.is_local:
            return sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
            )
        try:
            size = self.remote(self.fs.du, root, True, what=f"sizing {'/'.join(parts) or 'it'}")
        except FileNotFoundError:
            return 0
        return int(size or 0)

    def file_crc32c(self, relpath: str) -> tuple[int, int]:
        """(size, crc32c) of a file of the store; (0, 0) if it does not exist."""
        import google_crc32c

        try:
            data = self._read_bytes(self.join(relpath))
        except FileNotFoundError:
            return 0, 0
        return len(data), int(google_crc32c.value(data)) if data else 0


_MARKER = re.compile(r"u(\d+)\.json")
DEFAULT_REMOTE_TIMEOUT_S = 60.0


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_connection_error(e: BaseException | None) -> bool:
    """Network trouble (refused, reset, DNS, timeouts, HTTP client errors), not bad data."""
    if e is None:
        return False
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    module = type(e).__module__.split(".")[0]
    return isinstance(e, OSError | TimeoutError | ConnectionError) or module in (
        "aiohttp",
        "botocore",
        "requests",
        "urllib3",
    )


def marker_name(unit: int) -> str:
    return f"u{unit:07d}.json"


def syncfs(path: str) -> bool:
    """Flush the whole filesystem holding `path` (Linux syncfs): one call instead of an fsync
    per shard file and directory, about 50x faster for a unit's ~40 new files and directories.
    False where unavailable (the caller then fsyncs file by file)."""
    global _SYNCFS
    if _SYNCFS is None:
        try:
            import ctypes

            _SYNCFS = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _SYNCFS = False
    if not _SYNCFS:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)
    return True


_SYNCFS = None


SETTLE_TIMEOUT_S = 60.0  # after a failed read or write, how long its sibling requests may run


def run_settled(coro, timeout: float = SETTLE_TIMEOUT_S):
    """`zarr.core.sync.sync(coro)`; when it fails, every other task on zarr's event loop is
    first let finish (then cancelled after `timeout` seconds) and their errors retrieved.

    zarr gathers a shard's chunk writes (and reads) without waiting for the siblings of one
    that fails; they would keep running past the error line and print "Task was destroyed but
    it is pending!" and "Task exception was never retrieved" tracebacks when the process exits
    (a full disk mid-dump printed a dozen)."""
    from zarr.core.sync import sync

    try:
        return sync(coro)
    except BaseException:
        sync(_settle(timeout))
        raise


async def _settle(timeout: float) -> None:
    import asyncio

    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=timeout)
    for task in pending:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the error line already said what failed
