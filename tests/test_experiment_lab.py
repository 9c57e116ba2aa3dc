"""A small experiment on the real local lab: precopy and postcopy, end to end.

Checks that the figures of each run agree with each other and with the
workload the guest ran, and that the report is written from the stored runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.report import write_report
from lab.store import load_events, load_record, load_runs, load_timeline
from tests.lab_helpers import run_playbook_text

pytestmark = pytest.mark.lab

WORKING_SET_MIB = 64
PLAYBOOK = f"""
experiment: lab-precopy-postcopy
description: one precopy and one postcopy migration with a dirtying workload
lab:
  hosts: 2
guest:
  memory_mib: 192
  vcpus: 1
workload:
  working_set_mib: {WORKING_SET_MIB}
  dirty_rate_mib_s: 8
  pattern: random
migration:
  strategy: precopy
  bandwidth_mib_s: 48
  downtime_limit_ms: 300
  max_time_s: 120
matrix:
  strategy: [precopy, postcopy]
repetitions: 1
"""


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, tmp_path_factory):
    return run_playbook_text(PLAYBOOK, shared_lab, tmp_path_factory.mktemp("experiment"), "precopy and postcopy")


def run_dir(experiment, strategy):
    return experiment.experiment_dir / "runs" / f"{strategy}-r1"


def test_every_run_completed(experiment):
    assert experiment.outcomes == {"precopy-r1": "completed", "postcopy-r1": "completed"}
    assert not experiment.interrupted


@pytest.mark.parametrize("strategy", ["precopy", "postcopy"])
def test_figures_agree(experiment, strategy):
    record = load_record(run_dir(experiment, strategy))
    stats = record.stats
    assert stats.transferred_bytes >= WORKING_SET_MIB * 2**20
    assert stats.downtime_ms > 0
    assert stats.iterations >= 1
    assert stats.total_time_ms > 0
    assert record.measured.wall_downtime_ms is not None
    assert record.measured.wall_downtime_ms > 0
    assert record.measured.transfer_time_ms <= record.measured.wall_total_ms


def test_postcopy_fetched_pages_on_demand(experiment):
    record = load_record(run_dir(experiment, "postcopy"))
    assert record.stats.postcopy_requests > 0
    assert record.measured.postcopy_started_at_s is not None


def test_precopy_made_no_postcopy_requests(experiment):
    record = load_record(run_dir(experiment, "precopy"))
    assert not record.stats.postcopy_requests
    assert record.measured.postcopy_started_at_s is None


@pytest.mark.parametrize("strategy", ["precopy", "postcopy"])
def test_guest_alive_and_intact(experiment, strategy):
    integrity = load_record(run_dir(experiment, strategy)).integrity
    assert integrity.guest_alive
    assert integrity.reports_after_migration >= 3
    assert integrity.bad_pages == 0
    assert integrity.console_trouble == []
    assert integrity.checked_pages > 0


@pytest.mark.parametrize("strategy", ["precopy", "postcopy"])
def test_timeline_sampled_at_10hz(experiment, strategy):
    folder = run_dir(experiment, strategy)
    timeline = load_timeline(folder)
    record = load_record(folder)
    migration_s = record.measured.transfer_time_ms / 1000
    assert len(timeline) >= 10 * migration_s * 0.8
    assert timeline["t_s"].is_monotonic_increasing
    assert timeline["data_processed_bytes"].max() > 0


@pytest.mark.parametrize("strategy", ["precopy", "postcopy"])
def test_events_and_consoles_per_host(experiment, strategy):
    folder = run_dir(experiment, strategy)
    events = load_events(folder)
    kinds = {(event["host"], event["kind"]) for event in events}
    assert ("h1", "suspended") in kinds
    assert ("h2", "resumed") in kinds
    assert ("h1", "iteration") in kinds
    assert "mlab-workload: ready" in (folder / "console-h1.log").read_text()
    assert "mlab-workload: t_ms=" in (folder / "console-h2.log").read_text()


@pytest.mark.parametrize("strategy", ["precopy", "postcopy"])
def test_qemu_logs_stored_per_host(experiment, strategy, shared_lab):
    folder = run_dir(experiment, strategy)
    source_log = (folder / "qemu-h1.log").read_text()
    destination_log = (folder / "qemu-h2.log").read_text()
    assert "qemu-system-x86_64" in source_log
    assert "-incoming" in destination_log
    guest = next(line for line in source_log.splitlines() if "guest=" in line).split("guest=")[1].split(",")[0]
    for host in ("h1", "h2"):
        assert not (Path(shared_lab.host(host).log_dir) / "qemu" / f"{guest}.log").exists()


def test_environment_recorded(experiment):
    environment = load_record(run_dir(experiment, "precopy")).environment
    assert environment.accelerator in ("kvm", "tcg")
    assert environment.qemu_version.count(".") == 2
    assert environment.libvirt_version.count(".") == 2
    assert len(environment.guest_image_digest) >= 16
    assert environment.playbook_sha256


def test_no_guest_left_on_hosts(experiment, shared_lab):
    status = shared_lab.status()
    assert all(not names for names in status.domains.values())


def test_report_from_stored_runs(experiment):
    paths = write_report(experiment.experiment_dir)
    names = {path.name for path in paths}
    assert {"summary.md", "summary.csv", "downtime_by_strategy.png",
            "time_and_bytes_vs_dirty_rate.png"} <= names
    runs = load_runs(experiment.experiment_dir)
    assert len(runs) == 2
    assert set(runs["strategy"]) == {"precopy", "postcopy"}
    assert (runs["downtime_ms"] > 0).all()
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((experiment.experiment_dir / "experiment.json").read_text())["experiment"] \
        == "lab-precopy-postcopy"
