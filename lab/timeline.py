"""The timeline of a run: every series measured during a run, on one clock, and its figure.

The run's clock counts seconds since the migration call (``t_s``, negative
before it). A run folder contains the timeline in parts, so each keeps its own
columns and dtypes:

timeline.parquet
    progress samples of the source's job statistics (records.TIMELINE_COLUMNS)
events.json
    libvirt lifecycle, iteration and job-completed events
echo.parquet
    one row per echo request: seq, sent_s, received_s, rtt_ms, guest_ns
stream.parquet
    byte totals of the probe's TCP stream: t_s, kind (sent or echoed), total_bytes
probe-events.parquet
    the probe agent's events: t_s, kind, message
capture-frames.parquet
    ARP and RARP frames of the guest at the switch: t_s, port, way, direction,
    kind, detail (see lab.probes.capture for way and direction)
capture-segments.parquet
    other frames of the guest at the switch, grouped into segments: first_s,
    last_s, port, way, direction, kind, frames, first_seq, last_seq
guest.parquet
    the workload's reports: t_s, interval_start_s, host, seq, guest_t_ms,
    dirtied_pages, rate_pps, throughput_pps

load_run_timeline() reads them all, and RunTimeline.merged() returns one
long table. plot_timeline() draws them in one figure.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lab.records import RunRecord
from lab.store import load_events, load_record, load_timeline

log = logging.getLogger(__name__)

# Part name -> file name in the run folder, for the parts that probes add.
PART_FILES = {
    "echo": "echo.parquet",
    "stream": "stream.parquet",
    "probe_events": "probe-events.parquet",
    "capture_frames": "capture-frames.parquet",
    "capture_segments": "capture-segments.parquet",
    "guest": "guest.parquet",
}
PART_COLUMNS = {
    "echo": {"seq": "int64", "sent_s": "float64", "received_s": "float64", "rtt_ms": "float64",
             "guest_ns": "Int64"},
    "stream": {"t_s": "float64", "kind": "string", "total_bytes": "int64"},
    "probe_events": {"t_s": "float64", "kind": "string", "message": "string"},
    "capture_frames": {"t_s": "float64", "port": "string", "way": "string", "direction": "string",
                       "kind": "string", "detail": "string"},
    "capture_segments": {"first_s": "float64", "last_s": "float64", "port": "string", "way": "string",
                         "direction": "string", "kind": "string", "frames": "int64", "first_seq": "int64",
                         "last_seq": "int64"},
    "guest": {"t_s": "float64", "interval_start_s": "float64", "host": "string", "seq": "int64",
              "guest_t_ms": "int64", "dirtied_pages": "int64", "rate_pps": "int64", "throughput_pps": "float64"},
}
MERGED_COLUMNS = {"t_s": "float64", "series": "string", "host": "string", "value": "float64", "detail": "string"}


def empty_part(name: str) -> pd.DataFrame:
    """Return a part with no rows and the part's columns and dtypes."""
    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in PART_COLUMNS[name].items()})


