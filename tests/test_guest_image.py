"""Guest image: kernel command line, digest, initramfs builder, workload binary and real boots.

The unit tests build images from a small fake kernel package in a temporary
MIGRLAB_STATE. Tests marked ``lab`` fetch Debian's bookworm kernel package,
build the real image in the configured state folder and boot it with
qemu-system-x86_64 under TCG.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lab.errors import ConfigError, ImageError
from lab.guest import image as image_module
from lab.guest.console import ReadyLine, parse_line, scan_console
from lab.guest.image import (
    GuestImage,
    ImageSources,
    build_image,
    find_image,
    image_digest,
    image_inputs,
    kernel_cmdline,
    list_images,
)
from lab.guest.initramfs import CpioEntry, is_static_elf, newc_archive

TOOL_TIMEOUT_S = 120
FAKE_KERNEL_VERSION = "9.9.9-test-amd64"
# Fake modules: name -> (path under kernel/, depends= value, compressed with xz).
FAKE_MODULES = {
    "failover": ("net/core/failover.ko", "", False),
    "net_failover": ("drivers/net/net_failover.ko", "failover", True),
    "virtio_ring": ("drivers/virtio/virtio_ring.ko", "", False),
    "virtio_net": ("drivers/net/virtio_net.ko", "virtio_ring,virtio,net_failover", True),
}
# Listed in modules.builtin, so the builder skips it and accepts it as a dependency.
FAKE_BUILTIN = "kernel/drivers/virtio/virtio.ko"
FAKE_MODULE_ORDER = ("failover", "net_failover", "virtio_ring", "virtio", "virtio_net")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, timeout=TOOL_TIMEOUT_S, check=True, **kwargs)


# ---------------------------------------------------------------- kernel command line


def test_cmdline_contains_console_and_workload():
    arguments = kernel_cmdline(64, 8, "sequential").split()

    assert "console=ttyS0" in arguments
    assert "panic=0" in arguments
    assert "mlab.wss=64" in arguments
    assert "mlab.rate=8" in arguments
    assert "mlab.pattern=sequential" in arguments
    assert not any(argument.startswith("mlab.ip=") for argument in arguments)
    assert not any(argument.startswith(("oops=", "quiet")) for argument in arguments)


def test_cmdline_formats_rates():
    assert "mlab.rate=0" in kernel_cmdline(1, 0, "random").split()
    assert "mlab.rate=0.5" in kernel_cmdline(1, 0.5, "random").split()
    assert "mlab.rate=1048576" in kernel_cmdline(1, 1048576.0, "random").split()
    assert "mlab.rate=0.1" in kernel_cmdline(1, 0.1, "random").split()
    assert "mlab.rate=12.125" in kernel_cmdline(1, 12.125, "random").split()


def test_cmdline_with_address():
    assert "mlab.ip=10.77.0.10/24" in kernel_cmdline(8, 1, "random", ip="10.77.0.10/24").split()
    assert "mlab.ip=fd00:77::a/64" in kernel_cmdline(8, 1, "random", ip="fd00:77::a/64").split()


@pytest.mark.parametrize("arguments, field", [
    ((0, 8, "sequential"), "working_set_mib"),
    ((-1, 8, "sequential"), "working_set_mib"),
    ((1048577, 8, "sequential"), "working_set_mib"),
    ((1.5, 8, "sequential"), "working_set_mib"),
    ((True, 8, "sequential"), "working_set_mib"),
    ((64, -0.1, "sequential"), "dirty_rate_mib_s"),
    ((64, float("nan"), "sequential"), "dirty_rate_mib_s"),
    ((64, float("inf"), "sequential"), "dirty_rate_mib_s"),
    ((64, "8", "sequential"), "dirty_rate_mib_s"),
    ((64, 8, "zigzag"), "pattern"),
    ((64, 8, ""), "pattern"),
])
def test_cmdline_rejects_invalid_values(arguments, field):
    with pytest.raises(ConfigError) as raised:
        kernel_cmdline(*arguments)

    assert raised.value.field == field
    assert "invalid" in str(raised.value)


@pytest.mark.parametrize("address", ["10.77.0.10", "10.77.0.300/24", "10.77.0.10/33", "eth0/24",
                                     "10.77.0.10/24 mlab.wss=1"])
def test_cmdline_rejects_invalid_address(address):
    with pytest.raises(ConfigError) as raised:
        kernel_cmdline(8, 1, "random", ip=address)

    assert raised.value.field == "ip"


# ---------------------------------------------------------------- workload binary on the build host


@pytest.fixture(scope="module")
def workload_binary(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("workload") / "mlab-workload"
    run(["gcc", *image_module.WORKLOAD_CFLAGS, "-o", str(binary), str(image_module.WORKLOAD_SOURCE)])
    return binary


def run_workload(binary: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False)


def test_workload_binary_is_static(workload_binary):
    assert is_static_elf(workload_binary)


def test_workload_paces_requested_rate(workload_binary):
    cmdline = kernel_cmdline(8, 8, "sequential")

    result = run_workload(workload_binary, f"--cmdline={cmdline}", "--duration-ms=3500")
    summary = scan_console(result.stdout)

    assert result.returncode == 0, result.stdout
    assert summary.ready == ReadyLine(wss_mib=8, rate_mib_s=8.0, pattern="sequential",
                                      pages=2048, page_size=4096)
    full_seconds = summary.reports[:-1]
    assert len(full_seconds) == 3
    for report in full_seconds:
        assert 1843 <= report.rate_pps <= 2253, report
    assert summary.reports[-1].bad == 0
    assert summary.reports[-1].sweeps >= 3
    # Every dirtied page is verified first, and the sweep checks the rest.
    assert summary.reports[-1].checked >= summary.reports[-1].dirtied + 3 * 2048


def test_workload_random_pattern(workload_binary):
    result = run_workload(workload_binary, "--cmdline=mlab.wss=4 mlab.rate=2.5 mlab.pattern=random",
                          "--duration-ms=2100")
    summary = scan_console(result.stdout)

    assert result.returncode == 0, result.stdout
    assert summary.ready is not None
    assert summary.ready.pattern == "random"
    assert summary.ready.rate_mib_s == 2.5
    assert 576 <= summary.reports[0].rate_pps <= 704
    assert summary.reports[-1].bad == 0


def test_workload_unlimited_rate(workload_binary):
    result = run_workload(workload_binary, "--cmdline=mlab.wss=4 mlab.rate=0", "--duration-ms=1500")
    summary = scan_console(result.stdout)

    assert result.returncode == 0, result.stdout
    assert summary.ready is not None
    assert summary.ready.rate_mib_s == 0
    # Far above any paced rate a test here requests: at least 40 MiB/s.
    assert summary.reports[0].rate_pps > 10000
    assert summary.reports[-1].bad == 0


def test_workload_detects_lost_and_stale_pages(workload_binary):
    result = run_workload(workload_binary, "--cmdline=mlab.wss=4 mlab.rate=1",
                          "--duration-ms=2500", "--zero-page=700", "--stale-page=900")
    summary = scan_console(result.stdout)

    assert result.returncode == 0, result.stdout
    by_page = {bad.page: bad for bad in summary.bad_pages}
    assert set(by_page) == {700, 900}
    assert by_page[700].magic_ok is False
    assert by_page[700].found_gen == 0
    assert by_page[900].magic_ok is True
    assert by_page[900].found_gen == by_page[900].expected_gen - 1
    # Each page is counted once: the workload restores it after reporting it.
    assert summary.reports[-1].bad == 2


def test_workload_defaults_without_mlab_values(workload_binary):
    result = run_workload(workload_binary, "--cmdline=console=ttyS0 quiet", "--duration-ms=200")

    ready = scan_console(result.stdout).ready
    assert result.returncode == 0, result.stdout
    assert ready == ReadyLine(wss_mib=64, rate_mib_s=8.0, pattern="sequential", pages=16384,
                              page_size=4096)


@pytest.mark.parametrize("arguments, message", [
    (["--cmdline=mlab.wss=0"], "invalid mlab.wss value '0'"),
    (["--cmdline=mlab.wss=12abc"], "invalid mlab.wss value '12abc'"),
    (["--cmdline=mlab.wss=1048577"], "invalid mlab.wss value '1048577'"),
    (["--cmdline=mlab.rate=-2"], "invalid mlab.rate value '-2'"),
    (["--cmdline=mlab.rate=nan"], "invalid mlab.rate value 'nan'"),
    (["--cmdline=mlab.rate=inf"], "invalid mlab.rate value 'inf'"),
    (["--cmdline=mlab.rate="], "invalid mlab.rate value ''"),
    (["--cmdline=mlab.pattern=zigzag"], "invalid mlab.pattern value 'zigzag'"),
    (["--cmdline=mlab.wss=1", "--zero-page=256"], "invalid --zero-page value 256"),
    (["--cmdline=mlab.wss=1", "--duration-ms=0"], "invalid --duration-ms value '0'"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
])
def test_workload_rejects_invalid_settings(workload_binary, arguments, message):
    result = run_workload(workload_binary, *arguments)

    assert result.returncode == 2
    errors = scan_console(result.stdout).workload_errors
    assert len(errors) == 1
    assert errors[0].startswith(message), errors


# ---------------------------------------------------------------- initramfs archive


def list_archive(archive: bytes) -> list[str]:
    """Return ``cpio -itv`` lines for an uncompressed archive, read by the real cpio tool."""
    result = run(["cpio", "-itv", "--quiet"], input=archive)
    return result.stdout.decode().splitlines()


def test_newc_archive_read_by_cpio():
    entries = [
        CpioEntry.directory("bin"),
        CpioEntry.directory("dev"),
        CpioEntry.file("init", b"#!/bin/sh\necho up\n", 0o755),
        CpioEntry.file("bin/odd-size", b"x" * 5),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.char_device("dev/console", 5, 1),
    ]

    listing = list_archive(newc_archive(entries))

    assert len(listing) == 6
    assert listing[0].startswith("drwxr-xr-x")
    assert listing[0].endswith(" bin")
    assert listing[2].startswith("-rwxr-xr-x")
    assert listing[2].endswith(" init")
    assert " 5 " in listing[3]
    assert listing[4].startswith("lrwxrwxrwx")
    assert listing[4].endswith("bin/sh -> busybox")
    assert listing[5].startswith("crw-------")
    assert "5,   1" in listing[5]


def test_newc_archive_is_reproducible():
    entries = [CpioEntry.directory("etc"), CpioEntry.file("etc/a", b"abc")]

    assert newc_archive(entries) == newc_archive(list(entries))


@pytest.mark.parametrize("path", ["/init", "", "dup"])
def test_newc_archive_rejects_bad_paths(path):
    entries = [CpioEntry.file("dup", b"1"), CpioEntry.file(path, b"2")]

    with pytest.raises(ValueError):
        newc_archive(entries)


def test_static_elf_check(tmp_path):
    text_file = tmp_path / "script"
    text_file.write_text("#!/bin/sh\n")

    assert is_static_elf(Path("/bin/busybox"))
    assert not is_static_elf(Path("/bin/ls"))
    assert not is_static_elf(text_file)


# ---------------------------------------------------------------- digest and builds from a fake kernel package


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("MIGRLAB_STATE", str(root))
    return root


def make_module(work: Path, name: str, depends: str) -> bytes:
    """Compile a relocatable ELF object that has a .modinfo section like a kernel module."""
    source = work / f"{name}.c"
    source.write_text(
        '__attribute__((section(".modinfo"), used)) static const char modinfo[] =\n'
        f'    "license=GPL\\0depends={depends}\\0name={name}";\n')
    target = work / f"{name}.o"
    run(["gcc", "-c", "-o", str(target), str(source)])
    return target.read_bytes()


@pytest.fixture(scope="module")
def fake_kernel_package(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Build a .deb shaped like Debian's linux-image packages and return it with its module ELFs."""
    work = tmp_path_factory.mktemp("fake-kernel")
    root = work / "root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: linux-image-{FAKE_KERNEL_VERSION}\nVersion: 9.9.9-1\nArchitecture: amd64\n"
        "Maintainer: migration-lab tests <tests@localhost>\nDescription: fake kernel for tests\n")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{FAKE_KERNEL_VERSION}").write_bytes(b"fake bzImage " * 1000)
    modules_dir = root / "lib" / "modules" / FAKE_KERNEL_VERSION
    elves = {}
    for name, (relative, depends, compress) in FAKE_MODULES.items():
        elves[name] = make_module(work, name, depends)
        path = modules_dir / "kernel" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if compress:
            path.with_name(path.name + ".xz").write_bytes(lzma.compress(elves[name]))
        else:
            path.write_bytes(elves[name])
    (modules_dir / "modules.builtin").write_text(FAKE_BUILTIN + "\n")
    deb = work / f"linux-image-{FAKE_KERNEL_VERSION}_9.9.9-1_amd64.deb"
    run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(deb)])
    return deb, elves


