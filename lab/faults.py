"""Faults struck during a migration on the local lab, and the recovery after them.

A fault is a playbook value (``migration.fault`` or ``matrix.fault``): a kind
and one trigger. The migration's sampling loop calls :meth:`FaultInjector.poll`
with the elapsed time, the source's job statistics and whether postcopy has
started. The injector strikes once the trigger holds. Then the playbook's
fault timeouts bound every wait after the strike.

Kinds:

link-down
    ``ip link set eth0 down`` inside the destination host, which cuts its lab
    link (the veth end that is a port of its bridge). ``restore_after_s``
    brings it back up after that many seconds; otherwise it stays down until
    the harness gives up waiting or the run ends.
kill-qemu
    SIGKILL to the destination QEMU of the guest (from its libvirt pid file).
kill-libvirtd
    SIGKILL to the destination host's libvirtd; the runner starts it again.
bandwidth
    a token bucket of ``bandwidth_mib_s`` on the source's migration
    interface, which carries the migration stream (a qdisc shapes what an
    interface sends, and the destination sends only acknowledgements).

Outcomes (:data:`FAULT_OUTCOMES`): ``completed``, ``source-running`` (the
migration failed and the guest still runs on the source), ``postcopy-recovered``
(the guest was paused in postcopy and the migration resumed and finished),
``guest-lost`` (no side runs the guest) and ``not-struck`` (the migration ended
before the trigger).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import libvirt
import libvirt_qemu
from pydantic import BaseModel, ConfigDict, Field, model_validator
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from lab.domain import require_owned
from lab.errors import HostError, LabError
from lab.hosts import shaping

if TYPE_CHECKING:
    from lab.hosts.local import LocalLab
    from lab.hosts.shell import Shell

log = logging.getLogger(__name__)

# The destination's end of its veth pair to the lab switch (lab.hosts.local.HOST_LINK).
HOST_LINK = "eth0"

FaultKind = Literal["link-down", "kill-qemu", "kill-libvirtd", "bandwidth"]
FAULT_OUTCOMES = ("completed", "source-running", "postcopy-recovered", "guest-lost", "not-struck")
TRIGGER_FIELDS = ("at_s", "at_progress_pct", "at_iteration", "at_postcopy")
COMMAND_TIMEOUT_S = 20.0
# Time for a SIGKILLed process to disappear from /proc.
KILL_WAIT_S = 10.0
# Reply time of one QMP command on the destination's socket during a recovery.
RECOVERY_QMP_TIMEOUT_S = 10.0
# Time for both libvirtd to finish the migration job after QEMU completed a resumed migration.
LIBVIRT_SETTLE_S = 30.0


class FaultSpec(BaseModel):
    """One fault: its kind, the moment it strikes, and kind-specific settings.

    Exactly one trigger is set: ``at_s`` (seconds after the migration call),
    ``at_progress_pct`` (data processed as a percentage of the data total),
    ``at_iteration`` (QEMU's memory iteration counter reaches it) or
    ``at_postcopy`` (the switch to postcopy). ``delay_s`` is added after the
    trigger holds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: FaultKind
    at_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    at_progress_pct: Annotated[float, Field(gt=0, lt=100, allow_inf_nan=False)] | None = None
    at_iteration: Annotated[int, Field(ge=1)] | None = None
    at_postcopy: bool = False
    delay_s: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False)] = 0.0
    # bandwidth: the rate of the shaped link after the strike.
    bandwidth_mib_s: Annotated[int, Field(gt=0)] | None = None
    # link-down: seconds after the strike at which the link comes back up.
    restore_after_s: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _check(self) -> FaultSpec:
        problems = fault_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def trigger(self) -> str:
        """The trigger as text, such as ``progress 30%`` or ``postcopy + 1 s``."""
        if self.at_s is not None:
            text = f"{self.at_s:g} s"
        elif self.at_progress_pct is not None:
            text = f"progress {self.at_progress_pct:g}%"
        elif self.at_iteration is not None:
            text = f"iteration {self.at_iteration}"
        else:
            text = "postcopy"
        return text + (f" + {self.delay_s:g} s" if self.delay_s else "")

    def id_text(self) -> str:
        """Return a scenario id part, such as ``link-down-p30`` or ``kill-qemu-pc``."""
        if self.at_s is not None:
            when = f"t{self.at_s:g}"
        elif self.at_progress_pct is not None:
            when = f"p{self.at_progress_pct:g}"
        elif self.at_iteration is not None:
            when = f"i{self.at_iteration}"
        else:
            when = "pc"
        text = f"{self.kind}-{when}"
        if self.bandwidth_mib_s is not None:
            text += f"-{self.bandwidth_mib_s}"
        if self.restore_after_s is not None:
            text += f"-up{self.restore_after_s:g}"
        return text.replace(".", "p")


