"""A guest with a disk on the real local lab: shared, local and copy storage, one run each.

shared moves only memory without VIR_MIGRATE_UNSAFE, because the lab's
hosts list the shared folder in qemu.conf's shared_filesystems. local fails
with the guest still running on the source, and copy moves the disk over NBD
besides memory. No disk file may be left on either host afterwards.
"""

from __future__ import annotations

import pytest

from lab.store import load_events, load_record, load_timeline
from tests.lab_helpers import run_playbook_text

pytestmark = pytest.mark.lab

DISK_MIB = 32
PLAYBOOK = f"""
experiment: lab-disk
guest:
  memory_mib: 192
  disk: {{size_mib: {DISK_MIB}}}
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
migration:
  strategy: precopy
  bandwidth_mib_s: 32
  max_time_s: 60
matrix:
  disk_storage: [shared, local, copy]
probes:
  echo: {{enabled: false}}
  stream: {{enabled: false}}
  capture: {{enabled: false}}
  baseline_s: 0
"""


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, tmp_path_factory):
    return run_playbook_text(PLAYBOOK, shared_lab, tmp_path_factory.mktemp("disk"), "disk")


def record(experiment, storage):
    return load_record(experiment.experiment_dir / "runs" / f"disk-{storage}-r1")


def test_disk_outcomes(experiment):
    assert experiment.outcomes == {"disk-shared-r1": "completed", "disk-local-r1": "failed",
                                   "disk-copy-r1": "completed"}


def test_shared_disk_moves_only_memory(experiment):
    run = record(experiment, "shared")
    assert run.disk.storage == "shared"
    assert not run.disk.unsafe_flag
    assert run.disk.unsafe_reason is None
    assert run.disk.cache == "none"
    assert run.stats.transferred_bytes > 0
    assert not run.stats.disk_processed_bytes
    assert run.integrity.guest_alive
    assert run.disk.writes_destination > 0
    assert run.disk.write_errors == []


def test_local_disk_fails_with_guest_on_source(experiment):
    run = record(experiment, "local")
    assert run.outcome == "failed"
    assert "shared storage" in run.error
    assert run.integrity.guest_alive
    assert run.integrity.reports_after_migration >= 3
    assert run.disk.writes_source > 0
    assert run.disk.writes_destination == 0
    events = load_events(experiment.experiment_dir / "runs" / "disk-local-r1")
    assert not [event for event in events if event["host"] == "h2" and event["kind"] == "started"]


def test_copy_disk_moves_disk_bytes(experiment):
    run = record(experiment, "copy")
    shared = record(experiment, "shared")
    assert run.disk.destination_precreated
    assert not run.disk.unsafe_flag
    assert run.stats.disk_processed_bytes >= DISK_MIB * 2**20
    assert run.stats.disk_total_bytes >= run.stats.disk_processed_bytes
    assert run.stats.transferred_bytes > 0
    assert run.integrity.guest_alive
    assert run.integrity.bad_pages == 0
    assert run.disk.writes_destination > 0
    assert run.disk.write_errors == []
    # At 32 MiB/s the copy alone takes about a second per 32 MiB.
    assert run.stats.total_time_ms > shared.stats.total_time_ms
    timeline = load_timeline(experiment.experiment_dir / "runs" / "disk-copy-r1")
    assert timeline["disk_processed_bytes"].max() > 0


def test_no_disk_file_left(experiment, shared_lab):
    for storage in ("shared", "local", "copy"):
        assert record(experiment, storage).disk.left_behind == []
    leftovers = [path for path in shared_lab.root.rglob("*.img")]
    assert leftovers == []
