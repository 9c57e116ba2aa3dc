"""Guest domains: XML, boot, ownership marks and removal.

Every domain the harness creates carries two marks: a name that starts with
``mlab-`` and a metadata element in the harness's own XML namespace holding
the run it belongs to. Functions that stop, destroy or migrate a domain
check both marks first, so a domain someone else created is never touched,
even when its name collides.

The metadata element also names the controlling machine, the one that runs
migrlab, so that ``migrlab clean --inventory`` on servers shared by several
people removes only the guests of the machine it runs on. Marks written
before the element had that attribute read as an unknown controller.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from lab.errors import LabError, OwnershipError
from lab.paths import state_dir

log = logging.getLogger(__name__)

NAME_PREFIX = "mlab-"
OWNER_NAMESPACE = "urn:x-migration-lab:owner:1"
OWNER_PREFIX = "migrlab"
# Sources of the machine's identity, in order: systemd's and D-Bus's machine ID.
MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
# Fixed key of the keyed hash that turns the machine ID into the controller
# ID. machine-id(5) (systemd 254) requires applications to expose only such a
# hash, never the machine ID itself, and anyone with libvirt access to a host
# can read the mark.
CONTROLLER_HASH_KEY = b"migration-lab controller 1"
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")
# Console log path inside each host; every host binds its own private
# /var/log/libvirt, so the same path names a different file on each host.
CONSOLE_DIR = "/var/log/libvirt/qemu"
# libvirt's cache modes that the harness uses for a guest disk: none (O_DIRECT)
# where the filesystem allows it, else writeback.
DISK_CACHE_MODES = ("none", "writeback")
# The guest sees its disk as /dev/vda.
DISK_TARGET = "vda"


@dataclass(frozen=True)
class DiskSpec:
    """The guest's disk: a raw file that the guest sees as /dev/vda (virtio-blk).

    ``cache`` is libvirt's cache mode. "none" opens the file with O_DIRECT,
    which migration without copying needs, because the destination must not
    read stale pages from a host page cache.
    """

    path: str
    cache: str = "none"

    def __post_init__(self) -> None:
        if self.cache not in DISK_CACHE_MODES:
            raise LabError(f"disk cache mode {self.cache!r} is not one of {', '.join(DISK_CACHE_MODES)}")
        if not self.path.startswith("/"):
            raise LabError(f"disk path {self.path!r} must be absolute, as the host's QEMU opens it")


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to write the domain XML of one guest."""

    name: str
    run_id: str
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    accelerator: str  # "kvm" or "tcg"
    bridge: str | None = "br0"
    mac: str | None = None
    nic_model: str = "e1000"
    disk: DiskSpec | None = None
    # A guest that never runs, such as a paused probe, needs no console file.
    serial_console: bool = True
    # Controller ID and host name written into the ownership mark, this
    # machine's unless given. A None controller writes a mark without both,
    # as migrlab did before these fields.
    controller: str | None = field(default_factory=lambda: controller_id())
    controller_host: str | None = field(default_factory=socket.gethostname)

    @property
    def console_path(self) -> str:
        return console_log_path(self.name)


def console_log_path(guest_name: str) -> str:
    """Return the path of a guest's serial console log inside its host."""
    return f"{CONSOLE_DIR}/{guest_name}-console.log"


def qemu_log_path(guest_name: str) -> str:
    """Return the path of libvirt's log of a guest's QEMU inside its host."""
    return f"{CONSOLE_DIR}/{guest_name}.log"


@dataclass(frozen=True)
class OwnerMark:
    """The harness's ownership mark of a domain.

    ``controller`` is the ID of the machine that ran migrlab and created the
    domain, and ``controller_host`` that machine's host name, for people to
    read. Both are None in marks written before the harness recorded them.
    """

    run: str
    controller: str | None = None
    controller_host: str | None = None


def read_controller_id(machine_id_files: tuple[Path, ...] = MACHINE_ID_FILES,
                       fallback_file: Path | None = None) -> str:
    """Derive this machine's controller ID: 32 hex digits of HMAC-SHA256 of the machine ID.

    The machine ID comes from the first of *machine_id_files* that contains one.
    A machine without any (some containers) gets a random ID, stored in
    *fallback_file* (``controller-id`` in the state folder) and read from
    there afterwards.
    """
    for path in machine_id_files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if _MACHINE_ID.match(text) and text != "0" * 32:
            digest = hmac.new(CONTROLLER_HASH_KEY, bytes.fromhex(text), hashlib.sha256).hexdigest()
            return digest[:32]
    fallback = fallback_file or state_dir() / "controller-id"
    try:
        stored = fallback.read_text().strip()
    except OSError:
        stored = ""
    if _MACHINE_ID.match(stored):
        return stored
    generated = secrets.token_hex(16)
    try:
        fallback.parent.mkdir(parents=True, exist_ok=True)
        fallback.write_text(generated + "\n")
    except OSError as error:
        raise LabError(f"no machine ID in {', '.join(map(str, machine_id_files))}, and storing a random "
                       f"controller ID in {fallback} failed: {error}; create a machine ID with "
                       "systemd-machine-id-setup, or make that folder writable") from error
    log.info("no machine ID in %s; stored the random controller ID %s in %s",
             ", ".join(map(str, machine_id_files)), generated, fallback)
    return generated


@functools.cache
def controller_id() -> str:
    """Return this machine's controller ID, read once per process."""
    return read_controller_id()


