"""What the hosts' QEMU and libvirt can do, and which strategies and options that allows.

The check is a pure function, :func:`stack_problems`, over a :class:`Stack`
(versions, QEMU's migration capabilities, accelerator, userfaultfd and
locked-memory facts) and the scenarios of a playbook, so the rejection
messages can be tested with made-up version tuples. The runner calls it after
connecting to the hosts and before the first guest boots.

QEMU lists its migration capabilities with ``query-migrate-capabilities``;
the harness asks a short-lived probe guest of its own, started paused, so the
answer is the one of the QEMU binary that will run the experiments.

Version facts in REQUIREMENTS come from the libvirt and QEMU release notes
and API documentation ("Since:" of each flag and parameter), except where a
comment says it was measured on this project's default stack (QEMU 10.0.2,
libvirt 11.3.0).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from lab import domain
from lab.environment import version_string

log = logging.getLogger(__name__)

Version = tuple[int, int]

# Name prefix of the capability probe guest.
PROBE_PREFIX = "mlab-capprobe-"
PROBE_MEMORY_MIB = 64
# CAP_SYS_RESOURCE lets a process raise another process's locked-memory limit.
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Requirement:
    """What one strategy or option needs from QEMU, libvirt and the host."""

    qemu_capabilities: tuple[str, ...] = ()
    min_qemu: Version | None = None
    # First QEMU version that no longer has the feature.
    removed_in_qemu: Version | None = None
    min_libvirt: Version | None = None
    needs_userfaultfd: bool = False
    # The dirty-limit throttle works only on KVM's dirty ring.
    needs_kvm: bool = False
    # libvirt raises QEMU's locked-memory limit to this many bytes.
    locked_memory_bytes: int | None = None


REQUIREMENTS: dict[str, Requirement] = {
    "stop-and-copy": Requirement(),
    "precopy": Requirement(),
    # virDomainMigrateSetMaxDowntime: libvirt 0.8.
    "downtime-steps": Requirement(),
    # VIR_MIGRATE_POSTCOPY: libvirt 1.3.3; postcopy needs userfaultfd on the destination.
    "postcopy": Requirement(qemu_capabilities=("postcopy-ram",), min_libvirt=(1, 3), needs_userfaultfd=True),
    "hybrid": Requirement(qemu_capabilities=("postcopy-ram",), min_libvirt=(1, 3), needs_userfaultfd=True),
    # libvirt has no flag for postcopy-preempt up to 11.3; libvirt 11.3 turned
    # QEMU's capability on by itself with VIR_MIGRATE_POSTCOPY when both QEMUs
    # had it (measured with query-migrate-capabilities during a migration).
    # NOTE: earlier libvirt versions were not checked, so 11.3 is the minimum known to work.
    "postcopy-preempt": Requirement(qemu_capabilities=("postcopy-ram", "postcopy-preempt"), min_qemu=(8, 0),
                                    min_libvirt=(11, 3), needs_userfaultfd=True),
    # VIR_MIGRATE_AUTO_CONVERGE: libvirt 1.2.3.
    "auto-converge": Requirement(qemu_capabilities=("auto-converge",), min_libvirt=(1, 2)),
    # QEMU 8.1 added the dirty-limit capability; it refuses it without KVM's
    # dirty ring ("dirty-limit requires KVM with accelerator property
    # 'dirty-ring-size' set", measured under TCG with QEMU 10.0.2). libvirt
    # 11.3 has no flag for it, so the harness sets it through the monitor.
    "dirty-limit": Requirement(qemu_capabilities=("dirty-limit",), min_qemu=(8, 1), needs_kvm=True),
    # VIR_MIGRATE_COMPRESSED with compression=xbzrle: libvirt 1.3.4.
    "xbzrle": Requirement(qemu_capabilities=("xbzrle",), min_libvirt=(1, 3)),
    # VIR_MIGRATE_PARALLEL: libvirt 5.2; QEMU 4.0 made multifd stable.
    "multifd": Requirement(qemu_capabilities=("multifd",), min_qemu=(4, 0), min_libvirt=(5, 2)),
    # virDomainSaveFlags and virDomainRestoreFlags: libvirt 0.9.4.
    "flushing": Requirement(min_libvirt=(0, 9)),
}

OPTION_REQUIREMENTS: dict[str, Requirement] = {
    # auto_converge.initial and .increment: libvirt 2.0.
    "auto_converge_initial_pct": Requirement(min_libvirt=(2, 0)),
    "auto_converge_increment_pct": Requirement(min_libvirt=(2, 0)),
    # QEMU 8.1 added vcpu-dirty-limit and x-vcpu-dirty-limit-period.
    "dirty_limit_mib_s": Requirement(min_qemu=(8, 1)),
    "dirty_limit_period_ms": Requirement(min_qemu=(8, 1)),
    # compression.xbzrle.cache: libvirt 1.3.4.
    "xbzrle_cache_mib": Requirement(min_libvirt=(1, 3)),
    "multifd_channels": Requirement(min_libvirt=(5, 2)),
    # bandwidth.postcopy: libvirt 5.1.
    "postcopy_bandwidth_mib_s": Requirement(min_libvirt=(5, 1)),
    "compression=zlib": Requirement(min_qemu=(5, 0), min_libvirt=(9, 4)),
    "compression=zstd": Requirement(min_qemu=(5, 0), min_libvirt=(9, 4)),
    # QEMU 9.1 removed the compress capability (multi-threaded compression).
    "compression=mt": Requirement(qemu_capabilities=("compress",), removed_in_qemu=(9, 1), min_libvirt=(1, 3)),
    # compression.zlib.level and compression.zstd.level: libvirt 9.4.
    "compression_level": Requirement(min_libvirt=(9, 4)),
    # VIR_MIGRATE_ZEROCOPY: libvirt 8.5; zero-copy-send: QEMU 7.1.
    "zerocopy": Requirement(qemu_capabilities=("zero-copy-send",), min_qemu=(7, 1), min_libvirt=(8, 5)),
    # The sparse save image format (QEMU's mapped-ram, QEMU 9.0) and the
    # parallel.channels save parameter: libvirt 11.2.
    "save_format=sparse": Requirement(qemu_capabilities=("mapped-ram",), min_qemu=(9, 0), min_libvirt=(11, 2)),
    "save_parallel_channels": Requirement(qemu_capabilities=("mapped-ram", "multifd"), min_qemu=(9, 0),
                                          min_libvirt=(11, 2)),
}


@dataclass(frozen=True)
class Stack:
    """The facts about the hosts that decide which strategies can run."""

    qemu: tuple[int, ...]
    libvirt: tuple[int, ...]
    # Capabilities QEMU lists, whether on or off.
    capabilities: frozenset[str]
    accelerator: str = "tcg"
    userfaultfd: bool = True
    # Hard RLIMIT_MEMLOCK of libvirtd's processes in bytes; None is unlimited.
    locked_memory_limit_bytes: int | None = None
    can_raise_locked_memory: bool = True


@dataclass(frozen=True)
class Rejection:
    """One strategy or option a scenario asks for that the stack cannot run."""

    option: str
    missing: tuple[str, ...]
    scenarios: tuple[str, ...] = field(default=())

    def message(self) -> str:
        where = f" (scenarios {', '.join(self.scenarios)})" if self.scenarios else ""
        return f"{self.option} needs {'; '.join(self.missing)}{where}"


def parse_version(text: str) -> tuple[int, ...]:
    """Turn '10.0.2' into (10, 0, 2)."""
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def unmet(requirement: Requirement, stack: Stack) -> list[str]:
    """List in words what *requirement* needs and *stack* lacks; empty when it is met."""
    missing = []
    if requirement.min_qemu and stack.qemu[:2] < requirement.min_qemu:
        missing.append(f"QEMU {_version_text(requirement.min_qemu)} or newer (the hosts have "
                       f"{_version_text(stack.qemu)})")
    if requirement.removed_in_qemu and stack.qemu[:2] >= requirement.removed_in_qemu:
        missing.append(f"QEMU older than {_version_text(requirement.removed_in_qemu)}, which removed it "
                       f"(the hosts have {_version_text(stack.qemu)})")
    if requirement.min_libvirt and stack.libvirt[:2] < requirement.min_libvirt:
        missing.append(f"libvirt {_version_text(requirement.min_libvirt)} or newer (the hosts have "
                       f"{_version_text(stack.libvirt)})")
    absent = [name for name in requirement.qemu_capabilities if name not in stack.capabilities]
    if absent and not (requirement.removed_in_qemu and stack.qemu[:2] >= requirement.removed_in_qemu):
        missing.append("QEMU migration capabilit" + ("ies " if len(absent) > 1 else "y ")
                       + ", ".join(repr(name) for name in absent))
    if requirement.needs_userfaultfd and not stack.userfaultfd:
        missing.append("a usable userfaultfd on the destination (run as root, or set "
                       "vm.unprivileged_userfaultfd=1)")
    if requirement.needs_kvm and stack.accelerator != "kvm":
        missing.append(f"KVM with a dirty ring, but the lab runs {stack.accelerator.upper()}")
    if requirement.locked_memory_bytes is not None and not stack.can_raise_locked_memory:
        limit = stack.locked_memory_limit_bytes
        if limit is not None and limit < requirement.locked_memory_bytes:
            missing.append(f"a locked-memory limit of at least {requirement.locked_memory_bytes >> 20} MiB "
                           f"for QEMU, but the hard limit is {limit >> 20} MiB and the harness lacks "
                           "CAP_SYS_RESOURCE to raise it (raise 'ulimit -l' for the harness, or run with "
                           "CAP_SYS_RESOURCE)")
    return missing


def scenario_requirements(values: dict[str, Any]) -> list[tuple[str, Requirement]]:
    """List (label, requirement) for the strategy and each option one scenario sets.

    *values* are Scenario.values(). The labels name the option as a playbook
    writes it, for example ``compression=zstd``.
    """
    strategy = values["strategy"]
    needed = [(f"strategy {strategy}", REQUIREMENTS[strategy])]
    for name in ("auto_converge_initial_pct", "auto_converge_increment_pct", "dirty_limit_mib_s",
                 "dirty_limit_period_ms", "xbzrle_cache_mib", "multifd_channels", "postcopy_bandwidth_mib_s",
                 "compression_level", "save_parallel_channels"):
        if values.get(name) is not None:
            needed.append((name, OPTION_REQUIREMENTS[name]))
    compression = values.get("compression", "none")
    if compression != "none":
        needed.append((f"compression={compression}", OPTION_REQUIREMENTS[f"compression={compression}"]))
    if values.get("zerocopy"):
        base = OPTION_REQUIREMENTS["zerocopy"]
        locked = Requirement(qemu_capabilities=base.qemu_capabilities, min_qemu=base.min_qemu,
                             min_libvirt=base.min_libvirt, locked_memory_bytes=values["memory_mib"] << 20)
        needed.append(("zerocopy", locked))
    if values.get("save_format") == "sparse":
        needed.append(("save_format=sparse", OPTION_REQUIREMENTS["save_format=sparse"]))
    return needed


def stack_problems(scenarios: list[tuple[str, dict[str, Any]]], stack: Stack) -> list[Rejection]:
    """Return what the scenarios ask for and *stack* cannot run, one Rejection per option.

    *scenarios* are (scenario_id, values) pairs. Each rejected option lists
    the scenarios that use it.
    """
    found: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for scenario_id, values in scenarios:
        for label, requirement in scenario_requirements(values):
            missing = tuple(unmet(requirement, stack))
            if missing:
                found.setdefault((label, missing), []).append(scenario_id)
    return [Rejection(label, missing, tuple(ids)) for (label, missing), ids in found.items()]


def sparse_save_supported(stack: Stack) -> bool:
    """Return True when the stack writes save images in the sparse (mapped-ram) format."""
    return not unmet(OPTION_REQUIREMENTS["save_format=sparse"], stack)


# -- facts from the running system -----------------------------------------------------


def query_migrate_capabilities(dom: libvirt.virDomain) -> dict[str, bool]:
    """Return QEMU's migration capabilities and their states from a running guest's monitor."""
    reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "query-migrate-capabilities"}), 0)
    return {item["capability"]: bool(item["state"]) for item in json.loads(reply)["return"]}


def userfaultfd_usable() -> tuple[bool, str]:
    """Try the userfaultfd system call, which postcopy needs on the destination."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall_number = 323  # userfaultfd on x86_64
    fd = libc.syscall(syscall_number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        return True, "userfaultfd works for this user"
    errno = ctypes.get_errno()
    return False, f"userfaultfd failed: {os.strerror(errno)} (vm.unprivileged_userfaultfd=0 needs root)"


def locked_memory_facts() -> tuple[int | None, bool]:
    """Return (hard RLIMIT_MEMLOCK in bytes or None for unlimited, whether CAP_SYS_RESOURCE is held).

    The lab's libvirtd daemons inherit both from the harness, and libvirt must
    raise QEMU's limit to the guest's memory size for zero-copy send.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = None if hard == resource.RLIM_INFINITY else hard
    effective = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    except OSError as exc:
        log.debug("cannot read the capability set: %s", exc)
    return limit, bool(effective >> CAP_SYS_RESOURCE & 1)


def probe_capabilities(conn: libvirt.virConnect, kernel: Path, initrd: Path) -> dict[str, bool]:
    """Start a paused TCG probe guest on *conn*, read QEMU's migration capabilities, remove it.

    The guest never runs a vCPU, so the probe takes well under a second.
    """
    spec = domain.GuestSpec(name=f"{PROBE_PREFIX}{secrets.token_hex(3)}", run_id="capability-probe",
                            memory_mib=PROBE_MEMORY_MIB, vcpus=1, kernel=kernel, initrd=initrd,
                            cmdline="console=ttyS0", accelerator="tcg", bridge=None, serial_console=False)
    dom = conn.createXML(domain.domain_xml(spec), libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        return query_migrate_capabilities(dom)
    finally:
        domain.destroy(dom)


def stack_facts(source: libvirt.virConnect, destination: libvirt.virConnect, capabilities: dict[str, bool],
                accelerator: str) -> Stack:
    """Build the Stack of two hosts: the older QEMU and libvirt of the two count."""
    qemu = min(parse_version(version_string(conn.getVersion())) for conn in (source, destination))
    libvirt_version = min(parse_version(version_string(conn.getLibVersion())) for conn in (source, destination))
    limit, can_raise = locked_memory_facts()
    return Stack(qemu=qemu, libvirt=libvirt_version, capabilities=frozenset(capabilities),
                 accelerator=accelerator, userfaultfd=userfaultfd_usable()[0],
                 locked_memory_limit_bytes=limit, can_raise_locked_memory=can_raise)


def cached_capabilities(conn: libvirt.virConnect, kernel: Path, initrd: Path, state_dir: Path) -> dict[str, bool]:
    """Return QEMU's migration capabilities, probed once per QEMU and libvirt version."""
    key = f"{conn.getVersion()}:{conn.getLibVersion()}"
    cache = state_dir / "migration-capabilities.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return dict(cached["capabilities"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    capabilities = probe_capabilities(conn, kernel, initrd)
    state_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "capabilities": capabilities}))
    return capabilities