@pytest.fixture
def fake_sources(fake_kernel_package, tmp_path) -> ImageSources:
    """Sources with private copies of the init script and workload source, free to edit."""
    init_script = tmp_path / "init.sh"
    workload_source = tmp_path / "workload.c"
    shutil.copyfile(image_module.INIT_SCRIPT, init_script)
    shutil.copyfile(image_module.WORKLOAD_SOURCE, workload_source)
    return ImageSources(kernel_package=fake_kernel_package[0], init_script=init_script,
                        workload_source=workload_source, modules=FAKE_MODULE_ORDER)


def test_digest_stable_for_same_inputs(fake_sources):
    first = image_digest(image_inputs(fake_sources))
    second = image_digest(image_inputs(replace(fake_sources)))

    assert first == second
    assert len(first) == 64


def test_digest_changes_with_each_input(fake_sources, tmp_path):
    baseline = image_digest(image_inputs(fake_sources))

    def digest_with(**changes) -> str:
        return image_digest(image_inputs(replace(fake_sources, **changes)))

    edited_init = tmp_path / "init-edited.sh"
    edited_init.write_bytes(fake_sources.init_script.read_bytes() + b"# edited\n")
    edited_workload = tmp_path / "workload-edited.c"
    edited_workload.write_bytes(fake_sources.workload_source.read_bytes() + b"\n")
    other_busybox = tmp_path / "busybox"
    other_busybox.write_bytes(Path("/bin/busybox").read_bytes() + b"\0")
    other_kernel = tmp_path / "kernel.deb"
    other_kernel.write_bytes(fake_sources.kernel_package.read_bytes() + b"\0")

    changed = {
        "init script": digest_with(init_script=edited_init),
        "workload source": digest_with(workload_source=edited_workload),
        "busybox": digest_with(busybox=other_busybox),
        "kernel package": digest_with(kernel_package=other_kernel),
        "module list": digest_with(modules=FAKE_MODULE_ORDER[:-1]),
        "module order": digest_with(modules=tuple(reversed(FAKE_MODULE_ORDER))),
    }

    for name, digest in changed.items():
        assert digest != baseline, name
    assert len(set(changed.values())) == len(changed)


