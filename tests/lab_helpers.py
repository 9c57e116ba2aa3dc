"""Helpers of the lab tests: running a playbook on the session's lab, and finding its QEMU processes."""

from __future__ import annotations

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
