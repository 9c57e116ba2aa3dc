"""Tests of the results layout, atomic run writes and loading runs into pandas."""

from __future__ import annotations

import builtins
import errno
import json
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from lab import store
from lab.errors import ConfigError
from lab.playbook import SCENARIO_FIELDS, Playbook
from lab.records import TIMELINE_COLUMNS, Integrity, RecordVersionError
from lab.store import (RUN_COLUMNS, StoreError, finished_run_ids, init_experiment, load_events,
                       load_record, load_runs, load_timeline, write_run)
from tests.fixtures.fabricate import (PLAYBOOK_TEXT, environment, fabricate_events,
                                      fabricate_experiment, fabricate_record, fabricate_timeline,
                                      write_playbook)


@pytest.fixture
def experiment(tmp_path) -> tuple[Path, Playbook]:
    playbook = write_playbook(tmp_path)
    return init_experiment(tmp_path / "results", playbook), playbook


def store_run(experiment_dir: Path, playbook: Playbook, scenario_id: str = "precopy-rate4",
              repetition: int = 1, downtime_ms: int = 100, **changes) -> Path:
    record = fabricate_record(playbook, scenario_id, repetition, "completed", downtime_ms, 4000,
                              100, 3, None, 150.0)
    if changes:
        record = record.model_copy(update=changes)
    return write_run(experiment_dir, record, fabricate_timeline(4000), fabricate_events(4000),
                     {"console-h1.log": b"boot ok\n"})


def hidden_entries(experiment_dir: Path) -> list[str]:
    return [entry.name for entry in (experiment_dir / "runs").iterdir()
            if entry.name.startswith(".")]


