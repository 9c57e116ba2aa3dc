"""Run a playbook's matrix on a lab: boot, migrate, check, store, repeat.

Each run boots a fresh guest on the source host, waits until its workload
reports, migrates it with the scenario's strategy, checks that the guest is
alive and its memory intact on the destination, removes the guest and
writes the run record atomically before the next run starts. Runs go in
repetition-major order, so an interrupted experiment still covers every
scenario.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import libvirt

from lab import disks, domain, store
from lab.accel import choose_accelerator
from lab.environment import describe
from lab.errors import LabError
from lab.guest.console import scan_console
from lab.guest.image import GuestImage, build_image, kernel_cmdline
from lab.hosts.access import LabAccess, RunHost, choose_lab, lock_name, open_access
from lab.hosts.figures import HostWindow
from lab.hosts.local import LocalLab
from lab.hosts.shell import HostFile

from lab.capabilities import cached_capabilities, sparse_save_supported, stack_facts, stack_problems
from lab.errors import ConfigError, HostError
from lab.faults import (DESTINATION_KINDS, LIBVIRT_SETTLE_S, FaultInjector, FaultTimeouts, ShellStrikes,
                        classify_fault, domain_state, fault_host_problems, host_state_text, kill_leftover_qemu,
                        ResumeResult, qemu_status, resume_postcopy_through_socket, runs_guest,
                        wait_for_migrated_guest)
from lab.migrate import (BLOCKTIME_MISSING, Migration, MigrationResult, MigrationSettings, blocktime_figures,
                         guest_rate_figures, migration_connections_argv)
from lab.locking import experiment_lock
from lab.preflight import available_memory_mib, check_guest_memory, check_results_writable
from lab.playbook import Playbook, Scenario
from lab.probes.observe import RunClock, observe_run
from lab.probes.session import ProbeOutputs, ProbePlan, ProbeSession
from lab.records import (DiskRecord, Environment, FaultRecord, HostFigures, Integrity, Measured, MigrationStats,
                         Observed, RunRecord, make_timeline)
from lab.timeline import encode_parts

log = logging.getLogger(__name__)

GUEST_ADDRESS_OFFSET = 100
# Progress reports the guest must print on the destination before it counts as alive.
REPORTS_AFTER_MIGRATION = 3
REPORTS_BEFORE_MIGRATION = 2
# Warning of a run that ended but whose files could not be written; resume runs it again.
NOT_STORED = "not stored:"


@dataclass
class ExperimentSummary:
    """Outcomes, skipped runs and interruption of one :meth:`ExperimentRunner.run` call."""

    experiment_dir: Path
    outcomes: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False


class Interrupted(LabError):
    """Ctrl-C or SIGTERM arrived during an experiment."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def console_path(host: RunHost, guest_name: str) -> Path | HostFile:
    return host.console_file(guest_name)


def read_console(path: Path | HostFile) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_reports(path: Path | HostFile, *, after_seq: int, count: int, timeout_s: float,
                     dom: libvirt.virDomain | None = None) -> tuple[int, int]:
    """Wait until *path* shows *count* workload reports numbered above *after_seq*.

    Returns the number of such reports seen and the highest sequence number.
    Gives up early when *dom* stops running.
    """
    end = time.monotonic() + timeout_s
    while True:
        reports = [r for r in scan_console(read_console(path)).reports if r.seq > after_seq]
        last_seq = max((r.seq for r in reports), default=after_seq)
        if len(reports) >= count or time.monotonic() >= end:
            return len(reports), last_seq
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if not dom.isActive():
                    return len(reports), last_seq
        time.sleep(0.25)


def record_recovered_end(result: MigrationResult, resumed: ResumeResult) -> None:
    """Store in *result* the end and the blocktime of a postcopy migration that finished after migrate3 returned.

    migrate3's own figures stop at the failure: its transfer time is the
    destination's last resume event before the recovery, and the destination
    reported no blocktime then. The recovery's last query-migrate on the
    destination gives both: the time it reported completed, within one poll,
    and QEMU's blocktime, which then includes the vCPU's wait during the cut.
    """
    if resumed.completed_at is not None and result.t0_monotonic_s is not None:
        result.transfer_time_ms = (resumed.completed_at - result.t0_monotonic_s) * 1000.0
    figures = blocktime_figures(resumed.destination_status)
    if figures:
        result.details.update(figures)
        result.warnings = [warning for warning in result.warnings if not warning.startswith(BLOCKTIME_MISSING)]


def _samples_csv(windows: list[HostWindow]) -> bytes:
    """Return the host-side samples of a run as CSV: one row per host and sample."""
    rows = [row for window in windows for row in window.rows()]
    columns = ["t_s", "host", "role", "rx_bytes", "tx_bytes", "qemu_cpu_ms"]
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join("" if row[column] is None else str(row[column]) for column in columns))
    return ("\n".join(lines) + "\n").encode()


