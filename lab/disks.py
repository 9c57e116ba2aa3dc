"""The guest's disk in one run: created on the hosts before the guest boots, removed after it.

A playbook's ``guest.disk`` (scenario fields disk_size_mib and disk_storage)
gives the guest a raw disk file of that size, which it sees as /dev/vda.
The storage mode decides where the file lives:

shared
    one file in ``<lab>/shared/disks``, a folder that both hosts of the
    local lab see at the same path, so the migration moves only memory.
    Each host's qemu.conf lists ``<lab>/shared`` in shared_filesystems, so
    libvirt accepts the migration without VIR_MIGRATE_UNSAFE.
local
    one file in the source host's /var/lib/libvirt/images, which is private
    to each host of the local lab: the same path on the destination does
    not exist, and a plain migration fails.
copy
    the source's file as for local, and an empty file of the same size at
    the same path on the destination, which libvirt fills over NBD during
    the migration (VIR_MIGRATE_NON_SHARED_DISK).

The harness writes every byte of the source's file (QEMU's qemu-io, a fixed
pattern) before the guest boots, as a disk in use would be, so a copy moves
the whole disk rather than skipping holes. Files are removed after the run
on every host that got one, also after a failure or Ctrl-C; a file that was
already on a host is never touched.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab.domain import DiskSpec
from lab.errors import HostError, LabError
from lab.guest.console import scan_console
from lab.hosts.access import RunHost
from lab.records import DiskRecord

log = logging.getLogger(__name__)

# libvirt's default folder for disk images; the local lab binds a private
# /var/lib/libvirt into each host, so each host has its own.
LOCAL_IMAGES_DIR = "/var/lib/libvirt/images"
# Folder below the local lab's shared folder that contains shared disks.
SHARED_SUBDIR = "disks"
# Byte the harness fills the source's disk with ("m").
FILL_PATTERN = 0x6D
# qemu-io writes the disk in requests of this size, so its buffer stays small.
FILL_CHUNK_MIB = 64
COMMAND_TIMEOUT_S = 60.0
# Writing the disk: seconds allowed per MiB, on top of COMMAND_TIMEOUT_S.
FILL_TIMEOUT_S_PER_MIB = 0.5
# Free space that must remain on the host after the disk is written.
FREE_SPACE_MARGIN_MIB = 256
# libvirt 11.3 treats a file disk as shared only on a network or cluster
# filesystem (NFS, GFS2, OCFS2, CephFS, ...) or below a folder that the
# source host's qemu.conf lists in shared_filesystems. Otherwise it rejects
# the migration with "Unsafe migration: Migration without shared storage is
# unsafe", whatever the cache mode; seen with cache=none on ext4 in the local
# lab. The local lab lists its shared folder (lab.hosts.libvirtd.write_config).
# A shared folder that the hosts do not list needs VIR_MIGRATE_UNSAFE, and the
# run's record gives this reason.
UNSAFE_REASON = ("the shared folder is on a filesystem that libvirt does not recognize as shared storage and "
                 "the hosts' qemu.conf does not list it in shared_filesystems, so the harness declares the "
                 "migration safe with VIR_MIGRATE_UNSAFE")


def lab_problems(scenarios: Sequence[tuple[str, int | None]], local_lab: bool) -> list[str]:
    """Return why the lab cannot run the scenarios' disks: (scenario id, disk size) pairs.

    Disks need the local lab, because the harness creates its shared folder
    and its hosts' private folders. Both of its transports work.
    """
    with_disk = [scenario_id for scenario_id, size_mib in scenarios if size_mib is not None]
    if with_disk and not local_lab:
        # NOTE: the local and copy modes would only need a shell on each server,
        # but they have not been tried on real servers, and shared needs a
        # folder that both servers mount.
        return [f"guest disks need the local lab, whose shared and private folders the harness creates "
                f"(scenarios {', '.join(with_disk)})"]
    return []


@dataclass
class GuestDisk:
    """The disk of one guest: plan, creation on the hosts, removal, and its record."""

    storage: str
    size_mib: int
    guest_name: str
    source: RunHost
    destination: RunHost
    # The folder both hosts see, as they see it; needed for shared storage.
    shared_dir: Path | None = None
    # Folder of local and copy disks, as each host sees it.
    images_dir: str = LOCAL_IMAGES_DIR
    # The flushing strategy saves and restores the guest instead of calling
    # virDomainMigrate3, so no migration flag applies to its disk.
    save_restore: bool = False
    # Every host's qemu.conf lists shared_dir in shared_filesystems, as the
    # local lab's do, so libvirt accepts a shared disk without VIR_MIGRATE_UNSAFE.
    shared_dir_declared: bool = False
    cache: str = "none"
    destination_precreated: bool = False
    # (host, path) of every file the harness created, removed by remove().
    _created: list[tuple[RunHost, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.storage not in ("shared", "local", "copy"):
            raise LabError(f"unknown disk storage {self.storage!r}; expected shared, local or copy")
        if self.storage == "shared" and self.shared_dir is None:
            raise LabError("a shared disk needs a folder that both hosts see, which only the local lab has")

    @property
    def folder(self) -> str:
        if self.storage == "shared":
            return str(Path(self.shared_dir) / SHARED_SUBDIR)
        return self.images_dir

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.guest_name}.img"

    @property
    def unsafe(self) -> bool:
        """Whether the migration passes VIR_MIGRATE_UNSAFE for this disk."""
        return self.storage == "shared" and not self.save_restore and not self.shared_dir_declared

    def create(self) -> DiskSpec:
        """Create the disk file(s) of the storage mode and return the disk for the domain XML.

        Raises LabError when the file exists already on a host, when a host
        lacks the space, or when a command fails.
        """
        holders = [self.source, self.destination] if self.storage == "copy" else [self.source]
        others = [self.destination] if self.storage in ("local", "copy") else []
        for host in {id(host): host for host in holders + others}.values():
            if self._exists(host, self.path):
                raise LabError(f"disk file {self.path} already exists on host {host.name}; remove the "
                               "leftover with 'migrlab clean' or by hand")
        for host in holders:
            self._shell(host, ["mkdir", "-p", self.folder])
            self._check_space(host)
        self.cache = "none" if all(self._direct_io_works(host) for host in holders) else "writeback"

        self._make_file(self.source)
        self._fill(self.source)
        if self.storage == "copy":
            self._make_file(self.destination)
            self.destination_precreated = True
        log.info("disk of %s: %s, %d MiB at %s, cache=%s", self.guest_name, self.storage, self.size_mib,
                 self.path, self.cache)
        return DiskSpec(path=self.path, cache=self.cache)

    def remove(self) -> list[str]:
        """Remove every file the harness created; return those still there. Safe to call twice."""
        left = []
        for host, path in self._created:
            try:
                host.shell.run(["rm", "-f", "--", path], timeout=COMMAND_TIMEOUT_S)
                if self._exists(host, path):
                    left.append(f"{host.name}:{path}")
            except HostError as exc:
                log.error("removing disk file %s on %s failed: %s", path, host.name, exc)
                left.append(f"{host.name}:{path}")
        self._created = [(host, path) for host, path in self._created if f"{host.name}:{path}" in left]
        if self.storage == "shared":
            # The folder goes once it is empty; other runs' disks keep it.
            try:
                self.source.shell.run(["rmdir", "--ignore-fail-on-non-empty", "--", self.folder],
                                      timeout=COMMAND_TIMEOUT_S, check=False)
            except HostError as exc:
                log.warning("removing the folder %s on %s failed: %s", self.folder, self.source.name, exc)
        return left

    def record(self, source_console: str, destination_console: str, left_behind: list[str]) -> DiskRecord:
        """Build the run's disk record from the plan and the guest's console lines of each host."""
        source = scan_console(source_console)
        destination = scan_console(destination_console)
        return DiskRecord(storage=self.storage, size_mib=self.size_mib, path=self.path, cache=self.cache,
                          unsafe_flag=self.unsafe, unsafe_reason=UNSAFE_REASON if self.unsafe else None,
                          destination_precreated=self.destination_precreated,
                          writes_source=source.disk_writes, writes_destination=destination.disk_writes,
                          write_errors=source.disk_errors + destination.disk_errors, left_behind=left_behind)

    # -- steps on a host ---------------------------------------------------------

    def _shell(self, host: RunHost, argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
        result = host.shell.run(argv, timeout=timeout, check=False)
        if result.returncode != 0:
            raise LabError(f"preparing the guest disk failed on host {host.name}: {shlex.join(argv)} exited "
                           f"with status {result.returncode}: {(result.stderr or result.stdout).strip()[-300:]}")
        return result.stdout

    @staticmethod
    def _exists(host: RunHost, path: str) -> bool:
        return host.shell.run(["test", "-e", path], timeout=COMMAND_TIMEOUT_S, check=False).returncode == 0

    def _check_space(self, host: RunHost) -> None:
        output = self._shell(host, ["df", "-P", "-k", self.folder])
        try:
            available_mib = int(output.splitlines()[-1].split()[3]) // 1024
        except (IndexError, ValueError) as exc:
            raise LabError(f"cannot read the free space of {self.folder} on host {host.name} from df: "
                           f"{output!r}") from exc
        needed_mib = self.size_mib + FREE_SPACE_MARGIN_MIB
        if available_mib < needed_mib:
            raise LabError(f"host {host.name} has {available_mib} MiB free in {self.folder}, but a "
                           f"{self.size_mib} MiB disk needs {needed_mib} MiB there; lower guest.disk.size_mib "
                           "or free space")

    def _direct_io_works(self, host: RunHost) -> bool:
        """Return whether a file in the disk's folder opens with O_DIRECT, which cache=none needs."""
        probe = f"{self.folder}/.{self.guest_name}.direct-io-probe"
        self._created.append((host, probe))
        result = host.shell.run(["dd", "if=/dev/zero", f"of={probe}", "bs=4096", "count=1", "oflag=direct"],
                                timeout=COMMAND_TIMEOUT_S, check=False)
        host.shell.run(["rm", "-f", "--", probe], timeout=COMMAND_TIMEOUT_S, check=False)
        if result.returncode != 0:
            log.warning("O_DIRECT does not work in %s on host %s, so the disk uses cache=writeback: %s",
                        self.folder, host.name, result.stderr.strip()[-200:])
        return result.returncode == 0

    def _make_file(self, host: RunHost) -> None:
        self._created.append((host, self.path))
        self._shell(host, ["qemu-img", "create", "-q", "-f", "raw", self.path, f"{self.size_mib}M"])

    def _fill(self, host: RunHost) -> None:
        commands = []
        for start in range(0, self.size_mib, FILL_CHUNK_MIB):
            length = min(FILL_CHUNK_MIB, self.size_mib - start)
            commands += ["-c", f"write -q -P {FILL_PATTERN:#x} {start}M {length}M"]
        timeout = COMMAND_TIMEOUT_S + FILL_TIMEOUT_S_PER_MIB * self.size_mib
        self._shell(host, ["qemu-io", "-f", "raw", *commands, self.path], timeout=timeout)
