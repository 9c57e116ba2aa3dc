"""Tests of the stored record models and the timeline helpers."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import lab
from lab.playbook import load_playbook
from lab.records import (EVENT_KEYS, SCHEMA_VERSION, TIMELINE_COLUMNS, Environment, Integrity,
                         Measured, MigrationStats, RecordVersionError, RunRecord, empty_timeline,
                         make_timeline, run_id_for, validate_events)
from tests.fixtures.fabricate import MIB, environment, fabricate_record
from tests.test_playbook import QUICKSTART

# A completed precopy migration as libvirt 10.0 reports it through jobStats().
LIBVIRT_STATS = {
    "type": 3,
    "operation": 1,
    "success": True,
    "time_elapsed": 4321,
    "time_elapsed_net": 4319,
    "downtime": 87,
    "downtime_net": 85,
    "setup_time": 12,
    "data_total": 270_000_000,
    "data_processed": 300_000_000,
    "data_remaining": 0,
    "memory_total": 268_435_456,
    "memory_processed": 299_000_000,
    "memory_remaining": 0,
    "memory_constant": 40_000,
    "memory_normal": 72_998,
    "memory_normal_bytes": 298_999_808,
    "memory_bps": 33_554_432,
    "memory_dirty_rate": 1024,
    "memory_iteration": 5,
    "memory_page_size": 4096,
    "memory_postcopy_requests": 0,
}


def sample_record(**changes) -> RunRecord:
    playbook = load_playbook(QUICKSTART)
    record = fabricate_record(playbook, "precopy-rate4", 1, "completed", 87, 4321, 285, 5, None,
                              91.5)
    data = record.model_dump()
    data.update(changes)
    return RunRecord.model_validate(data)


# MigrationStats.from_libvirt


def test_from_libvirt_maps_every_key():
    stats = MigrationStats.from_libvirt(LIBVIRT_STATS)
    assert stats.downtime_ms == 87
    assert stats.downtime_net_ms == 85
    assert stats.total_time_ms == 4321
    assert stats.setup_time_ms == 12
    assert stats.transferred_bytes == 299_000_000
    assert stats.data_total_bytes == 270_000_000
    assert stats.memory_total_bytes == 268_435_456
    assert stats.normal_pages == 72_998
    assert stats.zero_pages == 40_000
    assert stats.page_size_bytes == 4096
    assert stats.iterations == 5
    assert stats.postcopy_requests == 0
    assert stats.memory_bps == 33_554_432


def test_from_libvirt_dirty_rate_pages_to_bytes():
    stats = MigrationStats.from_libvirt(LIBVIRT_STATS)
    assert stats.dirty_rate_bytes_s == 1024 * 4096


def test_from_libvirt_without_page_size():
    partial = {key: value for key, value in LIBVIRT_STATS.items() if key != "memory_page_size"}
    stats = MigrationStats.from_libvirt(partial)
    assert stats.dirty_rate_bytes_s is None
    assert stats.page_size_bytes is None


def test_from_libvirt_keeps_raw_keys():
    stats = MigrationStats.from_libvirt(LIBVIRT_STATS)
    assert set(stats.raw) == set(LIBVIRT_STATS)
    assert stats.raw["memory_normal_bytes"] == 298_999_808
    assert stats.raw["success"] == 1
    assert type(stats.raw["success"]) is int


def test_from_libvirt_empty_dict():
    stats = MigrationStats.from_libvirt({})
    assert stats == MigrationStats()
    assert stats.downtime_ms is None


def test_from_libvirt_rejects_negative():
    with pytest.raises(ValidationError, match="downtime_ms"):
        MigrationStats.from_libvirt({"downtime": -1})


@settings(max_examples=60, deadline=None)
@given(stats=st.dictionaries(
    st.sampled_from(sorted(LIBVIRT_STATS)),
    st.integers(min_value=0, max_value=2**63 - 1)))
def test_from_libvirt_round_trips(stats):
    parsed = MigrationStats.from_libvirt(stats)
    again = MigrationStats.model_validate_json(parsed.model_dump_json())
    assert again == parsed
    assert again.raw == stats


# Round trips of every record type


def test_environment_round_trip():
    env = environment("f" * 64)
    assert Environment.model_validate_json(env.model_dump_json()) == env


def test_environment_rejects_unknown_accelerator():
    data = environment().model_dump()
    data["accelerator"] = "hvf"
    with pytest.raises(ValidationError, match="accelerator"):
        Environment.model_validate(data)


def test_migration_stats_round_trip():
    stats = MigrationStats.from_libvirt(LIBVIRT_STATS)
    text = stats.model_dump_json()
    assert MigrationStats.model_validate_json(text) == stats
    assert MigrationStats.model_validate_json(text).model_dump_json() == text


def test_measured_round_trip():
    measured = Measured(wall_total_ms=4400.25, wall_downtime_ms=120.5, switchover_at_s=4.1,
                        postcopy_started_at_s=2.0, phases={"setup_s": 0.02, "precopy_s": 2.0})
    assert Measured.model_validate_json(measured.model_dump_json()) == measured


def test_phase_names_carry_unit():
    with pytest.raises(ValidationError, match="phases"):
        Measured(phases={"boot": 1.0})


def test_harness_version_defaults_to_package():
    data = sample_record().model_dump()
    del data["harness_version"]
    assert RunRecord.model_validate(data).harness_version == lab.__version__


def test_integrity_round_trip():
    integrity = Integrity(guest_alive=True, reports_after_migration=4, bad_pages=2,
                          console_trouble=["BUG: soft lockup"], checked_pages=24576)
    assert Integrity.model_validate_json(integrity.model_dump_json()) == integrity


def test_run_record_round_trip_exact():
    record = sample_record()
    text = record.model_dump_json(indent=2)
    again = RunRecord.model_validate_json(text)
    assert again == record
    assert again.model_dump_json(indent=2) == text


def test_run_record_scenario_values_keep_types():
    record = RunRecord.model_validate_json(sample_record().model_dump_json())
    assert record.scenario["dirty_rate_mib_s"] == 4.0
    assert type(record.scenario["dirty_rate_mib_s"]) is float
    assert type(record.scenario["memory_mib"]) is int
    assert record.scenario["postcopy_after_iterations"] is None


def test_run_record_json_shape():
    data = json.loads(sample_record().model_dump_json())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["run_id"] == "precopy-rate4-r1"
    assert data["started_at"] == "2024-05-01T12:00:00Z"
    assert data["stats"]["transferred_bytes"] == 285 * MIB
    assert data["stats"]["raw"]["memory_processed"] == 285 * MIB


def test_records_are_frozen():
    record = sample_record()
    with pytest.raises(ValidationError):
        record.outcome = "failed"
    with pytest.raises(ValidationError):
        record.stats.downtime_ms = 1


# Guards of RunRecord


def test_newer_schema_version_rejected():
    data = json.loads(sample_record().model_dump_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RecordVersionError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        RunRecord.model_validate_json(json.dumps(data))


def test_schema_version_zero_rejected():
    data = json.loads(sample_record().model_dump_json())
    data["schema_version"] = 0
    with pytest.raises(ValidationError, match="schema_version"):
        RunRecord.model_validate_json(json.dumps(data))


def test_naive_datetime_rejected():
    with pytest.raises(ValidationError, match="started_at"):
        sample_record(started_at=datetime(2024, 5, 1, 12, 0, 0))


def test_other_time_zone_converted_to_utc():
    paris = timezone(timedelta(hours=2))
    record = sample_record(started_at=datetime(2024, 5, 1, 14, 0, 0, tzinfo=paris),
                           ended_at=datetime(2024, 5, 1, 14, 0, 30, tzinfo=paris))
    assert record.started_at == datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert record.started_at.tzinfo == timezone.utc


def test_end_before_start_rejected():
    with pytest.raises(ValidationError, match="before started_at"):
        sample_record(ended_at=datetime(2024, 5, 1, 11, 0, 0, tzinfo=timezone.utc))


def test_run_id_must_match_scenario():
    with pytest.raises(ValidationError, match="run_id"):
        sample_record(run_id="precopy-rate4-r2")


def test_run_id_for():
    assert run_id_for("hybrid-rate24", 3) == "hybrid-rate24-r3"


def test_same_hosts_rejected():
    with pytest.raises(ValidationError, match="both 'h1'"):
        sample_record(destination_host="h1")


def test_completed_with_error_rejected():
    with pytest.raises(ValidationError, match="completed run has no error"):
        sample_record(error="something")


def test_failed_without_error_accepted():
    assert sample_record(outcome="failed").error is None


def test_unknown_outcome_rejected():
    with pytest.raises(ValidationError, match="outcome"):
        sample_record(outcome="exploded", error="boom")


def test_unknown_field_rejected():
    data = json.loads(sample_record().model_dump_json())
    data["downtime_ms"] = 5
    with pytest.raises(ValidationError, match="downtime_ms"):
        RunRecord.model_validate_json(json.dumps(data))


# Timeline and events


def test_empty_timeline_dtypes():
    frame = empty_timeline()
    assert list(frame.columns) == list(TIMELINE_COLUMNS)
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == TIMELINE_COLUMNS
    assert len(frame) == 0


def test_make_timeline_fills_missing_columns():
    frame = make_timeline([{"t_s": 0.5, "host": "h1", "iteration": 2}])
    assert list(frame.columns) == list(TIMELINE_COLUMNS)
    assert frame.loc[0, "iteration"] == 2
    assert pd.isna(frame.loc[0, "postcopy_requests"])
    assert str(frame["postcopy_requests"].dtype) == "Int64"


def test_make_timeline_rejects_unknown_column():
    with pytest.raises(ValueError, match="unknown timeline columns"):
        make_timeline([{"t_s": 0.0, "bytes": 5}])


def test_make_timeline_rejects_non_numeric():
    with pytest.raises((ValueError, TypeError)):
        make_timeline([{"t_s": 0.0, "iteration": "two"}])


def test_validate_events():
    event = {"t_s": 1.0, "wall_time": "2024-05-01T12:00:01+00:00", "host": "h1",
             "kind": "suspended", "detail": "migrated"}
    assert validate_events([event]) == [event]
    with pytest.raises(ValueError, match="missing keys \\['detail'\\]"):
        validate_events([{key: event[key] for key in EVENT_KEYS if key != "detail"}])
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        validate_events([{**event, "extra": 1}])
