"""migrlab plan: scenarios, run count and the simple precopy model, without a lab."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from click.testing import CliRunner

from lab.classroom import GUEST_RESIDENT_MIB
from lab.cli import main

# Working set of 30 MiB plus the guest's resident memory: M = 96 MiB with GUEST_RESIDENT_MIB = 66.
PLAYBOOK = """experiment: plan-check
guest: {memory_mib: 192}
workload: {working_set_mib: 30, dirty_rate_mib_s: 4}
migration: {strategy: precopy, bandwidth_mib_s: 32, downtime_limit_ms: 300, max_time_s: 40}
matrix:
  strategy: [stop-and-copy, precopy, postcopy]
  dirty_rate_mib_s: [4, 40]
repetitions: 2
"""


@pytest.fixture
def playbook_path(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAYBOOK)
    return path


def plan_csv(path) -> pd.DataFrame:
    result = CliRunner().invoke(main, ["plan", str(path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    return pd.read_csv(io.StringIO(result.output)).set_index("scenario")


def test_plan_lists_every_scenario(playbook_path):
    table = plan_csv(playbook_path)
    assert sorted(table.index) == sorted(f"{strategy}-rate{rate}" for strategy in
                                         ("stop-and-copy", "precopy", "postcopy") for rate in (4, 40))
    assert "dirty_rate_mib_s" in table.columns
    assert "memory_mib" not in table.columns


def test_plan_predicts_precopy_rounds(playbook_path):
    table = plan_csv(playbook_path)
    memory_mib = 30 + GUEST_RESIDENT_MIB
    budget_mib = 32 * 0.3
    ratio = 4 / 32
    # The last round is the first whose size M * L**n fits in the downtime budget.
    last = next(n for n in range(30) if memory_mib * ratio**n <= budget_mib)
    row = table.loc["precopy-rate4"]
    assert row["model_rounds"] == last + 1
    assert row["model_ratio"] == pytest.approx(ratio, abs=0.005)
    assert row["model_downtime_ms"] == pytest.approx(memory_mib * ratio**last / 32 * 1000, abs=0.5)


def test_plan_stop_and_copy_pauses_for_whole_copy(playbook_path):
    row = plan_csv(playbook_path).loc["stop-and-copy-rate4"]
    memory_mib = 30 + GUEST_RESIDENT_MIB
    assert row["model_rounds"] == 1
    assert row["model_downtime_ms"] == pytest.approx(memory_mib / 32 * 1000, abs=0.5)


def test_plan_marks_precopy_that_never_converges(playbook_path):
    row = plan_csv(playbook_path).loc["precopy-rate40"]
    assert math.isinf(row["model_time_s"])
    assert pd.isna(row["model_rounds"])


def test_plan_has_no_model_for_postcopy(playbook_path):
    row = plan_csv(playbook_path).loc["postcopy-rate4"]
    assert pd.isna(row["model_ratio"])
    assert pd.isna(row["model_time_s"])


def test_plan_table_counts_runs(playbook_path):
    result = CliRunner().invoke(main, ["plan", str(playbook_path)])
    assert result.exit_code == 0, result.output
    assert "6 scenarios x 2 repetitions = 12 runs" in result.output
    # 12 runs of at most 40 s each.
    assert "at most 8.0 min" in result.output
    assert "memory_mib 192" in result.output


def test_plan_rejects_bad_playbook(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(PLAYBOOK.replace("bandwidth_mib_s: 32", "bandwidth_mib_s: -1"))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 1
    assert str(path) in result.output
    assert "migration.bandwidth_mib_s" in result.output


def test_plan_table_leaves_matrix_keys_to_ids(playbook_path):
    result = CliRunner().invoke(main, ["plan", str(playbook_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "precopy-rate40" in result.output
    assert "dirty MiB/s" not in result.output