def conform_part(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with exactly the part's columns, in order, with its dtypes.

    Raises ValueError for an unknown part or a missing column.
    """
    if name not in PART_COLUMNS:
        raise ValueError(f"unknown timeline part {name!r}; known parts: {', '.join(PART_COLUMNS)}")
    columns = PART_COLUMNS[name]
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"timeline part {name!r} lacks the columns {missing}")
    if frame.empty:
        return empty_part(name)
    return frame[list(columns)].astype(columns).reset_index(drop=True)


def encode_parts(parts: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    """Encode timeline parts as Parquet files, keyed by file name, for store.write_run()'s extra files."""
    files = {}
    for name, frame in parts.items():
        buffer = io.BytesIO()
        conform_part(name, frame).to_parquet(buffer, index=False)
        files[PART_FILES[name]] = buffer.getvalue()
    return files


@dataclass
class RunTimeline:
    """All series of one run; a part that the run did not record is an empty frame."""

    record: RunRecord
    progress: pd.DataFrame
    events: list[dict[str, Any]]
    parts: dict[str, pd.DataFrame] = field(default_factory=dict)

    def part(self, name: str) -> pd.DataFrame:
        return self.parts.get(name, empty_part(name))

    def merged(self) -> pd.DataFrame:
        """Return every series in one long table sorted by t_s: columns t_s, series, host, value, detail.

        Series names:

        - the progress columns by name: memory_bps, data_remaining_bytes, dirty_rate_bytes_s, ...
        - ``event:<kind>`` per event
        - ``echo_rtt_ms`` at each reply, ``echo_lost`` at the send time of each request without reply
        - ``stream_sent_bytes`` and ``stream_echoed_bytes``
        - ``announce:<kind>`` per ARP or RARP frame, with the switch port as host
        - ``segment:<port>:<direction>:<kind>`` at a segment's start, with its length in seconds as value
        - ``guest_throughput_pps`` per workload report
        """
        pieces = []
        progress = self.progress
        value_columns = [column for column in progress.columns if column not in ("t_s", "host")]
        if len(progress):
            long = progress.melt(id_vars=["t_s", "host"], value_vars=value_columns, var_name="series")
            pieces.append(long.dropna(subset=["value"]).assign(detail=""))
        if self.events:
            events = pd.DataFrame(self.events)
            pieces.append(pd.DataFrame({"t_s": events["t_s"], "series": "event:" + events["kind"],
                                        "host": events["host"], "value": float("nan"),
                                        "detail": events["detail"]}))
        echo = self.part("echo")
        replied = echo[echo["received_s"].notna()]
        lost = echo[echo["received_s"].isna() & echo["sent_s"].notna()]
        pieces.append(pd.DataFrame({"t_s": replied["received_s"], "series": "echo_rtt_ms", "host": "client",
                                    "value": replied["rtt_ms"], "detail": ""}))
        pieces.append(pd.DataFrame({"t_s": lost["sent_s"], "series": "echo_lost", "host": "client",
                                    "value": lost["seq"].astype("float64"), "detail": ""}))
        stream = self.part("stream")
        pieces.append(pd.DataFrame({"t_s": stream["t_s"], "series": "stream_" + stream["kind"] + "_bytes",
                                    "host": "client", "value": stream["total_bytes"].astype("float64"),
                                    "detail": ""}))
        frames = self.part("capture_frames")
        pieces.append(pd.DataFrame({"t_s": frames["t_s"], "series": "announce:" + frames["kind"],
                                    "host": frames["port"], "value": float("nan"),
                                    "detail": frames["way"] + " " + frames["direction"] + " " + frames["detail"]}))
        segments = self.part("capture_segments")
        pieces.append(pd.DataFrame({
            "t_s": segments["first_s"],
            "series": ("segment:" + segments["port"] + ":" + segments["way"] + ":" + segments["direction"] + ":"
                       + segments["kind"]),
            "host": segments["port"], "value": segments["last_s"] - segments["first_s"],
            "detail": "frames=" + segments["frames"].astype("string")}))
        guest = self.part("guest")
        pieces.append(pd.DataFrame({"t_s": guest["t_s"], "series": "guest_throughput_pps", "host": guest["host"],
                                    "value": guest["throughput_pps"],
                                    "detail": "seq=" + guest["seq"].astype("string")}))
        pieces = [piece for piece in pieces if len(piece)]
        if not pieces:
            return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in MERGED_COLUMNS.items()})
        merged = pd.concat([piece[list(MERGED_COLUMNS)].astype(MERGED_COLUMNS) for piece in pieces],
                           ignore_index=True)
        return merged.sort_values("t_s", kind="stable").reset_index(drop=True)


def load_run_timeline(run_dir: str | Path) -> RunTimeline:
    """Read a run folder's record, progress samples, events and probe parts."""
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    parts = {}
    for name, file_name in PART_FILES.items():
        path = run_dir / file_name
        if path.is_file():
            parts[name] = conform_part(name, pd.read_parquet(path))
    return RunTimeline(record=record, progress=load_timeline(run_dir), events=load_events(run_dir), parts=parts)


# -- the figure -----------------------------------------------------------------

MIB = 2**20
PAUSE_COLOR = "#d62728"
POSTCOPY_COLOR = "#2ca02c"
OUTAGE_COLOR = "#ff7f0e"
ANNOUNCE_COLOR = "#9467bd"
HOST_COLORS = ["#1f77b4", "#17becf", "#8c564b", "#e377c2"]
# Bin width of the stream's echoed rate, in seconds.
STREAM_BIN_S = 0.1


def _phase_spans(timeline: RunTimeline) -> dict[str, tuple[float, float]]:
    """Return the pause and the postcopy phase as (start_s, end_s), where the run has them."""
    measured = timeline.record.measured
    spans = {}
    if measured.switchover_at_s is not None:
        downtime_s = (measured.wall_downtime_ms or 0.0) / 1000.0
        spans["paused"] = (measured.switchover_at_s, measured.switchover_at_s + downtime_s)
    if measured.postcopy_started_at_s is not None and measured.transfer_time_ms is not None:
        spans["postcopy"] = (measured.postcopy_started_at_s, measured.transfer_time_ms / 1000.0)
    return spans


