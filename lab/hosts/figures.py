"""Host-side figures of a migration: CPU time of the guest's QEMU and bytes on the migration interface.

During the migration, a small sh loop on each libvirt host prints one
sample per interval: the host's uptime, the receive and transmit byte
counters of the migration interface, and /proc/<pid>/stat of the guest's
QEMU process, found through libvirt's pid file. The loop reads with the
shell's ``read`` builtin, so a sample costs one ``sleep`` process. The
harness reads the lines over SSH (or nsenter on the local fast path) and
keeps the first and the last sample of each host.

The source QEMU exits when the migration completes, so its CPU time is the
one of its last sample, at most one interval before it exited. The
destination QEMU starts during the migration, so all of its CPU time counts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from lab.errors import HostError
from lab.hosts.shell import LineStream, Shell

log = logging.getLogger(__name__)

# libvirt's QEMU driver writes the pid of each running guest's QEMU here (system instance).
QEMU_PID_DIR = "/run/libvirt/qemu"
INTERVAL_S = 0.1
# Time allowed for the first sample of a host before the migration starts.
FIRST_SAMPLE_TIMEOUT_S = 10.0

# Positional parameters: pid file, interface, interval in seconds, number of samples.
SAMPLER_SCRIPT = r"""
pidfile=$1 iface=$2 interval=$3 count=$4
stats=/sys/class/net/$iface/statistics
echo "hz $(getconf CLK_TCK)"
i=0
while [ "$i" -lt "$count" ]; do
    read -r uptime idle < /proc/uptime
    rx=- tx=- line=- pid=
    [ -r "$stats/rx_bytes" ] && read -r rx < "$stats/rx_bytes"
    [ -r "$stats/tx_bytes" ] && read -r tx < "$stats/tx_bytes"
    [ -r "$pidfile" ] && read -r pid < "$pidfile"
    case $pid in
        ''|*[!0-9]*) ;;
        *) [ -r "/proc/$pid/stat" ] && read -r line < "/proc/$pid/stat" ;;
    esac
    echo "s $uptime $rx $tx $line"
    i=$((i + 1))
    sleep "$interval"
done
"""


@dataclass(frozen=True)
class Sample:
    """One reading of a host; None where the value could not be read."""

    uptime_s: float
    rx_bytes: int | None
    tx_bytes: int | None
    qemu_pid: int | None
    # utime + stime of the QEMU process, in clock ticks.
    qemu_cpu_ticks: int | None


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def parse_sample(line: str) -> Sample | None:
    """Parse one ``s`` line of the sampler; return None for any other line."""
    parts = line.split(" ", 4)
    if len(parts) < 4 or parts[0] != "s":
        return None
    try:
        uptime = float(parts[1])
    except ValueError:
        return None
    pid = cpu = None
    stat = parts[4] if len(parts) == 5 else "-"
    if stat != "-" and ")" in stat:
        # The command name in parentheses may contain spaces; the fields after it do not.
        fields = stat[stat.rfind(")") + 2:].split()
        head = stat[:stat.find("(")].strip()
        if len(fields) > 12 and head.isdigit() and fields[11].isdigit() and fields[12].isdigit():
            pid = int(head)
            cpu = int(fields[11]) + int(fields[12])
    return Sample(uptime, _int_or_none(parts[2]), _int_or_none(parts[3]), pid, cpu)


def parse_ticks(lines: list[str]) -> int | None:
    for line in lines:
        if line.startswith("hz "):
            value = line[3:].strip()
            return int(value) if value.isdigit() else None
    return None


@dataclass(frozen=True)
class HostWindow:
    """The samples of one host during one migration."""

    host: str
    role: str
    interface: str
    ticks_per_s: int | None
    samples: list[Sample]

    def figures(self) -> dict[str, object]:
        """Return the fields of lab.records.HostFigures for this host."""
        first = self.samples[0] if self.samples else None
        last = self.samples[-1] if self.samples else None
        values: dict[str, object] = {"host": self.host, "role": self.role, "interface": self.interface,
                                     "samples": len(self.samples), "window_ms": None, "qemu_cpu_ms": None,
                                     "rx_bytes": None, "tx_bytes": None}
        if first is None or last is None:
            return values
        values["window_ms"] = round((last.uptime_s - first.uptime_s) * 1000, 1)
        for name in ("rx_bytes", "tx_bytes"):
            start, end = getattr(first, name), getattr(last, name)
            if start is not None and end is not None and end >= start:
                values[name] = end - start
        values["qemu_cpu_ms"] = self._qemu_cpu_ms()
        return values

    def _qemu_cpu_ms(self) -> float | None:
        readings = [sample for sample in self.samples if sample.qemu_cpu_ticks is not None]
        if not readings or not self.ticks_per_s:
            return None
        pids = {sample.qemu_pid for sample in readings}
        if len(pids) > 1:
            log.warning("QEMU of the guest on %s changed pid during the migration (%s); no CPU time recorded",
                        self.host, sorted(pids))
            return None
        # A process that was already running at the first sample counts from
        # there; one that started later (the destination) counts from its start.
        start = readings[0].qemu_cpu_ticks if self.samples[0].qemu_cpu_ticks is not None else 0
        return round((readings[-1].qemu_cpu_ticks - start) * 1000 / self.ticks_per_s, 1)

    def rows(self) -> list[dict[str, object]]:
        """Return the samples as table rows, with t_s counted from the host's first sample."""
        if not self.samples:
            return []
        origin = self.samples[0].uptime_s
        rows = []
        for sample in self.samples:
            cpu_ms = None
            if sample.qemu_cpu_ticks is not None and self.ticks_per_s:
                cpu_ms = sample.qemu_cpu_ticks * 1000 / self.ticks_per_s
            rows.append({"t_s": round(sample.uptime_s - origin, 2), "host": self.host, "role": self.role,
                         "rx_bytes": sample.rx_bytes, "tx_bytes": sample.tx_bytes, "qemu_cpu_ms": cpu_ms})
        return rows


