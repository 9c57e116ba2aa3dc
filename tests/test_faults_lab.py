"""Faults struck on the real local lab, and the state of guest and lab afterwards.

One hybrid experiment with four faults: the link cut during precopy and
during postcopy (back after 10 s, but the harness pauses the migration and
brings the link back after fault_settle_s), the destination QEMU killed and
the destination libvirtd killed. Probes are off to keep the runs short.
A second experiment cuts the link right at the switch to postcopy.
"""

from __future__ import annotations

import json

import libvirt
import pytest

from lab.guest.console import scan_console
from lab.hosts import shaping
from lab.hosts.shell import NamespaceShell
from lab.report import write_report
from lab.store import load_record
from tests.lab_helpers import lab_qemu_pids, run_playbook_text

pytestmark = pytest.mark.lab

PLAYBOOK = """
experiment: lab-faults
lab:
  hosts: 2
guest:
  memory_mib: 128
  vcpus: 1
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: hybrid
  bandwidth_mib_s: 8
  max_time_s: 120
  postcopy_after_iterations: 1
  postcopy_bandwidth_mib_s: 1
matrix:
  fault:
    - {kind: link-down, at_progress_pct: 30.0}
    - {kind: link-down, at_postcopy: true, delay_s: 0.5, restore_after_s: 10}
    - {kind: kill-qemu, at_progress_pct: 30.0}
    - {kind: kill-libvirtd, at_s: 2.0}
repetitions: 1
probes:
  echo: {enabled: false}
  stream: {enabled: false}
  capture: {enabled: false}
timeouts:
  fault_settle_s: 6
  fault_abort_s: 20
  postcopy_recovery_s: 150
  daemon_restart_s: 60
"""

RUNS = {
    "cut-precopy": "fault-link-down-p30-r1",
    "cut-postcopy": "fault-link-down-pc-up10-r1",
    "kill-qemu": "fault-kill-qemu-p30-r1",
    "kill-libvirtd": "fault-kill-libvirtd-t2-r1",
}


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, tmp_path_factory):
    return run_playbook_text(PLAYBOOK, shared_lab, tmp_path_factory.mktemp("faults"), "faults")


def record_of(experiment, name):
    return load_record(experiment.experiment_dir / "runs" / RUNS[name])


def test_every_fault_ran(experiment):
    assert sorted(experiment.outcomes) == sorted(RUNS.values())
    assert not experiment.interrupted


def test_cut_precopy_leaves_guest_on_source(experiment):
    record = record_of(experiment, "cut-precopy")
    fault = record.fault
    assert fault.struck_at_s is not None
    assert not fault.in_postcopy
    assert fault.timed_out
    assert fault.aborted_at_s >= fault.struck_at_s + 6
    assert record.outcome == "timed-out"
    assert fault.outcome == "source-running"
    assert fault.source_state == "running"
    assert record.integrity.guest_alive
    assert record.integrity.bad_pages == 0


def test_cut_postcopy_paused_then_resumed(experiment):
    record = record_of(experiment, "cut-postcopy")
    fault = record.fault
    steps = json.dumps(fault.steps, indent=1)
    assert fault.struck_at_s is not None
    assert fault.in_postcopy
    assert fault.aborted_at_s >= fault.struck_at_s + 6
    assert fault.restored_at_s == fault.aborted_at_s
    assert fault.recovery_attempted, steps
    assert any("postcopy-paused" in step for step in fault.steps), steps


def test_cut_postcopy_recovered(experiment):
    record = record_of(experiment, "cut-postcopy")
    fault = record.fault
    steps = json.dumps(fault.steps, indent=1)
    assert fault.recovered is True, steps
    assert fault.outcome == "postcopy-recovered", steps
    assert record.outcome == "completed", record.error
    assert fault.recovery_ms is not None
    assert 0 < fault.recovery_ms <= 150_000
    # The migration ended after the resume command, which came after the pause.
    assert record.measured.transfer_time_ms >= fault.aborted_at_s * 1000 + fault.recovery_ms
    assert record.measured.postcopy_blocktime_ms is not None, record.warnings
    assert fault.destination_state == "running", steps
    assert fault.source_state == "absent", steps
    assert record.integrity.guest_alive
    assert record.integrity.bad_pages == 0


