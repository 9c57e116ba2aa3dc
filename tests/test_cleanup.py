"""Cleanup decisions of 'migrlab clean', on libvirt's test driver and with fake SSH hosts."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from lab import cleanup, domain
from lab.errors import HostError
from lab.hosts.shell import CommandResult
from lab.inventory import Inventory

OURS = "a" * 32
THEIRS = "b" * 32


def spec(name: str, controller: str | None) -> domain.GuestSpec:
    return domain.GuestSpec(name=name, run_id=f"run-{name}", memory_mib=128, vcpus=1, kernel=Path("/k"),
                            initrd=Path("/i"), cmdline="console=ttyS0", accelerator="tcg", controller=controller)


def driver_xml(guest: domain.GuestSpec) -> str:
    return domain.domain_xml(guest).replace('type="qemu"', 'type="test"', 1)


def unmarked_xml(name: str) -> str:
    root = ET.fromstring(driver_xml(spec(name, OURS)))
    root.remove(root.find("metadata"))
    return ET.tostring(root, encoding="unicode")


@pytest.fixture
def conn():
    """The test driver with guests of this machine, of another one, of an old version and without mark.

    The driver also has its own domain "test", which has no mark.
    """
    connection = libvirt.open("test:///default")
    connection.createXML(driver_xml(spec("mlab-ours", OURS)), 0)
    connection.createXML(driver_xml(spec("mlab-theirs", THEIRS)), 0)
    connection.createXML(driver_xml(spec("mlab-old", None)), 0)
    connection.createXML(unmarked_xml("mlab-unmarked"), 0)
    yield connection
    connection.close()


def names(connection) -> set[str]:
    return {dom.name() for dom in connection.listAllDomains()}


# Decisions.

def test_reason_without_mark():
    assert cleanup.left_alone_reason(None, OURS) == cleanup.NO_MARK
    assert cleanup.left_alone_reason(None, None) == cleanup.NO_MARK


def test_reason_own_mark_destroys():
    assert cleanup.left_alone_reason(domain.OwnerMark("r1", OURS, "here"), OURS) is None


def test_reason_other_controller():
    reason = cleanup.left_alone_reason(domain.OwnerMark("r1", THEIRS, "laptop-b"), OURS)
    assert reason is not None
    assert "another machine" in reason
    assert "laptop-b" in reason
    assert THEIRS in reason
    assert "run r1" in reason


def test_reason_old_mark_over_ssh():
    reason = cleanup.left_alone_reason(domain.OwnerMark("r1"), OURS)
    assert reason is not None
    assert "names no controlling machine" in reason


@pytest.mark.parametrize("mark", [domain.OwnerMark("r1"), domain.OwnerMark("r1", THEIRS, "b"),
                                  domain.OwnerMark("r1", OURS, "a")])
def test_reason_local_lab_takes_every_mark(mark):
    assert cleanup.left_alone_reason(mark, None) is None


# Destroying on one host.

def test_destroy_only_this_machines_guests(conn):
    report = cleanup.CleanupReport()
    destroyed, failed = cleanup.destroy_marked(conn, "h1", OURS, report)
    assert destroyed == ["mlab-ours"]
    assert failed == []
    assert names(conn) == {"test", "mlab-theirs", "mlab-old", "mlab-unmarked"}
    assert report.removed == ["guest mlab-ours on h1"]
    left = sorted(item.split(":")[0] for item in report.foreign)
    assert left == ["mlab-old on h1", "mlab-theirs on h1", "mlab-unmarked on h1", "test on h1"]
    assert report.failures == []


def test_destroy_every_mark_on_local_lab(conn):
    report = cleanup.CleanupReport()
    destroyed, _ = cleanup.destroy_marked(conn, "h1", None, report)
    assert sorted(destroyed) == ["mlab-old", "mlab-ours", "mlab-theirs"]
    assert names(conn) == {"test", "mlab-unmarked"}
    assert sorted(report.foreign) == [f"mlab-unmarked on h1: {cleanup.NO_MARK}", f"test on h1: {cleanup.NO_MARK}"]


# Console logs through a host's shell.

class FakeShell:
    def __init__(self, name: str = "h1", returncode: int = 0, stdout: str = "", stderr: str = ""):
        self.name = name
        self.commands: list[list[str]] = []
        self.result = CommandResult(returncode, stdout, stderr)

    def run(self, argv, *, timeout, check=True):
        self.commands.append(list(argv))
        return self.result


def inventory(sudo: bool = False) -> Inventory:
    host = {"role": "libvirt", "user": "lab", "key_file": "/nonexistent/lab_key", "sudo": sudo}
    return Inventory.model_validate({
        "name": "shared-servers",
        "network": {"subnet": "10.77.0.0/24", "guest_address": "10.77.0.100/24"},
        "hosts": [{**host, "name": "h1", "address": "10.77.0.11", "lab_address": "10.77.0.11"},
                  {**host, "name": "h2", "address": "10.77.0.12", "lab_address": "10.77.0.12"}]})


def console(name: str) -> str:
    return f"{domain.CONSOLE_DIR}/{name}-console.log"


def qemu_log(name: str) -> str:
    return f"{domain.CONSOLE_DIR}/{name}.log"


def test_guest_logs_removed_by_name():
    shell = FakeShell(stdout=console("mlab-a") + "\n")
    removed = cleanup.remove_guest_logs(shell, inventory().host("h1"), ["mlab-a", "mlab-b"])
    assert removed == [console("mlab-a")]
    assert len(shell.commands) == 1
    argv = shell.commands[0]
    assert argv[0] == "sh"
    assert argv[-4:] == [console("mlab-a"), qemu_log("mlab-a"), console("mlab-b"), qemu_log("mlab-b")]


def test_guest_logs_removed_through_sudo():
    shell = FakeShell()
    cleanup.remove_guest_logs(shell, inventory(sudo=True).host("h1"), ["mlab-a"])
    assert shell.commands[0][:4] == ["sudo", "-n", "--", "sh"]


def test_guest_logs_none_destroyed_runs_nothing():
    shell = FakeShell()
    assert cleanup.remove_guest_logs(shell, inventory().host("h1"), []) == []
    assert shell.commands == []


def test_guest_logs_failure_raises():
    shell = FakeShell(returncode=1, stderr="sudo: a password is required")
    with pytest.raises(HostError, match="host h1 failed: sudo: a password is required"):
        cleanup.remove_guest_logs(shell, inventory().host("h1"), ["mlab-a"])


@pytest.mark.parametrize("name", ["mlab-../../etc/passwd", "guest1"])
def test_guest_logs_reject_other_names(name):
    shell = FakeShell()
    with pytest.raises(HostError, match="not a file name"):
        cleanup.remove_guest_logs(shell, inventory().host("h1"), [name])
    assert shell.commands == []


def test_remove_script_prints_only_existing(tmp_path):
    present = tmp_path / "mlab-a-console.log"
    present.write_text("boot\n")
    other = tmp_path / "mlab-c-console.log"
    other.write_text("keep\n")
    result = subprocess.run(["sh", "-c", cleanup.REMOVE_EXISTING_SCRIPT, "sh", str(present),
                             str(tmp_path / "mlab-b-console.log")], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(present)]
    assert not present.exists()
    assert other.exists()


# A whole inventory, with hosts faked over the test driver.

class FakeRemote(FakeShell):
    """An inventory host whose libvirt is the test driver; host h1 is unreachable."""

    instances: list[FakeRemote] = []

    def __init__(self, entry, inventory):
        super().__init__(entry.name, stdout="")
        self.closed = False
        FakeRemote.instances.append(self)

    def open_libvirt(self):
        if self.name == "h1":
            raise HostError("cannot reach h1 (lab@10.77.0.11 port 22) over SSH: Connection refused")
        return libvirt.open("test:///default")

    def close(self):
        self.closed = True


def test_inventory_continues_after_failed_host(conn, monkeypatch):
    FakeRemote.instances = []
    monkeypatch.setattr(cleanup, "RemoteHost", FakeRemote)
    report = cleanup.clean_inventory(inventory(), OURS)
    assert len(report.failures) == 1
    assert report.failures[0].startswith("host h1: cannot reach h1")
    assert report.removed == ["guest mlab-ours on h2"]
    assert names(conn) == {"test", "mlab-theirs", "mlab-old", "mlab-unmarked"}
    h1, h2 = FakeRemote.instances
    assert h1.commands == []
    assert len(h2.commands) == 1
    assert h2.commands[0][-2:] == [console("mlab-ours"), qemu_log("mlab-ours")]
    assert h1.closed
    assert h2.closed


def test_inventory_reports_log_failure(conn, monkeypatch):
    class FailingRemote(FakeRemote):
        def __init__(self, entry, inventory):
            super().__init__(entry, inventory)
            self.result = CommandResult(1, "", "rm: cannot remove: Permission denied")

    FakeRemote.instances = []
    monkeypatch.setattr(cleanup, "RemoteHost", FailingRemote)
    report = cleanup.clean_inventory(inventory(), OURS)
    assert report.removed == ["guest mlab-ours on h2"]
    assert report.failures[-1] == ("guest logs on host h2: removing guest logs on host h2 failed: "
                                   "rm: cannot remove: Permission denied")