class ExperimentRunner:
    """Run every scenario and repetition of a playbook on the lab its inventory names.

    ``inventory`` overrides the playbook's inventory value: "local",
    "local-ssh" or the path of an inventory file.
    """

    def __init__(self, playbook: Playbook, *, results_root: Path, lab: LocalLab | None = None,
                 accelerator: str = "auto", show_progress: bool = True, inventory: str | None = None):
        self.playbook = playbook
        self.results_root = results_root
        self.lab = lab or LocalLab()
        self.lab_choice = choose_lab(playbook, inventory)
        self.access: LabAccess | None = None
        self.accelerator_request = accelerator
        self.show_progress = show_progress
        self._migration: Migration | None = None
        self._interrupted = False

    # -- setup -------------------------------------------------------------

    def _prepare(self) -> None:
        self.access = open_access(self.lab_choice, self.lab, hosts=self.playbook.lab.hosts)
        self.source_host, self.destination_host = self.access.source, self.access.destination
        self.image: GuestImage = build_image()
        self.access.check_image(self.image)
        self.source = self.source_host.connect()
        self.destination = self.destination_host.connect()
        probe = self._guest_spec("mlab-accel-probe", "accelerator-probe", self._probe_scenario(), "kvm")
        self.accelerator, reason = choose_accelerator(
            self.source, probe, console_path(self.source_host, probe.name), self.access.accelerator_dir,
            requested=self.accelerator_request)
        log.info("accelerator: %s (%s)", self.accelerator, reason)
        self._check_stack()
        self.environment = Environment(**{**describe(
            self.source, accelerator=self.accelerator, guest_image_digest=self.image.digest,
            guest_kernel_version=self.image.kernel_version, playbook_sha256=self.playbook.sha256),
            **self.access.platform()})

    def _check_stack(self) -> None:
        """Reject the playbook when the hosts' QEMU and libvirt cannot run one of its strategies or options."""
        kernel, initrd = self.access.image_paths(self.image)
        capabilities = cached_capabilities(self.source, kernel, initrd, self.access.accelerator_dir)
        self.stack = stack_facts(self.source, self.destination, capabilities, self.accelerator)
        scenarios = self.playbook.scenarios()
        messages = [rejection.message() for rejection in stack_problems(
            [(scenario.scenario_id, scenario.values()) for scenario in scenarios], self.stack)]
        flushing = [scenario.scenario_id for scenario in scenarios if scenario.strategy == "flushing"]
        if flushing and self.access.local_lab is None:
            messages.append(f"strategy flushing needs storage both hosts share, which only the local lab "
                            f"has (scenarios {', '.join(flushing)})")
        messages += disks.lab_problems([(scenario.scenario_id, scenario.disk_size_mib) for scenario in scenarios],
                                       local_lab=self.access.local_lab is not None)
        faulty = [scenario for scenario in scenarios if scenario.fault is not None]
        if faulty and self.access.choice.transport == "ssh":
            messages += self._fault_problems(faulty)
        if messages:
            raise ConfigError("the hosts cannot run " + "; ".join(messages),
                              path=str(self.playbook.path or self.playbook.experiment), field="migration",
                              fix="Remove these strategies or options from the playbook, or run it on "
                                  "hosts with the versions named")
        log.info("QEMU %s and libvirt %s support every strategy of the playbook",
                 ".".join(map(str, self.stack.qemu)), ".".join(map(str, self.stack.libvirt)))

    def _migration_settings(self, scenario: Scenario, guest_name: str) -> MigrationSettings:
        """Turn a scenario into migration settings, with the paths and the save format of this lab."""
        extra: dict[str, object] = {"migration_uri": self.destination_host.migration_uri}
        if scenario.strategy == "flushing":
            extra["save_format"] = scenario.save_format or (
                "sparse" if sparse_save_supported(self.stack) else "raw")
        local_lab = self.access.local_lab
        if local_lab is not None:
            # The local lab's hosts share the filesystem outside their private libvirt folders.
            extra["save_dir"] = local_lab.shared_dir
            if scenario.strategy in ("postcopy", "postcopy-preempt", "hybrid") \
                    and "postcopy-blocktime" in self.stack.capabilities:
                extra["destination_qmp_socket"] = local_lab.root / "qmp" / f"{guest_name}.sock"
        return MigrationSettings.from_values(scenario.values(), **extra)

    def _count_migration_connections(self) -> int:
        source_address = self.source_host.migration_uri.split("//", 1)[-1].split(":")[0]
        result = self.destination_host.shell.run(migration_connections_argv(source_address), timeout=10,
                                                 check=False)
        return len([line for line in result.stdout.splitlines() if line.strip()])

    def _probe_scenario(self) -> Scenario:
        return self.playbook.scenarios()[0]

    def _guest_spec(self, name: str, run_id: str, scenario: Scenario, accelerator: str, *,
                    disk: domain.DiskSpec | None = None) -> domain.GuestSpec:
        address = self.access.guest_address
        cmdline = kernel_cmdline(scenario.working_set_mib, scenario.dirty_rate_mib_s, scenario.pattern, ip=address,
                                 disk=disk is not None)
        kernel, initrd = self.access.image_paths(self.image)
        return domain.GuestSpec(
            name=name, run_id=run_id, memory_mib=scenario.memory_mib, vcpus=scenario.vcpus,
            kernel=kernel, initrd=initrd, cmdline=cmdline,
            accelerator=accelerator, bridge=self.source_host.guest_bridge,
            mac=domain.guest_mac(GUEST_ADDRESS_OFFSET), nic_model=scenario.nic_model, disk=disk)

    def _guest_disk(self, scenario: Scenario, guest_name: str) -> disks.GuestDisk | None:
        if scenario.disk_size_mib is None:
            return None
        local_lab = self.access.local_lab
        # Every local lab host lists its shared folder in qemu.conf's shared_filesystems.
        return disks.GuestDisk(scenario.disk_storage, scenario.disk_size_mib, guest_name, self.source_host,
                               self.destination_host, shared_dir=local_lab.shared_dir if local_lab else None,
                               shared_dir_declared=local_lab is not None,
                               save_restore=scenario.strategy == "flushing")

    def _close(self) -> None:
        for conn in (getattr(self, "source", None), getattr(self, "destination", None)):
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
        if self.access is not None:
            self.access.close()

    # -- the matrix ----------------------------------------------------------

    def run(self, *, resume: bool = False) -> ExperimentSummary:
        if self.lab_choice.local:
            # Both hosts of the local lab share this machine's memory; for
            # other labs, 'migrlab hosts check' checks each host's memory.
            check_guest_memory(self.playbook, available_memory_mib())
        check_results_writable(self.results_root)
        experiment_dir = store.init_experiment(self.results_root, self.playbook, resume=resume)
        summary = ExperimentSummary(experiment_dir)
        finished = self._finished_runs(experiment_dir) if resume else set()
        plan = list(self.playbook.runs())
        with _sigterm_as_interrupt(), experiment_lock(lock_name(self.lab_choice, self.lab)):
            try:
                self._prepare()
                self._run_plan(plan, finished, experiment_dir, summary)
            except KeyboardInterrupt:
                summary.interrupted = True
                if self._migration is not None:
                    self._migration.cancel()
            finally:
                self._close()
        return summary

    @staticmethod
    def _finished_runs(experiment_dir: Path) -> set[str]:
        """Return the stored runs that resume skips: all but those cancelled by Ctrl-C or stored without data."""
        finished = set()
        for run_id in store.finished_run_ids(experiment_dir):
            record = store.load_record(experiment_dir / "runs" / run_id)
            if record.outcome != "cancelled" and not any(warning.startswith(NOT_STORED)
                                                         for warning in record.warnings):
                finished.add(run_id)
        return finished

    def _store_failure(self, experiment_dir: Path, record: RunRecord, error: OSError) -> store.StoreError:
        """Store a run whose files could not be written as a bare failed record, if that fits; return the error.

        The bare record has no timeline, events or consoles, and resume runs it again.
        """
        runs_dir = experiment_dir / "runs"
        reason = f"{error.strerror or error} (errno {error.errno})" if error.errno else str(error)
        log.error("storing run %s in %s failed: %s", record.run_id, runs_dir, reason)
        bare = record.model_copy(update={
            "outcome": "failed",
            "error": f"the run ended {record.outcome}, but storing it failed: {reason}",
            "warnings": [*record.warnings, f"{NOT_STORED} {reason}; timeline, events and consoles are lost"]})
        try:
            store.write_run(experiment_dir, bare, make_timeline([]), [], {})
            stored = f"; a record without its data marks run {record.run_id} as failed"
        except OSError as again:
            stored = f"; no record of run {record.run_id} fits either ({again.strerror or again})"
        resume = f"migrlab run {self.playbook.path} --results {self.results_root} --resume"
        return store.StoreError(
            f"cannot store run {record.run_id} in {runs_dir}: {reason}{stored}. The runs stored before it are "
            f"intact. Fix: {store.storage_fix(self.results_root, error)}, then resume with: {resume}")

    def _run_plan(self, plan, finished, experiment_dir: Path, summary: ExperimentSummary) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        todo = [(scenario, repetition) for scenario, repetition in plan
                if store.run_id(scenario, repetition) not in finished]
        summary.skipped = [store.run_id(s, r) for s, r in plan if store.run_id(s, r) in finished]
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, disable=not self.show_progress, transient=False) as progress:
            task = progress.add_task(self.playbook.experiment, total=len(todo))
            for index, (scenario, repetition) in enumerate(todo, start=1):
                run_id = store.run_id(scenario, repetition)
                progress.update(task, description=f"{run_id} ({index}/{len(todo)})")
                record, timeline, events, files = self.run_one(scenario, repetition, index)
                try:
                    store.write_run(experiment_dir, record, timeline, events, files)
                except OSError as exc:
                    summary.outcomes[run_id] = "failed"
                    raise self._store_failure(experiment_dir, record, exc) from exc
                summary.outcomes[run_id] = record.outcome
                log.info("run %s: %s", run_id, record.outcome)
                progress.advance(task)
                if self._interrupted:
                    # Ctrl-C cancelled this run's migration; it is stored, and the matrix stops here.
                    raise KeyboardInterrupt

    # -- one run -------------------------------------------------------------

    def run_one(self, scenario: Scenario, repetition: int, index: int):
        """Boot, migrate, check and remove one guest; return what to store."""
        run_id = store.run_id(scenario, repetition)
        name = f"{domain.NAME_PREFIX}{index:03d}-{secrets.token_hex(3)}"
        spec = self._guest_spec(name, run_id, scenario, self.accelerator)
        source_console = console_path(self.source_host, name)
        destination_console = console_path(self.destination_host, name)
        # Stored with the run under these names, then removed from the hosts.
        host_logs = {f"console-{self.source_host.name}.log": source_console,
                     f"console-{self.destination_host.name}.log": destination_console,
                     f"qemu-{self.source_host.name}.log": self.source_host.qemu_log_file(name),
                     f"qemu-{self.destination_host.name}.log": self.destination_host.qemu_log_file(name)}
        started_at = datetime.now(timezone.utc)
        phases: dict[str, float] = {}
        warnings: list[str] = []
        result: MigrationResult | None = None
        integrity = Integrity(guest_alive=False, reports_after_migration=0, bad_pages=0,
                              console_trouble=[], checked_pages=0)
        outcome, error = "failed", None
        dom = None
        probes: ProbeSession | None = None
        probe_outputs: ProbeOutputs | None = None
        windows: list[HostWindow] = []
        link = self.access.shaped_link(scenario.link_rate_mib_s)
        injector: FaultInjector | None = None
        fault = None
        disk = self._guest_disk(scenario, name)
        disk_left: list[str] = []
        try:
            link.__enter__()
            if disk is not None:
                t = time.monotonic()
                spec = self._guest_spec(name, run_id, scenario, self.accelerator, disk=disk.create())
                phases["disk_setup_s"] = time.monotonic() - t
            t = time.monotonic()
            dom = domain.boot(self.source, spec)
            seen, last_seq = wait_for_reports(source_console, after_seq=-1, count=REPORTS_BEFORE_MIGRATION,
                                              timeout_s=self.playbook.timeouts.guest_boot_s, dom=dom)
            phases["boot_s"] = time.monotonic() - t
            if seen < REPORTS_BEFORE_MIGRATION:
                raise LabError(f"guest {name} did not start its workload within "
                               f"{self.playbook.timeouts.guest_boot_s:.0f} s on {self.source_host.name}")
            probes = self._start_probes(warnings)

            t = time.monotonic()
            settings = self._migration_settings(scenario, name)
            if disk is not None:
                settings = dataclasses.replace(settings, disk_unsafe=disk.unsafe)
            if settings.save_dir is not None:
                settings.save_dir.mkdir(parents=True, exist_ok=True)
            if settings.destination_qmp_socket is not None:
                settings.destination_qmp_socket.parent.mkdir(parents=True, exist_ok=True)
            injector = self._fault_injector(scenario, name, dom)
            self._migration = Migration(dom, self.source, self.destination, settings,
                                        source_name=self.source_host.name,
                                        destination_name=self.destination_host.name,
                                        connection_counter=self._count_migration_connections,
                                        fault_hook=injector.poll if injector is not None else None)
            sampler = self._start_sampler(name, scenario, warnings)
            try:
                result = self._migration.run()
                self._interrupted = self._migration.interrupted
            finally:
                self._migration = None
                if sampler is not None:
                    windows = sampler.stop()
                if injector is not None:
                    self._undo_fault(injector, warnings)
            phases["migration_s"] = time.monotonic() - t
            try:
                if injector is not None:
                    self._recover_postcopy(injector, result, dom, settings)
            finally:
                # After the recovery, which can replace a warning with the figures it read.
                warnings.extend(result.warnings)

            t = time.monotonic()
            outcome, error, integrity = self._check_guest(result, dom, source_console, destination_console,
                                                          last_seq)
            if injector is not None and result.outcome != "completed" and result.postcopy_started_at_s is not None:
                # Reports printed on the source before the switch do not make a
                # guest that stayed paused in postcopy alive. libvirt's state can
                # lag behind QEMU's, so QEMU's query-status decides.
                state = domain_state(self.source, name)
                qemu_state = qemu_status(self.source, name) if state == "running" else None
                if not runs_guest(state, qemu_state):
                    outcome = "guest-lost"
                    error = (f"{error}; the guest stopped in postcopy and was not recovered "
                             f"(source: {host_state_text(state, qemu_state)})")
            phases["integrity_s"] = time.monotonic() - t
        except (LabError, libvirt.libvirtError) as exc:
            error = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            log.error("run %s failed: %s", run_id, error)
        except Exception as exc:
            # A fault of the harness itself fails this run, not the experiment:
            # the record keeps the error and the next run starts clean.
            log.exception("run %s failed inside the harness", run_id)
            error = f"internal error of the harness: {type(exc).__name__}: {exc}"
        except BaseException:
            if probes is not None:
                probes.close()
            # An interrupt outside the migration stores no run, so its logs go
            # too. Left behind, a console log would look like the next run's.
            for path in host_logs.values():
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        finally:
            # The probes stop after the integrity check, or at the failure.
            if probes is not None:
                probe_outputs = probes.stop()
                probes.close()
            if injector is not None:
                # Undone again here for a run that failed before the migration's own undo.
                self._undo_fault(injector, warnings)
                fault = self._fault_record(injector, name, outcome, error, integrity,
                                           switched=self._destination_ran(result, destination_console))
                if fault.outcome == "split-brain":
                    message = (f"split brain: the QEMUs of both {self.source_host.name} and "
                               f"{self.destination_host.name} run guest {name} after the {fault.kind} fault "
                               f"(source: {fault.source_state}, destination: {fault.destination_state}); "
                               "the run's cleanup destroys both")
                    log.error("run %s: %s", run_id, message)
                    warnings.append(message)
                    error = message if error is None else f"{error}; {message}"
                    if outcome == "completed":
                        outcome = "failed"
            self._remove_guest(name)
            if injector is not None:
                self._kill_leftover_qemu(injector, name, warnings)
            link.remove()
            if disk is not None:
                # After the guest is gone, so that no QEMU holds the files.
                disk_left = disk.remove()

        files = {}
        for file_name, path in host_logs.items():
            try:
                files[file_name] = path.read_bytes()
                path.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
            except (HostError, OSError) as exc:
                # On a server, libvirt's logs may be readable by root only.
                log.warning("run %s: %s not stored: %s", run_id, path, exc)
                warnings.append(f"{file_name} not stored: {exc}")
        if windows:
            files["host-samples.csv"] = _samples_csv(windows)
        consoles = {host.name: files.get(f"console-{host.name}.log", b"").decode(errors="replace")
                    for host in (self.source_host, self.destination_host)}
        source_text, destination_text = consoles[self.source_host.name], consoles[self.destination_host.name]
        observed = self._observe(result, probe_outputs, consoles, files, warnings)
        if result is not None:
            rates = guest_rate_figures(source_text, destination_text, last_seq)
            result.details.update(guest_rate_before_pps=rates[0], guest_rate_min_pps=rates[1])
        disk_record = None
        if disk is not None:
            if disk_left:
                warnings.append(f"disk files left behind: {', '.join(disk_left)}")
            disk_record = disk.record(source_text, destination_text, disk_left)
        record = self._record(run_id, scenario, repetition, started_at, outcome, error, result, integrity,
                              phases, warnings, observed=observed,
                              host_figures=[HostFigures.model_validate(window.figures()) for window in windows],
                              fault=fault, disk=disk_record)
        timeline = make_timeline(result.samples if result else [])
        events = [event.as_dict() for event in result.events] if result else []
        return record, timeline, events, files

    def _start_sampler(self, guest_name: str, scenario: Scenario, warnings: list[str]):
        """Start sampling QEMU's CPU time and the migration interfaces on both hosts, or warn and go without."""
        sampler = self.access.sampler(guest_name, scenario.max_time_s + 60)
        try:
            sampler.start()
        except LabError as exc:
            log.warning("no host-side figures for this run: %s", exc)
            warnings.append(f"host-side figures missing: {exc}")
            return None
        return sampler

    def _start_probes(self, warnings: list[str]) -> ProbeSession | None:
        """Start the playbook's probes, wait until the guest replies, then probe the baseline."""
        section = self.playbook.probes
        plan = ProbePlan.from_section(section)
        if not plan.any:
            return None
        if self.access.local_lab is None:
            # NOTE: the probes run from the local lab's client namespace; a lab of
            # real servers has no such namespace, so its runs go without probes.
            warnings.append("probes skipped: they need the local lab's client host")
            return None
        session = ProbeSession(self.lab, plan, guest_address=self.lab.guest_address(GUEST_ADDRESS_OFFSET),
                               guest_mac=domain.guest_mac(GUEST_ADDRESS_OFFSET),
                               source_host=self.source_host.name, destination_host=self.destination_host.name)
        try:
            session.start()
            problem = session.wait_for_replies(section.ready_timeout_s)
            if problem:
                log.warning("probes: %s; migrating anyway", problem)
                warnings.append(f"probes: {problem} before the migration")
            time.sleep(section.baseline_s)
        except BaseException:
            session.close()
            raise
        return session

    def _observe(self, result: MigrationResult | None, outputs: ProbeOutputs | None, consoles: dict[str, str],
                 files: dict[str, bytes], warnings: list[str]) -> Observed:
        """Compute the client's and the guest's figures and add the timeline parts to ``files``.

        *consoles* maps each host's name to the text of the guest's console log there.
        """
        if result is None or result.t0_monotonic_s is None:
            return Observed()
        paused = result.switchover_at_s
        resumed = paused + result.wall_downtime_ms / 1000.0 \
            if paused is not None and result.wall_downtime_ms is not None else None
        clock = RunClock(t0_ns=round(result.t0_monotonic_s * 1e9), completed=result.outcome == "completed",
                         paused_at_s=paused, resumed_at_s=resumed,
                         transfer_end_s=result.transfer_time_ms / 1000.0 if result.transfer_time_ms else None)
        observation = observe_run(outputs, clock, consoles=consoles, source_host=self.source_host.name,
                                  destination_host=self.destination_host.name)
        warnings.extend(observation.warnings)
        files.update(encode_parts(observation.parts))
        return observation.observed

    def _check_guest(self, result: MigrationResult, source_dom, source_console: Path,
                     destination_console: Path, last_seq: int):
        """Decide the run's outcome from the migration result and the guest's own reports."""
        timeout = self.playbook.timeouts.integrity_s
        if result.outcome == "completed":
            console, dom, outcome, error = destination_console, result.destination_domain, "completed", None
        else:
            # The guest must still run on the source after a failed or cancelled migration.
            console, dom, outcome, error = source_console, source_dom, result.outcome, result.error
        seen, _ = wait_for_reports(console, after_seq=last_seq, count=REPORTS_AFTER_MIGRATION,
                                   timeout_s=timeout, dom=dom)
        summary = scan_console(read_console(console))
        trouble = list(summary.kernel_trouble)
        if summary.workload_exit_status is not None:
            trouble.append(f"the workload exited with status {summary.workload_exit_status}")
        last = summary.last_report
        bad_pages = last.bad if last else 0
        integrity = Integrity(guest_alive=seen >= REPORTS_AFTER_MIGRATION, reports_after_migration=seen,
                              bad_pages=bad_pages, console_trouble=trouble,
                              checked_pages=last.checked if last else 0)
        if trouble:
            return "guest-crashed", f"kernel trouble on the console: {trouble[0]}", integrity
        if bad_pages or summary.bad_lines:
            return "memory-corrupt", f"the workload found {bad_pages} bad pages", integrity
        if not integrity.guest_alive:
            where = "destination" if result.outcome == "completed" else "source"
            message = (f"the guest printed {seen} workload reports on the {where} within {timeout:.0f} s, "
                       f"expected {REPORTS_AFTER_MIGRATION}")
            return "guest-lost", message if error is None else f"{error}; {message}", integrity
        return outcome, error, integrity

    # -- faults --------------------------------------------------------------

    def _fault_strikes(self) -> ShellStrikes | None:
        """Return how faults reach inventory hosts over SSH, or None on the local lab's fast path."""
        if self.access.choice.transport != "ssh":
            return None
        local_lab = self.access.local_lab
        return ShellStrikes(
            destination=self.destination_host.shell, destination_entry=self.destination_host.entry,
            link_interface=self.destination_host.migration_interface, source=self.source_host.shell,
            source_entry=self.source_host.entry, source_interface=self.source_host.migration_interface,
            restart_daemon=(lambda: local_lab.up(hosts=self.playbook.lab.hosts)) if local_lab is not None else None,
            shared_proc=local_lab is not None)

    def _fault_problems(self, scenarios: list[Scenario]) -> list[str]:
        """Return what keeps the playbook's faults from striking on the inventory's hosts."""
        kinds = {scenario.fault.kind for scenario in scenarios}
        restart = self.access.local_lab is not None
        problems = []
        for host, host_kinds in ((self.destination_host, kinds & set(DESTINATION_KINDS)),
                                 (self.source_host, kinds - set(DESTINATION_KINDS))):
            try:
                problems += fault_host_problems(host.shell, host.entry, host_kinds,
                                                interface=host.migration_interface, restart_outside_systemd=restart)
            except LabError as exc:
                problems.append(f"checking host {host.name} for faults failed: {exc}")
        where = self.access.inventory.path or self.access.choice.label
        return [f"{problem} (inventory {where}, fault {', '.join(sorted(kinds))})" for problem in problems]

    def _fault_injector(self, scenario: Scenario, guest_name: str, dom) -> FaultInjector | None:
        if scenario.fault is None:
            return None
        timeouts = self.playbook.timeouts
        return FaultInjector(
            scenario.fault, self.access.local_lab, source_host=self.source_host.name,
            destination_host=self.destination_host.name, source_shell=self.source_host.shell,
            source_interface=self.source_host.migration_interface, guest_name=guest_name, source_domain=dom,
            timeouts=FaultTimeouts(settle_s=timeouts.fault_settle_s, abort_s=timeouts.fault_abort_s,
                                   recovery_s=timeouts.postcopy_recovery_s, restart_s=timeouts.daemon_restart_s),
            hosts=self.playbook.lab.hosts, strikes=self._fault_strikes())

    def _undo_fault(self, injector: FaultInjector, warnings: list[str]) -> None:
        """Undo the fault and reconnect to a destination whose libvirtd was started again."""
        restarted = injector.libvirtd_killed
        for error in injector.undo():
            warnings.append(f"fault cleanup: {error}")
        if restarted and not injector.libvirtd_killed:
            with contextlib.suppress(libvirt.libvirtError):
                self.destination.close()
            self.destination = self.destination_host.connect()
        # The next run needs a destination libvirtd, also after one that crashed by itself.
        self._revive_destination(injector)

    def _recover_postcopy(self, injector: FaultInjector, result: MigrationResult, dom,
                          settings: MigrationSettings) -> None:
        """Resume a postcopy migration that the fault broke, once the link is back.

        Only a guest that both QEMUs report as postcopy-paused is resumed:
        its destination QEMU must still hold the pages already moved, so a
        killed destination QEMU is not retried. A failed resume leaves the
        guest as it is, and the integrity check then records it lost.
        The destination's QMP socket that the migration kept is removed here.
        """
        socket = settings.destination_qmp_socket
        try:
            self._resume_postcopy(injector, result, dom, socket)
        finally:
            if socket is not None:
                socket.unlink(missing_ok=True)

    def _resume_postcopy(self, injector: FaultInjector, result: MigrationResult, dom, socket: Path | None) -> None:
        report = injector.report
        if result.outcome == "completed" or report.struck_at_s is None or injector.spec.kind == "kill-qemu" \
                or result.postcopy_started_at_s is None:
            return
        state = domain_state(self.source, dom.name())
        report.source_state = state
        if not state.startswith("paused/postcopy"):
            report.steps.append(f"no postcopy resume: the source guest is {state}")
            return
        self._revive_destination(injector)
        if socket is None or not socket.exists():
            # libvirt keeps the destination's monitor for itself until the
            # incoming migration ends, so migrate-recover needs this socket.
            report.steps.append("no postcopy resume: the destination QEMU has no QMP socket of the harness "
                                "(it gets one only with QEMU's postcopy-blocktime capability)")
            return
        report.recovery_attempted = True
        timeout_s = float(self.playbook.timeouts.postcopy_recovery_s)
        resumed = resume_postcopy_through_socket(dom, socket, self.destination_host.migration_uri, timeout_s)
        report.steps.extend(f"postcopy recovery: {step}" for step in resumed.steps)
        report.steps.append(f"postcopy recovery: {'completed' if resumed.finished else resumed.error} "
                            f"after {resumed.took_s:.1f} s")
        # A migration that completed without the resume command was not recovered, only waited for.
        report.recovered = resumed.finished and resumed.resumed
        if resumed.resumed and resumed.took_s:
            report.recovery_ms = resumed.took_s * 1000.0
        if not resumed.finished:
            report.timed_out = report.timed_out or resumed.took_s >= timeout_s
            return
        new_domain = wait_for_migrated_guest(self.source, self.destination, dom.name(), LIBVIRT_SETTLE_S)
        if new_domain is None:
            report.recovered = False if resumed.resumed else None
            report.steps.append(f"QEMU completed the migration, but libvirt did not end the migration job within "
                                f"{LIBVIRT_SETTLE_S:g} s (source: {domain_state(self.source, dom.name())}, "
                                f"destination: {domain_state(self.destination, dom.name())})")
            return
        result.outcome, result.error, result.destination_domain = "completed", None, new_domain
        record_recovered_end(result, resumed)

    def _revive_destination(self, injector: FaultInjector) -> None:
        """Start the destination's libvirtd again when it no longer answers.

        libvirtd 11.3 was seen to crash (SIGSEGV in libvirt_driver_qemu.so)
        on a postcopy resume. Started again, it listed the destination guest
        as running again.
        """
        try:
            self.destination.getLibVersion()
            return
        except libvirt.libvirtError as exc:
            injector.report.steps.append(f"the destination's libvirtd did not answer after the failure "
                                         f"({exc.get_error_message()}); starting it again")
        t = time.monotonic()
        try:
            injector.start_daemon()
        except LabError as exc:
            injector.report.steps.append(f"starting the destination's libvirtd again failed: {exc}")
            return
        with contextlib.suppress(libvirt.libvirtError):
            self.destination.close()
        self.destination = self.destination_host.connect()
        injector.report.steps.append(f"the destination's libvirtd runs again after {time.monotonic() - t:.1f} s")

    def _destination_ran(self, result: MigrationResult | None, destination_console: Path | HostFile) -> bool:
        """Return whether the destination QEMU ran the guest, from libvirt's resume events or its console."""
        if result is not None and any(event.host == self.destination_host.name and event.kind == "resumed"
                                      for event in result.events):
            return True
        return scan_console(read_console(destination_console)).last_report is not None

    def _fault_record(self, injector: FaultInjector, guest_name: str, outcome: str, error: str | None,
                      integrity: Integrity, *, switched: bool) -> FaultRecord:
        """Classify where the guest ended after the fault, with the state of both sides.

        libvirt's state follows QEMU's events and can lag behind QEMU around
        the postcopy switch, so a host counts as running the guest only when
        its QEMU's query-status returns ``running``.
        """
        report = injector.report
        sides = {}
        for side, conn in (("source", self.source), ("destination", self.destination)):
            libvirt_state = domain_state(conn, guest_name)
            # QEMU is asked only where libvirt has a guest that may run, because a
            # destination with an open incoming job makes query-status wait 30 s.
            qemu_state = qemu_status(conn, guest_name) if libvirt_state.startswith("running") else None
            sides[side] = (libvirt_state, qemu_state)
        report.source_state = host_state_text(*sides["source"])
        report.destination_state = host_state_text(*sides["destination"])
        fault_outcome = classify_fault(
            struck=report.struck_at_s is not None, run_outcome=outcome, recovered=report.recovered,
            guest_alive=integrity.guest_alive, switched=switched, source_runs=runs_guest(*sides["source"]),
            destination_runs=runs_guest(*sides["destination"]))
        if fault_outcome == "guest-lost" and switched and runs_guest(*sides["source"]):
            report.steps.append("the source runs the guest again after the destination had run it, "
                                "so the source's memory is not the guest's latest")
        if report.detail is None:
            # The run's error says why the migration failed; the steps say what the harness did.
            report.detail = error or (report.steps[-1] if report.steps else None)
        values = report.as_dict()
        values.pop("outcome")
        return FaultRecord(spec=injector.spec.model_dump(), outcome=fault_outcome, **values)

    def _kill_leftover_qemu(self, injector: FaultInjector, name: str, warnings: list[str]) -> None:
        """Kill the guest's QEMU processes that outlived their libvirtd, and add a warning for each host.

        Over SSH they run on the inventory's hosts, so each host's shell
        looks for them. On the local lab's fast path every QEMU is a process
        of this machine.
        """
        if injector.strikes is not None:
            for leftover in injector.strikes.kill_leftover_qemu(name):
                warnings.extend(leftover.warnings(name))
            return
        killed = kill_leftover_qemu(name)
        if killed:
            warnings.append(f"killed QEMU processes of {name} that libvirt no longer knew: "
                            f"{', '.join(map(str, killed))}")

    def _remove_guest(self, name: str) -> None:
        for conn in (self.source, self.destination):
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            try:
                domain.destroy(dom)
            except LabError as exc:
                log.error("could not remove guest %s: %s", name, exc)

    def _record(self, run_id, scenario, repetition, started_at, outcome, error, result, integrity, phases,
                warnings, *, observed: Observed | None = None,
                host_figures: list[HostFigures] | None = None, fault: FaultRecord | None = None,
                disk: DiskRecord | None = None) -> RunRecord:
        stats = MigrationStats.from_libvirt(result.completed_stats if result else {})
        measured = Measured(
            wall_total_ms=result.wall_total_ms if result else None,
            wall_downtime_ms=result.wall_downtime_ms if result else None,
            transfer_time_ms=result.transfer_time_ms if result else None,
            switchover_at_s=result.switchover_at_s if result else None,
            postcopy_started_at_s=result.postcopy_started_at_s if result else None,
            phases=phases, **(result.details if result else {}))
        return RunRecord(
            experiment=self.playbook.experiment, run_id=run_id, scenario_id=scenario.scenario_id,
            scenario=scenario.values(), repetition=repetition, source_host=self.source_host.name,
            destination_host=self.destination_host.name, started_at=started_at,
            ended_at=datetime.now(timezone.utc), outcome=outcome, error=error, stats=stats, measured=measured,
            integrity=integrity, environment=self.environment, observed=observed or Observed(),
            host_figures=host_figures or [], warnings=warnings, fault=fault, disk=disk)
