"""Parsing of guest console text, on hand-written console logs."""

from __future__ import annotations

import pytest

from lab.guest.console import (
    BadPageLine,
    ReadyLine,
    WorkloadReport,
    is_kernel_trouble,
    parse_line,
    scan_console,
)

READY = "mlab-workload: ready wss_mib=64 rate_mib_s=8 pattern=sequential pages=16384 page_size=4096"
PROGRESS = ("mlab-workload: t_ms=3785 seq=1 dirtied=2048 rate_pps=2047 checked=18435 "
            "bad=0 sweeps=1")
BAD = "mlab-workload: BAD page=17 expected_gen=3 found_gen=0 magic_ok=0"


def test_parse_progress_line():
    record = parse_line(PROGRESS)

    assert record == WorkloadReport(t_ms=3785, seq=1, dirtied=2048, rate_pps=2047,
                                    checked=18435, bad=0, sweeps=1)


def test_parse_ready_line():
    record = parse_line(READY)

    assert record == ReadyLine(wss_mib=64, rate_mib_s=8.0, pattern="sequential", pages=16384,
                               page_size=4096)


@pytest.mark.parametrize("rate_text, rate", [("0", 0.0), ("0.5", 0.5), ("1e+06", 1e6),
                                             ("12.25", 12.25)])
def test_parse_ready_rate_forms(rate_text, rate):
    line = (f"mlab-workload: ready wss_mib=1 rate_mib_s={rate_text} pattern=random "
            "pages=256 page_size=4096")

    record = parse_line(line)

    assert isinstance(record, ReadyLine)
    assert record.rate_mib_s == rate
    assert record.pattern == "random"


def test_parse_bad_lines():
    lost = parse_line(BAD)
    stale = parse_line("mlab-workload: BAD page=4 expected_gen=9 found_gen=8 magic_ok=1")

    assert lost == BadPageLine(page=17, expected_gen=3, found_gen=0, magic_ok=False)
    assert stale == BadPageLine(page=4, expected_gen=9, found_gen=8, magic_ok=True)


def test_parse_tolerates_carriage_return_and_prefix():
    assert parse_line(PROGRESS + "\r") == parse_line(PROGRESS)
    assert parse_line("\x1b[0m" + PROGRESS) == parse_line(PROGRESS)
    assert parse_line("[    5.123456] random: crng init done" + READY) == parse_line(READY)


@pytest.mark.parametrize("line", [
    "",
    "mlab-workload:",
    "mlab-workload: start wss_mib=64 rate_mib_s=8 pattern=sequential",
    "mlab-init: up kernel=6.1.0-50-amd64",
    # A line cut by the end of the log.
    "mlab-workload: t_ms=3785 seq=1 dirtied=2048 rate_pps=20",
    # A kernel message printed in the middle of a progress line.
    "mlab-workload: t_ms=3785 seq=1 dirtied=2048 [    7.1] e1000: eth0 NIC Link is Up",
    PROGRESS + " [    7.1] tail from the kernel",
    "mlab-workload: t_ms=-5 seq=1 dirtied=2048 rate_pps=2047 checked=1 bad=0 sweeps=1",
    "mlab-workload: t_ms=x seq=1 dirtied=2048 rate_pps=2047 checked=1 bad=0 sweeps=1",
    "mlab-workload: ready wss_mib=64 rate_mib_s=8 pattern=zigzag pages=16384 page_size=4096",
    "mlab-workload: BAD page=17 expected_gen=3 found_gen=0 magic_ok=2",
    "mlab-workload: BAD page=17 expected_gen=3 found_gen=0",
    "\x00\xff garbage \x07 mlab-workload t_ms=1",
    "[    3.026498] mlab-workload: page allocation failure: order:0, mode:0x140dca",
])
def test_parse_rejects_other_lines(line):
    assert parse_line(line) is None


def test_scan_console_full_log():
    text = "\n".join([
        "\x1bc\x1b[?7l\x1b[2JSeaBIOS (version 1.16.3-debian-1.16.3-2~bpo12+1)",
        "Booting from ROM...",
        "[    1.008560] acpi PNP0A03:00: fail to add MMCONFIG information",
        "mlab-init: up kernel=6.1.0-50-amd64",
        "mlab-init: module e1000 loaded",
        "mlab-init: module virtio_net failed to load (insmod status 1)",
        "mlab-workload: start wss_mib=64 rate_mib_s=8 pattern=sequential",
        READY + "\r",
        PROGRESS + "\r",
        BAD + "\r",
        "mlab-workload: BAD page=18 expected_gen=3 found_gen=2 magic_ok=1\r",
        "mlab-workload: t_ms=4785 seq=2 dirtied=4096 rate_pps=2048 checked=36869 bad=2 sweeps=2\r",
        "mlab-workload: t_ms=5785 seq=3 dirtied=61",
        "mlab-workload: t_ms=6785 seq=4 dirtied=8192 rate_pps=2048 checked=73000 bad=2 sweeps=4",
    ])

    summary = scan_console(text)

    assert summary.ready == parse_line(READY)
    assert [report.seq for report in summary.reports] == [1, 2, 4]
    assert summary.last_report is not None
    assert summary.last_report.bad == 2
    assert summary.bad_lines == 2
    assert summary.bad_pages[1] == BadPageLine(page=18, expected_gen=3, found_gen=2, magic_ok=True)
    assert summary.kernel_trouble == []
    assert summary.modules_loaded == ["e1000"]
    assert summary.init_errors == ["module virtio_net failed to load (insmod status 1)"]
    assert summary.workload_exit_status is None


