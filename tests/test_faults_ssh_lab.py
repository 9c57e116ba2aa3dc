"""Faults struck over SSH on the real local lab, through the sshd of each host.

The harness reaches h1 and h2 over SSH at their usual addresses on the lab
bridge. The migration goes over a separate link, a veth pair between the
two hosts (mig0, 10.77.0.211 and 10.77.0.212), as in a lab with its own
migration network. So link-down cuts the migration link and not the SSH
connection. One precopy experiment with two faults, a cut link and a killed
destination QEMU, serves several tests.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from lab.errors import ConfigError
from lab.faults import RESTORE_NAME, ShellStrikes
from lab.hosts.checks import Requirements, check_faults
from lab.hosts.netns import netns_path
from lab.hosts.remote import RemoteHost
from lab.inventory import load_inventory, render_inventory, write_inventory
from lab.playbook import load_playbook
from lab.runner import ExperimentRunner
from lab.store import load_record
from tests.lab_helpers import lab_qemu_pids

pytestmark = pytest.mark.lab

MIGRATION_LINK = "mig0"
MIGRATION_ADDRESSES = {"h1": "10.77.0.211", "h2": "10.77.0.212"}

PLAYBOOK = """
experiment: ssh-faults
guest:
  memory_mib: 128
  vcpus: 1
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: precopy
  bandwidth_mib_s: 8
  max_time_s: 120
matrix:
  fault:
    - {{kind: link-down, at_progress_pct: 30.0}}
    - {{kind: kill-qemu, at_progress_pct: 30.0}}
repetitions: 1
inventory: {inventory}
timeouts:
  fault_settle_s: 6
  fault_abort_s: 20
"""

RUNS = {"link-down": "fault-link-down-p30-r1", "kill-qemu": "fault-kill-qemu-p30-r1"}


def ip(shared_lab, host: str, *args: str) -> str:
    result = subprocess.run(["ip", "-n", shared_lab.netns_name(host), *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def migration_link(shared_lab):
    """A veth pair between h1 and h2 that carries only the migration, removed afterwards."""
    ip(shared_lab, "h1", "link", "add", MIGRATION_LINK, "type", "veth", "peer", "name", MIGRATION_LINK, "netns",
       shared_lab.netns_name("h2"))
    try:
        for host, peer in (("h1", "h2"), ("h2", "h1")):
            ip(shared_lab, host, "address", "add", f"{MIGRATION_ADDRESSES[host]}/32", "peer",
               f"{MIGRATION_ADDRESSES[peer]}/32", "dev", MIGRATION_LINK)
            ip(shared_lab, host, "link", "set", MIGRATION_LINK, "up")
        yield
    finally:
        # Deleting one end removes the pair.
        subprocess.run(["ip", "-n", shared_lab.netns_name("h1"), "link", "del", MIGRATION_LINK],
                       capture_output=True, timeout=30)


def write_copy(shared_lab, folder: Path, *, separate_link: bool) -> Path:
    """Copy the lab's inventory with absolute paths; with *separate_link*, migrate over mig0."""
    inventory = load_inventory(shared_lab.inventory_file)
    data = inventory.model_dump(mode="json", exclude_none=True)
    data["known_hosts"] = str(inventory.known_hosts_path)
    for entry in data["hosts"]:
        entry["key_file"] = str(inventory.resolve(entry["key_file"]))
        if separate_link and entry["name"] in MIGRATION_ADDRESSES:
            entry["lab_address"] = MIGRATION_ADDRESSES[entry["name"]]
            entry["migration_interface"] = MIGRATION_LINK
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inventory.yaml"
    write_inventory(path, render_inventory(type(inventory).model_validate(data)))
    return path


def runner_for(shared_lab, folder: Path, inventory: Path) -> ExperimentRunner:
    playbook_path = folder / "playbook.yaml"
    playbook_path.write_text(PLAYBOOK.format(inventory=inventory))
    return ExperimentRunner(load_playbook(playbook_path), results_root=folder / "results", lab=shared_lab,
                            show_progress=False)


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, migration_link, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ssh-faults")
    return runner_for(shared_lab, folder, write_copy(shared_lab, folder, separate_link=True)).run()


def record_of(experiment, name):
    return load_record(experiment.experiment_dir / "runs" / RUNS[name])


def test_both_faults_ran(experiment):
    assert sorted(experiment.outcomes) == sorted(RUNS.values())