def fault_problems(spec: FaultSpec) -> list[str]:
    """Return what is wrong with a fault's combination of fields, each with its fix."""
    problems = []
    # at_s may be 0.0, which equals False, so the numeric triggers are tested against None.
    triggers = [name for name in TRIGGER_FIELDS
                if (getattr(spec, name) is True if name == "at_postcopy" else getattr(spec, name) is not None)]
    if len(triggers) != 1:
        problems.append(f"a fault needs exactly one trigger, got {len(triggers)} ({', '.join(triggers) or 'none'}): "
                        f"set one of {', '.join(TRIGGER_FIELDS)}")
    if spec.kind == "bandwidth" and spec.bandwidth_mib_s is None:
        problems.append("a bandwidth fault needs bandwidth_mib_s: set the link rate after the strike in MiB/s")
    if spec.kind != "bandwidth" and spec.bandwidth_mib_s is not None:
        problems.append(f"bandwidth_mib_s applies only to bandwidth faults, not to {spec.kind}: remove it")
    if spec.kind != "link-down" and spec.restore_after_s is not None:
        problems.append(f"restore_after_s applies only to link-down faults, not to {spec.kind}: remove it")
    return problems


def fault_strategy_problems(spec: FaultSpec | dict[str, Any] | None, strategy: str) -> list[str]:
    """Return why a fault cannot strike under *strategy*: postcopy triggers need a postcopy strategy."""
    if spec is None:
        return []
    at_postcopy = spec.at_postcopy if isinstance(spec, FaultSpec) else bool(spec.get("at_postcopy"))
    if at_postcopy and strategy not in ("postcopy", "postcopy-preempt", "hybrid"):
        return [f"a fault at_postcopy needs a postcopy strategy (postcopy, postcopy-preempt or hybrid), "
                f"not {strategy}"]
    return []


def trigger_reached(spec: FaultSpec, now_s: float, stats: dict[str, Any], postcopy: bool) -> bool:
    """Return whether the trigger of *spec* (without its delay) holds for one sample of the job."""
    if spec.at_s is not None:
        return now_s >= spec.at_s
    if spec.at_postcopy:
        return postcopy
    if spec.at_iteration is not None:
        iteration = stats.get("memory_iteration")
        return iteration is not None and int(iteration) >= spec.at_iteration
    processed, total = stats.get("data_processed"), stats.get("data_total")
    if not processed or not total:
        return False
    return 100.0 * float(processed) / float(total) >= spec.at_progress_pct


@dataclass
class FaultTimeouts:
    """Waits after a strike, in seconds (the playbook's ``timeouts`` section)."""

    # From the strike until the migration must have ended by itself, or the harness aborts it.
    settle_s: float = 30.0
    # From the abort until virDomainMigrate3 must have returned, or the harness gives up on it.
    abort_s: float = 30.0
    # For the postcopy resume call to finish the migration.
    recovery_s: float = 60.0
    # For the destination's libvirtd to be running and reachable again.
    restart_s: float = 60.0


@dataclass
class FaultReport:
    """What happened to one fault, as RunRecord.fault stores it."""

    kind: str
    trigger: str
    struck_at_s: float | None = None
    outcome: str | None = None
    detail: str | None = None
    in_postcopy: bool = False
    aborted_at_s: float | None = None
    restored_at_s: float | None = None
    timed_out: bool = False
    recovery_attempted: bool = False
    recovered: bool | None = None
    recovery_ms: float | None = None
    source_state: str | None = None
    destination_state: str | None = None
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# Verdicts of poll() for the sampling loop.
CONTINUE = None
ABORT = "abort"
GIVE_UP = "give-up"


