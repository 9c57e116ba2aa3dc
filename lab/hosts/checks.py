"""Preflight checks of the hosts of an inventory, run on every host in parallel over SSH.

Each libvirt host gets eight checks: SSH login with the pinned host key,
libvirt and QEMU versions, an accelerator proven by booting the guest image,
userfaultfd (which postcopy needs on the destination), free memory for the
guest, the clock offset to the harness's machine, the guest image with
the same checksums as here, and the tools and privileges of the playbook's
faults (on the destination for link-down, kill-qemu and kill-libvirtd, on
the source for bandwidth). A client host gets the SSH and clock checks only.

Each check ends as ok, warn, fail or skip (when an earlier check failed).
A playbook decides which checks it needs: userfaultfd only for strategies
with a postcopy phase, the memory size from its largest guest.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import libvirt
import paramiko

from lab import domain
from lab.accel import READY_MARK, choose_accelerator
from lab.capabilities import Requirement, scenario_requirements
from lab.environment import version_string
from lab.errors import ConfigError, HostError, LabError
from lab.faults import DESTINATION_KINDS, fault_host_problems
from lab.guest.image import GuestImage, kernel_cmdline
from lab.hosts.access import detect_interface
from lab.hosts.image_push import image_missing, local_checksums, remote_paths
from lab.hosts.remote import HostKeyChangedError, RemoteHost, fingerprint
from lab.hosts.shell import HostFile
from lab.inventory import Inventory, InventoryHost
from lab.paths import state_dir
from lab.playbook import Playbook

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "skip"]
CHECKS = ("ssh", "libvirt", "accelerator", "userfaultfd", "memory", "clock", "image", "faults")
CLIENT_CHECKS = ("ssh", "clock")

# The harness uses migrate3 parameters of libvirt 9.0 and was run with 9.0 and 11.3.
MIN_LIBVIRT = (9, 0)
# Debian 12's QEMU 7.2 corrupted TCG guests during migration; 10.0 did not.
MIN_QEMU = (8, 0)
TESTED_QEMU = (10, 0)
# QEMU's own memory beside the guest RAM, an estimate for TCG guests of 256 MiB.
QEMU_OVERHEAD_MIB = 160
DEFAULT_GUEST_MEMORY_MIB = 256
# A small guest is enough to prove an accelerator: the workload prints its
# ready line a few seconds after the kernel starts.
PROBE_MEMORY_MIB = 128
PROBE_WORKING_SET_MIB = 16
TCG_PROBE_DEADLINE_S = 90.0
CLOCK_PROBES = 5
COMMAND_TIMEOUT_S = 30.0

# Tries the userfaultfd system call (323 on x86_64) as the SSH user and
# prints the result, then the vm.unprivileged_userfaultfd setting.
USERFAULTFD_SCRIPT = """
import ctypes, os, platform
if platform.machine() != "x86_64":
    print("unknown", "no syscall number for", platform.machine())
else:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        print("ok")
    else:
        print("error", os.strerror(ctypes.get_errno()))
try:
    print("sysctl", open("/proc/sys/vm/unprivileged_userfaultfd").read().strip())
except OSError:
    print("sysctl", "missing")
"""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check on one host: a short summary for the table and the detail of a problem."""

    status: Status
    summary: str
    detail: str | None = None
    needed: bool = True


@dataclass
class HostReport:
    host: InventoryHost
    results: dict[str, CheckResult] = field(default_factory=dict)

    @property
    def failures(self) -> list[tuple[str, CheckResult]]:
        """Failed checks that the playbook needs."""
        return [(name, result) for name, result in self.results.items()
                if result.status == "fail" and result.needed]


@dataclass
class PreflightReport:
    inventory: Inventory
    hosts: list[HostReport]
    # Problems between hosts, such as different QEMU versions.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(report.failures for report in self.hosts)


