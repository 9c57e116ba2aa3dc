#!/usr/bin/env python3
"""Break a postcopy migration on a private local lab, then resume it one of two ways.

The script brings up its own two-host lab (its own namespace prefix and
root folder), boots one guest on h1 and migrates it to h2 with postcopy
(8 MiB/s, then 1 MiB/s after the switch). Half a second after the switch it
cuts h2's lab link, waits 6 s, pauses the migration with
abortJobFlags(VIR_DOMAIN_ABORT_JOB_POSTCOPY), brings the link up and
resumes:

  --resume-with libvirt   virDomainMigrate3 with VIR_MIGRATE_POSTCOPY_RESUME
                          and the first call's parameters. libvirtd 11.3 on
                          h2 crashed with SIGSEGV on this call
                          (docs/postcopy-recovery.md).
  --resume-with qmp       QEMU's migrate-recover on h2 and migrate with
                          resume on h1, as the harness does
                          (lab.faults.resume_postcopy).

It then removes the guest, takes the lab down and deletes its folder, also
after an error or Ctrl-C.

Exit status: 0 when the resumed migration completed and the guest runs on
h2, 1 when h2's libvirtd died during the resume, 2 for any other failure.

Usage: .venv/bin/python scripts/postcopy_resume_crash.py [--resume-with libvirt|qmp] [--prefix prc] [--root /tmp/prc-lab]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from lab import domain  # noqa: E402
from lab.errors import LabError  # noqa: E402
from lab.faults import (LIBVIRT_SETTLE_S, domain_state, kill_leftover_qemu,  # noqa: E402
                        resume_postcopy_through_socket, wait_for_migrated_guest)
from lab.guest.console import scan_console  # noqa: E402
from lab.guest.image import build_image, kernel_cmdline  # noqa: E402
from lab.hosts.local import LocalLab  # noqa: E402

BANDWIDTH_MIB_S = 8
POSTCOPY_BANDWIDTH_MIB_S = 1
CUT_AFTER_SWITCH_S = 0.5
CUT_FOR_S = 6.0
RESUME_TIMEOUT_S = 150.0
BOOT_TIMEOUT_S = 120.0
FIRST_ITERATION_TIMEOUT_S = 300.0
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"


class Failure(Exception):
    """A failed step of the reproduction, named in the message."""


def say(started: float, text: str) -> None:
    print(f"{time.monotonic() - started:7.1f} s  {text}", flush=True)


def destination_xml(dom: libvirt.virDomain, socket: Path) -> str:
    """Return the guest's XML with an extra QMP socket for the destination QEMU."""
    ET.register_namespace("qemu", QEMU_NAMESPACE)
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    commandline = ET.SubElement(root, f"{{{QEMU_NAMESPACE}}}commandline")
    ET.SubElement(commandline, f"{{{QEMU_NAMESPACE}}}arg", value="-qmp")
    ET.SubElement(commandline, f"{{{QEMU_NAMESPACE}}}arg", value=f"unix:{socket},server=on,wait=off")
    return ET.tostring(root, encoding="unicode")


