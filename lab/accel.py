"""Choose the accelerator by booting the real guest, not by looking for /dev/kvm.

On some machines /dev/kvm exists and KVM_CREATE_VM succeeds, yet a stock guest
kernel hangs right after decompression (nested, paravirtualised KVM). So KVM
is used only after the guest image reached its workload under KVM within a
deadline; otherwise the lab runs TCG. The verdict is cached per QEMU version
and guest image in the lab directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import libvirt

from lab import domain
from lab.errors import LabError

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 30.0
READY_MARK = "mlab-workload: ready"


def _cache_path(state_dir: Path) -> Path:
    return state_dir / "accelerator.json"


def kvm_offered(conn: libvirt.virConnect) -> bool:
    """Return True when the host's libvirt lists the kvm domain type.

    libvirt lists it only when /dev/kvm is usable on the host that runs
    libvirtd, which for a connection over SSH is not the harness's machine.
    """
    return "<domain type='kvm'" in conn.getCapabilities()


def probe_kvm(conn: libvirt.virConnect, spec: domain.GuestSpec, console_file: Path,
              deadline_s: float = DEFAULT_DEADLINE_S) -> tuple[bool, str]:
    """Boot *spec* under KVM and wait for the workload's ready line on its console."""
    try:
        dom = domain.boot(conn, spec)
    except libvirt.libvirtError as exc:
        return False, f"KVM guest failed to start: {exc.get_error_message()}"
    try:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                if READY_MARK in console_file.read_text(errors="replace"):
                    return True, "the guest reached its workload under KVM"
            except FileNotFoundError:
                pass
            if not dom.isActive():
                return False, "the KVM guest stopped before its workload started"
            time.sleep(0.5)
        return False, f"the guest did not reach its workload under KVM within {deadline_s:.0f} s"
    finally:
        domain.destroy(dom)
        console_file.unlink(missing_ok=True)


def choose_accelerator(conn: libvirt.virConnect, spec: domain.GuestSpec, console_file: Path,
                       state_dir: Path, *, requested: str = "auto",
                       deadline_s: float = DEFAULT_DEADLINE_S) -> tuple[str, str]:
    """Return ("kvm" or "tcg", reason), proving KVM with a real boot when asked for auto.

    *spec* must describe a KVM guest; a cached verdict for the same QEMU
    version and guest image is reused.
    """
    if requested == "tcg":
        return "tcg", "TCG requested"
    key = f"{conn.getVersion()}:{spec.kernel.parent.name}"
    cache = _cache_path(state_dir)
    if requested == "auto":
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached["accelerator"], cached["reason"] + " (cached)"
        except (OSError, ValueError, KeyError):
            pass
    if not kvm_offered(conn):
        verdict = ("tcg", "KVM is not offered on this host (/dev/kvm or libvirt's kvm type missing)")
    else:
        works, reason = probe_kvm(conn, spec, console_file, deadline_s)
        verdict = ("kvm" if works else "tcg", reason)
    if requested == "kvm" and verdict[0] != "kvm":
        raise LabError(f"KVM was requested but is not usable: {verdict[1]}. Use accelerator 'auto' or 'tcg'.")
    state_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accelerator": verdict[0], "reason": verdict[1]}))
    return verdict
