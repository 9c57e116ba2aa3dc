"""The guest kernel: Debian's kernel package, fetched and unpacked without installing it.

The kernel comes from the versioned package (``linux-image-6.1.0-NN-amd64``)
that the ``linux-image-amd64`` metapackage of the ``bookworm`` suite depends
on. Backports and the security suite are ignored, so every lab machine with
the same APT lists builds the same guest kernel. The host's /boot is never
used.
"""

from __future__ import annotations

import hashlib
import logging
import gzip
import lzma
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.errors import ImageError
from lab.paths import download_dir

log = logging.getLogger(__name__)

KERNEL_SUITE = "bookworm"
KERNEL_METAPACKAGE = "linux-image-amd64"

APT_QUERY_TIMEOUT_S = 120
APT_UPDATE_TIMEOUT_S = 900
APT_DOWNLOAD_TIMEOUT_S = 1800
UNPACK_TIMEOUT_S = 600
DECOMPRESS_TIMEOUT_S = 120

_VERSIONED_DEPENDENCY = re.compile(r"(linux-image-[^\s,|()]+)\s*\(\s*=\s*([^\s)]+)\s*\)")


@dataclass(frozen=True)
class KernelPackage:
    """A downloaded kernel package file and the APT identity it was fetched by."""

    name: str
    version: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class UnpackedKernel:
    """The parts of an unpacked kernel package that a guest image needs."""

    version: str
    vmlinuz: Path
    modules_dir: Path