@dataclass(frozen=True)
class Requirements:
    """Needs of the experiment from each libvirt host."""

    memory_mib: int = DEFAULT_GUEST_MEMORY_MIB
    postcopy: bool = True
    # (label, requirement) of each strategy and option the scenarios use, such as "strategy postcopy".
    features: tuple[tuple[str, Requirement], ...] = ()
    accelerator: str = "auto"
    # Fault kinds that the playbook strikes, such as "link-down".
    faults: tuple[str, ...] = ()

    @classmethod
    def from_playbook(cls, playbook: Playbook | None, accelerator: str = "auto") -> Requirements:
        """Derive the needs from a playbook; without one, every check is needed for a 256 MiB guest."""
        if playbook is None:
            return cls(accelerator=accelerator)
        scenarios = playbook.scenarios()
        features: dict[str, Requirement] = {}
        for scenario in scenarios:
            features.update(scenario_requirements(scenario.values()))
        return cls(memory_mib=max(scenario.memory_mib for scenario in scenarios),
                   postcopy=any(requirement.needs_userfaultfd for requirement in features.values()),
                   features=tuple(features.items()), accelerator=accelerator,
                   faults=tuple(sorted({scenario.fault.kind for scenario in scenarios if scenario.fault})))


def _ok(summary: str, detail: str | None = None) -> CheckResult:
    return CheckResult("ok", summary, detail)


def _fail(summary: str, detail: str, needed: bool = True) -> CheckResult:
    return CheckResult("fail", summary, detail, needed)


def _skip(reason: str) -> CheckResult:
    return CheckResult("skip", reason)


def accelerator_cache_dir(inventory: Inventory, host: InventoryHost) -> Path:
    """Folder of the cached accelerator verdict of one inventory host."""
    return state_dir() / "accelerator" / inventory.name / host.name


# Individual checks.

def check_ssh(remote: RemoteHost) -> CheckResult:
    try:
        remote.connect()
    except HostKeyChangedError as error:
        return _fail("host key changed", str(error))
    except HostError as error:
        return _fail("unreachable", str(error))
    transport = remote.connection.client.get_transport()
    key = transport.get_remote_server_key() if transport is not None else None
    return _ok("ok", fingerprint(key) if key else None)


def measure_clock_offset(remote: RemoteHost, probes: int = CLOCK_PROBES) -> tuple[float, float]:
    """Return (offset, uncertainty) of the host's clock against this machine's, in seconds.

    One shell on the host prints its time for every line it reads, so a
    probe costs one round trip on an open channel. The probe with the
    shortest round trip wins; its uncertainty is half that round trip.
    """
    transport = remote.connection.client.get_transport()
    if transport is None:
        raise HostError(f"SSH connection to {remote.name} is closed")
    channel = transport.open_session(timeout=COMMAND_TIMEOUT_S)
    try:
        channel.settimeout(COMMAND_TIMEOUT_S)
        channel.exec_command("sh -c 'while read -r line; do date +%s.%N; done'")
        output = channel.makefile("rb")
        best: tuple[float, float] | None = None
        for _ in range(probes):
            sent = time.time()
            channel.sendall(b"\n")
            line = output.readline()
            received = time.time()
            try:
                remote_time = float(line)
            except ValueError:
                raise HostError(f"date on host {remote.name} printed {line[:80]!r}, expected seconds") from None
            half_round_trip = (received - sent) / 2
            offset = remote_time - (sent + half_round_trip)
            if best is None or half_round_trip < best[1]:
                best = (offset, half_round_trip)
        assert best is not None
        return best
    except (paramiko.SSHException, OSError) as error:
        raise HostError(f"clock probe on host {remote.name} failed: {error}") from error
    finally:
        channel.close()


