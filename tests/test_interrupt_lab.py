"""Ctrl-C, resume, kill -9 and clean, with the real migrlab command on the real lab."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.lab_helpers import migrlab, new_consoles, wait_until

pytestmark = pytest.mark.lab

# Two runs: a fast one, then one slow enough (32 MiB at 4 MiB/s) to interrupt mid-migration.
PLAYBOOK = """
experiment: interrupt-check
guest: {memory_mib: 128, vcpus: 1}
workload: {working_set_mib: 32, dirty_rate_mib_s: 2, pattern: sequential}
migration: {strategy: precopy, downtime_limit_ms: 300, max_time_s: 180}
matrix:
  bandwidth_mib_s: [64, 4]
repetitions: 1
"""
FAST_RUN = "bw64-r1"
SLOW_RUN = "bw4-r1"


def migration_running(shared_lab, since: float) -> bool:
    """Return True once a destination QEMU started after *since* (a time.time() value)."""
    return bool(new_consoles(shared_lab, "h2", since))


def outcome(experiment_dir, run_id):
    return json.loads((experiment_dir / "runs" / run_id / "record.json").read_text())["outcome"]


def leftover_domains(shared_lab):
    return {host: names for host, names in shared_lab.status().domains.items() if names}


@pytest.fixture
def playbook(tmp_path):
    path = tmp_path / "interrupt.yaml"
    path.write_text(PLAYBOOK)
    return path


def test_ctrl_c_then_resume(shared_lab, guest_image, playbook, tmp_path):
    results = tmp_path / "results"
    experiment_dir = results / "interrupt-check"
    process = migrlab(shared_lab, "run", str(playbook), "--results", str(results), "--no-report")
    try:
        wait_until(lambda: (experiment_dir / "runs" / FAST_RUN).exists(), 240, "the first run")
        second_started = time.time()
        wait_until(lambda: migration_running(shared_lab, second_started), 120, "the second migration")
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    assert outcome(experiment_dir, FAST_RUN) == "completed"
    assert outcome(experiment_dir, SLOW_RUN) == "cancelled"
    assert leftover_domains(shared_lab) == {}

    resumed = migrlab(shared_lab, "run", str(playbook), "--results", str(results), "--resume", "--no-report")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "skipped 1 already stored" in stdout
    assert outcome(experiment_dir, FAST_RUN) == "completed"
    assert outcome(experiment_dir, SLOW_RUN) == "completed"
    assert leftover_domains(shared_lab) == {}


def test_resume_rejects_changed_playbook(shared_lab, playbook, tmp_path):
    results = tmp_path / "results"
    runs_dir = results / "interrupt-check" / "runs"
    runs_dir.mkdir(parents=True)
    (results / "interrupt-check" / "experiment.json").write_text(json.dumps(
        {"schema_version": 1, "experiment": "interrupt-check", "playbook_sha256": "0" * 64,
         "created_at": "2026-01-01T00:00:00Z", "environment": None}))
    (results / "interrupt-check" / "playbook.yaml").write_text(PLAYBOOK.replace("[64, 4]", "[64, 8]"))
    process = migrlab(shared_lab, "run", str(playbook), "--results", str(results), "--resume")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "another version of this playbook" in stderr
    assert "-  bandwidth_mib_s: [64, 8]" in stderr
    assert "+  bandwidth_mib_s: [64, 4]" in stderr
    assert leftover_domains(shared_lab) == {}


def test_kill_9_then_clean(shared_lab, guest_image, playbook, tmp_path):
    results = tmp_path / "results"
    single = playbook.read_text().replace("bandwidth_mib_s: [64, 4]", "bandwidth_mib_s: [4]")
    playbook.write_text(single)
    started = time.time()
    process = migrlab(shared_lab, "run", str(playbook), "--results", str(results), "--no-report",
                      start_new_session=True)
    try:
        wait_until(lambda: migration_running(shared_lab, started), 180, "the migration")
        time.sleep(1)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert leftover_domains(shared_lab) != {}

    cleaner = migrlab(shared_lab, "clean", "--results", str(results))
    stdout, stderr = cleaner.communicate(timeout=120)
    assert cleaner.returncode == 0, stderr
    assert "removed guest mlab-" in stdout
    assert leftover_domains(shared_lab) == {}
    console_dir = Path(shared_lab.host("h1").log_dir) / "qemu"
    assert list(console_dir.glob("mlab-*-console.log")) == []
    assert not list((results / "interrupt-check" / "runs").glob(".*"))
