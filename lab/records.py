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
from lab.faults import FaultOutcome
from lab.playbook import ExperimentName, Scenario, ScenarioId

log = logging.getLogger(__name__)

# Version 2 added ``observed`` and ``host_figures``; records of version 1 read as having
# no observations and no host figures. Version 3 added the strategy figures (xbzrle_* in
# stats; throttle, connections, blocktime, downtime raises, save and guest rates in measured),
# which read as None in older records. Version 4 added the guest disk: disk_* in stats and
# the ``disk`` section, which read as None in older records.
SCHEMA_VERSION = 4

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
    # xbzrle: bytes and pages sent as deltas, cache misses and deltas too large to send.
    "compression_cache": "xbzrle_cache_bytes",
    "compression_bytes": "xbzrle_bytes",
    "compression_pages": "xbzrle_pages",
    "compression_cache_misses": "xbzrle_cache_misses",
    "compression_overflow": "xbzrle_overflow",
    # Disk copied over NBD with VIR_MIGRATE_NON_SHARED_DISK; 0 when nothing was copied.
    "disk_total": "disk_total_bytes",
    "disk_processed": "disk_processed_bytes",
    "disk_remaining": "disk_remaining_bytes",
    "disk_bps": "disk_bps",
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
    xbzrle_cache_bytes: NonNegativeInt | None = None
    xbzrle_bytes: NonNegativeInt | None = Field(None, description="bytes sent as xbzrle deltas")
    xbzrle_pages: NonNegativeInt | None = Field(None, description="pages sent as xbzrle deltas")
    xbzrle_cache_misses: NonNegativeInt | None = None
    xbzrle_overflow: NonNegativeInt | None = Field(
        None, description="pages whose delta was larger than the page, so sent whole")
    disk_total_bytes: NonNegativeInt | None = Field(
        None, description="disk bytes the NBD copy had to send: the disk's size plus what the guest "
                          "wrote during the copy")
    disk_processed_bytes: NonNegativeInt | None = Field(None, description="disk bytes copied over NBD")
    disk_remaining_bytes: NonNegativeInt | None = None
    disk_bps: NonNegativeInt | None = Field(None, description="disk copy rate in bytes/s")
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
    # Figures of single strategies. libvirt reports the auto-converge throttle
    # only while the job runs, so the harness keeps the sampled values.
    auto_converge_throttle_max_pct: NonNegativeInt | None = None
    auto_converge_throttle_last_pct: NonNegativeInt | None = None
    multifd_connections_max: NonNegativeInt | None = Field(
        None, description="most established TCP connections from the source seen on the destination")
    postcopy_preempt: bool | None = Field(
        None, description="QEMU's postcopy-preempt capability on the source during the migration")
    postcopy_blocktime_ms: NonNegativeInt | None = Field(
        None, description="time vCPUs waited for missing pages, overlapped across vCPUs, from the "
                          "destination's query-migrate")
    postcopy_vcpu_blocktime_max_ms: NonNegativeInt | None = None
    downtime_raises: NonNegativeInt | None = Field(
        None, description="times the downtime policy raised the maximum downtime")
    downtime_limit_final_ms: NonNegativeInt | None = None
    monitor_settings: str | None = Field(
        None, description="QEMU settings the harness set through the QEMU monitor, as libvirt has no flag")
    save_format_used: str | None = Field(None, description="save image format of a flushing run")
    save_ms: NonNegativeFloat | None = None
    restore_ms: NonNegativeFloat | None = None
    save_file_bytes: NonNegativeInt | None = Field(None, description="apparent size of the save file")
    save_file_disk_bytes: NonNegativeInt | None = Field(None, description="allocated size of the save file")
    guest_rate_before_pps: NonNegativeFloat | None = Field(
        None, description="median workload rate_pps of the reports before the migration call")
    guest_rate_min_pps: NonNegativeFloat | None = Field(
        None, description="lowest rate_pps of the reports printed during the migration, on the source, "
                          "and of the first report on the destination")
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


class LatencySummary(BaseModel):
    """Round-trip times of the echo requests sent in one phase of a run."""

    model_config = _CONFIG

    requests: NonNegativeInt
    replied: NonNegativeInt
    lost: NonNegativeInt
    p50_ms: NonNegativeFloat | None = None
    p90_ms: NonNegativeFloat | None = None
    p99_ms: NonNegativeFloat | None = None
    max_ms: NonNegativeFloat | None = None