def check_clock(remote: RemoteHost, tolerance_ms: int) -> CheckResult:
    try:
        offset, uncertainty = measure_clock_offset(remote)
    except HostError as error:
        return _fail("probe failed", str(error))
    offset_ms, uncertainty_ms = offset * 1000, uncertainty * 1000
    summary = f"{offset_ms:+.1f}±{uncertainty_ms:.1f} ms"
    if abs(offset_ms) + uncertainty_ms <= tolerance_ms:
        return _ok(summary)
    if abs(offset_ms) <= tolerance_ms:
        return CheckResult("warn", summary, f"the offset of {offset_ms:+.1f} ms is within the tolerance of "
                                            f"{tolerance_ms} ms, but the measurement is uncertain by "
                                            f"{uncertainty_ms:.1f} ms")
    return _fail(summary, f"the clock of {remote.name} is {offset_ms:+.1f} ms off this machine's, more than "
                          f"clock_tolerance_ms ({tolerance_ms} ms); synchronize it with NTP (chrony or "
                          "systemd-timesyncd)")


def _version(number: int) -> tuple[int, int]:
    return (number // 1_000_000, number // 1000 % 1000)


def check_versions(conn: libvirt.virConnect, requirements: Requirements) -> CheckResult:
    qemu, libvirt_version = conn.getVersion(), conn.getLibVersion()
    summary = f"{version_string(libvirt_version)}/{version_string(qemu)}"
    if _version(libvirt_version) < MIN_LIBVIRT:
        return _fail(summary, f"libvirt {version_string(libvirt_version)} is older than "
                              f"{MIN_LIBVIRT[0]}.{MIN_LIBVIRT[1]}, which the harness needs; install a newer one "
                              "(on Debian 12 from bookworm-backports)")
    if _version(qemu) < MIN_QEMU:
        return _fail(summary, f"QEMU {version_string(qemu)} is older than {MIN_QEMU[0]}.{MIN_QEMU[1]}; Debian "
                              "12's QEMU 7.2 corrupted TCG guests during migration, so install QEMU from "
                              "bookworm-backports")
    for label, requirement in requirements.features:
        if requirement.min_qemu and _version(qemu) < requirement.min_qemu:
            return _fail(summary, f"{label} needs QEMU {requirement.min_qemu[0]}.{requirement.min_qemu[1]} "
                                  "or newer")
        if requirement.min_libvirt and _version(libvirt_version) < requirement.min_libvirt:
            return _fail(summary, f"{label} needs libvirt {requirement.min_libvirt[0]}."
                                  f"{requirement.min_libvirt[1]} or newer")
    if _version(qemu) < TESTED_QEMU:
        return CheckResult("warn", summary, f"the harness was tested with QEMU {TESTED_QEMU[0]}.{TESTED_QEMU[1]};"
                                            f" results with {version_string(qemu)} may differ")
    return _ok(summary)


def check_userfaultfd(remote: RemoteHost, requirements: Requirements) -> CheckResult:
    needed = requirements.postcopy
    result = remote.run(["python3", "-c", USERFAULTFD_SCRIPT], timeout=COMMAND_TIMEOUT_S, check=False)
    if result.returncode == 127:
        return CheckResult("warn", "unknown", "python3 is not installed on the host, so userfaultfd was not "
                                              "tried; postcopy will fail if it is not usable", needed)
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in result.stdout.splitlines())
    sysctl = lines.get("sysctl", "missing")
    if "ok" in lines:
        return CheckResult("ok", "ok", f"usable by {remote.host.user}, vm.unprivileged_userfaultfd={sysctl}",
                           needed)
    reason = lines.get("error") or lines.get("unknown") or result.stderr.strip() or "no output"
    return CheckResult("fail", "not usable", f"userfaultfd failed for {remote.host.user}: {reason} "
                                             f"(vm.unprivileged_userfaultfd={sysctl}); postcopy needs it on the "
                                             "destination, so run QEMU as root or set "
                                             "vm.unprivileged_userfaultfd=1", needed)


def check_memory(remote: RemoteHost, requirements: Requirements) -> CheckResult:
    text = (remote.read_bytes("/proc/meminfo") or b"").decode()
    available = None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) // 1024
    if available is None:
        return _fail("unknown", f"/proc/meminfo on {remote.name} has no MemAvailable line")
    needed = requirements.memory_mib + QEMU_OVERHEAD_MIB
    summary = f"{available} MiB"
    if available < needed:
        return _fail(summary, f"a {requirements.memory_mib} MiB guest needs about {needed} MiB on the host "
                              f"(with {QEMU_OVERHEAD_MIB} MiB for QEMU), but {available} MiB are available; free "
                              "memory on the host or use a smaller guest")
    return _ok(summary)


