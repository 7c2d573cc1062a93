"""SIGKILL `dump_teacher` at random moments, 10 times in a row, each followed by a resume: the
finished store equals an uninterrupted dump sample for sample (issue 8)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distilpose.data import make_demo_data
from distilpose.models import build_model, save_checkpoint
from distilpose.training.runs import DumpRun
from store import StoreReader, array_specs
from teacher_dump.dump import dump_teacher

KILLS = 10
# 40 instances x 3 views in units of 4 samples: 30 units, each a fresh chance to die mid-write.
UNITS = 30
DUMP = dict(views=3, seed=5, batch_size=4, workers=0, device="cpu", chunk_samples=4, shard_chunks=1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # also makes forking a child that runs torch safe
    yield
    torch.set_num_threads(n)


def complete_units(store: Path) -> int:
    d = store / "complete"
    return len([f for f in os.listdir(d) if f.startswith("u")]) if d.is_dir() else 0


def read_all(path: Path) -> dict[str, np.ndarray]:
    reader = StoreReader.open(path)
    assert reader.complete_mask().all(), f"{path} is incomplete"
    total = reader.layout.num_slots(reader.meta.views)
    return reader.read_slots(0, total, fields=list(array_specs(reader.meta)))


@pytest.mark.reliability(
    case="dump-teacher after SIGKILL, 10 kills in a row",
    outcome="resumed store equals an uninterrupted dump, sample for sample",
)
def test_ten_random_kills_then_resume_equal_an_uninterrupted_dump(tmp_path, record_property):
    data = make_demo_data(tmp_path / "demo", num_train=40, num_val=4)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    save_checkpoint(teacher, build_model("tokenpose_tiny", depth=2), meta={"role": "teacher"})

    def dump(out: Path) -> dict:
        return dump_teacher(DumpRun(teacher, data["train_ann"], data["train_images"], out, **DUMP))

    # The uninterrupted reference first: its timing scales the kill moments to this machine.
    ref = tmp_path / "reference"
    summary = dump(ref)
    unit_s = summary["time_s"] / UNITS  # includes start-up: generous

    out = tmp_path / "killed"
    rng = random.Random(1234)
    interrupted, progress = 0, []
    for _ in range(KILLS):
        before = complete_units(out)
        p = mp.get_context("fork").Process(target=dump, args=(out,), daemon=True)
        p.start()
        # A random moment: right away (opening or even creating the store), or somewhere in
        # the unit after 0-1 more units have completed (computing, writing, fsyncing, marking).
        wait_units = rng.choice([None, 0, 1])
        if wait_units is None:
            time.sleep(rng.uniform(0.0, 4 * unit_s))
        else:
            deadline = time.time() + 30
            while complete_units(out) < before + wait_units and p.is_alive():
                if time.time() > deadline:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, unit_s))
        if p.is_alive() and complete_units(out) < UNITS:
            interrupted += 1  # a kill in a running, unfinished dump
        p.kill()
        p.join()
        progress.append(complete_units(out))

    # Most kills must land in a running, unfinished dump, or the test would prove nothing.
    assert interrupted >= KILLS - 2, (interrupted, progress)
    final = dump(out)
    assert final["units"] == UNITS - progress[-1]
    a, b = read_all(out), read_all(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"array '{name}' differs after {KILLS} kills"
    # nothing left behind by the killed writers
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    record_property("kills_survived", KILLS)
