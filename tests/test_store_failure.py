"""A run that cannot be stored: the runner's error, the bare failed record and resume, without a lab."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lab import store
from lab.records import make_timeline
from lab.runner import NOT_STORED, ExperimentRunner
from lab.store import StoreError, init_experiment, load_record, write_run
from tests.fixtures.fabricate import fabricate_events, fabricate_record, fabricate_timeline, write_playbook

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def setup(tmp_path):
    playbook = write_playbook(tmp_path)
    results = tmp_path / "results"
    experiment_dir = init_experiment(results, playbook)
    runner = ExperimentRunner(playbook, results_root=results, lab=object(), show_progress=False)
    record = fabricate_record(playbook, "precopy-rate4", 1, "completed", 100, 4000, 100, 3, None, 150.0)
    return runner, experiment_dir, record


def test_bare_failed_record_stored_when_it_fits(setup):
    runner, experiment_dir, record = setup
    error = runner._store_failure(experiment_dir, record, ENOSPC)
    assert isinstance(error, StoreError)
    message = str(error)
    assert message.startswith(f"cannot store run {record.run_id} in {experiment_dir / 'runs'}: "
                              "No space left on device (errno 28)")
    assert f"a record without its data marks run {record.run_id} as failed" in message
    assert f"free space on the file system of {runner.results_root}" in message
    assert f"--results {runner.results_root} --resume" in message

    bare = load_record(experiment_dir / "runs" / record.run_id)
    assert bare.outcome == "failed"
    assert bare.error == "the run ended completed, but storing it failed: No space left on device (errno 28)"
    assert bare.warnings[-1].startswith(NOT_STORED)
    assert sorted(path.name for path in (experiment_dir / "runs" / record.run_id).iterdir()) == [
        "events.json", "record.json", "timeline.parquet"]


def test_resume_runs_bare_record_again(setup):
    runner, experiment_dir, record = setup
    runner._store_failure(experiment_dir, record, ENOSPC)
    assert store.finished_run_ids(experiment_dir) == {record.run_id}
    assert runner._finished_runs(experiment_dir) == set()

    write_run(experiment_dir, record, fabricate_timeline(4000), fabricate_events(4000))
    assert runner._finished_runs(experiment_dir) == {record.run_id}


def test_no_bare_record_when_nothing_fits(setup, monkeypatch):
    runner, experiment_dir, record = setup

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write_run", full)
    message = str(runner._store_failure(experiment_dir, record, ENOSPC))
    assert f"no record of run {record.run_id} fits either (No space left on device)" in message
    assert list((experiment_dir / "runs").iterdir()) == []


def test_read_only_folder_gets_its_own_fix(setup):
    runner, experiment_dir, record = setup
    message = str(runner._store_failure(experiment_dir, record, OSError(errno.EROFS, "Read-only file system")))
    assert f"{runner.results_root} is on a read-only file system; give another results folder" in message


def test_run_stored_even_if_environment_update_fails(setup, monkeypatch):
    _runner, experiment_dir, record = setup
    real_replace = store._replace_file

    def replace(path: Path, data: bytes) -> None:
        if path.name == store.EXPERIMENT_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(path, data)

    monkeypatch.setattr(store, "_replace_file", replace)
    folder = write_run(experiment_dir, record, make_timeline([]), [])
    assert load_record(folder).outcome == "completed"
    assert store.read_experiment_file(experiment_dir)["environment"] is None
