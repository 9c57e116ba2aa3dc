"""The guest disk: playbook fields, domain XML, migration flags, records, report and disk files."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pandas as pd
import pytest

from lab import disks, domain
from lab.classroom import scenario_means
from lab.errors import ConfigError, LabError, MigrationError
from lab.guest.console import scan_console
from lab.guest.image import kernel_cmdline
from lab.hosts.local import LocalLab
from lab.hosts.shell import CommandResult, run_local
from lab.migrate import MigrationSettings
from lab.playbook import load_playbook
from lab.records import DiskRecord, MigrationStats
from lab.report import summarize

BASE = """
experiment: disk-test
guest:
  memory_mib: 192
{guest}
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
migration:
  strategy: {strategy}
{matrix}
"""


def write_playbook(tmp_path: Path, guest: str = "", strategy: str = "precopy", matrix: str = "") -> Path:
    path = tmp_path / "playbook.yaml"
    path.write_text(BASE.format(guest=guest, strategy=strategy, matrix=matrix))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_playbook(path)
    return str(caught.value)


# -- playbook --------------------------------------------------------------------

def test_playbook_without_disk_has_none(tmp_path):
    scenario = load_playbook(write_playbook(tmp_path)).scenarios()[0]
    assert scenario.disk_size_mib is None
    assert scenario.disk_storage is None
    assert scenario.scenario_id == "precopy"


def test_guest_disk_storage_defaults_to_shared(tmp_path):
    scenario = load_playbook(write_playbook(tmp_path, "  disk: {size_mib: 64}")).scenarios()[0]
    assert scenario.disk_size_mib == 64
    assert scenario.disk_storage == "shared"


def test_matrix_varies_disk_storage(tmp_path):
    path = write_playbook(tmp_path, "  disk: {size_mib: 64, storage: copy}",
                          matrix="matrix:\n  disk_storage: [shared, local, copy]")
    scenarios = load_playbook(path).scenarios()
    assert [s.scenario_id for s in scenarios] == ["disk-shared", "disk-local", "disk-copy"]
    assert [s.disk_storage for s in scenarios] == ["shared", "local", "copy"]
    assert {s.disk_size_mib for s in scenarios} == {64}


def test_matrix_disk_size_without_base_disk_is_shared(tmp_path):
    path = write_playbook(tmp_path, matrix="matrix:\n  disk_size_mib: [null, 32]")
    scenarios = load_playbook(path).scenarios()
    assert [s.scenario_id for s in scenarios] == ["disknone", "disk32"]
    assert [(s.disk_size_mib, s.disk_storage) for s in scenarios] == [(None, None), (32, "shared")]


def test_matrix_null_size_drops_base_storage(tmp_path):
    path = write_playbook(tmp_path, "  disk: {size_mib: 64, storage: copy}",
                          matrix="matrix:\n  disk_size_mib: [null, 64]")
    scenarios = load_playbook(path).scenarios()
    assert [(s.disk_size_mib, s.disk_storage) for s in scenarios] == [(None, None), (64, "copy")]


@pytest.mark.parametrize(("guest", "field", "message"), [
    ("  disk: {size_mib: 0}", "guest.disk.size_mib", "must be greater than 0 (got 0)"),
    ("  disk: {size_mib: 20000}", "guest.disk.size_mib", "must be at most 16384 (got 20000)"),
    ("  disk: {size_mib: 64, storage: nfs}", "guest.disk.storage",
     "invalid value (got 'nfs'). Allowed: 'shared', 'local' or 'copy'"),
    ("  disk: {size_mib: 64, sise: 3}", "guest.disk.sise", "Valid keys: size_mib, storage"),
    ("  disk: {storage: local}", "guest.disk.size_mib", "required key is missing"),
])
def test_guest_disk_rejects_bad_values(tmp_path, guest, field, message):
    text = load_error(write_playbook(tmp_path, guest))
    assert "playbook.yaml:" in text
    assert f"field '{field}'" in text
    assert message in text


def test_matrix_storage_without_disk_rejected(tmp_path):
    text = load_error(write_playbook(tmp_path, matrix="matrix:\n  disk_storage: [local]"))
    assert "field 'matrix'" in text
    assert "disk_storage local needs a guest disk" in text
    assert "Set guest.disk.size_mib" in text


def test_matrix_rejects_unknown_storage(tmp_path):
    text = load_error(write_playbook(tmp_path, "  disk: {size_mib: 64}",
                                     matrix="matrix:\n  disk_storage: [shard]"))
    assert "field 'matrix.disk_storage[0]'" in text
    assert "(got 'shard')" in text


@pytest.mark.parametrize("storage", ["local", "copy"])
def test_flushing_rejects_unshared_disk(tmp_path, storage):
    text = load_error(write_playbook(tmp_path, f"  disk: {{size_mib: 64, storage: {storage}}}",
                                     strategy="flushing"))
    assert "field 'guest.disk.storage'" in text
    assert f"disk_storage {storage} cannot work with it" in text
    assert "Use disk_storage shared for flushing runs" in text


def test_flushing_accepts_shared_disk(tmp_path):
    path = write_playbook(tmp_path, "  disk: {size_mib: 64, storage: shared}", strategy="flushing")
    assert load_playbook(path).scenarios()[0].disk_storage == "shared"


# -- domain XML and kernel command line --------------------------------------------

def make_spec(disk: domain.DiskSpec | None) -> domain.GuestSpec:
    return domain.GuestSpec(name="mlab-001-abc", run_id="r1", memory_mib=192, vcpus=1, kernel=Path("/k"),
                            initrd=Path("/i"), cmdline="console=ttyS0", accelerator="tcg", disk=disk)


def test_domain_xml_without_disk_has_no_disk():
    root = ET.fromstring(domain.domain_xml(make_spec(None)))
    assert root.find("devices/disk") is None


def test_domain_xml_disk_cache_none_uses_native_io():
    root = ET.fromstring(domain.domain_xml(make_spec(domain.DiskSpec("/var/lib/libvirt/images/g.img"))))
    disk = root.find("devices/disk")
    assert disk.get("type") == "file"
    assert disk.get("device") == "disk"
    driver = disk.find("driver")
    assert driver.attrib == {"name": "qemu", "type": "raw", "cache": "none", "io": "native"}
    assert disk.find("source").get("file") == "/var/lib/libvirt/images/g.img"
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}


def test_domain_xml_disk_writeback_has_default_io():
    root = ET.fromstring(domain.domain_xml(make_spec(domain.DiskSpec("/s/g.img", cache="writeback"))))
    driver = root.find("devices/disk/driver")
    assert driver.get("cache") == "writeback"
    assert driver.get("io") is None


def test_disk_spec_rejects_bad_values():
    with pytest.raises(LabError, match="cache mode 'unsafe'"):
        domain.DiskSpec("/s/g.img", cache="unsafe")
    with pytest.raises(LabError, match="must be absolute"):
        domain.DiskSpec("g.img")


def test_domain_with_disk_defines_on_test_driver():
    conn = libvirt.open("test:///default")
    try:
        dom = conn.createXML(domain.domain_xml(make_spec(domain.DiskSpec("/tmp/g.img"))), 0)
        assert ET.fromstring(dom.XMLDesc(0)).find("devices/disk/source").get("file") == "/tmp/g.img"
        dom.destroy()
    finally:
        conn.close()


def test_kernel_cmdline_marks_disk():
    assert "mlab.disk=1" in kernel_cmdline(32, 4, "random", disk=True).split()
    assert "mlab.disk=1" not in kernel_cmdline(32, 4, "random").split()


# -- migration flags and statistics ---------------------------------------------------

def settings(**values) -> MigrationSettings:
    return MigrationSettings(strategy="precopy", migration_uri="tcp://10.77.0.12", **values)


def test_flags_without_disk_have_no_storage_flags():
    flags = settings().flags()
    assert not flags & libvirt.VIR_MIGRATE_NON_SHARED_DISK
    assert not flags & libvirt.VIR_MIGRATE_UNSAFE


def test_flags_copy_adds_non_shared_disk():
    flags = settings(disk_storage="copy").flags()
    assert flags & libvirt.VIR_MIGRATE_NON_SHARED_DISK
    assert flags & libvirt.VIR_MIGRATE_LIVE
    assert not flags & libvirt.VIR_MIGRATE_UNSAFE


def test_flags_local_is_a_plain_migration():
    assert settings(disk_storage="local").flags() == libvirt.VIR_MIGRATE_LIVE


def test_flags_shared_unsafe_adds_unsafe():
    flags = settings(disk_storage="shared", disk_unsafe=True).flags()
    assert flags & libvirt.VIR_MIGRATE_UNSAFE
    assert not flags & libvirt.VIR_MIGRATE_NON_SHARED_DISK


def test_settings_take_storage_from_scenario_values():
    values = {"strategy": "postcopy", "disk_storage": "copy", "disk_size_mib": 64, "max_time_s": 60}
    built = MigrationSettings.from_values(values, migration_uri="tcp://10.77.0.12")
    assert built.disk_storage == "copy"
    assert built.flags() & libvirt.VIR_MIGRATE_POSTCOPY
    assert built.flags() & libvirt.VIR_MIGRATE_NON_SHARED_DISK


def test_settings_reject_unknown_storage():
    with pytest.raises(MigrationError, match="unknown disk storage 'nfs'"):
        settings(disk_storage="nfs")


def test_stats_keep_disk_bytes():
    stats = MigrationStats.from_libvirt({"memory_processed": 100, "disk_total": 69206016,
                                         "disk_processed": 69206016, "disk_remaining": 0, "disk_bps": 33554432})
    assert stats.disk_total_bytes == 69206016
    assert stats.disk_processed_bytes == 69206016
    assert stats.disk_remaining_bytes == 0
    assert stats.disk_bps == 33554432
    assert stats.transferred_bytes == 100


# -- console, record and report -------------------------------------------------------

def test_console_counts_disk_writes_and_errors():
    text = ("mlab-disk: writing 1 MiB per second to /dev/vda of 64 MiB\n"
            "mlab-disk: wrote seq=0 offset_mib=0\n"
            "mlab-disk: wrote seq=1 offset_mib=1\n"
            "mlab-disk: error: write seq=2 at offset_mib=2 failed\n"
            "mlab-disk: wrote seq=3 offset_mib=3 trailing\n")
    summary = scan_console(text)
    assert summary.disk_writes == 2
    assert summary.disk_errors == ["write seq=2 at offset_mib=2 failed"]


def test_disk_record_columns():
    record = DiskRecord(storage="copy", size_mib=64, path="/var/lib/libvirt/images/g.img", cache="none",
                        unsafe_flag=False, destination_precreated=True, writes_source=9, writes_destination=3,
                        write_errors=["x"])
    assert record.columns() == {"disk_cache": "none", "disk_unsafe_flag": False, "disk_writes_source": 9,
                                "disk_writes_destination": 3, "disk_write_errors": 1}


def summary_runs(storages: list[str | None]) -> pd.DataFrame:
    rows = []
    for index, storage in enumerate(storages):
        rows.append({"scenario_id": f"s{index}", "strategy": "precopy", "outcome": "completed",
                     "transferred_bytes": 100 * 2**20, "disk_storage": storage,
                     "disk_processed_bytes": None if storage is None else 64 * 2**20})
    return pd.DataFrame(rows)


def test_summary_has_disk_copied_with_disks():
    summary = summarize(summary_runs(["copy", "shared"]), ["disk_storage"])
    assert summary.loc[0, "disk_copied_mib_mean"] == 64


def test_summary_without_disks_has_no_disk_columns():
    summary = summarize(summary_runs([None]), [])
    assert not [column for column in summary.columns if column.startswith("disk_copied")]


def test_lab_problems_reject_disks_without_local_lab():
    problems = disks.lab_problems([("a", None), ("b-disk-copy", 64)], local_lab=False)
    assert len(problems) == 1
    assert "need the local lab" in problems[0]
    assert "b-disk-copy" in problems[0]
    assert disks.lab_problems([("b", 64)], local_lab=True) == []
    assert disks.lab_problems([("a", None)], local_lab=False) == []


# -- disk files, with the machine's own qemu-img and qemu-io ---------------------------------

class LocalShell:
    """A host that is this machine, for disk files in a test folder."""

    def __init__(self, name: str):
        self.name = name

    def run(self, argv, *, timeout: float, check: bool = True) -> CommandResult:
        result = run_local(list(argv), timeout)
        assert not check or result.returncode == 0, result
        return result


@dataclass
class FakeHost:
    name: str
    shell: LocalShell


def make_disk(tmp_path: Path, storage: str, size_mib: int = 8) -> disks.GuestDisk:
    return disks.GuestDisk(storage, size_mib, "mlab-007-test", FakeHost("h1", LocalShell("h1")),
                           FakeHost("h2", LocalShell("h2")), shared_dir=tmp_path / "shared",
                           images_dir=str(tmp_path / "images"))


def test_shared_disk_created_filled_and_removed(tmp_path):
    disk = make_disk(tmp_path, "shared")
    spec = disk.create()
    path = Path(spec.path)
    assert path == tmp_path / "shared" / "disks" / "mlab-007-test.img"
    assert path.stat().st_size == 8 * 2**20
    data = path.read_bytes()
    assert data == bytes([disks.FILL_PATTERN]) * (8 * 2**20)
    # ext4 and xfs take O_DIRECT; tmpfs before Linux 6.6 did not.
    assert spec.cache in ("none", "writeback")
    assert disk.remove() == []
    assert not path.exists()
    assert not (tmp_path / "shared" / "disks").exists()
    assert os.listdir(tmp_path / "shared") == []


def test_undeclared_shared_folder_needs_unsafe_flag(tmp_path):
    disk = make_disk(tmp_path, "shared")
    assert disk.unsafe
    record = disk.record("", "", [])
    assert record.unsafe_flag
    assert "shared_filesystems" in record.unsafe_reason


def test_declared_shared_folder_passes_no_unsafe_flag(tmp_path):
    disk = disks.GuestDisk("shared", 8, "mlab-007-test", FakeHost("h1", LocalShell("h1")),
                           FakeHost("h2", LocalShell("h2")), shared_dir=tmp_path / "shared",
                           shared_dir_declared=True)
    assert not disk.unsafe
    record = disk.record("", "", [])
    assert not record.unsafe_flag
    assert record.unsafe_reason is None


def guest_disk_of_runner(tmp_path: Path, local_lab: LocalLab | None) -> disks.GuestDisk:
    """Return the disk that the runner plans for a shared-disk scenario on *local_lab*."""
    from lab.runner import ExperimentRunner

    scenario = load_playbook(write_playbook(tmp_path, "  disk: {size_mib: 8}")).scenarios()[0]
    runner = object.__new__(ExperimentRunner)
    runner.access = SimpleNamespace(local_lab=local_lab)
    runner.source_host = FakeHost("h1", LocalShell("h1"))
    runner.destination_host = FakeHost("h2", LocalShell("h2"))
    return runner._guest_disk(scenario, "mlab-007-test")


def test_local_lab_shared_disk_has_no_unsafe_flag(tmp_path):
    local_lab = LocalLab(tmp_path / "lab", prefix="migrlab-unused")
    disk = guest_disk_of_runner(tmp_path, local_lab)
    assert disk.shared_dir == local_lab.shared_dir
    assert disk.shared_dir_declared
    assert not disk.unsafe
    settings = MigrationSettings(strategy="precopy", migration_uri="tcp://10.77.0.12", disk_storage="shared",
                                 disk_unsafe=disk.unsafe)
    assert not settings.flags() & libvirt.VIR_MIGRATE_UNSAFE


def test_shared_disk_without_local_lab_rejected(tmp_path):
    with pytest.raises(LabError, match="only the local lab"):
        guest_disk_of_runner(tmp_path, None)


def test_flushing_disk_passes_no_unsafe_flag(tmp_path):
    disk = disks.GuestDisk("shared", 8, "mlab-007-test", FakeHost("h1", LocalShell("h1")),
                           FakeHost("h2", LocalShell("h2")), shared_dir=tmp_path, save_restore=True)
    assert not disk.unsafe
    record = disk.record("", "", [])
    assert not record.unsafe_flag
    assert record.unsafe_reason is None


def test_disk_not_created_over_existing_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    existing = images / "mlab-007-test.img"
    existing.write_bytes(b"someone else's")
    disk = make_disk(tmp_path, "local")
    with pytest.raises(LabError, match="already exists on host h1"):
        disk.create()
    assert disk.remove() == []
    assert existing.read_bytes() == b"someone else's"


def test_disk_rejects_size_beyond_free_space(tmp_path):
    free_mib = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // 2**20
    disk = make_disk(tmp_path, "shared", size_mib=free_mib + 1)
    with pytest.raises(LabError, match="lower guest.disk.size_mib"):
        disk.create()
    assert disk.remove() == []
    assert not list((tmp_path / "shared").rglob("*.img"))


def test_key_means_local_disk_runs():
    runs = pd.DataFrame([
        {"scenario_id": "precopy-disk-local", "outcome": "failed", "guest_alive": True, "transferred_bytes": None,
         "disk_processed_bytes": None},
        {"scenario_id": "precopy-disk-copy", "outcome": "completed", "guest_alive": True,
         "transferred_bytes": 100 * 2**20, "disk_processed_bytes": 130 * 2**20},
    ])
    means = scenario_means(runs, ["completed_pct", "guest_alive_pct", "disk_copied_mib"]).set_index("scenario_id")
    assert means.loc["precopy-disk-local", "completed_pct"] == 0
    assert means.loc["precopy-disk-local", "guest_alive_pct"] == 100
    assert math.isnan(means.loc["precopy-disk-local", "disk_copied_mib"])
    assert means.loc["precopy-disk-copy", "disk_copied_mib"] == 130