class FullDiskFile:
    """File wrapper whose write stores part of the data, then fails with ENOSPC."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(bytes(data)[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


def open_failing_for(name: str):
    real_open = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        if Path(path).name == name and "b" in mode and ("w" in mode or "x" in mode):
            return FullDiskFile(file)
        return file

    return fake_open


# init_experiment


def test_init_creates_layout(experiment):
    experiment_dir, playbook = experiment
    assert experiment_dir.name == "fabricated"
    assert (experiment_dir / "runs").is_dir()
    assert (experiment_dir / "playbook.yaml").read_bytes() == playbook.path.read_bytes()
    content = json.loads((experiment_dir / "experiment.json").read_text())
    assert content["experiment"] == "fabricated"
    assert content["playbook_sha256"] == playbook.sha256
    assert content["environment"] is None
    assert datetime.fromisoformat(content["created_at"]).utcoffset().total_seconds() == 0


def test_init_reopens_same_playbook(experiment):
    experiment_dir, playbook = experiment
    before = (experiment_dir / "experiment.json").read_text()
    assert init_experiment(experiment_dir.parent, playbook) == experiment_dir
    assert (experiment_dir / "experiment.json").read_text() == before


def test_init_with_runs_needs_resume(experiment):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook)
    with pytest.raises(ConfigError, match="already contains runs"):
        init_experiment(experiment_dir.parent, playbook)
    assert init_experiment(experiment_dir.parent, playbook, resume=True) == experiment_dir
    assert finished_run_ids(experiment_dir) == {"precopy-rate4-r1"}


def test_run_id_of_scenario(experiment):
    _, playbook = experiment
    scenario = playbook.scenarios()[1]
    assert store.run_id(scenario, 2) == "precopy-rate24-r2"
    assert store.run_id("precopy-rate24", 2) == "precopy-rate24-r2"


def test_init_rejects_changed_playbook(experiment, tmp_path):
    experiment_dir, _ = experiment
    changed_folder = tmp_path / "changed"
    changed_folder.mkdir()
    changed = write_playbook(changed_folder, PLAYBOOK_TEXT.replace("repetitions: 3",
                                                                   "repetitions: 5"))
    with pytest.raises(ConfigError, match="another version of this playbook") as caught:
        init_experiment(experiment_dir.parent, changed)
    message = str(caught.value)
    assert "-repetitions: 3" in message
    assert "+repetitions: 5" in message


def test_init_needs_loaded_playbook(tmp_path):
    playbook = Playbook(experiment="unit", guest={"memory_mib": 256},
                        workload={"working_set_mib": 96, "dirty_rate_mib_s": 1},
                        migration={"strategy": "precopy"})
    with pytest.raises(ValueError, match="load_playbook"):
        init_experiment(tmp_path, playbook)


def test_init_removes_leftovers(experiment):
    experiment_dir, playbook = experiment
    leftover = experiment_dir / "runs" / ".precopy-rate4-r1.tmp-0000abcd"
    leftover.mkdir()
    (leftover / "record.json").write_text("{")
    init_experiment(experiment_dir.parent, playbook, resume=True)
    assert not leftover.exists()


# write_run


def test_write_run_files(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    assert run_dir == experiment_dir / "runs" / "precopy-rate4-r1"
    names = sorted(entry.name for entry in run_dir.iterdir())
    assert names == ["console-h1.log", "events.json", "record.json", "timeline.parquet"]
    assert (run_dir / "console-h1.log").read_bytes() == b"boot ok\n"
    assert hidden_entries(experiment_dir) == []


def test_write_run_record_round_trip(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    expected = fabricate_record(playbook, "precopy-rate4", 1, "completed", 100, 4000, 100, 3,
                                None, 150.0)
    assert load_record(run_dir) == expected


def test_timeline_round_trip(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    timeline = load_timeline(run_dir)
    pd.testing.assert_frame_equal(timeline, fabricate_timeline(4000))
    assert {name: str(dtype) for name, dtype in timeline.dtypes.items()} == TIMELINE_COLUMNS


def test_events_round_trip(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    assert load_events(run_dir) == fabricate_events(4000)


def test_extra_file_from_path(experiment, tmp_path):
    experiment_dir, playbook = experiment
    console = tmp_path / "console.log"
    console.write_bytes(b"\x00binary console\xff")
    record = fabricate_record(playbook, "postcopy-rate4", 2)
    run_dir = write_run(experiment_dir, record, fabricate_timeline(None), [],
                        {"console-h2.log": console})
    assert (run_dir / "console-h2.log").read_bytes() == b"\x00binary console\xff"


def test_first_environment_recorded(experiment):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook)
    other = environment(playbook.sha256).model_copy(update={"qemu_version": "9.0.0"})
    store_run(experiment_dir, playbook, repetition=2, environment=other)
    content = json.loads((experiment_dir / "experiment.json").read_text())
    assert content["environment"]["qemu_version"] == "8.2.2"
    assert content["environment"]["accelerator"] == "kvm"


def test_finished_run_ids(experiment):
    experiment_dir, playbook = experiment
    assert finished_run_ids(experiment_dir) == set()
    store_run(experiment_dir, playbook)
    store_run(experiment_dir, playbook, scenario_id="postcopy-rate24", repetition=3)
    (experiment_dir / "runs" / ".precopy-rate24-r1.tmp-1234").mkdir()
    (experiment_dir / "runs" / "empty-folder").mkdir()
    assert finished_run_ids(experiment_dir) == {"precopy-rate4-r1", "postcopy-rate24-r3"}


def test_rewrite_replaces_run(experiment):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook, downtime_ms=100)
    run_dir = store_run(experiment_dir, playbook, downtime_ms=222)
    assert load_record(run_dir).stats.downtime_ms == 222
    assert hidden_entries(experiment_dir) == []


def test_rewrite_without_rename_exchange(experiment, monkeypatch):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook, downtime_ms=100)
    monkeypatch.setattr(store, "_exchange", lambda first, second: False)
    run_dir = store_run(experiment_dir, playbook, downtime_ms=333)
    assert load_record(run_dir).stats.downtime_ms == 333
    assert hidden_entries(experiment_dir) == []


def test_disk_full_leaves_no_trace(experiment, monkeypatch):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook, downtime_ms=100)
    store_run(experiment_dir, playbook, scenario_id="postcopy-rate4")
    monkeypatch.setattr(store, "open", open_failing_for("timeline.parquet"), raising=False)
    with pytest.raises(OSError) as caught:
        store_run(experiment_dir, playbook, downtime_ms=999)
    assert caught.value.errno == errno.ENOSPC
    assert hidden_entries(experiment_dir) == []
    assert load_record(experiment_dir / "runs" / "precopy-rate4-r1").stats.downtime_ms == 100
    assert finished_run_ids(experiment_dir) == {"precopy-rate4-r1", "postcopy-rate4-r1"}


def test_disk_full_on_new_run(experiment, monkeypatch):
    experiment_dir, playbook = experiment
    monkeypatch.setattr(store, "open", open_failing_for("console-h1.log"), raising=False)
    with pytest.raises(OSError):
        store_run(experiment_dir, playbook)
    assert list((experiment_dir / "runs").iterdir()) == []


def test_failed_rename_leaves_no_trace(experiment, monkeypatch):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook, downtime_ms=100)

    def refuse(temporary, final):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "_move_into_place", refuse)
    with pytest.raises(OSError):
        store_run(experiment_dir, playbook, downtime_ms=999)
    assert hidden_entries(experiment_dir) == []
    assert load_record(experiment_dir / "runs" / "precopy-rate4-r1").stats.downtime_ms == 100


@pytest.mark.parametrize("name", ["../escape.log", ".hidden", "record.json", "a/b.log", ""])
def test_bad_extra_file_name_rejected(experiment, name):
    experiment_dir, playbook = experiment
    record = fabricate_record(playbook, "precopy-rate4", 1)
    with pytest.raises(ValueError, match="invalid extra file name"):
        write_run(experiment_dir, record, fabricate_timeline(None), [], {name: b"x"})
    assert list((experiment_dir / "runs").iterdir()) == []


def test_extra_file_as_str_rejected(experiment):
    experiment_dir, playbook = experiment
    record = fabricate_record(playbook, "precopy-rate4", 1)
    with pytest.raises(TypeError, match="bytes or a Path"):
        write_run(experiment_dir, record, fabricate_timeline(None), [], {"console-h1.log": "text"})


def test_bad_timeline_rejected(experiment):
    experiment_dir, playbook = experiment
    record = fabricate_record(playbook, "precopy-rate4", 1)
    with pytest.raises(ValueError, match="unknown timeline columns"):
        write_run(experiment_dir, record, pd.DataFrame({"seconds": [1.0]}), [], {})
    assert list((experiment_dir / "runs").iterdir()) == []


def test_bad_events_rejected(experiment):
    experiment_dir, playbook = experiment
    record = fabricate_record(playbook, "precopy-rate4", 1)
    with pytest.raises(ValueError, match="missing keys"):
        write_run(experiment_dir, record, fabricate_timeline(None), [{"t_s": 0.0}], {})


def test_record_of_other_experiment_rejected(experiment):
    experiment_dir, playbook = experiment
    record = fabricate_record(playbook, "precopy-rate4", 1).model_copy(
        update={"experiment": "other"})
    with pytest.raises(ValueError, match="does not belong"):
        write_run(experiment_dir, record, fabricate_timeline(None), [], {})


def test_write_into_plain_folder_rejected(tmp_path, experiment):
    _, playbook = experiment
    record = fabricate_record(playbook, "precopy-rate4", 1)
    with pytest.raises(StoreError, match="not an experiment folder"):
        write_run(tmp_path / "nothing", record, fabricate_timeline(None), [], {})


# load_record


def test_load_record_missing(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        load_record(tmp_path)


def test_load_record_corrupt(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    (run_dir / "record.json").write_text('{"schema_version": 1,')
    with pytest.raises(StoreError, match="invalid record"):
        load_record(run_dir)


def test_load_record_newer_schema(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    data = json.loads((run_dir / "record.json").read_text())
    data["schema_version"] = 7
    (run_dir / "record.json").write_text(json.dumps(data))
    with pytest.raises(RecordVersionError) as caught:
        load_record(run_dir)
    assert str(run_dir / "record.json") in str(caught.value)
    assert "schema_version 7" in str(caught.value)


def test_load_record_folder_mismatch(experiment):
    experiment_dir, playbook = experiment
    run_dir = store_run(experiment_dir, playbook)
    moved = run_dir.rename(run_dir.with_name("precopy-rate4-r9"))
    with pytest.raises(StoreError, match="does not match its folder"):
        load_record(moved)


# load_runs


def test_load_runs_rows_and_columns(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path)
    runs = load_runs(experiment_dir)
    assert len(runs) == 12
    assert list(runs.columns) == RUN_COLUMNS + ["phase_setup_s"]
    for name in ["run_id", "scenario_id", "repetition", "outcome", "downtime_ms",
                 "transferred_bytes", "wall_downtime_ms", "console_trouble_count",
                 "env_qemu_version", "started_at", *SCENARIO_FIELDS]:
        assert name in runs.columns, name
    assert "raw" not in runs.columns


def test_load_runs_values(tmp_path):
    runs = load_runs(fabricate_experiment(tmp_path)).set_index("run_id")
    row = runs.loc["precopy-rate4-r2"]
    assert row["downtime_ms"] == 110
    assert row["transferred_bytes"] == 104 * 2**20
    assert row["dirty_rate_mib_s"] == 4.0
    assert row["strategy"] == "precopy"
    assert row["repetition"] == 2
    assert row["env_accelerator"] == "kvm"
    assert row["console_trouble_count"] == 0
    assert row["phase_setup_s"] == 0.05
    assert row["started_at"] == pd.Timestamp("2024-05-01T12:01:00Z")


def test_load_runs_missing_values_are_nan(tmp_path):
    runs = load_runs(fabricate_experiment(tmp_path)).set_index("run_id")
    assert math.isnan(runs.loc["precopy-rate4-r1", "postcopy_requests"])
    assert math.isnan(runs.loc["postcopy-rate24-r1", "downtime_ms"])
    assert runs.loc["precopy-rate4-r1", "bandwidth_mib_s"] == 32
    assert math.isnan(runs.loc["precopy-rate4-r1", "postcopy_after_iterations"])
    assert runs["downtime_ms"].dtype == "float64"


def test_load_runs_console_trouble_count(experiment):
    experiment_dir, playbook = experiment
    store_run(experiment_dir, playbook, integrity=Integrity(
        guest_alive=True, console_trouble=["BUG: soft lockup", "Oops"]))
    runs = load_runs(experiment_dir)
    assert runs.loc[0, "console_trouble_count"] == 2


def test_load_runs_from_results_root(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path, runs=[
        ("precopy-rate4", 1, "completed", 100, 4000, 100, 3, None, 150.0)])
    runs = load_runs(experiment_dir.parent)
    assert list(runs["run_id"]) == ["precopy-rate4-r1"]


def test_load_runs_several_experiments(tmp_path):
    fabricate_experiment(tmp_path / "one", runs=[])
    other = PLAYBOOK_TEXT.replace("experiment: fabricated", "experiment: second")
    fabricate_experiment(tmp_path / "two", runs=[], playbook_text=other)
    (tmp_path / "two" / "results" / "second").rename(tmp_path / "one" / "results" / "second")
    with pytest.raises(StoreError, match="contains 2 experiments"):
        load_runs(tmp_path / "one" / "results")


def test_load_runs_no_experiment(tmp_path):
    with pytest.raises(StoreError, match="no experiment folder"):
        load_runs(tmp_path)


def test_load_runs_missing_path(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        load_runs(tmp_path / "absent")


def test_load_runs_empty_experiment(tmp_path):
    runs = load_runs(fabricate_experiment(tmp_path, runs=[]))
    assert len(runs) == 0
    assert list(runs.columns) == RUN_COLUMNS
