"""Copy the guest image to the libvirt hosts of an inventory, verified by SHA-256.

The image goes to ``<image_dir>/<digest>/`` on every host, the same path on
each, because a migrated domain names its kernel and initramfs by path. A
host whose files already have the right checksums is skipped. Each file is
copied under a temporary name, checked with sha256sum on the host and only
then renamed into place, so an interrupted copy never leaves a file with
the final name and the wrong content.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lab.errors import HostError
from lab.guest.image import GuestImage
from lab.hosts.remote import RemoteHost
from lab.hosts.shell import Shell
from lab.inventory import Inventory

log = logging.getLogger(__name__)

IMAGE_FILES = ("vmlinuz", "initrd.img", "manifest.json")
CHECKSUM_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PushResult:
    """Outcome of ``push_image`` on one host."""

    host: str
    action: Literal["present", "pushed", "failed"]
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str | None = None


def remote_directory(inventory: Inventory, image: GuestImage) -> str:
    return f"{inventory.image_dir.rstrip('/')}/{image.digest}"


def remote_paths(inventory: Inventory, image: GuestImage) -> dict[str, str]:
    """Return the path of each image file on the hosts, by file name."""
    directory = remote_directory(inventory, image)
    return {name: f"{directory}/{name}" for name in IMAGE_FILES}


def local_checksums(image: GuestImage) -> dict[str, str]:
    """Return the SHA-256 hex digest of each image file on this machine."""
    checksums = {}
    for name in IMAGE_FILES:
        digest = hashlib.sha256()
        with open(image.directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        checksums[name] = digest.hexdigest()
    return checksums


def remote_checksums(shell: Shell, paths: list[str]) -> dict[str, str | None]:
    """Return the SHA-256 of each path on the host, None for a file that cannot be read."""
    result = shell.run(["sha256sum", "--", *paths], timeout=CHECKSUM_TIMEOUT_S, check=False)
    found: dict[str, str | None] = dict.fromkeys(paths)
    for line in result.stdout.splitlines():
        checksum, _, path = line.partition("  ")
        if path in found and len(checksum) == 64:
            found[path] = checksum
    if result.returncode not in (0, 1):
        raise HostError(f"sha256sum failed on host {shell.name} with exit status {result.returncode}: "
                        f"{result.stderr.strip()}")
    return found


def image_missing(shell: Shell, inventory: Inventory, image: GuestImage,
                  expected: dict[str, str]) -> list[str]:
    """Return the image files that are missing on the host or differ from this machine's."""
    paths = remote_paths(inventory, image)
    found = remote_checksums(shell, list(paths.values()))
    return [name for name, path in paths.items() if found[path] != expected[name]]


def _push_file(host: RemoteHost, local: Path, target: str, checksum: str) -> int:
    temporary = f"{target}.tmp-{secrets.token_hex(4)}"
    try:
        host.put(local, temporary)
        copied = remote_checksums(host, [temporary])[temporary]
        if copied != checksum:
            raise HostError(f"the copy of {local.name} on host {host.name} has SHA-256 {copied}, expected "
                            f"{checksum}; the transfer was corrupted, so push again")
        host.run(["mv", "-f", "--", temporary, target], timeout=COMMAND_TIMEOUT_S)
    except BaseException:
        try:
            host.run(["rm", "-f", "--", temporary], timeout=COMMAND_TIMEOUT_S, check=False)
        except HostError as error:
            log.warning("could not remove %s on %s: %s", temporary, host.name, error)
        raise
    return local.stat().st_size


def push_to_host(host: RemoteHost, inventory: Inventory, image: GuestImage,
                 expected: dict[str, str]) -> PushResult:
    """Copy the image files a host lacks; return what was done, with the error if it failed."""
    started = time.monotonic()
    try:
        host.connect()
        missing = image_missing(host, inventory, image, expected)
        if not missing:
            return PushResult(host.name, "present", seconds=time.monotonic() - started)
        host.run(["mkdir", "-p", "--", remote_directory(inventory, image)], timeout=COMMAND_TIMEOUT_S)
        paths = remote_paths(inventory, image)
        sent = 0
        for name in missing:
            sent += _push_file(host, image.directory / name, paths[name], expected[name])
        left = image_missing(host, inventory, image, expected)
        if left:
            raise HostError(f"after the copy, {', '.join(left)} still differ on host {host.name}")
        log.info("pushed image %s to %s (%d bytes)", image.digest[:12], host.name, sent)
        return PushResult(host.name, "pushed", bytes_sent=sent, seconds=time.monotonic() - started)
    except HostError as error:
        return PushResult(host.name, "failed", seconds=time.monotonic() - started, error=str(error))


def push_image(inventory: Inventory, image: GuestImage) -> list[PushResult]:
    """Copy the image to every libvirt host of the inventory in parallel, skipping hosts that have it."""
    expected = local_checksums(image)
    hosts = [RemoteHost(entry, inventory) for entry in inventory.libvirt_hosts]
    try:
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            return list(pool.map(lambda host: push_to_host(host, inventory, image, expected), hosts))
    finally:
        for host in hosts:
            host.close()