def _iteration_times(timeline: RunTimeline) -> list[float]:
    source = timeline.record.source_host
    return [event["t_s"] for event in timeline.events if event["kind"] == "iteration" and event["host"] == source]


def _time_range(timeline: RunTimeline) -> tuple[float, float]:
    times = [timeline.progress["t_s"], timeline.part("echo")["sent_s"], timeline.part("guest")["t_s"],
             timeline.part("stream")["t_s"], pd.Series([event["t_s"] for event in timeline.events], dtype=float)]
    values = pd.concat([series.dropna().astype(float) for series in times if len(series)], ignore_index=True) \
        if any(len(series) for series in times) else pd.Series([0.0, 1.0])
    start, end = float(values.min()), float(values.max())
    return (start, end) if end > start else (start - 0.5, start + 0.5)


def _draw_phases(axes, timeline: RunTimeline) -> None:
    spans = _phase_spans(timeline)
    iterations = _iteration_times(timeline)
    for index, ax in enumerate(axes):
        first = index == 0
        if "postcopy" in spans:
            ax.axvspan(*spans["postcopy"], color=POSTCOPY_COLOR, alpha=0.12, lw=0,
                       label="postcopy phase" if first else None)
        if "paused" in spans:
            start, end = spans["paused"]
            ax.axvspan(start, max(end, start + 1e-3), color=PAUSE_COLOR, alpha=0.35, lw=0,
                       label="guest paused (libvirt events)" if first else None)
        for number, t_s in enumerate(iterations):
            ax.axvline(t_s, color="0.55", ls=":", lw=0.8,
                       label="iteration starts" if first and number == 0 else None)
        ax.axvline(0.0, color="0.2", lw=0.8)
        ax.grid(alpha=0.25)


def _draw_transfer(ax, timeline: RunTimeline) -> None:
    progress = timeline.progress
    ax.set_ylabel("transfer rate (MiB/s)")
    if progress.empty:
        ax.text(0.5, 0.5, "no progress samples", transform=ax.transAxes, ha="center", color="0.4")
        return
    ax.plot(progress["t_s"], progress["memory_bps"].astype("float64") / MIB, color="#1f77b4",
            label="transfer rate")
    remaining_ax = ax.twinx()
    remaining_ax.plot(progress["t_s"], progress["data_remaining_bytes"].astype("float64") / MIB,
                      color="#7f7f7f", ls="--", label="remaining")
    remaining_ax.set_ylabel("remaining (MiB)")
    remaining_ax.set_ylim(bottom=0)
    ax.set_ylim(0, max(1.0, float(progress["memory_bps"].astype("float64").max() / MIB) * 1.15))
    lines = ax.get_legend_handles_labels()
    more = remaining_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize="small", ncol=3)


