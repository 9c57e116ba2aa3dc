"""Tests of the runs cache, runs.parquet: load_runs() returns the same DataFrame with
and without it, and the cache follows every change of the run folders."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from lab import run_table, store
from lab.playbook import Playbook, load_playbook
from lab.records import Measured
from lab.store import StoreError, load_runs, write_run
from tests.fixtures.fabricate import (fabricate_events, fabricate_experiment, fabricate_record,
                                      fabricate_timeline)

CACHE = run_table.CACHE_FILE


@pytest.fixture
def experiment(tmp_path) -> tuple[Path, Playbook]:
    experiment_dir = fabricate_experiment(tmp_path)
    return experiment_dir, load_playbook(experiment_dir / "playbook.yaml")


def store_run(experiment_dir: Path, playbook: Playbook, scenario_id: str = "precopy-rate4",
              repetition: int = 1, downtime_ms: int = 100, index: int = 0, **changes) -> Path:
    record = fabricate_record(playbook, scenario_id, repetition, "completed", downtime_ms, 4000,
                              100, 3, None, 150.0, index=index)
    if changes:
        record = record.model_copy(update=changes)
    return write_run(experiment_dir, record, fabricate_timeline(4000), fabricate_events(4000))


def assert_same_as_without_cache(experiment_dir: Path) -> pd.DataFrame:
    """Load through the cache and without it, check both are equal, and return the frame."""
    cached = load_runs(experiment_dir)
    parsed = load_runs(experiment_dir, cache=False)
    pd.testing.assert_frame_equal(cached, parsed, check_exact=True)
    return cached


def cached_run_ids(experiment_dir: Path) -> list[str]:
    return sorted(pq.read_table(experiment_dir / CACHE).column("row.run_id").to_pylist())


def file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


# Same DataFrame with and without the cache


def test_cache_created_on_first_load(experiment):
    experiment_dir, _ = experiment
    assert not (experiment_dir / CACHE).exists()
    load_runs(experiment_dir)
    assert (experiment_dir / CACHE).is_file()
    assert len(cached_run_ids(experiment_dir)) == 12


def test_cold_and_warm_equal_parsed(experiment):
    experiment_dir, _ = experiment
    parsed = load_runs(experiment_dir, cache=False)
    cold = load_runs(experiment_dir)
    warm = load_runs(experiment_dir)
    pd.testing.assert_frame_equal(cold, parsed, check_exact=True)
    pd.testing.assert_frame_equal(warm, parsed, check_exact=True)
    assert len(parsed) == 12


def test_cache_false_neither_reads_nor_writes(experiment):
    experiment_dir, _ = experiment
    load_runs(experiment_dir, cache=False)
    assert not (experiment_dir / CACHE).exists()
    (experiment_dir / CACHE).write_bytes(b"not parquet")
    runs = load_runs(experiment_dir, cache=False)
    assert len(runs) == 12
    assert (experiment_dir / CACHE).read_bytes() == b"not parquet"


def test_missing_values_are_nan(experiment):
    experiment_dir, _ = experiment
    runs = assert_same_as_without_cache(experiment_dir).set_index("run_id")
    assert runs.loc["precopy-rate4-r1", "error"] != runs.loc["precopy-rate4-r1", "error"]
    assert runs.loc["precopy-rate24-r3", "error"] == "fabricated failed run"
    assert runs["error"].dtype == object
    assert runs["downtime_ms"].dtype == "float64"
    assert runs["started_at"].dtype == "datetime64[us, UTC]"
    assert runs["guest_alive"].dtype == "boolean"
    assert runs["repetition"].dtype == "int64"


def test_unchanged_cache_not_rewritten(experiment):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    before = file_identity(experiment_dir / CACHE)
    load_runs(experiment_dir)
    assert file_identity(experiment_dir / CACHE) == before


# The cache follows changes of the run folders


def test_rewritten_run_picked_up(experiment):
    experiment_dir, playbook = experiment
    load_runs(experiment_dir)
    store_run(experiment_dir, playbook, downtime_ms=555)
    runs = assert_same_as_without_cache(experiment_dir).set_index("run_id")
    assert runs.loc["precopy-rate4-r1", "downtime_ms"] == 555


def test_record_edited_in_place_picked_up(experiment):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    path = experiment_dir / "runs" / "precopy-rate4-r2" / "record.json"
    content = json.loads(path.read_text())
    content["stats"]["downtime_ms"] = 123456
    with open(path, "r+", encoding="utf-8") as file:
        file.write(json.dumps(content, indent=2))
        file.truncate()
    runs = assert_same_as_without_cache(experiment_dir).set_index("run_id")
    assert runs.loc["precopy-rate4-r2", "downtime_ms"] == 123456


def test_new_run_appears(experiment):
    experiment_dir, playbook = experiment
    load_runs(experiment_dir)
    store_run(experiment_dir, playbook, repetition=4, downtime_ms=77, index=20)
    runs = assert_same_as_without_cache(experiment_dir).set_index("run_id")
    assert runs.loc["precopy-rate4-r4", "downtime_ms"] == 77
    assert "precopy-rate4-r4" in cached_run_ids(experiment_dir)


def test_removed_run_disappears(experiment):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    shutil.rmtree(experiment_dir / "runs" / "postcopy-rate4-r2")
    runs = assert_same_as_without_cache(experiment_dir)
    assert "postcopy-rate4-r2" not in set(runs["run_id"])
    assert len(runs) == 11
    assert "postcopy-rate4-r2" not in cached_run_ids(experiment_dir)


def test_folder_without_record_ignored(experiment):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    (experiment_dir / "runs" / "postcopy-rate4-r2" / "record.json").unlink()
    (experiment_dir / "runs" / ".precopy-rate4-r9.tmp-0000").mkdir()
    runs = assert_same_as_without_cache(experiment_dir)
    assert len(runs) == 11


def test_last_run_removed_deletes_cache(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path, runs=[
        ("precopy-rate4", 1, "completed", 100, 4000, 100, 3, None, 150.0)])
    load_runs(experiment_dir)
    shutil.rmtree(experiment_dir / "runs" / "precopy-rate4-r1")
    runs = assert_same_as_without_cache(experiment_dir)
    assert len(runs) == 0
    assert list(runs.columns) == store.RUN_COLUMNS
    assert not (experiment_dir / CACHE).exists()


def test_column_of_removed_run_dropped(experiment):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook, repetition=5, index=30,
              measured=Measured(phases={"setup_s": 0.1, "rare_s": 2.0}))
    assert "phase_rare_s" in assert_same_as_without_cache(experiment_dir).columns
    shutil.rmtree(experiment_dir / "runs" / "precopy-rate4-r5")
    runs = assert_same_as_without_cache(experiment_dir)
    assert "phase_rare_s" not in runs.columns
    assert "row.phase_rare_s" not in pq.read_table(experiment_dir / CACHE).column_names


def test_mixed_types_kept_exactly(experiment):
    experiment_dir, playbook = experiment
    scenario = dict(fabricate_record(playbook, "precopy-rate4", 1).scenario)
    store_run(experiment_dir, playbook, repetition=6, index=40, scenario={**scenario, "tag": 3})
    runs = assert_same_as_without_cache(experiment_dir).set_index("run_id")
    assert runs["tag"].dtype == "float64"

    store_run(experiment_dir, playbook, repetition=7, index=41, scenario={**scenario, "tag": "b"})
    runs = assert_same_as_without_cache(experiment_dir).set_index("run_id")
    assert runs["tag"].dtype == object
    assert type(runs.loc["precopy-rate4-r6", "tag"]) is int
    assert runs.loc["precopy-rate4-r7", "tag"] == "b"

    shutil.rmtree(experiment_dir / "runs" / "precopy-rate4-r7")
    runs = assert_same_as_without_cache(experiment_dir)
    assert runs["tag"].dtype == "float64"


def test_invalid_record_raises_and_keeps_cache(experiment):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    before = (experiment_dir / CACHE).read_bytes()
    (experiment_dir / "runs" / "precopy-rate4-r3" / "record.json").write_text("{broken")
    with pytest.raises(StoreError, match="invalid record"):
        load_runs(experiment_dir)
    assert (experiment_dir / CACHE).read_bytes() == before


# Damaged or outdated caches are rebuilt


def test_corrupt_cache_rebuilt(experiment, caplog):
    experiment_dir, _ = experiment
    (experiment_dir / CACHE).write_bytes(b"PAR1 this is not a parquet file")
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        runs = load_runs(experiment_dir)
    assert "cannot be read" in caplog.text
    pd.testing.assert_frame_equal(runs, load_runs(experiment_dir, cache=False), check_exact=True)
    assert len(cached_run_ids(experiment_dir)) == 12


def test_truncated_cache_rebuilt(experiment, caplog):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    data = (experiment_dir / CACHE).read_bytes()
    (experiment_dir / CACHE).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        assert_same_as_without_cache(experiment_dir)
    assert "rebuilding" in caplog.text
    assert len(cached_run_ids(experiment_dir)) == 12


def test_older_column_layout_rebuilt(experiment, monkeypatch, caplog):
    experiment_dir, _ = experiment
    older_columns = [name for name in store.RUN_COLUMNS if name != "warning_count"]
    with monkeypatch.context() as patch:
        patch.setattr(store, "RUN_COLUMNS", older_columns)
        load_runs(experiment_dir)
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        runs = assert_same_as_without_cache(experiment_dir)
    assert "another row layout" in caplog.text
    assert "warning_count" in runs.columns
    table = pq.read_table(experiment_dir / CACHE)
    assert "row.warning_count" in table.column_names


def test_cache_without_metadata_rebuilt(experiment, caplog):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    table = pq.read_table(experiment_dir / CACHE)
    pq.write_table(table.replace_schema_metadata(None), experiment_dir / CACHE)
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        assert_same_as_without_cache(experiment_dir)
    assert "another row layout" in caplog.text


def test_cache_with_repeated_run_rebuilt(experiment, caplog):
    experiment_dir, _ = experiment
    load_runs(experiment_dir)
    table = pq.read_table(experiment_dir / CACHE)
    doubled = table.take([0, 0, *range(1, table.num_rows)])
    pq.write_table(doubled, experiment_dir / CACHE)
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        runs = assert_same_as_without_cache(experiment_dir)
    assert "repeated" in caplog.text
    assert len(runs) == 12


# Writing the cache


def test_failed_cache_write_keeps_old_cache(experiment, monkeypatch, caplog):
    experiment_dir, playbook = experiment
    load_runs(experiment_dir)
    before = (experiment_dir / CACHE).read_bytes()
    store_run(experiment_dir, playbook, downtime_ms=999)

    def write_half_then_fail(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_table.pq, "write_table", write_half_then_fail)
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        runs = load_runs(experiment_dir).set_index("run_id")
    assert runs.loc["precopy-rate4-r1", "downtime_ms"] == 999
    assert "cannot write the runs cache" in caplog.text
    assert (experiment_dir / CACHE).read_bytes() == before
    assert [entry.name for entry in experiment_dir.iterdir() if ".tmp-" in entry.name] == []


def test_interrupted_cache_write_leaves_no_temporary(experiment, monkeypatch):
    experiment_dir, _ = experiment

    def interrupt(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_table.pq, "write_table", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_runs(experiment_dir)
    assert sorted(entry.name for entry in experiment_dir.iterdir()) == [
        "experiment.json", "playbook.yaml", "runs"]


def test_read_only_folder_still_loads(experiment, monkeypatch, caplog):
    experiment_dir, _ = experiment

    def deny(source, destination):
        raise PermissionError(13, "Permission denied", str(destination))

    monkeypatch.setattr(run_table.os, "replace", deny)
    with caplog.at_level(logging.WARNING, logger="lab.run_table"):
        runs = load_runs(experiment_dir)
    assert len(runs) == 12
    assert "cannot write the runs cache" in caplog.text
    assert not (experiment_dir / CACHE).exists()


def test_write_run_during_loads(experiment):
    experiment_dir, playbook = experiment
    failures: list[BaseException] = []
    stop = threading.Event()

    def write_runs() -> None:
        try:
            for repetition in range(10, 40):
                store_run(experiment_dir, playbook, repetition=repetition,
                          downtime_ms=repetition, index=repetition)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            stop.set()

    writer = threading.Thread(target=write_runs)
    writer.start()
    loads = 0
    try:
        while not stop.is_set() or loads == 0:
            runs = load_runs(experiment_dir)
            assert 12 <= len(runs) <= 42
            assert run_table.read_cache(experiment_dir / CACHE) is not None
            loads += 1
    finally:
        writer.join(timeout=120)
    assert failures == []
    assert loads >= 1
    runs = assert_same_as_without_cache(experiment_dir)
    assert len(runs) == 42
    assert [entry.name for entry in experiment_dir.iterdir() if ".tmp-" in entry.name] == []


def test_concurrent_loads_leave_valid_cache(experiment):
    experiment_dir, playbook = experiment
    errors: list[BaseException] = []

    def load_repeatedly() -> None:
        try:
            for _ in range(5):
                (experiment_dir / CACHE).unlink(missing_ok=True)
                load_runs(experiment_dir)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=load_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert run_table.read_cache(experiment_dir / CACHE) is not None
    assert_same_as_without_cache(experiment_dir)


def test_scan_matches_finished_run_ids(experiment):
    experiment_dir, _ = experiment
    (experiment_dir / "runs" / "not-a-run").write_text("")
    os.mkdir(experiment_dir / "runs" / "empty-folder")
    stamps = run_table.scan_records(experiment_dir / "runs")
    assert set(stamps) == store.finished_run_ids(experiment_dir)
