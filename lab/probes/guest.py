"""The guest's own view: its workload's progress reports on the harness's clock.

The workload stamps each report with the guest's CLOCK_MONOTONIC (``t_ms``),
and that clock stops while the guest is paused, because under TCG it follows
QEMU's virtual clock, which does not advance while the VM is stopped. So guest time
and harness time differ by a different offset before and after each
switch-over. Every echo reply carries the guest's CLOCK_MONOTONIC at
receipt, between the client's send and receive times of the same request,
which pins the guest's clock to the harness's to within half a round trip.
One mapping is fitted per host, from the replies that host sent, and each
console's reports are mapped with the mapping of the host that printed them.

Tailing the console files would give each line the time the harness read
it, which lags by the poll interval plus QEMU's write, and aligning by
sequence number gives no clock at all, so the echo replies are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lab.guest.console import WorkloadReport
from lab.records import GuestFigures

# Replies are grouped into windows of this many guest seconds, and the one
# with the shortest round trip in each window pins the clock.
CLOCK_WINDOW_S = 1.0
# A drift is fitted only over at least this many windows spanning this many seconds.
MIN_DRIFT_WINDOWS = 3
MIN_DRIFT_SPAN_S = 2.0
RECOVERED_FRACTION = 0.9

GUEST_SERIES_COLUMNS = {
    "t_s": "float64", "interval_start_s": "float64", "host": "string", "seq": "int64",
    "guest_t_ms": "int64", "dirtied_pages": "int64", "rate_pps": "int64", "throughput_pps": "float64",
}


@dataclass(frozen=True)
class ClockFit:
    """Mapping of one host's guest clock onto the run's clock.

    run_s = guest_s + offset_s + drift * (guest_s - reference_guest_s), with
    times in seconds. ``error_ms`` is half the longest round trip among the
    replies used, a bound on the error of each point.
    """

    offset_s: float
    drift: float
    reference_guest_s: float
    points: int
    error_ms: float

    def to_run_seconds(self, guest_s: np.ndarray | float) -> np.ndarray | float:
        return guest_s + self.offset_s + self.drift * (np.asarray(guest_s) - self.reference_guest_s)


def fit_guest_clock(replies: pd.DataFrame) -> ClockFit | None:
    """Fit a ClockFit from echo replies of one host (rows of analysis.echo_series).

    Returns None when no row has a send time, a receive time and a guest time.
    """
    rows = replies.dropna(subset=["sent_s", "received_s", "guest_ns"])
    if rows.empty:
        return None
    guest_s = rows["guest_ns"].astype("float64").to_numpy() / 1e9
    sent_s = rows["sent_s"].to_numpy(dtype=float)
    received_s = rows["received_s"].to_numpy(dtype=float)
    table = pd.DataFrame({
        "guest_s": guest_s,
        "offset_s": (sent_s + received_s) / 2.0 - guest_s,
        "rtt_s": received_s - sent_s,
        "window": np.floor(guest_s / CLOCK_WINDOW_S),
    })
    best = table.loc[table.groupby("window")["rtt_s"].idxmin()].sort_values("guest_s")
    reference = float(best["guest_s"].iloc[0])
    span = float(best["guest_s"].iloc[-1]) - reference
    if len(best) >= MIN_DRIFT_WINDOWS and span >= MIN_DRIFT_SPAN_S:
        drift, offset = np.polyfit(best["guest_s"] - reference, best["offset_s"], 1)
    else:
        drift, offset = 0.0, float(best["offset_s"].median())
    return ClockFit(offset_s=float(offset), drift=float(drift), reference_guest_s=reference,
                    points=len(best), error_ms=float(best["rtt_s"].max()) * 500.0)


def guest_series(reports: dict[str, list[WorkloadReport]], fits: dict[str, ClockFit | None]) -> pd.DataFrame:
    """Put the workload reports of each host on the run's clock and compute the throughput between them.

    ``reports`` and ``fits`` are keyed by host name. Reports of a host
    without a fit get NaN times. A report printed on both hosts (same seq)
    is kept once, from the host listed first. ``throughput_pps`` is the
    pages dirtied since the previous report divided by the run-clock time
    between them, so time the guest spent paused lowers it although the
    guest's own ``rate_pps`` does not show the pause.
    """
    rows = []
    seen: set[int] = set()
    for host, host_reports in reports.items():
        fit = fits.get(host)
        for report in host_reports:
            if report.seq in seen:
                continue
            seen.add(report.seq)
            t_s = float(fit.to_run_seconds(report.t_ms / 1000.0)) if fit is not None else math.nan
            rows.append((t_s, host, report.seq, report.t_ms, report.dirtied, report.rate_pps))
    frame = pd.DataFrame.from_records(rows, columns=["t_s", "host", "seq", "guest_t_ms", "dirtied_pages",
                                                     "rate_pps"])
    frame = frame.sort_values("seq", kind="stable").reset_index(drop=True)
    frame["interval_start_s"] = frame["t_s"].shift(1)
    elapsed = frame["t_s"] - frame["interval_start_s"]
    dirtied = frame["dirtied_pages"].diff()
    # A counter that went down means the workload started again; that interval has no throughput.
    frame["throughput_pps"] = (dirtied / elapsed).where((elapsed > 0) & (dirtied >= 0))
    return frame[list(GUEST_SERIES_COLUMNS)].astype(GUEST_SERIES_COLUMNS)


def guest_figures(series: pd.DataFrame, *, source_host: str, destination_host: str,
                  paused_at_s: float | None, transfer_end_s: float | None, clock: str) -> GuestFigures:
    """Compute throughput before, the minimum during, the slowdown and the recovery after the pause.

    "Before" is the median over report intervals that end before the
    migration call (time 0). "During" covers intervals that overlap the
    time from 0 to ``transfer_end_s``, or to the last report when it is
    None. Recovery is measured from ``paused_at_s`` to the start of the
    first interval, ending after the pause, whose throughput is at least 90 %
    of "before". It is 0 when the interval that contains the pause already is.
    """
    timed = series[series["throughput_pps"].notna() & series["t_s"].notna()]
    counts = {"reports_source": int((series["host"] == source_host).sum()),
              "reports_destination": int((series["host"] == destination_host).sum())}
    for role, host in (("source", source_host), ("destination", destination_host)):
        times = series.loc[(series["host"] == host) & series["t_s"].notna(), "t_s"]
        counts[f"{role}_from_s"] = float(times.min()) if len(times) else None
        counts[f"{role}_to_s"] = float(times.max()) if len(times) else None

    before = timed[timed["t_s"] <= 0]["throughput_pps"]
    baseline = float(before.median()) if len(before) else None
    end_s = transfer_end_s
    if end_s is None:
        end_s = float(timed["t_s"].max()) if len(timed) else 0.0
    during = timed[(timed["t_s"] > 0) & (timed["interval_start_s"] < end_s)]["throughput_pps"]
    minimum = float(during.min()) if len(during) else None
    slowdown = None
    if baseline and minimum is not None:
        slowdown = 100.0 * (1.0 - minimum / baseline)

    recovery_ms = None
    if baseline and paused_at_s is not None:
        after = timed[timed["t_s"] > paused_at_s]
        good = after[after["throughput_pps"] >= RECOVERED_FRACTION * baseline]
        if len(good):
            start_s = float(good["interval_start_s"].iloc[0])
            recovery_ms = max(0.0, (start_s - paused_at_s) * 1000.0)
    return GuestFigures(clock=clock, throughput_before_pps=baseline, throughput_min_during_pps=minimum,
                        slowdown_pct=slowdown, recovery_ms=recovery_ms, **counts)