def test_digest_ignores_input_file_names(fake_sources, tmp_path):
    renamed = tmp_path / "renamed-init"
    shutil.copyfile(fake_sources.init_script, renamed)

    assert (image_digest(image_inputs(replace(fake_sources, init_script=renamed)))
            == image_digest(image_inputs(fake_sources)))


def test_digest_covers_format_version(fake_sources, monkeypatch):
    baseline = image_digest(image_inputs(fake_sources))
    monkeypatch.setattr(image_module, "FORMAT_VERSION", image_module.FORMAT_VERSION + 1)

    assert image_digest(image_inputs(fake_sources)) != baseline


def initrd_members(image: GuestImage) -> dict[str, str]:
    """Return ``cpio -itv`` lines of an image's initrd, keyed by member path."""
    archive = gzip.decompress(image.initrd.read_bytes())
    members = {}
    for line in list_archive(archive):
        # The path is the last field, or the one before " -> target" for a symlink.
        path = line.split(" -> ")[0].split()[-1]
        members[path] = line
    return members


def extract_member(image: GuestImage, path: str, into: Path) -> bytes:
    archive = gzip.decompress(image.initrd.read_bytes())
    run(["cpio", "-id", "--quiet", path], input=archive, cwd=into)
    return (into / path).read_bytes()