def _draw_dirty_rate(ax, timeline: RunTimeline) -> None:
    progress = timeline.progress
    ax.set_ylabel("dirty rate (MiB/s)")
    if progress.empty or progress["dirty_rate_bytes_s"].isna().all():
        ax.text(0.5, 0.5, "no dirty rate reported", transform=ax.transAxes, ha="center", color="0.4")
        return
    ax.plot(progress["t_s"], progress["dirty_rate_bytes_s"].astype("float64") / MIB, color="#8c564b",
            label="dirty rate (QEMU)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize="small")


def _draw_probe(ax, timeline: RunTimeline) -> None:
    echo = timeline.part("echo")
    ax.set_ylabel("echo round trip (ms)")
    if echo.empty:
        ax.text(0.5, 0.5, "echo probe off", transform=ax.transAxes, ha="center", color="0.4")
        return
    replied = echo[echo["received_s"].notna()]
    ax.scatter(replied["sent_s"], replied["rtt_ms"].clip(lower=1e-3), s=2, color="#1f77b4",
               label="reply (at send time)")
    ax.set_yscale("log")
    lost = echo[echo["received_s"].isna() & echo["sent_s"].notna()]
    if len(lost):
        ax.plot(lost["sent_s"], [0.97] * len(lost), "|", color=PAUSE_COLOR, ms=8,
                transform=ax.get_xaxis_transform(), label=f"no reply ({len(lost)})")
    figures = timeline.record.observed.echo
    if figures is not None and figures.outage_start_s is not None:
        ax.axvspan(figures.outage_start_s, figures.outage_end_s, color=OUTAGE_COLOR, alpha=0.3, lw=0,
                   label=f"client outage {figures.client_downtime_ms:.0f} ms")
    frames = timeline.part("capture_frames")
    # A frame from the guest enters the switch once, on the port of the host that runs the guest.
    announced = frames[(frames["direction"] == "from-guest") & (frames["way"] == "in")]
    for number, row in enumerate(announced.itertuples(index=False)):
        ax.axvline(row.t_s, color=ANNOUNCE_COLOR, lw=0.8, ls="--",
                   label="guest ARP/RARP into the switch" if number == 0 else None)
    ax.legend(loc="upper left", fontsize="small", ncol=2)


def _draw_stream(ax, timeline: RunTimeline) -> None:
    stream = timeline.part("stream")
    ax.set_ylabel("TCP echo (KiB/s)")
    echoed = stream[stream["kind"] == "echoed"].sort_values("t_s")
    if echoed.empty:
        ax.text(0.5, 0.5, "no stream data", transform=ax.transAxes, ha="center", color="0.4")
        return
    start, end = float(echoed["t_s"].min()), float(echoed["t_s"].max())
    bins = pd.interval_range(start=start, end=end + STREAM_BIN_S, freq=STREAM_BIN_S, closed="left")
    totals = echoed.set_index("t_s")["total_bytes"]
    edges = [interval.left for interval in bins] + [bins[-1].right]
    cumulative = pd.Series(totals.values, index=totals.index).reindex(
        sorted(set(totals.index) | set(edges))).ffill().fillna(0.0)
    at_edges = cumulative.loc[edges].to_numpy(dtype=float)
    rates = (at_edges[1:] - at_edges[:-1]) / STREAM_BIN_S / 1024.0
    ax.step(edges[:-1], rates, where="post", color="#17becf", label="bytes echoed back")
    figures = timeline.record.observed.stream
    if figures is not None and figures.stall_start_s is not None and figures.max_stall_ms:
        ax.axvspan(figures.stall_start_s, figures.stall_start_s + figures.max_stall_ms / 1000.0,
                   color=OUTAGE_COLOR, alpha=0.3, lw=0, label=f"longest stall {figures.max_stall_ms:.0f} ms")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize="small")


def _draw_guest(ax, timeline: RunTimeline) -> None:
    guest = timeline.part("guest")
    ax.set_ylabel("guest dirtying (pages/s)")
    timed = guest[guest["t_s"].notna() & guest["throughput_pps"].notna()]
    if timed.empty:
        ax.text(0.5, 0.5, "no guest reports on the run's clock", transform=ax.transAxes, ha="center",
                color="0.4")
        return
    hosts = list(dict.fromkeys(timed["host"]))
    for index, host in enumerate(hosts):
        rows = timed[timed["host"] == host]
        color = HOST_COLORS[index % len(HOST_COLORS)]
        # Each value applies to the interval since the previous report.
        ax.hlines(rows["throughput_pps"], rows["interval_start_s"], rows["t_s"], color=color, lw=2,
                  label=f"on {host}")
        ax.plot(rows["t_s"], rows["throughput_pps"], "o", color=color, ms=3)
    figures = timeline.record.observed.guest
    if figures is not None and figures.throughput_before_pps:
        ax.axhline(figures.throughput_before_pps, color="0.4", ls="--", lw=0.8, label="before migration")
    ax.set_ylim(0, float(timed["throughput_pps"].max()) * 1.15)
    ax.legend(loc="lower left", fontsize="small", ncol=3)


# Margins of the switch-over panel around the pause and the first reply after it, in seconds.
ZOOM_BEFORE_S = 0.15
ZOOM_AFTER_S = 0.1


def _switchover_markers(timeline: RunTimeline) -> list[tuple[float, str, str, str]]:
    """Return (t_s, label, color, line style) for each step of the switch-over the run recorded."""
    network = timeline.record.observed.network
    if network is None or network.paused_at_s is None:
        return []
    paused = network.paused_at_s
    steps = [
        (network.paused_at_s, "source paused", PAUSE_COLOR, "-"),
        (network.resumed_at_s, "destination resumed", PAUSE_COLOR, "--"),
        (network.first_announce_at_s, f"first {network.announce_kind or 'announcement'} at the switch",
         ANNOUNCE_COLOR, "-"),
        (network.announce_at_client_s, "announcement at the client", ANNOUNCE_COLOR, ":"),
        (network.last_to_source_at_s, "last request sent to the source", "#8c564b", ":"),
        (network.first_forwarded_at_s, "first request sent to the destination", "#1f77b4", "--"),
        (network.first_reply_after_s, "first reply after the pause", POSTCOPY_COLOR, "-"),
    ]
    markers = []
    for t_s, label, color, style in steps:
        if t_s is None:
            continue
        offset = "" if t_s == paused else f" ({(t_s - paused) * 1000:+.1f} ms)"
        markers.append((t_s, label + offset, color, style))
    return markers