def run_tool(command: list[str], *, timeout: float, purpose: str,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command and return its result, raising ImageError if it cannot run or fails."""
    log.debug("running %s (timeout %ss)", command, timeout)
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except FileNotFoundError as error:
        raise ImageError(f"{purpose} failed: {command[0]} not found ({error}); "
                         "install it (scripts/setup-debian installs every build tool)") from error
    except subprocess.TimeoutExpired as error:
        raise ImageError(f"{purpose} failed: {' '.join(command)} timed out after {timeout} s; "
                         "check the machine's load and APT sources, then retry") from error
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise ImageError(f"{purpose} failed: {' '.join(command)} exited with status "
                         f"{result.returncode}: {detail}")
    return result


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _suite_version(metapackage: str, suite: str) -> str | None:
    """Return the version of ``metapackage`` that APT lists for ``suite``, or None."""
    result = run_tool(["apt-cache", "madison", metapackage], timeout=APT_QUERY_TIMEOUT_S,
                      purpose=f"looking up {metapackage}")
    # Each line: "<package> | <version> | <uri> <suite>/<component> <arch> Packages".
    for line in result.stdout.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) != 3 or fields[0] != metapackage:
            continue
        origin = fields[2].split()
        if len(origin) < 4 or origin[-1] != "Packages":
            continue
        if origin[1].split("/")[0] == suite:
            return fields[1]
    return None


def _package_fields(package: str, version: str) -> dict[str, str]:
    result = run_tool(["apt-cache", "show", f"{package}={version}"],
                      timeout=APT_QUERY_TIMEOUT_S, purpose=f"reading the APT record of {package}")
    fields: dict[str, str] = {}
    # Only the first record matters when several mirrors list the same version.
    for line in result.stdout.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, separator, value = line.partition(":")
        if separator and not line[0].isspace():
            fields[key] = value.strip()
    return fields


def resolve_kernel_package(suite: str = KERNEL_SUITE, *, allow_update: bool = True) -> tuple[str, str]:
    """Return the name and version of the kernel package that the suite's metapackage depends on.

    APT's lists are refreshed with ``apt-get update`` only when the metapackage
    is missing from them and ``allow_update`` is true.
    """
    version = _suite_version(KERNEL_METAPACKAGE, suite)
    if version is None and allow_update:
        log.info("%s not found in the %s suite of the APT lists, running apt-get update",
                 KERNEL_METAPACKAGE, suite)
        run_tool(["apt-get", "update", "-q"], timeout=APT_UPDATE_TIMEOUT_S,
                 purpose="refreshing the APT lists")
        version = _suite_version(KERNEL_METAPACKAGE, suite)
    if version is None:
        raise ImageError(f"package {KERNEL_METAPACKAGE} not found in the '{suite}' suite of the "
                         f"APT sources; add a Debian '{suite}' entry with component main to "
                         "/etc/apt/sources.list.d and run apt-get update")

    depends = _package_fields(KERNEL_METAPACKAGE, version).get("Depends", "")
    match = _VERSIONED_DEPENDENCY.search(depends)
    if match is None:
        raise ImageError(f"{KERNEL_METAPACKAGE}={version} has no versioned linux-image dependency "
                         f"(Depends: {depends!r}); the APT lists may be damaged, run apt-get update")
    log.debug("%s=%s from %s depends on %s=%s", KERNEL_METAPACKAGE, version, suite,
              match.group(1), match.group(2))
    return match.group(1), match.group(2)


def _download(package: str, version: str, target: Path) -> None:
    """Download one package file with apt-get into ``target``'s folder, under ``target``'s name."""
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        run_tool(["apt-get", "download", "-q", f"{package}={version}"], cwd=staging,
                 timeout=APT_DOWNLOAD_TIMEOUT_S, purpose=f"downloading {package}={version}")
        files = list(staging.glob("*.deb"))
        if len(files) != 1:
            raise ImageError(f"downloading {package}={version} into {staging} left "
                             f"{len(files)} .deb files instead of one; remove the folder and retry")
        files[0].rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_kernel_package(package: str, version: str) -> Path | None:
    """Return the path of the package file in download_dir() if it was downloaded, else None."""
    filename = _package_fields(package, version).get("Filename", "")
    if not filename:
        return None
    path = download_dir() / Path(filename).name
    return path if path.is_file() else None


def fetch_kernel_package(suite: str = KERNEL_SUITE) -> KernelPackage:
    """Download the suite's kernel package into download_dir(), unless a verified copy is there.

    The file is checked against the SHA256 that APT lists for it. A mismatching
    copy is downloaded again. If the download fails, the APT lists are
    refreshed once and the package is resolved and fetched again.
    """
    package, version = resolve_kernel_package(suite)
    try:
        return _fetch_resolved(package, version)
    except ImageError as error:
        log.warning("fetching the kernel package failed (%s); refreshing the APT lists and retrying",
                    error)
    run_tool(["apt-get", "update", "-q"], timeout=APT_UPDATE_TIMEOUT_S,
             purpose="refreshing the APT lists")
    return _fetch_resolved(*resolve_kernel_package(suite, allow_update=False))


def _fetch_resolved(package: str, version: str) -> KernelPackage:
    fields = _package_fields(package, version)
    expected_sha256 = fields.get("SHA256", "").lower()
    filename = fields.get("Filename", "")
    if not expected_sha256 or not filename:
        raise ImageError(f"the APT record of {package}={version} has no SHA256 or Filename; "
                         "run apt-get update")

    download_dir().mkdir(parents=True, exist_ok=True)
    path = download_dir() / Path(filename).name
    if path.is_file():
        sha256 = file_sha256(path)
        if sha256 == expected_sha256:
            log.debug("using downloaded %s", path)
            return KernelPackage(package, version, path, sha256)
        log.warning("%s has SHA256 %s instead of %s, downloading it again",
                    path, sha256, expected_sha256)
        path.unlink()

    log.info("downloading %s=%s into %s", package, version, download_dir())
    _download(package, version, path)
    sha256 = file_sha256(path)
    if sha256 != expected_sha256:
        path.unlink()
        raise ImageError(f"downloaded {path.name} has SHA256 {sha256}, but APT lists "
                         f"{expected_sha256}; run apt-get update and retry")
    return KernelPackage(package, version, path, sha256)


def package_identity(deb: Path) -> tuple[str, str]:
    """Return the Package and Version fields of a .deb file."""
    result = run_tool(["dpkg-deb", "--show", "--showformat=${Package}\\n${Version}\\n", str(deb)],
                      timeout=APT_QUERY_TIMEOUT_S, purpose=f"reading the control fields of {deb}")
    lines = result.stdout.splitlines()
    if len(lines) < 2:
        raise ImageError(f"dpkg-deb printed no Package and Version for {deb}; "
                         "the file is not a Debian package")
    return lines[0], lines[1]


def unpack_kernel(deb: Path, into: Path) -> UnpackedKernel:
    """Unpack a kernel package with ``dpkg-deb -x`` and locate its kernel and modules."""
    run_tool(["dpkg-deb", "-x", str(deb), str(into)], timeout=UNPACK_TIMEOUT_S,
             purpose=f"unpacking {deb}")
    kernels = sorted((into / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"{deb} contains {len(kernels)} boot/vmlinuz-* files instead of one; "
                         f"pick a linux-image package that ships exactly one kernel")
    version = kernels[0].name.removeprefix("vmlinuz-")
    for base in (into / "lib" / "modules", into / "usr" / "lib" / "modules"):
        if (base / version).is_dir():
            return UnpackedKernel(version, kernels[0], base / version)
    raise ImageError(f"{deb} has no lib/modules/{version} folder; "
                     "pick a linux-image package that ships its modules")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def _decompress_module(path: Path) -> bytes:
    """Return the ELF bytes of a module file, decompressing .ko.xz, .ko.gz and .ko.zst.

    busybox insmod cannot be relied on to read compressed modules, so the
    initramfs gets them uncompressed.
    """
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        command = ["zstd", "-d", "-c", "-q", str(path)]
        try:
            result = subprocess.run(command, capture_output=True, timeout=DECOMPRESS_TIMEOUT_S,
                                    check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired) as error:
            raise ImageError(f"decompressing {path} failed ({error}); install zstd") from error
        if result.returncode != 0:
            raise ImageError(f"decompressing {path} failed: zstd exited with status "
                             f"{result.returncode}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout
    return path.read_bytes()


def _elf_section(image: bytes, wanted: str) -> bytes | None:
    """Return the contents of a named section of a 64-bit little-endian ELF file, or None."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        return None
    section_offset, = struct.unpack_from("<Q", image, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", image, 0x3A)
    if section_offset == 0 or entry_size < 64 or names_index >= count:
        return None

    def header(index: int) -> tuple[int, int, int]:
        base = section_offset + index * entry_size
        name, = struct.unpack_from("<I", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        return name, offset, size

    _, names_offset, names_size = header(names_index)
    names = image[names_offset:names_offset + names_size]
    for index in range(count):
        name, offset, size = header(index)
        end = names.find(b"\0", name)
        if names[name:end].decode(errors="replace") == wanted:
            return image[offset:offset + size]
    return None


def module_dependencies(name: str, image: bytes) -> list[str]:
    """Return the ``depends=`` list from a module's .modinfo section."""
    modinfo = _elf_section(image, ".modinfo")
    if modinfo is None:
        raise ImageError(f"module {name} is not a 64-bit ELF file with a .modinfo section; "
                         "the kernel package may be damaged, delete it from "
                         f"{download_dir()} and build again")
    for entry in modinfo.split(b"\0"):
        if entry.startswith(b"depends="):
            value = entry.removeprefix(b"depends=").decode()
            return [dependency.replace("-", "_") for dependency in value.split(",") if dependency]
    return []


def collect_modules(kernel: UnpackedKernel, names: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Return (name, uncompressed module) pairs for ``names``, in their order.

    Modules built into the kernel (listed in modules.builtin) are skipped. An
    ImageError is raised for a module that is neither shipped nor built in,
    and for a module that depends on one not loaded before it, because
    busybox insmod resolves no dependencies.
    """
    shipped = {_module_name(path): path for path in kernel.modules_dir.rglob("*.ko*")}
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_module_name(Path(line.strip()))
                   for line in builtin_file.read_text().splitlines() if line.strip()}

    modules: list[tuple[str, bytes]] = []
    loaded_before: set[str] = set()
    for name in names:
        if name not in shipped:
            if name in builtin:
                log.info("module %s is built into kernel %s, not adding it", name, kernel.version)
                continue
            raise ImageError(f"module {name} is neither shipped nor built into kernel "
                             f"{kernel.version}; remove it from the module list or pick "
                             "another kernel package")
        image = _decompress_module(shipped[name])
        for dependency in module_dependencies(name, image):
            if dependency not in loaded_before and dependency not in builtin:
                raise ImageError(f"module {name} depends on {dependency}, which is not loaded "
                                 f"before it; put {dependency} before {name} in the module list")
        modules.append((name, image))
        loaded_before.add(name)
    return modules
