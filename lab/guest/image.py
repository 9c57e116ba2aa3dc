"""Content-addressed guest images: a Debian kernel and an initramfs that runs the memory workload.

An image lives in ``image_dir()/<digest>/`` with ``vmlinuz``, ``initrd.img``
and ``manifest.json``. The digest is a SHA-256 over every build input: the
kernel package file, the busybox binary, the workload source, the init
script, the module list, the compiler identity and flags, and
FORMAT_VERSION. A complete image with the digest of the current inputs is
reused. Images are built in a temporary folder next to their final place
and renamed into it, so a folder named after a digest is always complete.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import ipaddress
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.errors import ConfigError, ImageError
from lab.guest.initramfs import CpioEntry, is_static_elf, write_initramfs
from lab.guest.kernel_package import (
    cached_kernel_package,
    collect_modules,
    fetch_kernel_package,
    file_sha256,
    package_identity,
    resolve_kernel_package,
    run_tool,
    unpack_kernel,
)
from lab.paths import image_dir

log = logging.getLogger(__name__)

# Raise this when the layout of the initramfs or of the image folder changes,
# so images built by older code are not reused.
FORMAT_VERSION = 2

GUEST_DIR = Path(__file__).resolve().parent
WORKLOAD_SOURCE = GUEST_DIR / "workload" / "workload.c"
# The network end of the client probes (UDP echo and TCP echo), started by init.sh.
RESPONDER_SOURCE = GUEST_DIR / "responder" / "responder.c"
INIT_SCRIPT = GUEST_DIR / "init.sh"
BUSYBOX = Path("/bin/busybox")
COMPILER = "gcc"
WORKLOAD_CFLAGS = ("-static", "-O2", "-s")

# NIC drivers in load order: busybox insmod resolves no dependencies, so every
# module comes after those it needs (collect_modules checks this).
NIC_MODULES = (
    "e1000",
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
# Every module the initramfs carries and init.sh loads: the NIC drivers, then
# virtio_blk for the optional disk (/dev/vda), which needs virtio and virtio_ring.
GUEST_MODULES = (*NIC_MODULES, "virtio_blk")
# busybox applets that init.sh runs, linked into /bin.
BUSYBOX_APPLETS = ("sh", "mount", "mkdir", "cat", "echo", "ls", "insmod", "lsmod", "ip",
                   "sleep", "uname", "dmesg", "dd")

WORKLOAD_PATTERNS = ("sequential", "random")
MAX_WORKING_SET_MIB = 1048576
MAX_DIRTY_RATE_MIB_S = 1048576.0
# console=ttyS0: all output on the first serial port, which QEMU and libvirt log.
# panic=0: a panicking guest halts with the panic on the console and does not
#   reboot into a second, silent boot.
# loglevel=5: print messages of level 4 (warning) and more severe. That keeps
#   WARN() and Oops reports, which Debian's kernel logs at level 4, and
#   panics, and drops the informational boot messages.
# Oopses are not turned into panics (no oops=panic), so one stays visible
# while the guest keeps running.
BASE_KERNEL_ARGUMENTS = ("console=ttyS0", "panic=0", "loglevel=5")

COMPILE_TIMEOUT_S = 300
TOOL_QUERY_TIMEOUT_S = 60


@dataclass(frozen=True)
class GuestImage:
    """A complete guest image folder and the kernel version inside it."""

    digest: str
    kernel: Path
    initrd: Path
    kernel_version: str
    directory: Path


@dataclass(frozen=True)
class ImageSources:
    """Files an image is built from. The defaults are those of a real build."""

    kernel_package: Path
    busybox: Path = BUSYBOX
    workload_source: Path = WORKLOAD_SOURCE
    responder_source: Path = RESPONDER_SOURCE
    init_script: Path = INIT_SCRIPT
    modules: tuple[str, ...] = GUEST_MODULES
    compiler: str = COMPILER


@dataclass(frozen=True)
class _LoadedSources:
    """Contents of the small inputs, read once so the digest covers exactly what is built."""

    sources: ImageSources
    workload_source: bytes
    responder_source: bytes
    init_script: bytes
    inputs: dict[str, object]


def image_digest(inputs: Mapping[str, object]) -> str:
    """Return the SHA-256 hex digest of the canonical JSON form of ``inputs``."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read_input(path: Path, role: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ImageError(f"reading the {role} {path} failed: {error}; restore the file "
                         "(the package and scripts/setup-debian provide it)") from error


