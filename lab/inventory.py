"""Inventory: the hosts of a lab, how to reach them over SSH, and the lab network.

An inventory is a YAML file. Each host has a name, a role (``libvirt`` for a
host that runs guests, ``client`` for a host that only runs probes), the
address and port of its SSH server, the SSH user and private key file, the
libvirt URI that the host itself uses (``qemu:///system``), and its address
on the lab network, which carries the migration traffic. The local lab
writes its own inventory in the same format into its lab directory.

Relative paths (``key_file``, ``known_hosts``) are relative to the folder of
the inventory file. The loader reports every problem with the file, the line,
the field path, the value and the fix, like the playbook loader.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from lab.errors import ConfigError
from lab.playbook import (ConfigFileError, _file_error, _plain, _Problem, _pydantic_problems, _read_yaml,
                          _run_semantic_checks)

log = logging.getLogger(__name__)

INVENTORY_VERSION = 1
DEFAULT_IMAGE_DIR = "/var/lib/migrlab/images"
DEFAULT_LIBVIRT_URI = "qemu:///system"

Role = Literal["libvirt", "client"]
HostName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=32)]

_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)

# A DNS name as RFC 1123 allows it: dot-separated labels of letters, digits
# and inner hyphens. A leading hyphen is rejected, so an address can never
# be read as an option by ssh or another tool.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
# A POSIX user name as Debian's adduser accepts it by default.
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
# A Linux interface name: at most 15 bytes (IFNAMSIZ - 1), no '/' or white space.
_INTERFACE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_NETNS = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


class InventoryError(ConfigFileError):
    """All problems found in one inventory."""

    kind = "inventory"


class InventoryHost(BaseModel):
    """One host of the lab and how the harness reaches it."""

    model_config = _CONFIG

    name: HostName
    role: Role
    # SSH server address (IP address or DNS name) and port.
    address: str
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: str
    # Private key for SSH, which must not need a passphrase.
    key_file: str
    # libvirt URI that the host itself uses, which the harness reaches over SSH.
    # None for a client, "qemu:///system" for a libvirt host unless given.
    libvirt_uri: str | None = None
    # Address of the host on the lab network: the migration stream goes to it.
    lab_address: str
    # Interface that carries lab_address, found on the host when not given.
    migration_interface: str | None = None
    # Run the root commands of faults (ip, kill, tc, systemctl) through
    # 'sudo -n', for an SSH user that is not root.
    sudo: bool = False

    @property
    def is_libvirt_host(self) -> bool:
        return self.role == "libvirt"

    @property
    def local_libvirt_uri(self) -> str | None:
        """The libvirt URI on the host itself, with the default filled in for libvirt hosts."""
        if not self.is_libvirt_host:
            return None
        return self.libvirt_uri or DEFAULT_LIBVIRT_URI

    @property
    def migration_uri(self) -> str:
        """QEMU's migration URI on the lab network, which never depends on name resolution."""
        address = ipaddress.ip_address(self.lab_address)
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"tcp://{host}"


class NetworkSection(BaseModel):
    """The lab network: it carries migration traffic and the guest's own address."""

    model_config = _CONFIG

    subnet: str
    # Guest address with prefix length, such as 10.77.0.100/24, which moves with the guest.
    guest_address: str
    # Bridge on every libvirt host that guests attach to; it must reach the lab network.
    guest_bridge: str = "br0"


