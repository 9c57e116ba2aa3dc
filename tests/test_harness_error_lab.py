"""An error inside the harness fails one run, keeps its record and leaves the lab clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import runner as runner_module
from lab.store import load_record
from tests.lab_helpers import lab_qemu_pids, run_playbook_text

pytestmark = pytest.mark.lab

PLAYBOOK = """
experiment: lab-harness-error
guest: {memory_mib: 128, vcpus: 1}
workload: {working_set_mib: 16, dirty_rate_mib_s: 2, pattern: sequential}
migration: {strategy: precopy, bandwidth_mib_s: 64, downtime_limit_ms: 300, max_time_s: 60}
matrix:
  downtime_limit_ms: [300, 500]
repetitions: 1
"""


def test_harness_error_fails_one_run(shared_lab, guest_image, tmp_path, monkeypatch):
    real_run = runner_module.Migration.run
    migrated_guests = []

    def first_run_breaks(self):
        migrated_guests.append(self.domain.name())
        if len(migrated_guests) == 1:
            raise EOFError("the harness lost a socket")
        return real_run(self)

    monkeypatch.setattr(runner_module.Migration, "run", first_run_breaks)
    summary = run_playbook_text(PLAYBOOK, shared_lab, tmp_path, "harness error")

    assert summary.outcomes == {"dt300-r1": "failed", "dt500-r1": "completed"}
    broken = load_record(summary.experiment_dir / "runs" / "dt300-r1")
    assert broken.error == "internal error of the harness: EOFError: the harness lost a socket"
    assert len(migrated_guests) == 2
    assert {host: names for host, names in shared_lab.status().domains.items() if names} == {}
    assert lab_qemu_pids(shared_lab) == []
    for host in ("h1", "h2"):
        assert list((Path(shared_lab.host(host).log_dir) / "qemu").glob("mlab-*-console.log")) == []
