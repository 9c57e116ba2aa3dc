"""Reading the output files of the probe agent and the capture process into DataFrames.

All times stay in CLOCK_MONOTONIC ns here; lab.probes.analysis moves them
onto a run's clock. A line that is cut off (the last line of a killed
process) or malformed is skipped and counted in ``skipped_lines``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

ECHO_COLUMNS = {"seq": "int64", "sent_ns": "Int64", "received_ns": "Int64", "guest_ns": "Int64"}
STREAM_COLUMNS = {"t_ns": "int64", "kind": "string", "total_bytes": "int64"}
EVENT_COLUMNS = {"t_ns": "int64", "kind": "string", "message": "string"}
ANNOUNCEMENT_COLUMNS = {"t_ns": "int64", "port": "string", "way": "string", "direction": "string",
                        "kind": "string", "detail": "string"}
SEGMENT_COLUMNS = {"port": "string", "way": "string", "direction": "string", "kind": "string",
                   "first_ns": "int64", "last_ns": "int64", "frames": "int64", "first_seq": "int64",
                   "last_seq": "int64"}


def _frame(rows: list[tuple], columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=list(columns))
    return frame.astype(columns) if len(frame) else pd.DataFrame(
        {name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


@dataclass
class AgentOutput:
    """The probe agent's observations.

    ``echo`` has one row per request sent, and one per reply whose request
    line is missing, with ``sent_ns`` <NA> there. ``received_ns`` and
    ``guest_ns`` are <NA> for a request without a reply. A second reply to
    the same request is counted in ``duplicate_replies`` and otherwise ignored.
    ``stream`` lists the agent's W (kind "sent") and A (kind "echoed") lines
    with their byte totals.
    """

    settings: dict[str, Any]
    echo: pd.DataFrame
    stream: pd.DataFrame
    events: pd.DataFrame
    summary: dict[str, Any] | None
    duplicate_replies: int = 0
    skipped_lines: int = 0

    @property
    def interval_ns(self) -> int | None:
        rate = self.settings.get("echo_rate_hz") or 0
        return int(1e9 / rate) if rate > 0 else None


@dataclass
class CaptureOutput:
    """The capture process's observations: each ARP or RARP frame, and segments of other frames."""

    settings: dict[str, Any]
    announcements: pd.DataFrame
    segments: pd.DataFrame
    summary: dict[str, Any] | None
    skipped_lines: int = 0
    ports: dict[str, str] = field(default_factory=dict)


def parse_agent_output(text: str) -> AgentOutput:
    """Parse the lines the probe agent wrote; see lab.probes.agent for their format."""
    settings: dict[str, Any] = {}
    summary = None
    sent: dict[int, int] = {}
    replies: dict[int, tuple[int, int]] = {}
    duplicates = 0
    stream_rows: list[tuple] = []
    events: list[tuple] = []
    skipped = 0
    for line in text.splitlines():
        parts = line.split(" ", 3)
        kind = parts[0]
        try:
            if kind == "H":
                settings = json.loads(line[2:])
            elif kind == "S":
                sent[int(parts[1])] = int(parts[2])
            elif kind == "R":
                seq = int(parts[1])
                if seq in replies:
                    duplicates += 1
                else:
                    replies[seq] = (int(parts[2]), int(parts[3]))
            elif kind in ("W", "A"):
                stream_rows.append((int(parts[1]), "sent" if kind == "W" else "echoed", int(parts[2])))
            elif kind == "X":
                events.append((int(parts[1]), parts[2], parts[3] if len(parts) > 3 else ""))
            elif kind == "Z":
                summary = json.loads(line[2:])
            else:
                skipped += 1
        except (IndexError, ValueError):
            skipped += 1
    if skipped:
        log.warning("skipped %d malformed lines of the probe agent's output", skipped)

    rows = []
    for seq in sorted(set(sent) | set(replies)):
        received, guest = replies.get(seq, (None, None))
        rows.append((seq, sent.get(seq), received, guest))
    return AgentOutput(settings=settings, echo=_frame(rows, ECHO_COLUMNS),
                       stream=_frame(stream_rows, STREAM_COLUMNS), events=_frame(events, EVENT_COLUMNS),
                       summary=summary, duplicate_replies=duplicates, skipped_lines=skipped)


def parse_capture_output(text: str) -> CaptureOutput:
    """Parse the lines the capture process wrote; see lab.probes.capture for their format."""
    settings: dict[str, Any] = {}
    summary = None
    announcements: list[tuple] = []
    segments: list[tuple] = []
    skipped = 0
    for line in text.splitlines():
        kind = line[:1]
        try:
            if kind == "H":
                settings = json.loads(line[2:])
            elif kind == "F":
                parts = line.split(" ", 6)
                announcements.append((int(parts[1]), parts[2], parts[3], parts[4], parts[5],
                                      parts[6] if len(parts) > 6 else ""))
            elif kind == "G":
                parts = line.split(" ")
                if len(parts) != 10:
                    raise ValueError(line)
                segments.append((*parts[1:5], *(int(value) for value in parts[5:])))
            elif kind == "Z":
                summary = json.loads(line[2:])
            else:
                skipped += 1
        except (IndexError, ValueError):
            skipped += 1
    if skipped:
        log.warning("skipped %d malformed lines of the capture's output", skipped)
    ports = {**settings.get("ports", {}), **settings.get("announce_ports", {})}
    return CaptureOutput(settings=settings, announcements=_frame(announcements, ANNOUNCEMENT_COLUMNS),
                         segments=_frame(segments, SEGMENT_COLUMNS), summary=summary,
                         skipped_lines=skipped, ports=ports)
