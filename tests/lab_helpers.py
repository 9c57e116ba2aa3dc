"""Helpers of the lab tests: running a playbook or the migrlab command on the session's lab, and finding
its QEMU processes and guest console logs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.hosts.netns import netns_path
from lab.playbook import load_playbook
from lab.runner import ExperimentRunner


def lab_qemu_pids(lab, hosts: tuple[str, ...] = ("h1", "h2")) -> list[int]:
    """Return the pids of QEMU processes in the network namespaces of the lab's *hosts*."""
    namespaces = {netns_path(lab.netns_name(host)).stat().st_ino for host in hosts}
    found = []
    for path in Path("/proc").iterdir():
        if not path.name.isdigit():
            continue
        try:
            program = (path / "cmdline").read_bytes().split(b"\0", 1)[0]
            inode = (path / "ns" / "net").stat().st_ino
        except OSError:
            continue
        if b"qemu-system" in program and inode in namespaces:
            found.append(int(path.name))
    return found


def run_playbook_text(text: str, lab, folder: Path, label: str):
    """Write *text* as a playbook in *folder*, run it on *lab* and return the ExperimentSummary."""
    path = folder / "playbook.yaml"
    path.write_text(text)
    runner = ExperimentRunner(load_playbook(path), results_root=folder / "results", lab=lab, show_progress=False)
    started = time.monotonic()
    summary = runner.run()
    print(f"\n{label} experiment: {len(summary.outcomes)} runs in {time.monotonic() - started:.0f} s")
    return summary


def migrlab(lab, *args: str, **kwargs) -> subprocess.Popen:
    """Start the migrlab command of this environment on *lab*, with text pipes for its output."""
    env = dict(os.environ, MIGRLAB_LAB_DIR=str(lab.root), MIGRLAB_LAB_PREFIX=lab.prefix)
    command = [str(Path(sys.executable).parent / "migrlab"), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def wait_until(predicate, timeout_s: float, description: str) -> None:
    """Poll *predicate* until it is true, or fail the test after *timeout_s* seconds."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {description}")


def console_dir(lab, host: str) -> Path:
    return Path(lab.host(host).log_dir) / "qemu"


def new_consoles(lab, host: str, since: float) -> set[str]:
    """Return the names of the guest console logs on *host* written after *since* (a time.time() value).

    libvirt creates a guest's console log when it starts the guest's QEMU, so
    a new log on the destination means a migration is under way. Older logs
    belong to someone else and do not count.
    """
    found = set()
    for path in console_dir(lab, host).glob("mlab-*-console.log"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime >= since:
                found.add(path.name)
    return found
