"""What a client and the guest see during a precopy and a postcopy migration on the real local lab.

One experiment with every probe on serves all tests of this module: the
echo probe and the TCP stream from the lab's client host, the capture at
the lab switch, and the guest's own throughput reports.
"""

from __future__ import annotations

import pytest

from lab.report import write_report
from lab.store import load_record, load_runs
from lab.timeline import load_run_timeline, plot_timeline
from tests.lab_helpers import run_playbook_text

pytestmark = pytest.mark.lab

STRATEGIES = ["precopy", "postcopy"]
PLAYBOOK = """
experiment: lab-client-view
description: precopy and postcopy seen from a client and from the guest
guest:
  memory_mib: 192
  nic_model: e1000
workload:
  working_set_mib: 64
  dirty_rate_mib_s: 8
  pattern: random
migration:
  strategy: precopy
  bandwidth_mib_s: 48
  downtime_limit_ms: 300
  max_time_s: 120
matrix:
  strategy: [precopy, postcopy]
probes:
  echo: {enabled: true, rate_hz: 1000}
  stream: {enabled: true, rate_kib_s: 64}
  capture: {enabled: true}
  baseline_s: 3
repetitions: 1
"""


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, tmp_path_factory):
    return run_playbook_text(PLAYBOOK, shared_lab, tmp_path_factory.mktemp("client-view"), "client view")


def run_dir(experiment, strategy):
    return experiment.experiment_dir / "runs" / f"{strategy}-r1"


def test_both_runs_completed(experiment):
    assert experiment.outcomes == {"precopy-r1": "completed", "postcopy-r1": "completed"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_client_downtime_within_run(experiment, strategy):
    record = load_record(run_dir(experiment, strategy))
    echo = record.observed.echo
    assert echo is not None
    assert echo.interval_ms == 1.0
    assert echo.client_downtime_ms > 0
    assert echo.client_downtime_ms < record.measured.wall_total_ms
    assert not echo.outage_open_start
    assert not echo.outage_open_end
    # The longest outage may come at the start of the migration instead, when QEMU
    # sets up dirty tracking, but it is never shorter than the switch-over's.
    network = record.observed.network
    switchover_outage_ms = (network.first_reply_after_s - network.last_reply_before_s) * 1000.0
    assert network.last_reply_before_s <= record.measured.switchover_at_s <= network.first_reply_after_s
    assert echo.client_downtime_ms >= switchover_outage_ms - 1e-6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stream_survived_intact(experiment, strategy):
    stream = load_record(run_dir(experiment, strategy)).observed.stream
    assert stream.connected
    assert stream.survived
    assert stream.intact
    assert stream.error is None
    assert stream.echoed_bytes == stream.sent_bytes
    assert stream.sent_bytes > 64 * 1024
    assert stream.max_stall_ms > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_switchover_steps_in_order(experiment, strategy):
    network = load_record(run_dir(experiment, strategy)).observed.network
    assert network.announce_kind == "rarp"
    assert network.announcements >= 1
    # QEMU announces an e1000 NIC with RARP alone; the guest sends no gratuitous ARP.
    assert network.first_guest_arp_at_s is None
    assert network.last_reply_before_s <= network.paused_at_s
    assert network.paused_at_s <= network.first_announce_at_s
    assert network.switch_learned_at_s <= network.first_forwarded_at_s
    assert network.first_forwarded_at_s <= network.first_reply_after_s
    assert network.announce_at_client_s >= network.first_announce_at_s


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_guest_throughput_covers_run_on_both_hosts(experiment, strategy):
    folder = run_dir(experiment, strategy)
    record = load_record(folder)
    guest = load_run_timeline(folder).part("guest")
    assert guest["t_s"].notna().all()
    source = guest[guest["host"] == record.source_host]
    destination = guest[guest["host"] == record.destination_host]
    paused = record.measured.switchover_at_s
    transfer_end = record.measured.transfer_time_ms / 1000.0
    # The source's reports reach from before the probes started to the pause, and the
    # destination's from the pause to after the transfer. Reports come once per second.
    assert source["t_s"].min() < -3.0
    assert paused - 1.5 < source["t_s"].max() <= paused
    assert paused <= destination["t_s"].min() < transfer_end + 1.5
    assert destination["t_s"].max() > transfer_end
    gaps = guest["t_s"].diff().dropna()
    assert gaps.max() < 2.5
    figures = record.observed.guest
    assert figures.clock == "echo"
    assert figures.throughput_before_pps > 1000
    assert figures.reports_source == len(source)
    assert figures.reports_destination == len(destination)


def test_postcopy_slows_the_guest_more(experiment):
    precopy = load_record(run_dir(experiment, "precopy")).observed.guest
    postcopy = load_record(run_dir(experiment, "postcopy")).observed.guest
    assert postcopy.slowdown_pct > precopy.slowdown_pct


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_timeline_figure_of_run(experiment, strategy, tmp_path):
    timeline = load_run_timeline(run_dir(experiment, strategy))
    merged = timeline.merged()
    assert {"memory_bps", "echo_rtt_ms", "echo_lost", "guest_throughput_pps", "announce:rarp",
            "stream_echoed_bytes"} <= set(merged["series"])
    path = plot_timeline(timeline, tmp_path / f"{strategy}.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_both_downtimes(experiment):
    names = {path.name for path in write_report(experiment.experiment_dir)}
    assert "downtime_qemu_vs_client.png" in names
    runs = load_runs(experiment.experiment_dir)
    assert runs["downtime_ms"].notna().all()
    assert (runs["switchover_outage_ms"] > 0).all()
    assert (runs["client_downtime_ms"] >= runs["switchover_outage_ms"]).all()
    assert (runs["stream_survived"] == 1).all()
