"""Checks made before an experiment starts, so that it fails before any guest boots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lab.errors import ConfigError
from lab.playbook import Playbook

# QEMU's own memory beside the guest RAM under TCG, for the translation cache
# and device state. It is an estimate, not a measured bound.
QEMU_OVERHEAD_MIB = 160


def available_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Return MemAvailable from /proc/meminfo in MiB."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise OSError(f"MemAvailable missing from {meminfo}")


def check_guest_memory(playbook: Playbook, available_mib: int) -> None:
    """Reject a playbook whose largest guest does not fit twice (source and destination) in memory.

    On the local lab both hosts share this machine's memory, and during a
    migration the guest exists on both.
    """
    largest = max(scenario.memory_mib for scenario in playbook.scenarios())
    needed = 2 * (largest + QEMU_OVERHEAD_MIB)
    if needed > available_mib:
        fitting = max(0, available_mib // 2 - QEMU_OVERHEAD_MIB)
        raise ConfigError(
            f"a {largest} MiB guest needs about {needed} MiB during migration (on source and destination, "
            f"with {QEMU_OVERHEAD_MIB} MiB for each QEMU), but only {available_mib} MiB are available",
            path=str(playbook.path) if playbook.path else None, field="guest.memory_mib", value=largest,
            fix=f"Use at most {fitting} MiB, or free memory on this machine")


def check_results_writable(results_root: Path) -> None:
    """Reject a results folder that cannot be created or written."""
    try:
        results_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_root, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"results folder is not writable: {exc.strerror}", field="--results",
                          value=str(results_root),
                          fix="Choose a folder you can write with --results, or fix its permissions") from exc
    if not os.access(results_root, os.W_OK | os.X_OK):
        raise ConfigError("results folder is not writable", field="--results", value=str(results_root),
                          fix="Choose a folder you can write with --results, or fix its permissions")