def _compiler_identity(compiler: str) -> str:
    result = run_tool([compiler, "--version"], timeout=TOOL_QUERY_TIMEOUT_S,
                      purpose=f"querying the compiler {compiler}")
    return result.stdout.splitlines()[0].strip() if result.stdout else compiler


def _load_sources(sources: ImageSources) -> _LoadedSources:
    workload_source = _read_input(sources.workload_source, "workload source")
    responder_source = _read_input(sources.responder_source, "responder source")
    init_script = _read_input(sources.init_script, "init script")
    for path, role in ((sources.kernel_package, "kernel package"), (sources.busybox, "busybox binary")):
        if not path.is_file():
            fix = ("install busybox-static" if role == "busybox binary"
                   else "call build_image() without sources to download the kernel package")
            raise ImageError(f"the {role} {path} is missing; {fix}")
    inputs: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "kernel_package_sha256": file_sha256(sources.kernel_package),
        "busybox_sha256": file_sha256(sources.busybox),
        "workload_source_sha256": hashlib.sha256(workload_source).hexdigest(),
        "responder_source_sha256": hashlib.sha256(responder_source).hexdigest(),
        "init_script_sha256": hashlib.sha256(init_script).hexdigest(),
        "modules": list(sources.modules),
        "compiler": _compiler_identity(sources.compiler),
        "cflags": list(WORKLOAD_CFLAGS),
    }
    return _LoadedSources(sources, workload_source, responder_source, init_script, inputs)


def image_inputs(sources: ImageSources) -> dict[str, object]:
    """Return the values the digest of an image built from ``sources`` covers."""
    return _load_sources(sources).inputs


