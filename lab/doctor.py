"""``migrlab doctor``: what this machine's lab can run, and what each strategy still needs.

run_doctor() brings the local lab up if needed, builds or reuses the guest
image and chooses the accelerator the way the runner does. It reports the
versions, userfaultfd, the locked-memory facts and QEMU's migration
capabilities, read from a short-lived paused TCG probe guest of its own.
Last, it lists every strategy and option as "supported" or with what it needs.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import libvirt

from lab import domain, paths
from lab.accel import choose_accelerator
from lab.capabilities import (OPTION_REQUIREMENTS, REQUIREMENTS, Requirement, Stack, locked_memory_facts,
                              probe_capabilities, stack_facts, unmet, userfaultfd_usable)
from lab.environment import version_string
from lab.events import open_connection
from lab.guest.image import build_image, kernel_cmdline
from lab.hosts.local import LocalLab

log = logging.getLogger(__name__)

# Guest memory assumed for the zero-copy check: the quickstart's guest size.
ZEROCOPY_MEMORY_MIB = 256
ACCELERATOR_PROBE = "mlab-accel-probe"


def _requirement_text(requirement: Requirement, stack: Stack) -> str:
    missing = unmet(requirement, stack)
    return "supported" if not missing else "needs " + "; ".join(missing)


def stack_report(stack: Stack) -> dict[str, str]:
    """Return "supported" or what is missing for every strategy and option, on *stack*."""
    report = {f"strategy {name}": _requirement_text(requirement, stack)
              for name, requirement in REQUIREMENTS.items()}
    for name, requirement in OPTION_REQUIREMENTS.items():
        if name == "zerocopy":
            requirement = Requirement(qemu_capabilities=requirement.qemu_capabilities,
                                      min_qemu=requirement.min_qemu, min_libvirt=requirement.min_libvirt,
                                      locked_memory_bytes=ZEROCOPY_MEMORY_MIB << 20)
            name = f"zerocopy ({ZEROCOPY_MEMORY_MIB} MiB guest)"
        report[f"option {name}"] = _requirement_text(requirement, stack)
    return report


def run_doctor(accelerator: str = "auto", lab: LocalLab | None = None) -> dict[str, str]:
    """Check the local lab (brought up if needed) and return check -> result, in display order."""
    lab = lab or LocalLab()
    report: dict[str, str] = {}
    lab.up(hosts=2)
    source_host, destination_host = (host for host in lab.hosts() if host.is_libvirt_host)
    report["lab"] = f"up at {lab.root}: source {source_host.name}, destination {destination_host.name}"
    image = build_image()
    report["guest image"] = f"{image.digest[:16]} (kernel {image.kernel_version})"

    source = open_connection(source_host.libvirt_uri)
    destination = open_connection(destination_host.libvirt_uri)
    try:
        chosen, reason = _choose_accelerator(source, source_host.log_dir, image, accelerator)
        report["accelerator"] = f"{chosen}: {reason}"
        report["QEMU"] = version_string(source.getVersion())
        report["libvirt"] = version_string(source.getLibVersion())
        report["libvirt-python"] = version_string(libvirt.getVersion())
        usable, detail = userfaultfd_usable()
        report["userfaultfd"] = ("usable: " if usable else "not usable: ") + detail
        limit, can_raise = locked_memory_facts()
        report["locked memory"] = (f"hard limit {'unlimited' if limit is None else f'{limit >> 20} MiB'}; "
                                   f"CAP_SYS_RESOURCE {'held' if can_raise else 'missing'}")
        capabilities = probe_capabilities(source, image.kernel, image.initrd)
        report["QEMU migration capabilities"] = ", ".join(sorted(capabilities))
        report.update(stack_report(stack_facts(source, destination, capabilities, chosen)))
    finally:
        for conn in (source, destination):
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
    return report


def _choose_accelerator(conn: libvirt.virConnect, log_dir: Path, image, requested: str) -> tuple[str, str]:
    spec = domain.GuestSpec(name=ACCELERATOR_PROBE, run_id="accelerator-probe", memory_mib=192, vcpus=1,
                            kernel=image.kernel, initrd=image.initrd, cmdline=kernel_cmdline(16, 1, "random"),
                            accelerator="kvm", bridge=None)
    console = Path(log_dir) / "qemu" / f"{ACCELERATOR_PROBE}-console.log"
    return choose_accelerator(conn, spec, console, paths.state_dir(), requested=requested)