def test_build_from_fake_package(state, fake_sources, fake_kernel_package, tmp_path):
    image = build_image(sources=fake_sources)

    assert image.directory == state / "images" / image.digest
    assert image.digest == image_digest(image_inputs(fake_sources))
    assert image.kernel_version == FAKE_KERNEL_VERSION
    assert image.kernel.read_bytes() == b"fake bzImage " * 1000
    manifest = json.loads((image.directory / "manifest.json").read_text())
    assert manifest["digest"] == image.digest
    assert manifest["kernel_package"]["name"] == f"linux-image-{FAKE_KERNEL_VERSION}"
    assert manifest["modules_included"] == ["failover", "net_failover", "virtio_ring", "virtio_net"]
    assert manifest["initrd_bytes"] == image.initrd.stat().st_size
    assert manifest["built_at"]
    assert [path.name for path in (state / "images").iterdir() if path.name.startswith(".build")] == []

    members = initrd_members(image)
    assert members["init"].startswith("-rwxr-xr-x")
    assert members["bin/busybox"].startswith("-rwxr-xr-x")
    assert members["bin/mlab-workload"].startswith("-rwxr-xr-x")
    assert members["dev/console"].startswith("crw-------")
    for applet in image_module.BUSYBOX_APPLETS:
        assert f"bin/{applet}" in members, applet

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    assert extract_member(image, "etc/mlab-modules", extracted) == (
        b"failover\nnet_failover\nvirtio_ring\nvirtio_net\n")
    assert extract_member(image, "init", extracted) == image_module.INIT_SCRIPT.read_bytes()
    elves = fake_kernel_package[1]
    # net_failover and virtio_net were shipped as .ko.xz and must be stored uncompressed.
    for name in ("failover", "net_failover", "virtio_net"):
        assert extract_member(image, f"lib/modules/{name}.ko", extracted) == elves[name], name


