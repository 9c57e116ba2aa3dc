"""Strategies turned into libvirt migrations, driven and sampled.

One :class:`Migration` moves one guest from a source to a destination host
with ``virDomainMigrate3`` in a worker thread, while the calling thread
samples the source's job statistics, switches to postcopy when the strategy
calls for it, and cancels the job after the scenario's maximum time.

Strategies:

stop-and-copy
    pause the guest, migrate it without ``VIR_MIGRATE_LIVE``, resume it on
    the destination.
precopy
    live migration; QEMU re-sends dirty pages until the rest fits the
    downtime limit.
postcopy
    live migration with ``VIR_MIGRATE_POSTCOPY``, switched to postcopy as
    soon as the job runs; the destination fetches missing pages on demand.
hybrid
    the same, switched after N precopy iterations or after a time.
auto-converge, dirty-limit, xbzrle, multifd
    precopy with one QEMU feature on (see lab.strategies); dirty-limit is set
    through the source's QEMU monitor because libvirt 11.3 has no flag for it.
postcopy-preempt
    postcopy; libvirt 11.3 turns QEMU's postcopy-preempt on by itself, and the
    run records whether it was on.
flushing
    save the guest to a file both hosts see, restore it on the destination
    (:class:`Flushing`).

downtime-steps
    precopy whose maximum downtime the sampling loop raises by
    downtime_step_ms, up to downtime_max_ms, whenever the remaining data has
    not reached a new low for downtime_step_after_s.

A guest disk (lab.disks) adds to any strategy but flushing:
VIR_MIGRATE_NON_SHARED_DISK for copy storage, so libvirt mirrors the disk
over NBD before memory moves, and VIR_MIGRATE_UNSAFE for shared storage that
libvirt does not recognize as shared (the local lab lists its shared folder
in qemu.conf's shared_filesystems, so it needs none). Local storage adds
nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
from qemu.qmp.legacy import QEMUMonitorProtocol

from lab.domain import require_owned
from lab.errors import MigrationError
from lab.guest.console import scan_console
from lab.qmp import FAILURES as QMP_FAILURES, close_quietly
from lab.strategies import POSTCOPY_STRATEGIES, STRATEGY_NAMES

log = logging.getLogger(__name__)

STRATEGIES = STRATEGY_NAMES
SAMPLE_INTERVAL_S = 0.05
# Time allowed after a cancellation for virDomainMigrate3 to return.
CANCEL_GRACE_S = 30.0
# Time to wait for the source's JOB_COMPLETED event after migrate3 returned.
COMPLETED_EVENT_WAIT_S = 3.0


def _constant_names(prefix: str) -> dict[int, str]:
    names = {}
    for name in dir(libvirt):
        if name.startswith(prefix):
            names[getattr(libvirt, name)] = name[len(prefix):].lower()
    return names


LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
_LIFECYCLE_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: _constant_names("VIR_DOMAIN_EVENT_STARTED_"),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: _constant_names("VIR_DOMAIN_EVENT_SUSPENDED_"),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: _constant_names("VIR_DOMAIN_EVENT_RESUMED_"),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: _constant_names("VIR_DOMAIN_EVENT_STOPPED_"),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: _constant_names("VIR_DOMAIN_EVENT_CRASHED_"),
}


@dataclass(frozen=True)
class MigrationSettings:
    """The part of a scenario that decides how the migration runs."""

    strategy: str
    migration_uri: str
    bandwidth_mib_s: float | None = None
    downtime_limit_ms: int | None = None
    max_time_s: float = 300.0
    postcopy_after_iterations: int | None = None
    postcopy_after_s: float | None = None
    postcopy_bandwidth_mib_s: int | None = None
    auto_converge_initial_pct: int | None = None
    auto_converge_increment_pct: int | None = None
    dirty_limit_mib_s: int | None = None
    dirty_limit_period_ms: int | None = None
    xbzrle_cache_mib: int | None = None
    multifd_channels: int | None = None
    compression: str = "none"
    compression_level: int | None = None
    zerocopy: bool = False
    downtime_step_ms: int | None = None
    downtime_step_after_s: float | None = None
    downtime_max_ms: int | None = None
    # flushing: the save image format (raw or sparse), parallel channels and
    # the folder, visible to both hosts, that receives the save file.
    save_format: str = "raw"
    save_parallel_channels: int | None = None
    save_dir: Path | None = None
    # A QMP socket that the destination QEMU opens for the harness, which
    # turns on postcopy-blocktime there; None leaves blocktime unmeasured.
    destination_qmp_socket: Path | None = None
    # The guest disk's storage mode (shared, local or copy), None without a disk.
    # copy adds VIR_MIGRATE_NON_SHARED_DISK: libvirt mirrors the disk to the
    # destination's precreated file over NBD before the memory moves.
    disk_storage: str | None = None
    # VIR_MIGRATE_UNSAFE: set for a shared disk in a folder that libvirt does
    # not recognize as shared (lab.disks decides and the run records it).
    disk_unsafe: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MigrationError(f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if self.strategy == "flushing" and self.save_dir is None:
            raise MigrationError("the flushing strategy needs save_dir, a folder both hosts see")
        if self.disk_storage not in (None, "shared", "local", "copy"):
            raise MigrationError(f"unknown disk storage {self.disk_storage!r}; expected shared, local or copy")

    @classmethod
    def from_values(cls, values: dict[str, object], **extra: object) -> MigrationSettings:
        """Build the settings from Scenario.values(), ignoring the fields that are not migration settings."""
        names = set(cls.__dataclass_fields__)
        chosen = {name: value for name, value in values.items() if name in names and value is not None}
        return cls(**{**chosen, **extra})

    @property
    def uses_postcopy(self) -> bool:
        return self.strategy in POSTCOPY_STRATEGIES

    @property
    def has_downtime_policy(self) -> bool:
        return None not in (self.downtime_step_ms, self.downtime_step_after_s, self.downtime_max_ms)

    def flags(self) -> int:
        flags = 0
        if self.strategy != "stop-and-copy":
            flags |= libvirt.VIR_MIGRATE_LIVE
        if self.uses_postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if self.strategy == "auto-converge":
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if self.strategy == "xbzrle" or self.compression == "mt":
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
        if self.strategy == "multifd":
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            if self.zerocopy:
                flags |= libvirt.VIR_MIGRATE_ZEROCOPY
        if self.disk_storage == "copy":
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        if self.disk_unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        return flags

    def params(self) -> dict[str, object]:
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_URI: self.migration_uri}
        if self.bandwidth_mib_s is not None:
            # libvirt takes whole MiB/s; without a value it leaves QEMU unthrottled.
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, round(self.bandwidth_mib_s))
        if self.uses_postcopy and self.postcopy_bandwidth_mib_s is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = self.postcopy_bandwidth_mib_s
        if self.strategy == "auto-converge":
            if self.auto_converge_initial_pct is not None:
                params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = self.auto_converge_initial_pct
            if self.auto_converge_increment_pct is not None:
                params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = self.auto_converge_increment_pct
        if self.strategy == "xbzrle":
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = "xbzrle"
            if self.xbzrle_cache_mib is not None:
                # compression.xbzrle.cache is in bytes.
                params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = self.xbzrle_cache_mib << 20
        if self.strategy == "multifd" and self.multifd_channels is not None:
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = self.multifd_channels
        if self.compression != "none":
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = self.compression
            if self.compression_level is not None:
                params[_COMPRESSION_LEVEL_PARAMS[self.compression]] = self.compression_level
        return params


_COMPRESSION_LEVEL_PARAMS = {
    "zlib": libvirt.VIR_MIGRATE_PARAM_COMPRESSION_ZLIB_LEVEL,
    "zstd": libvirt.VIR_MIGRATE_PARAM_COMPRESSION_ZSTD_LEVEL,
    "mt": libvirt.VIR_MIGRATE_PARAM_COMPRESSION_MT_LEVEL,
}


@dataclass
class Event:
    """A domain event as the harness saw it, on the run's clock."""

    t_s: float
    wall_time: float
    host: str
    kind: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {
            "t_s": self.t_s,
            "wall_time": datetime.fromtimestamp(self.wall_time, timezone.utc).isoformat(),
            "host": self.host,
            "kind": self.kind,
            "detail": self.detail,
        }


