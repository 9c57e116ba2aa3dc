"""Configuration, start and readiness of the libvirtd of one lab host.

Every path in the configuration is the path seen inside the host's mount
namespace (/etc/libvirt, /run, /var/log/libvirt), where the host's private
directories are bind-mounted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import libvirt

from lab.errors import HostError
from lab.hosts.innetns import call_in_netns
from lab.hosts.netns import namespace_id
from lab.hosts.processes import is_alive
from lab.hosts.system import LAB_PATH, run, tail, tail_file

log = logging.getLogger(__name__)

T = TypeVar("T")

MACHINE_CONFIG_DIR = Path("/etc/libvirt")

# qemu.conf settings that let two libvirt hosts share one machine.
QEMU_SETTINGS = {
    # SELinux and AppArmor profiles are per machine, not per lab host.
    "security_driver": '"none"',
    "user": '"root"',
    "group": '"root"',
    # A private /dev per guest is not needed, and the host's mount namespace
    # is already private.
    "namespaces": "[ ]",
    # Guest console and QEMU logs go straight to files, so no virtlogd runs.
    "stdio_handler": '"file"',
    # With cgroups enabled, libvirt 11.3 on a cgroup v1 machine without
    # systemd creates /sys/fs/cgroup/*/machine on the machine and names the
    # guest's cgroup after its domain id and name, which clash between two
    # lab hosts during a migration. The guests stay in libvirtd's cgroup.
    "cgroup_controllers": "[ ]",
}

LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"

# libvirtd log level for its log file: 1 debug, 2 info, 3 warning, 4 error.
LIBVIRTD_LOG_LEVEL = 2


def libvirtd_settings(host_uuid: str) -> dict[str, str]:
    return {
        # libvirt rejects a migration whose source and destination report
        # the same host UUID (or hostname) as a migration to the same host.
        "host_uuid": f'"{host_uuid}"',
        "log_outputs": f'"{LIBVIRTD_LOG_LEVEL}:file:{LIBVIRTD_LOG}"',
    }


_SETTING = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")


def override_settings(text: str, settings: dict[str, str]) -> str:
    """Comment out ``settings`` keys in a libvirt config text and append the new values.

    libvirt's config parser returns the first assignment of a key
    (virConfGetValue in src/util/virconf.c), so an appended value alone
    would not override one already set. A list value
    that spans several lines is commented out up to its closing bracket.
    """
    lines = text.splitlines()
    output = []
    open_brackets = 0
    for line in lines:
        if open_brackets > 0:
            output.append("# " + line)
            open_brackets += line.count("[") - line.count("]")
            continue
        match = _SETTING.match(line)
        if match and match.group(1) in settings:
            output.append("# " + line)
            open_brackets = line.count("[") - line.count("]")
            continue
        output.append(line)
    output.append("")
    output.append("# Settings of the migration-lab local lab host.")
    for key, value in settings.items():
        output.append(f"{key} = {value}")
    return "\n".join(output) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Write a file atomically unless it already has this content."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return True


def shared_filesystems_value(shared_dirs: Sequence[Path]) -> str:
    """Format folders as the value of qemu.conf's shared_filesystems, each resolved to its real path.

    Seen with libvirt 11.3 in the local lab: the qemu driver resolves each
    listed path when libvirtd loads qemu.conf, so a listed symlink matches
    the disks below its target. A path that does not exist at that moment
    matches no disk, and libvirtd logs no error about it. Only the migration
    source's list counts, because qemuMigrationSrcIsSafe runs in the Begin
    phase on the source: a destination that lists nothing accepts the guest.
    """
    return "[ " + ", ".join(f'"{os.path.realpath(path)}"' for path in shared_dirs) + " ]"


def write_config(etc_dir: Path, host_uuid: str, source: Path = MACHINE_CONFIG_DIR,
                 shared_dirs: Sequence[Path] = ()) -> bool:
    """Write a host's /etc/libvirt from a copy of the machine's; return whether a config file changed.

    Only the top-level config files and the nwfilter rules are copied: the
    machine's domain, network and storage definitions, hooks and secrets stay
    out, so that no lab host autostarts or runs anything of the machine.
    *shared_dirs* are folders that every lab host sees at the same path on
    the machine's own filesystem. qemu.conf lists them in shared_filesystems
    (an option of libvirt 11.3), so libvirt migrates a guest whose disk lies
    there without VIR_MIGRATE_UNSAFE. They must exist before libvirtd starts,
    and a running libvirtd reads a changed qemu.conf only when it restarts.
    """
    etc_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.glob("*.conf")):
        if item.is_file() and not (etc_dir / item.name).exists():
            shutil.copyfile(item, etc_dir / item.name)
    if (source / "nwfilter").is_dir():
        (etc_dir / "nwfilter").mkdir(exist_ok=True)
        for item in sorted((source / "nwfilter").glob("*.xml")):
            if not (etc_dir / "nwfilter" / item.name).exists():
                shutil.copyfile(item, etc_dir / "nwfilter" / item.name)

    qemu_settings = dict(QEMU_SETTINGS)
    if shared_dirs:
        qemu_settings["shared_filesystems"] = shared_filesystems_value(shared_dirs)
    changed = False
    for name, settings in (("libvirtd.conf", libvirtd_settings(host_uuid)), ("qemu.conf", qemu_settings)):
        machine_file = source / name
        base = machine_file.read_text() if machine_file.is_file() else ""
        changed |= write_if_changed(etc_dir / name, override_settings(base, settings))
    return changed


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_pid(pid_file: Path, netns: Path) -> int | None:
    """Return the pid of the libvirtd named by ``pid_file`` if it runs in ``netns``."""
    pid = read_pid(pid_file)
    if pid is None:
        return None
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    if name != "libvirtd":
        return None
    if namespace_id(Path(f"/proc/{pid}/ns/net")) != namespace_id(netns):
        return None
    return pid


def start(nsenter: list[str], *, pid_file: Path, log_file: Path, timeout: float) -> None:
    """Start libvirtd as a daemon with the ``nsenter`` prefix.

    With --daemon, libvirtd's first process exits once the daemon reports
    its early start-up (pid file, configuration, sockets) done or failed.
    A pid file left by a killed daemon is removed first, so that
    ``wait_until_ready`` reads only the new pid.
    """
    pid_file.unlink(missing_ok=True)
    environment = {"PATH": LAB_PATH, "LC_ALL": "C"}
    result = run([*nsenter, "libvirtd", "--daemon"], timeout=timeout, check=False, env=environment)
    if result.returncode != 0:
        raise HostError(f"libvirtd failed to start (exit status {result.returncode}): "
                        f"{tail(result.stderr)}\nend of {log_file}:\n{tail_file(log_file)}")


def call_with_timeout(function: Callable[[], T], timeout: float, description: str) -> T:
    """Run a blocking call in a worker thread and give up on it after ``timeout`` seconds.

    libvirt's Python binding has no timeout for opening a connection, so a
    daemon that accepts the socket but never replies would block forever.
    A call that timed out keeps its daemon thread until the call returns.
    """
    return call_in_netns(None, function, timeout, description)


# Path of libvirtd's read-write socket inside a host's mount namespace.
SOCKET_INSIDE = "/run/libvirt/libvirt-sock"

# Flag of a listening socket in /proc/net/unix (__SO_ACCEPTCON).
_UNIX_LISTENING = 0x10000


def is_socket_listening(pid: int, path: str = SOCKET_INSIDE) -> bool:
    """Tell whether the network namespace of ``pid`` has a unix socket listening on ``path``.

    Reading /proc/<pid>/net/unix needs no connection, which matters because a
    probe connection that closes at once makes libvirtd log an error.
    """
    try:
        lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & _UNIX_LISTENING:
            return True
    return False


def open_connection(uri: str, timeout: float) -> libvirt.virConnect:
    return call_with_timeout(lambda: libvirt.open(uri), timeout, f"opening {uri}")


def wait_until_ready(uri: str, *, socket_path: Path, pid_file: Path, netns: Path,
                     log_file: Path, timeout: float) -> int:
    """Wait until libvirtd accepts a libvirt connection, and return its pid.

    The socket is first checked to be listening, because libvirt prints
    every failed open to standard error. Raises HostError with the end of
    the daemon's log if the daemon exits or does not accept a connection
    in time.
    """
    deadline = time.monotonic() + timeout
    last_error = "its socket was never listening"
    while True:
        pid = running_pid(pid_file, netns)
        remaining = deadline - time.monotonic()
        if pid is not None and is_socket_listening(pid):
            try:
                connection = open_connection(uri, max(remaining, 1.0))
            except (libvirt.libvirtError, HostError) as error:
                log.debug("libvirtd pid %d rejected a connection, retrying: %s", pid, error)
                last_error = str(error)
            else:
                connection.close()
                return pid
        recorded_pid = read_pid(pid_file)
        if pid is None and recorded_pid is not None and not is_alive(recorded_pid):
            raise HostError(f"libvirtd exited during start-up (pid file {pid_file}); "
                            f"end of {log_file}:\n{tail_file(log_file)}")
        if time.monotonic() >= deadline:
            raise HostError(f"timed out after {timeout:g} s waiting for libvirtd to accept a connection "
                            f"on {socket_path} ({last_error}); end of {log_file}:\n{tail_file(log_file)}")
        time.sleep(0.1)
