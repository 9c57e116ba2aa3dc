"""Figures of a run from the probes' observations: outages, round-trip times, the stream and the switch-over.

Every function takes times on CLOCK_MONOTONIC in ns from lab.probes.parse
and the run's start ``t0_ns`` on the same clock. It returns seconds on the
run's clock, where 0 is the migration call, so probe series line up with the
progress samples and events of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lab.probes.parse import AgentOutput, CaptureOutput
from lab.probes.protocol import CLIENT_PORT, DESTINATION_PORT, SOURCE_PORT
from lab.records import EchoFigures, LatencySummary, StreamFigures, SwitchoverPhases

PERCENTILES = (50, 90, 99)


def _seconds(values: pd.Series, t0_ns: int) -> pd.Series:
    """Convert a column of CLOCK_MONOTONIC ns (nullable) into float seconds since t0_ns, NaN where missing."""
    return (values.astype("Float64") - t0_ns).astype("float64") / 1e9


def echo_series(agent: AgentOutput, t0_ns: int) -> pd.DataFrame:
    """Return one row per echo request on the run's clock.

    Columns: seq, sent_s, received_s (NaN when no reply came), rtt_ms, and
    guest_ns (the guest's CLOCK_MONOTONIC at receipt, <NA> without reply).
    """
    echo = agent.echo
    sent_s = _seconds(echo["sent_ns"], t0_ns)
    received_s = _seconds(echo["received_ns"], t0_ns)
    return pd.DataFrame({
        "seq": echo["seq"].astype("int64"),
        "sent_s": sent_s,
        "received_s": received_s,
        "rtt_ms": (received_s - sent_s) * 1000.0,
        "guest_ns": echo["guest_ns"].astype("Int64"),
    })


@dataclass(frozen=True)
class Outage:
    """The longest interval without replies inside a probing window, in seconds on the run's clock.

    ``open_start`` means no reply came between the window's start and the
    outage, and ``open_end`` that none came after it: then the outage may
    have begun earlier or lasted longer than measured.
    """

    start_s: float
    end_s: float
    open_start: bool
    open_end: bool

    @property
    def duration_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000.0


def longest_outage(sent_s: pd.Series, received_s: pd.Series, *, window_start_s: float | None = None,
                   window_end_s: float | None = None) -> Outage | None:
    """Find the longest interval without replies, from reply arrival times.

    The window runs from ``window_start_s`` (default: the first request
    sent) to ``window_end_s`` (default: the last request sent or reply
    received, whichever is later). Replies are taken in arrival order, so
    replies that arrive out of sequence order count where they arrived.
    Replies outside the window are ignored. Returns None when the window is
    empty, that is when nothing was sent and nothing received.
    """
    sends = sent_s.dropna().to_numpy(dtype=float)
    arrivals = np.sort(received_s.dropna().to_numpy(dtype=float))
    if window_start_s is None:
        candidates = [values.min() for values in (sends, arrivals) if len(values)]
        if not candidates:
            return None
        window_start_s = float(min(candidates))
    if window_end_s is None:
        candidates = [values.max() for values in (sends, arrivals) if len(values)]
        if not candidates:
            return None
        window_end_s = float(max(candidates))
    if window_end_s < window_start_s:
        return None
    inside = arrivals[(arrivals >= window_start_s) & (arrivals <= window_end_s)]
    points = np.concatenate(([window_start_s], inside, [window_end_s]))
    gaps = np.diff(points)
    index = int(np.argmax(gaps))
    return Outage(start_s=float(points[index]), end_s=float(points[index + 1]),
                  open_start=index == 0, open_end=index == len(gaps) - 1)


def latency_summary(series: pd.DataFrame) -> LatencySummary:
    """Summarize the round-trip times of the echo requests in ``series`` (rows of echo_series)."""
    sent = series[series["sent_s"].notna()]
    rtt = sent["rtt_ms"].dropna().to_numpy(dtype=float)
    figures: dict[str, float | None] = {f"p{p}_ms": None for p in PERCENTILES}
    figures["max_ms"] = None
    if len(rtt):
        for percentile, value in zip(PERCENTILES, np.percentile(rtt, PERCENTILES)):
            figures[f"p{percentile}_ms"] = max(0.0, float(value))
        figures["max_ms"] = max(0.0, float(rtt.max()))
    return LatencySummary(requests=len(sent), replied=len(rtt), lost=len(sent) - len(rtt), **figures)


def echo_figures(agent: AgentOutput, t0_ns: int, *, transfer_end_s: float | None) -> EchoFigures | None:
    """Compute the echo probe's figures, or None when it sent no request.

    The figures start with the first request that got a reply: requests
    before it went out while the client still resolved the guest's address
    or the guest was not up yet, and are only counted in
    ``requests_before_first_reply``. So the outage window starts at that
    reply. Without any reply, every request counts and the outage spans
    the whole probing time, open on both sides.

    Requests sent before 0 are "before", from 0 to ``transfer_end_s``
    "during", and later ones "after". Without ``transfer_end_s`` (a failed
    migration) every request from 0 on counts as "during".
    """
    interval_ns = agent.interval_ns
    series = echo_series(agent, t0_ns)
    sent = series[series["sent_s"].notna()]
    if interval_ns is None or sent.empty:
        return None
    replied = sent[sent["received_s"].notna()]
    window_start_s = None
    warmup = 0
    if len(replied):
        first = replied.loc[replied["sent_s"].idxmin()]
        warmup = int((sent["sent_s"] < first["sent_s"]).sum())
        sent = sent[sent["sent_s"] >= first["sent_s"]]
        series = series[series["sent_s"].isna() | (series["sent_s"] >= first["sent_s"])]
        window_start_s = float(first["received_s"])
    outage = longest_outage(series["sent_s"], series["received_s"], window_start_s=window_start_s)
    before = sent[sent["sent_s"] < 0]
    if transfer_end_s is None:
        during, after = sent[sent["sent_s"] >= 0], None
    else:
        during = sent[(sent["sent_s"] >= 0) & (sent["sent_s"] < transfer_end_s)]
        after = sent[sent["sent_s"] >= transfer_end_s]
    replied_count = int(series["received_s"].notna().sum())
    summary = agent.summary or {}
    return EchoFigures(
        interval_ms=interval_ns / 1e6,
        requests_sent=len(sent),
        requests_before_first_reply=warmup,
        replies_received=replied_count,
        lost_requests=int(sent["received_s"].isna().sum()),
        duplicate_replies=agent.duplicate_replies,
        skipped_requests=int(summary.get("echo_skipped", 0)),
        client_downtime_ms=outage.duration_ms if outage else None,
        outage_start_s=outage.start_s if outage else None,
        outage_end_s=outage.end_s if outage else None,
        outage_open_start=outage.open_start if outage else False,
        outage_open_end=outage.open_end if outage else False,
        rtt_before=latency_summary(before) if len(before) else None,
        rtt_during=latency_summary(during) if len(during) else None,
        rtt_after=latency_summary(after) if after is not None and len(after) else None,
    )


def stream_series(agent: AgentOutput, t0_ns: int) -> pd.DataFrame:
    """Return the stream's byte totals on the run's clock: columns t_s, kind (sent or echoed), total_bytes."""
    stream = agent.stream
    return pd.DataFrame({"t_s": _seconds(stream["t_ns"], t0_ns), "kind": stream["kind"].astype("string"),
                         "total_bytes": stream["total_bytes"].astype("int64")})


@dataclass(frozen=True)
class Stall:
    start_s: float
    duration_ms: float


def longest_stall(series: pd.DataFrame, end_s: float | None = None) -> Stall | None:
    """Find the longest time during which stream bytes were outstanding and none came back.

    ``series`` has the columns of stream_series(). A stall starts when bytes
    are sent while none are outstanding, or when bytes come back while
    others are still outstanding, and ends with the next bytes that come
    back, or at ``end_s`` if none come back any more.
    """
    ordered = series.sort_values(["t_s", "kind"], kind="stable")
    sent_total = echoed_total = 0
    pending_since: float | None = None
    longest: Stall | None = None

    def consider(start: float, end: float) -> None:
        nonlocal longest
        duration_ms = (end - start) * 1000.0
        if longest is None or duration_ms > longest.duration_ms:
            longest = Stall(start, duration_ms)

    for t_s, kind, total in ordered[["t_s", "kind", "total_bytes"]].itertuples(index=False, name=None):
        if kind == "sent":
            sent_total = max(sent_total, total)
            if pending_since is None and sent_total > echoed_total:
                pending_since = t_s
        else:
            if pending_since is not None:
                consider(pending_since, t_s)
            echoed_total = max(echoed_total, total)
            pending_since = t_s if sent_total > echoed_total else None
    if pending_since is not None and end_s is not None and end_s > pending_since:
        consider(pending_since, end_s)
    return longest


def stream_figures(agent: AgentOutput, t0_ns: int) -> StreamFigures | None:
    """Compute the stream's figures, or None when the stream was off."""
    if not (agent.settings.get("stream_rate_kib_s") or 0) > 0:
        return None
    summary = agent.summary or {}
    events = agent.events
    connected = bool(summary.get("stream_connected", (events["kind"] == "stream-connected").any()))
    mismatch = events[events["kind"] == "stream-mismatch"]
    errors = events[events["kind"].isin(["stream-error", "stream-mismatch"])]
    error = summary.get("stream_error") or (str(errors["message"].iloc[0]) if len(errors) else None)
    series = stream_series(agent, t0_ns)
    sent = int(series.loc[series["kind"] == "sent", "total_bytes"].max()) if (series["kind"] == "sent").any() else 0
    echoed = int(series.loc[series["kind"] == "echoed", "total_bytes"].max()) \
        if (series["kind"] == "echoed").any() else 0
    end_ns = summary.get("end_ns")
    stall = longest_stall(series, end_s=(end_ns - t0_ns) / 1e9 if end_ns is not None else None)
    if summary.get("stream_unechoed_bytes"):
        # The summary counts the bytes that never came back, even when the last W line is missing.
        sent = max(sent, echoed + int(summary["stream_unechoed_bytes"]))
    intact = mismatch.empty and echoed == sent
    if not connected and error is None:
        error = "the stream never connected"
    return StreamFigures(connected=connected, survived=connected and error is None and intact,
                         intact=intact, sent_bytes=sent, echoed_bytes=echoed,
                         max_stall_ms=stall.duration_ms if stall else None,
                         stall_start_s=stall.start_s if stall else None, error=error)


def capture_series(capture: CaptureOutput, t0_ns: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the announcements (with t_s) and the segments (with first_s, last_s) on the run's clock."""
    announcements = capture.announcements.copy()
    announcements.insert(0, "t_s", _seconds(announcements["t_ns"], t0_ns))
    segments = capture.segments.copy()
    segments.insert(0, "first_s", _seconds(segments["first_ns"], t0_ns))
    segments.insert(1, "last_s", _seconds(segments["last_ns"], t0_ns))
    return announcements.drop(columns="t_ns"), segments.drop(columns=["first_ns", "last_ns"])


def _first(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.min()) if len(values) else None


def _capture_phases(capture: CaptureOutput, paused_at_s: float, t0_ns: int) -> dict[str, object]:
    """Time the announcements and the switch's forwarding after the pause.

    A frame from the guest that enters the switch on the destination's port
    was sent from the destination, and the switch learns the guest's new
    port from it. Frames to the guest that leave the switch show where the
    switch forwards them.
    """
    announcements, segments = capture_series(capture, t0_ns)
    announced = announcements[(announcements["t_s"] >= paused_at_s)
                              & (announcements["direction"] == "from-guest")]
    entered = announced[(announced["port"] == DESTINATION_PORT) & (announced["way"] == "in")].sort_values("t_s")
    phases: dict[str, object] = {"announcements": len(entered)}
    if len(entered):
        phases["first_announce_at_s"] = float(entered["t_s"].iloc[0])
        phases["announce_kind"] = str(entered["kind"].iloc[0])
    # A gratuitous ARP names the guest's own address as target. The guest's
    # virtio-net driver sends these when QEMU requests an announcement.
    gratuitous = entered[(entered["kind"] == "arp") & entered["detail"].map(_is_gratuitous).astype(bool)]
    phases["first_guest_arp_at_s"] = _first(gratuitous["t_s"])
    at_client = announced[(announced["port"] == CLIENT_PORT) & (announced["way"] == "out")]
    phases["announce_at_client_s"] = _first(at_client["t_s"])

    later = segments[segments["first_s"] >= paused_at_s]
    from_guest = later[(later["port"] == DESTINATION_PORT) & (later["way"] == "in")
                       & (later["direction"] == "from-guest")]
    learned = [value for value in (phases.get("first_announce_at_s"), _first(from_guest["first_s"]))
               if value is not None]
    phases["switch_learned_at_s"] = min(learned) if learned else None
    forwarded = later[(later["port"] == DESTINATION_PORT) & (later["way"] == "out")
                      & (later["direction"] == "to-guest")]
    phases["first_forwarded_at_s"] = _first(forwarded["first_s"])
    to_source = segments[(segments["port"] == SOURCE_PORT) & (segments["way"] == "out")
                         & (segments["direction"] == "to-guest")]
    phases["last_to_source_at_s"] = float(to_source["last_s"].max()) if len(to_source) else None
    return phases


def _is_gratuitous(detail: str) -> bool:
    """Tell whether an ARP detail ("request sender=MAC/IP target=MAC/IP") is a request for the sender's own IP."""
    words = detail.split()
    if not words or words[0] != "request":
        return False
    fields = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    sender_ip = fields.get("sender", "").rpartition("/")[2]
    target_ip = fields.get("target", "").rpartition("/")[2]
    return bool(sender_ip) and sender_ip == target_ip


def switchover_gap(echo: pd.DataFrame, paused_at_s: float) -> tuple[float | None, float | None]:
    """Return the last reply received up to the pause and the first one received after it.

    Times are run-clock seconds. The first reply after the pause may answer
    a request sent before it: the request waited in the NIC's receive ring,
    which migrates with the guest. libvirt's "resumed" event plays no part,
    because it arrived up to 100 ms after the guest replied from the
    destination (QEMU 10.0, libvirt 11.3, virtio-net, precopy).
    """
    # NOTE: a reply the source sent just before QEMU stopped it, still on its way when
    # libvirt's "suspended" event arrived, would end the gap early. The event took longer
    # than the lab's sub-millisecond round trip in every run looked at, but nothing enforces it.
    received = echo["received_s"].dropna()
    before = received[received <= paused_at_s]
    after = received[received > paused_at_s]
    return (float(before.max()) if len(before) else None, float(after.min()) if len(after) else None)


def switchover_phases(*, paused_at_s: float | None, resumed_at_s: float | None,
                      echo: pd.DataFrame | None, capture: CaptureOutput | None,
                      t0_ns: int) -> SwitchoverPhases | None:
    """Place the steps of the switch-over that a client sees on the run's clock.

    Needs the pause (the source's "suspended" event); returns None without
    it, as for a migration that never switched over. ``echo`` has the rows
    of echo_series(), or is None when the echo probe was off. The client's
    outage at the switch-over is the gap between replies that contains the
    pause (see switchover_gap()).
    """
    if paused_at_s is None:
        return None
    phases: dict[str, object] = {"paused_at_s": paused_at_s, "resumed_at_s": resumed_at_s}
    if echo is not None:
        phases["last_reply_before_s"], phases["first_reply_after_s"] = switchover_gap(echo, paused_at_s)
    if capture is not None:
        phases.update(_capture_phases(capture, paused_at_s, t0_ns))
    return SwitchoverPhases(**{key: value for key, value in phases.items()
                               if not (isinstance(value, float) and math.isnan(value))})