@dataclass
class MigrationResult:
    """The figures and events of one migration, before integrity checks."""

    outcome: str  # completed, failed, cancelled or timed-out
    error: str | None
    destination_domain: libvirt.virDomain | None
    completed_stats: dict[str, object]
    samples: list[dict[str, object]]
    events: list[Event]
    started_at: float  # wall clock, seconds since the epoch
    wall_total_ms: float
    wall_downtime_ms: float | None = None
    transfer_time_ms: float | None = None
    switchover_at_s: float | None = None
    postcopy_started_at_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    # time.monotonic() at the migration call, from which t_s of samples and events counts.
    t0_monotonic_s: float | None = None
    # Figures of one strategy, keyed by records.Measured field names, for
    # example multifd_connections_max or postcopy_blocktime_ms.
    details: dict[str, object] = field(default_factory=dict)


class _EventRecorder:
    """Collect lifecycle, iteration and job-completed events of one guest on two hosts."""

    def __init__(self, name: str, t0: float):
        self.name = name
        self.t0 = t0
        self.events: list[Event] = []
        self.completed_stats: dict[str, object] | None = None
        self.completed = threading.Event()
        self._callbacks: list[tuple[libvirt.virConnect, int]] = []
        self._lock = threading.Lock()

    def attach(self, conn: libvirt.virConnect, host: str) -> None:
        def lifecycle(_conn, dom, event, detail, _opaque):
            if dom.name() != self.name:
                return
            kind = LIFECYCLE_EVENTS.get(event, str(event))
            self._add(host, kind, _LIFECYCLE_DETAILS.get(event, {}).get(detail, str(detail)))

        def iteration(_conn, dom, iteration_number, _opaque):
            if dom.name() == self.name:
                self._add(host, "iteration", str(iteration_number))

        def job_completed(_conn, dom, params, _opaque):
            if dom.name() != self.name:
                return
            self._add(host, "job-completed", "")
            if host_is_source and self.completed_stats is None:
                self.completed_stats = dict(params)
                self.completed.set()

        host_is_source = not self._callbacks
        for event_id, callback in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, iteration),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_completed)):
            self._callbacks.append((conn, conn.domainEventRegisterAny(None, event_id, callback, None)))

    def add(self, host: str, kind: str, detail: str) -> None:
        """Record an event the harness caused itself, such as a downtime raise."""
        self._add(host, kind, detail)

    def _add(self, host: str, kind: str, detail: str) -> None:
        now_wall = time.time()
        event = Event(time.monotonic() - self.t0, now_wall, host, kind, detail)
        with self._lock:
            self.events.append(event)
        log.debug("event %s on %s: %s %s", self.name, host, kind, detail)

    def detach(self) -> None:
        for conn, callback_id in self._callbacks:
            try:
                conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError as exc:
                log.debug("deregistering event callback %d failed: %s", callback_id, exc)
        self._callbacks.clear()

    def snapshot(self) -> list[Event]:
        with self._lock:
            return sorted(self.events, key=lambda event: event.t_s)


