"""Tests of the playbook loader, its error messages and the matrix expansion."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lab.errors import ConfigError
from lab.playbook import (GUEST_HEADROOM_MIB, STRATEGIES, Playbook, PlaybookError, Scenario,
                          load_playbook)
from lab.strategies import FIELD_OFF_VALUES

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "playbooks" / "quickstart.yaml"

BASE = """\
experiment: unit
guest:
  memory_mib: 256
workload:
  working_set_mib: 96
  dirty_rate_mib_s: 8
migration:
  strategy: precopy
  bandwidth_mib_s: 32
"""

HYPOTHESIS_SETTINGS = settings(max_examples=40, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(folder: Path, text: str, name: str = "playbook.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(folder: Path, text: str) -> PlaybookError:
    with pytest.raises(ConfigError) as caught:
        load_playbook(write(folder, text))
    assert isinstance(caught.value, PlaybookError)
    return caught.value


def error_for(error: PlaybookError, field: str) -> ConfigError:
    matches = [item for item in error.errors if item.field == field]
    assert matches, f"no error for {field}; errors: {[str(item) for item in error.errors]}"
    return matches[0]


# Loading valid playbooks


def test_quickstart_loads():
    playbook = load_playbook(QUICKSTART)
    assert playbook.experiment == "quickstart"
    assert playbook.repetitions == 3
    assert playbook.guest.memory_mib == 256
    assert playbook.workload.working_set_mib == 96
    assert playbook.migration.bandwidth_mib_s == 32
    assert playbook.migration.downtime_limit_ms == 300
    assert playbook.path == QUICKSTART
    assert playbook.sha256 == hashlib.sha256(QUICKSTART.read_bytes()).hexdigest()


def test_quickstart_scenarios_in_matrix_order():
    ids = [scenario.scenario_id for scenario in load_playbook(QUICKSTART).scenarios()]
    assert ids == [
        "stop-and-copy-rate4", "stop-and-copy-rate24",
        "precopy-rate4", "precopy-rate24",
        "postcopy-rate4", "postcopy-rate24",
        "hybrid-rate4", "hybrid-rate24",
    ]


def test_quickstart_runs_repetition_outer():
    playbook = load_playbook(QUICKSTART)
    runs = list(playbook.runs())
    assert len(runs) == 24
    assert [repetition for _, repetition in runs[:8]] == [1] * 8
    assert [repetition for _, repetition in runs[8:16]] == [2] * 8
    assert [scenario.scenario_id for scenario, _ in runs[:8]] == \
        [scenario.scenario_id for scenario, _ in runs[16:]]


def test_base_iterations_apply_only_to_hybrid():
    by_id = {scenario.scenario_id: scenario for scenario in load_playbook(QUICKSTART).scenarios()}
    assert by_id["hybrid-rate4"].postcopy_after_iterations == 1
    assert by_id["precopy-rate4"].postcopy_after_iterations is None
    assert by_id["postcopy-rate24"].postcopy_after_iterations is None


# Every strategy tuning field at its off value, as quickstart leaves them.
STRATEGY_TUNING_OFF = {name: value for name, value in FIELD_OFF_VALUES.items()
                       if name != "postcopy_after_iterations"}


def test_scenario_values_merge_matrix_over_base():
    values = load_playbook(QUICKSTART).scenarios()[3].values()
    assert values == {
        "strategy": "precopy", "memory_mib": 256, "vcpus": 1, "working_set_mib": 96,
        "dirty_rate_mib_s": 24.0, "pattern": "random", "bandwidth_mib_s": 32,
        "downtime_limit_ms": 300, "max_time_s": 120, "postcopy_after_iterations": None,
        "link_rate_mib_s": None, "nic_model": "e1000", "fault": None, "disk_size_mib": None, "disk_storage": None,
        **STRATEGY_TUNING_OFF,
    }


def test_first_matrix_key_varies_slowest(tmp_path):
    text = BASE + "matrix:\n  pattern: [sequential, random]\n  vcpus: [1, 2, 4]\n"
    scenarios = load_playbook(write(tmp_path, text)).scenarios()
    pairs = [(scenario.pattern, scenario.vcpus) for scenario in scenarios]
    assert pairs == [("sequential", 1), ("sequential", 2), ("sequential", 4),
                     ("random", 1), ("random", 2), ("random", 4)]
    assert scenarios[0].scenario_id == "sequential-cpu1"


def test_no_matrix_gives_one_scenario(tmp_path):
    scenarios = load_playbook(write(tmp_path, BASE)).scenarios()
    assert len(scenarios) == 1
    assert scenarios[0].scenario_id == "precopy"


def test_required_field_given_only_in_matrix(tmp_path):
    text = BASE.replace("  strategy: precopy\n", "") + "matrix:\n  strategy: [postcopy]\n"
    scenarios = load_playbook(write(tmp_path, text)).scenarios()
    assert [scenario.strategy for scenario in scenarios] == ["postcopy"]


def test_scenario_id_formats_nulls_and_fractions(tmp_path):
    text = BASE + ("matrix:\n  bandwidth_mib_s: [null, 16]\n  dirty_rate_mib_s: [0.5, 0]\n"
                   "  downtime_limit_ms: [null]\n")
    ids = [scenario.scenario_id for scenario in load_playbook(write(tmp_path, text)).scenarios()]
    assert ids == ["bwunlimited-rate0p5-dtdefault", "bwunlimited-rate0-dtdefault",
                   "bw16-rate0p5-dtdefault", "bw16-rate0-dtdefault"]


def test_scenario_id_collision_gets_hash(tmp_path):
    text = BASE + "matrix:\n  dirty_rate_mib_s: [0.1, 0.1000001, 2]\n"
    first = [scenario.scenario_id for scenario in load_playbook(write(tmp_path, text)).scenarios()]
    again = [scenario.scenario_id for scenario in load_playbook(write(tmp_path, text)).scenarios()]
    assert len(set(first)) == 3
    assert re.fullmatch(r"rate0p1-[0-9a-f]{8}", first[0])
    assert re.fullmatch(r"rate0p1-[0-9a-f]{8}", first[1])
    assert first[2] == "rate2"
    assert first == again


def test_description_and_defaults(tmp_path):
    playbook = load_playbook(write(tmp_path, BASE))
    assert playbook.description == ""
    assert playbook.lab.hosts == 2
    assert playbook.repetitions == 1
    assert playbook.timeouts.guest_boot_s == 60
    assert playbook.timeouts.integrity_s == 30
    assert playbook.migration.max_time_s == 300


# Errors: each names file, line, field, value and fix


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, BASE + "matrix:\n  strategy: [precopy\n  vcpus: [1]\n")
    with pytest.raises(ConfigError) as caught:
        load_playbook(path)
    assert caught.value.line == 12
    assert caught.value.path == str(path)
    assert "invalid YAML" in str(caught.value)


def test_duplicate_yaml_key_rejected(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_playbook(write(tmp_path, BASE + "experiment: again\n"))
    assert "invalid YAML" in str(caught.value)
    assert caught.value.line is not None


def test_unknown_key_suggests_closest(tmp_path):
    error = load_error(tmp_path, BASE.replace("bandwidth_mib_s", "bandwith_mib_s"))
    item = error_for(error, "migration.bandwith_mib_s")
    assert item.line == 9
    assert "bandwidth_mib_s" in item.fix
    assert "unknown key" in str(error)


def test_unknown_top_level_key(tmp_path):
    error = load_error(tmp_path, BASE + "repetition: 3\n")
    item = error_for(error, "repetition")
    assert "repetitions" in item.fix
    assert item.line == 10


def test_wrong_type_named(tmp_path):
    error = load_error(tmp_path, BASE.replace("memory_mib: 256", "memory_mib: lots"))
    item = error_for(error, "guest.memory_mib")
    assert "must be an integer" in str(item)
    assert item.value == "lots"
    assert item.line == 3


def test_bool_is_not_an_integer(tmp_path):
    error = load_error(tmp_path, BASE.replace("memory_mib: 256", "memory_mib: 256\n  vcpus: true"))
    assert "must be an integer" in str(error_for(error, "guest.vcpus"))


def test_quoted_number_is_not_a_number(tmp_path):
    error = load_error(tmp_path, BASE.replace("dirty_rate_mib_s: 8", 'dirty_rate_mib_s: "8"'))
    assert "must be a number" in str(error_for(error, "workload.dirty_rate_mib_s"))


def test_section_must_be_mapping(tmp_path):
    error = load_error(tmp_path, BASE + "timeouts: 60\n")
    assert "must be a mapping" in str(error_for(error, "timeouts"))


def test_out_of_range_values(tmp_path):
    text = BASE + "repetitions: 0\nlab:\n  hosts: 1\n"
    error = load_error(tmp_path, text)
    assert "at least 1" in str(error_for(error, "repetitions"))
    assert "at least 2" in str(error_for(error, "lab.hosts"))


def test_unknown_strategy_lists_allowed(tmp_path):
    error = load_error(tmp_path, BASE.replace("strategy: precopy", "strategy: warp"))
    item = error_for(error, "migration.strategy")
    assert "unknown strategy" in str(item)
    for strategy in STRATEGIES:
        assert strategy in item.fix


def test_invalid_experiment_name(tmp_path):
    error = load_error(tmp_path, BASE.replace("experiment: unit", "experiment: Unit Test"))
    item = error_for(error, "experiment")
    assert item.value == "Unit Test"
    assert item.line == 1


def test_missing_required_field(tmp_path):
    error = load_error(tmp_path, BASE.replace("  working_set_mib: 96\n", ""))
    item = error_for(error, "workload.working_set_mib")
    assert "required" in str(item)
    assert "matrix.working_set_mib" in item.fix


def test_missing_experiment(tmp_path):
    error = load_error(tmp_path, BASE.replace("experiment: unit\n", ""))
    assert "required key is missing" in str(error_for(error, "experiment"))


def test_unknown_matrix_key_lists_allowed(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  dirty_rate: [4, 8]\n")
    item = error_for(error, "matrix.dirty_rate")
    assert item.line == 11
    assert "dirty_rate_mib_s" in item.fix
    assert "postcopy_after_iterations" in item.fix


def test_empty_matrix_list(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  vcpus: []\n")
    assert "empty list" in str(error_for(error, "matrix.vcpus"))


def test_matrix_value_must_be_list(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  vcpus: 2\n")
    assert "must be a list" in str(error_for(error, "matrix.vcpus"))


def test_invalid_matrix_value_has_index_and_line(tmp_path):
    text = BASE + "matrix:\n  strategy:\n    - precopy\n    - postcopy\n    - teleport\n"
    error = load_error(tmp_path, text)
    item = error_for(error, "matrix.strategy[2]")
    assert item.line == 14
    assert item.value == "teleport"
    assert "hybrid" in item.fix


def test_negative_matrix_rate_rejected(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  dirty_rate_mib_s: [4, -1]\n")
    assert "at least 0" in str(error_for(error, "matrix.dirty_rate_mib_s[1]"))


def test_duplicate_matrix_value(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  dirty_rate_mib_s: [4, 8, 4.0]\n")
    item = error_for(error, "matrix.dirty_rate_mib_s[2]")
    assert "duplicate of matrix.dirty_rate_mib_s[0]" in str(item)


def test_combination_failing_cross_check_named(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  memory_mib: [256, 128]\n")
    item = error_for(error, "matrix")
    assert "memory_mib=128" in str(item)
    assert f"{128 - GUEST_HEADROOM_MIB} MiB" in str(item)
    assert len(error.errors) == 1


def test_base_working_set_too_large(tmp_path):
    error = load_error(tmp_path, BASE.replace("working_set_mib: 96", "working_set_mib: 240"))
    item = error_for(error, "workload.working_set_mib")
    assert item.value == 240
    assert item.line == 5


def test_hybrid_needs_iterations(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  strategy: [precopy, hybrid]\n")
    item = error_for(error, "matrix")
    assert "strategy=hybrid" in str(item)
    assert "postcopy_after_iterations" in str(item)


def test_iterations_without_hybrid_rejected(tmp_path):
    text = BASE + "  postcopy_after_iterations: 2\n"
    error = load_error(tmp_path, text)
    assert "hybrid" in str(error_for(error, "migration.postcopy_after_iterations"))


def test_matrix_iterations_for_precopy_rejected(tmp_path):
    text = BASE + "matrix:\n  strategy: [hybrid, precopy]\n  postcopy_after_iterations: [1, 3]\n"
    error = load_error(tmp_path, text)
    messages = [str(item) for item in error.errors]
    assert len(messages) == 2
    assert "strategy=precopy, postcopy_after_iterations=1" in messages[0]
    assert "strategy=precopy, postcopy_after_iterations=3" in messages[1]


def test_all_errors_reported_in_line_order(tmp_path):
    text = """\