def test_cut_postcopy_workload_goes_on(experiment):
    """The workload's reports show the stall of the cut, then verified progress on the destination."""
    run_dir = experiment.experiment_dir / "runs" / RUNS["cut-postcopy"]
    by_seq = {}
    for host in ("h1", "h2"):
        for report in scan_console((run_dir / f"console-{host}.log").read_text(errors="replace")).reports:
            by_seq[report.seq] = (host, report)
    reports = [by_seq[seq] for seq in sorted(by_seq)]
    assert len(reports) >= 4, "too few workload reports"
    gaps = [later.t_ms - earlier.t_ms for (_, earlier), (_, later) in zip(reports, reports[1:])]
    stall = gaps.index(max(gaps))
    # The workload reports every second, and the cut stalls the guest for at
    # least fault_settle_s - delay_s (5.5 s) of its own clock.
    assert gaps[stall] >= 4000, gaps
    after = reports[stall + 1:]
    # The runner waits for 3 reports on the destination, and at most one of them comes before the stall.
    assert len(after) >= 2, f"{len(after)} reports after the stall"
    assert all(host == "h2" for host, _ in after), after
    assert after[-1][1].checked > after[0][1].checked
    assert after[-1][1].rate_pps > 0
    assert all(report.bad == 0 for _, report in reports)


def test_killed_qemu_leaves_guest_on_source(experiment):
    record = record_of(experiment, "kill-qemu")
    assert record.fault.struck_at_s is not None
    assert record.outcome == "failed"
    assert record.fault.outcome == "source-running"
    assert record.integrity.guest_alive
    assert record.fault.destination_state == "absent"


def test_killed_libvirtd_restarted(experiment, shared_lab):
    record = record_of(experiment, "kill-libvirtd")
    fault = record.fault
    assert fault.struck_at_s is not None
    assert fault.outcome == "source-running"
    assert record.integrity.guest_alive
    assert any("started again" in step for step in fault.steps)
    # The destination's libvirtd is back and has no guest of the run left.
    conn = libvirt.open(shared_lab.host("h2").libvirt_uri)
    try:
        assert conn.listAllDomains() == []
    finally:
        conn.close()




def test_no_qemu_outlives_its_run(experiment, shared_lab):
    assert lab_qemu_pids(shared_lab) == []


def test_lab_left_working(experiment, shared_lab):
    link = json.loads(shared_lab.exec("h2", ["ip", "-j", "link", "show", "eth0"], timeout=10).stdout)
    assert link[0]["operstate"] != "DOWN"
    assert "UP" in link[0]["flags"]
    for host in ("h1", "h2"):
        qdisc = shaping.root_qdisc(NamespaceShell(shared_lab, host), "br0")
        assert qdisc is None or qdisc.handle != shaping.HANDLE


def test_report_has_fault_table(experiment):
    write_report(experiment.experiment_dir)
    text = (experiment.experiment_dir / "report" / "summary.md").read_text()
    assert "## Faults" in text
    for run_id in RUNS.values():
        assert run_id in text
    assert "source-running" in text
    assert "postcopy-recovered" in text


# A link cut right at the switch to postcopy: the source libvirtd's job has
# not reached its postcopy phase yet, so libvirt rejects the pause while the
# QEMUs go on in postcopy once the link is back.
CUT_AT_SWITCH = """
experiment: lab-cut-at-switch
lab:
  hosts: 2
guest:
  memory_mib: 160
  vcpus: 1
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: postcopy
  bandwidth_mib_s: 8
  max_time_s: 120
  postcopy_bandwidth_mib_s: 1
  fault: {kind: link-down, at_postcopy: true}
repetitions: 1
probes:
  echo: {enabled: false}
  stream: {enabled: false}
  capture: {enabled: false}
timeouts:
  fault_settle_s: 6
  fault_abort_s: 10
  postcopy_recovery_s: 90
"""


@pytest.fixture(scope="module")
def cut_at_switch(shared_lab, guest_image, tmp_path_factory):
    summary = run_playbook_text(CUT_AT_SWITCH, shared_lab, tmp_path_factory.mktemp("cut-at-switch"),
                                "cut at the switch")
    (run_id,) = summary.outcomes
    return load_record(summary.experiment_dir / "runs" / run_id)


def test_cut_at_switch_ends_on_destination(cut_at_switch):
    record = cut_at_switch
    fault = record.fault
    steps = json.dumps(fault.steps, indent=1)
    assert fault.struck_at_s is not None
    assert fault.in_postcopy
    assert fault.outcome in ("completed", "postcopy-recovered"), steps
    assert record.outcome == "completed", f"{record.error}\n{steps}"
    assert fault.source_state == "absent", steps
    assert fault.destination_state == "running", steps
    assert record.integrity.guest_alive
    assert record.integrity.bad_pages == 0
    assert not any("split brain" in warning for warning in record.warnings), record.warnings


def test_cut_at_switch_leaves_no_guest(cut_at_switch, shared_lab):
    for host in ("h1", "h2"):
        conn = libvirt.open(shared_lab.host(host).libvirt_uri)
        try:
            assert conn.listAllDomains() == [], host
        finally:
            conn.close()
    assert lab_qemu_pids(shared_lab) == []
