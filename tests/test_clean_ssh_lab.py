"""'migrlab clean --inventory' after a kill -9 of 'migrlab run' over SSH, on the real local lab.

The run and the cleanup both reach h1 and h2 through the sshd of each host
with the lab's own inventory ('local-ssh'), as they would reach real
servers. A guest marked by another machine stands for someone else's guest
on shared servers and must survive the cleanup.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time

import libvirt
import pytest

from lab import domain
from tests.lab_helpers import console_dir, migrlab, new_consoles, wait_until

pytestmark = pytest.mark.lab

# One run, slow enough (32 MiB at 4 MiB/s) to be killed mid-migration.
PLAYBOOK = """
experiment: clean-ssh-check
guest: {memory_mib: 128, vcpus: 1}
workload: {working_set_mib: 32, dirty_rate_mib_s: 2, pattern: sequential}
migration: {strategy: precopy, bandwidth_mib_s: 4, downtime_limit_ms: 300, max_time_s: 180}
repetitions: 1
"""
OTHER_CONTROLLER = "0f" * 16
OTHER_HOST = "laptop-of-someone-else"


def domains(shared_lab) -> dict[str, set[str]]:
    return {host: set(names) for host, names in shared_lab.status().domains.items()}


@pytest.fixture
def foreign_guest(shared_lab, guest_image):
    """A paused guest on h1 with the harness's mark from another machine, destroyed at the end."""
    name = f"mlab-foreign-{secrets.token_hex(3)}"
    spec = domain.GuestSpec(name=name, run_id="foreign-r1", memory_mib=64, vcpus=1, kernel=guest_image.kernel,
                            initrd=guest_image.initrd, cmdline="console=ttyS0", accelerator="tcg", bridge=None,
                            controller=OTHER_CONTROLLER, controller_host=OTHER_HOST)
    conn = libvirt.open(shared_lab.host("h1").libvirt_uri)
    try:
        yield lambda: conn.createXML(domain.domain_xml(spec), libvirt.VIR_DOMAIN_START_PAUSED)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).destroy()
        conn.close()
        (console_dir(shared_lab, "h1") / f"{name}-console.log").unlink(missing_ok=True)


def test_kill_9_then_clean_over_ssh(shared_lab, guest_image, foreign_guest, tmp_path):
    playbook = tmp_path / "clean-ssh.yaml"
    playbook.write_text(PLAYBOOK)
    results = tmp_path / "results"
    started = time.time()
    process = migrlab(shared_lab, "run", str(playbook), "--inventory", "local-ssh", "--results", str(results),
                      "--no-report", start_new_session=True)
    try:
        wait_until(lambda: new_consoles(shared_lab, "h2", started), 240, "the migration")
        time.sleep(1)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        process.kill()
        # Children of the killed harness (probes) are in its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    guest_consoles = new_consoles(shared_lab, "h1", started) | new_consoles(shared_lab, "h2", started)
    guests = {console.removesuffix("-console.log") for console in guest_consoles}
    assert len(guests) == 1, guests
    guest = guests.pop()
    left_behind = domains(shared_lab)
    assert guest in left_behind["h1"]

    foreign = foreign_guest()
    cleaner = migrlab(shared_lab, "clean", "--inventory", "local-ssh", "--results", str(results))
    stdout, stderr = cleaner.communicate(timeout=180)
    assert cleaner.returncode == 0, stderr
    assert f"removed guest {guest} on h1" in stdout
    assert f"left {foreign.name()} on h1: it belongs to run foreign-r1 of another machine" in stdout
    assert f"host {OTHER_HOST}, controller ID {OTHER_CONTROLLER}" in stdout

    after = domains(shared_lab)
    assert after["h1"] == {foreign.name()}
    assert after["h2"] == set()
    assert foreign.isActive()
    for host in ("h1", "h2"):
        assert not (console_dir(shared_lab, host) / f"{guest}-console.log").exists(), host
        assert not (console_dir(shared_lab, host) / f"{guest}.log").exists(), host
    assert f"removed log /var/log/libvirt/qemu/{guest}.log on h1" in stdout
    assert (console_dir(shared_lab, "h1") / f"{foreign.name()}-console.log").exists()
    assert not list((results / "clean-ssh-check" / "runs").glob(".*"))
