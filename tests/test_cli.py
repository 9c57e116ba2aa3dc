"""The migrlab command without a lab: help, bad input and reports."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lab.cli import main
from tests.fixtures.fabricate import fabricate_experiment

BASE = """experiment: cli-check
guest: {memory_mib: 256, vcpus: 1}
workload: {working_set_mib: 64, dirty_rate_mib_s: 4, pattern: random}
migration: {strategy: precopy, bandwidth_mib_s: 32}
repetitions: 1
"""


@pytest.fixture
def cli():
    return CliRunner()


def run_playbook(cli, tmp_path, text):
    path = tmp_path / "book.yaml"
    path.write_text(text)
    result = cli.invoke(main, ["run", str(path), "--results", str(tmp_path / "results")])
    return path, result


def test_help_lists_commands(cli):
    result = cli.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "report", "lab", "image", "doctor"):
        assert command in result.output


@pytest.mark.parametrize("text, field, value", [
    (BASE.replace("strategy: precopy", "strategy: precopyy"), "migration.strategy", "precopyy"),
    (BASE.replace("bandwidth_mib_s: 32", "bandwidth_mib_s: 0"), "migration.bandwidth_mib_s", "0"),
    (BASE.replace("bandwidth_mib_s: 32", "bandwidth_mib_s: -5"), "migration.bandwidth_mib_s", "-5"),
    (BASE.replace("bandwidth_mib_s: 32", "bandwith_mib_s: 32"), "migration.bandwith_mib_s", "bandwith_mib_s"),
    (BASE.replace("vcpus: 1", "vcpus: one"), "guest.vcpus", "one"),
    (BASE + "matrix: {strategy: [precopy, warp]}\n", "matrix.strategy[1]", "warp"),
])
def test_run_rejects_bad_playbook(cli, tmp_path, text, field, value):
    path, result = run_playbook(cli, tmp_path, text)
    assert result.exit_code == 1
    assert str(path) in result.output
    assert f"field '{field}'" in result.output
    assert value in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "results").exists()


def test_run_rejects_working_set_above_memory(cli, tmp_path):
    path, result = run_playbook(cli, tmp_path, BASE.replace("working_set_mib: 64", "working_set_mib: 300"))
    assert result.exit_code == 1
    assert "working_set_mib" in result.output
    assert "300" in result.output
    assert not (tmp_path / "results").exists()


def test_run_rejects_malformed_yaml(cli, tmp_path):
    path, result = run_playbook(cli, tmp_path, BASE + "matrix: {strategy: [precopy\n")
    assert result.exit_code == 1
    assert str(path) in result.output
    assert not (tmp_path / "results").exists()


def test_run_reports_missing_playbook(cli, tmp_path):
    result = cli.invoke(main, ["run", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 1
    assert "absent.yaml" in result.output
    assert "not found" in result.output


def test_clean_reports_missing_inventory(cli, tmp_path):
    result = cli.invoke(main, ["clean", "--inventory", str(tmp_path / "absent.yaml"),
                               "--results", str(tmp_path / "results")])
    assert result.exit_code == 1
    assert "absent.yaml" in result.output
    assert "inventory not found" in result.output


@pytest.mark.parametrize("value", ["local", "local-ssh"])
def test_clean_inventory_needs_local_lab_up(cli, tmp_path, value):
    env = {"MIGRLAB_LAB_DIR": str(tmp_path / "lab"), "MIGRLAB_LAB_PREFIX": "cli-check"}
    result = cli.invoke(main, ["clean", "--inventory", value, "--results", str(tmp_path / "results")], env=env)
    assert result.exit_code == 1
    assert "is not up, so it has no inventory" in result.output


def test_report_writes_figures(cli, tmp_path):
    experiment_dir = fabricate_experiment(tmp_path)
    result = cli.invoke(main, ["report", str(experiment_dir)])
    assert result.exit_code == 0, result.output
    assert "downtime_by_strategy.png" in result.output
    assert (experiment_dir / "report" / "summary.md").exists()
