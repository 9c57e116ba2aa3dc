"""Removal of what an interrupted or killed harness left on the lab's hosts.

Only domains with the harness's ownership mark are destroyed; any other
domain is listed and left alone. On the local lab every marked domain goes,
and guest logs (console and libvirt's QEMU log) and disk files are removed
when their name starts with the harness's guest name prefix. On the hosts of
an inventory, which several people may share, only domains whose mark names
this machine as their controller go, and only the logs of the guests
destroyed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from lab import domain
from lab.errors import HostError, LabError
from lab.events import open_connection
from lab.faults import privileged
from lab.hosts.local import LocalLab
from lab.hosts.remote import RemoteHost
from lab.hosts.shell import Shell
from lab.inventory import Inventory, InventoryHost

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 30.0
NO_MARK = "it has no migration-lab ownership mark"
# Prints each path that existed and was removed, one a line.
REMOVE_EXISTING_SCRIPT = 'for f in "$@"; do if [ -e "$f" ]; then rm -f -- "$f" && echo "$f"; fi; done'


@dataclass
class CleanupReport:
    """Items that a cleanup removed, left alone (with the reason) or failed to remove."""

    removed: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def left_alone_reason(mark: domain.OwnerMark | None, controller: str | None) -> str | None:
    """Return why cleanup leaves a domain with *mark* alone, or None when it destroys the domain.

    *controller* is this machine's controller ID, which a mark must name for
    the domain to be destroyed. None accepts every marked domain, as on the
    local lab, which only this machine's harness uses.
    """
    if mark is None:
        return NO_MARK
    if controller is None or mark.controller == controller:
        return None
    if mark.controller is None:
        return (f"its ownership mark (run {mark.run}) names no controlling machine, as marks written by "
                "older migrlab versions do not, so it may belong to someone else; if it is yours, remove it "
                "with 'virsh destroy'")
    host = f"host {mark.controller_host}, " if mark.controller_host else ""
    return (f"it belongs to run {mark.run} of another machine ({host}controller ID {mark.controller}); "
            "only 'migrlab clean' on that machine removes it")


def destroy_marked(conn: libvirt.virConnect, host_name: str, controller: str | None,
                   report: CleanupReport) -> tuple[list[str], list[str]]:
    """Destroy the domains on *conn* that :func:`left_alone_reason` accepts.

    Returns the names of the domains destroyed and of those whose destroy
    failed, and adds every domain with its result to *report*. Raises
    libvirt.libvirtError when listing the domains or reading a mark fails.
    """
    destroyed: list[str] = []
    failed: list[str] = []
    for dom in conn.listAllDomains():
        name = dom.name()
        reason = left_alone_reason(domain.owner_mark(dom), controller)
        if reason is not None:
            report.foreign.append(f"{name} on {host_name}: {reason}")
            continue
        try:
            domain.destroy(dom)
        except (LabError, libvirt.libvirtError) as exc:
            report.failures.append(f"guest {name} on {host_name}: {exc}")
            failed.append(name)
            continue
        report.removed.append(f"guest {name} on {host_name}")
        destroyed.append(name)
    return destroyed, failed


def clean_hosts(local_lab: LocalLab) -> CleanupReport:
    """Destroy the harness's guests on every libvirt host of the lab and delete their logs and disks."""
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
            destroy_marked(conn, host.name, None, report)
        finally:
            conn.close()
        if host.log_dir is not None:
            for guest_log in sorted((Path(host.log_dir) / "qemu").glob(f"{domain.NAME_PREFIX}*.log")):
                guest_log.unlink(missing_ok=True)
                report.removed.append(f"log {guest_log}")
        images = local_lab.outside_path(host.name, LOCAL_IMAGES_DIR)
        _remove_disks(images, f" on {host.name}", report)
    _remove_disks(local_lab.shared_dir / SHARED_SUBDIR, "", report)
    return report


def _remove_disks(folder: Path, where: str, report: CleanupReport) -> None:
    for disk in sorted(folder.glob(f"{domain.NAME_PREFIX}*.img")):
        disk.unlink(missing_ok=True)
        report.removed.append(f"disk {disk}{where}")


def clean_inventory(inventory: Inventory, controller: str | None = None) -> CleanupReport:
    """Destroy this machine's guests on every libvirt host of *inventory*, then delete their logs.

    Reaches each host as runs do: libvirt over its remote URI, and commands
    over SSH, through ``sudo -n`` where the host sets ``sudo: true``. Only
    domains whose mark names *controller* (default: this machine's ID) are
    destroyed. The console and QEMU logs of every guest destroyed are removed on
    every host reached, because after a migration a guest may have one on
    each side. A guest whose destroy failed anywhere keeps its logs. A host
    that fails is reported and the others are still cleaned.
    """
    controller = controller or domain.controller_id()
    report = CleanupReport()
    reached: list[tuple[RemoteHost, InventoryHost]] = []
    destroyed: list[str] = []
    failed: set[str] = set()
    try:
        for entry in inventory.libvirt_hosts:
            remote = RemoteHost(entry, inventory)
            try:
                conn = remote.open_libvirt()
            except HostError as exc:
                report.failures.append(f"host {entry.name}: {exc}")
                remote.close()
                continue
            reached.append((remote, entry))
            try:
                host_destroyed, host_failed = destroy_marked(conn, entry.name, controller, report)
            except libvirt.libvirtError as exc:
                report.failures.append(f"host {entry.name}: listing its domains failed: {exc}")
                continue
            finally:
                conn.close()
            destroyed += [name for name in host_destroyed if name not in destroyed]
            failed.update(host_failed)
        names = [name for name in destroyed if name not in failed]
        for remote, entry in reached:
            try:
                removed = remove_guest_logs(remote, entry, names)
            except HostError as exc:
                report.failures.append(f"guest logs on host {entry.name}: {exc}")
                continue
            report.removed += [f"log {path} on {entry.name}" for path in removed]
    finally:
        for remote, _entry in reached:
            remote.close()
    return report


def remove_guest_logs(shell: Shell, entry: InventoryHost, guest_names: list[str]) -> list[str]:
    """Delete the console and QEMU logs of *guest_names* on one host through its shell; return the paths deleted.

    The command runs as the SSH user, or through ``sudo -n`` when the host
    sets ``sudo: true``, because libvirt writes the logs as root. Raises
    HostError when the command fails, or for a name that is no file name.
    """
    for name in guest_names:
        if not name.startswith(domain.NAME_PREFIX) or "/" in name:
            raise HostError(f"guest name {name!r} is not a file name starting with {domain.NAME_PREFIX!r}, so "
                            "its log paths are unknown")
    if not guest_names:
        return []
    paths = [path for name in guest_names for path in (domain.console_log_path(name), domain.qemu_log_path(name))]
    argv = privileged(["sh", "-c", REMOVE_EXISTING_SCRIPT, "sh", *paths], entry.sudo)
    result = shell.run(argv, timeout=COMMAND_TIMEOUT_S, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise HostError(f"removing guest logs on host {entry.name} failed: {output}")
    return [line for line in result.stdout.splitlines() if line]
