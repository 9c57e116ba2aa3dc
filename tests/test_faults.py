"""Tests of fault validation, triggers and the injector's timing, without a lab."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest
from pydantic import ValidationError

from lab import faults
from lab.faults import ABORT, GIVE_UP, FaultInjector, FaultSpec, FaultTimeouts, trigger_reached
from lab.migrate import BLOCKTIME_MISSING, MigrationResult
from lab.records import FaultRecord, RunRecord
from tests.test_playbook import BASE, load_error, write
from tests.test_records import sample_record

from lab.playbook import load_playbook
from lab.runner import record_recovered_end


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

    def __init__(self, states: list[str], socket_address: list[dict] | None = None, fail: str | None = None,
                 completed_reply: dict | None = None):
        self.states = list(states)
        self.socket_address = socket_address
        self.fail = fail
        # Fields that the reply with status completed adds, such as postcopy-blocktime.
        self.completed_reply = completed_reply or {}
        self.commands: list[tuple[str, dict]] = []

    def __call__(self, command: str, **arguments):
        self.commands.append((command, arguments))
        if command == self.fail:
            raise faults.HostError(f"QEMU rejected {command}")
        if command == "query-migrate":
            status = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            reply = {"status": status}
            if status == "completed":
                reply.update(self.completed_reply)
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


def resume(source, destination, timeout_s=30.0, clock=None):
    clock = clock or FakeClock()
    return faults.resume_postcopy(source, destination, "10.77.0.12", timeout_s, clock=clock, sleep=clock.sleep)


def test_resume_sends_recover_then_resume():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-recover", "postcopy-active",
                                   "completed"], socket_address=LISTEN)
    result = resume(source, destination)
    assert result.finished, result.error
    assert result.resumed
    assert result.error is None
    assert ("migrate-recover", {"uri": "tcp:10.77.0.12:0"}) in destination.commands
    assert source.commands[-1] == ("migrate", {"uri": "tcp:10.77.0.12:49231", "resume": True})
    assert result.took_s > 0
    assert any("tcp:10.77.0.12:49231" in step for step in result.steps)


def test_resume_keeps_completion_time_and_reply():
    clock = FakeClock()
    clock.now = 100.0
    source = ScriptedMonitor(["postcopy-paused"])
    blocktime = {"postcopy-blocktime": 6100, "postcopy-vcpu-blocktime": [6100]}
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-recover", "postcopy-active",
                                   "postcopy-active", "completed"], socket_address=LISTEN, completed_reply=blocktime)
    result = resume(source, destination, clock=clock)
    assert result.finished, result.error
    # Three polls of 0.2 s after the resume command, which came at once.
    assert result.completed_at == pytest.approx(100.6)
    assert result.completed_at - result.took_s == pytest.approx(100.0)
    assert result.destination_status["status"] == "completed"
    assert result.destination_status["postcopy-blocktime"] == 6100


def test_resume_completed_before_first_poll_has_no_time():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["completed"], completed_reply={"postcopy-blocktime": 40})
    result = resume(source, destination)
    assert result.finished
    assert result.completed_at is None
    assert result.destination_status["postcopy-blocktime"] == 40


def test_resume_completed_while_waiting_has_time():
    clock = FakeClock()
    source = ScriptedMonitor(["postcopy-active"])
    destination = ScriptedMonitor(["postcopy-active"] * 5 + ["completed"], socket_address=LISTEN)
    result = resume(source, destination, clock=clock)
    assert result.finished, result.error
    assert not result.resumed
    assert result.completed_at == clock.now
    assert result.completed_at > 0


def test_resume_waits_for_both_sides_paused():
    source = ScriptedMonitor(["postcopy-active", "postcopy-active", "postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-paused", "postcopy-paused", "postcopy-paused", "completed"],
                                  socket_address=LISTEN)
    result = resume(source, destination)
    assert result.finished, result.error
    assert source.sent() == ["migrate"]


@pytest.mark.parametrize("source_state, destination_state", [
    ("postcopy-active", "postcopy-paused"),
    ("postcopy-paused", "postcopy-recover"),
    ("failed", "postcopy-paused"),
    ("active", "active"),
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


def test_resume_counts_completed_destination():
    source = ScriptedMonitor(["postcopy-paused"])
    destination = ScriptedMonitor(["completed"], socket_address=LISTEN)
    result = resume(source, destination)
    assert result.finished
    assert not result.resumed
    assert result.error is None
    assert source.sent() == []
    assert destination.sent() == []


def test_resume_waits_for_active_postcopy():
    # QEMU switched to postcopy only once the link was back, so postcopy goes on and completes.
    source = ScriptedMonitor(["postcopy-active"])
    destination = ScriptedMonitor(["postcopy-active"] * 80 + ["completed"], socket_address=LISTEN)
    result = resume(source, destination, timeout_s=30.0)
    assert result.finished, result.error
    assert not result.resumed
    assert source.sent() == []
    assert any("postcopy-active on the source and postcopy-active on the destination" in step
               for step in result.steps)


def test_resume_waits_for_destination_after_source():
    # Seen on the local lab: the source reports completed some seconds before the destination.
    source = ScriptedMonitor(["postcopy-active"] * 10 + ["completed"])
    destination = ScriptedMonitor(["postcopy-active"] * 80 + ["completed"], socket_address=LISTEN)
    result = resume(source, destination, timeout_s=30.0)
    assert result.finished, result.error
    assert not result.resumed
    assert source.sent() == []


def test_resume_after_active_postcopy_pauses():
    source = ScriptedMonitor(["postcopy-active"] * 60 + ["postcopy-paused"])
    destination = ScriptedMonitor(["postcopy-active"] * 60 + ["postcopy-paused", "postcopy-paused",
                                                              "postcopy-recover", "completed"],
                                  socket_address=LISTEN)
    result = resume(source, destination, timeout_s=30.0)
    assert result.finished, result.error
    assert result.resumed
    assert source.sent() == ["migrate"]


def test_resume_active_postcopy_times_out():
    source = ScriptedMonitor(["postcopy-active"])
    destination = ScriptedMonitor(["postcopy-active"], socket_address=LISTEN)
    result = resume(source, destination, timeout_s=5.0)
    assert not result.finished
    assert "not resumed" in result.error
    assert result.took_s >= 5.0
    assert source.sent() == []


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


# Classification of where the guest ended


def classify(**values) -> str:
    defaults = dict(struck=True, run_outcome="failed", recovered=None, guest_alive=True, switched=False,
                    source_runs=False, destination_runs=False)
    defaults.update(values)
    return faults.classify_fault(**defaults)


@pytest.mark.parametrize("values, expected", [
    ({"struck": False, "run_outcome": "completed"}, "not-struck"),
    ({"run_outcome": "completed", "destination_runs": True}, "completed"),
    ({"run_outcome": "completed", "recovered": True, "destination_runs": True}, "postcopy-recovered"),
    ({"source_runs": True}, "source-running"),
    ({"source_runs": True, "guest_alive": False}, "guest-lost"),
    ({"source_runs": False}, "guest-lost"),
    # The destination ran the guest, so a source that runs again has stale memory.
    ({"source_runs": True, "switched": True}, "guest-lost"),
    ({"switched": True, "destination_runs": True}, "guest-lost"),
    ({"source_runs": True, "destination_runs": True}, "split-brain"),
    ({"source_runs": True, "destination_runs": True, "switched": True}, "split-brain"),
    ({"source_runs": True, "destination_runs": True, "run_outcome": "completed"}, "split-brain"),
    ({"source_runs": True, "destination_runs": True, "struck": False}, "split-brain"),
])
def test_classify_fault_outcomes(values, expected):
    assert classify(**values) == expected


def test_classify_outcomes_are_recordable():
    for outcome in faults.FAULT_OUTCOMES:
        record = FaultRecord(kind="link-down", trigger="postcopy", spec={}, outcome=outcome)
        assert record.outcome == outcome


@pytest.mark.parametrize("libvirt_state, qemu_state, expected", [
    ("running", "running", True),
    # libvirt's state lagging behind a QEMU that stopped the vCPUs at the switch.
    ("running", "finish-migrate", False),
    ("running", "postmigrate", False),
    ("running", None, True),
    ("paused/postcopy", None, False),
    ("absent", None, False),
])
def test_runs_guest_trusts_qemu(libvirt_state, qemu_state, expected):
    assert faults.runs_guest(libvirt_state, qemu_state) is expected


def test_host_state_text_shows_disagreement():
    assert faults.host_state_text("running", "running") == "running"
    assert faults.host_state_text("paused/postcopy", None) == "paused/postcopy"
    assert faults.host_state_text("running", "finish-migrate") == "running (QEMU: finish-migrate)"


class StateDomain:
    def __init__(self, name: str, state: int, reason: int, qemu: str | None):
        self._name, self._state, self.qemu = name, (state, reason), qemu

    def name(self):
        return self._name

    def state(self):
        return self._state


class StateConnection:
    """A libvirt connection with at most one guest."""

    def __init__(self, dom: StateDomain | None):
        self.dom = dom

    def lookupByName(self, name):
        if self.dom is None or self.dom.name() != name:
            error = libvirt.libvirtError("no domain")
            error.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", "", "", 0, 0)
            raise error
        return self.dom


def fake_monitor(dom, command, flags):
    assert '"query-status"' in command
    if dom.qemu is None:
        error = libvirt.libvirtError("monitor gone")
        error.err = (libvirt.VIR_ERR_OPERATION_INVALID, 0, "monitor gone", 0, "", "", "", 0, 0)
        raise error
    return '{"return": {"status": "%s", "running": %s}}' % (dom.qemu, "true" if dom.qemu == "running" else "false")


def test_qemu_status_asks_query_status(monkeypatch):
    monkeypatch.setattr(faults.libvirt_qemu, "qemuMonitorCommand", fake_monitor)
    running = StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 0, "finish-migrate"))
    gone = StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 0, None))
    assert faults.qemu_status(running, "g") == "finish-migrate"
    assert faults.qemu_status(gone, "g") is None
    assert faults.qemu_status(StateConnection(None), "g") is None
    assert faults.qemu_status(None, "g") is None


def fault_runner(source: StateConnection, destination: StateConnection):
    from lab.runner import ExperimentRunner

    runner = object.__new__(ExperimentRunner)
    runner.source, runner.destination = source, destination
    return runner


def cut_at_switch(tmp_path) -> FaultInjector:
    injector = FaultInjector(spec(kind="link-down", at_postcopy=True), RecordingLab(tmp_path), source_host="h1",
                             destination_host="h2", source_shell=None, source_interface="eth0",
                             guest_name="g", source_domain=None, timeouts=FaultTimeouts())
    injector.report.struck_at_s = 0.9
    injector.report.in_postcopy = True
    return injector


def alive():
    from lab.records import Integrity

    return Integrity(guest_alive=True, reports_after_migration=3, bad_pages=0, console_trouble=[],
                     checked_pages=10)


def test_fault_record_both_running_is_split_brain(tmp_path, monkeypatch):
    monkeypatch.setattr(faults.libvirt_qemu, "qemuMonitorCommand", fake_monitor)
    runner = fault_runner(StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 1, "running")),
                          StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 1, "running")))
    record = runner._fault_record(cut_at_switch(tmp_path), "g", "failed", "link down", alive(), switched=True)
    assert record.outcome == "split-brain"
    assert record.source_state == "running"
    assert record.destination_state == "running"


def test_fault_record_stopped_source_is_not_running(tmp_path, monkeypatch):
    # libvirt lists the source as running, but its QEMU stopped the vCPUs at the switch.
    monkeypatch.setattr(faults.libvirt_qemu, "qemuMonitorCommand", fake_monitor)
    runner = fault_runner(StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 1, "finish-migrate")),
                          StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 1, "running")))
    record = runner._fault_record(cut_at_switch(tmp_path), "g", "failed", "link down", alive(), switched=True)
    assert record.outcome == "guest-lost"
    assert record.source_state == "running (QEMU: finish-migrate)"


def test_fault_record_source_after_switch_not_source_running(tmp_path, monkeypatch):
    monkeypatch.setattr(faults.libvirt_qemu, "qemuMonitorCommand", fake_monitor)
    runner = fault_runner(StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 1, "running")),
                          StateConnection(None))
    injector = cut_at_switch(tmp_path)
    record = runner._fault_record(injector, "g", "failed", "link down", alive(), switched=True)
    assert record.outcome == "guest-lost"
    assert record.destination_state == "absent"
    assert "not the guest's latest" in injector.report.steps[-1]


def test_fault_record_precopy_cut_keeps_source_running(tmp_path, monkeypatch):
    monkeypatch.setattr(faults.libvirt_qemu, "qemuMonitorCommand", fake_monitor)
    paused_incoming = StateDomain("g", libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION, None)
    runner = fault_runner(StateConnection(StateDomain("g", libvirt.VIR_DOMAIN_RUNNING, 1, "running")),
                          StateConnection(paused_incoming))
    record = runner._fault_record(cut_at_switch(tmp_path), "g", "failed", "link down", alive(), switched=False)
    assert record.outcome == "source-running"
    assert record.destination_state == "paused/migration"


class UnswitchedDomain(PausingDomain):
    """A source whose libvirt job has not reached its postcopy phase, as after a cut right at the switch."""

    def name(self):
        return "g"

    def abortJobFlags(self, flags):
        super().abortJobFlags(flags)
        error = libvirt.libvirtError("not in post-copy mode")
        error.err = (libvirt.VIR_ERR_OPERATION_INVALID, 0,
                     "current job is not outgoing migration in post-copy mode", 0, "", "", "", 0, 0)
        raise error


@pytest.mark.parametrize("reply, step", [
    ('{"return": {}}', "postcopy paused with QEMU's migrate-pause"),
    ('{"error": {"class": "GenericError", "desc": "migrate-pause is currently only supported during '
     'postcopy-active or postcopy-recover state"}}', "migrate-pause on the source QEMU failed"),
])
def test_postcopy_pause_falls_back_to_qmp(tmp_path, monkeypatch, reply, step):
    commands = []

    def monitor(dom, command, flags):
        commands.append(command)
        return reply

    monkeypatch.setattr(faults.libvirt_qemu, "qemuMonitorCommand", monitor)
    dom = UnswitchedDomain()
    fault_injector = FaultInjector(spec(kind="link-down", at_postcopy=True), RecordingLab(tmp_path),
                                   source_host="h1", destination_host="h2", source_shell=None,
                                   source_interface="br0", guest_name="g", source_domain=dom,
                                   timeouts=FaultTimeouts(settle_s=2.0))
    fault_injector.poll(1.0, {}, True)
    assert fault_injector.poll(3.0, {}, True) is None
    assert dom.abort_flags == [libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY]
    assert commands == ['{"execute": "migrate-pause"}']
    assert any(step in line for line in fault_injector.report.steps)
    # The link comes back after the pause, so the migration can be resumed.
    assert fault_injector.report.restored_at_s == 3.0


def recovered_result() -> MigrationResult:
    return MigrationResult(outcome="completed", error=None, destination_domain=None, completed_stats={},
                           samples=[], events=[], started_at=0.0, wall_total_ms=9583.0, transfer_time_ms=9571.0,
                           t0_monotonic_s=100.0,
                           warnings=[f"{BLOCKTIME_MISSING}: query-migrate on the destination reported no "
                                     "postcopy-blocktime", "another warning"])


def test_recovered_end_replaces_migrate3_figures():
    result = recovered_result()
    resumed = faults.ResumeResult(finished=True, resumed=True, took_s=2.2, completed_at=110.3,
                                  destination_status={"status": "completed", "postcopy-blocktime": 6900,
                                                      "postcopy-vcpu-blocktime": [6900]})
    record_recovered_end(result, resumed)
    assert result.transfer_time_ms == pytest.approx(10_300.0)
    assert result.details["postcopy_blocktime_ms"] == 6900
    assert result.details["postcopy_vcpu_blocktime_max_ms"] == 6900
    assert result.warnings == ["another warning"]


def test_recovered_end_without_figures_keeps_migrate3_ones():
    result = recovered_result()
    resumed = faults.ResumeResult(finished=True, completed_at=None, destination_status={"status": "completed"})
    record_recovered_end(result, resumed)
    assert result.transfer_time_ms == 9571.0
    assert "postcopy_blocktime_ms" not in result.details
    assert len(result.warnings) == 2