class FaultInjector:
    """Strike one fault on the local lab during a migration, and undo it afterwards.

    ``poll`` runs in the sampling loop and never blocks for longer than one
    command. ``undo`` is idempotent and brings the lab back: link up,
    shaping removed, libvirtd running on the destination.
    """

    def __init__(self, spec: FaultSpec, lab: "LocalLab", *, source_host: str, destination_host: str,
                 source_shell: "Shell", source_interface: str, guest_name: str, source_domain: libvirt.virDomain,
                 timeouts: FaultTimeouts, hosts: int = 2):
        self.spec = spec
        self.lab = lab
        self.source_host = source_host
        self.destination_host = destination_host
        self.source_shell = source_shell
        self.source_interface = source_interface
        self.guest_name = guest_name
        self.source_domain = source_domain
        self.timeouts = timeouts
        self.hosts = hosts
        self.report = FaultReport(kind=spec.kind, trigger=spec.trigger)
        self._triggered_at: float | None = None
        self._link_down = False
        self._shaped = False
        self._libvirtd_killed = False
        self._lock = threading.Lock()

    # -- during the migration -------------------------------------------------

    def poll(self, now_s: float, stats: dict[str, Any] | None, postcopy: bool) -> str | None:
        """Strike when the trigger holds, and bound the waits after it.

        Returns ABORT when the migration did not end within ``settle_s`` of a
        precopy strike (the loop cancels the job), GIVE_UP when it did not
        end within ``abort_s`` of the harness's abort, else None.
        """
        report = self.report
        if report.struck_at_s is None:
            if self._triggered_at is None and trigger_reached(self.spec, now_s, stats or {}, postcopy):
                self._triggered_at = now_s
            if self._triggered_at is not None and now_s - self._triggered_at >= self.spec.delay_s:
                self._strike(now_s, postcopy)
            return CONTINUE

        restore = self.spec.restore_after_s
        if self._link_down and restore is not None and now_s - report.struck_at_s >= restore:
            self._set_link(up=True, now_s=now_s)
        if report.aborted_at_s is None:
            # A shrunk link or a link that came back leaves a migration that can
            # still finish, so only max_time_s bounds it.
            if self.spec.kind == "bandwidth" or (self.spec.kind == "link-down" and not self._link_down):
                return CONTINUE
            if now_s - report.struck_at_s < self.timeouts.settle_s:
                return CONTINUE
            return self._abort(now_s, postcopy)
        if now_s - report.aborted_at_s >= self.timeouts.abort_s:
            report.timed_out = True
            report.steps.append(f"{now_s:.1f} s: virDomainMigrate3 had not returned {self.timeouts.abort_s:g} s "
                                "after the abort; stopped waiting for it")
            return GIVE_UP
        return CONTINUE

    def _strike(self, now_s: float, postcopy: bool) -> None:
        report = self.report
        report.struck_at_s = now_s
        report.in_postcopy = postcopy
        try:
            if self.spec.kind == "link-down":
                self._set_link(up=False, now_s=now_s)
            elif self.spec.kind == "kill-qemu":
                pid = self._kill_qemu()
                report.steps.append(f"{now_s:.1f} s: SIGKILL to the destination QEMU, pid {pid}")
            elif self.spec.kind == "kill-libvirtd":
                pid = self._kill_libvirtd()
                report.steps.append(f"{now_s:.1f} s: SIGKILL to libvirtd of {self.destination_host}, pid {pid}")
            else:
                self._shaped = True
                shaping.shape(self.source_shell, self.source_interface, int(self.spec.bandwidth_mib_s))
                report.steps.append(f"{now_s:.1f} s: {self.source_interface} of {self.source_host} "
                                    f"shaped to {self.spec.bandwidth_mib_s} MiB/s")
        except (LabError, OSError) as exc:
            report.detail = f"striking the fault failed: {exc}"
            report.steps.append(f"{now_s:.1f} s: {report.detail}")
            log.error("fault %s: %s", self.spec.kind, report.detail)
            return
        log.info("fault %s struck at %.1f s (%s)", self.spec.kind, now_s, "postcopy" if postcopy else "precopy")

    def _abort(self, now_s: float, postcopy: bool) -> str | None:
        """Stop a migration that did not end within settle_s of the strike, then restore the link."""
        report = self.report
        report.aborted_at_s = now_s
        report.timed_out = True
        verdict: str | None = ABORT
        if postcopy:
            # A postcopy job cannot be cancelled without losing the guest;
            # VIR_DOMAIN_ABORT_JOB_POSTCOPY (libvirt 8.5 and later) pauses it
            # instead (QEMU's postcopy-paused), from which resume_postcopy can go on.
            try:
                self.source_domain.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
                report.steps.append(f"{now_s:.1f} s: no end {self.timeouts.settle_s:g} s after the strike; "
                                    "postcopy paused with abortJobFlags(POSTCOPY)")
            except libvirt.libvirtError as exc:
                report.steps.append(f"{now_s:.1f} s: abortJobFlags(POSTCOPY) failed: {exc.get_error_message()}")
            verdict = CONTINUE
        else:
            report.steps.append(f"{now_s:.1f} s: no end {self.timeouts.settle_s:g} s after the strike; "
                                "migration job aborted")
        # With the link back, the source's closed socket reaches the destination,
        # which lets the destination's side of the job end too.
        if self._link_down:
            self._set_link(up=True, now_s=now_s)
        return verdict

    # -- actions --------------------------------------------------------------

    def _set_link(self, *, up: bool, now_s: float | None = None) -> None:
        state = "up" if up else "down"
        if not up:
            self._link_down = True
        self.lab.exec(self.destination_host, ["ip", "link", "set", HOST_LINK, state], timeout=COMMAND_TIMEOUT_S)
        if up:
            self._link_down = False
            self.report.restored_at_s = now_s
        when = f"{now_s:.1f} s: " if now_s is not None else ""
        self.report.steps.append(f"{when}link {HOST_LINK} of {self.destination_host} set {state}")

    def qemu_pid_file(self) -> Path:
        return self.lab.outside_path(self.destination_host, f"/run/libvirt/qemu/{self.guest_name}.pid")

    def _kill_qemu(self) -> int:
        path = self.qemu_pid_file()
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise HostError(f"no pid of the destination QEMU of {self.guest_name} in {path}: {exc}") from exc
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError as exc:
            raise HostError(f"destination QEMU pid {pid} of {self.guest_name} is gone: {exc}") from exc
        # The pid file may be stale: kill only a QEMU started for this guest.
        if not cmdline or b"qemu" not in cmdline[0] or f"guest={self.guest_name}".encode() not in b" ".join(cmdline):
            raise HostError(f"pid {pid} from {path} is not the QEMU of {self.guest_name}; nothing killed")
        os.kill(pid, signal.SIGKILL)
        return pid

    def _kill_libvirtd(self) -> int:
        path = self.lab.host_dir(self.destination_host) / "run" / "libvirtd.pid"
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise HostError(f"no pid of libvirtd of {self.destination_host} in {path}: {exc}") from exc
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError as exc:
            raise HostError(f"libvirtd pid {pid} of {self.destination_host} is gone: {exc}") from exc
        if name != "libvirtd":
            raise HostError(f"pid {pid} from {path} is {name}, not libvirtd; nothing killed")
        self._libvirtd_killed = True
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, KILL_WAIT_S)
        return pid

    # -- afterwards ------------------------------------------------------------

    @property
    def libvirtd_killed(self) -> bool:
        return self._libvirtd_killed

    def undo(self) -> list[str]:
        """Bring the link up, remove the shaping and restart a killed libvirtd; return the errors.

        Idempotent: each step runs only if the fault left something to undo.
        """
        errors = []
        with self._lock:
            if self._link_down:
                try:
                    self._set_link(up=True)
                except LabError as exc:
                    errors.append(f"bringing the link up failed: {exc}")
            if self._shaped:
                try:
                    shaping.unshape(self.source_shell, self.source_interface)
                    self._shaped = False
                except LabError as exc:
                    errors.append(f"removing the shaping failed: {exc}")
            if self._libvirtd_killed:
                t = time.monotonic()
                try:
                    self.lab.up(hosts=self.hosts)
                    self._libvirtd_killed = False
                    self.report.steps.append(f"libvirtd of {self.destination_host} started again in "
                                             f"{time.monotonic() - t:.1f} s")
                except LabError as exc:
                    errors.append(f"starting libvirtd of {self.destination_host} again failed: {exc}")
        for error in errors:
            log.error("fault %s: %s", self.spec.kind, error)
        return errors