def _sample(stats: dict[str, object], t_s: float, host: str) -> dict[str, object]:
    page_size = stats.get("memory_page_size") or 4096
    dirty_pages_s = stats.get("memory_dirty_rate")
    return {
        "t_s": t_s,
        "host": host,
        "data_processed_bytes": stats.get("data_processed"),
        "data_remaining_bytes": stats.get("data_remaining"),
        "data_total_bytes": stats.get("data_total"),
        "memory_processed_bytes": stats.get("memory_processed"),
        "memory_remaining_bytes": stats.get("memory_remaining"),
        "dirty_rate_bytes_s": None if dirty_pages_s is None else dirty_pages_s * page_size,
        "iteration": stats.get("memory_iteration"),
        "postcopy_requests": stats.get("memory_postcopy_requests"),
        "memory_bps": stats.get("memory_bps"),
        "auto_converge_throttle_pct": stats.get("auto_converge_throttle"),
        # Disk copied over NBD (VIR_MIGRATE_NON_SHARED_DISK); libvirt reports 0 without a copy.
        "disk_processed_bytes": stats.get("disk_processed"),
        "disk_remaining_bytes": stats.get("disk_remaining"),
    }


def _job_active(stats: dict[str, object]) -> bool:
    return stats.get("type") in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)


def _first_event(events: list[Event], host: str, kind: str, details: tuple[str, ...],
                 after_s: float = float("-inf")) -> Event | None:
    for event in events:
        if event.host == host and event.kind == kind and event.detail in details and event.t_s >= after_s:
            return event
    return None


