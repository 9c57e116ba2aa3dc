"""Outages, round-trip percentiles, stream stalls and switch-over phases from hand-built probe output."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lab.probes.analysis import (echo_figures, echo_series, latency_summary, longest_outage, longest_stall,
                                 stream_figures, stream_series, switchover_phases)
from lab.probes.parse import parse_agent_output, parse_capture_output

MS = 1_000_000
T0 = 1_000_000_000_000  # the run's clock starts here, in CLOCK_MONOTONIC ns


def agent_text(requests, *, rate_hz=1000, stream_rate=0.0, extra=(), summary=None) -> str:
    """Write probe agent output: requests are (seq, sent_ms, received_ms or None, guest_ms or None)."""
    lines = ["H " + json.dumps({"version": 1, "start_ns": T0, "echo_rate_hz": rate_hz,
                                "stream_rate_kib_s": stream_rate})]
    replies = []
    for seq, sent_ms, received_ms, guest_ms in requests:
        lines.append(f"S {seq} {T0 + round(sent_ms * MS)}")
        if received_ms is not None:
            replies.append((received_ms, f"R {seq} {T0 + round(received_ms * MS)} {round((guest_ms or 0) * MS)}"))
    lines += [line for _, line in sorted(replies)]
    lines += list(extra)
    if summary is not None:
        lines.append("Z " + json.dumps(summary))
    return "\n".join(lines) + "\n"


def steady(start_ms, count, *, interval_ms=1.0, rtt_ms=0.5, first_seq=0, lost=()):
    rows = []
    for index in range(count):
        seq = first_seq + index
        sent = start_ms + index * interval_ms
        received = None if seq in lost else sent + rtt_ms
        rows.append((seq, sent, received, received))
    return rows


def series(sent, received):
    return pd.Series(sent, dtype="float64"), pd.Series(received, dtype="float64")


# -- longest_outage --------------------------------------------------------------

def test_outage_between_replies():
    sent, received = series([0.0, 0.001, 0.002, 0.003, 0.004], [0.0005, 0.0015, np.nan, np.nan, 0.0045])
    outage = longest_outage(sent, received)
    assert outage.start_s == pytest.approx(0.0015)
    assert outage.end_s == pytest.approx(0.0045)
    assert outage.duration_ms == pytest.approx(3.0)
    assert not outage.open_start
    assert not outage.open_end


def test_outage_without_any_reply_spans_window():
    sent, received = series([1.0, 1.5, 2.0], [np.nan, np.nan, np.nan])
    outage = longest_outage(sent, received)
    assert outage.duration_ms == pytest.approx(1000.0)
    assert outage.open_start
    assert outage.open_end


def test_outage_of_empty_probe_is_none():
    sent, received = series([], [])
    assert longest_outage(sent, received) is None


def test_outage_uses_arrival_order():
    # Request 1's reply overtakes request 0's; sorted by seq the replies
    # would be 100 ms apart, but they arrived 1 ms apart.
    sent, received = series([0.0, 0.001, 0.002], [0.101, 0.100, 0.102])
    outage = longest_outage(sent, received)
    assert outage.start_s == pytest.approx(0.0)
    assert outage.end_s == pytest.approx(0.100)
    assert outage.open_start


def test_outage_with_late_probe_is_open_at_start():
    # The window starts at 0, but the probe sent its first request at 0.5 s.
    sent, received = series([0.5, 0.501, 0.502], [0.5005, 0.5015, 0.5025])
    outage = longest_outage(sent, received, window_start_s=0.0)
    assert outage.start_s == 0.0
    assert outage.duration_ms == pytest.approx(500.5)
    assert outage.open_start
    assert not outage.open_end


def test_outage_at_the_end_is_open():
    sent, received = series([0.0, 0.001, 0.002, 0.003, 0.050], [0.0005, np.nan, np.nan, np.nan, np.nan])
    outage = longest_outage(sent, received)
    assert outage.start_s == pytest.approx(0.0005)
    assert outage.end_s == pytest.approx(0.050)
    assert outage.open_end


def test_outage_ignores_replies_outside_window():
    sent, received = series([0.0, 0.001, 0.002], [0.0005, 0.0015, 0.0025])
    outage = longest_outage(sent, received, window_start_s=0.001, window_end_s=0.0018)
    assert outage.start_s == pytest.approx(0.001)
    assert outage.end_s == pytest.approx(0.0015)


def test_outage_rejects_inverted_window():
    sent, received = series([0.0], [0.001])
    assert longest_outage(sent, received, window_start_s=2.0, window_end_s=1.0) is None


# -- latency_summary -------------------------------------------------------------

def test_percentiles_of_known_round_trips():
    rtt = np.arange(1, 101, dtype=float)  # 1 .. 100 ms
    frame = pd.DataFrame({"sent_s": np.arange(100) / 1000.0, "rtt_ms": rtt})
    summary = latency_summary(frame)
    assert summary.requests == 100
    assert summary.replied == 100
    assert summary.lost == 0
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p90_ms == pytest.approx(90.1)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.max_ms == 100.0


def test_percentiles_ignore_lost_requests():
    frame = pd.DataFrame({"sent_s": [0.0, 0.1, 0.2, 0.3], "rtt_ms": [2.0, np.nan, 4.0, np.nan]})
    summary = latency_summary(frame)
    assert summary.requests == 4
    assert summary.replied == 2
    assert summary.lost == 2
    assert summary.p50_ms == pytest.approx(3.0)


def test_percentiles_without_replies_are_none():
    frame = pd.DataFrame({"sent_s": [0.0, 0.1], "rtt_ms": [np.nan, np.nan]})
    summary = latency_summary(frame)
    assert summary.lost == 2
    assert summary.p50_ms is None
    assert summary.max_ms is None


# -- echo_figures ------------------------------------------------------------------

def test_echo_figures_of_a_migration():
    # 1000 requests from -500 ms on, 1 ms apart. Requests sent from 100 to
    # 159 ms are lost, so no reply arrives between 99.5 and 160.5 ms.
    lost = set(range(600, 660))
    agent = parse_agent_output(agent_text(steady(-500.0, 1000, lost=lost)))
    figures = echo_figures(agent, T0, transfer_end_s=0.2)
    assert figures.interval_ms == 1.0
    assert figures.requests_sent == 1000
    assert figures.replies_received == 940
    assert figures.lost_requests == 60
    assert figures.client_downtime_ms == pytest.approx(61.0)
    assert figures.outage_start_s == pytest.approx(0.0995)
    assert not figures.outage_open_start
    assert figures.rtt_before.requests == 500
    assert figures.rtt_before.lost == 0
    assert figures.rtt_during.requests == 200
    assert figures.rtt_during.lost == 60
    assert figures.rtt_after.requests == 300
    assert figures.rtt_during.p50_ms == pytest.approx(0.5)


def test_echo_figures_without_any_reply():
    rows = [(seq, seq * 1.0, None, None) for seq in range(50)]
    figures = echo_figures(parse_agent_output(agent_text(rows)), T0, transfer_end_s=None)
    assert figures.replies_received == 0
    assert figures.lost_requests == 50
    assert figures.requests_before_first_reply == 0
    assert figures.client_downtime_ms == pytest.approx(49.0)
    assert figures.outage_open_start
    assert figures.outage_open_end
    assert figures.rtt_during.p50_ms is None


def test_echo_figures_skip_requests_before_first_reply():
    # The first 30 requests went out while the client resolved the guest's address.
    rows = [(seq, -100.0 + seq, None, None) for seq in range(30)]
    rows += steady(-70.0, 200, first_seq=30)
    figures = echo_figures(parse_agent_output(agent_text(rows)), T0, transfer_end_s=1.0)
    assert figures.requests_before_first_reply == 30
    assert figures.requests_sent == 200
    assert figures.lost_requests == 0
    assert figures.client_downtime_ms < 2.0


def test_echo_figures_with_out_of_order_replies():
    rows = steady(0.0, 100)
    # Request 50's reply arrives after those of 51 to 59.
    rows[50] = (50, 50.0, 60.2, 60.2)
    figures = echo_figures(parse_agent_output(agent_text(rows)), T0, transfer_end_s=None)
    assert figures.lost_requests == 0
    assert figures.replies_received == 100
    assert figures.client_downtime_ms == pytest.approx(2.0)
    assert figures.rtt_during.max_ms == pytest.approx(10.2)


def test_echo_figures_count_duplicates_once():
    text = agent_text(steady(0.0, 10)) + f"R 3 {T0 + 9 * MS} 0\n"
    agent = parse_agent_output(text)
    figures = echo_figures(agent, T0, transfer_end_s=None)
    assert agent.duplicate_replies == 1
    assert figures.replies_received == 10
    assert figures.duplicate_replies == 1


def test_echo_figures_none_when_echo_off():
    agent = parse_agent_output(agent_text([], rate_hz=0))
    assert echo_figures(agent, T0, transfer_end_s=None) is None


def test_echo_series_on_run_clock():
    agent = parse_agent_output(agent_text([(0, -2.0, -1.0, 5.0), (1, -1.0, None, None)]))
    frame = echo_series(agent, T0)
    assert frame["sent_s"].tolist() == pytest.approx([-0.002, -0.001])
    assert frame["rtt_ms"].iloc[0] == pytest.approx(1.0)
    assert math.isnan(frame["received_s"].iloc[1])
    assert frame["guest_ns"].iloc[0] == 5 * MS


# -- stream ------------------------------------------------------------------------

def stream_lines(entries):
    """entries: (t_ms, kind, total) with kind W (sent) or A (echoed)."""
    return [f"{kind} {T0 + round(t_ms * MS)} {total}" for t_ms, kind, total in entries]


def test_stall_is_longest_wait_with_bytes_outstanding():
    entries = [(0, "W", 100), (1, "A", 100), (10, "W", 200), (11, "A", 200), (20, "W", 300),
               (250, "A", 300), (260, "W", 400), (261, "A", 400)]
    agent = parse_agent_output(agent_text([], stream_rate=64, extra=stream_lines(entries)))
    stall = longest_stall(stream_series(agent, T0))
    assert stall.duration_ms == pytest.approx(230.0)
    assert stall.start_s == pytest.approx(0.020)


def test_idle_time_without_outstanding_bytes_is_no_stall():
    entries = [(0, "W", 100), (1, "A", 100), (500, "W", 200), (502, "A", 200)]
    agent = parse_agent_output(agent_text([], stream_rate=64, extra=stream_lines(entries)))
    assert longest_stall(stream_series(agent, T0)).duration_ms == pytest.approx(2.0)


def test_stall_that_never_ends_runs_to_the_end():
    entries = [(0, "W", 100), (1, "A", 100), (10, "W", 200)]
    agent = parse_agent_output(agent_text([], stream_rate=64, extra=stream_lines(entries)))
    assert longest_stall(stream_series(agent, T0), end_s=1.010).duration_ms == pytest.approx(1000.0)


def test_stream_that_survived_intact():
    entries = [(0, "W", 64), (2, "A", 64), (10, "W", 128), (12, "A", 128)]
    summary = {"end_ns": T0 + 20 * MS, "stream_connected": True, "stream_error": None,
               "stream_sent_bytes": 128, "stream_echoed_bytes": 128, "stream_unechoed_bytes": 0}
    agent = parse_agent_output(agent_text([], stream_rate=64, summary=summary,
                                          extra=[f"X {T0} stream-connected 10.77.0.100:7008",
                                                 *stream_lines(entries)]))
    figures = stream_figures(agent, T0)
    assert figures.connected
    assert figures.survived
    assert figures.intact
    assert figures.sent_bytes == 128
    assert figures.max_stall_ms == pytest.approx(2.0)


def test_stream_with_mismatch_is_not_intact():
    entries = [(0, "W", 64), (2, "A", 32)]
    summary = {"end_ns": T0 + 20 * MS, "stream_connected": True,
               "stream_error": "echoed byte 40 differs from the byte sent (record 1)",
               "stream_sent_bytes": 64, "stream_echoed_bytes": 32, "stream_unechoed_bytes": 32}
    agent = parse_agent_output(agent_text([], stream_rate=64, summary=summary, extra=[
        *stream_lines(entries), f"X {T0 + 3 * MS} stream-mismatch echoed byte 40 differs from the byte sent"]))
    figures = stream_figures(agent, T0)
    assert not figures.intact
    assert not figures.survived
    assert "byte 40" in figures.error


def test_stream_that_never_connected():
    summary = {"end_ns": T0, "stream_connected": False, "stream_error": None, "stream_sent_bytes": 0,
               "stream_echoed_bytes": 0, "stream_unechoed_bytes": 0}
    figures = stream_figures(parse_agent_output(agent_text([], stream_rate=64, summary=summary)), T0)
    assert not figures.connected
    assert not figures.survived
    assert figures.error == "the stream never connected"


def test_stream_off_gives_no_figures():
    assert stream_figures(parse_agent_output(agent_text([], stream_rate=0)), T0) is None


# -- switch-over phases ----------------------------------------------------------------

def capture_text(frames, segments) -> str:
    lines = ["H " + json.dumps({"start_ns": T0, "ports": {"source": "veth-h1", "destination": "veth-h2"},
                                "announce_ports": {"client": "veth-client"}})]
    for t_ms, port, way, direction, kind, detail in frames:
        lines.append(f"F {T0 + round(t_ms * MS)} {port} {way} {direction} {kind} {detail}")
    for port, way, direction, kind, first_ms, last_ms, count in segments:
        lines.append(f"G {port} {way} {direction} {kind} {T0 + round(first_ms * MS)} {T0 + round(last_ms * MS)} "
                     f"{count} -1 -1")
    return "\n".join(lines) + "\n"


RARP = "rarp-request sender=52:54:00:6d:00:64/0.0.0.0 target=52:54:00:6d:00:64/0.0.0.0"
GRATUITOUS_ARP = "request sender=52:54:00:6d:00:64/10.77.0.100 target=00:00:00:00:00:00/10.77.0.100"
ARP_FOR_CLIENT = "request sender=52:54:00:6d:00:64/10.77.0.100 target=00:00:00:00:00:00/10.77.0.2"


def test_switchover_phases_in_order():
    echo = echo_series(parse_agent_output(agent_text(steady(0.0, 200, lost=set(range(100, 160))))), T0)
    capture = parse_capture_output(capture_text(
        frames=[(50.0, "source", "in", "from-guest", "arp", ARP_FOR_CLIENT),
                (125.0, "destination", "in", "from-guest", "rarp", RARP),
                (125.005, "source", "out", "from-guest", "rarp", RARP),
                (125.01, "client", "out", "from-guest", "rarp", RARP),
                (175.0, "destination", "in", "from-guest", "rarp", RARP),
                (175.005, "source", "out", "from-guest", "rarp", RARP)],
        segments=[("source", "out", "to-guest", "echo", 0.0, 126.0, 126),
                  ("destination", "out", "to-guest", "echo", 126.5, 199.0, 73),
                  ("destination", "in", "from-guest", "echo", 160.4, 199.4, 40)]))
    phases = switchover_phases(paused_at_s=0.100, resumed_at_s=0.120, echo=echo, capture=capture, t0_ns=T0)
    assert phases.last_reply_before_s == pytest.approx(0.0995)
    assert phases.first_announce_at_s == pytest.approx(0.125)
    assert phases.announce_kind == "rarp"
    assert phases.announcements == 2
    assert phases.first_guest_arp_at_s is None
    assert phases.announce_at_client_s == pytest.approx(0.12501)
    assert phases.switch_learned_at_s == pytest.approx(0.125)
    assert phases.first_forwarded_at_s == pytest.approx(0.1265)
    assert phases.last_to_source_at_s == pytest.approx(0.126)
    assert phases.first_reply_after_s == pytest.approx(0.1605)


def test_switchover_learned_from_other_frame_before_announcement():
    capture = parse_capture_output(capture_text(
        frames=[(130.0, "destination", "in", "from-guest", "arp", GRATUITOUS_ARP)],
        segments=[("destination", "in", "from-guest", "ip", 121.0, 122.0, 2)]))
    phases = switchover_phases(paused_at_s=0.100, resumed_at_s=0.120, echo=None, capture=capture, t0_ns=T0)
    assert phases.switch_learned_at_s == pytest.approx(0.121)
    assert phases.first_announce_at_s == pytest.approx(0.130)
    assert phases.first_guest_arp_at_s == pytest.approx(0.130)
    assert phases.last_reply_before_s is None


def test_switchover_ignores_flooded_frames():
    # The guest still runs on the source: its broadcast leaves the switch on the destination's port.
    capture = parse_capture_output(capture_text(
        frames=[(130.0, "source", "in", "from-guest", "arp", GRATUITOUS_ARP),
                (130.01, "destination", "out", "from-guest", "arp", GRATUITOUS_ARP)],
        segments=[("destination", "out", "from-guest", "ip", 131.0, 132.0, 2)]))
    phases = switchover_phases(paused_at_s=0.100, resumed_at_s=None, echo=None, capture=capture, t0_ns=T0)
    assert phases.first_announce_at_s is None
    assert phases.announcements == 0
    assert phases.switch_learned_at_s is None
    assert phases.first_forwarded_at_s is None


def test_switchover_phases_need_a_pause():
    assert switchover_phases(paused_at_s=None, resumed_at_s=None, echo=None, capture=None, t0_ns=T0) is None


def test_switchover_reply_before_late_resume_event():
    # libvirt's resumed event came at 200 ms, after the guest replied from the destination at 160.5 ms.
    echo = echo_series(parse_agent_output(agent_text(steady(0.0, 300, lost=set(range(100, 160))))), T0)
    phases = switchover_phases(paused_at_s=0.100, resumed_at_s=0.200, echo=echo, capture=None, t0_ns=T0)
    assert phases.last_reply_before_s == pytest.approx(0.0995)
    assert phases.first_reply_after_s == pytest.approx(0.1605)
    assert phases.resumed_at_s == 0.200


def test_switchover_ends_with_reply_to_earlier_request():
    # Request 99, sent before the pause, waited in the guest's NIC and got its
    # reply from the destination at 150 ms, before any later request.
    rows = steady(0.0, 300, lost=set(range(99, 160)))
    rows[99] = (99, 99.0, 150.0, 150.0)
    echo = echo_series(parse_agent_output(agent_text(rows)), T0)
    phases = switchover_phases(paused_at_s=0.100, resumed_at_s=0.120, echo=echo, capture=None, t0_ns=T0)
    assert phases.last_reply_before_s == pytest.approx(0.0985)
    assert phases.first_reply_after_s == pytest.approx(0.150)