class EchoFigures(BaseModel):
    """What the client's echo probe saw. Times ending in ``_s`` are on the run's clock.

    ``client_downtime_ms`` is the longest interval without a reply, measured
    between reply arrival times, so it is accurate to about one probe
    interval. An outage that touches the start or the end of the probing
    window is open on that side, and then it is a lower bound.
    """

    model_config = _CONFIG

    interval_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    requests_sent: NonNegativeInt
    requests_before_first_reply: NonNegativeInt = Field(
        0, description="requests sent before the first one that got a reply; no other figure counts them")
    replies_received: NonNegativeInt
    lost_requests: NonNegativeInt
    duplicate_replies: NonNegativeInt = 0
    skipped_requests: NonNegativeInt = Field(
        0, description="requests the probe did not send because it ran too late for their slot")
    client_downtime_ms: NonNegativeFloat | None = None
    outage_start_s: float | None = Field(None, description="last reply before the longest outage")
    outage_end_s: float | None = Field(None, description="first reply after the longest outage")
    outage_open_start: bool = False
    outage_open_end: bool = False
    rtt_before: LatencySummary | None = Field(None, description="requests sent before the migration call")
    rtt_during: LatencySummary | None = Field(None, description="requests sent until the transfer ended")
    rtt_after: LatencySummary | None = Field(None, description="requests sent after the transfer ended")


class StreamFigures(BaseModel):
    """The TCP connection the client kept open to the guest across the migration."""

    model_config = _CONFIG

    connected: bool
    survived: bool = Field(description="connected, never reset, and every byte sent came back")
    intact: bool = Field(description="the bytes that came back equal the bytes sent, in order")
    sent_bytes: NonNegativeInt
    echoed_bytes: NonNegativeInt
    max_stall_ms: NonNegativeFloat | None = Field(
        None, description="longest time with bytes outstanding and none coming back")
    stall_start_s: float | None = None
    error: str | None = None


class SwitchoverPhases(BaseModel):
    """When each step between the source's pause and the client's next reply happened.

    All times are seconds on the run's clock. Frames are those with the
    guest's MAC address on the switch ports that lead to the source, the
    destination and the client.
    """

    model_config = _CONFIG

    last_reply_before_s: float | None = None
    paused_at_s: float | None = Field(None, description="the source suspended the guest (libvirt event)")
    resumed_at_s: float | None = Field(None, description="the destination resumed the guest (libvirt event)")
    first_announce_at_s: float | None = Field(
        None, description="first ARP or RARP frame from the guest on the destination's switch port")
    announce_kind: Literal["rarp", "arp"] | None = None
    announcements: NonNegativeInt = Field(
        0, description="ARP and RARP frames from the guest into the switch on the destination's port after the pause")
    first_guest_arp_at_s: float | None = Field(
        None, description="first gratuitous ARP from the guest itself, which virtio-net sends on QEMU's request")
    announce_at_client_s: float | None = Field(
        None, description="first announcement on the client's switch port")
    switch_learned_at_s: float | None = Field(
        None, description="first frame from the guest on the destination's port, from which the switch "
                          "learns the guest's new port")
    first_forwarded_at_s: float | None = Field(
        None, description="first frame to the guest that the switch sent to the destination")
    last_to_source_at_s: float | None = Field(
        None, description="last frame to the guest that the switch sent to the source")
    first_reply_after_s: float | None = None


class GuestFigures(BaseModel):
    """The guest's own view: its workload's throughput, on the run's clock.

    Throughput is pages dirtied per second between two consecutive workload
    reports, which come about once per second, so recovery is known to about
    one second. The guest's clock is mapped onto the harness's with the
    guest receive times in the echo replies (``clock``), or not at all.
    """

    model_config = _CONFIG

    clock: Literal["echo", "none"]
    throughput_before_pps: NonNegativeFloat | None = None
    throughput_min_during_pps: NonNegativeFloat | None = None
    slowdown_pct: float | None = Field(None, description="100 * (1 - minimum during / before)")
    recovery_ms: NonNegativeFloat | None = Field(
        None, description="from the pause until the start of the first report interval back at 90 % of "
                          "the throughput before migration, or 0 if the interval with the pause is")
    reports_source: NonNegativeInt = 0
    reports_destination: NonNegativeInt = 0
    source_from_s: float | None = None
    source_to_s: float | None = None
    destination_from_s: float | None = None
    destination_to_s: float | None = None