def check_image(remote: RemoteHost, inventory: Inventory, image: GuestImage,
                expected: dict[str, str]) -> CheckResult:
    missing = image_missing(remote, inventory, image, expected)
    if missing:
        where = remote_paths(inventory, image)[missing[0]].rsplit("/", 1)[0]
        return _fail("missing" if len(missing) == len(expected) else "differs",
                     f"{', '.join(missing)} of image {image.digest[:12]} missing or different in {where}; copy "
                     f"it with: migrlab image push {inventory.path or 'INVENTORY'}")
    return _ok("ok", f"image {image.digest[:12]} in {remote_paths(inventory, image)['vmlinuz'].rsplit('/', 1)[0]}")


def check_faults(remote: RemoteHost, inventory: Inventory, requirements: Requirements) -> CheckResult:
    """Check the tools and privileges of the faults that strike on this host, and the SSH path for link-down."""
    try:
        source, destination = inventory.migration_hosts()
    except ConfigError:
        return _ok("no migration", "the inventory has fewer than two libvirt hosts")
    kinds = set(requirements.faults)
    if remote.host.name == destination.name:
        kinds &= set(DESTINATION_KINDS)
    elif remote.host.name == source.name:
        kinds -= set(DESTINATION_KINDS)
    else:
        kinds = set()
    if not kinds:
        return _ok("none", "no fault of the playbook strikes on this host")
    entry = remote.host
    interface = entry.migration_interface or detect_interface(remote, entry.lab_address)
    problems = fault_host_problems(remote, entry, kinds, interface=interface)
    if problems:
        return _fail("not ready", "; ".join(problems))
    return _ok(", ".join(sorted(kinds)), f"tools and privileges present on {interface}")


def _probe_spec(host: InventoryHost, inventory: Inventory, image: GuestImage, accelerator: str) -> domain.GuestSpec:
    paths = remote_paths(inventory, image)
    name = f"{domain.NAME_PREFIX}preflight-{host.name}-{secrets.token_hex(3)}"
    return domain.GuestSpec(name=name, run_id="preflight", memory_mib=PROBE_MEMORY_MIB, vcpus=1,
                            kernel=Path(paths["vmlinuz"]), initrd=Path(paths["initrd.img"]),
                            cmdline=kernel_cmdline(PROBE_WORKING_SET_MIB, 0, "sequential"),
                            accelerator=accelerator, bridge=None)


def boot_probe(conn: libvirt.virConnect, remote: RemoteHost, spec: domain.GuestSpec,
               deadline_s: float) -> tuple[bool, str]:
    """Boot ``spec`` and wait until its workload prints its ready line; the guest is removed afterwards."""
    console = HostFile(remote, spec.console_path)
    started = time.monotonic()
    try:
        dom = domain.boot(conn, spec)
    except libvirt.libvirtError as error:
        return False, f"the guest failed to start: {error.get_error_message()}"
    try:
        while time.monotonic() - started < deadline_s:
            try:
                if READY_MARK in console.read_text(errors="replace"):
                    return True, f"the guest reached its workload in {time.monotonic() - started:.1f} s"
            except FileNotFoundError:
                pass
            if not dom.isActive():
                return False, "the guest stopped before its workload started"
            time.sleep(0.5)
        return False, f"the guest did not reach its workload within {deadline_s:.0f} s"
    finally:
        domain.destroy(dom)
        console.unlink(missing_ok=True)


