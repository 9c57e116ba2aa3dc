"""Faults on inventory hosts through a shell, and the rejections that keep them safe, without a lab."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.faults import (ARM_RESTORE_SCRIPT, KILL_DAEMON_SCRIPT, KILL_QEMU_SCRIPT, LEFTOVER_QEMU_SCRIPT, FaultInjector,
                        FaultSpec, FaultTimeouts, ShellStrikes, fault_host_problems, link_down_problem,
                        privilege_problem)
from lab.hosts.checks import Requirements, check_faults
from lab.hosts.remote import SudoShell
from lab.errors import HostError
from lab.hosts.shell import CommandResult, failure_message, run_local
from lab.inventory import Inventory, InventoryHost


def host(name: str = "b", *, address: str = "192.0.2.12", lab_address: str = "10.77.0.12", user: str = "root",
         sudo: bool = False, libvirt_uri: str | None = None) -> InventoryHost:
    return InventoryHost(name=name, role="libvirt", address=address, user=user, key_file="lab_key",
                         lab_address=lab_address, sudo=sudo, libvirt_uri=libvirt_uri, migration_interface="mig0")


class FakeShell:
    """A host shell that records each command and returns results from a table keyed by first words."""

    def __init__(self, name: str = "b", answers: dict[tuple[str, ...], CommandResult] | None = None):
        self.name = name
        self.commands: list[list[str]] = []
        self.answers = answers or {}

    def run(self, argv, *, timeout, check=True):
        argv = list(argv)
        self.commands.append(argv)
        words = argv[3:] if argv[:3] == ["sudo", "-n", "--"] else argv
        for prefix, result in self.answers.items():
            if tuple(words[:len(prefix)]) == prefix:
                if check and result.returncode != 0:
                    raise HostError(failure_message(self.name, argv, result))
                return result
        if words[:2] == ["sh", "-c"] and words[2] == ARM_RESTORE_SCRIPT:
            return CommandResult(0, "4242\n", "")
        if words[:2] == ["id", "-u"]:
            return CommandResult(0, "0\n", "")
        return CommandResult(0, "", "")

    def read_bytes(self, path):
        return None

    def remove(self, path):
        pass

    def stream(self, argv):
        raise NotImplementedError


def ok(stdout: str = "") -> CommandResult:
    return CommandResult(0, stdout, "")


def strikes(shell: FakeShell, entry: InventoryHost, **kwargs) -> ShellStrikes:
    return ShellStrikes(destination=shell, destination_entry=entry, link_interface="mig0", source=shell,
                        source_entry=entry, source_interface="mig0", **kwargs)


def injector(shell: FakeShell, entry: InventoryHost, fault: FaultSpec, **kwargs) -> FaultInjector:
    return FaultInjector(fault, None, source_host="a", destination_host=entry.name, source_shell=shell,
                         source_interface="mig0", guest_name="mlab-001-abc", source_domain=None,
                         timeouts=FaultTimeouts(settle_s=5.0, abort_s=7.0), strikes=strikes(shell, entry, **kwargs))


def spec(**values) -> FaultSpec:
    return FaultSpec.model_validate(values)


# Link-down: the restore is armed on the host before the cut.


def test_link_down_arms_restore_before_cut():
    shell = FakeShell()
    fault_injector = injector(shell, host(), spec(kind="link-down", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    assert shell.commands[0] == ["sh", "-c", ARM_RESTORE_SCRIPT, "migrlab-link-restore", "52", "mig0"]
    assert shell.commands[1] == ["ip", "link", "set", "dev", "mig0", "down"]
    assert "restore armed on b: link mig0 up after 52 s without the harness (pid 4242)" \
        in fault_injector.report.steps[0]
    assert fault_injector.report.detail is None


def test_link_up_cancels_armed_restore_once():
    shell = FakeShell()
    fault_injector = injector(shell, host(), spec(kind="link-down", at_s=0.0, restore_after_s=3.0))
    fault_injector.poll(0.0, {}, False)
    # restore_after_s is also the host's own deadline.
    assert shell.commands[0][4] == "3"
    fault_injector.poll(3.0, {}, False)
    assert shell.commands[2] == ["ip", "link", "set", "dev", "mig0", "up"]
    assert shell.commands[3][:2] == ["sh", "-c"]
    assert shell.commands[3][4] == "4242"
    assert fault_injector.undo() == []
    assert len(shell.commands) == 4


def test_sudo_host_runs_root_commands_through_sudo():
    shell = FakeShell()
    fault_injector = injector(shell, host(user="lab", sudo=True), spec(kind="link-down", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    fault_injector.undo()
    assert shell.commands
    assert all(argv[:3] == ["sudo", "-n", "--"] for argv in shell.commands)


def test_failed_arm_leaves_link_up():
    shell = FakeShell(answers={("sh", "-c", ARM_RESTORE_SCRIPT): CommandResult(1, "", "setsid: not found")})
    fault_injector = injector(shell, host(), spec(kind="link-down", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    assert not any(argv[:2] == ["ip", "link"] for argv in shell.commands)
    assert "striking the fault failed" in fault_injector.report.detail
    assert "setsid: not found" in fault_injector.report.detail


def test_lost_host_error_names_its_own_restore():
    class LostShell(FakeShell):
        def run(self, argv, *, timeout, check=True):
            if argv[:2] == ["ip", "link"] and argv[-1] == "up":
                raise HostError("command ip link set dev mig0 up on host b timed out after 20 s")
            return super().run(argv, timeout=timeout, check=check)

    shell = LostShell()
    fault_injector = injector(shell, host(), spec(kind="link-down", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    errors = fault_injector.undo()
    assert len(errors) == 1
    assert "timed out" in errors[0]
    assert "the host sets it up by itself 52 s after the cut" in errors[0]


# kill-libvirtd through the shell


def test_kill_daemon_then_systemctl_start():
    shell = FakeShell(answers={("python3", "-c", KILL_DAEMON_SCRIPT): ok("virtqemud 321 virtqemud.service\n")})
    fault_injector = injector(shell, host(), spec(kind="kill-libvirtd", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    assert shell.commands[0] == ["python3", "-c", KILL_DAEMON_SCRIPT, "kill"]
    assert "SIGKILL to virtqemud of b, pid 321" in fault_injector.report.steps[0]
    assert fault_injector.libvirtd_killed
    assert fault_injector.undo() == []
    assert shell.commands[-1] == ["systemctl", "start", "virtqemud.service"]
    assert "(systemctl start virtqemud.service)" in fault_injector.report.steps[-1]
    assert not fault_injector.libvirtd_killed


def test_daemon_outside_systemd_uses_lab_restart():
    started = []
    shell = FakeShell(answers={("python3", "-c", KILL_DAEMON_SCRIPT): ok("libvirtd 77 -\n")})
    fault_injector = injector(shell, host(), spec(kind="kill-libvirtd", at_s=0.0),
                              restart_daemon=lambda: started.append(True))
    fault_injector.poll(0.0, {}, False)
    assert fault_injector.undo() == []
    assert started == [True]
    assert not any(argv[0] == "systemctl" for argv in shell.commands)


# kill-qemu: the script itself, on this machine's /proc, with processes that look like QEMU.


def fake_qemu(*args: str) -> subprocess.Popen:
    return subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(60)", *args],
                            executable=sys.executable)


def wait_for_cmdline(process: subprocess.Popen, text: bytes) -> None:
    deadline = time.monotonic() + 10
    while text not in Path(f"/proc/{process.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)


def started(processes: dict[str, subprocess.Popen]):
    """Yield *processes* once each shows its guest argument, then kill them all."""
    try:
        for process in processes.values():
            wait_for_cmdline(process, b"guest=")
        yield processes
    finally:
        for process in processes.values():
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def qemus():
    source = fake_qemu("-name", "guest=mlab-001-abc,debug-threads=on")
    destination = fake_qemu("-name", "guest=mlab-001-abc,debug-threads=on", "-incoming", "defer")
    other = fake_qemu("-name", "guest=mlab-001-abcd,debug-threads=on", "-incoming", "defer")
    yield from started({"source": source, "destination": destination, "other": other})


def run_kill_qemu(pid_file: Path, mode: str) -> CommandResult:
    return run_local([sys.executable, "-c", KILL_QEMU_SCRIPT, "mlab-001-abc", str(pid_file), mode], timeout=30)


def test_kill_qemu_script_finds_incoming_qemu(qemus, tmp_path):
    result = run_kill_qemu(tmp_path / "missing.pid", "check")
    assert result.returncode == 0, result.stdout
    assert int(result.stdout) == qemus["destination"].pid
    assert all(process.poll() is None for process in qemus.values())


def test_kill_qemu_script_kills_only_it(qemus, tmp_path):
    pid_file = tmp_path / "mlab-001-abc.pid"
    # A stale pid file that names the source QEMU: it is not the destination, so /proc decides.
    pid_file.write_text(f"{qemus['source'].pid}\n")
    result = run_kill_qemu(pid_file, "kill")
    assert int(result.stdout) == qemus["destination"].pid
    assert qemus["destination"].wait(timeout=10) == -9
    assert qemus["source"].poll() is None
    assert qemus["other"].poll() is None


def test_kill_qemu_script_refuses_two_candidates(qemus, tmp_path):
    twin = fake_qemu("-name", "guest=mlab-001-abc", "-incoming", "defer")
    try:
        wait_for_cmdline(twin, b"guest=")
        result = run_kill_qemu(tmp_path / "missing.pid", "kill")
        assert result.returncode == 3
        assert "found 2 destination QEMU processes of guest mlab-001-abc" in result.stdout
        assert twin.poll() is None
        assert qemus["destination"].poll() is None
    finally:
        twin.kill()
        twin.wait(timeout=10)


# Leftover QEMU processes after a run: the cleanup through each host's shell.


def two_hosts(destination: FakeShell, source: FakeShell, *, sudo: bool = False, **kwargs) -> ShellStrikes:
    return ShellStrikes(destination=destination, destination_entry=host("b", sudo=sudo), link_interface="mig0",
                        source=source, source_entry=host("a", address="192.0.2.11", lab_address="10.77.0.11",
                                                         sudo=sudo),
                        source_interface="mig0", **kwargs)


def leftover_answer(stdout: str) -> dict[tuple[str, ...], CommandResult]:
    return {("python3", "-c", LEFTOVER_QEMU_SCRIPT): ok(stdout)}


def test_leftover_cleanup_sends_script_to_both_hosts():
    destination, source = FakeShell("b"), FakeShell("a")
    two_hosts(destination, source).kill_leftover_qemu("mlab-001-abc")
    expected = ["python3", "-c", LEFTOVER_QEMU_SCRIPT, "mlab-001-abc", "any-netns", "10"]
    assert destination.commands == [expected]
    assert source.commands == [expected]


def test_leftover_cleanup_shared_proc_scope():
    destination, source = FakeShell("b"), FakeShell("a")
    two_hosts(destination, source, shared_proc=True).kill_leftover_qemu("mlab-001-abc")
    assert destination.commands[0][4] == "own-netns"
    assert source.commands[0][4] == "own-netns"


def test_leftover_cleanup_through_sudo():
    destination, source = FakeShell("b"), FakeShell("a")
    two_hosts(destination, source, sudo=True).kill_leftover_qemu("mlab-001-abc")
    assert destination.commands[0][:5] == ["sudo", "-n", "--", "python3", "-c"]
    assert source.commands[0][:5] == ["sudo", "-n", "--", "python3", "-c"]


def test_leftover_cleanup_matches_only_the_guest():
    destination, source = FakeShell("b"), FakeShell("a")
    two_hosts(destination, source).kill_leftover_qemu("mlab-001-abc")
    for argv in destination.commands + source.commands:
        assert argv[0] not in ("pkill", "killall", "kill", "sh")
        # The guest name reaches the host as one argument, never inside the script's text.
        assert "mlab-001-abc" not in argv[2]
    assert "pkill" not in LEFTOVER_QEMU_SCRIPT
    assert "killall" not in LEFTOVER_QEMU_SCRIPT


def test_leftover_pids_reported_per_host():
    destination = FakeShell("b", leftover_answer("killed 4242\nkilled 4250\n"))
    source = FakeShell("a", leftover_answer(""))
    leftovers = two_hosts(destination, source).kill_leftover_qemu("mlab-001-abc")
    assert [leftover.host for leftover in leftovers] == ["b", "a"]
    assert leftovers[0].killed == [4242, 4250]
    assert leftovers[0].warnings("mlab-001-abc") == [
        "killed QEMU processes of mlab-001-abc on host b that libvirt no longer knew: 4242, 4250"]
    assert leftovers[1].killed == []
    assert leftovers[1].warnings("mlab-001-abc") == []


def test_leftover_still_running_and_failed_kill_reported():
    destination = FakeShell("b", leftover_answer("killed 4242\nfailed 4300 Operation not permitted\n"
                                                 "running 4242\n"))
    (leftover, _) = two_hosts(destination, FakeShell("a")).kill_leftover_qemu("mlab-001-abc")
    assert leftover.killed == [4242]
    assert leftover.running == [4242]
    assert leftover.failed == [(4300, "Operation not permitted")]
    warnings = leftover.warnings("mlab-001-abc")
    assert "QEMU processes of mlab-001-abc on host b still present 10 s after SIGKILL: 4242" in warnings
    assert "SIGKILL to QEMU process 4300 of mlab-001-abc on host b failed: Operation not permitted" in warnings


def test_leftover_cleanup_failing_shell_warns():
    class BrokenShell(FakeShell):
        def run(self, argv, *, timeout, check=True):
            self.commands.append(list(argv))
            raise HostError("command python3 -c ... on host b failed: SSH error Connection reset by peer")

    source = FakeShell("a", leftover_answer("killed 5151\n"))
    leftovers = two_hosts(BrokenShell("b"), source).kill_leftover_qemu("mlab-001-abc")
    assert leftovers[0].killed == []
    assert leftovers[0].warnings("mlab-001-abc") == [
        "could not look for leftover QEMU processes of mlab-001-abc on host b: command python3 -c ... on host b "
        "failed: SSH error Connection reset by peer"]
    # The source is still cleaned after the destination's shell failed.
    assert leftovers[1].killed == [5151]


def test_leftover_cleanup_script_failure_warns():
    destination = FakeShell("b", {("python3", "-c", LEFTOVER_QEMU_SCRIPT): CommandResult(
        127, "", "sh: 1: python3: not found\n")})
    (leftover, _) = two_hosts(destination, FakeShell("a")).kill_leftover_qemu("mlab-001-abc")
    assert leftover.error == "the QEMU cleanup script failed on host b: sh: 1: python3: not found"


def test_leftover_cleanup_unexpected_output_warns():
    destination = FakeShell("b", leftover_answer("killed 4242\nTraceback (most recent call last):\n"))
    (leftover, _) = two_hosts(destination, FakeShell("a")).kill_leftover_qemu("mlab-001-abc")
    assert leftover.error is not None
    assert "printed 'Traceback (most recent call last):'" in leftover.error


# The cleanup script itself, on this machine's /proc, with processes that look like QEMU.


def run_leftover_script(scope: str = "any-netns", guest: str = "mlab-001-abc") -> CommandResult:
    return run_local([sys.executable, "-c", LEFTOVER_QEMU_SCRIPT, guest, scope, "10"], timeout=30)


def script_lines(result: CommandResult) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def guest_processes():
    """A QEMU of the guest, and processes the cleanup must leave alone."""
    not_qemu = subprocess.Popen(["python3", "-c", "import time; time.sleep(60)", "-name",
                                 "guest=mlab-001-abc,debug-threads=on"], executable=sys.executable)
    processes = {
        "mine": fake_qemu("-name", "guest=mlab-001-abc,debug-threads=on", "-incoming", "defer"),
        # Another guest whose name starts with this one's.
        "longer name": fake_qemu("-name", "guest=mlab-001-abcd,debug-threads=on"),
        # The marker inside an argument, not at its start.
        "inside": fake_qemu("-append", "noguest=mlab-001-abc,x"),
        "not qemu": not_qemu,
    }
    yield from started(processes)


def test_leftover_script_kills_only_the_guest(guest_processes):
    started = time.monotonic()
    lines = script_lines(run_leftover_script())
    # The killed child stays a zombie of this test until reaped, which counts as gone.
    assert time.monotonic() - started < 8
    assert lines == [f"killed {guest_processes['mine'].pid}"]
    assert guest_processes["mine"].wait(timeout=10) == -9
    for label in ("longer name", "inside", "not qemu"):
        assert guest_processes[label].poll() is None, label


def test_leftover_script_finds_nothing_for_other_guest(guest_processes):
    assert script_lines(run_leftover_script(guest="mlab-001-ab")) == []
    assert all(process.poll() is None for process in guest_processes.values())


def test_leftover_script_own_netns_skips_other_namespaces():
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    # A QEMU of the guest in a network namespace of its own, and one in this test's.
    start = ("import os, sys; os.execv(sys.executable, ['qemu-system-x86_64', '-c', "
             "'import time; time.sleep(60)', '-name', 'guest=mlab-001-abc,debug-threads=on'])")
    elsewhere = subprocess.Popen(["unshare", "--net", sys.executable, "-c", start])
    in_test_netns = fake_qemu("-name", "guest=mlab-001-abc,debug-threads=on")
    try:
        wait_for_cmdline(elsewhere, b"guest=")
        wait_for_cmdline(in_test_netns, b"guest=")
        assert script_lines(run_leftover_script("own-netns")) == [f"killed {in_test_netns.pid}"]
        assert elsewhere.poll() is None
        assert script_lines(run_leftover_script("any-netns")) == [f"killed {elsewhere.pid}"]
        assert elsewhere.wait(timeout=10) == -9
    finally:
        for process in (elsewhere, in_test_netns):
            process.kill()
            process.wait(timeout=10)


# Rejections, each with its fix.


def test_link_down_rejected_when_ssh_uses_lab_address():
    entry = host(address="10.77.0.12", lab_address="10.77.0.12")
    problem = link_down_problem(FakeShell(), entry, "br0")
    assert problem.startswith("link-down would cut the SSH connection to host b: its SSH address 10.77.0.12 "
                              "is its lab_address")
    assert "give host b an SSH address (address) on another network than its lab_address" in problem


def test_link_down_rejected_for_ssh_route_via_bridge():
    shell = FakeShell(answers={
        ("sh", "-c", 'echo "$SSH_CONNECTION"'): ok("192.0.2.1 50000 192.0.2.12 22\n"),
        ("ip", "-j", "link", "show"): ok('[{"ifname": "eth1", "master": "br0"}]'),
        ("ip", "-j", "route", "get"): ok('[{"dst": "192.0.2.1", "dev": "br0"}]'),
    })
    problem = link_down_problem(shell, host(), "eth1")
    assert "its replies to the harness (192.0.2.1) leave through br0, the interface that link-down cuts" in problem


def test_link_down_accepted_on_separate_interface():
    shell = FakeShell(answers={
        ("sh", "-c", 'echo "$SSH_CONNECTION"'): ok("192.0.2.1 50000 192.0.2.12 22\n"),
        ("ip", "-j", "link", "show"): ok('[{"ifname": "mig0"}]'),
        ("ip", "-j", "route", "get"): ok('[{"dst": "192.0.2.1", "dev": "eth0"}]'),
    })
    assert link_down_problem(shell, host(), "mig0") is None


def test_user_without_root_or_sudo_is_rejected():
    shell = FakeShell(answers={("id", "-u"): ok("1000\n")})
    problem = privilege_problem(shell, host(user="lab"))
    assert problem.startswith("user lab on host b is not root")
    assert "set sudo: true for host b in the inventory" in problem


def test_sudo_that_asks_for_a_password_is_rejected():
    shell = FakeShell(answers={("id", "-u"): ok("1000\n"),
                               ("sudo", "-n", "true"): CommandResult(1, "", "sudo: a password is required\n")})
    problem = privilege_problem(shell, host(user="lab", sudo=True))
    assert "'sudo -n true' as lab on host b failed: sudo: a password is required" in problem
    assert "NOPASSWD" in problem


def test_missing_tools_named_with_the_faults_that_need_them():
    shell = FakeShell(answers={("sh", "-c"): ok("setsid\ntc\n")})
    problems = fault_host_problems(shell, host(), {"link-down", "bandwidth"}, interface="mig0")
    assert "host b lacks setsid, tc, which the faults bandwidth, link-down run" in problems[0]


def test_daemon_outside_systemd_rejected_on_real_hosts():
    shell = FakeShell(answers={("python3", "-c", KILL_DAEMON_SCRIPT): ok("libvirtd 77 -\n")})
    problems = fault_host_problems(shell, host(), {"kill-libvirtd"}, interface="mig0")
    assert problems == ["libvirtd (pid 77) of host b runs outside a systemd service, so the harness could not "
                        "start it again after kill-libvirtd; run it as libvirtd.service, or remove the "
                        "kill-libvirtd fault"]
    assert fault_host_problems(shell, host(), {"kill-libvirtd"}, interface="mig0",
                               restart_outside_systemd=True) == []


def test_kill_libvirtd_needs_system_uri():
    problems = fault_host_problems(FakeShell(), host(libvirt_uri="qemu:///session"), {"kill-libvirtd"},
                                   interface="mig0")
    assert problems == ["kill-libvirtd on host b needs libvirt_uri qemu:///system, not qemu:///session; a "
                        "session daemon is the user's own, which the harness does not kill"]


# Preflight and inventory


def test_preflight_checks_faults_on_destination_only():
    source = host("a", address="192.0.2.11", lab_address="10.77.0.11")
    destination = host("b", address="10.77.0.12", lab_address="10.77.0.12")
    inventory = Inventory(name="two", network={"subnet": "10.77.0.0/24", "guest_address": "10.77.0.100/24"},
                          hosts=[source, destination])

    class Remote(FakeShell):
        def __init__(self, entry):
            super().__init__(entry.name)
            self.host = entry

    requirements = Requirements(faults=("link-down",))
    on_destination = check_faults(Remote(destination), inventory, requirements)
    assert on_destination.status == "fail"
    assert "its SSH address 10.77.0.12 is its lab_address" in on_destination.detail
    assert check_faults(Remote(source), inventory, requirements).summary == "none"
    assert check_faults(Remote(destination), inventory, Requirements()).status == "ok"


def test_inventory_sudo_defaults_off():
    assert host().sudo is False
    assert host(sudo=True).sudo is True
    shell = FakeShell()
    SudoShell(shell).run(["tc", "qdisc", "show"], timeout=5)
    assert shell.commands == [["sudo", "-n", "--", "tc", "qdisc", "show"]]