class Inventory(BaseModel):
    """A validated inventory. Build it with load_inventory() to resolve relative paths."""

    model_config = _CONFIG

    version: Literal[1] = INVENTORY_VERSION
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
    network: NetworkSection
    hosts: Annotated[list[InventoryHost], Field(min_length=1)]
    # Folder of guest images on every libvirt host. The domain XML names the
    # kernel and initramfs by path, and the destination QEMU opens the same
    # paths, so the folder is the same on every host.
    image_dir: str = DEFAULT_IMAGE_DIR
    # Pinned SSH host keys, in OpenSSH known_hosts format.
    known_hosts: str = "known_hosts"
    # Network namespace that the harness opens its SSH connections from. The
    # local lab sets its client's namespace, because the machine's own
    # namespace has no route to the lab network. Absent for real servers.
    control_netns: str | None = None
    # Largest clock offset between the harness and a host that preflight accepts.
    clock_tolerance_ms: Annotated[int, Field(gt=0)] = 100
    connect_timeout_s: Annotated[int, Field(gt=0)] = 10

    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_values(self, info: ValidationInfo) -> Inventory:
        return _run_semantic_checks(self, info, lambda: inventory_problems(self, base_dir=None))

    @property
    def path(self) -> Path | None:
        """File the inventory was loaded from, or None when built in code."""
        return self._path

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths start from: the inventory's folder, else the working folder."""
        return self._path.parent if self._path is not None else Path.cwd()

    def resolve(self, relative: str) -> Path:
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @property
    def known_hosts_path(self) -> Path:
        return self.resolve(self.known_hosts)

    def key_path(self, host: InventoryHost) -> Path:
        return self.resolve(host.key_file)

    @property
    def libvirt_hosts(self) -> list[InventoryHost]:
        """The libvirt hosts in file order; the first is the source of every run, the second the destination."""
        return [host for host in self.hosts if host.is_libvirt_host]

    def migration_hosts(self) -> tuple[InventoryHost, InventoryHost]:
        """Return the source and destination of every run: the first two libvirt hosts.

        Raises ConfigError when the inventory has fewer than two libvirt hosts.
        """
        hosts = self.libvirt_hosts
        if len(hosts) < 2:
            raise ConfigError(f"a migration needs two libvirt hosts, found {len(hosts)}",
                              path=str(self._path) if self._path else None, field="hosts",
                              value=[host.name for host in hosts], fix="List two hosts with role: libvirt")
        return hosts[0], hosts[1]

    def host(self, name: str) -> InventoryHost:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(host.name for host in self.hosts)
        raise ConfigError(f"host {name!r} not found in the inventory", path=str(self._path or ""),
                          field="hosts", value=name, fix=f"Use one of: {known}")

    @property
    def guest_interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.network.guest_address)

    def remote_libvirt_uri(self, host: InventoryHost) -> str:
        """Return the libvirt URI that reaches ``host`` over SSH from the harness.

        libvirt's ``ssh`` transport (11.3) passes ``keyfile`` to the ssh
        command but not ``known_hosts``, so the URI uses the ``libssh``
        transport, which checks the host key against the lab's known_hosts
        (``known_hosts_verify=normal`` rejects unknown and changed keys).
        """
        local = urlsplit(host.local_libvirt_uri or DEFAULT_LIBVIRT_URI)
        address = host.address
        if ":" in address:
            address = f"[{address}]"
        netloc = f"{quote(host.user, safe='')}@{address}:{host.port}"
        params = parse_qsl(local.query, keep_blank_values=True)
        params += [
            ("keyfile", str(self.key_path(host))),
            ("known_hosts", str(self.known_hosts_path)),
            ("known_hosts_verify", "normal"),
            ("sshauth", "privkey"),
        ]
        query = urlencode(params, quote_via=quote, safe="/")
        return f"{local.scheme}+libssh://{netloc}{local.path}?{query}"


def _address_problem(value: str) -> str | None:
    """Return why ``value`` is not an IP address or DNS name, or None."""
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", value):
        return "invalid IPv4 address"
    if not _HOSTNAME.match(value):
        return "invalid address: neither an IP address nor a DNS name"
    return None


def _subnet(inventory: Inventory) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(inventory.network.subnet, strict=True)
    except ValueError:
        return None


