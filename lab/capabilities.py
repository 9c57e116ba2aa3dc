"""What the hosts' QEMU and libvirt can do, and which strategies that allows.

QEMU lists its migration capabilities with ``query-migrate-capabilities``;
the harness asks a running guest of its own, so the answer is the one of the
QEMU binary that will run the experiments.
"""

from __future__ import annotations

import json
import logging
import os
import ctypes
from dataclasses import dataclass

import libvirt
import libvirt_qemu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requirement:
    """What one strategy or option needs from QEMU and libvirt."""

    qemu_capabilities: tuple[str, ...] = ()
    min_qemu: tuple[int, int] | None = None
    min_libvirt: tuple[int, int] | None = None
    needs_userfaultfd: bool = False


STRATEGY_REQUIREMENTS: dict[str, Requirement] = {
    "stop-and-copy": Requirement(),
    "precopy": Requirement(),
    "postcopy": Requirement(qemu_capabilities=("postcopy-ram",), min_libvirt=(1, 3), needs_userfaultfd=True),
    "hybrid": Requirement(qemu_capabilities=("postcopy-ram",), min_libvirt=(1, 3), needs_userfaultfd=True),
}


def query_migrate_capabilities(dom: libvirt.virDomain) -> dict[str, bool]:
    """Return QEMU's migration capabilities from a running guest's monitor."""
    reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "query-migrate-capabilities"}), 0)
    return {item["capability"]: bool(item["state"]) for item in json.loads(reply)["return"]}


def userfaultfd_usable() -> tuple[bool, str]:
    """Try the userfaultfd system call, which postcopy needs on the destination."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall_number = 323  # userfaultfd on x86_64
    fd = libc.syscall(syscall_number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        return True, "userfaultfd works for this user"
    errno = ctypes.get_errno()
    return False, f"userfaultfd failed: {os.strerror(errno)} (vm.unprivileged_userfaultfd=0 needs root)"


def unmet(requirement: Requirement, *, qemu: tuple[int, int], libvirt_version: tuple[int, int],
          capabilities: dict[str, bool], userfaultfd: bool) -> list[str]:
    """List in words what *requirement* needs and this stack lacks; empty when it is met."""
    missing = []
    if requirement.min_qemu and qemu < requirement.min_qemu:
        missing.append("QEMU %d.%d or newer" % requirement.min_qemu)
    if requirement.min_libvirt and libvirt_version < requirement.min_libvirt:
        missing.append("libvirt %d.%d or newer" % requirement.min_libvirt)
    for capability in requirement.qemu_capabilities:
        if capability not in capabilities:
            missing.append(f"QEMU migration capability {capability!r}")
    if requirement.needs_userfaultfd and not userfaultfd:
        missing.append("a usable userfaultfd")
    return missing
