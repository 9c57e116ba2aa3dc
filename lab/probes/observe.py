"""Turning the probes' raw observations and the guest's consoles into a run's figures and timeline parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd

from lab.guest.console import scan_console
from lab.probes.analysis import capture_series, echo_figures, echo_series, stream_figures, stream_series, \
    switchover_phases
from lab.probes.guest import ClockFit, fit_guest_clock, guest_figures, guest_series
from lab.probes.session import ProbeOutputs
from lab.records import Observed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunClock:
    """The start of a run's migration on CLOCK_MONOTONIC, and its phase times on the run's clock (s)."""

    t0_ns: int
    completed: bool
    paused_at_s: float | None = None
    resumed_at_s: float | None = None
    transfer_end_s: float | None = None


@dataclass
class ObservedRun:
    """The Observed section of a run record, the timeline parts to store, and warnings."""

    observed: Observed
    parts: dict[str, pd.DataFrame] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _split_replies(echo: pd.DataFrame, clock: RunClock) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split echo rows into replies the source sent and replies the destination sent."""
    if not clock.completed or clock.paused_at_s is None:
        return echo, echo.iloc[0:0]
    # The same rule as switchover_gap(): replies received up to the pause came from
    # the source, replies to requests sent after it from the destination.
    return (echo[echo["received_s"] <= clock.paused_at_s],
            echo[echo["received_s"].notna() & (echo["sent_s"] > clock.paused_at_s)])


def observe_run(outputs: ProbeOutputs | None, clock: RunClock, *, consoles: dict[str, str],
                source_host: str, destination_host: str) -> ObservedRun:
    """Compute a run's client and guest figures from the probes' output and the console logs.

    ``consoles`` maps a host name to the text of the guest's console on that
    host. ``outputs`` is None when no probe ran; then only the guest's
    throughput is computed, without a clock mapping.
    """
    result = ObservedRun(observed=Observed())
    agent = outputs.agent if outputs else None
    capture = outputs.capture if outputs else None
    if outputs:
        result.warnings.extend(f"probes: {problem}" for problem in outputs.problems)

    echo = None
    figures: dict[str, object] = {}
    if agent is not None:
        echo = echo_series(agent, clock.t0_ns)
        figures["echo"] = echo_figures(agent, clock.t0_ns, transfer_end_s=clock.transfer_end_s)
        figures["stream"] = stream_figures(agent, clock.t0_ns)
        result.parts["echo"] = echo
        result.parts["stream"] = stream_series(agent, clock.t0_ns)
        events = agent.events
        result.parts["probe_events"] = pd.DataFrame({
            "t_s": (events["t_ns"].astype("float64") - clock.t0_ns) / 1e9,
            "kind": events["kind"], "message": events["message"]})
    if capture is not None:
        result.parts["capture_frames"], result.parts["capture_segments"] = capture_series(capture, clock.t0_ns)
    figures["network"] = switchover_phases(paused_at_s=clock.paused_at_s, resumed_at_s=clock.resumed_at_s,
                                           echo=echo, capture=capture, t0_ns=clock.t0_ns)

    fits: dict[str, ClockFit | None] = {}
    if echo is not None and echo["guest_ns"].notna().any():
        from_source, from_destination = _split_replies(echo, clock)
        fits = {source_host: fit_guest_clock(from_source), destination_host: fit_guest_clock(from_destination)}
        for host, fit in fits.items():
            if fit is not None:
                log.debug("guest clock on %s: offset %.6f s, drift %.1f ppm, %d points, error %.2f ms",
                          host, fit.offset_s, fit.drift * 1e6, fit.points, fit.error_ms)
    reports = {host: scan_console(consoles.get(host, "")).reports for host in (source_host, destination_host)}
    series = guest_series(reports, fits)
    aligned = any(fit is not None for fit in fits.values())
    if series["t_s"].isna().any() and len(series):
        hosts = sorted(set(series.loc[series["t_s"].isna(), "host"]))
        result.warnings.append(f"guest reports from {', '.join(hosts)} are not on the run's clock: no echo "
                               "reply from that host carried the guest's time")
    result.parts["guest"] = series
    figures["guest"] = guest_figures(series, source_host=source_host, destination_host=destination_host,
                                     paused_at_s=clock.paused_at_s, transfer_end_s=clock.transfer_end_s,
                                     clock="echo" if aligned else "none")
    result.observed = Observed(**figures)
    return result