def _network_problems(inventory: Inventory) -> list[_Problem]:
    problems = []
    network = inventory.network
    subnet = _subnet(inventory)
    if subnet is None:
        problems.append(_Problem(("network", "subnet"), "invalid network", network.subnet,
                                 "Give the network address with its prefix length, such as 10.77.0.0/24"))
    try:
        guest = ipaddress.ip_interface(network.guest_address)
    except ValueError:
        problems.append(_Problem(("network", "guest_address"), "invalid address with prefix length",
                                 network.guest_address, "Give a free address of the subnet with its prefix "
                                                        "length, such as 10.77.0.100/24"))
    else:
        if subnet is not None and guest.network != subnet:
            problems.append(_Problem(("network", "guest_address"), f"not an address of the subnet {subnet}",
                                     network.guest_address,
                                     f"Use a free address of {subnet} with the prefix length /{subnet.prefixlen}"))
        taken = {host.lab_address for host in inventory.hosts}
        if str(guest.ip) in taken:
            problems.append(_Problem(("network", "guest_address"), "is also the lab address of a host",
                                     network.guest_address, "Give the guest an address that no host uses"))
    if not _INTERFACE.match(network.guest_bridge):
        problems.append(_Problem(("network", "guest_bridge"), "invalid interface name", network.guest_bridge,
                                 "Use the name of the bridge on the libvirt hosts, at most 15 characters"))
    return problems


def _host_problems(inventory: Inventory, index: int, host: InventoryHost,
                   base_dir: Path | None) -> list[_Problem]:
    problems = []
    at = ("hosts", index)
    subnet = _subnet(inventory)

    reason = _address_problem(host.address)
    if reason:
        problems.append(_Problem((*at, "address"), reason, host.address,
                                 "Give the SSH server's IP address or DNS name"))
    if not _USER.match(host.user):
        problems.append(_Problem((*at, "user"), "invalid user name", host.user,
                                 "Give the login name of the SSH user, such as root"))

    try:
        lab_address = ipaddress.ip_address(host.lab_address)
    except ValueError:
        problems.append(_Problem((*at, "lab_address"), "invalid IP address", host.lab_address,
                                 "Give the host's address on the lab network, such as 10.77.0.11"))
    else:
        if subnet is not None and (lab_address not in subnet or lab_address in (subnet.network_address,
                                                                               subnet.broadcast_address)):
            problems.append(_Problem((*at, "lab_address"), f"not a host address of the lab network {subnet}",
                                     host.lab_address, f"Give the host's address in {subnet}, or correct "
                                                       "network.subnet"))

    if host.migration_interface is not None and not _INTERFACE.match(host.migration_interface):
        problems.append(_Problem((*at, "migration_interface"), "invalid interface name",
                                 host.migration_interface, "Use a Linux interface name of at most 15 "
                                                           "characters, or remove the key to detect it"))
    problems += _libvirt_uri_problems(at, host)

    if base_dir is not None:
        key = Path(host.key_file).expanduser()
        key = key if key.is_absolute() else base_dir / key
        if not key.is_file():
            problems.append(_Problem((*at, "key_file"), "key file not found", host.key_file,
                                     f"Create a key pair with: ssh-keygen -t ed25519 -N '' -f {key}, and add "
                                     "the .pub file to the host's authorized_keys, or correct the path "
                                     "(relative paths start at the inventory's folder)"))
    return problems


def _libvirt_uri_problems(at: tuple[str | int, ...], host: InventoryHost) -> list[_Problem]:
    if host.libvirt_uri is None:
        return []
    if not host.is_libvirt_host:
        return [_Problem((*at, "libvirt_uri"), "a client host runs no libvirtd", host.libvirt_uri,
                         "Remove libvirt_uri, or set role: libvirt")]
    uri = urlsplit(host.libvirt_uri)
    if uri.scheme != "qemu" or uri.netloc or uri.path not in ("/system", "/session"):
        return [_Problem((*at, "libvirt_uri"), "must be the URI that the host itself uses, without "
                                               "transport or host name", host.libvirt_uri,
                         "Use qemu:///system; the harness reaches it over SSH with the host's address, "
                         "user and key_file")]
    return []


