"""The local lab: several libvirt hosts on one Linux machine.

Each libvirt host ``hN`` is a network, a mount and a UTS namespace. Its mount
namespace has private directories bind-mounted over /run, /etc/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, a private
/etc/hosts, and a sysfs of its own network namespace. Its own libvirtd runs
there with its own hostname and host UUID, which libvirt needs to accept a
migration between two hosts of one machine. The host ``client`` is a network
namespace only, for probes.

A switch namespace contains the bridge ``labbr0``. Every host has a veth pair
from the switch, named ``veth-<host>`` in the switch and ``eth0`` in the
host. In a libvirt host, ``eth0`` is a port of the bridge ``br0``, which has
the host's address and takes the guests' tap devices, so a guest keeps its
MAC and IP address on every host. The root network namespace gets no link,
address or route, and no lab namespace has a route out of the lab subnet.

Every host, the client included, runs an sshd bound to its lab address
(``lab.hosts.sshd``), and ``up`` writes an inventory of the lab in the
format of ``lab.inventory``. The harness reaches those sshds from the
client's network namespace, so a playbook can drive the local lab over SSH
exactly like real servers.

Layout of the lab directory (``lab.paths.lab_dir()`` unless given)::

    lab.json          LabState, written before the lab creates anything
    lab.lock          flock held by up and down
    inventory.yaml    the lab's inventory, rewritten by up when it changes
    ssh/
      id_ed25519      key pair that logs in to every host as root
      known_hosts     host keys, pinned on first connection
    shared/           folder every libvirt host sees at this same path, listed in
                      each host's qemu.conf shared_filesystems: guest disks of
                      shared storage (disks/) and the save images of flushing
    ns/               bind-mounted onto itself, private propagation
      <host>.mnt      pinned mount namespace of a libvirt host
      <host>.uts      pinned UTS namespace of a libvirt host
    hosts/<host>/
      namespaces.id   id of the mount namespace once it is fully set up
      etc/hosts       bind-mounted over /etc/hosts
      etc/libvirt/    bind-mounted over /etc/libvirt
      run/            bind-mounted over /run: libvirt/libvirt-sock, libvirtd.pid
      var/lib/libvirt/, var/log/libvirt/, var/cache/libvirt/   bound likewise
      ssh/            sshd_config, host key and sshd.log
    hosts/client/
      run/            mounted over /run in the client sshd's own mount namespace
      ssh/            as for a libvirt host
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import libvirt

from lab import paths
from lab.errors import ConfigError, HostError
from lab.hosts import libvirtd, netns, sshd
from lab.hosts.processes import LabProcess, NamespaceId, find_processes, stuck_message, terminate
from lab.hosts.state import HostRecord, LabState, read_state, write_state
from lab.inventory import (DEFAULT_LIBVIRT_URI, Inventory, InventoryHost, NetworkSection, render_inventory,
                           write_inventory)
from lab.hosts.system import (check_root, check_tools, exclusive_lock, is_within, mount_points_under, parse_mountinfo,
                              read_mountinfo, run, tail, topmost_mount_points)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "migrlab"
DEFAULT_SUBNET = "10.77.0.0/24"

CLIENT = "client"
SWITCH = "sw"
SWITCH_BRIDGE = "labbr0"
GUEST_BRIDGE = "br0"
HOST_LINK = "eth0"

# Offsets in the subnet: the client at .2, host hN at .(10 + N), guests from .100.
CLIENT_OFFSET = 2
HOST_OFFSET = 10
FIRST_GUEST_OFFSET = 100
MAX_HOSTS = FIRST_GUEST_OFFSET - HOST_OFFSET - 1

# Directories of a libvirt host that get a private copy, as seen inside it.
PRIVATE_DIRS = ("run", "etc/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt")
# Directories the Debian packages create and libvirtd 11.3 expects to exist:
# it does not create /var/log/libvirt/qemu before writing a guest's log there.
SKELETON_DIRS = ("var/log/libvirt/qemu", "var/lib/libvirt/qemu", "var/cache/libvirt/qemu")

TOOLS_FOR_UP = ["ip", "unshare", "nsenter", "mount", "umount", "hostname", "libvirtd", "qemu-system-x86_64",
                "sshd", "ssh-keygen"]
TOOLS_FOR_DOWN = ["ip", "umount"]

LOCK_TIMEOUT = 120.0
STATUS_CONNECT_TIMEOUT = 10.0

_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
_HOST_PATTERN = re.compile(r"^(h[1-9][0-9]*|client)$")


@dataclass(frozen=True)
class HostInfo:
    """A host of the lab, as callers address it from the root namespace.

    The libvirt fields and directories are None for the client, which has
    no libvirtd.
    """

    name: str
    address: str
    netns: str
    is_libvirt_host: bool
    hostname: str | None
    libvirt_uri: str | None
    migration_uri: str | None
    guest_bridge: str | None
    # Root-namespace paths of the host's private /var/log/libvirt and /run.
    log_dir: Path | None
    run_dir: Path | None


@dataclass(frozen=True)
class LabStatus:
    """Inventory of a lab on the machine, whether lab.json records it or not."""

    root: Path
    prefix: str
    state: LabState | None
    # Network namespaces named <prefix>-sw, <prefix>-client or <prefix>-hN.
    namespaces: list[str]
    # Of those, the ones lab.json does not list: leftovers of a crashed run.
    unrecorded_namespaces: list[str]
    # Mount points at or below the lab directory in the root mount namespace.
    mounts: list[str]
    processes: list[LabProcess]
    # Running libvirtd pid by host name.
    daemons: dict[str, int]
    # Domain names by host name, for each libvirtd that accepted a connection.
    domains: dict[str, list[str]]
    # Each inconsistency found, as a sentence.
    problems: list[str] = field(default_factory=list)
    # Running sshd pid by host name.
    ssh_daemons: dict[str, int] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        """Whether anything of the lab is on the machine."""
        return bool(self.state or self.namespaces or self.mounts or self.processes
                    or self.root.exists())

    def render(self) -> str:
        """Format the status as text for a terminal."""
        lines = [f"lab directory: {self.root} ({'exists' if self.root.exists() else 'absent'})"]
        if self.state is not None:
            lines.append(f"lab.json: subnet {self.state.subnet}, created {self.state.created_at:%Y-%m-%d %H:%M:%S %Z}")
            for record in sorted(self.state.hosts, key=_host_order):
                daemon = self.daemons.get(record.name)
                if not record.is_libvirt_host:
                    role = "client"
                elif daemon is None:
                    role = "libvirtd down"
                else:
                    role = f"libvirtd pid {daemon}"
                guests = ", ".join(self.domains.get(record.name, [])) or "-"
                ssh = self.ssh_daemons.get(record.name)
                ssh_text = f"sshd pid {ssh}" if ssh is not None else "sshd down"
                lines.append(f"  {record.name:7} {record.address:15} {role:22} {ssh_text:16} domains: {guests}")
        else:
            lines.append("lab.json: absent")
        lines.append(f"network namespaces: {', '.join(self.namespaces) or '-'}")
        lines.append(f"mounts: {len(self.mounts)}")
        lines.append(f"processes: {', '.join(f'{p.name}[{p.pid}]@{p.namespace}' for p in self.processes) or '-'}")
        lines += [f"problem: {problem}" for problem in self.problems]
        return "\n".join(lines)


def check_prerequisites(tools: list[str] = TOOLS_FOR_UP) -> None:
    """Raise HostError unless the lab can run here: root and the listed tools."""
    check_root()
    check_tools(tools)


def _parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(subnet, strict=True)
    except ValueError as error:
        raise ConfigError(f"invalid lab subnet: {error}", field="subnet", value=subnet,
                          fix="give an IPv4 network such as 10.77.0.0/24") from error
    if not isinstance(network, ipaddress.IPv4Network):
        raise ConfigError("the lab subnet must be IPv4", field="subnet", value=subnet,
                          fix="give an IPv4 network such as 10.77.0.0/24")
    if network.prefixlen > 24:
        raise ConfigError("the lab subnet is too small: it needs .2, .11 and up for hosts and .100 "
                          "and up for guests", field="subnet", value=subnet, fix="use a /24 or larger")
    if not network.is_private or network.is_loopback or network.is_link_local or network.is_multicast:
        raise ConfigError("the lab subnet must be a private range that no real network uses here",
                          field="subnet", value=subnet, fix="use a range of 10.0.0.0/8 such as 10.77.0.0/24")
    return network


def _check_prefix(prefix: str) -> str:
    if not _PREFIX_PATTERN.match(prefix):
        raise ConfigError("invalid namespace prefix", field="prefix", value=prefix,
                          fix="use 2 to 40 lowercase letters, digits and dashes, starting with a letter")
    return prefix


# Paths that a libvirt host's mount namespace covers or replaces. The lab
# directory must lie outside them, or its own files would be hidden there.
_COVERED_PATHS = ("/run", "/sys", "/proc", "/dev", "/etc/hosts",
                  *(f"/{relative}" for relative in PRIVATE_DIRS))


def _check_root_dir(root: Path) -> None:
    if root == Path("/") or any(is_within(str(root), Path(covered)) for covered in _COVERED_PATHS):
        raise ConfigError("the lab directory lies where the lab hosts mount their own files",
                          field="root", value=str(root),
                          fix=f"use a directory outside / itself and {', '.join(_COVERED_PATHS)}, "
                              "such as /var/lib/migrlab/lab")


def _host_number(name: str) -> int:
    return int(name[1:]) if name.startswith("h") else 0


def _host_order(record: HostRecord) -> tuple[bool, int]:
    """Sort key that puts libvirt hosts first, by number, and the client last."""
    return (not record.is_libvirt_host, _host_number(record.name))


class LocalLab:
    """Bring up, inspect and remove the local lab.

    ``prefix`` names the lab's network namespaces (``<prefix>-h1``) and
    hostnames. Network namespace names are global to the machine, so two
    labs that are up at the same time need different prefixes.
    ``start_timeout`` bounds the wait for one libvirtd, and ``stop_grace`` is
    the time between SIGTERM and SIGKILL in ``down``, both in seconds.
    libvirtd 11.3 has been seen to wait out its 30 s shutdown timeout after
    SIGTERM, with its udev-event thread blocked, mostly when the signal came
    soon after its start. A short grace keeps ``down`` fast in that case.
    """

    def __init__(self, root: Path | None = None, subnet: str = DEFAULT_SUBNET, *,
                 prefix: str = DEFAULT_PREFIX, start_timeout: float = 60.0, stop_grace: float = 5.0):
        # Mount points in /proc/self/mountinfo are canonical paths, so the
        # root is resolved once here to compare with them.
        self.root = Path(root if root is not None else paths.lab_dir()).resolve()
        _check_root_dir(self.root)
        self.network = _parse_subnet(subnet)
        self.prefix = _check_prefix(prefix)
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._host_pattern = re.compile(rf"^{re.escape(prefix)}-(sw|client|h[1-9][0-9]*)$")

    # Paths and names.

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lab.lock"

    @property
    def ns_dir(self) -> Path:
        return self.root / "ns"

    @property
    def hosts_dir(self) -> Path:
        return self.root / "hosts"

    def host_dir(self, name: str) -> Path:
        return self.hosts_dir / name

    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def shared_dir(self) -> Path:
        """Folder that every libvirt host reaches at this same path and that libvirt treats as shared storage."""
        return self.root / "shared"

    @property
    def key_file(self) -> Path:
        """Private key that logs in to every host of the lab as root."""
        return self.ssh_dir / sshd.KEY_NAME

    @property
    def inventory_file(self) -> Path:
        return self.root / "inventory.yaml"

    def netns_name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def _mount_file(self, host: str) -> Path:
        return self.ns_dir / f"{host}.mnt"

    def _uts_file(self, host: str) -> Path:
        return self.ns_dir / f"{host}.uts"

    def _run_dir(self, host: str) -> Path:
        return self.host_dir(host) / "run"

    def _log_dir(self, host: str) -> Path:
        return self.host_dir(host) / "var/log/libvirt"

    def _pid_file(self, host: str) -> Path:
        return self._run_dir(host) / "libvirtd.pid"

    def _socket(self, host: str) -> Path:
        return self._run_dir(host) / "libvirt/libvirt-sock"

    def _libvirt_uri(self, host: str) -> str:
        return f"qemu+unix:///system?socket={quote(str(self._socket(host)), safe='/')}"

    def _nsenter(self, record: HostRecord) -> list[str]:
        net = netns.netns_path(self.netns_name(record.name))
        if not record.is_libvirt_host:
            return netns.nsenter_argv(net=net)
        return netns.nsenter_argv(net=net, mount=self._mount_file(record.name),
                                  uts=self._uts_file(record.name))

    # Public API.

    def up(self, hosts: int = 2) -> LabState:
        """Create the lab with libvirt hosts h1..h<hosts> and the client, or repair it.

        Running it on a lab that is up changes nothing. A larger ``hosts``
        adds hosts, and a smaller one keeps the hosts there are. Whatever a
        crash left half made (a namespace, a mount, a dead libvirtd) is made
        again. Leftovers without lab.json raise HostError, because their
        host UUIDs and addresses are not known: run down first.
        """
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ConfigError("invalid number of lab hosts", field="hosts", value=hosts,
                              fix=f"give an integer from 1 to {MAX_HOSTS}")
        check_prerequisites()
        started = time.monotonic()
        with self._locked():
            recorded = read_state(self.state_file)
            if recorded is None:
                self._check_no_leftovers()
                state = LabState(prefix=self.prefix, subnet=str(self.network),
                                 created_at=datetime.now(timezone.utc),
                                 hosts=[self._new_record(CLIENT)])
            else:
                self._check_matches(recorded)
                state = recorded
            state = self._add_records(state, hosts)
            # Recorded before anything is created, so that status and down
            # know every namespace of a run that crashed half-way.
            if state != recorded:
                write_state(self.state_file, state)

            netns.ensure_private_bind(self.ns_dir)
            self._ensure_switch()
            fresh_networks = {record.name for record in state.hosts if self._ensure_network(record)}
            libvirt_hosts = [record for record in state.hosts if record.is_libvirt_host]
            # libvirtd finds a shared_filesystems folder only if it exists when the daemon starts.
            self.shared_dir.mkdir(exist_ok=True)
            for record in libvirt_hosts:
                reconfigured = self._ensure_files(record, state)
                self._ensure_mount_uts(record, renew=record.name in fresh_networks)
                if reconfigured:
                    self._stop_daemon(record)
            pids = self._ensure_daemons(libvirt_hosts)
            self._ensure_ssh(state)
            self._write_inventory(state)

            if pids != state.pids:
                state = state.model_copy(update={"pids": pids})
                write_state(self.state_file, state)
        log.info("lab %s is up with %d libvirt hosts in %.1f s", self.root, len(libvirt_hosts),
                 time.monotonic() - started)
        return state

    def down(self) -> list[str]:
        """Remove every process, namespace, mount and file of the lab; return what was removed.

        Processes are found by namespace, so this also cleans up after a
        crash of the harness or of a daemon. Running it again returns an
        empty list. Raises HostError after removing all it can if something
        could not be removed (a process that survived SIGKILL, a busy mount).
        """
        check_prerequisites(TOOLS_FOR_DOWN)
        started = time.monotonic()
        removed: list[str] = []
        failures: list[str] = []
        with self._locked(create=False):
            namespaces = self._find_namespaces()
            namespace_ids = self._namespace_ids(namespaces)
            processes = find_processes(namespace_ids)
            stopped, stuck = terminate(processes, namespace_ids, grace=self.stop_grace)
            if stuck:
                failures.append(stuck_message(stuck))
            removed += [f"process {process.pid} ({process.name}) in {process.namespace}"
                        for process in stopped if process.pid not in stuck]

            for name in namespaces:
                try:
                    if netns.delete_netns(name):
                        removed.append(f"network namespace {name}")
                except HostError as error:
                    failures.append(str(error))

            removed += self._unmount_all(failures)
            removed += self._remove_files(failures)
        if failures:
            raise HostError("down could not remove everything: " + "; ".join(failures)
                            + f". It removed: {', '.join(removed) or 'nothing'}")
        log.info("lab %s is down in %.1f s, removed %d items", self.root, time.monotonic() - started,
                 len(removed))
        return removed

    def status(self) -> LabStatus:
        """Report what exists of the lab, including leftovers of a crashed run."""
        check_root()
        problems: list[str] = []
        try:
            state = read_state(self.state_file)
        except HostError as error:
            state = None
            problems.append(str(error))

        namespaces = self._find_namespaces()
        recorded = set()
        if state is not None:
            recorded = {self.netns_name(SWITCH)} | {self.netns_name(record.name) for record in state.hosts}
        unrecorded = [name for name in namespaces if name not in recorded]
        problems += [f"network namespace {name} is not in lab.json (left by a crashed run)"
                     for name in unrecorded]
        problems += [f"network namespace {name} is in lab.json but missing"
                     for name in sorted(recorded - set(namespaces))]

        mounts = mount_points_under(self.root)
        if state is None:
            problems += [f"mount {point} exists without lab.json" for point in mounts]
        processes = find_processes(self._namespace_ids(namespaces))
        if state is None:
            problems += [f"process {process.pid} ({process.name}) runs in {process.namespace} "
                         "without lab.json" for process in processes]

        daemons, domains = self._inspect_daemons(state, problems)
        ssh_daemons = {}
        for record in state.hosts if state is not None else []:
            pid = sshd.running_pid(self._run_dir(record.name), netns.netns_path(self.netns_name(record.name)))
            if pid is None:
                problems.append(f"sshd of {record.name} is not running; run up to start it")
            else:
                ssh_daemons[record.name] = pid
        return LabStatus(root=self.root, prefix=self.prefix, state=state, namespaces=namespaces,
                         unrecorded_namespaces=unrecorded, mounts=mounts, processes=processes,
                         daemons=daemons, domains=domains, problems=problems, ssh_daemons=ssh_daemons)

    def hosts(self) -> list[HostInfo]:
        """Return the lab's hosts, libvirt hosts by number and then the client; [] if not up."""
        state = read_state(self.state_file)
        if state is None:
            return []
        return [self._host_info(record) for record in sorted(state.hosts, key=_host_order)]

    def host(self, name: str) -> HostInfo:
        return self._host_info(self._record(name))

    def guest_address(self, offset: int = FIRST_GUEST_OFFSET) -> str:
        """Return the lab address at ``offset`` in the subnet, which must be a guest offset (100 and up)."""
        if not FIRST_GUEST_OFFSET <= offset < self.network.num_addresses - 1:
            raise ConfigError("invalid guest address offset", field="offset", value=offset,
                              fix=f"use {FIRST_GUEST_OFFSET} to {self.network.num_addresses - 2}: lower "
                                  "offsets belong to the lab hosts")
        return str(self.network[offset])

    def exec(self, host: str, argv: list[str], timeout: float, check: bool = True, *,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside a host's namespaces and return its result with text output.

        The command runs in the host's network, and for a libvirt host also with its
        hostname and private directories. Raises HostError when the command
        times out, or when ``check`` is set and it exits with a non-zero status.
        """
        check_root()
        if not argv:
            raise ConfigError("empty command", field="argv", value=argv, fix="give the program and its arguments")
        record = self._record(host)
        result = run([*self._nsenter(record), *argv], timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            raise HostError(f"command {argv} on lab host {host} failed with exit status "
                            f"{result.returncode}: {tail(result.stderr or result.stdout)}")
        return result

    def command(self, host: str, argv: list[str]) -> list[str]:
        """Return ``argv`` prefixed with the nsenter call that runs it inside a host, for a long-running process."""
        if not argv:
            raise ConfigError("empty command", field="argv", value=argv, fix="give the program and its arguments")
        return [*self._nsenter(self._record(host)), *argv]

    def outside_path(self, host: str, inside: str) -> Path:
        """Return the root-namespace path of the file that a libvirt host opens at ``inside``.

        Paths below the host's private directories map into the host's
        folder of the lab directory; any other path is the machine's own.
        """
        path = Path(inside)
        if not path.is_absolute():
            raise ConfigError("a path inside a lab host must be absolute", field="path", value=inside,
                              fix="give the absolute path as the host sees it")
        if self._record(host).is_libvirt_host:
            for relative in PRIVATE_DIRS:
                if is_within(str(path), Path("/" + relative)):
                    return self.host_dir(host) / relative / path.relative_to("/" + relative)
        return path

    def inventory(self) -> Inventory:
        """Return the inventory of the lab as ``up`` writes it; raises HostError if the lab is not up."""
        state = read_state(self.state_file)
        if state is None:
            raise HostError(f"the lab at {self.root} is not up, so it has no inventory; run up first")
        return self._inventory(state)

    # State.

    def _record(self, name: str) -> HostRecord:
        state = read_state(self.state_file)
        if state is None:
            raise HostError(f"the lab at {self.root} is not up, so host {name!r} does not exist; run up first")
        record = state.host(name)
        if record is None:
            known = ", ".join(record.name for record in state.hosts)
            raise HostError(f"host {name!r} not found in the lab at {self.root}; its hosts are {known}")
        return record

    def _host_info(self, record: HostRecord) -> HostInfo:
        libvirt_host = record.is_libvirt_host
        return HostInfo(
            name=record.name,
            address=record.address,
            netns=self.netns_name(record.name),
            is_libvirt_host=libvirt_host,
            hostname=record.hostname,
            libvirt_uri=self._libvirt_uri(record.name) if libvirt_host else None,
            migration_uri=f"tcp://{record.address}" if libvirt_host else None,
            guest_bridge=GUEST_BRIDGE if libvirt_host else None,
            log_dir=self._log_dir(record.name) if libvirt_host else None,
            run_dir=self._run_dir(record.name) if libvirt_host else None,
        )

    def _new_record(self, name: str) -> HostRecord:
        if name == CLIENT:
            return HostRecord(name=name, address=str(self.network[CLIENT_OFFSET]), is_libvirt_host=False)
        return HostRecord(name=name, address=str(self.network[HOST_OFFSET + _host_number(name)]),
                          is_libvirt_host=True, hostname=self.netns_name(name), host_uuid=str(uuid.uuid4()))

    def _add_records(self, state: LabState, hosts: int) -> LabState:
        records = list(state.hosts)
        for number in range(1, hosts + 1):
            if state.host(f"h{number}") is None:
                records.append(self._new_record(f"h{number}"))
        present = sum(record.is_libvirt_host for record in state.hosts)
        if present > hosts:
            log.info("lab has %d libvirt hosts, more than the %d requested; up keeps them all", present, hosts)
        return state.model_copy(update={"hosts": records})

    def _check_matches(self, state: LabState) -> None:
        if state.prefix != self.prefix or state.subnet != str(self.network):
            raise HostError(f"the lab at {self.root} is up with prefix {state.prefix!r} and subnet "
                            f"{state.subnet}, not {self.prefix!r} and {self.network}; use the same "
                            "values, or run down first")

    def _check_no_leftovers(self) -> None:
        found = self._find_namespaces() + mount_points_under(self.root)
        if found:
            raise HostError(f"found leftovers of a lab without {self.state_file}: {', '.join(found)}; "
                            "run down with the same root and prefix to remove them, then up")

    @contextmanager
    def _locked(self, create: bool = True) -> Iterator[None]:
        """Hold the lab's lock; with ``create`` false and no lab directory, lock nothing."""
        if not create and not self.root.exists():
            yield
            return
        with exclusive_lock(self.lock_file, LOCK_TIMEOUT, "another up or down of this lab is running"):
            yield

    # Discovery.

    def _find_namespaces(self) -> list[str]:
        return [name for name in netns.list_netns() if self._host_pattern.match(name)]

    def _namespace_ids(self, namespaces: list[str]) -> dict[NamespaceId, str]:
        """Map the ids of the lab's network, mount and UTS namespaces to host names."""
        ids: dict[NamespaceId, str] = {}
        for name in namespaces:
            ns = netns.namespace_id(netns.netns_path(name))
            if ns is not None:
                ids[ns] = name
        entries = read_mountinfo()
        for path in sorted(self.ns_dir.glob("*")) if self.ns_dir.is_dir() else []:
            if netns.is_namespace_mount(path, entries):
                ns = netns.namespace_id(path)
                if ns is not None:
                    ids[ns] = self.netns_name(path.stem)
        return ids

    def _inspect_daemons(self, state: LabState | None,
                         problems: list[str]) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Find each libvirt host's libvirtd and list its domains."""
        names = set()
        if state is not None:
            names |= {record.name for record in state.hosts if record.is_libvirt_host}
        if self.hosts_dir.is_dir():
            names |= {path.name for path in self.hosts_dir.iterdir()
                      if _HOST_PATTERN.match(path.name) and path.name != CLIENT}
        daemons: dict[str, int] = {}
        domains: dict[str, list[str]] = {}
        for name in sorted(names, key=_host_number):
            pid = libvirtd.running_pid(self._pid_file(name), netns.netns_path(self.netns_name(name)))
            if pid is None:
                recorded = state.pids.get(name) if state is not None else None
                if state is not None and state.host(name) is not None:
                    problems.append(f"libvirtd of {name} is not running (recorded pid {recorded})")
                continue
            daemons[name] = pid
            if state is not None and state.pids.get(name) not in (None, pid):
                problems.append(f"libvirtd of {name} runs as pid {pid}, lab.json records "
                                f"{state.pids.get(name)}")
            try:
                connection = libvirtd.open_connection(self._libvirt_uri(name), STATUS_CONNECT_TIMEOUT)
                try:
                    domains[name] = sorted(domain.name() for domain in connection.listAllDomains())
                finally:
                    connection.close()
            except (libvirt.libvirtError, HostError) as error:
                problems.append(f"libvirtd of {name} (pid {pid}) failed to list domains: {error}")
        return daemons, domains

    # Network.

    def _ensure_switch(self) -> None:
        switch = self.netns_name(SWITCH)
        netns.add_netns(switch)
        netns.disable_ipv6(switch)
        netns.ensure_bridge(switch, SWITCH_BRIDGE)

    def _ensure_network(self, record: HostRecord) -> bool:
        """Make a host's network namespace, link and address; return whether the namespace is new."""
        name = self.netns_name(record.name)
        fresh = not netns.is_namespace_mount(netns.netns_path(name))
        netns.add_netns(name)
        netns.disable_ipv6(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        netns.connect_to_switch(self.netns_name(SWITCH), SWITCH_BRIDGE, f"veth-{record.name}", name, HOST_LINK)
        device = HOST_LINK
        if record.is_libvirt_host:
            netns.ensure_bridge(name, GUEST_BRIDGE)
            run(["ip", "-n", name, "link", "set", HOST_LINK, "master", GUEST_BRIDGE])
            device = GUEST_BRIDGE
        run(["ip", "-n", name, "link", "set", HOST_LINK, "up"])
        run(["ip", "-n", name, "addr", "replace", f"{record.address}/{self.network.prefixlen}", "dev", device])
        return fresh

    # Files and mount namespaces.

    def _ensure_files(self, record: HostRecord, state: LabState) -> bool:
        """Write a host's private files; return whether its libvirt config changed."""
        directory = self.host_dir(record.name)
        for relative in (*PRIVATE_DIRS, *SKELETON_DIRS, "etc"):
            (directory / relative).mkdir(parents=True, exist_ok=True)
        reconfigured = libvirtd.write_config(directory / "etc/libvirt", record.host_uuid or "",
                                             shared_dirs=[self.shared_dir])

        lines = ["127.0.0.1 localhost"]
        for other in state.hosts:
            names = f"{other.hostname} {other.name}" if other.hostname else other.name
            lines.append(f"{other.address} {names}")
        text = "\n".join(lines) + "\n"
        hosts_file = directory / "etc/hosts"
        # Written in place, never replaced, because it is bind-mounted by
        # inode over /etc/hosts in the host.
        if not hosts_file.exists() or hosts_file.read_text() != text:
            hosts_file.write_text(text)
        return reconfigured

    def _namespace_marker(self, host: str) -> Path:
        return self.host_dir(host) / "namespaces.id"

    def _ensure_mount_uts(self, record: HostRecord, *, renew: bool) -> None:
        """Make a host's mount and UTS namespaces unless they are fully set up.

        A mount namespace counts as set up when namespaces.id contains its
        id, which is written as the last step. Half-made namespaces, or
        namespaces of a host whose network namespace is new, are removed
        with their processes and made again.
        """
        mount_file = self._mount_file(record.name)
        uts_file = self._uts_file(record.name)
        marker = self._namespace_marker(record.name)
        entries = read_mountinfo()
        mounted = [path for path in (mount_file, uts_file) if netns.is_namespace_mount(path, entries)]
        current = str(netns.namespace_id(mount_file)) if mount_file in mounted else None
        if not renew and len(mounted) == 2 and marker.exists() and marker.read_text().strip() == current:
            return

        if mounted:
            log.warning("making the namespaces of %s again", record.name)
            ids: dict[NamespaceId, str] = {}
            for path in mounted:
                ns = netns.namespace_id(path)
                if ns is not None:
                    ids[ns] = self.netns_name(record.name)
            _stopped, stuck = terminate(find_processes(ids), ids, grace=self.stop_grace)
            if stuck:
                raise HostError(f"cannot make the namespaces of {record.name} again: {stuck_message(stuck)}")
            for path in mounted:
                netns.release_namespace_file(path)
        marker.unlink(missing_ok=True)
        # A new mount namespace is a fresh boot of the host: its /run must not
        # hold pid files or guest status files of processes that are gone.
        run_dir = self._run_dir(record.name)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir()

        netns.create_mount_uts_namespaces(mount_file, uts_file)
        self._set_up_mount_namespace(record)
        marker.write_text(f"{netns.namespace_id(mount_file)}\n")

    def _set_up_mount_namespace(self, record: HostRecord) -> None:
        enter = self._nsenter(record)
        inside = parse_mountinfo(run([*enter, "cat", "/proc/self/mountinfo"]).stdout)
        # The copy of the machine's mount table pins whatever is mounted under
        # /run (network namespaces of others among them) and the lab's own
        # namespace files, so those copies are detached first.
        detach = topmost_mount_points([entry.mount_point for entry in inside
                                       if is_within(entry.mount_point, Path("/run"))
                                       or is_within(entry.mount_point, self.root)])
        if detach:
            run([*enter, "umount", "--lazy", *detach])
        # A sysfs mounted from inside the network namespace shows the host's
        # own links under /sys/class/net, where libvirt looks up bridges.
        # It also hides the machine's cgroup mounts from libvirtd.
        run([*enter, "umount", "--lazy", "/sys"])
        run([*enter, "mount", "-t", "sysfs", "sysfs", "/sys"])
        directory = self.host_dir(record.name)
        for relative in PRIVATE_DIRS:
            run([*enter, "mount", "--bind", str(directory / relative), f"/{relative}"])
        run([*enter, "mount", "--bind", str(directory / "etc/hosts"), "/etc/hosts"])
        run([*enter, "hostname", record.hostname or record.name])

    # libvirtd.

    def _stop_daemon(self, record: HostRecord) -> None:
        """Stop a host's running libvirtd, so that _ensure_daemons starts it with the new config.

        Its guests keep running, and the new libvirtd finds them again.
        """
        netns_file = netns.netns_path(self.netns_name(record.name))
        pid = libvirtd.running_pid(self._pid_file(record.name), netns_file)
        ns = netns.namespace_id(netns_file)
        if pid is None or ns is None:
            return
        log.info("restarting libvirtd on %s (pid %d) because its config changed", record.name, pid)
        process = LabProcess(pid=pid, name="libvirtd", namespace=self.netns_name(record.name), command="libvirtd")
        _stopped, stuck = terminate([process], {ns: self.netns_name(record.name)}, grace=self.stop_grace)
        if stuck:
            raise HostError(f"cannot restart libvirtd on {record.name} with its new config: "
                            f"{stuck_message(stuck)}")

    def _ensure_daemons(self, records: list[HostRecord]) -> dict[str, int]:
        """Start libvirtd where it is not running, then wait until each accepts a connection."""
        for record in records:
            netns_file = netns.netns_path(self.netns_name(record.name))
            if libvirtd.running_pid(self._pid_file(record.name), netns_file) is None:
                log.info("starting libvirtd on %s", record.name)
                libvirtd.start(self._nsenter(record), pid_file=self._pid_file(record.name),
                               log_file=self._log_dir(record.name) / "libvirtd.log", timeout=self.start_timeout)
        pids = {}
        for record in records:
            pids[record.name] = libvirtd.wait_until_ready(
                self._libvirt_uri(record.name), socket_path=self._socket(record.name),
                pid_file=self._pid_file(record.name),
                netns=netns.netns_path(self.netns_name(record.name)),
                log_file=self._log_dir(record.name) / "libvirtd.log", timeout=self.start_timeout)
        return pids

    # SSH.

    def _ensure_ssh(self, state: LabState) -> None:
        """Make the lab's key pair and start an sshd on every host where none runs."""
        sshd.ensure_key_pair(self.key_file, f"migrlab-{self.prefix}")
        for record in sorted(state.hosts, key=_host_order):
            host_dir = self.host_dir(record.name)
            ssh_dir = host_dir / "ssh"
            ssh_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(ssh_dir, 0o700)
            run_dir = self._run_dir(record.name)
            run_dir.mkdir(parents=True, exist_ok=True)
            netns_file = netns.netns_path(self.netns_name(record.name))
            if sshd.running_pid(run_dir, netns_file) is not None:
                continue
            config = sshd.prepare_files(ssh_dir, run_dir, address=record.address, host_name=record.name,
                                        public_key=self.key_file.with_suffix(".pub"))
            log_file = ssh_dir / "sshd.log"
            if record.is_libvirt_host:
                argv = [*self._nsenter(record), *sshd.sshd_argv(config, log_file)]
            else:
                argv = sshd.client_argv(self._nsenter(record), run_dir, config, log_file)
            log.info("starting sshd on %s", record.name)
            sshd.start(argv, run_dir=run_dir, netns=netns_file, log_file=log_file, host_name=record.name)

    def _inventory(self, state: LabState) -> Inventory:
        hosts = []
        for record in sorted(state.hosts, key=_host_order):
            hosts.append(InventoryHost(
                name=record.name, role="libvirt" if record.is_libvirt_host else "client",
                address=record.address, port=sshd.SSH_PORT, user=sshd.SSH_USER,
                key_file=str(self.key_file.relative_to(self.root)),
                libvirt_uri=DEFAULT_LIBVIRT_URI if record.is_libvirt_host else None,
                lab_address=record.address,
                migration_interface=GUEST_BRIDGE if record.is_libvirt_host else HOST_LINK))
        network = NetworkSection(subnet=str(self.network),
                                 guest_address=f"{self.guest_address()}/{self.network.prefixlen}",
                                 guest_bridge=GUEST_BRIDGE)
        return Inventory(name=self.prefix, network=network, hosts=hosts, image_dir=str(paths.image_dir()),
                         known_hosts=str((self.ssh_dir / "known_hosts").relative_to(self.root)),
                         control_netns=self.netns_name(CLIENT))

    def _write_inventory(self, state: LabState) -> None:
        header = (f"# Inventory of the local lab {self.prefix}, written by 'migrlab lab up'.\n"
                  "# The harness reaches the hosts' sshds from the client's network namespace\n"
                  "# (control_netns). Relative paths start at this file's folder.\n")
        text = render_inventory(self._inventory(state), header)
        if not self.inventory_file.is_file() or self.inventory_file.read_text() != text:
            write_inventory(self.inventory_file, text)

    # Removal.

    def _unmount_all(self, failures: list[str]) -> list[str]:
        """Unmount everything at or below the lab directory, deepest first."""
        removed = []
        for point in mount_points_under(self.root):
            result = run(["umount", point], check=False)
            if result.returncode != 0:
                log.warning("umount %s failed (%s), detaching it lazily", point, tail(result.stderr))
                result = run(["umount", "--lazy", point], check=False)
            if result.returncode == 0:
                removed.append(f"mount {point}")
            else:
                failures.append(f"cannot unmount {point}: {tail(result.stderr)}")
        return removed

    def _remove_files(self, failures: list[str]) -> list[str]:
        """Delete the lab's files and its directory if no mount is left below it."""
        if not self.root.exists():
            return []
        left = mount_points_under(self.root)
        if left:
            failures.append(f"kept {self.root} because these are still mounted below it: {', '.join(left)}")
            return []
        # "shared" and "qmp" are the save images and QMP sockets that the runner keeps in the lab directory.
        for name in ("hosts", "ns", "ssh", "shared", "qmp"):
            if (self.root / name).exists():
                shutil.rmtree(self.root / name)
        for name in ("lab.json", "lab.json.tmp", "lab.lock", "inventory.yaml", "inventory.yaml.tmp"):
            (self.root / name).unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError as error:
            failures.append(f"kept {self.root}: {error.strerror} (it contains files the lab did not make: "
                            f"{', '.join(sorted(os.listdir(self.root)))})")
            return [f"files of {self.root}"]
        return [f"directory {self.root}"]