def test_cut_link_over_ssh_leaves_guest_on_source(experiment):
    record = record_of(experiment, "link-down")
    fault = record.fault
    steps = json.dumps(fault.steps, indent=1)
    assert fault.struck_at_s is not None, steps
    assert not fault.in_postcopy
    assert "restore armed on h2: link mig0 up" in fault.steps[0], steps
    assert "link mig0 of h2 set down" in fault.steps[1], steps
    assert fault.aborted_at_s >= fault.struck_at_s + 6
    assert fault.restored_at_s == fault.aborted_at_s
    assert record.outcome == "timed-out"
    assert fault.outcome == "source-running"
    assert fault.source_state == "running"
    assert record.integrity.guest_alive
    assert record.integrity.bad_pages == 0


def test_killed_qemu_over_ssh_leaves_guest_on_source(experiment):
    record = record_of(experiment, "kill-qemu")
    fault = record.fault
    assert fault.struck_at_s is not None, fault.steps
    assert "SIGKILL to the destination QEMU, pid" in fault.steps[0]
    assert record.outcome == "failed"
    assert fault.outcome == "source-running"
    assert record.integrity.guest_alive
    assert fault.destination_state == "absent"


def processes_in(shared_lab, hosts, marker: bytes) -> list[int]:
    namespaces = {netns_path(shared_lab.netns_name(host)).stat().st_ino for host in hosts}
    found = []
    for path in Path("/proc").iterdir():
        if not path.name.isdigit():
            continue
        try:
            cmdline = (path / "cmdline").read_bytes()
            inode = (path / "ns" / "net").stat().st_ino
        except OSError:
            continue
        if marker in cmdline and inode in namespaces:
            found.append(int(path.name))
    return found


def test_lab_left_working(experiment, shared_lab):
    link = json.loads(ip(shared_lab, "h2", "-j", "link", "show", MIGRATION_LINK))
    assert "UP" in link[0]["flags"]
    # The armed restore was cancelled once the harness brought the link up itself.
    assert processes_in(shared_lab, ("h2",), RESTORE_NAME.encode()) == []
    assert processes_in(shared_lab, ("h1", "h2"), b"qemu-system") == []
    assert all(not names for names in shared_lab.status().domains.values())


def test_armed_restore_brings_link_up_without_the_harness(shared_lab, migration_link):
    inventory = load_inventory(shared_lab.inventory_file)
    entry = inventory.host("h2").model_copy(update={"lab_address": MIGRATION_ADDRESSES["h2"],
                                                     "migration_interface": MIGRATION_LINK})
    remote = RemoteHost(inventory.host("h2"), inventory)
    try:
        strikes = ShellStrikes(destination=remote, destination_entry=entry, link_interface=MIGRATION_LINK,
                               source=remote, source_entry=entry, source_interface=MIGRATION_LINK)
        strikes.arm_restore(2.0)
        strikes._run(["ip", "link", "set", "dev", MIGRATION_LINK, "down"])
    finally:
        # The SSH connection goes before the restore is due.
        remote.close()
    assert "UP" not in json.loads(ip(shared_lab, "h2", "-j", "link", "show", MIGRATION_LINK))[0]["flags"]
    deadline = time.monotonic() + 10
    while "UP" not in json.loads(ip(shared_lab, "h2", "-j", "link", "show", MIGRATION_LINK))[0]["flags"]:
        assert time.monotonic() < deadline, "the link stayed down"
        time.sleep(0.2)


def test_link_down_rejected_on_shared_address(shared_lab, guest_image, tmp_path):
    runner = runner_for(shared_lab, tmp_path, write_copy(shared_lab, tmp_path, separate_link=False))
    with pytest.raises(ConfigError) as caught:
        runner.run()
    message = str(caught.value)
    assert ("link-down would cut the SSH connection to host h2: its SSH address 10.77.0.12 is its "
            "lab_address") in message
    assert "give host h2 an SSH address (address) on another network than its lab_address" in message
    assert not list((tmp_path / "results" / "ssh-faults" / "runs").glob("*"))


def test_preflight_reports_fault_readiness(shared_lab, migration_link, tmp_path):
    requirements = Requirements(faults=("bandwidth", "kill-qemu", "link-down"))
    separate = load_inventory(write_copy(shared_lab, tmp_path / "separate", separate_link=True))
    shared = load_inventory(write_copy(shared_lab, tmp_path / "shared", separate_link=False))
    results = {}
    for label, inventory in (("separate", separate), ("shared", shared)):
        for name in ("h1", "h2"):
            with RemoteHost(inventory.host(name), inventory) as remote:
                results[label, name] = check_faults(remote, inventory, requirements)
    assert results["separate", "h2"].status == "ok", results["separate", "h2"].detail
    assert results["separate", "h2"].summary == "kill-qemu, link-down"
    assert results["separate", "h1"].summary == "bandwidth"
    assert results["shared", "h1"].status == "ok"
    assert results["shared", "h2"].status == "fail"
    assert "its SSH address 10.77.0.12 is its lab_address" in results["shared", "h2"].detail