@dataclass
class _Target:
    shell: Shell
    role: str
    interface: str
    stream: LineStream | None = None


class HostSampler:
    """Sample each host during a migration; a context manager that stops the samplers on exit.

    ``start`` returns once every host has printed its first sample, so the
    counters cover the whole migration. ``stop`` takes one more sample of
    each host, ends the loops and returns a HostWindow per host.
    """

    def __init__(self, targets: list[tuple[Shell, str, str]], guest_name: str, max_duration_s: float,
                 interval_s: float = INTERVAL_S):
        self.targets = [_Target(shell, role, interface) for shell, role, interface in targets]
        self.pid_file = f"{QEMU_PID_DIR}/{guest_name}.pid"
        self.interval_s = interval_s
        self.count = int(max_duration_s / interval_s) + 1

    def __enter__(self) -> HostSampler:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def start(self) -> None:
        for target in self.targets:
            argv = ["sh", "-c", SAMPLER_SCRIPT, "sampler", self.pid_file, target.interface,
                    f"{self.interval_s:g}", str(self.count)]
            target.stream = target.shell.stream(argv)
        deadline = time.monotonic() + FIRST_SAMPLE_TIMEOUT_S
        while not all(self._samples(target) for target in self.targets):
            if time.monotonic() >= deadline:
                missing = [target.shell.name for target in self.targets if not self._samples(target)]
                self.close()
                raise HostError(f"host-side sampler printed nothing within {FIRST_SAMPLE_TIMEOUT_S:g} s on "
                                f"{', '.join(missing)}")
            time.sleep(0.02)

    def stop(self) -> list[HostWindow]:
        counts = {id(target): len(self._samples(target)) for target in self.targets}
        deadline = time.monotonic() + max(1.0, 5 * self.interval_s)
        while time.monotonic() < deadline:
            if all(len(self._samples(target)) > counts[id(target)] for target in self.targets):
                break
            time.sleep(self.interval_s / 2)
        windows = []
        for target in self.targets:
            lines = target.stream.lines() if target.stream else []
            windows.append(HostWindow(target.shell.name, target.role, target.interface, parse_ticks(lines),
                                      self._samples(target)))
        self.close()
        return windows

    def close(self) -> None:
        """Stop every sampler loop; closing twice does nothing."""
        for target in self.targets:
            if target.stream is not None:
                try:
                    target.stream.close()
                except (OSError, HostError) as error:
                    log.warning("stopping the sampler on %s failed: %s", target.shell.name, error)
                target.stream = None

    @staticmethod
    def _samples(target: _Target) -> list[Sample]:
        if target.stream is None:
            return []
        return [sample for sample in map(parse_sample, target.stream.lines()) if sample is not None]
