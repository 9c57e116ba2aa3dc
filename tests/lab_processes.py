"""Processes of a test session's local lab, for checks that a run left nothing behind."""

from __future__ import annotations

from pathlib import Path

from lab.hosts.netns import netns_path


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
