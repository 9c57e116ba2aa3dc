"""Persistent Linux namespaces without a holder process.

A network namespace is made with ``ip netns add`` and so is pinned by a bind
mount at /run/netns/<name>, where every iproute2 tool finds it. A mount and
a UTS namespace are pinned by ``unshare --mount=<file> --uts=<file>``, which
bind-mounts the namespace files onto two files in a directory of the lab.
The kernel rejects that bind mount on a mount with shared propagation, so
the directory is first bind-mounted onto itself and made private.
Commands enter the namespaces with ``nsenter``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lab.hosts.system import MountEntry, read_mountinfo, run

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def list_netns() -> list[str]:
    """Return the names of the network namespaces under /run/netns."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def is_namespace_mount(path: Path, entries: list[MountEntry] | None = None) -> bool:
    """Tell whether ``path`` is a bind mount of a namespace file (nsfs)."""
    if entries is None:
        entries = read_mountinfo()
    return any(entry.mount_point == str(path) and entry.fs_type == "nsfs" for entry in entries)


def namespace_id(path: str | Path) -> tuple[int, int] | None:
    """Return (device, inode) identifying the namespace behind a file, if any.

    Works for /proc/<pid>/ns/* links and for the bind-mounted namespace
    files: both resolve to the same nsfs inode.
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def add_netns(name: str) -> None:
    """Create a named network namespace unless it is already there."""
    path = netns_path(name)
    if is_namespace_mount(path):
        return
    if path.exists():
        # A plain file without a namespace mounted on it is what a crash
        # between the two steps of `ip netns add` leaves, and blocks a new add.
        log.warning("removing stale network namespace file %s", path)
        path.unlink()
    run(["ip", "netns", "add", name])
    log.info("created network namespace %s", name)


def delete_netns(name: str) -> bool:
    """Delete a named network namespace; return whether anything was there."""
    path = netns_path(name)
    if is_namespace_mount(path):
        run(["ip", "netns", "delete", name])
        log.info("deleted network namespace %s", name)
        return True
    if path.exists():
        path.unlink()
        log.info("removed stale network namespace file %s", path)
        return True
    return False


def ensure_private_bind(directory: Path) -> None:
    """Bind-mount a directory onto itself with private propagation."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = read_mountinfo()
    if not any(entry.mount_point == str(directory) for entry in entries):
        run(["mount", "--bind", str(directory), str(directory)])
    run(["mount", "--make-private", str(directory)])


def create_mount_uts_namespaces(mount_file: Path, uts_file: Path) -> None:
    """Create a mount and a UTS namespace pinned on two files.

    The mount namespace starts as a copy of the caller's with slave
    propagation, so mounts made inside never reach the machine. Unmounts made
    on the machine still reach the copy, so the copy does not keep busy a
    network namespace or a disk that the machine releases later.
    """
    for path in (mount_file, uts_file):
        path.touch(exist_ok=True)
    run(["unshare", f"--mount={mount_file}", f"--uts={uts_file}", "--propagation", "slave", "true"])


def release_namespace_file(path: Path, entries: list[MountEntry] | None = None) -> bool:
    """Unmount a pinned namespace file and delete it; return whether it was mounted."""
    mounted = is_namespace_mount(path, entries)
    if mounted:
        run(["umount", str(path)])
    path.unlink(missing_ok=True)
    return mounted


def nsenter_argv(*, net: Path | None = None, mount: Path | None = None,
                 uts: Path | None = None) -> list[str]:
    """Return the nsenter prefix that enters the given namespaces.

    nsenter opens every namespace file before it enters the first one, so all
    paths are resolved in the caller's mount namespace.
    """
    argv = ["nsenter"]
    if net is not None:
        argv.append(f"--net={net}")
    if mount is not None:
        argv.append(f"--mount={mount}")
    if uts is not None:
        argv.append(f"--uts={uts}")
    argv.append("--")
    return argv


def list_links(netns: str) -> dict[str, dict]:
    """Return the links of a network namespace by name, as iproute2 reports them."""
    output = run(["ip", "-n", netns, "-j", "link", "show"]).stdout
    return {link["ifname"]: link for link in json.loads(output or "[]")}


def disable_ipv6(netns: str) -> None:
    """Turn IPv6 off for every current and future link of a network namespace.

    The lab uses IPv4 only. Without IPv6, no link-local address, router
    solicitation or multicast listener report appears on the lab's links.
    /proc/sys/net shows the network namespace of the process that opens it.
    """
    script = ("for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6;"
              " do if [ -e $f ]; then echo 1 > $f; fi; done")
    run([*nsenter_argv(net=netns_path(netns)), "sh", "-c", script])


def ensure_bridge(netns: str, bridge: str) -> None:
    """Create a bridge in a network namespace unless it exists, and set it up."""
    if bridge not in list_links(netns):
        run(["ip", "-n", netns, "link", "add", bridge, "type", "bridge"])
    run(["ip", "-n", netns, "link", "set", bridge, "up"])


def connect_to_switch(switch: str, switch_bridge: str, port: str, netns: str, link: str) -> None:
    """Connect a namespace to a switch's bridge with a veth pair, unless it is connected.

    The pair is ``port`` in the switch, a port of ``switch_bridge``, and
    ``link`` in ``netns``. Both are created in their namespaces, so no end
    ever appears in the caller's network namespace.
    """
    switch_links = list_links(switch)
    netns_links = list_links(netns)
    if port not in switch_links or link not in netns_links:
        # The kernel creates and deletes a veth pair as a whole, so one end
        # alone is a link of the same name that someone else made: it is
        # replaced.
        if port in switch_links:
            run(["ip", "-n", switch, "link", "delete", port])
        if link in netns_links:
            run(["ip", "-n", netns, "link", "delete", link])
        run(["ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", link, "netns", netns])
    run(["ip", "-n", switch, "link", "set", port, "master", switch_bridge, "up"])


def list_routes(netns: str) -> list[dict]:
    output = run(["ip", "-n", netns, "-j", "route", "show"]).stdout
    return json.loads(output or "[]")
