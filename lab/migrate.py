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
    the same, switched after N precopy iterations.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import libvirt

from lab.domain import require_owned
from lab.errors import MigrationError

log = logging.getLogger(__name__)

STRATEGIES = ("stop-and-copy", "precopy", "postcopy", "hybrid")
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

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MigrationError(f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")

    @property
    def uses_postcopy(self) -> bool:
        return self.strategy in ("postcopy", "hybrid")

    def flags(self) -> int:
        flags = 0
        if self.strategy != "stop-and-copy":
            flags |= libvirt.VIR_MIGRATE_LIVE
        if self.uses_postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        return flags

    def params(self) -> dict[str, object]:
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_URI: self.migration_uri}
        if self.bandwidth_mib_s is not None:
            # libvirt takes whole MiB/s; without a value it leaves QEMU unthrottled.
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, round(self.bandwidth_mib_s))
        return params


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
                 settings: MigrationSettings, *, source_name: str, destination_name: str):
        require_owned(domain)
        self.domain = domain
        self.source = source
        self.destination = destination
        self.settings = settings
        self.source_name = source_name
        self.destination_name = destination_name
        self._cancel = threading.Event()
        self.interrupted = False

    def cancel(self) -> None:
        """Ask the running migration to stop; safe to call from a signal handler."""
        self._cancel.set()

    def run(self) -> MigrationResult:
        settings = self.settings
        if settings.downtime_limit_ms is not None and settings.strategy != "stop-and-copy":
            self.domain.migrateSetMaxDowntime(int(settings.downtime_limit_ms), 0)

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

        def migrate() -> None:
            try:
                outcome_box["domain"] = self.domain.migrate3(self.destination, settings.params(), settings.flags())
            except Exception as exc:  # noqa: BLE001 - reported as the run's error, not lost with the thread
                outcome_box["error"] = exc

        worker = threading.Thread(target=migrate, name=f"migrate-{self.domain.name()}", daemon=True)
        worker.start()

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
                    if postcopy_requested_at is None and self._should_switch(stats):
                        if self._start_postcopy():
                            postcopy_requested_at = now
                if cancel_reason is None:
                    if self._cancel.is_set():
                        cancel_reason = "cancelled"
                    elif now > settings.max_time_s:
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
            outcome, message = cancel_reason or "failed", "virDomainMigrate3 returned no domain"
        else:
            outcome, message = "completed", None
        if outcome == "completed" and cancel_reason is not None:
            warnings.append(f"migration completed although it was {cancel_reason} at {cancelled_at:.1f} s")

        stats = self._completed_stats(recorder, new_domain)
        result = MigrationResult(
            outcome=outcome, error=message, destination_domain=new_domain, completed_stats=stats,
            samples=samples, events=events, started_at=started_at, wall_total_ms=wall_total_ms,
            warnings=warnings, t0_monotonic_s=t0,
        )
        self._fill_phase_times(result, paused_at_s, postcopy_requested_at)
        if settings.uses_postcopy and result.postcopy_started_at_s is None and outcome == "completed":
            warnings.append("the migration converged before the switch to postcopy")
        return result

    def _job_stats(self) -> dict[str, object] | None:
        try:
            return self.domain.jobStats()
        except libvirt.libvirtError as exc:
            # The source domain disappears once migration completes.
            log.debug("jobStats on %s failed: %s", self.domain.name(), exc)
            return None

    def _should_switch(self, stats: dict[str, object]) -> bool:
        if self.settings.strategy == "postcopy":
            return True
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