def wait_for_workload(console: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if console.exists() and len(scan_console(console.read_text(errors="replace")).reports) >= 2:
            return
        time.sleep(0.5)
    raise Failure(f"the guest printed no workload reports in {console} within {timeout_s:g} s")


def libvirtd_pid(lab: LocalLab, host: str) -> int:
    return int((lab.host_dir(host) / "run" / "libvirtd.pid").read_text().strip())


def process_gone(pid: int, timeout_s: float) -> bool:
    """Wait until process *pid* has exited (or is a zombie); return whether it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def break_postcopy(lab: LocalLab, source: libvirt.virConnect, destination: libvirt.virConnect,
                   dom: libvirt.virDomain, params: dict, flags: int, started: float) -> None:
    """Start the migration, switch to postcopy, cut the link, pause the migration and restore the link."""
    box: dict[str, object] = {}

    def migrate() -> None:
        try:
            box["domain"] = dom.migrate3(destination, params, flags)
        except libvirt.libvirtError as exc:
            box["error"] = exc.get_error_message()

    worker = threading.Thread(target=migrate, daemon=True)
    worker.start()
    deadline = time.monotonic() + FIRST_ITERATION_TIMEOUT_S
    while True:
        if not worker.is_alive():
            raise Failure(f"the migration ended before the switch to postcopy: {box}")
        stats = dom.jobStats()
        if time.monotonic() > deadline:
            raise Failure(f"the first memory iteration did not end within {FIRST_ITERATION_TIMEOUT_S:g} s "
                          f"(job statistics: {stats})")
        if stats.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED and stats.get("memory_iteration", 0) >= 1:
            break
        time.sleep(0.2)
    dom.migrateStartPostCopy(0)
    say(started, "switched to postcopy")
    time.sleep(CUT_AFTER_SWITCH_S)
    lab.exec("h2", ["ip", "link", "set", "eth0", "down"], timeout=20)
    say(started, "h2's link eth0 down")
    time.sleep(CUT_FOR_S)
    if worker.is_alive():
        dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
        say(started, "migration paused with abortJobFlags(VIR_DOMAIN_ABORT_JOB_POSTCOPY)")
    lab.exec("h2", ["ip", "link", "set", "eth0", "up"], timeout=20)
    say(started, "h2's link eth0 up")
    worker.join(60)
    if worker.is_alive():
        raise Failure("virDomainMigrate3 had not returned 60 s after the pause")
    say(started, f"virDomainMigrate3 returned: {box.get('error', 'no error')}")
    name = dom.name()
    state = domain_state(source, name)
    say(started, f"states: h1 {state}, h2 {domain_state(destination, name)}")
    if not state.startswith("paused/postcopy"):
        raise Failure(f"the guest on h1 is {state}, not paused in postcopy, so there is nothing to resume")


def resume_with_libvirt(lab: LocalLab, destination: libvirt.virConnect, dom: libvirt.virDomain, params: dict,
                        flags: int, started: float) -> int:
    pid = libvirtd_pid(lab, "h2")
    box: dict[str, object] = {}

    def resume() -> None:
        try:
            box["domain"] = dom.migrate3(destination, params, flags | libvirt.VIR_MIGRATE_POSTCOPY_RESUME)
        except libvirt.libvirtError as exc:
            box["error"] = exc.get_error_message()

    say(started, f"virDomainMigrate3 with VIR_MIGRATE_POSTCOPY_RESUME (h2's libvirtd is pid {pid})")
    worker = threading.Thread(target=resume, daemon=True)
    worker.start()
    worker.join(RESUME_TIMEOUT_S)
    if process_gone(pid, timeout_s=10.0):
        say(started, f"h2's libvirtd (pid {pid}) died during the resume: {box.get('error')}")
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
        segfaults = [line.strip() for line in kernel.splitlines() if "segfault" in line and "libvirt" in line]
        if segfaults:
            say(started, f"last libvirt segfault in the kernel log: {segfaults[-1]}")
        return 1
    if worker.is_alive():
        raise Failure(f"the resume call had not returned after {RESUME_TIMEOUT_S:g} s")
    if "error" in box:
        raise Failure(f"the resume call failed: {box['error']}")
    say(started, "the resume call returned without error")
    return 0


def resume_with_qmp(dom: libvirt.virDomain, socket: Path, migration_uri: str, started: float) -> int:
    say(started, "resuming with migrate-recover on h2 and migrate with resume on h1")
    result = resume_postcopy_through_socket(dom, socket, migration_uri, RESUME_TIMEOUT_S)
    for step in result.steps:
        print(f"           step: {step}", flush=True)
    if not result.finished:
        raise Failure(f"the QMP recovery failed: {result.error}")
    say(started, f"QEMU completed the resumed migration {result.took_s:.1f} s after the resume command")
    return 0


def reproduce(lab: LocalLab, resume_with: str) -> int:
    started = time.monotonic()
    image = build_image()
    source = libvirt.open(lab.host("h1").libvirt_uri)
    destination = libvirt.open(lab.host("h2").libvirt_uri)
    name = f"{domain.NAME_PREFIX}prc-{secrets.token_hex(3)}"
    socket = lab.root / "qmp" / f"{name}.sock"
    spec = domain.GuestSpec(name=name, run_id="postcopy-resume-crash", memory_mib=128, vcpus=1,
                            kernel=image.kernel, initrd=image.initrd,
                            cmdline=kernel_cmdline(32, 4, "random", ip="10.77.0.100/24"),
                            accelerator="tcg", mac=domain.guest_mac(100))
    try:
        dom = domain.boot(source, spec)
        say(started, f"guest {name} booted on h1")
        wait_for_workload(lab.outside_path("h1", spec.console_path), BOOT_TIMEOUT_S)
        socket.parent.mkdir(parents=True, exist_ok=True)
        migration_uri = lab.host("h2").migration_uri
        params = {libvirt.VIR_MIGRATE_PARAM_URI: migration_uri,
                  libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: BANDWIDTH_MIB_S,
                  libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY: POSTCOPY_BANDWIDTH_MIB_S,
                  libvirt.VIR_MIGRATE_PARAM_DEST_XML: destination_xml(dom, socket)}
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_POSTCOPY
        break_postcopy(lab, source, destination, dom, params, flags, started)
        if resume_with == "libvirt":
            status = resume_with_libvirt(lab, destination, dom, params, flags, started)
        else:
            status = resume_with_qmp(dom, socket, migration_uri, started)
        if status == 0:
            if wait_for_migrated_guest(source, destination, name, LIBVIRT_SETTLE_S) is None:
                raise Failure(f"libvirt did not show the guest running on h2 within {LIBVIRT_SETTLE_S:g} s "
                              f"(h1: {domain_state(source, name)}, h2: {domain_state(destination, name)})")
            say(started, "the guest runs on h2, and libvirt ended the migration job on both hosts")
        return status
    finally:
        for conn in (source, destination):
            try:
                domain.destroy(conn.lookupByName(name))
            except libvirt.libvirtError:
                pass
        kill_leftover_qemu(name)
        socket.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--resume-with", choices=("libvirt", "qmp"), default="libvirt",
                        help="how to resume the paused postcopy migration (default: libvirt)")
    parser.add_argument("--prefix", default="prc", help="namespace prefix of the private lab (default: prc)")
    parser.add_argument("--root", type=Path, help="folder of the private lab (default: /tmp/PREFIX-lab)")
    args = parser.parse_args()

    if os.geteuid() != 0:
        print("error: the local lab needs root", file=sys.stderr)
        return 2
    root = args.root or Path(f"/tmp/{args.prefix}-lab")
    if root.exists():
        print(f"error: {root} exists, so another lab may use it; pass another --prefix or --root",
              file=sys.stderr)
        return 2

    lab = LocalLab(root=root, prefix=args.prefix)
    try:
        lab.up(hosts=2)
        print(f"libvirt {libvirt.getVersion()}, lab {args.prefix} in {root}, resume with {args.resume_with}")
        status = reproduce(lab, args.resume_with)
    except (Failure, LabError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        status = 2
    finally:
        removed = lab.down()
        shutil.rmtree(root, ignore_errors=True)
        print(f"lab {args.prefix} down: {len(removed)} processes, namespaces, mounts and folders removed")

    verdict = {0: "resumed migration completed", 1: "h2's libvirtd crashed during the resume",
               2: "reproduction failed"}[status]
    print(f"result: {verdict}")
    return status


if __name__ == "__main__":
    sys.exit(main())