def _load_image(directory: Path) -> GuestImage | None:
    """Return the image in ``directory`` if it is complete, else None."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("digest") != directory.name:
        return None
    kernel = directory / "vmlinuz"
    initrd = directory / "initrd.img"
    if not kernel.is_file() or not initrd.is_file():
        return None
    return GuestImage(digest=directory.name, kernel=kernel, initrd=initrd,
                      kernel_version=str(manifest.get("kernel_version", "")), directory=directory)


def _built_at(image: GuestImage) -> str:
    try:
        return str(json.loads((image.directory / "manifest.json").read_text()).get("built_at", ""))
    except (OSError, ValueError):
        return ""


def list_images() -> list[GuestImage]:
    """Return the complete images in image_dir(), oldest build first."""
    if not image_dir().is_dir():
        return []
    images = [image for path in image_dir().iterdir()
              if not path.name.startswith(".") and (image := _load_image(path)) is not None]
    return sorted(images, key=_built_at)


def _current_digest() -> str | None:
    """Return the digest the current inputs would give, without downloading anything.

    Returns None when the kernel package cannot be resolved from the APT lists
    or was not downloaded yet.
    """
    try:
        package, version = resolve_kernel_package(allow_update=False)
        deb = cached_kernel_package(package, version)
        if deb is None:
            return None
        return image_digest(image_inputs(ImageSources(kernel_package=deb)))
    except ImageError as error:
        log.debug("current image digest unknown: %s", error)
        return None


def find_image() -> GuestImage | None:
    """Return the image built from the current inputs, else the newest complete image, else None.

    Nothing is downloaded or built. The current inputs are known only when
    the kernel package of the APT lists was already downloaded.
    """
    images = list_images()
    if not images:
        return None
    digest = _current_digest()
    for image in images:
        if image.digest == digest:
            return image
    log.debug("no image matches the current inputs, returning the newest (%s)", images[-1].digest)
    return images[-1]


@contextmanager
def _build_lock() -> Iterator[None]:
    """Serialize builds between processes that share image_dir()."""
    image_dir().mkdir(parents=True, exist_ok=True)
    with (image_dir() / ".lock").open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_image(force: bool = False, *, sources: ImageSources | None = None) -> GuestImage:
    """Build the guest image for the current inputs, or reuse a complete one with the same digest.

    Without ``sources`` the kernel package of the bookworm suite is fetched
    into download_dir() first. ``force`` rebuilds and replaces an existing
    image with the same digest. Raises ImageError when a tool or input is
    missing or a build step fails.
    """
    if sources is None:
        sources = ImageSources(kernel_package=fetch_kernel_package().path)
    loaded = _load_sources(sources)
    digest = image_digest(loaded.inputs)
    target = image_dir() / digest

    with _build_lock():
        existing = _load_image(target)
        if existing is not None and not force:
            log.info("reusing guest image %s", target)
            return existing
        return _build(loaded, digest, target)


def _build(loaded: _LoadedSources, digest: str, target: Path) -> GuestImage:
    started = time.monotonic()
    log.info("building guest image %s", digest)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-{digest[:12]}-", dir=image_dir()))
    try:
        staged = scratch / "image"
        staged.mkdir()
        kernel = unpack_kernel(loaded.sources.kernel_package, scratch / "package")
        shutil.copyfile(kernel.vmlinuz, staged / "vmlinuz")
        modules = collect_modules(kernel, loaded.sources.modules)
        shutil.rmtree(scratch / "package")

        workload = _compile_program(loaded, scratch, loaded.workload_source, "workload")
        responder = _compile_program(loaded, scratch, loaded.responder_source, "responder")
        entries = _initramfs_entries(loaded, workload, responder, modules)
        initrd_bytes = write_initramfs(entries, staged / "initrd.img")

        package_name, package_version = package_identity(loaded.sources.kernel_package)
        manifest = {
            "digest": digest,
            "kernel_version": kernel.version,
            "kernel_package": {
                "name": package_name,
                "version": package_version,
                "file": loaded.sources.kernel_package.name,
            },
            "inputs": loaded.inputs,
            "modules_included": [name for name, _ in modules],
            "busybox_applets": list(BUSYBOX_APPLETS),
            "initrd_bytes": initrd_bytes,
            "build_seconds": round(time.monotonic() - started, 3),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staged, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    log.info("built guest image %s in %.1f s (kernel %s, initrd %d bytes)", target,
             time.monotonic() - started, kernel.version, initrd_bytes)
    image = _load_image(target)
    if image is None:
        raise ImageError(f"the image built in {target} is incomplete after the rename; "
                         "remove the folder and build again")
    return image


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename the staged image folder to ``target``, replacing an existing one."""
    if not target.exists():
        os.rename(staged, target)
        return
    retired = target.with_name(f".old-{target.name}-{os.getpid()}")
    os.rename(target, retired)
    os.rename(staged, target)
    shutil.rmtree(retired, ignore_errors=True)


def _compile_program(loaded: _LoadedSources, scratch: Path, source_text: bytes, role: str) -> bytes:
    """Compile one of the guest's C programs (the workload or the responder) into a static binary."""
    source = scratch / f"{role}.c"
    binary = scratch / f"mlab-{role}"
    source.write_bytes(source_text)
    run_tool([loaded.sources.compiler, *WORKLOAD_CFLAGS, "-o", str(binary), str(source)],
             timeout=COMPILE_TIMEOUT_S, purpose=f"compiling the guest {role}")
    if not is_static_elf(binary):
        raise ImageError(f"{loaded.sources.compiler} produced a dynamically linked {role} "
                         f"despite -static; install libc6-dev, which provides the static libc")
    return binary.read_bytes()


def _busybox_applets(busybox: Path) -> set[str]:
    result = run_tool([str(busybox), "--list"], timeout=TOOL_QUERY_TIMEOUT_S,
                      purpose=f"listing the applets of {busybox}")
    return set(result.stdout.split())