class Observed(BaseModel):
    """What the client and the guest observed during a run; None where that probe did not run."""

    model_config = _CONFIG

    echo: EchoFigures | None = None
    stream: StreamFigures | None = None
    network: SwitchoverPhases | None = None
    guest: GuestFigures | None = None

    def columns(self) -> dict[str, Any]:
        """Return the figures as one flat row with the names of OBSERVED_COLUMNS."""
        row: dict[str, Any] = dict.fromkeys(OBSERVED_COLUMNS)
        echo, stream, network, guest = self.echo, self.stream, self.network, self.guest
        if echo is not None:
            row.update(client_downtime_ms=echo.client_downtime_ms, probe_interval_ms=echo.interval_ms,
                       requests_sent=echo.requests_sent, lost_requests=echo.lost_requests)
            for phase in ("before", "during", "after"):
                latency = getattr(echo, f"rtt_{phase}")
                if latency is not None:
                    row[f"rtt_{phase}_p50_ms"] = latency.p50_ms
                    row[f"rtt_{phase}_p99_ms"] = latency.p99_ms
                    row[f"lost_{phase}"] = latency.lost
        if stream is not None:
            row.update(stream_survived=stream.survived, stream_intact=stream.intact,
                       stream_max_stall_ms=stream.max_stall_ms)
        if network is not None:
            # The steps of the client's outage, in order. libvirt's "resumed" event is left out:
            # it reached the harness 1 to 17 ms after the first announcement in the runs measured
            # with QEMU 10.0 and libvirt 11.3.
            row["switchover_outage_ms"] = _difference_ms(network.first_reply_after_s, network.last_reply_before_s)
            row["silence_before_pause_ms"] = _difference_ms(network.paused_at_s, network.last_reply_before_s)
            row["announce_after_pause_ms"] = _difference_ms(network.first_announce_at_s, network.paused_at_s)
            row["forward_after_announce_ms"] = _difference_ms(network.first_forwarded_at_s,
                                                              network.first_announce_at_s)
            row["reply_after_forward_ms"] = _difference_ms(network.first_reply_after_s, network.first_forwarded_at_s)
        if guest is not None:
            row.update(guest_throughput_before_pps=guest.throughput_before_pps,
                       guest_throughput_min_pps=guest.throughput_min_during_pps,
                       guest_slowdown_pct=guest.slowdown_pct, guest_recovery_ms=guest.recovery_ms)
        return row


def _difference_ms(later_s: float | None, earlier_s: float | None) -> float | None:
    if later_s is None or earlier_s is None:
        return None
    return (later_s - earlier_s) * 1000.0


# Flat columns of Observed.columns(), for tables with one row per run.
OBSERVED_COLUMNS = [
    "client_downtime_ms", "switchover_outage_ms", "probe_interval_ms", "requests_sent", "lost_requests",
    "rtt_before_p50_ms", "rtt_before_p99_ms", "lost_before",
    "rtt_during_p50_ms", "rtt_during_p99_ms", "lost_during",
    "rtt_after_p50_ms", "rtt_after_p99_ms", "lost_after",
    "stream_survived", "stream_intact", "stream_max_stall_ms",
    "silence_before_pause_ms", "announce_after_pause_ms", "forward_after_announce_ms", "reply_after_forward_ms",
    "guest_throughput_before_pps", "guest_throughput_min_pps", "guest_slowdown_pct", "guest_recovery_ms",
]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


class HostFigures(BaseModel):
    """Figures the harness read on one libvirt host during the migration, over SSH or in its namespaces.

    The window runs from a sample taken before the migration call to one
    taken after the call returned, with samples 0.1 s apart. Interface
    counters include all traffic on the interface, SSH to the host included
    when it shares the interface.
    """

    model_config = _CONFIG

    host: Annotated[str, Field(min_length=1)]
    role: Literal["source", "destination"]
    interface: str
    samples: NonNegativeInt = 0
    window_ms: NonNegativeFloat | None = None
    qemu_cpu_ms: NonNegativeFloat | None = Field(
        None, description="CPU time (user + system) of the guest's QEMU process in the window; on the source "
                          "up to its last sample before it exited, on the destination since it started")
    rx_bytes: NonNegativeInt | None = Field(None, description="bytes received on the interface in the window")
    tx_bytes: NonNegativeInt | None = Field(None, description="bytes sent on the interface in the window")