def _draw_switchover(ax, timeline: RunTimeline) -> None:
    """Draw each echo request around the switch-over as a line from its send to its reply, with the steps."""
    ax.set_xlabel("time since the migration call (s), around the switch-over")
    ax.set_ylabel("echo request (seq)")
    markers = _switchover_markers(timeline)
    echo = timeline.part("echo")
    if not markers:
        ax.text(0.5, 0.5, "no switch-over recorded", transform=ax.transAxes, ha="center", color="0.4")
        return
    network = timeline.record.observed.network
    end_s = network.first_reply_after_s or network.resumed_at_s or network.paused_at_s
    start_s, end_s = network.paused_at_s - ZOOM_BEFORE_S, end_s + ZOOM_AFTER_S
    shown = echo[(echo["sent_s"] >= start_s) & (echo["sent_s"] <= end_s)]
    replied = shown[shown["received_s"].notna()]
    lost = shown[shown["received_s"].isna()]
    if len(replied):
        ax.hlines(replied["seq"], replied["sent_s"], replied["received_s"], color="#1f77b4", lw=0.8,
                  label="request: sent to replied")
    if len(lost):
        ax.plot(lost["sent_s"], lost["seq"], "x", color=PAUSE_COLOR, ms=3, label=f"no reply ({len(lost)})")
    if network.resumed_at_s is not None:
        ax.axvspan(network.paused_at_s, network.resumed_at_s, color=PAUSE_COLOR, alpha=0.2, lw=0)
    for t_s, label, color, style in markers:
        ax.axvline(t_s, color=color, ls=style, lw=1.2, label=label)
    ax.set_xlim(start_s, end_s)
    ax.grid(alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _title(timeline: RunTimeline) -> str:
    record = timeline.record
    parts = [f"{record.run_id} ({record.scenario.get('strategy')}, {record.outcome})"]
    if record.stats.downtime_ms is not None:
        parts.append(f"QEMU downtime {record.stats.downtime_ms} ms")
    if record.measured.wall_downtime_ms is not None:
        parts.append(f"paused {record.measured.wall_downtime_ms:.0f} ms")
    echo = record.observed.echo
    if echo is not None and echo.client_downtime_ms is not None:
        parts.append(f"longest client outage {echo.client_downtime_ms:.0f} ms")
    network = record.observed.network
    if network is not None and network.first_reply_after_s is not None and network.last_reply_before_s is not None:
        outage_ms = (network.first_reply_after_s - network.last_reply_before_s) * 1000.0
        parts.append(f"at the switch-over {outage_ms:.0f} ms")
    return ", ".join(parts)


def plot_timeline(timeline: RunTimeline, path: str | Path) -> Path:
    """Draw the run's series on the run's clock and write the figure as PNG.

    Five panels share the time axis: transfer rate and remaining bytes,
    dirty rate, echo round trips with the client's outage, the TCP stream,
    and the guest's throughput. The pause, the postcopy phase and the
    iteration starts are marked in each. A sixth panel zooms in on the
    switch-over, with one line per echo request and the time of each step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = plt.figure(figsize=(13, 18))
    grid = fig.add_gridspec(6, 1, height_ratios=[1.2, 0.8, 1.3, 0.8, 1.1, 1.6], hspace=0.35,
                            top=0.95, bottom=0.04)
    axes = [fig.add_subplot(grid[0])]
    axes += [fig.add_subplot(grid[index], sharex=axes[0]) for index in range(1, 5)]
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    _draw_switchover(fig.add_subplot(grid[5]), timeline)
    _draw_transfer(axes[0], timeline)
    _draw_dirty_rate(axes[1], timeline)
    _draw_probe(axes[2], timeline)
    _draw_stream(axes[3], timeline)
    _draw_guest(axes[4], timeline)
    _draw_phases(axes, timeline)
    fig.suptitle(_title(timeline), y=0.99)
    axes[-1].set_xlabel("time since the migration call (s)")
    axes[-1].set_xlim(*_time_range(timeline))
    handles, labels = axes[0].get_legend_handles_labels()
    phase_labels = {"postcopy phase", "guest paused (libvirt events)", "iteration starts"}
    kept = [(handle, label) for handle, label in zip(handles, labels) if label in phase_labels]
    if kept:
        fig.legend(*zip(*kept), loc="upper center", bbox_to_anchor=(0.5, 0.978), ncol=len(kept),
                   fontsize="small")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote timeline figure %s", path)
    return path