class Migration:
    """Move one owned guest from *source* to *destination* with one strategy."""

    def __init__(self, domain: libvirt.virDomain, source: libvirt.virConnect, destination: libvirt.virConnect,
                 settings: MigrationSettings, *, source_name: str, destination_name: str,
                 connection_counter: Callable[[], int] | None = None,
                 fault_hook: Callable[[float, dict[str, object], bool], str | None] | None = None):
        """*connection_counter* returns the number of migration connections open on the
        destination; it is polled during multifd runs. *fault_hook* is called on every
        sample with (elapsed s, source job statistics, postcopy started?). It returns
        "abort" to cancel the job as timed out, "give-up" to stop waiting for
        virDomainMigrate3, or None to go on (see lab.faults)."""
        require_owned(domain)
        self.domain = domain
        self.source = source
        self.destination = destination
        self.settings = settings
        self.source_name = source_name
        self.destination_name = destination_name
        self.connection_counter = connection_counter
        self.fault_hook = fault_hook
        self._monitor_settings: str | None = None
        self._cancel = threading.Event()
        self.interrupted = False

    def cancel(self) -> None:
        """Ask the running migration to stop; safe to call from a signal handler."""
        self._cancel.set()

    def run(self) -> MigrationResult:
        settings = self.settings
        if settings.strategy == "flushing":
            return Flushing(self).run()
        if settings.downtime_limit_ms is not None and settings.strategy != "stop-and-copy":
            self.domain.migrateSetMaxDowntime(int(settings.downtime_limit_ms), 0)
        self._monitor_settings = apply_dirty_limit(self.domain, settings) if settings.strategy == "dirty-limit" \
            else None

        t0 = time.monotonic()
        recorder = _EventRecorder(self.domain.name(), t0)
        recorder.attach(self.source, self.source_name)
        recorder.attach(self.destination, self.destination_name)
        try:
            return self._drive(recorder, t0)
        finally:
            recorder.detach()

    def _drive(self, recorder: _EventRecorder, t0: float) -> MigrationResult:
        settings = self.settings
        started_at = time.time()
        outcome_box: dict[str, object] = {}
        paused_at_s = None
        if settings.strategy == "stop-and-copy":
            self.domain.suspend()
            paused_at_s = time.monotonic() - t0

        params = settings.params()
        blocktime = _BlocktimeMonitor(settings.destination_qmp_socket) \
            if settings.uses_postcopy and settings.destination_qmp_socket is not None else None
        if blocktime is not None:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = blocktime.destination_xml(self.domain)

        def migrate() -> None:
            try:
                outcome_box["domain"] = self.domain.migrate3(self.destination, params, settings.flags())
            except Exception as exc:  # noqa: BLE001 - reported as the run's error, not lost with the thread
                outcome_box["error"] = exc

        worker = threading.Thread(target=migrate, name=f"migrate-{self.domain.name()}", daemon=True)
        worker.start()
        watcher = _ConnectionWatcher(self.connection_counter) if settings.strategy == "multifd" \
            and self.connection_counter is not None else None
        if watcher is not None:
            watcher.start()
        policy = _DowntimePolicy(settings, recorder, self.source_name) if settings.has_downtime_policy else None
        preempt_seen: bool | None = None

        samples: list[dict[str, object]] = []
        warnings: list[str] = []
        postcopy_requested_at = None
        cancel_reason = None
        cancelled_at = None
        resumed_early = False
        while worker.is_alive():
            try:
                now = time.monotonic() - t0
                stats = self._job_stats()
                if stats and _job_active(stats):
                    samples.append(_sample(stats, now, self.source_name))
                    if settings.uses_postcopy and preempt_seen is None:
                        preempt_seen = self._postcopy_preempt_on()
                    if policy is not None and postcopy_requested_at is None:
                        policy.observe(self.domain, stats, now)
                    ready = blocktime is None or blocktime.ready(now)
                    if postcopy_requested_at is None and ready and self._should_switch(stats, now):
                        if self._start_postcopy():
                            postcopy_requested_at = now
                verdict = self.fault_hook(now, stats or {}, postcopy_requested_at is not None) \
                    if self.fault_hook is not None else None
                if verdict == "give-up":
                    cancel_reason = "timed-out"
                    warnings.append(f"stopped waiting for virDomainMigrate3 at {now:.1f} s after a fault")
                    break
                if cancel_reason is None:
                    if self._cancel.is_set():
                        cancel_reason = "cancelled"
                    elif now > settings.max_time_s or verdict == "abort":
                        cancel_reason = "timed-out"
                    if cancel_reason is not None:
                        cancelled_at = now
                        self._abort(in_postcopy=postcopy_requested_at is not None, warnings=warnings)
                elif cancelled_at is not None and now - cancelled_at > CANCEL_GRACE_S:
                    raise MigrationError(
                        f"migration of {self.domain.name()} did not stop within {CANCEL_GRACE_S:.0f} s of "
                        "being cancelled; run 'migrlab lab down' to kill the lab's processes")
                if paused_at_s is not None and not resumed_early:
                    resumed_early = self._resume_when_destination_ready(recorder)
                worker.join(SAMPLE_INTERVAL_S)
            except KeyboardInterrupt:
                if self._cancel.is_set():
                    raise  # a second Ctrl-C stops waiting for the cancellation
                # The first Ctrl-C cancels the job and keeps sampling until it
                # ends, so the run is recorded as cancelled with what it measured.
                log.warning("interrupted: cancelling the migration of %s", self.domain.name())
                self.interrupted = True
                self._cancel.set()

        wall_total_ms = (time.monotonic() - t0) * 1000.0
        if watcher is not None:
            watcher.stop()
        new_domain = outcome_box.get("domain")
        error = outcome_box.get("error")
        if new_domain is not None and settings.strategy == "stop-and-copy":
            self._resume_after_stop_and_copy(new_domain)
        if new_domain is not None:
            recorder.completed.wait(COMPLETED_EVENT_WAIT_S)
        events = recorder.snapshot()

        if cancel_reason is None and self._cancel.is_set():
            cancel_reason = "cancelled"
        if error is not None:
            outcome = cancel_reason or "failed"
            message = error.get_error_message() if isinstance(error, libvirt.libvirtError) \
                else f"{type(error).__name__}: {error}"
        elif new_domain is None:
            outcome = cancel_reason or "failed"
            message = "virDomainMigrate3 had not returned" if worker.is_alive() \
                else "virDomainMigrate3 returned no domain"
        else:
            outcome, message = "completed", None
        if outcome == "completed" and cancel_reason is not None:
            warnings.append(f"migration completed although it was {cancel_reason} at {cancelled_at:.1f} s")
        if paused_at_s is not None and new_domain is None and not worker.is_alive():
            self._resume_source_after_failure(warnings)

        stats = self._completed_stats(recorder, new_domain)
        result = MigrationResult(
            outcome=outcome, error=message, destination_domain=new_domain, completed_stats=stats,
            samples=samples, events=events, started_at=started_at, wall_total_ms=wall_total_ms,
            warnings=warnings, t0_monotonic_s=t0,
        )
        self._fill_phase_times(result, paused_at_s, postcopy_requested_at)
        if settings.uses_postcopy and result.postcopy_started_at_s is None and outcome == "completed":
            warnings.append("the migration converged before the switch to postcopy")
        self._fill_details(result, watcher, policy, preempt_seen, blocktime)
        return result

    def _fill_details(self, result: MigrationResult, watcher: _ConnectionWatcher | None,
                      policy: _DowntimePolicy | None, preempt_seen: bool | None,
                      blocktime: _BlocktimeMonitor | None) -> None:
        settings, details = self.settings, result.details
        throttles = [sample["auto_converge_throttle_pct"] for sample in result.samples
                     if sample.get("auto_converge_throttle_pct") is not None]
        if throttles:
            details["auto_converge_throttle_max_pct"] = max(throttles)
            details["auto_converge_throttle_last_pct"] = throttles[-1]
        if watcher is not None:
            details["multifd_connections_max"] = watcher.maximum
        if policy is not None:
            details["downtime_raises"] = policy.raises
            details["downtime_limit_final_ms"] = policy.limit_ms
        if self._monitor_settings:
            details["monitor_settings"] = self._monitor_settings
        if settings.uses_postcopy:
            details["postcopy_preempt"] = preempt_seen
            if settings.strategy == "postcopy-preempt" and preempt_seen is False:
                result.warnings.append("QEMU's postcopy-preempt capability was off during the migration")
        if blocktime is not None:
            postcopy_ran = result.postcopy_started_at_s is not None
            # After a fault broke postcopy, the runner's recovery talks to the
            # destination QEMU through this socket and removes it afterwards.
            keep = self.fault_hook is not None and postcopy_ran and result.outcome != "completed"
            figures = blocktime.finish(postcopy_ran, keep_socket=keep)
            details.update(figures)
            if result.postcopy_started_at_s is not None and "postcopy_blocktime_ms" not in figures:
                result.warnings.append(f"{BLOCKTIME_MISSING}: {blocktime.problem}")

    def _postcopy_preempt_on(self) -> bool | None:
        """Return whether the source QEMU has postcopy-preempt on, or None before libvirt set it up."""
        try:
            capabilities = _monitor(self.domain, "query-migrate-capabilities")
        except MigrationError as exc:
            log.debug("reading the migration capabilities of %s failed: %s", self.domain.name(), exc)
            return None
        states = {item["capability"]: item["state"] for item in capabilities}
        # libvirt sets the capabilities before the job reports any data.
        if not states.get("postcopy-ram"):
            return None
        return bool(states.get("postcopy-preempt"))

    def _job_stats(self) -> dict[str, object] | None:
        try:
            return self.domain.jobStats()
        except libvirt.libvirtError as exc:
            # The source domain disappears once migration completes.
            log.debug("jobStats on %s failed: %s", self.domain.name(), exc)
            return None

    def _should_switch(self, stats: dict[str, object], now: float) -> bool:
        if self.settings.strategy in ("postcopy", "postcopy-preempt"):
            return True
        if self.settings.strategy == "hybrid" and self.settings.postcopy_after_s is not None:
            return now >= self.settings.postcopy_after_s
        if self.settings.strategy == "hybrid":
            # QEMU counts a memory iteration at the start of each pass, so after
            # N complete passes the counter reads N + 1.
            iteration = stats.get("memory_iteration") or 0
            return iteration > (self.settings.postcopy_after_iterations or 1)
        return False

    def _start_postcopy(self) -> bool:
        try:
            self.domain.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            # Rejected while the outgoing migration is still being set up; retried on the next sample.
            log.debug("switch to postcopy not accepted yet: %s", exc.get_error_message())
            return False
        log.debug("switched %s to postcopy", self.domain.name())
        return True

    def _abort(self, *, in_postcopy: bool, warnings: list[str]) -> None:
        if in_postcopy:
            # A postcopy migration cannot be cancelled without losing the guest:
            # the destination already runs it and the source no longer has all pages.
            warnings.append("maximum time reached during postcopy; the migration was left to finish")
            return
        try:
            self.domain.abortJob()
        except libvirt.libvirtError as exc:
            log.warning("cancelling the migration of %s failed: %s", self.domain.name(), exc)

    def _resume_when_destination_ready(self, recorder: _EventRecorder) -> bool:
        """Resume a stop-and-copy guest once the destination holds all of it.

        The destination reports the guest paused once all of its state has
        arrived. Resuming then, instead of after virDomainMigrate3 returns,
        can save the source's Confirm phase (1.6 to 1.8 s with libvirt 11.3);
        libvirt may still hold the resume until its incoming migration job
        ends, and the paused time recorded is the one the guest really had.
        """
        events = recorder.snapshot()
        if _first_event(events, self.destination_name, "suspended", ("paused",)) is None:
            return False
        try:
            dom = self.destination.lookupByName(self.domain.name())
            require_owned(dom)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        except libvirt.libvirtError as exc:
            log.debug("early resume of %s on the destination failed: %s", self.domain.name(), exc)
            return False
        return True

    def _resume_source_after_failure(self, warnings: list[str]) -> None:
        """Resume a stop-and-copy guest on the source after its migration failed.

        The harness paused it before virDomainMigrate3, and libvirt leaves a
        failed migration's guest in the state it found it, so without this it
        would stay paused.
        """
        try:
            if self.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                self.domain.resume()
        except libvirt.libvirtError as exc:
            warnings.append(f"resuming the guest on the source after the failed migration failed: "
                            f"{exc.get_error_message()}")

    def _resume_after_stop_and_copy(self, new_domain: libvirt.virDomain) -> None:
        state, _reason = new_domain.state()
        if state == libvirt.VIR_DOMAIN_PAUSED:
            new_domain.resume()

    def _completed_stats(self, recorder: _EventRecorder, new_domain: libvirt.virDomain | None) -> dict[str, object]:
        # After postcopy only the source's JOB_COMPLETED event carries the
        # figures; the destination's completed statistics hold just the type.
        stats: dict[str, object] = dict(recorder.completed_stats or {})
        if new_domain is not None:
            try:
                for key, value in new_domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED).items():
                    stats.setdefault(key, value)
            except libvirt.libvirtError as exc:
                log.debug("completed job statistics unavailable on the destination: %s", exc)
        return stats

    def _fill_phase_times(self, result: MigrationResult, paused_at_s: float | None,
                          postcopy_requested_at: float | None) -> None:
        events = result.events
        source, destination = self.source_name, self.destination_name
        if paused_at_s is not None:
            suspended_s = paused_at_s
        else:
            suspended = _first_event(events, source, "suspended", ("migrated", "postcopy"))
            suspended_s = suspended.t_s if suspended else None
        if suspended_s is None:
            return
        result.switchover_at_s = suspended_s
        resumed = (_first_event(events, destination, "resumed", ("migrated", "postcopy", "unpaused"), suspended_s)
                   or _first_event(events, destination, "started", ("migrated",), suspended_s))
        if resumed is not None:
            result.wall_downtime_ms = (resumed.t_s - suspended_s) * 1000.0
        # The destination's last resume marks the end of the transfer: after
        # postcopy, libvirt emits "resumed/migrated" once every page arrived.
        resumes = [e for e in events if e.host == destination and e.kind == "resumed" and e.t_s >= suspended_s]
        if resumes:
            result.transfer_time_ms = resumes[-1].t_s * 1000.0
        if postcopy_requested_at is not None:
            postcopy = _first_event(events, source, "suspended", ("postcopy",))
            result.postcopy_started_at_s = postcopy.t_s if postcopy else postcopy_requested_at


