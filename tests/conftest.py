"""Fixtures shared by the integration tests that need the real local lab.

One lab (two libvirt hosts and a client host, in namespaces) and one guest
image serve every test of a session. The lab gets its own namespace prefix
and state directory, so it never meets a lab that a user has up; the guest
image is the normal cached one, built at most once.

When ``MIGRLAB_REQUIRE_LAB=1`` (set by scripts/test), a missing prerequisite
fails the lab tests instead of skipping them, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

LAB_TOOLS = ("ip", "unshare", "nsenter", "libvirtd", "qemu-system-x86_64")


def require_lab_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("the local lab needs root")
    search_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [tool for tool in LAB_TOOLS if shutil.which(tool, path=search_path) is None]
    if missing:
        problems.append(f"missing tools: {', '.join(missing)}")
    if not problems:
        return
    message = "; ".join(problems) + " (install with scripts/setup-debian, run as root)"
    if os.environ.get("MIGRLAB_REQUIRE_LAB") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_lab():
    """A running two-host local lab, taken down after the session."""
    require_lab_prerequisites()
    from lab.hosts.local import LocalLab

    prefix = f"mlt{os.getpid()}"
    root = Path(tempfile.gettempdir()) / f"{prefix}-lab"
    local_lab = LocalLab(root=root, prefix=prefix)
    local_lab.up(hosts=2)
    try:
        yield local_lab
    finally:
        local_lab.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_image():
    """The cached guest image, built if its inputs changed."""
    require_lab_prerequisites()
    from lab.guest.image import build_image

    return build_image()