def _initramfs_entries(loaded: _LoadedSources, workload: bytes, responder: bytes,
                       modules: list[tuple[str, bytes]]) -> list[CpioEntry]:
    busybox = loaded.sources.busybox
    if not is_static_elf(busybox):
        raise ImageError(f"{busybox} is not a statically linked x86-64 program, so it cannot "
                         "run in the initramfs; install busybox-static in place of busybox")
    missing = sorted(set(BUSYBOX_APPLETS) - _busybox_applets(busybox))
    if missing:
        raise ImageError(f"{busybox} lacks the applets {', '.join(missing)} that the guest init "
                         "needs; install Debian's busybox-static")

    entries = [CpioEntry.directory(name)
               for name in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp")]
    # The kernel opens /dev/console for /init before anything mounts devtmpfs.
    entries.append(CpioEntry.char_device("dev/console", 5, 1))
    entries.append(CpioEntry.file("init", loaded.init_script, 0o755))
    entries.append(CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755))
    entries.extend(CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS)
    entries.append(CpioEntry.file("bin/mlab-workload", workload, 0o755))
    entries.append(CpioEntry.file("bin/mlab-responder", responder, 0o755))
    entries.extend(CpioEntry.file(f"lib/modules/{name}.ko", data) for name, data in modules)
    module_list = "".join(f"{name}\n" for name, _ in modules)
    entries.append(CpioEntry.file("etc/mlab-modules", module_list.encode()))
    return entries


def _format_rate(rate: float) -> str:
    """Format a rate as the workload's strtod() reads it: "8" for 8.0, "0.1" for 0.1."""
    return str(int(rate)) if rate.is_integer() else repr(rate)


def kernel_cmdline(working_set_mib: int, dirty_rate_mib_s: float, pattern: str,
                   ip: str | None = None, disk: bool = False) -> str:
    """Return the guest kernel command line for a workload and an optional eth0 address.

    ``ip`` is an interface address with its prefix length, for example
    ``10.77.0.10/24``. ``disk`` starts the guest's disk writer on /dev/vda.
    Raises ConfigError for a value the workload or init would reject.
    """
    if (isinstance(working_set_mib, bool) or not isinstance(working_set_mib, numbers.Integral)
            or not 1 <= working_set_mib <= MAX_WORKING_SET_MIB):
        raise ConfigError("invalid working set size", field="working_set_mib", value=working_set_mib,
                          fix=f"use a whole number of MiB from 1 to {MAX_WORKING_SET_MIB}")
    if (isinstance(dirty_rate_mib_s, bool) or not isinstance(dirty_rate_mib_s, numbers.Real)
            or not math.isfinite(dirty_rate_mib_s)
            or not 0 <= dirty_rate_mib_s <= MAX_DIRTY_RATE_MIB_S):
        raise ConfigError("invalid dirty rate", field="dirty_rate_mib_s", value=dirty_rate_mib_s,
                          fix=f"use MiB/s from 0 to {MAX_DIRTY_RATE_MIB_S:.0f}, "
                              "where 0 means as fast as possible")
    if pattern not in WORKLOAD_PATTERNS:
        raise ConfigError("invalid dirty pattern", field="pattern", value=pattern,
                          fix=f"use one of {', '.join(WORKLOAD_PATTERNS)}")

    arguments = list(BASE_KERNEL_ARGUMENTS)
    arguments += [f"mlab.wss={int(working_set_mib)}",
                  f"mlab.rate={_format_rate(float(dirty_rate_mib_s))}",
                  f"mlab.pattern={pattern}"]
    if ip is not None:
        arguments.append(f"mlab.ip={_validate_interface_address(ip)}")
    if disk:
        arguments.append("mlab.disk=1")
    return " ".join(arguments)


def _validate_interface_address(ip: str) -> str:
    fix = "give an address with its prefix length, for example 10.77.0.10/24"
    if not isinstance(ip, str) or "/" not in ip:
        raise ConfigError("invalid guest address: the prefix length is missing", field="ip",
                          value=ip, fix=fix)
    try:
        interface = ipaddress.ip_interface(ip)
    except ValueError as error:
        raise ConfigError(f"invalid guest address ({error})", field="ip", value=ip, fix=fix) from error
    return interface.with_prefixlen