def check_accelerator(conn: libvirt.virConnect, remote: RemoteHost, inventory: Inventory, image: GuestImage,
                      requirements: Requirements) -> CheckResult:
    """Prove an accelerator by booting the guest image: KVM if it works, else TCG."""
    kvm_spec = _probe_spec(remote.host, inventory, image, "kvm")
    try:
        chosen, reason = choose_accelerator(conn, kvm_spec, HostFile(remote, kvm_spec.console_path),
                                            accelerator_cache_dir(inventory, remote.host),
                                            requested=requirements.accelerator)
    except LabError as error:
        return _fail("kvm unusable", str(error))
    if chosen == "kvm":
        return _ok("kvm", reason)
    booted, tcg_reason = boot_probe(conn, remote, _probe_spec(remote.host, inventory, image, "tcg"),
                                    TCG_PROBE_DEADLINE_S)
    if booted:
        return _ok("tcg", f"KVM: {reason}; TCG: {tcg_reason}")
    return _fail("none", f"KVM: {reason}; TCG: {tcg_reason}")


# One host.

def check_host(entry: InventoryHost, inventory: Inventory, image: GuestImage, expected: dict[str, str],
               requirements: Requirements) -> HostReport:
    """Run every check on one host; a check that raises is reported as failed, never propagated."""
    report = HostReport(entry)
    names = CHECKS if entry.is_libvirt_host else CLIENT_CHECKS
    remote = RemoteHost(entry, inventory)
    try:
        report.results["ssh"] = check_ssh(remote)
        if report.results["ssh"].status == "fail":
            for name in names[1:]:
                report.results[name] = _skip("no SSH")
            return report
        report.results["clock"] = _guarded(lambda: check_clock(remote, inventory.clock_tolerance_ms))
        if entry.is_libvirt_host:
            _check_libvirt_host(report, remote, inventory, image, expected, requirements)
        return report
    finally:
        remote.close()


def _guarded(check) -> CheckResult:
    try:
        return check()
    except (HostError, libvirt.libvirtError, OSError) as error:
        message = error.get_error_message() if isinstance(error, libvirt.libvirtError) else str(error)
        return _fail("error", message)


def _check_libvirt_host(report: HostReport, remote: RemoteHost, inventory: Inventory, image: GuestImage,
                        expected: dict[str, str], requirements: Requirements) -> None:
    results = report.results
    results["memory"] = _guarded(lambda: check_memory(remote, requirements))
    results["userfaultfd"] = _guarded(lambda: check_userfaultfd(remote, requirements))
    results["image"] = _guarded(lambda: check_image(remote, inventory, image, expected))
    results["faults"] = _guarded(lambda: check_faults(remote, inventory, requirements))
    try:
        conn = remote.open_libvirt()
    except (HostError, libvirt.libvirtError) as error:
        results["libvirt"] = _fail("unreachable", str(error))
        results["accelerator"] = _skip("no libvirt")
        return
    try:
        results["libvirt"] = _guarded(lambda: check_versions(conn, requirements))
        if results["image"].status != "ok":
            results["accelerator"] = _skip("no image")
        else:
            results["accelerator"] = _guarded(lambda: check_accelerator(conn, remote, inventory, image,
                                                                        requirements))
    finally:
        try:
            conn.close()
        except libvirt.libvirtError as error:
            log.debug("closing libvirt on %s failed: %s", remote.name, error)


def check_hosts(inventory: Inventory, image: GuestImage, requirements: Requirements) -> PreflightReport:
    """Check every host of the inventory in parallel and compare the libvirt hosts' versions."""
    expected = local_checksums(image)
    with ThreadPoolExecutor(max_workers=len(inventory.hosts)) as pool:
        reports = list(pool.map(lambda entry: check_host(entry, inventory, image, expected, requirements),
                                inventory.hosts))
    report = PreflightReport(inventory, reports)
    versions = {host.host.name: host.results["libvirt"].summary for host in reports
                if "libvirt" in host.results and host.results["libvirt"].status in ("ok", "warn")}
    if len(set(versions.values())) > 1:
        listing = "; ".join(f"{name}: {value}" for name, value in versions.items())
        report.notes.append(f"the libvirt hosts run different versions ({listing}); migrations between them "
                            "work, but runs in the two directions may not compare")
    return report
