"""Stored records of one run: what libvirt reported, what the harness measured.

Records are immutable and validated. Each stored record carries
``schema_version``. A reader rejects records of a newer schema with
RecordVersionError instead of misreading them.

The timeline of a run is a pandas DataFrame with the columns of
TIMELINE_COLUMNS, and its events a list of dicts with the keys of EVENT_KEYS.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from lab import __version__
from lab.errors import LabError
from lab.playbook import ExperimentName, Scenario, ScenarioId

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

Outcome = Literal["completed", "failed", "cancelled", "timed-out", "guest-crashed",
                  "memory-corrupt", "guest-lost"]

NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]

_CONFIG = ConfigDict(extra="forbid", frozen=True)


class RecordVersionError(LabError):
    """A stored record has a schema_version that this harness does not know."""


class Environment(BaseModel):
    """Software and hardware that produced a run, for reproducing it."""

    model_config = _CONFIG

    qemu_version: str
    libvirt_version: str
    libvirt_python_version: str
    host_kernel: str
    accelerator: Literal["kvm", "tcg"]
    cpu_model: str
    guest_image_digest: str
    guest_kernel_version: str
    playbook_sha256: str
    harness_version: str
    machine: str = Field(description="hostname of the machine that ran the harness")
    python_version: str


# libvirt job statistics keys (virDomainGetJobStats, VIR_DOMAIN_JOB_* in
# libvirt-domain.h) mapped to MigrationStats fields. All are unsigned long long
# values. Times are in ms, sizes in bytes, memory_normal and memory_constant
# count pages, and memory_bps is bytes per second.
_LIBVIRT_KEYS = {
    "downtime": "downtime_ms",
    "downtime_net": "downtime_net_ms",
    "time_elapsed": "total_time_ms",
    "setup_time": "setup_time_ms",
    "memory_processed": "transferred_bytes",
    "data_total": "data_total_bytes",
    "memory_total": "memory_total_bytes",
    "memory_normal": "normal_pages",
    "memory_constant": "zero_pages",
    "memory_page_size": "page_size_bytes",
    "memory_iteration": "iterations",
    "memory_postcopy_requests": "postcopy_requests",
    "memory_bps": "memory_bps",
}


class MigrationStats(BaseModel):
    """Job statistics of a finished migration as libvirt reported them.

    Every field is optional because libvirt omits keys that a strategy or a
    QEMU version does not provide. ``raw`` keeps every key libvirt returned.
    """

    model_config = _CONFIG

    downtime_ms: NonNegativeInt | None = None
    downtime_net_ms: NonNegativeInt | None = None
    total_time_ms: NonNegativeInt | None = None
    setup_time_ms: NonNegativeInt | None = None
    transferred_bytes: NonNegativeInt | None = Field(
        None, description="memory_processed: guest memory sent, in bytes")
    data_total_bytes: NonNegativeInt | None = None
    memory_total_bytes: NonNegativeInt | None = None
    normal_pages: NonNegativeInt | None = None
    zero_pages: NonNegativeInt | None = None
    page_size_bytes: NonNegativeInt | None = None
    iterations: NonNegativeInt | None = None
    postcopy_requests: NonNegativeInt | None = None
    dirty_rate_bytes_s: NonNegativeInt | None = None
    memory_bps: NonNegativeInt | None = Field(None, description="transfer rate in bytes/s")
    raw: dict[str, int | float | str] = {}

    @classmethod
    def from_libvirt(cls, stats: dict[str, Any]) -> MigrationStats:
        """Build the record from the dict that libvirt-python's jobStats() returns.

        libvirt reports memory_dirty_rate in pages per second, so it is
        multiplied by memory_page_size. Without memory_page_size, which
        libvirt omits when QEMU does not report it, dirty_rate_bytes_s stays None.
        """
        raw: dict[str, int | float | str] = {}
        for key, value in stats.items():
            raw[key] = int(value) if isinstance(value, bool) else value
        fields: dict[str, Any] = {field: raw[key] for key, field in _LIBVIRT_KEYS.items()
                                  if key in raw}
        pages_per_s = raw.get("memory_dirty_rate")
        page_size = raw.get("memory_page_size")
        if pages_per_s is not None and page_size:
            fields["dirty_rate_bytes_s"] = int(pages_per_s) * int(page_size)
        return cls(**fields, raw=raw)


class Measured(BaseModel):
    """Times the harness measured itself, independent of what libvirt reported.

    Times ending in ``_at_s`` are seconds since the migration call. ``phases``
    maps a phase name that ends in ``_s``, such as ``boot_s``, to its duration
    in seconds.
    """

    model_config = _CONFIG

    wall_total_ms: NonNegativeFloat | None = Field(
        None, description="from the migration call to its return")
    wall_downtime_ms: NonNegativeFloat | None = Field(
        None, description="source suspended to destination resumed, from lifecycle events")
    transfer_time_ms: NonNegativeFloat | None = Field(
        None, description="from the migration call until the destination ran with all memory; for "
                          "postcopy this includes the postcopy phase, which QEMU's total time leaves out")
    switchover_at_s: NonNegativeFloat | None = None
    postcopy_started_at_s: NonNegativeFloat | None = None
    phases: dict[Annotated[str, Field(pattern=r"^[a-z0-9_]+_s$")], NonNegativeFloat] = {}


class Integrity(BaseModel):
    """Result of the memory check that the guest's workload reports after migration."""

    model_config = _CONFIG

    guest_alive: bool
    reports_after_migration: NonNegativeInt = 0
    bad_pages: NonNegativeInt = 0
    console_trouble: list[str] = Field(
        [], description="console lines that point to a problem, such as a kernel oops")
    checked_pages: NonNegativeInt = 0


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