def kill_leftover_qemu(guest_name: str, netns_inode: int | None = None) -> list[int]:
    """SIGKILL every QEMU process of *guest_name* that outlived its libvirtd; return their pids.

    A destination QEMU paused in postcopy ignores SIGTERM, and one whose
    libvirtd crashed is no longer known to the libvirtd started after it, so
    libvirt's destroy cannot reach it. Guest names carry a random token per
    run, so only the run's own guest matches. With *netns_inode*, only
    processes in that network namespace are killed.
    """
    killed = []
    marker = f"guest={guest_name},".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"qemu-system" not in cmdline.split(b"\0", 1)[0] or marker not in cmdline:
                continue
            if netns_inode is not None and (entry / "ns" / "net").stat().st_ino != netns_inode:
                continue
            os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
        killed.append(int(entry.name))
    for pid in killed:
        _wait_gone(pid, KILL_WAIT_S)
    return killed


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False


def domain_state(conn: libvirt.virConnect | None, name: str) -> str:
    """Return a guest's state on one host as text, such as ``paused/postcopy_failed`` or ``absent``."""
    if conn is None:
        return "unreachable"
    try:
        dom = conn.lookupByName(name)
        state, reason = dom.state()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return "absent"
        return f"unknown ({exc.get_error_message()})"
    names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
             libvirt.VIR_DOMAIN_SHUTOFF: "shutoff", libvirt.VIR_DOMAIN_CRASHED: "crashed"}
    text = names.get(state, str(state))
    if state == libvirt.VIR_DOMAIN_PAUSED:
        reasons = {libvirt.VIR_DOMAIN_PAUSED_POSTCOPY: "postcopy",
                   libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "postcopy_failed",
                   libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration"}
        text += "/" + reasons.get(reason, str(reason))
    return text


def libvirt_monitor(dom: libvirt.virDomain) -> Callable[..., Any]:
    """Return a function that runs one QMP command on *dom*'s QEMU through libvirt.

    It fails on a destination during an incoming migration: libvirt 11.3
    waits 30 s for the domain's job lock there and gives up, because the
    migration job allows no other job until it ends.
    """
    def run(command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))
        except libvirt.libvirtError as exc:
            raise HostError(f"QMP command {command} on {dom.name()} failed: {exc.get_error_message()}") from exc
        if "error" in reply:
            raise HostError(f"QEMU rejected {command} on {dom.name()}: {reply['error'].get('desc')}")
        return reply.get("return")
    return run


