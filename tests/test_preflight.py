"""Checks made before an experiment starts."""

from __future__ import annotations

import os
import subprocess

import pytest

from lab.errors import ConfigError
from lab.playbook import load_playbook
from lab.preflight import QEMU_OVERHEAD_MIB, available_memory_mib, check_guest_memory, check_results_writable

PLAYBOOK = """experiment: preflight
guest: {memory_mib: 256, vcpus: 1}
workload: {working_set_mib: 64, dirty_rate_mib_s: 4}
migration: {strategy: precopy}
matrix:
  memory_mib: [256, 1024]
"""


@pytest.fixture
def playbook(tmp_path):
    path = tmp_path / "book.yaml"
    path.write_text(PLAYBOOK)
    return load_playbook(path)


def test_memory_fits(playbook):
    check_guest_memory(playbook, 2 * (1024 + QEMU_OVERHEAD_MIB))


def test_memory_too_small_names_field_and_fix(playbook):
    with pytest.raises(ConfigError) as caught:
        check_guest_memory(playbook, 2000)
    error = caught.value
    assert error.field == "guest.memory_mib"
    assert error.value == 1024
    assert error.path == str(playbook.path)
    assert "at most 840 MiB" in str(error)


def test_available_memory_parses_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2097152 kB\n")
    assert available_memory_mib(meminfo) == 2048


def test_available_memory_missing_line(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\n")
    with pytest.raises(OSError, match="MemAvailable"):
        available_memory_mib(meminfo)


def test_results_folder_created(tmp_path):
    check_results_writable(tmp_path / "new" / "results")
    assert (tmp_path / "new" / "results").is_dir()
    assert list((tmp_path / "new" / "results").iterdir()) == []


def test_results_folder_not_writable(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ConfigError) as caught:
        check_results_writable(blocked / "results")
    assert caught.value.field == "--results"
    assert str(blocked / "results") in str(caught.value)


def test_results_folder_read_only(tmp_path):
    """A read-only file system stops even root, so the check holds for every user."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=True,
                       timeout=10)
    else:
        read_only.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_results_writable(read_only / "results")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)], check=True, timeout=10)
        read_only.chmod(0o700)