def _duplicate_problems(inventory: Inventory) -> list[_Problem]:
    problems = []
    checks = (("name", lambda host: host.name, "Give each host a unique name"),
              ("lab_address", lambda host: host.lab_address, "Give each host its own lab address"),
              ("address", lambda host: (host.address, host.port),
               "Each host needs its own SSH server; two entries for one server make libvirt reject "
               "the migration as a migration to the same host"))
    for field, key, fix in checks:
        seen: dict[Any, int] = {}
        for index, host in enumerate(inventory.hosts):
            value = key(host)
            if value in seen:
                problems.append(_Problem(("hosts", index, field), f"duplicate of hosts[{seen[value]}].{field}",
                                         getattr(host, field), fix))
            else:
                seen[value] = index
    return problems


def inventory_problems(inventory: Inventory, base_dir: Path | None) -> list[_Problem]:
    """Check what the types alone do not: addresses, uniqueness, roles and files.

    With ``base_dir`` None, key files are not looked up.
    """
    problems = _network_problems(inventory)
    for index, host in enumerate(inventory.hosts):
        problems += _host_problems(inventory, index, host, base_dir)
    problems += _duplicate_problems(inventory)

    if not any(host.is_libvirt_host for host in inventory.hosts):
        problems.append(_Problem(("hosts",), "no host has role: libvirt", None,
                                 "List at least one host with role: libvirt, and two to run migrations"))
    image_dir = PurePosixPath(inventory.image_dir)
    if not image_dir.is_absolute() or ".." in image_dir.parts:
        problems.append(_Problem(("image_dir",), "must be an absolute path without '..'", inventory.image_dir,
                                 f"Use a folder such as {DEFAULT_IMAGE_DIR}"))
    if inventory.control_netns is not None and not _NETNS.match(inventory.control_netns):
        problems.append(_Problem(("control_netns",), "invalid network namespace name", inventory.control_netns,
                                 "Give a name listed by 'ip netns list', or remove the key for real servers"))
    return problems


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory.

    Raises InventoryError, a ConfigError, listing every problem found, each
    with file, line, field path, value and fix.
    """
    path = Path(path)
    where = str(path)
    _data, document = _read_yaml(path, "inventory", "Check the path; the local lab writes its inventory to "
                                                    "inventory.yaml in its lab directory")
    if document is None:
        raise ConfigError("inventory is empty", path=where, fix="List the lab's hosts under 'hosts'")
    if not isinstance(document, CommentedMap):
        raise ConfigError("top level must be a mapping of keys such as network and hosts",
                          path=where, line=1, value=type(document).__name__)

    raw = _plain(document)
    problems: list[_Problem] = []
    inventory = None
    try:
        inventory = Inventory.model_validate(raw, context={"skip_semantic_checks": True})
    except ValidationError as exc:
        problems += _pydantic_problems(exc, root=Inventory)
    if inventory is not None:
        problems += inventory_problems(inventory, base_dir=path.parent)
    if problems:
        raise _file_error(InventoryError, problems, document, where)

    inventory._path = path.resolve()
    log.debug("loaded inventory %s: %d hosts", path, len(inventory.hosts))
    return inventory


HEADER = """\
# Inventory of the lab {name}: its hosts, how the harness reaches them over
# SSH, and the lab network that carries the migration traffic.
# Relative paths start at this file's folder.
"""


def render_inventory(inventory: Inventory, header: str | None = None) -> str:
    """Return the inventory as YAML text, with a comment header."""
    data = inventory.model_dump(mode="json", exclude_none=True)
    # The round-trip dumper keeps the key order of the models.
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    stream = io.StringIO()
    yaml.dump(data, stream)
    return (header if header is not None else HEADER.format(name=inventory.name)) + stream.getvalue()


def write_inventory(path: Path, text: str) -> None:
    """Write inventory text atomically: a crash leaves the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
