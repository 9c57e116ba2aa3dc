"""The software and hardware a run was measured on."""

from __future__ import annotations

import platform
import socket
from pathlib import Path

import libvirt

import lab


def version_string(number: int) -> str:
    """Turn libvirt's packed version (major * 1,000,000 + minor * 1,000 + micro) into text."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def host_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(conn: libvirt.virConnect, *, accelerator: str, guest_image_digest: str,
             guest_kernel_version: str, playbook_sha256: str) -> dict[str, str]:
    """Collect the environment fields of a run record from a source host connection."""
    return {
        "qemu_version": version_string(conn.getVersion()),
        "libvirt_version": version_string(conn.getLibVersion()),
        "libvirt_python_version": version_string(libvirt.getVersion()),
        "host_kernel": platform.release(),
        "accelerator": accelerator,
        "cpu_model": host_cpu_model(),
        "guest_image_digest": guest_image_digest,
        "guest_kernel_version": guest_kernel_version,
        "playbook_sha256": playbook_sha256,
        "harness_version": lab.__version__,
        "machine": socket.gethostname(),
        "python_version": platform.python_version(),
    }