experiment: Bad Name
guest:
  memory_mib: 256
  vcpu: 2
workload:
  working_set_mib: 96
  dirty_rate_mib_s: 8
  pattern: zigzag
migration:
  strategy: precopy
  bandwidth_mib_s: 0
matrix:
  strategy: [precopy, warp]
repetitions: 0
"""
    error = load_error(tmp_path, text)
    fields = [item.field for item in error.errors]
    assert fields == ["experiment", "guest.vcpu", "workload.pattern",
                      "migration.bandwidth_mib_s", "matrix.strategy[1]", "repetitions"]
    for item in error.errors:
        assert str(item) in str(error)
    assert "6 errors" in str(error)


def test_error_renders_file_line_field_value(tmp_path):
    error = load_error(tmp_path, BASE.replace("bandwidth_mib_s: 32", "bandwidth_mib_s: -5"))
    text = str(error)
    assert text.startswith(f"{tmp_path / 'playbook.yaml'}:9: field 'migration.bandwidth_mib_s': ")
    assert "(got -5)" in text


def test_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="playbook is empty"):
        load_playbook(write(tmp_path, "# nothing\n"))


def test_top_level_list(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_playbook(write(tmp_path, "- experiment: unit\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="playbook not found"):
        load_playbook(tmp_path / "absent.yaml")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"description: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_playbook(path)


# Models built in code


def test_scenario_cross_check_in_code():
    with pytest.raises(ValidationError, match="working set of 300 MiB"):
        Scenario(strategy="precopy", memory_mib=256, vcpus=1, working_set_mib=300,
                 dirty_rate_mib_s=4, pattern="random", bandwidth_mib_s=None,
                 downtime_limit_ms=None, max_time_s=60, postcopy_after_iterations=None)


def test_scenario_default_id_and_values():
    scenario = Scenario(strategy="hybrid", memory_mib=256, vcpus=1, working_set_mib=96,
                        dirty_rate_mib_s=4, pattern="random", bandwidth_mib_s=None,
                        downtime_limit_ms=None, max_time_s=60, postcopy_after_iterations=1)
    assert scenario.scenario_id == "hybrid"
    assert "scenario_id" not in scenario.values()
    with pytest.raises(ValidationError):
        scenario.vcpus = 2


def test_playbook_in_code_checks_matrix():
    with pytest.raises(ValidationError, match="unknown matrix key"):
        Playbook(experiment="unit", guest={"memory_mib": 256},
                 workload={"working_set_mib": 96, "dirty_rate_mib_s": 1},
                 migration={"strategy": "precopy"}, matrix={"cpus": [1]})


def test_playbook_in_code_has_no_path():
    playbook = Playbook(experiment="unit", guest={"memory_mib": 256},
                        workload={"working_set_mib": 96, "dirty_rate_mib_s": 1},
                        migration={"strategy": "precopy"})
    assert playbook.path is None
    assert playbook.sha256 is None


# Property tests of the validators


@HYPOTHESIS_SETTINGS
@given(bandwidth=st.integers(min_value=1, max_value=10**9))
def test_positive_bandwidth_accepted(tmp_path, bandwidth):
    text = BASE.replace("bandwidth_mib_s: 32", f"bandwidth_mib_s: {bandwidth}")
    playbook = load_playbook(write(tmp_path, text))
    assert playbook.scenarios()[0].bandwidth_mib_s == bandwidth


@HYPOTHESIS_SETTINGS
@given(bandwidth=st.integers(max_value=0))
def test_non_positive_bandwidth_rejected(tmp_path, bandwidth):
    text = BASE.replace("bandwidth_mib_s: 32", f"bandwidth_mib_s: {bandwidth}")
    error = load_error(tmp_path, text)
    item = error_for(error, "migration.bandwidth_mib_s")
    assert item.value == bandwidth
    assert "greater than 0" in str(item)


@HYPOTHESIS_SETTINGS
@given(rates=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1,
                      max_size=5, unique=True))
def test_any_non_negative_matrix_rate_accepted(tmp_path, rates):
    listed = ", ".join(repr(rate) for rate in rates)
    text = BASE + f"matrix:\n  dirty_rate_mib_s: [{listed}]\n"
    scenarios = load_playbook(write(tmp_path, text)).scenarios()
    ids = [scenario.scenario_id for scenario in scenarios]
    assert [scenario.dirty_rate_mib_s for scenario in scenarios] == rates
    assert len(set(ids)) == len(ids)
    for scenario_id in ids:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", scenario_id)


@HYPOTHESIS_SETTINGS
@given(rate=st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
def test_negative_matrix_rate_named(tmp_path, rate):
    error = load_error(tmp_path, BASE + f"matrix:\n  dirty_rate_mib_s: [1, {rate!r}]\n")
    item = error_for(error, "matrix.dirty_rate_mib_s[1]")
    assert item.value == rate


@HYPOTHESIS_SETTINGS
@given(memory=st.integers(min_value=1, max_value=4096), working_set=st.integers(1, 4096))
def test_working_set_headroom_rule(tmp_path, memory, working_set):
    text = (BASE.replace("memory_mib: 256", f"memory_mib: {memory}")
            .replace("working_set_mib: 96", f"working_set_mib: {working_set}"))
    path = write(tmp_path, text)
    if working_set <= memory - GUEST_HEADROOM_MIB:
        assert load_playbook(path).scenarios()[0].working_set_mib == working_set
    else:
        with pytest.raises(ConfigError) as caught:
            load_playbook(path)
        assert caught.value.field == "workload.working_set_mib"