LOCAL_SSH_PLAYBOOK = """
experiment: ssh-kill-libvirtd
guest:
  memory_mib: 128
  vcpus: 1
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: precopy
  bandwidth_mib_s: 8
  max_time_s: 120
  fault: {kind: kill-libvirtd, at_s: 2.0}
repetitions: 1
inventory: local-ssh
probes:
  echo: {enabled: false}
  stream: {enabled: false}
  capture: {enabled: false}
timeouts:
  fault_settle_s: 6
  fault_abort_s: 20
"""


def test_killed_libvirtd_over_ssh_started_again(shared_lab, guest_image, tmp_path):
    playbook_path = tmp_path / "playbook.yaml"
    playbook_path.write_text(LOCAL_SSH_PLAYBOOK)
    summary = ExperimentRunner(load_playbook(playbook_path), results_root=tmp_path / "results", lab=shared_lab,
                               show_progress=False).run()
    record = load_record(summary.experiment_dir / "runs" / "precopy-r1")
    fault = record.fault
    steps = json.dumps(fault.steps, indent=1)
    assert fault.struck_at_s is not None, steps
    assert "SIGKILL to libvirtd of h2, pid" in fault.steps[0], steps
    assert any("started again" in step and "(the local lab started it)" in step for step in fault.steps), steps
    assert fault.outcome == "source-running", steps
    assert record.integrity.guest_alive
    status = shared_lab.status()
    assert all(not names for names in status.domains.values())
    assert not [problem for problem in status.problems if "libvirtd" in problem]



# Postcopy keeps the destination QEMU running after libvirtd dies, whereas
# an incoming precopy QEMU exits by itself once the source aborts.
LEFTOVER_PLAYBOOK = """
experiment: ssh-leftover-qemu
guest:
  memory_mib: 128
  vcpus: 1
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: postcopy
  bandwidth_mib_s: 8
  max_time_s: 60
  fault: {kind: kill-libvirtd, at_postcopy: true}
repetitions: 1
inventory: local-ssh
probes:
  echo: {enabled: false}
  stream: {enabled: false}
  capture: {enabled: false}
timeouts:
  integrity_s: 10
  fault_settle_s: 6
  fault_abort_s: 20
  postcopy_recovery_s: 5
"""


def test_leftover_qemu_killed_over_ssh(shared_lab, guest_image, tmp_path, monkeypatch):
    """A destination QEMU that the restarted libvirtd does not know is killed through h2's SSH shell."""
    status_dir = shared_lab.outside_path("h2", "/run/libvirt/qemu")
    seen_on_h2: list[int] = []
    forgotten: list[str] = []
    start_lab = shared_lab.up

    def up_forgetting_guests(*args, **kwargs):
        # Without its status file, the libvirtd started after the kill does not
        # list the guest's QEMU, as after a libvirtd crash that lost the file.
        status_files = list(status_dir.glob("mlab-*.xml"))
        if status_files:
            seen_on_h2.extend(lab_qemu_pids(shared_lab, ("h2",)))
            forgotten.extend(path.stem for path in status_files)
        for path in status_files:
            path.unlink()
        return start_lab(*args, **kwargs)

    monkeypatch.setattr(shared_lab, "up", up_forgetting_guests)
    playbook_path = tmp_path / "playbook.yaml"
    playbook_path.write_text(LEFTOVER_PLAYBOOK)
    summary = ExperimentRunner(load_playbook(playbook_path), results_root=tmp_path / "results", lab=shared_lab,
                               show_progress=False).run()
    (run_id,) = summary.outcomes
    record = load_record(summary.experiment_dir / "runs" / run_id)
    steps = json.dumps(record.fault.steps, indent=1)
    assert record.fault.struck_at_s is not None, steps
    assert "SIGKILL to libvirtd of h2, pid" in record.fault.steps[0], steps
    assert len(forgotten) == 1, f"status files removed from h2: {forgotten}\n{steps}"
    assert len(seen_on_h2) == 1, f"QEMU processes in h2 when its libvirtd started again: {seen_on_h2}\n{steps}"
    # Only the cleanup through a host's shell names the host; the search of this machine's /proc does not.
    expected = f"killed QEMU processes of {forgotten[0]} on host h2 that libvirt no longer knew: {seen_on_h2[0]}"
    assert expected in record.warnings, record.warnings
    assert [warning for warning in record.warnings if "QEMU process" in warning] == [expected]
    assert lab_qemu_pids(shared_lab) == []