def test_build_reuses_complete_image(state, fake_sources):
    first = build_image(sources=fake_sources)
    initrd_inode = first.initrd.stat().st_ino
    manifest = (first.directory / "manifest.json").read_text()

    second = build_image(sources=fake_sources)

    assert second == first
    assert second.initrd.stat().st_ino == initrd_inode
    assert (second.directory / "manifest.json").read_text() == manifest


def test_build_force_replaces_image(state, fake_sources):
    first = build_image(sources=fake_sources)
    initrd_inode = first.initrd.stat().st_ino
    initrd_sha256 = hashlib.sha256(first.initrd.read_bytes()).hexdigest()

    second = build_image(force=True, sources=fake_sources)

    assert second.digest == first.digest
    assert second.initrd.stat().st_ino != initrd_inode
    # gcc, gzip and the cpio writer are deterministic, so the rebuild has the same bytes.
    assert hashlib.sha256(second.initrd.read_bytes()).hexdigest() == initrd_sha256
    assert [path.name for path in (state / "images").iterdir() if not path.name.startswith(".lock")] \
        == [first.digest]


def test_build_rebuilds_incomplete_folder(state, fake_sources):
    digest = image_digest(image_inputs(fake_sources))
    partial = state / "images" / digest
    partial.mkdir(parents=True)
    (partial / "vmlinuz").write_bytes(b"left over")

    image = build_image(sources=fake_sources)

    assert image.kernel.read_bytes() == b"fake bzImage " * 1000
    assert (image.directory / "manifest.json").is_file()


def test_changed_input_builds_second_image(state, fake_sources, tmp_path):
    first = build_image(sources=fake_sources)
    edited_init = tmp_path / "init-edited.sh"
    edited_init.write_bytes(fake_sources.init_script.read_bytes() + b"# edited\n")

    second = build_image(sources=replace(fake_sources, init_script=edited_init))

    assert second.digest != first.digest
    assert {image.digest for image in list_images()} == {first.digest, second.digest}


def test_find_image_empty_state(state):
    assert find_image() is None


def test_find_image_returns_newest(state, fake_sources, tmp_path):
    build_image(sources=fake_sources)
    newer = tmp_path / "init-newer.sh"
    newer.write_bytes(fake_sources.init_script.read_bytes() + b"# newer\n")
    second = build_image(sources=replace(fake_sources, init_script=newer))
    manifest_path = second.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["built_at"] = "2999-01-01T00:00:00+00:00"
    manifest_path.write_text(json.dumps(manifest))

    found = find_image()

    assert found == second


def test_build_rejects_wrong_module_order(state, fake_sources):
    sources = replace(fake_sources, modules=("virtio_net", "failover", "net_failover", "virtio_ring"))

    with pytest.raises(ImageError, match="virtio_net depends on virtio_ring, which is not loaded"):
        build_image(sources=sources)
    assert list_images() == []
    assert [path for path in (state / "images").iterdir() if path.name.startswith(".build")] == []


def test_build_rejects_missing_module(state, fake_sources):
    sources = replace(fake_sources, modules=("failover", "e1000"))

    with pytest.raises(ImageError, match="module e1000 is neither shipped nor built into kernel"):
        build_image(sources=sources)


def test_build_rejects_dynamic_busybox(state, fake_sources):
    with pytest.raises(ImageError, match="not a statically linked"):
        build_image(sources=replace(fake_sources, busybox=Path("/bin/ls")))


def test_build_rejects_missing_inputs(state, fake_sources, tmp_path):
    with pytest.raises(ImageError, match="busybox binary .* is missing; install busybox-static"):
        build_image(sources=replace(fake_sources, busybox=tmp_path / "no-busybox"))
    with pytest.raises(ImageError, match="reading the init script"):
        build_image(sources=replace(fake_sources, init_script=tmp_path / "no-init"))


