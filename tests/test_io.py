"""The one home of atomic writes and of device resolution."""

import os

import pytest
import torch

from distilpose.device import resolve_device
from distilpose.io import atomic_open, atomic_path, write_json_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path, durable):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError), atomic_open(path, "w", durable=durable) as f:
        f.write("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{"a": 1}'  # the old file, whole
    with atomic_open(path, "w", durable=durable) as f:
        f.write("new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temp file left
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as a plain open() would make it


def test_atomic_path_for_writers_that_want_a_path(tmp_path):
    out = tmp_path / "a.bin"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"x")
        assert not out.exists()
    assert out.read_bytes() == b"x"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device("auto", local_rank=0)
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
