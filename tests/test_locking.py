"""The per-lab experiment lock."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from lab.errors import LabError
from lab.locking import experiment_lock, lock_path


def hold_lock_then_report(prefix, ready, release):
    with experiment_lock(prefix):
        ready.set()
        release.wait(10)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRLAB_STATE", str(tmp_path))
    return tmp_path


def test_lock_excludes_second_holder(state):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock_then_report, args=("unit", ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LabError, match=f"process {holder.pid}"):
            with experiment_lock("unit"):
                pass
    finally:
        release.set()
        holder.join(10)
    with experiment_lock("unit"):
        assert lock_path("unit").read_text() == str(os.getpid())


def test_lock_released_when_holder_dies(state):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock_then_report, args=("unit", ready, release))
    holder.start()
    assert ready.wait(10)
    holder.kill()
    holder.join(10)
    with experiment_lock("unit"):
        pass


def test_locks_of_other_labs_independent(state):
    with experiment_lock("one"):
        with experiment_lock("two"):
            assert lock_path("one") != lock_path("two")