def test_build_rejects_broken_workload_source(state, fake_sources, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return missing_symbol; }\n")

    with pytest.raises(ImageError, match="compiling the guest workload failed"):
        build_image(sources=replace(fake_sources, workload_source=broken))
    assert list_images() == []


def test_build_rejects_non_package_file(state, fake_sources, tmp_path):
    not_a_deb = tmp_path / "kernel.deb"
    not_a_deb.write_bytes(b"not an archive")

    with pytest.raises(ImageError, match="unpacking"):
        build_image(sources=replace(fake_sources, kernel_package=not_a_deb))


# ---------------------------------------------------------------- real image booted with QEMU

QEMU = "qemu-system-x86_64"
GUEST_MEMORY_MIB = 256


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not found; run scripts/setup-debian")
    started = time.monotonic()
    image = build_image()
    print(f"\nguest image {image.directory} ready in {time.monotonic() - started:.1f} s, "
          f"initrd {image.initrd.stat().st_size} bytes")
    return image


def boot_guest(image: GuestImage, append: str, seconds: int) -> tuple[str, float | None, int]:
    """Boot the image under TCG for ``seconds`` and return the console, the ready time and the status.

    The ready time is counted in seconds from the start of QEMU to the
    workload's ready line, or None if the line never came.
    """
    command = ["timeout", "--kill-after=10", str(seconds), QEMU, "-accel", "tcg",
               "-m", str(GUEST_MEMORY_MIB), "-nographic", "-nic", "none",
               "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append]
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    lines = []
    ready_after = None
    assert process.stdout is not None
    for raw_line in process.stdout:
        line = raw_line.decode(errors="replace")
        if ready_after is None and isinstance(parse_line(line.rstrip("\r\n")), ReadyLine):
            ready_after = time.monotonic() - started
        lines.append(line)
    status = process.wait(timeout=30)
    return "".join(lines), ready_after, status


@pytest.mark.lab
def test_guest_boots_and_dirties_at_rate(guest_image):
    console, ready_after, status = boot_guest(guest_image, kernel_cmdline(64, 8, "sequential"), 20)
    summary = scan_console(console)

    print(f"\nready line {ready_after} s after QEMU start; last report {summary.last_report}")
    # timeout(1) ends QEMU with status 124: the guest was still running.
    assert status == 124, console
    assert summary.kernel_trouble == [], console
    assert summary.init_errors == [], console
    assert summary.modules_loaded == list(image_module.GUEST_MODULES), console
    assert summary.ready == ReadyLine(wss_mib=64, rate_mib_s=8.0, pattern="sequential",
                                      pages=16384, page_size=4096), console
    assert ready_after is not None, console
    assert ready_after < 15, console
    assert len(summary.reports) >= 5, console
    rates = [report.rate_pps for report in summary.reports]
    assert abs(statistics.median(rates) - 2048) <= 100, rates
    assert all(1638 <= rate <= 2458 for rate in rates), rates
    assert summary.last_report.bad == 0
    assert summary.bad_lines == 0
    assert summary.last_report.sweeps >= len(summary.reports) - 1
    intervals = [later.t_ms - earlier.t_ms for earlier, later in zip(summary.reports, summary.reports[1:])]
    assert all(950 <= interval <= 1200 for interval in intervals), intervals


@pytest.mark.lab
def test_guest_init_survives_workload_error(guest_image):
    append = "console=ttyS0 panic=0 loglevel=5 mlab.wss=abc"

    console, ready_after, status = boot_guest(guest_image, append, 12)
    summary = scan_console(console)

    assert status == 124, console
    assert ready_after is None
    assert summary.workload_errors == [
        "invalid mlab.wss value 'abc': expected a whole number of MiB from 1 to 1048576"]
    assert summary.workload_exit_status == 2, console
    assert summary.kernel_trouble == [], console


@pytest.mark.lab
def test_guest_panic_stays_on_console(guest_image):
    # No /init to run, so the kernel looks for a root device and panics.
    append = "console=ttyS0 panic=0 loglevel=5 rdinit=/missing-init"

    console, _, status = boot_guest(guest_image, append, 12)
    summary = scan_console(console)

    assert status == 124, console
    assert any("Kernel panic - not syncing" in line for line in summary.kernel_trouble), console
    # panic=0 halts the guest: the firmware banner appears once, with no reboot after the panic.
    assert console.count("SeaBIOS (version") == 1, console