# QEMU's query-migrate status of a postcopy migration that lost its connection.
POSTCOPY_PAUSED = "postcopy-paused"


@dataclass
class ResumeResult:
    """Outcome of one postcopy recovery: whether QEMU finished the migration, and how long it took."""

    finished: bool
    error: str | None = None
    # From the source's resume command to the destination reporting the migration completed.
    took_s: float = 0.0
    steps: list[str] = field(default_factory=list)


def resume_postcopy(source_monitor: Callable[..., Any], destination_monitor: Callable[..., Any],
                    listen_host: str, timeout_s: float, *, pause_wait_s: float = 10.0, poll_s: float = 0.2,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> ResumeResult:
    """Resume a paused postcopy migration with QEMU's own recovery commands.

    *source_monitor* and *destination_monitor* each run one QMP command,
    ``(command, **arguments)``, and return its ``return`` value or raise
    LabError (or QMPError). The destination gets ``migrate-recover`` on
    *listen_host* with a port that QEMU chooses, and the source gets
    ``migrate`` with ``resume: true`` to that port. Nothing is sent unless
    both QEMUs report ``postcopy-paused`` within *pause_wait_s*, so a guest
    in any other state is left as it is.

    libvirt's VIR_MIGRATE_POSTCOPY_RESUME is not used: libvirtd 11.3
    dereferences a NULL pointer in qemuMigrationDstPrepareResume and crashes
    on every resume (docs/postcopy-recovery.md). Once QEMU reports the
    migration completed, libvirt finishes the job on both hosts by itself,
    as it does for a migration that completed while no API call watched it.
    """
    result = ResumeResult(finished=False)
    deadline = clock() + pause_wait_s
    while True:
        try:
            states = {"source": source_monitor("query-migrate").get("status"),
                      "destination": destination_monitor("query-migrate").get("status")}
        except (LabError, QMPError, OSError) as exc:
            result.error = f"reading the migration state failed: {exc}"
            return result
        if all(state == POSTCOPY_PAUSED for state in states.values()):
            break
        if clock() >= deadline:
            result.error = (f"not resumed: QEMU reports the migration as {states['source']} on the source and "
                            f"{states['destination']} on the destination, not both {POSTCOPY_PAUSED}")
            return result
        sleep(poll_s)
    result.steps.append(f"both QEMUs report {POSTCOPY_PAUSED}")

    try:
        destination_monitor("migrate-recover", uri=f"tcp:{listen_host}:0")
        addresses = destination_monitor("query-migrate").get("socket-address") or []
        port = next(int(address["port"]) for address in addresses if address.get("type") == "inet")
    except StopIteration:
        result.error = "migrate-recover on the destination reported no listening TCP port"
        return result
    except (LabError, QMPError, OSError, KeyError, ValueError) as exc:
        result.error = f"migrate-recover on the destination failed: {exc}"
        return result
    uri = f"tcp:{listen_host}:{port}"
    result.steps.append(f"destination QEMU listens for the recovery on {uri}")

    started = clock()
    try:
        source_monitor("migrate", uri=uri, resume=True)
    except (LabError, QMPError, OSError) as exc:
        result.error = f"migrate with resume on the source failed: {exc}"
        return result
    result.steps.append("source QEMU resumed the migration")

    deadline = started + timeout_s
    status = None
    while clock() < deadline:
        try:
            status = destination_monitor("query-migrate").get("status")
        except (LabError, QMPError, OSError) as exc:
            result.error = f"reading the destination's migration state failed: {exc}"
            break
        if status == "completed":
            result.finished = True
            break
        if status == "failed":
            result.error = "the destination QEMU reports the resumed migration as failed"
            break
        sleep(poll_s)
    else:
        result.error = f"the resumed migration had not completed after {timeout_s:g} s (last state {status})"
    result.took_s = clock() - started
    return result


def resume_postcopy_through_socket(source_domain: libvirt.virDomain, destination_socket: Path,
                                   migration_uri: str, timeout_s: float) -> ResumeResult:
    """Run :func:`resume_postcopy` with the destination QEMU's QMP socket and the source's libvirt monitor.

    *migration_uri* is the destination's migration URI, such as
    ``tcp://10.77.0.12``, whose host the destination QEMU listens on.
    """
    require_owned(source_domain)
    listen_host = urlsplit(migration_uri).hostname
    if not listen_host:
        return ResumeResult(finished=False, error=f"no host in the destination's migration URI {migration_uri!r}")
    destination_qmp = QEMUMonitorProtocol(str(destination_socket))
    try:
        destination_qmp.connect()
        destination_qmp.settimeout(RECOVERY_QMP_TIMEOUT_S)
        return resume_postcopy(libvirt_monitor(source_domain), destination_qmp.cmd, listen_host, timeout_s)
    except (QMPError, OSError) as exc:
        return ResumeResult(finished=False,
                            error=f"connecting to the destination's QMP socket {destination_socket} failed: {exc}")
    finally:
        try:
            destination_qmp.close()
        except (QMPError, OSError) as exc:
            log.debug("closing the destination's QMP socket failed: %s", exc)


def wait_for_migrated_guest(source: libvirt.virConnect, destination: libvirt.virConnect, name: str,
                            timeout_s: float, poll_s: float = 0.2) -> libvirt.virDomain | None:
    """Wait until libvirt has ended a migration that QEMU completed; return the destination's guest, else None.

    Done means: the owned guest runs on the destination with reason
    ``migrated`` and no job, and the source has no running guest of that
    name. libvirtd ends the job on each host when QEMU's MIGRATION event
    reports the migration completed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            guest = destination.lookupByName(name)
            state, reason = guest.state()
            job = guest.jobInfo()[0]
            done = state == libvirt.VIR_DOMAIN_RUNNING and reason == libvirt.VIR_DOMAIN_RUNNING_MIGRATED \
                and job == libvirt.VIR_DOMAIN_JOB_NONE and domain_state(source, name) in ("absent", "shutoff")
        except libvirt.libvirtError as exc:
            log.debug("waiting for the migrated guest %s: %s", name, exc.get_error_message())
            done = False
        if done:
            require_owned(guest)
            return guest
        time.sleep(poll_s)
    return None
