"""The hosts an experiment runs on, picked from an inventory and reached over SSH or through namespaces.

A playbook's ``inventory`` value (or ``migrlab run --inventory``) selects the lab:

``local``
    the local lab, brought up as needed and reached through its namespaces
    and libvirt's unix sockets: the fast path, with no SSH involved;
``local-ssh``
    the local lab, reached through the SSH servers of its hosts exactly
    like real servers;
any other value
    the path of an inventory file, reached over SSH.

Either way the source of every run is the inventory's first libvirt host
and the destination its second.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import libvirt

from lab import domain
from lab.errors import ConfigError, HostError
from lab.events import open_connection
from lab.guest.image import GuestImage
from lab.hosts import shaping
from lab.hosts.figures import HostSampler
from lab.hosts.image_push import image_missing, local_checksums, remote_paths
from lab.hosts.local import LocalLab
from lab.hosts.remote import RemoteHost
from lab.hosts.shell import HostFile, NamespaceShell, Shell
from lab.inventory import Inventory, InventoryHost, load_inventory
from lab.paths import state_dir
from lab.playbook import Playbook

log = logging.getLogger(__name__)

LOCAL = "local"
LOCAL_SSH = "local-ssh"
COMMAND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LabChoice:
    """The lab an experiment runs on and the way the harness reaches it."""

    transport: Literal["namespaces", "ssh"]
    # True for the local lab, which the runner brings up, False for an inventory file.
    local: bool
    # The inventory file, or None for the local lab, whose inventory exists once it is up.
    inventory_path: Path | None = None

    @property
    def label(self) -> str:
        if self.local:
            return LOCAL if self.transport == "namespaces" else LOCAL_SSH
        return str(self.inventory_path)


def choose_lab(playbook: Playbook, override: str | None = None) -> LabChoice:
    """Resolve the playbook's inventory value, or ``override``, into a LabChoice.

    A relative inventory path in the playbook starts at the playbook's
    folder, one given as ``override`` at the working folder. Raises
    ConfigError for a file that does not exist.
    """
    value = override if override is not None else playbook.inventory
    if value == LOCAL:
        return LabChoice("namespaces", local=True)
    if value == LOCAL_SSH:
        return LabChoice("ssh", local=True)
    path = Path(value).expanduser()
    if not path.is_absolute() and override is None and playbook.path is not None:
        path = playbook.path.parent / path
    if not path.is_file():
        raise ConfigError("inventory file not found", path=str(playbook.path) if override is None else None,
                          field="inventory" if override is None else "--inventory", value=value,
                          fix=f"Give the path of an inventory file (relative to the playbook's folder), "
                              f"'{LOCAL}' for the local lab, or '{LOCAL_SSH}' for the local lab over SSH")
    return LabChoice("ssh", local=False, inventory_path=path.resolve())


@dataclass
class RunHost:
    """A libvirt host as a run uses it: its libvirt, its guest consoles and a shell."""

    name: str
    entry: InventoryHost
    libvirt_uri: str
    migration_uri: str
    guest_bridge: str
    migration_interface: str
    shell: Shell
    _connect: Callable[[], libvirt.virConnect]
    # Maps a path inside the host to a Path on this machine or a file read over SSH.
    _host_file: Callable[[str], Path | HostFile]

    def connect(self) -> libvirt.virConnect:
        return self._connect()

    def console_file(self, guest_name: str) -> Path | HostFile:
        """Return the console log of a guest on this host, as a Path or a file read over SSH."""
        return self._host_file(domain.console_log_path(guest_name))

    def qemu_log_file(self, guest_name: str) -> Path | HostFile:
        """Return libvirt's log of a guest's QEMU on this host: its command line and what QEMU printed."""
        return self._host_file(domain.qemu_log_path(guest_name))


def detect_interface(shell: Shell, address: str) -> str:
    """Return the interface that carries ``address`` on the host."""
    result = shell.run(["ip", "-j", "address", "show"], timeout=COMMAND_TIMEOUT_S)
    try:
        links = json.loads(result.stdout or "[]")
    except json.JSONDecodeError as error:
        raise HostError(f"'ip -j address show' on host {shell.name} printed no JSON: {error}") from error
    for link in links:
        if any(info.get("local") == address for info in link.get("addr_info", [])):
            return str(link["ifname"])
    raise HostError(f"no interface of host {shell.name} has the lab address {address}; correct lab_address in "
                    "the inventory, or configure the address on the host")


class LabAccess:
    """The source and destination hosts of an experiment, with what the runner needs of the lab.

    ``close`` closes every SSH connection; it is idempotent.
    """

    def __init__(self, choice: LabChoice, inventory: Inventory, source: RunHost, destination: RunHost,
                 local_lab: LocalLab | None, remotes: list[RemoteHost]):
        self.choice = choice
        self.inventory = inventory
        self.source = source
        self.destination = destination
        # The local lab when the experiment runs on it (either transport), for the client probes.
        self.local_lab = local_lab
        self._remotes = remotes

    @property
    def guest_address(self) -> str:
        """The guest's address with prefix length, such as 10.77.0.100/24."""
        return self.inventory.network.guest_address

    @property
    def accelerator_dir(self) -> Path:
        """Folder of the cached accelerator verdict: the machine's for the local lab, else per inventory host.

        The local lab's hosts run this machine's QEMU on this machine's
        /dev/kvm, so both of its transports share the machine's verdict.
        """
        if self.choice.local:
            return state_dir()
        return state_dir() / "accelerator" / self.inventory.name / self.source.name

    def image_paths(self, image: GuestImage) -> tuple[Path, Path]:
        """Return the kernel and initramfs paths as the libvirt hosts see them."""
        if self.choice.transport == "namespaces":
            return image.kernel, image.initrd
        paths = remote_paths(self.inventory, image)
        return Path(paths["vmlinuz"]), Path(paths["initrd.img"])

    def check_image(self, image: GuestImage) -> None:
        """Raise HostError unless both hosts have the guest image with this machine's checksums."""
        if self.choice.transport == "namespaces":
            return
        expected = local_checksums(image)
        for host in (self.source, self.destination):
            missing = image_missing(host.shell, self.inventory, image, expected)
            if missing:
                where = self.inventory.path or "INVENTORY"
                raise HostError(f"guest image {image.digest[:12]} is missing or differs on host {host.name} "
                                f"({', '.join(missing)}); copy it with: migrlab image push {where}")

    def platform(self) -> dict[str, str]:
        """Return the source host's kernel release and CPU model for the run records."""
        shell = self.source.shell
        kernel = shell.run(["uname", "-r"], timeout=COMMAND_TIMEOUT_S).stdout.strip()
        cpu_model = "unknown"
        for line in (shell.read_bytes("/proc/cpuinfo") or b"").decode(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        return {"host_kernel": kernel, "cpu_model": cpu_model}

    def link_targets(self) -> list[tuple[Shell, str]]:
        return [(host.shell, host.migration_interface) for host in (self.source, self.destination)]

    def shaped_link(self, rate_mib_s: int | None) -> shaping.LinkShaping:
        return shaping.LinkShaping(self.link_targets(), rate_mib_s)

    def sampler(self, guest_name: str, max_duration_s: float) -> HostSampler:
        targets = [(self.source.shell, "source", self.source.migration_interface),
                   (self.destination.shell, "destination", self.destination.migration_interface)]
        return HostSampler(targets, guest_name, max_duration_s)

    def close(self) -> None:
        for remote in self._remotes:
            remote.close()


def lock_name(choice: LabChoice, local_lab: LocalLab) -> str:
    """Name of the experiment lock: the local lab's prefix, else the inventory's name.

    The local lab names its inventory after its prefix, so every way of
    reaching one local lab takes the same lock.
    """
    if choice.local:
        return local_lab.prefix
    assert choice.inventory_path is not None
    return load_inventory(choice.inventory_path).name


def _namespace_host(local_lab: LocalLab, entry: InventoryHost, inventory: Inventory) -> RunHost:
    info = local_lab.host(entry.name)
    assert info.libvirt_uri is not None
    uri = info.libvirt_uri
    return RunHost(
        name=entry.name, entry=entry, libvirt_uri=uri, migration_uri=entry.migration_uri,
        guest_bridge=inventory.network.guest_bridge,
        migration_interface=entry.migration_interface or info.guest_bridge or "br0",
        shell=NamespaceShell(local_lab, entry.name), _connect=lambda: open_connection(uri),
        _host_file=lambda inside: local_lab.outside_path(entry.name, inside))


def _ssh_host(remote: RemoteHost, inventory: Inventory) -> RunHost:
    entry = remote.host
    remote.connect()
    interface = entry.migration_interface or detect_interface(remote, entry.lab_address)
    return RunHost(
        name=entry.name, entry=entry, libvirt_uri=remote.libvirt_uri, migration_uri=entry.migration_uri,
        guest_bridge=inventory.network.guest_bridge, migration_interface=interface, shell=remote,
        _connect=remote.open_libvirt, _host_file=lambda inside: HostFile(remote, inside))


def open_access(choice: LabChoice, local_lab: LocalLab, *, hosts: int = 2) -> LabAccess:
    """Bring up the local lab if chosen, load the inventory and reach the source and destination.

    Over SSH, this connects to both hosts, which pins their host keys on
    first use. Raises HostError, HostKeyChangedError or ConfigError.
    """
    if choice.local:
        local_lab.up(hosts=hosts)
        inventory = load_inventory(local_lab.inventory_file)
    else:
        assert choice.inventory_path is not None
        inventory = load_inventory(choice.inventory_path)
    source_entry, destination_entry = inventory.migration_hosts()

    if choice.transport == "namespaces":
        source = _namespace_host(local_lab, source_entry, inventory)
        destination = _namespace_host(local_lab, destination_entry, inventory)
        access = LabAccess(choice, inventory, source, destination, local_lab, [])
    else:
        remotes = [RemoteHost(source_entry, inventory), RemoteHost(destination_entry, inventory)]
        try:
            source, destination = (_ssh_host(remote, inventory) for remote in remotes)
        except BaseException:
            for remote in remotes:
                remote.close()
            raise
        access = LabAccess(choice, inventory, source, destination, local_lab if choice.local else None, remotes)
    log.info("lab %s over %s: source %s, destination %s", choice.label, choice.transport, source_entry.name,
             destination_entry.name)
    # A harness that was killed during a shaped run left its qdisc behind.
    shaping.clear(access.link_targets())
    return access