# -- strategy helpers ---------------------------------------------------------------

# libvirt's default range of ports on which the destination QEMU listens (migration_port_min
# and migration_port_max in qemu.conf).
MIGRATION_PORTS = (49152, 49215)


def migration_connections_argv(source_address: str) -> list[str]:
    """Return an ss command that lists the established migration connections from *source_address*.

    It runs on the destination; one line per connection.
    """
    low, high = MIGRATION_PORTS
    return ["ss", "-Htn", "state", "established", "dst", source_address,
            f"( sport >= :{low} and sport <= :{high} )"]


def guest_rate_figures(source_console: str, destination_console: str, last_seq_before: int
                       ) -> tuple[float | None, float | None]:
    """Return (workload rate before the migration, lowest rate during it) in pages per second.

    Before: the median rate_pps of the source's reports up to *last_seq_before*,
    the last report seen before the migration call. During: the lowest
    rate_pps of the source's later reports and of the destination's first
    report, which covers the switch-over. The guest's clock is not mapped onto
    the harness's here, so "during" is known to about one report (1 s).
    """
    source = [report for report in scan_console(source_console).reports]
    before = sorted(report.rate_pps for report in source if report.seq <= last_seq_before)
    if not before:
        return None, None
    during = [report.rate_pps for report in source if report.seq > last_seq_before]
    destination = scan_console(destination_console).reports
    if destination:
        during.append(destination[0].rate_pps)
    median = float(before[len(before) // 2]) if len(before) % 2 else (before[len(before) // 2 - 1]
                                                                         + before[len(before) // 2]) / 2.0
    return median, (float(min(during)) if during else None)

# Poll interval of the migration connection count; each poll runs ss in the destination host.
CONNECTION_POLL_S = 0.5
# Time allowed for the destination QEMU to open the harness's QMP socket.
QMP_SOCKET_WAIT_S = 5.0
QMP_TIMEOUT_S = 5.0
_QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"


def _monitor(dom: libvirt.virDomain, command: str, arguments: dict[str, object] | None = None) -> object:
    """Run one QMP command through libvirt and return its "return" value."""
    request: dict[str, object] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))
    except libvirt.libvirtError as exc:
        raise MigrationError(f"QEMU monitor command {command} on {dom.name()} failed: "
                             f"{exc.get_error_message()}") from exc
    if "error" in reply:
        raise MigrationError(f"QEMU rejected {command} on {dom.name()}: {reply['error'].get('desc')}")
    return reply.get("return")


def apply_dirty_limit(dom: libvirt.virDomain, settings: MigrationSettings) -> str:
    """Turn on QEMU's dirty-limit capability and its parameters on the source; return what was set.

    libvirt 11.3 has no migration flag for dirty-limit, so the harness sets it
    through the monitor of its own guest before migrate3. libvirt leaves
    capabilities it does not know alone, and it does not know dirty-limit.
    QEMU rejects the capability without KVM's dirty ring.
    """
    _monitor(dom, "migrate-set-capabilities", {"capabilities": [{"capability": "dirty-limit", "state": True}]})
    parameters: dict[str, object] = {}
    if settings.dirty_limit_mib_s is not None:
        parameters["vcpu-dirty-limit"] = settings.dirty_limit_mib_s  # MB/s per vCPU
    if settings.dirty_limit_period_ms is not None:
        parameters["x-vcpu-dirty-limit-period"] = settings.dirty_limit_period_ms
    if parameters:
        _monitor(dom, "migrate-set-parameters", parameters)
    text = "dirty-limit=on" + "".join(f", {name}={value}" for name, value in parameters.items())
    log.info("set through the QEMU monitor of %s: %s", dom.name(), text)
    return f"QEMU monitor: {text}"


class _ConnectionWatcher:
    """Poll the number of migration connections on the destination and keep the maximum."""

    def __init__(self, counter: Callable[[], int]):
        self._counter = counter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="migration-connections", daemon=True)
        self.maximum = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CONNECTION_POLL_S * 10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.maximum = max(self.maximum, self._counter())
            except Exception as exc:  # noqa: BLE001 - a failed poll leaves the maximum as it is
                log.debug("counting migration connections failed: %s", exc)
            self._stop.wait(CONNECTION_POLL_S)


