"""Removal of what an interrupted or killed harness left on the lab's hosts.

Only domains with the harness's ownership mark are destroyed; any other
domain is listed and left alone. Console logs and guest disk files are
removed when their name starts with the harness's guest name prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from lab import domain
from lab.errors import HostError, LabError
from lab.events import open_connection
from lab.hosts.local import LocalLab

log = logging.getLogger(__name__)


@dataclass
class CleanupReport:
    """Items that :func:`clean_hosts` removed, left alone as foreign, or failed to remove."""

    removed: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def clean_hosts(local_lab: LocalLab) -> CleanupReport:
    """Destroy the harness's guests on every libvirt host of the lab and delete their console logs and disks."""
    from lab.disks import LOCAL_IMAGES_DIR, SHARED_SUBDIR

    report = CleanupReport()
    for host in local_lab.hosts():
        if not host.is_libvirt_host:
            continue
        try:
            conn = open_connection(host.libvirt_uri)
        except HostError as exc:
            report.failures.append(str(exc))
            continue
        try:
            for dom in conn.listAllDomains():
                if domain.owner_run(dom) is None:
                    report.foreign.append(f"{dom.name()} on {host.name}")
                    continue
                try:
                    domain.destroy(dom)
                    report.removed.append(f"guest {dom.name()} on {host.name}")
                except (LabError, libvirt.libvirtError) as exc:
                    report.failures.append(f"guest {dom.name()} on {host.name}: {exc}")
        finally:
            conn.close()
        if host.log_dir is not None:
            for console in sorted((Path(host.log_dir) / "qemu").glob(f"{domain.NAME_PREFIX}*-console.log")):
                console.unlink(missing_ok=True)
                report.removed.append(f"console log {console}")
        images = local_lab.outside_path(host.name, LOCAL_IMAGES_DIR)
        _remove_disks(images, f" on {host.name}", report)
    _remove_disks(local_lab.root / "shared" / SHARED_SUBDIR, "", report)
    return report


def _remove_disks(folder: Path, where: str, report: CleanupReport) -> None:
    for disk in sorted(folder.glob(f"{domain.NAME_PREFIX}*.img")):
        disk.unlink(missing_ok=True)
        report.removed.append(f"disk {disk}{where}")
