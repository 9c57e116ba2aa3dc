"""The guest's clock mapped onto the run's clock, and its throughput before, during and after migration."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lab.guest.console import WorkloadReport
from lab.probes.guest import fit_guest_clock, guest_figures, guest_series
from lab.probes.observe import RunClock, observe_run
from lab.probes.parse import parse_agent_output
from lab.probes.session import ProbeOutputs

GUEST_OFFSET_S = 100.0  # guest clock = run clock + 100 s on the source


def replies(run_times_s, *, offset_s=GUEST_OFFSET_S, rtt_s=0.0004, drift=0.0, slow_every=0):
    """Echo rows whose guest receive time lies halfway through the round trip.

    Every ``slow_every``-th reply has a 30 ms round trip with the guest
    stamping at its start, as when the reply waited in a queue.
    """
    rows = []
    for index, t_s in enumerate(run_times_s):
        rtt = rtt_s
        middle = t_s + rtt / 2
        if slow_every and index % slow_every == 0:
            rtt = 0.030
            middle = t_s
        guest_s = middle + offset_s + drift * (middle - run_times_s[0])
        rows.append({"sent_s": t_s, "received_s": t_s + rtt, "guest_ns": round(guest_s * 1e9)})
    frame = pd.DataFrame(rows, columns=["sent_s", "received_s", "guest_ns"])
    frame["guest_ns"] = frame["guest_ns"].astype("Int64")
    return frame


def report(seq, t_ms, dirtied, rate_pps=2048):
    return WorkloadReport(t_ms=t_ms, seq=seq, dirtied=dirtied, rate_pps=rate_pps, checked=0, bad=0, sweeps=0)


def test_clock_fit_recovers_offset():
    fit = fit_guest_clock(replies(np.arange(-3.0, 3.0, 0.001)))
    assert fit.offset_s == pytest.approx(-GUEST_OFFSET_S, abs=1e-6)
    assert fit.to_run_seconds(100.5) == pytest.approx(0.5, abs=1e-6)
    assert fit.error_ms == pytest.approx(0.2)


def test_clock_fit_prefers_short_round_trips():
    fit = fit_guest_clock(replies(np.arange(0.0, 5.0, 0.01), slow_every=3))
    assert fit.to_run_seconds(102.0) == pytest.approx(2.0, abs=1e-5)


def test_clock_fit_follows_drift():
    # The guest clock runs 200 ppm fast.
    fit = fit_guest_clock(replies(np.arange(0.0, 10.0, 0.01), drift=200e-6))
    assert fit.drift == pytest.approx(-200e-6, rel=0.05)
    guest_at_9s = 9.0 + 0.0002 + GUEST_OFFSET_S + 200e-6 * 9.0
    assert fit.to_run_seconds(guest_at_9s) == pytest.approx(9.0002, abs=2e-5)


def test_clock_fit_without_replies():
    empty = replies([])
    assert fit_guest_clock(empty) is None


def test_series_maps_each_host_with_its_fit():
    source = fit_guest_clock(replies(np.arange(-3.0, 1.0, 0.01)))
    # On the destination the guest clock is 0.2 s behind: it stood still during the pause.
    destination = fit_guest_clock(replies(np.arange(1.2, 4.0, 0.01), offset_s=GUEST_OFFSET_S - 0.2))
    reports = {
        "h1": [report(1, 98_000, 0), report(2, 99_000, 2048), report(3, 100_000, 4096)],
        "h2": [report(4, 101_000, 6144), report(5, 102_000, 8192)],
    }
    frame = guest_series(reports, {"h1": source, "h2": destination})
    assert frame["t_s"].tolist() == pytest.approx([-2.0, -1.0, 0.0, 1.2, 2.2], abs=1e-5)
    assert frame["host"].tolist() == ["h1", "h1", "h1", "h2", "h2"]
    assert math.isnan(frame["throughput_pps"].iloc[0])
    assert frame["throughput_pps"].iloc[1] == pytest.approx(2048.0, rel=1e-4)
    # 2048 pages over 1.2 s of run time that include the 0.2 s pause.
    assert frame["throughput_pps"].iloc[3] == pytest.approx(2048 / 1.2, rel=1e-4)


def test_series_keeps_a_report_printed_twice_once():
    fit = fit_guest_clock(replies(np.arange(-3.0, 3.0, 0.01)))
    frame = guest_series({"h1": [report(7, 100_000, 10)], "h2": [report(7, 100_000, 10)]},
                         {"h1": fit, "h2": fit})
    assert len(frame) == 1
    assert frame["host"].iloc[0] == "h1"


def test_series_without_fit_has_no_times():
    frame = guest_series({"h1": [report(1, 1000, 0), report(2, 2000, 100)]}, {})
    assert frame["t_s"].isna().all()
    assert frame["throughput_pps"].isna().all()
    assert frame["rate_pps"].tolist() == [2048, 2048]


def figure_series(rows):
    """rows: (t_s, host, dirtied) with one report per second."""
    frame = pd.DataFrame(rows, columns=["t_s", "host", "dirtied_pages"])
    frame["seq"] = range(len(frame))
    frame["interval_start_s"] = frame["t_s"].shift(1)
    frame["throughput_pps"] = frame["dirtied_pages"].diff() / (frame["t_s"] - frame["interval_start_s"])
    return frame


def test_figures_before_during_and_recovery():
    rows = [(-3.0, "h1", 0), (-2.0, "h1", 1000), (-1.0, "h1", 2000), (0.0, "h1", 3000),
            (1.0, "h1", 3500),              # 500 pages/s while the migration runs
            (2.5, "h2", 3700),              # paused at 1.5 s, then slow postcopy
            (3.5, "h2", 4600),              # 900 pages/s: recovered (90 % of 1000)
            (4.5, "h2", 5600)]
    figures = guest_figures(figure_series(rows), source_host="h1", destination_host="h2",
                            paused_at_s=1.5, transfer_end_s=2.6, clock="echo")
    assert figures.throughput_before_pps == pytest.approx(1000.0)
    assert figures.throughput_min_during_pps == pytest.approx(200.0 / 1.5)
    assert figures.slowdown_pct == pytest.approx(100.0 * (1 - (200.0 / 1.5) / 1000.0))
    assert figures.recovery_ms == pytest.approx(1000.0)
    assert figures.reports_source == 5
    assert figures.reports_destination == 3
    assert figures.source_from_s == -3.0
    assert figures.destination_to_s == 4.5


def test_figures_recovery_zero_when_pause_is_short():
    rows = [(-2.0, "h1", 0), (-1.0, "h1", 1000), (0.0, "h1", 2000), (1.0, "h2", 2990), (2.0, "h2", 3990)]
    figures = guest_figures(figure_series(rows), source_host="h1", destination_host="h2",
                            paused_at_s=0.5, transfer_end_s=0.6, clock="echo")
    assert figures.recovery_ms == 0.0
    assert figures.slowdown_pct == pytest.approx(1.0)


def test_figures_without_baseline():
    rows = [(0.5, "h1", 0), (1.5, "h2", 1000)]
    figures = guest_figures(figure_series(rows), source_host="h1", destination_host="h2",
                            paused_at_s=1.0, transfer_end_s=1.2, clock="echo")
    assert figures.throughput_before_pps is None
    assert figures.slowdown_pct is None
    assert figures.recovery_ms is None
    assert figures.throughput_min_during_pps == pytest.approx(1000.0)


def console(reports):
    return "".join(f"mlab-workload: t_ms={r.t_ms} seq={r.seq} dirtied={r.dirtied} rate_pps={r.rate_pps} "
                   f"checked=0 bad=0 sweeps=0\n" for r in reports)


def test_observe_run_aligns_consoles_with_echo_replies():
    t0_ns = 5_000_000_000_000
    lines = ['H {"version": 1, "start_ns": 0, "echo_rate_hz": 100, "stream_rate_kib_s": 0}']
    seq = 0
    # Source: guest clock = run clock + 100 s; destination after a 50 ms pause: + 99.95 s.
    for t_ms in range(-3000, 6000, 10):
        t_s = t_ms / 1000.0
        if 1000 < t_ms < 1100:
            lines.append(f"S {seq} {t0_ns + round(t_s * 1e9)}")  # lost during the switch-over
            seq += 1
            continue
        offset = 100.0 if t_ms <= 1000 else 99.95
        sent = t0_ns + round(t_s * 1e9)
        lines.append(f"S {seq} {sent}")
        lines.append(f"R {seq} {sent + 400_000} {round((t_s + 0.0002 + offset) * 1e9)}")
        seq += 1
    agent = parse_agent_output("\n".join(lines) + "\n")
    source_reports = [report(i, 98_000 + 1000 * i, 1000 * i) for i in range(4)]       # guest 98..101 s
    destination_reports = [report(i, 98_000 + 1000 * i, 1000 * i) for i in range(4, 8)]  # guest 102..105 s
    result = observe_run(ProbeOutputs(agent=agent, capture=None, problems=[]),
                         RunClock(t0_ns=t0_ns, completed=True, paused_at_s=1.001, resumed_at_s=1.05,
                                  transfer_end_s=1.1),
                         consoles={"h1": console(source_reports), "h2": console(destination_reports)},
                         source_host="h1", destination_host="h2")
    guest = result.parts["guest"]
    assert guest["t_s"].tolist() == pytest.approx([-2, -1, 0, 1, 2.05, 3.05, 4.05, 5.05], abs=1e-3)
    observed = result.observed
    assert observed.guest.clock == "echo"
    assert observed.guest.throughput_before_pps == pytest.approx(1000.0, rel=1e-3)
    assert observed.echo.client_downtime_ms == pytest.approx(100.0, abs=0.01)
    assert observed.network.paused_at_s == 1.001
    assert observed.network.last_reply_before_s == pytest.approx(1.0004, abs=1e-6)
    assert observed.network.first_reply_after_s == pytest.approx(1.1004, abs=1e-3)
    assert observed.stream is None
    assert result.warnings == []


def test_observe_run_without_probes_warns_about_clock():
    result = observe_run(None, RunClock(t0_ns=0, completed=True, paused_at_s=1.0),
                         consoles={"h1": console([report(1, 1000, 0), report(2, 2000, 5)])},
                         source_host="h1", destination_host="h2")
    assert result.observed.echo is None
    assert result.observed.guest.clock == "none"
    assert result.observed.guest.reports_source == 2
    assert any("not on the run's clock" in warning for warning in result.warnings)