class _DowntimePolicy:
    """Raise the maximum downtime by a step whenever the remaining data stops reaching new lows."""

    def __init__(self, settings: MigrationSettings, recorder: _EventRecorder, host: str):
        self.step_ms = int(settings.downtime_step_ms)
        self.after_s = float(settings.downtime_step_after_s)
        self.max_ms = int(settings.downtime_max_ms)
        # QEMU's default downtime-limit is 300 ms.
        self.limit_ms = int(settings.downtime_limit_ms or 300)
        self.raises = 0
        self._recorder = recorder
        self._host = host
        self._lowest: int | None = None
        self._progress_at: float | None = None

    def observe(self, dom: libvirt.virDomain, stats: dict[str, object], now: float) -> None:
        remaining = stats.get("data_remaining")
        if remaining is None:
            return
        if self._lowest is None or remaining < self._lowest:
            self._lowest, self._progress_at = int(remaining), now
            return
        if now - self._progress_at < self.after_s or self.limit_ms >= self.max_ms:
            return
        new_limit = min(self.max_ms, self.limit_ms + self.step_ms)
        try:
            dom.migrateSetMaxDowntime(new_limit, 0)
        except libvirt.libvirtError as exc:
            log.warning("raising the maximum downtime of %s failed: %s", dom.name(), exc.get_error_message())
            return
        self.limit_ms = new_limit
        self.raises += 1
        self._progress_at = now
        self._recorder.add(self._host, "downtime-raised", f"{new_limit} ms")