def guest_mac(index: int) -> str:
    """Return a locally administered MAC address for guest number *index*."""
    return f"52:54:00:6d:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def domain_xml(spec: GuestSpec) -> str:
    """Build the domain XML of a guest booted from kernel and initramfs, with or without a disk."""
    if not spec.name.startswith(NAME_PREFIX):
        raise LabError(f"guest name {spec.name!r} must start with {NAME_PREFIX!r}")
    domain_type = "kvm" if spec.accelerator == "kvm" else "qemu"
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = spec.name
    ET.SubElement(root, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(root, "vcpu").text = str(spec.vcpus)

    metadata = ET.SubElement(root, "metadata")
    owner = ET.SubElement(metadata, f"{{{OWNER_NAMESPACE}}}owner")
    owner.set("run", spec.run_id)
    if spec.controller is not None:
        owner.set("controller", spec.controller)
        if spec.controller_host is not None:
            owner.set("controller-host", spec.controller_host)

    os_element = ET.SubElement(root, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_element, "kernel").text = str(spec.kernel)
    ET.SubElement(os_element, "initrd").text = str(spec.initrd)
    ET.SubElement(os_element, "cmdline").text = spec.cmdline

    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    if domain_type == "qemu":
        # Both hosts run the same QEMU, so the default TCG model migrates; naming
        # it keeps the guest CPU identical whatever QEMU's default becomes.
        cpu = ET.SubElement(root, "cpu", mode="custom", match="exact")
        ET.SubElement(cpu, "model", fallback="forbid").text = "qemu64"
    ET.SubElement(root, "clock", offset="utc")
    ET.SubElement(root, "on_poweroff").text = "destroy"
    ET.SubElement(root, "on_reboot").text = "destroy"
    # A crashed guest stays for inspection instead of vanishing.
    ET.SubElement(root, "on_crash").text = "preserve"

    devices = ET.SubElement(root, "devices")
    if spec.serial_console:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=spec.console_path)
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="file")
        ET.SubElement(console, "source", path=spec.console_path)
        ET.SubElement(console, "target", type="serial", port="0")
    if spec.disk is not None:
        _add_disk(devices, spec.disk)
    if spec.bridge:
        interface = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(interface, "source", bridge=spec.bridge)
        if spec.mac:
            ET.SubElement(interface, "mac", address=spec.mac)
        ET.SubElement(interface, "model", type=spec.nic_model)
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")

    ET.register_namespace(OWNER_PREFIX, OWNER_NAMESPACE)
    return ET.tostring(root, encoding="unicode")


def _add_disk(devices: ET.Element, disk: DiskSpec) -> None:
    disk_element = ET.SubElement(devices, "disk", type="file", device="disk")
    driver = ET.SubElement(disk_element, "driver", name="qemu", type="raw", cache=disk.cache)
    if disk.cache == "none":
        # Linux native AIO needs O_DIRECT, which cache=none gives.
        driver.set("io", "native")
    ET.SubElement(disk_element, "source", file=disk.path)
    ET.SubElement(disk_element, "target", dev=DISK_TARGET, bus="virtio")


def owner_mark(dom: libvirt.virDomain) -> OwnerMark | None:
    """Return the harness's ownership mark of *dom*, or None when the name or the metadata element is missing."""
    if not dom.name().startswith(NAME_PREFIX):
        return None
    try:
        element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, OWNER_NAMESPACE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    owner = ET.fromstring(element)
    run = owner.get("run")
    if run is None:
        return None
    return OwnerMark(run=run, controller=owner.get("controller"), controller_host=owner.get("controller-host"))


def owner_run(dom: libvirt.virDomain) -> str | None:
    """Return the run id in the harness's ownership mark, or None without a mark."""
    mark = owner_mark(dom)
    return None if mark is None else mark.run


def require_owned(dom: libvirt.virDomain) -> str:
    """Return the owning run id, or raise OwnershipError for a foreign domain."""
    run = owner_run(dom)
    if run is None:
        raise OwnershipError(
            f"domain {dom.name()!r} has no migration-lab ownership mark, so the harness "
            "will not stop, destroy or migrate it. Rename or remove it yourself if it is in the way.")
    return run


def owned_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """List the domains on *conn* that carry the harness's ownership mark."""
    return [dom for dom in conn.listAllDomains() if owner_run(dom) is not None]


def boot(conn: libvirt.virConnect, spec: GuestSpec) -> libvirt.virDomain:
    """Start a transient guest; refuse if a domain of that name already exists."""
    try:
        existing = conn.lookupByName(spec.name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    else:
        require_owned(existing)
        raise LabError(f"guest {spec.name!r} already runs on {conn.getHostname()}; "
                       "remove leftovers with 'migrlab clean', adding --inventory INVENTORY for an inventory's hosts")
    log.debug("booting %s on %s", spec.name, conn.getURI())
    return conn.createXML(domain_xml(spec), 0)


def destroy(dom: libvirt.virDomain, *, grace_s: float = 5.0) -> None:
    """Destroy an owned domain; a domain already gone counts as destroyed.

    ``VIR_DOMAIN_DESTROY_GRACEFUL`` sends SIGTERM only; after *grace_s* the
    plain destroy sends SIGKILL, because a QEMU paused in postcopy ignores
    SIGTERM.
    """
    try:
        require_owned(dom)
        dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        return
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return
        log.debug("graceful destroy of %s failed: %s", dom.name(), exc)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if not dom.isActive():
                return
            dom.destroy()
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return
            log.debug("destroy of %s failed, retrying: %s", dom.name(), exc)
            time.sleep(0.5)
    raise LabError(f"could not destroy guest {dom.name()!r} within {grace_s:.0f} s; "
                   "run 'migrlab lab down' to kill the lab's processes")
