"""Parsing of the guest's serial console: workload lines and signs of kernel trouble.

The console mixes the workload's lines with kernel messages, and a kernel
message can be printed in the middle of a workload line. A workload line is
recognized anywhere in a console line, but it must be complete: a line that
was cut or has text after its last field is ignored rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

WORKLOAD_PREFIX = "mlab-workload: "

_PROGRESS = re.compile(
    r"mlab-workload: t_ms=(\d+) seq=(\d+) dirtied=(\d+) rate_pps=(\d+) checked=(\d+) "
    r"bad=(\d+) sweeps=(\d+)\s*$")
_READY = re.compile(
    r"mlab-workload: ready wss_mib=(\d+) rate_mib_s=([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?) "
    r"pattern=(sequential|random) pages=(\d+) page_size=(\d+)\s*$")
_BAD_PAGE = re.compile(
    r"mlab-workload: BAD page=(\d+) expected_gen=(\d+) found_gen=(\d+) magic_ok=([01])\s*$")
_WORKLOAD_ERROR = re.compile(r"mlab-workload: error (.*\S)")
_MODULE_LOADED = re.compile(r"mlab-init: module (\S+) loaded\s*$")
_INIT_ERROR = re.compile(r"mlab-init: (module \S+ failed to load.*\S|error: .*\S)")
_WORKLOAD_EXIT = re.compile(r"mlab-init: workload exited with status (\d+)\s*$")
_DISK_WRITE = re.compile(r"mlab-disk: wrote seq=(\d+) offset_mib=(\d+)\s*$")
_DISK_ERROR = re.compile(r"mlab-disk: error: (.*\S)")

# Fixed substrings of Linux kernel messages that report a crash, an oops, a
# warning with a stack trace, a lockup or stall, or the OOM killer.
KERNEL_TROUBLE_MARKERS = (
    "Kernel panic",
    "end Kernel panic",
    "Oops:",
    "BUG:",
    "kernel BUG at",
    "general protection fault",
    "Unable to handle kernel",
    "Call Trace:",
    "WARNING: CPU:",
    "detected stall",
    "soft lockup",
    "hard LOCKUP",
    "Out of memory:",
)


@dataclass(frozen=True)
class ReadyLine:
    """The workload's settings, printed once its working set is written."""

    wss_mib: int
    rate_mib_s: float
    pattern: str
    pages: int
    page_size: int


@dataclass(frozen=True)
class WorkloadReport:
    """One progress line: counters since the ready line, at guest CLOCK_MONOTONIC ``t_ms``."""

    t_ms: int
    seq: int
    dirtied: int
    rate_pps: int
    checked: int
    bad: int
    sweeps: int


@dataclass(frozen=True)
class BadPageLine:
    """A page whose content did not match its expected generation."""

    page: int
    expected_gen: int
    found_gen: int
    magic_ok: bool


@dataclass
class ConsoleSummary:
    """Summary of one console log: guest init results, workload records and kernel trouble."""

    reports: list[WorkloadReport] = field(default_factory=list)
    ready: ReadyLine | None = None
    bad_pages: list[BadPageLine] = field(default_factory=list)
    kernel_trouble: list[str] = field(default_factory=list)
    workload_errors: list[str] = field(default_factory=list)
    modules_loaded: list[str] = field(default_factory=list)
    init_errors: list[str] = field(default_factory=list)
    workload_exit_status: int | None = None
    # The disk writer's lines (init.sh): completed 1 MiB writes and failures.
    disk_writes: int = 0
    disk_errors: list[str] = field(default_factory=list)

    @property
    def bad_lines(self) -> int:
        """Number of complete BAD lines; the workload prints at most 10 per second."""
        return len(self.bad_pages)

    @property
    def last_report(self) -> WorkloadReport | None:
        return self.reports[-1] if self.reports else None


def parse_line(line: str) -> WorkloadReport | ReadyLine | BadPageLine | None:
    """Parse one console line into a workload record, or return None for any other line."""
    start = line.find(WORKLOAD_PREFIX)
    if start < 0:
        return None
    text = line[start:]

    match = _PROGRESS.match(text)
    if match:
        return WorkloadReport(*(int(value) for value in match.groups()))
    match = _READY.match(text)
    if match:
        wss, rate, pattern, pages, page_size = match.groups()
        return ReadyLine(int(wss), float(rate), pattern, int(pages), int(page_size))
    match = _BAD_PAGE.match(text)
    if match:
        page, expected, found, magic_ok = match.groups()
        return BadPageLine(int(page), int(expected), int(found), magic_ok == "1")
    return None


def is_kernel_trouble(line: str) -> bool:
    """Return True if the line contains a marker of a kernel crash, oops, warning or stall.

    In a line that ends with a complete workload record, only the text before
    the record is searched, because kernel text can precede a record but not
    follow it.
    """
    if parse_line(line) is not None:
        line = line[:line.find(WORKLOAD_PREFIX)]
    return any(marker in line for marker in KERNEL_TROUBLE_MARKERS)


def scan_console(text: str) -> ConsoleSummary:
    """Summarize a console log: workload records in order, init results and kernel trouble.

    ``ready`` is the last ready line, because a guest that booted again
    starts a new workload. Kernel trouble lines are returned stripped, in
    console order.
    """
    summary = ConsoleSummary()
    for raw_line in text.splitlines():
        line = raw_line.replace("\r", "").replace("\0", "")
        record = parse_line(line)
        if isinstance(record, WorkloadReport):
            summary.reports.append(record)
        elif isinstance(record, ReadyLine):
            summary.ready = record
        elif isinstance(record, BadPageLine):
            summary.bad_pages.append(record)
        if is_kernel_trouble(line):
            summary.kernel_trouble.append(line.strip())
        _scan_status_line(line, summary)
    return summary


def _scan_status_line(line: str, summary: ConsoleSummary) -> None:
    """Record workload errors and the init's module and exit reports found in ``line``."""
    if match := _WORKLOAD_ERROR.search(line):
        summary.workload_errors.append(match.group(1))
    elif match := _MODULE_LOADED.search(line):
        summary.modules_loaded.append(match.group(1))
    elif match := _INIT_ERROR.search(line):
        summary.init_errors.append(match.group(1))
    elif match := _WORKLOAD_EXIT.search(line):
        summary.workload_exit_status = int(match.group(1))
    elif _DISK_WRITE.search(line):
        summary.disk_writes += 1
    elif match := _DISK_ERROR.search(line):
        summary.disk_errors.append(match.group(1))
