"""Tests of fault validation, triggers and the injector's timing, without a lab."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest
from pydantic import ValidationError

from lab import faults
from lab.faults import ABORT, GIVE_UP, FaultInjector, FaultSpec, FaultTimeouts, trigger_reached
from lab.records import FaultRecord, RunRecord
from tests.test_playbook import BASE, load_error, write
from tests.test_records import sample_record

from lab.playbook import load_playbook


def spec(**values) -> FaultSpec:
    return FaultSpec.model_validate(values)


# Validation


@pytest.mark.parametrize("values", [
    {"kind": "link-down"},
    {"kind": "link-down", "at_s": 1.0, "at_iteration": 2},
    {"kind": "link-down", "at_progress_pct": 30.0, "at_postcopy": True},
])
def test_fault_needs_exactly_one_trigger(values):
    with pytest.raises(ValidationError, match="exactly one trigger"):
        spec(**values)


def test_bandwidth_fault_needs_rate():
    with pytest.raises(ValidationError, match="needs bandwidth_mib_s"):
        spec(kind="bandwidth", at_s=1.0)


def test_rate_only_for_bandwidth_faults():
    with pytest.raises(ValidationError, match="only to bandwidth faults"):
        spec(kind="kill-qemu", at_s=1.0, bandwidth_mib_s=4)


def test_restore_only_for_link_faults():
    with pytest.raises(ValidationError, match="only to link-down faults"):
        spec(kind="kill-libvirtd", at_s=1.0, restore_after_s=2.0)


@pytest.mark.parametrize("values", [
    {"kind": "unplug", "at_s": 1.0},
    {"kind": "link-down", "at_progress_pct": 100.0},
    {"kind": "link-down", "at_progress_pct": 0.0},
    {"kind": "link-down", "at_iteration": 0},
    {"kind": "link-down", "at_s": -1.0},
    {"kind": "link-down", "at_s": 1.0, "colour": "red"},
])
def test_fault_rejects_bad_values(values):
    with pytest.raises(ValidationError):
        spec(**values)


def test_postcopy_trigger_needs_postcopy_strategy():
    fault = spec(kind="link-down", at_postcopy=True)
    assert faults.fault_strategy_problems(fault, "precopy")
    assert faults.fault_strategy_problems(fault.model_dump(), "precopy")
    assert faults.fault_strategy_problems(fault, "hybrid") == []
    assert faults.fault_strategy_problems(None, "precopy") == []


def test_id_text_and_trigger():
    assert spec(kind="link-down", at_progress_pct=30.0).id_text() == "link-down-p30"
    assert spec(kind="link-down", at_postcopy=True, delay_s=1.0).trigger == "postcopy + 1 s"
    assert spec(kind="bandwidth", at_iteration=2, bandwidth_mib_s=4).id_text() == "bandwidth-i2-4"
    assert spec(kind="link-down", at_s=1.5, restore_after_s=2.5).id_text() == "link-down-t1p5-up2p5"


# Triggers


def test_trigger_time():
    fault = spec(kind="kill-qemu", at_s=2.0)
    assert not trigger_reached(fault, 1.9, {}, False)
    assert trigger_reached(fault, 2.0, {}, False)


def test_trigger_progress():
    fault = spec(kind="kill-qemu", at_progress_pct=50.0)
    assert not trigger_reached(fault, 1.0, {}, False)
    assert not trigger_reached(fault, 1.0, {"data_processed": 49, "data_total": 100}, False)
    assert trigger_reached(fault, 1.0, {"data_processed": 50, "data_total": 100}, False)
    assert not trigger_reached(fault, 1.0, {"data_processed": 50, "data_total": 0}, False)


def test_trigger_iteration():
    fault = spec(kind="kill-qemu", at_iteration=2)
    assert not trigger_reached(fault, 1.0, {"memory_iteration": 1}, False)
    assert trigger_reached(fault, 1.0, {"memory_iteration": 2}, False)
    assert not trigger_reached(fault, 1.0, {}, False)


def test_trigger_postcopy():
    fault = spec(kind="link-down", at_postcopy=True)
    assert not trigger_reached(fault, 9.0, {"memory_iteration": 5}, False)
    assert trigger_reached(fault, 9.0, {}, True)


# The injector's timing, with a lab that records commands


class RecordingLab:
    def __init__(self, root: Path):
        self.root = root
        self.commands: list[tuple[str, list[str]]] = []
        self.ups = 0

    def exec(self, host, argv, timeout, check=True):
        self.commands.append((host, argv))

    def host_dir(self, name):
        return self.root / name

    def outside_path(self, host, inside):
        return self.root / host / inside.lstrip("/")

    def up(self, hosts=2):
        self.ups += 1


class PausingDomain:
    def __init__(self):
        self.abort_flags: list[int] = []

    def abortJobFlags(self, flags):
        self.abort_flags.append(flags)


def injector(tmp_path, fault: FaultSpec, **timeouts) -> tuple[FaultInjector, RecordingLab, PausingDomain]:
    lab, dom = RecordingLab(tmp_path), PausingDomain()
    fault_injector = FaultInjector(fault, lab, source_host="h1", destination_host="h2", source_shell=None,
                         source_interface="br0", guest_name="g", source_domain=dom,
                         timeouts=FaultTimeouts(**timeouts))
    return fault_injector, lab, dom


def test_link_cut_strikes_after_delay(tmp_path):
    fault_injector, lab, _ = injector(tmp_path, spec(kind="link-down", at_s=1.0, delay_s=0.5))
    assert fault_injector.poll(1.0, {}, False) is None
    assert lab.commands == []
    fault_injector.poll(1.4, {}, False)
    assert lab.commands == []
    fault_injector.poll(1.5, {}, False)
    assert lab.commands == [("h2", ["ip", "link", "set", "eth0", "down"])]
    assert fault_injector.report.struck_at_s == 1.5


def test_precopy_strike_aborts_then_gives_up(tmp_path):
    fault_injector, lab, dom = injector(tmp_path, spec(kind="link-down", at_s=0.0), settle_s=5.0, abort_s=3.0)
    fault_injector.poll(0.0, {}, False)
    assert fault_injector.poll(4.9, {}, False) is None
    assert fault_injector.poll(5.0, {}, False) == ABORT
    assert dom.abort_flags == []
    # The link comes back with the abort, so the destination sees the closed stream.
    assert lab.commands[-1] == ("h2", ["ip", "link", "set", "eth0", "up"])
    assert fault_injector.report.timed_out
    assert fault_injector.poll(7.9, {}, False) is None
    assert fault_injector.poll(8.0, {}, False) == GIVE_UP


def test_postcopy_strike_pauses_instead_of_abort(tmp_path):
    fault_injector, _, dom = injector(tmp_path, spec(kind="link-down", at_postcopy=True), settle_s=2.0)
    fault_injector.poll(1.0, {}, True)
    assert fault_injector.report.in_postcopy
    assert fault_injector.poll(3.0, {}, True) is None
    assert dom.abort_flags == [libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY]
    assert fault_injector.report.aborted_at_s == 3.0


def test_shrunk_link_is_never_aborted(tmp_path):
    shrunk, _, _ = injector(tmp_path, spec(kind="bandwidth", at_s=0.0, bandwidth_mib_s=2), settle_s=1.0)
    shrunk._strike = lambda now_s, postcopy: setattr(shrunk.report, "struck_at_s", now_s)
    shrunk.poll(0.0, {}, False)
    assert shrunk.poll(100.0, {}, False) is None
    assert shrunk.report.aborted_at_s is None


def test_link_restored_after_restore_time(tmp_path):
    fault_injector, lab, _ = injector(tmp_path, spec(kind="link-down", at_s=0.0, restore_after_s=2.0))
    fault_injector.poll(0.0, {}, False)
    fault_injector.poll(1.9, {}, False)
    assert len(lab.commands) == 1
    fault_injector.poll(2.0, {}, False)
    assert lab.commands[-1] == ("h2", ["ip", "link", "set", "eth0", "up"])
    assert fault_injector.report.restored_at_s == 2.0
    # The link is back, so the migration may take longer than settle_s.
    assert fault_injector.poll(100.0, {}, False) is None
    assert fault_injector.undo() == []
    assert len(lab.commands) == 2


def test_undo_brings_cut_link_up_once(tmp_path):
    fault_injector, lab, _ = injector(tmp_path, spec(kind="link-down", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    fault_injector.undo()
    fault_injector.undo()
    assert lab.commands == [("h2", ["ip", "link", "set", "eth0", "down"]),
                            ("h2", ["ip", "link", "set", "eth0", "up"])]


def test_kill_with_stale_pid_file_kills_nothing(tmp_path):
    fault_injector, _, _ = injector(tmp_path, spec(kind="kill-qemu", at_s=0.0))
    pid_file = fault_injector.qemu_pid_file()
    pid_file.parent.mkdir(parents=True)
    # The test's own process is no QEMU of guest g, so the injector must refuse it.
    import os
    pid_file.write_text(f"{os.getpid()}\n")
    fault_injector.poll(0.0, {}, False)
    assert fault_injector.report.struck_at_s == 0.0
    assert "is not the QEMU of g" in fault_injector.report.detail


def test_missing_libvirtd_pid_is_reported(tmp_path):
    fault_injector, lab, _ = injector(tmp_path, spec(kind="kill-libvirtd", at_s=0.0))
    fault_injector.poll(0.0, {}, False)
    assert "no pid of libvirtd" in fault_injector.report.detail
    assert fault_injector.undo() == []
    assert lab.ups == 0


# Playbooks and records


def test_playbook_matrix_of_faults(tmp_path):
    text = BASE + ("matrix:\n  fault:\n    - null\n    - {kind: kill-qemu, at_progress_pct: 40.0}\n"
                   "    - {kind: bandwidth, at_s: 1.0, bandwidth_mib_s: 4}\n")
    scenarios = load_playbook(write(tmp_path, text)).scenarios()
    assert [scenario.scenario_id for scenario in scenarios] == [
        "fault-none", "fault-kill-qemu-p40", "fault-bandwidth-t1-4"]
    assert scenarios[1].fault.kind == "kill-qemu"
    assert scenarios[0].fault is None


def test_playbook_rejects_bad_fault(tmp_path):
    error = load_error(tmp_path, BASE + "matrix:\n  fault:\n    - {kind: kill-qemu}\n")
    assert "exactly one trigger" in str(error)


def test_playbook_rejects_postcopy_fault_for_precopy(tmp_path):
    error = load_error(tmp_path, BASE + "  fault: {kind: link-down, at_postcopy: true}\n")
    assert "needs a postcopy strategy" in str(error)


def test_faults_playbook_loads():
    playbook = load_playbook(Path(__file__).resolve().parent.parent / "playbooks" / "faults.yaml")
    kinds = {scenario.fault.kind for scenario in playbook.scenarios()}
    assert kinds == {"link-down", "kill-qemu", "kill-libvirtd", "bandwidth"}
    assert any(scenario.fault.at_postcopy for scenario in playbook.scenarios())


def test_record_keeps_fault_id_and_section():
    fault = spec(kind="link-down", at_progress_pct=30.0)
    base = sample_record()
    data = base.model_dump()
    data["scenario"] = {**data["scenario"], "fault": fault.model_dump()}
    data["fault"] = FaultRecord(kind="link-down", trigger=fault.trigger, spec=fault.model_dump(),
                                struck_at_s=1.2, outcome="source-running", timed_out=True).model_dump()
    record = RunRecord.model_validate(data)
    assert record.scenario["fault"] == "link-down-p30"
    assert record.fault.outcome == "source-running"
    assert record.fault.columns()["fault_struck_at_s"] == 1.2
    assert RunRecord.model_validate_json(record.model_dump_json()) == record


def test_fault_record_rejects_unknown_outcome():
    with pytest.raises(ValidationError):
        FaultRecord(kind="link-down", trigger="1 s", spec={}, outcome="fine")


def test_leftover_qemu_of_guest_killed():
    import subprocess
    import sys

    # Python processes whose argv[0] and arguments look like a QEMU of each guest.
    def fake_qemu(guest):
        return subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(60)",
                                 f"guest={guest},debug-threads=on"], executable=sys.executable)

    other, mine = fake_qemu("mlab-other"), fake_qemu("mlab-mine")
    try:
        deadline = time.monotonic() + 10
        while b"mlab-mine" not in Path(f"/proc/{mine.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = faults.kill_leftover_qemu("mlab-mine")
        assert killed == [mine.pid]
        assert mine.wait(timeout=10) == -9
        assert other.poll() is None
    finally:
        other.kill()
        mine.kill()
        other.wait(timeout=10)
        mine.wait(timeout=10)


# Postcopy recovery through QEMU's own commands, with scripted monitors


class ScriptedMonitor:
    """A QMP monitor that returns query-migrate states from a list, and records every command."""

    def __init__(self, states: list[str], socket_address: list[dict] | None = None, fail: str | None = None):
        self.states = list(states)
        self.socket_address = socket_address
        self.fail = fail
        self.commands: list[tuple[str, dict]] = []

    def __call__(self, command: str, **arguments):
        self.commands.append((command, arguments))
        if command == self.fail:
            raise faults.HostError(f"QEMU rejected {command}")
        if command == "query-migrate":
            status = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            reply = {"status": status}
            if self.socket_address is not None:
                reply["socket-address"] = self.socket_address
            return reply
        return {}

    def sent(self) -> list[str]:
        return [command for command, _ in self.commands if command != "query-migrate"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


LISTEN = [{"type": "inet", "host": "10.77.0.12", "port": "49231", "ipv4": True}]


def resume(source, destination, timeout_s=30.0):
    clock = FakeClock()
    return faults.resume_postcopy(source, destination, "10.77.0.12", timeout_s, clock=clock, sleep=clock.sleep)


def test_resume_sends_recover_then_resume():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-recover", "postcopy-active",
                                   "completed"], socket_address=LISTEN)
    result = resume(source, destination)
    assert result.finished, result.error
    assert result.error is None
    assert ("migrate-recover", {"uri": "tcp:10.77.0.12:0"}) in destination.commands
    assert source.commands[-1] == ("migrate", {"uri": "tcp:10.77.0.12:49231", "resume": True})
    assert result.took_s > 0
    assert any("tcp:10.77.0.12:49231" in step for step in result.steps)


def test_resume_waits_for_both_sides_paused():
    source = ScriptedMonitor(["postcopy-active", "postcopy-active", "postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-paused", "completed"],
                                  socket_address=LISTEN)
    result = resume(source, destination)
    assert result.finished, result.error
    assert source.sent() == ["migrate"]


@pytest.mark.parametrize("source_state, destination_state", [
    ("postcopy-active", "postcopy-paused"),
    ("postcopy-paused", "completed"),
    ("failed", "postcopy-paused"),
])
def test_resume_leaves_guest_not_paused_alone(source_state, destination_state):
    source = ScriptedMonitor([source_state])
    destination = ScriptedMonitor([destination_state], socket_address=LISTEN)
    result = resume(source, destination)
    assert not result.finished
    assert "not resumed" in result.error
    assert source_state in result.error
    assert destination_state in result.error
    assert source.sent() == []
    assert destination.sent() == []


def test_resume_without_listening_port():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused"], socket_address=[])
    result = resume(source, destination)
    assert not result.finished
    assert "no listening TCP port" in result.error
    assert source.sent() == []


def test_resume_reports_rejected_recover():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused"], socket_address=LISTEN, fail="migrate-recover")
    result = resume(source, destination)
    assert not result.finished
    assert "migrate-recover on the destination failed" in result.error
    assert source.sent() == []


def test_resume_reports_failed_migration():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-recover", "failed"],
                                  socket_address=LISTEN)
    result = resume(source, destination)
    assert not result.finished
    assert "failed" in result.error


def test_resume_times_out():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-active"], socket_address=LISTEN)
    result = resume(source, destination, timeout_s=5.0)
    assert not result.finished
    assert "had not completed after 5 s" in result.error
    assert "postcopy-active" in result.error
    assert result.took_s >= 5.0


def test_resume_through_missing_socket(tmp_path):
    dom = OwnedDomain()
    result = faults.resume_postcopy_through_socket(dom, tmp_path / "absent.sock", "tcp://10.77.0.12", 5.0)
    assert not result.finished
    assert "absent.sock" in result.error


def test_resume_through_socket_needs_uri_host(tmp_path):
    result = faults.resume_postcopy_through_socket(OwnedDomain(), tmp_path / "q.sock", "tcp://", 5.0)
    assert not result.finished
    assert "no host" in result.error


def test_resume_refuses_foreign_domain(tmp_path):
    dom = OwnedDomain(name="someone-else")
    with pytest.raises(faults.LabError, match="ownership mark"):
        faults.resume_postcopy_through_socket(dom, tmp_path / "q.sock", "tcp://10.77.0.12", 5.0)


class OwnedDomain:
    def __init__(self, name: str = "mlab-001-abcdef"):
        self._name = name

    def name(self) -> str:
        return self._name

    def metadata(self, kind, namespace):
        return '<owner run="r1"/>'