class DiskRecord(BaseModel):
    """The guest's disk in one run (lab.disks): where it lived and how the migration treated it.

    The bytes copied are in ``stats`` (disk_processed_bytes), from libvirt's
    job statistics.
    """

    model_config = _CONFIG

    storage: Literal["shared", "local", "copy"]
    size_mib: Annotated[int, Field(gt=0)]
    path: str = Field(description="the disk file as the hosts' QEMU opens it")
    cache: Literal["none", "writeback"] = Field(
        description="libvirt cache mode: none (O_DIRECT) where the filesystem allows it")
    unsafe_flag: bool = Field(description="the migration passed VIR_MIGRATE_UNSAFE")
    unsafe_reason: str | None = None
    destination_precreated: bool = Field(
        False, description="the harness created an empty file of the same size on the destination (copy)")
    writes_source: NonNegativeInt = Field(0, description="1 MiB writes the guest reported on the source")
    writes_destination: NonNegativeInt = Field(
        0, description="1 MiB writes the guest reported on the destination, after the migration")
    write_errors: list[str] = Field([], description="failed writes the guest reported")
    left_behind: list[str] = Field([], description="disk files the harness could not remove")

    def columns(self) -> dict[str, Any]:
        """Return the disk's columns of the runs table."""
        return {"disk_cache": self.cache, "disk_unsafe_flag": self.unsafe_flag,
                "disk_writes_source": self.writes_source, "disk_writes_destination": self.writes_destination,
                "disk_write_errors": len(self.write_errors)}


DISK_COLUMNS = ["disk_cache", "disk_unsafe_flag", "disk_writes_source", "disk_writes_destination",
                "disk_write_errors"]


class FaultRecord(BaseModel):
    """A fault struck during the run (lab.faults) and what became of the guest."""

    model_config = _CONFIG

    kind: str
    trigger: str = Field(description="the moment the playbook chose, such as 'progress 30%'")
    spec: dict[str, str | bool | int | float | None] = Field(description="the fault as the playbook gave it")
    struck_at_s: NonNegativeFloat | None = Field(None, description="seconds after the migration call; "
                                                 "None when the migration ended before the trigger")
    in_postcopy: bool = False
    outcome: FaultOutcome
    detail: str | None = None
    aborted_at_s: NonNegativeFloat | None = Field(
        None, description="when the harness aborted (precopy) or paused (postcopy) the job after the fault")
    restored_at_s: NonNegativeFloat | None = Field(None, description="when the link came back up")
    timed_out: bool = Field(False, description="a wait after the strike reached its timeout")
    recovery_attempted: bool = False
    recovered: bool | None = None
    recovery_ms: NonNegativeFloat | None = Field(
        None, description="from the postcopy resume command until the destination QEMU reported the migration completed")
    source_state: str | None = Field(None, description="the guest's state on the source after the run")
    destination_state: str | None = None
    steps: list[str] = []

    def columns(self) -> dict[str, Any]:
        """Return the fault's columns of the runs table."""
        return {"fault_kind": self.kind, "fault_trigger": self.trigger, "fault_struck_at_s": self.struck_at_s,
                "fault_in_postcopy": self.in_postcopy, "fault_outcome": self.outcome,
                "fault_timed_out": self.timed_out, "fault_recovered": self.recovered,
                "fault_recovery_ms": self.recovery_ms}


FAULT_COLUMNS = ["fault_kind", "fault_trigger", "fault_struck_at_s", "fault_in_postcopy", "fault_outcome",
                 "fault_timed_out", "fault_recovered", "fault_recovery_ms"]


class RunRecord(BaseModel):
    """Everything stored about one run, written as record.json."""

    model_config = _CONFIG

    schema_version: Literal[1, 2, 3, 4] = SCHEMA_VERSION
    harness_version: str = __version__
    experiment: ExperimentName
    run_id: str
    scenario_id: ScenarioId
    scenario: dict[str, str | bool | int | float | None] = Field(
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
    observed: Observed = Observed()
    host_figures: list[HostFigures] = []
    warnings: list[str] = []
    fault: FaultRecord | None = None
    disk: DiskRecord | None = None

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
        fault = (data.get("scenario") or {}).get("fault")
        if isinstance(fault, dict):
            # The scenario keeps the fault's id text; the fault section keeps the whole spec.
            from lab.faults import FaultSpec

            data = {**data, "scenario": {**data["scenario"], "fault": FaultSpec.model_validate(fault).id_text()}}
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
    "auto_converge_throttle_pct": "Int64",
    "disk_processed_bytes": "Int64",
    "disk_remaining_bytes": "Int64",
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
