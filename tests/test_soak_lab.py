"""Fifty short migrations back and forth: nothing may leak.

One guest goes h1 -> h2 -> h1 ... with precopy; afterwards the test counts
QEMU processes, domains, the harness's file descriptors and threads, and the
daemons' file descriptors, against their values before the loop.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from lab import domain
from lab.events import open_connection
from lab.guest.console import scan_console
from lab.guest.image import kernel_cmdline
from lab.migrate import Migration, MigrationSettings

pytestmark = pytest.mark.lab

MIGRATIONS = 50
# Descriptors libvirtd may legitimately add over the loop (log files, a
# monitor socket being reopened); a leak of one per migration exceeds it.
DAEMON_FD_SLACK = 10
# Seconds until the workload prints its reports, on a loaded 2-core machine under TCG.
BOOT_TIMEOUT_S = 120


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_pids(shared_lab) -> dict[str, int]:
    return {host.name: int((Path(host.run_dir) / "libvirtd.pid").read_text().split()[0])
            for host in shared_lab.hosts() if host.is_libvirt_host}


def qemu_processes(shared_lab) -> list:
    return [process for process in shared_lab.status().processes if "qemu" in process.name]


def console_file(host, spec: domain.GuestSpec) -> Path:
    return Path(host.log_dir) / "qemu" / f"{spec.name}-console.log"


def wait_for_reports(console: Path, count: int, timeout_s: float):
    end = time.monotonic() + timeout_s
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        summary = scan_console(text)
        if len(summary.reports) >= count or time.monotonic() > end:
            return summary
        time.sleep(0.5)


def test_fifty_migrations_leak_nothing(shared_lab, guest_image):
    hosts = [host for host in shared_lab.hosts() if host.is_libvirt_host][:2]
    connections = [open_connection(host.libvirt_uri) for host in hosts]
    spec = domain.GuestSpec(
        name="mlab-soak", run_id="soak", memory_mib=96, vcpus=1, kernel=guest_image.kernel,
        initrd=guest_image.initrd, cmdline=kernel_cmdline(16, 2, "sequential"), accelerator="tcg",
        bridge=None)
    daemons = daemon_pids(shared_lab)
    daemon_fds_before = {name: fd_count(pid) for name, pid in daemons.items()}
    harness_fds_before = fd_count(os.getpid())
    threads_before = threading.active_count()

    dom = domain.boot(connections[0], spec)
    outcomes = []
    try:
        # As in a run, the workload reports before the first migration starts.
        booted = wait_for_reports(console_file(hosts[0], spec), count=2, timeout_s=BOOT_TIMEOUT_S)
        assert len(booted.reports) >= 2, "the guest's workload did not start"
        for index in range(MIGRATIONS):
            source, destination = index % 2, (index + 1) % 2
            settings = MigrationSettings("precopy", hosts[destination].migration_uri, max_time_s=60)
            result = Migration(dom, connections[source], connections[destination], settings,
                               source_name=hosts[source].name,
                               destination_name=hosts[destination].name).run()
            outcomes.append(result.outcome)
            if result.destination_domain is None:
                break
            dom = result.destination_domain
        assert outcomes == ["completed"] * MIGRATIONS
        assert len(qemu_processes(shared_lab)) == 1
        assert dom.isActive()
        console = console_file(hosts[MIGRATIONS % 2], spec)
        summary = wait_for_reports(console, count=2, timeout_s=BOOT_TIMEOUT_S)
        assert len(summary.reports) >= 2, console.read_text(errors="replace")[-2000:]
        assert summary.last_report.bad == 0
        assert summary.kernel_trouble == []
    finally:
        for conn in connections:
            for leftover in domain.owned_domains(conn):
                domain.destroy(leftover)

    assert qemu_processes(shared_lab) == []
    assert all(not names for names in shared_lab.status().domains.values())
    for conn in connections:
        conn.close()
    assert fd_count(os.getpid()) <= harness_fds_before + 2
    assert threading.active_count() <= threads_before + 1  # libvirt's event thread may start here
    for name, pid in daemons.items():
        assert fd_count(pid) <= daemon_fds_before[name] + DAEMON_FD_SLACK, name