def test_scan_console_kernel_panic():
    text = """\
[    1.911202] List of all partitions:
[    1.912000] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)
[    1.916819] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-50-amd64 #1  Debian 6.1.176-1
[    1.917479] Call Trace:
[    1.918112]  <TASK>
[    1.918477]  dump_stack_lvl+0x44/0x5c
[    1.920515] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs ]---
"""
    summary = scan_console(text)

    assert len(summary.kernel_trouble) == 3
    assert summary.kernel_trouble[0].startswith("[    1.912000] Kernel panic")
    assert "end Kernel panic" in summary.kernel_trouble[2]
    assert summary.ready is None
    assert summary.reports == []


def test_scan_console_oops_interleaved_with_workload():
    text = "\n".join([
        READY,
        "[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "[   12.000002] #PF: supervisor read access in kernel mode",
        "mlab-workload: t_ms=9000 seq=5 dirtied=10240 [   12.000003] Oops: 0000 [#1] PREEMPT SMP NOPTI",
        "[   12.000004] general protection fault, probably for non-canonical address",
        "[   12.000005] WARNING: CPU: 0 PID: 94 at mm/page_alloc.c:5526 __alloc_pages+0x2d0/0x300",
        "[   12.000006] rcu: INFO: rcu_preempt self-detected stall on CPU",
        "[   12.000007] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [mlab-workload:94]",
        "[   12.000008] Out of memory: Killed process 94 (mlab-workload) total-vm:206236kB",
        "[   12.000009] " + PROGRESS,
    ])

    summary = scan_console(text)

    assert len(summary.kernel_trouble) == 7
    assert any("Oops:" in line for line in summary.kernel_trouble)
    assert [report.seq for report in summary.reports] == [1]
    assert summary.ready is not None


def test_scan_console_workload_exit_and_error():
    text = "\n".join([
        "mlab-init: up kernel=6.1.0-50-amd64",
        "mlab-workload: error invalid mlab.wss value 'abc': expected a whole number of MiB "
        "from 1 to 1048576",
        "mlab-init: workload exited with status 2",
        "mlab-init: error: configuring eth0 with mlab.ip=10.0.0.1/24 failed",
    ])

    summary = scan_console(text)

    assert summary.workload_errors == [
        "invalid mlab.wss value 'abc': expected a whole number of MiB from 1 to 1048576"]
    assert summary.workload_exit_status == 2
    assert summary.init_errors == ["error: configuring eth0 with mlab.ip=10.0.0.1/24 failed"]
    assert summary.kernel_trouble == []


def test_scan_console_empty_and_garbage():
    assert scan_console("") == scan_console("\n\n")
    summary = scan_console("\x00\x00\xff\xfe\r\n\x1b[2J\n" + "A" * 10000 + "\n")

    assert summary.ready is None
    assert summary.reports == []
    assert summary.bad_lines == 0
    assert summary.kernel_trouble == []


def test_scan_console_keeps_last_ready_after_reboot():
    second = READY.replace("wss_mib=64", "wss_mib=32").replace("pages=16384", "pages=8192")

    summary = scan_console("\n".join([READY, PROGRESS, "SeaBIOS (version 1.16.3)", second]))

    assert summary.ready is not None
    assert summary.ready.wss_mib == 32


@pytest.mark.parametrize("line, expected", [
    ("[    1.0] Kernel panic - not syncing: Attempted to kill init!", True),
    ("[    1.0] ------------[ cut here ]------------", False),
    ("[    1.0] Spectre V2 : WARNING: Unprivileged eBPF is enabled", False),
    (PROGRESS, False),
    ("[    1.0] kernel BUG at mm/slub.c:1234!", True),
    ("[    1.0] BUG: unable to handle page fault for address: ffff", True),
    ("[    1.0] watchdog: BUG: soft lockup - CPU#0 stuck for 23s!", True),
    ("[    1.0] NMI watchdog: Watchdog detected hard LOCKUP on cpu 0", True),
])
def test_kernel_trouble_markers(line, expected):
    assert is_kernel_trouble(line) is expected