class RunRecord(BaseModel):
    """Everything stored about one run, written as record.json."""

    model_config = _CONFIG

    schema_version: Literal[1] = SCHEMA_VERSION
    harness_version: str = __version__
    experiment: ExperimentName
    run_id: str
    scenario_id: ScenarioId
    scenario: dict[str, str | int | float | None] = Field(
        description="scenario settings, as Scenario.values() returns them")
    repetition: Annotated[int, Field(ge=1)]
    source_host: Annotated[str, Field(min_length=1)]
    destination_host: Annotated[str, Field(min_length=1)]
    started_at: AwareDatetime
    ended_at: AwareDatetime
    outcome: Outcome
    error: str | None = None
    stats: MigrationStats = MigrationStats()
    measured: Measured = Measured()
    integrity: Integrity
    environment: Environment
    warnings: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _check_schema_version(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise RecordVersionError(
                f"record has schema_version {version}, but this harness reads only up to "
                f"{SCHEMA_VERSION}. Upgrade migration-lab to read it")
        if isinstance(data.get("scenario"), Scenario):
            data = {**data, "scenario": data["scenario"].values()}
        return data

    @field_validator("started_at", "ended_at")
    @classmethod
    def _normalize_utc(cls, value: datetime) -> datetime:
        return _to_utc(value)

    @model_validator(mode="after")
    def _check_consistency(self) -> RunRecord:
        expected_id = run_id_for(self.scenario_id, self.repetition)
        if self.run_id != expected_id:
            raise ValueError(f"run_id {self.run_id!r} must be {expected_id!r}, built from "
                             f"scenario_id and repetition")
        if self.ended_at < self.started_at:
            raise ValueError(f"ended_at {self.ended_at.isoformat()} is before started_at "
                             f"{self.started_at.isoformat()}")
        if self.source_host == self.destination_host:
            raise ValueError(f"source_host and destination_host are both {self.source_host!r}")
        if self.outcome == "completed" and self.error is not None:
            raise ValueError("a completed run has no error; record the problem in warnings")
        return self


def run_id_for(scenario_id: str, repetition: int) -> str:
    """Return the run id, which is also the name of the run's folder."""
    return f"{scenario_id}-r{repetition}"


# Timeline columns with their pandas dtypes. t_s counts seconds since the
# migration call. Nullable Int64 columns are <NA> where libvirt omitted the
# value, which happens for postcopy_requests outside postcopy, for example.
TIMELINE_COLUMNS: dict[str, str] = {
    "t_s": "float64",
    "host": "string",
    "data_processed_bytes": "Int64",
    "data_remaining_bytes": "Int64",
    "data_total_bytes": "Int64",
    "memory_processed_bytes": "Int64",
    "memory_remaining_bytes": "Int64",
    "dirty_rate_bytes_s": "Int64",
    "iteration": "Int64",
    "postcopy_requests": "Int64",
    "memory_bps": "Int64",
}

# Keys of one timeline event. wall_time is an ISO 8601 string with time zone.
EVENT_KEYS = ("t_s", "wall_time", "host", "kind", "detail")


def empty_timeline() -> pd.DataFrame:
    """Return a timeline with no rows and the dtypes of TIMELINE_COLUMNS."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in TIMELINE_COLUMNS.items()})


def make_timeline(samples: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Build a timeline from sample dicts or a frame, with the TIMELINE_COLUMNS dtypes.

    Missing columns are filled with <NA> or NaN. Raises ValueError on a column
    that TIMELINE_COLUMNS does not list, or on a value that does not convert
    to the column's dtype.
    """
    frame = samples if isinstance(samples, pd.DataFrame) else pd.DataFrame(list(samples))
    unknown = [str(name) for name in frame.columns if name not in TIMELINE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown timeline columns {unknown}; allowed: {list(TIMELINE_COLUMNS)}")
    timeline = empty_timeline().reindex(range(len(frame)))
    for name, dtype in TIMELINE_COLUMNS.items():
        if name in frame.columns:
            timeline[name] = frame[name].reset_index(drop=True).astype(dtype)
        else:
            timeline[name] = pd.Series([pd.NA] * len(frame), dtype=dtype)
    return timeline


def validate_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the events unchanged, or raise ValueError on a missing or unknown key."""
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise ValueError(f"event {index} is a {type(event).__name__}, expected a dict")
        keys = set(event)
        if keys != set(EVENT_KEYS):
            missing = sorted(set(EVENT_KEYS) - keys)
            unknown = sorted(str(key) for key in keys - set(EVENT_KEYS))
            raise ValueError(f"event {index} has missing keys {missing} and unknown keys "
                             f"{unknown}; expected exactly {list(EVENT_KEYS)}")
    return events