# Start of the run's warning when the destination reported no blocktime at the end of migrate3.
BLOCKTIME_MISSING = "postcopy blocktime not measured"


def blocktime_figures(status: dict[str, Any]) -> dict[str, object]:
    """Return postcopy_blocktime_ms and postcopy_vcpu_blocktime_max_ms from the destination's query-migrate reply.

    The reply has them once the capability is on and the postcopy phase
    ran; without them the result is empty.
    """
    if "postcopy-blocktime" not in status:
        return {}
    return {"postcopy_blocktime_ms": int(status["postcopy-blocktime"]),
            "postcopy_vcpu_blocktime_max_ms": max(status.get("postcopy-vcpu-blocktime") or [0])}


class _BlocktimeMonitor:
    """A QMP socket of the destination QEMU, through which postcopy-blocktime is turned on and read.

    libvirt 11.3 does not know QEMU's postcopy-blocktime capability, and it
    keeps the destination's monitor locked for the whole incoming migration.
    So the destination XML that the harness passes to migrate3 starts the
    destination QEMU with an extra QMP socket. The harness sets the
    capability there during precopy and reads query-migrate after the run.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.problem = "the destination's QMP socket was not ready"
        self._qmp: QEMUMonitorProtocol | None = None
        self._enabled = False
        self._given_up = False

    def destination_xml(self, dom: libvirt.virDomain) -> str:
        self.path.unlink(missing_ok=True)
        ET.register_namespace("qemu", _QEMU_NAMESPACE)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        commandline = ET.SubElement(root, f"{{{_QEMU_NAMESPACE}}}commandline")
        ET.SubElement(commandline, f"{{{_QEMU_NAMESPACE}}}arg", value="-qmp")
        ET.SubElement(commandline, f"{{{_QEMU_NAMESPACE}}}arg", value=f"unix:{self.path},server=on,wait=off")
        return ET.tostring(root, encoding="unicode")

    def ready(self, now: float) -> bool:
        """Turn the capability on once the socket exists; True when postcopy may start."""
        if self._enabled or self._given_up:
            return True
        if not self.path.exists():
            if now > QMP_SOCKET_WAIT_S:
                self._given_up = True
            return self._given_up
        try:
            self._qmp = QEMUMonitorProtocol(str(self.path))
            self._qmp.connect()
            self._qmp.settimeout(QMP_TIMEOUT_S)
            self._qmp.cmd("migrate-set-capabilities",
                          capabilities=[{"capability": "postcopy-blocktime", "state": True}])
            self._enabled = True
        except QMP_FAILURES as exc:
            self.problem = f"turning postcopy-blocktime on failed: {exc}"
            self._given_up = True
            self._close()
        return True

    def finish(self, postcopy_ran: bool, *, keep_socket: bool = False) -> dict[str, object]:
        """Read the blocktime figures after the run, close the connection and remove the socket.

        With *keep_socket* the socket file stays, so that another client can connect later.
        """
        figures: dict[str, object] = {}
        try:
            if self._enabled and postcopy_ran and self._qmp is not None:
                figures = blocktime_figures(self._qmp.cmd("query-migrate"))
                if not figures:
                    self.problem = "query-migrate on the destination reported no postcopy-blocktime"
        except QMP_FAILURES as exc:
            self.problem = f"query-migrate on the destination failed: {exc}"
        finally:
            self._close(remove=not keep_socket)
        return figures

    def _close(self, remove: bool = True) -> None:
        if self._qmp is not None:
            close_quietly(self._qmp, "the destination QMP socket")
            self._qmp = None
        if remove:
            self.path.unlink(missing_ok=True)


class Flushing:
    """Save the guest to a file both hosts see, then restore it on the destination.

    Downtime runs from the source's pause (the save pauses the guest first)
    to the destination's resume; the bytes moved are the save file's
    allocated size. A sparse image (QEMU's mapped-ram) writes each page at a
    fixed offset, so its apparent size is the guest's memory and its
    allocated size what was written.
    """

    def __init__(self, migration: Migration):
        self.migration = migration
        self.settings = migration.settings
        self.name = migration.domain.name()
        self.path = Path(self.settings.save_dir) / f"{self.name}.save"

    def _save_params(self) -> dict[str, object]:
        params: dict[str, object] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(self.path)}
        if self.settings.save_format != "raw":
            params[libvirt.VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT] = self.settings.save_format
        if self.settings.save_parallel_channels is not None:
            params[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = self.settings.save_parallel_channels
        return params

    def _restore_params(self) -> dict[str, object]:
        params: dict[str, object] = {libvirt.VIR_DOMAIN_SAVE_PARAM_FILE: str(self.path)}
        if self.settings.save_parallel_channels is not None:
            params[libvirt.VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS] = self.settings.save_parallel_channels
        return params

    def run(self) -> MigrationResult:
        migration = self.migration
        t0 = time.monotonic()
        started_at = time.time()

        recorder = _EventRecorder(self.name, t0)
        recorder.attach(migration.source, migration.source_name)
        recorder.attach(migration.destination, migration.destination_name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        details: dict[str, object] = {"save_format_used": self.settings.save_format}
        new_domain, error, outcome = None, None, "failed"

        try:
            recorder.add(migration.source_name, "save-started", str(self.path))
            saved_at = self._call(migration.domain.saveParams, self._save_params(), 0)
            details["save_ms"] = (saved_at - t0) * 1000.0
            size = self.path.stat()
            details["save_file_bytes"] = size.st_size
            details["save_file_disk_bytes"] = size.st_blocks * 512
            recorder.add(migration.source_name, "save-completed", f"{size.st_blocks * 512} bytes")
            if migration._cancel.is_set():
                raise MigrationError("cancelled after the save; the guest is in the save file only")
            restored_at = self._call(migration.destination.restoreParams, self._restore_params(),
                                     libvirt.VIR_DOMAIN_SAVE_RUNNING)
            details["restore_ms"] = (restored_at - saved_at) * 1000.0
            recorder.add(migration.destination_name, "restore-completed", "")
            new_domain = migration.destination.lookupByName(self.name)
            require_owned(new_domain)
            outcome = "completed"
        except libvirt.libvirtError as exc:
            error = exc.get_error_message()
        except (MigrationError, OSError) as exc:
            error = str(exc)
        finally:
            recorder.detach()
            self.path.unlink(missing_ok=True)
        wall_total_ms = (time.monotonic() - t0) * 1000.0

        result = MigrationResult(
            outcome=outcome, error=error, destination_domain=new_domain, completed_stats={},
            samples=[], events=recorder.snapshot(), started_at=started_at, wall_total_ms=wall_total_ms,
            t0_monotonic_s=t0, details=details)
        self._fill_times(result)
        return result

    def _call(self, function: Callable[..., object], params: dict[str, object], flags: int) -> float:
        function(params, flags)
        return time.monotonic()

    def _fill_times(self, result: MigrationResult) -> None:
        events = result.events
        source, destination = self.migration.source_name, self.migration.destination_name
        suspended = _first_event(events, source, "suspended", ("paused", "migrated")) \
            or _first_event(events, source, "save-started", (str(self.path),))
        if suspended is None:
            return
        result.switchover_at_s = suspended.t_s
        resumed = (_first_event(events, destination, "resumed", ("unpaused", "restored", "migrated"), suspended.t_s)
                   or _first_event(events, destination, "started", ("restored",), suspended.t_s)
                   or _first_event(events, destination, "restore-completed", ("",), suspended.t_s))
        if resumed is not None:
            result.wall_downtime_ms = (resumed.t_s - suspended.t_s) * 1000.0
            result.transfer_time_ms = resumed.t_s * 1000.0
