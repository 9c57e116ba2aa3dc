"""Faults struck during a migration, on the local lab or on inventory hosts, and the recovery after them.

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

On the local lab's fast path the injector reaches the namespaces directly.
On the hosts of an inventory, reached over SSH, :class:`ShellStrikes` does
the same through each host's shell, with ``sudo -n`` where the inventory
sets ``sudo: true``. There link-down cuts the destination's migration
interface after arming a detached restore on the host itself, so the link
comes back even if the harness loses its SSH connection. kill-qemu kills
the one QEMU whose command line names this run's guest and waits for an
incoming migration. kill-libvirtd kills the daemon that serves
qemu:///system (virtqemud or libvirtd) and starts it again with systemctl.
After the run, QEMU processes of its guest that libvirt no longer lists are
killed through the same shells (:meth:`ShellStrikes.kill_leftover_qemu`);
on the fast path :func:`kill_leftover_qemu` searches this machine's /proc.

Outcomes (:data:`FAULT_OUTCOMES`): ``completed``, ``source-running`` (the
migration failed before the destination ran the guest, and the guest still
runs on the source), ``postcopy-recovered`` (the guest was paused in postcopy
and the migration resumed and finished), ``guest-lost`` (no side runs the
guest, or only a source that resumed after the destination had run it),
``split-brain`` (the QEMUs of both hosts run the guest) and ``not-struck``
(the migration ended before the trigger).
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
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import libvirt
import libvirt_qemu
from pydantic import BaseModel, ConfigDict, Field, model_validator
from qemu.qmp.legacy import QEMUMonitorProtocol

from lab.domain import require_owned
from lab.errors import HostError, LabError
from lab.hosts import shaping
from lab.qmp import FAILURES as QMP_FAILURES, close_quietly

if TYPE_CHECKING:
    from lab.hosts.local import LocalLab
    from lab.hosts.shell import Shell
    from lab.inventory import InventoryHost

log = logging.getLogger(__name__)

# The destination's end of its veth pair to the lab switch (lab.hosts.local.HOST_LINK).
HOST_LINK = "eth0"

FaultKind = Literal["link-down", "kill-qemu", "kill-libvirtd", "bandwidth"]
FaultOutcome = Literal["completed", "source-running", "postcopy-recovered", "guest-lost", "split-brain",
                       "not-struck"]
FAULT_OUTCOMES: tuple[str, ...] = get_args(FaultOutcome)
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


# -- faults through a host's shell ---------------------------------------------

# Prints the pid of the destination QEMU of guest argv[1] and kills it with
# SIGKILL, or with argv[3] == "check" only prints it. The libvirt pid file
# argv[2] is tried first; without it, /proc is searched. A QEMU counts only
# if its command line names the guest (guest=NAME) and waits for an incoming
# migration (-incoming), which the source QEMU of the same guest never does.
KILL_QEMU_SCRIPT = r"""
import os, signal, sys, time
name, pid_file, mode = sys.argv[1], sys.argv[2], sys.argv[3]
marker = ("guest=%s" % name).encode()

def destination_qemu(pid):
    try:
        args = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")
    except OSError:
        return False
    return (b"qemu" in os.path.basename(args[0]) and b"-incoming" in args
            and any(arg == marker or arg.startswith(marker + b",") for arg in args))

pids = []
try:
    pids = [int(open(pid_file).read().strip())]
except (OSError, ValueError):
    pass
pids = [pid for pid in pids if destination_qemu(pid)]
if not pids:
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and destination_qemu(int(entry))]
if len(pids) != 1:
    print("found %d destination QEMU processes of guest %s (pid file %s)" % (len(pids), name, pid_file))
    sys.exit(3)
pid = pids[0]
if mode == "kill":
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.05)
print(pid)
"""

# Kills with SIGKILL every QEMU process of guest argv[1] and waits up to
# argv[3] seconds for each to go. A process counts only if its program is a
# qemu-system binary and one of its arguments starts with "guest=NAME,", as
# libvirt's "-name guest=NAME,debug-threads=on" does, so a guest whose name
# merely starts with NAME never matches. With argv[2] == "own-netns", only
# processes in the script's own network namespace count. Prints one line
# per process: "killed PID", "running PID" (still there after the wait) or
# "failed PID REASON".
LEFTOVER_QEMU_SCRIPT = r"""
import os, signal, sys, time
name, scope, wait_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
marker = ("guest=%s," % name).encode()
own_netns = os.stat("/proc/self/ns/net").st_ino if scope == "own-netns" else None

def guest_qemu(pid):
    try:
        args = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")
        if own_netns is not None and os.stat("/proc/%d/ns/net" % pid).st_ino != own_netns:
            return False
    except OSError:
        return False
    return b"qemu-system" in os.path.basename(args[0]) and any(arg.startswith(marker) for arg in args[1:])

def start_time(pid):
    # None for a process that is gone, or a zombie, whose memory and files are already freed.
    try:
        fields = open("/proc/%d/stat" % pid, "rb").read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19]

killed = {}
for entry in os.listdir("/proc"):
    if not entry.isdigit() or not guest_qemu(int(entry)):
        continue
    pid = int(entry)
    started = start_time(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        continue
    except OSError as error:
        print("failed", pid, error.strerror)
        continue
    killed[pid] = started
    print("killed", pid)
deadline = time.monotonic() + wait_s
while time.monotonic() < deadline:
    # A pid whose start time changed belongs to a new process: the killed one is gone.
    killed = {pid: started for pid, started in killed.items() if started is not None and start_time(pid) == started}
    if not killed:
        break
    time.sleep(0.05)
for pid in sorted(killed):
    print("running", pid)
"""

# Prints "name pid unit" of the daemon that serves qemu:///system (virtqemud
# of the modular daemons, else libvirtd), with "-" for a daemon that runs
# outside its own systemd service (NAME.service), and with argv[1] == "kill"
# kills it with SIGKILL first and waits until it is gone. A daemon started by
# hand from another service inherits that service's cgroup, so only its own
# unit name counts.
KILL_DAEMON_SCRIPT = r"""
import os, signal, sys, time

def command_name(pid):
    try:
        return open("/proc/%d/comm" % pid).read().strip()
    except OSError:
        return None

def daemon():
    for name in ("virtqemud", "libvirtd"):
        try:
            pid = int(open("/run/%s.pid" % name).read().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and command_name(pid) == name:
            return name, pid
        # Without a pid file, one process of that name in /proc is the daemon.
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and command_name(int(entry)) == name]
        if len(pids) == 1:
            return name, pids[0]
    print("no running virtqemud or libvirtd found from /run/virtqemud.pid, /run/libvirtd.pid or /proc")
    sys.exit(3)

name, pid = daemon()
unit = "-"
try:
    for line in open("/proc/%d/cgroup" % pid):
        if line.strip().rsplit("/", 1)[-1] == name + ".service":
            unit = name + ".service"
except OSError:
    pass
if sys.argv[1] == "kill":
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.05)
print(name, pid, unit)
"""

# Starts a detached process that sets interface $2 up after $1 seconds and
# prints its pid, which is also its process group. setsid puts it in a session
# of its own, so it outlives the SSH session that started it.
ARM_RESTORE_SCRIPT = ('setsid sh -c \'sleep "$1"; ip link set dev "$2" up\' "$0" "$1" "$2" '
                      '</dev/null >/dev/null 2>&1 & echo $!')
# Kills the process group of an armed restore, if its pid still runs one.
CANCEL_RESTORE_SCRIPT = ('grep -q "$0" "/proc/$1/cmdline" 2>/dev/null && kill -s TERM -- "-$1"; exit 0')
RESTORE_NAME = "migrlab-link-restore"
# Tools each fault kind runs on the host it strikes.
FAULT_TOOLS = {"link-down": ("ip", "setsid", "sleep", "grep", "kill"), "kill-qemu": ("python3",),
               "kill-libvirtd": ("python3", "systemctl"), "bandwidth": ("tc",)}
# Fault kinds that strike the destination; bandwidth shapes the source.
DESTINATION_KINDS = ("link-down", "kill-qemu", "kill-libvirtd")
SYSTEM_PID_DIR = "/run/libvirt/qemu"


@dataclass
class LeftoverQemu:
    """QEMU processes of one guest that the cleanup after a run found on one host."""

    host: str
    killed: list[int] = field(default_factory=list)
    # Killed, but still present KILL_WAIT_S after the SIGKILL.
    running: list[int] = field(default_factory=list)
    # Pid and reason of each SIGKILL that failed.
    failed: list[tuple[int, str]] = field(default_factory=list)
    # Why the host's shell could not look for them, or None when it could.
    error: str | None = None

    def warnings(self, guest_name: str) -> list[str]:
        """Return the run's warnings about these processes, each naming the host."""
        where = f"of {guest_name} on host {self.host}"
        warnings = []
        if self.error is not None:
            warnings.append(f"could not look for leftover QEMU processes {where}: {self.error}")
        if self.killed:
            warnings.append(f"killed QEMU processes {where} that libvirt no longer knew: "
                            f"{', '.join(map(str, self.killed))}")
        if self.running:
            warnings.append(f"QEMU processes {where} still present {KILL_WAIT_S:g} s after SIGKILL: "
                            f"{', '.join(map(str, self.running))}")
        warnings += [f"SIGKILL to QEMU process {pid} {where} failed: {reason}" for pid, reason in self.failed]
        return warnings


def kill_leftover_qemu_through_shell(shell: "Shell", entry: "InventoryHost", guest_name: str, *,
                                     own_netns: bool = False) -> LeftoverQemu:
    """SIGKILL the QEMU processes of *guest_name* on one host through its shell, and wait until they are gone.

    It is the remote counterpart of :func:`kill_leftover_qemu`, run as root
    or through ``sudo -n`` as the inventory sets. With *own_netns*, only
    processes in the network namespace of the host's shell count, because
    the local lab's hosts share one /proc. Raises HostError when the shell
    fails or prints something other than the script's lines.
    """
    scope = "own-netns" if own_netns else "any-netns"
    argv = privileged(["python3", "-c", LEFTOVER_QEMU_SCRIPT, guest_name, scope, f"{KILL_WAIT_S:g}"], entry.sudo)
    # The command's own timeout covers the script's wait for the killed processes.
    result = shell.run(argv, timeout=COMMAND_TIMEOUT_S + KILL_WAIT_S, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise HostError(f"the QEMU cleanup script failed on host {entry.name}: {output}")
    leftover = LeftoverQemu(host=entry.name)
    for line in result.stdout.splitlines():
        words = line.split(maxsplit=2)
        try:
            state, pid = words[0], int(words[1])
        except (IndexError, ValueError):
            state, pid = None, 0
        if state == "killed":
            leftover.killed.append(pid)
        elif state == "running":
            leftover.running.append(pid)
        elif state == "failed":
            leftover.failed.append((pid, words[2] if len(words) > 2 else "no reason given"))
        else:
            raise HostError(f"the QEMU cleanup script on host {entry.name} printed {line!r}, expected "
                            "'killed PID', 'running PID' or 'failed PID REASON'")
    return leftover


def privileged(argv: list[str], sudo: bool) -> list[str]:
    """Return *argv*, run through ``sudo -n`` (never asking for a password) when *sudo* is set."""
    return ["sudo", "-n", "--", *argv] if sudo else list(argv)


def missing_tools(shell: "Shell", tools: list[str] | tuple[str, ...]) -> list[str]:
    """Return the tools of *tools* that the host's PATH, /usr/sbin and /sbin lack."""
    script = ('PATH="$PATH:/usr/sbin:/sbin"; for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 '
              '|| echo "$tool"; done')
    result = shell.run(["sh", "-c", script, "sh", *tools], timeout=COMMAND_TIMEOUT_S, check=False)
    return result.stdout.split()


def privilege_problem(shell: "Shell", entry: "InventoryHost") -> str | None:
    """Return why the SSH user of *entry* cannot run the faults' root commands, or None."""
    uid = shell.run(["id", "-u"], timeout=COMMAND_TIMEOUT_S, check=False).stdout.strip()
    if uid == "0":
        return None
    if not entry.sudo:
        return (f"user {entry.user} on host {entry.name} is not root, and faults need root for ip, kill, tc "
                f"and systemctl; log in as root, or set sudo: true for host {entry.name} in the inventory and "
                "allow the user password-less sudo")
    result = shell.run(["sudo", "-n", "true"], timeout=COMMAND_TIMEOUT_S, check=False)
    if result.returncode != 0:
        return (f"'sudo -n true' as {entry.user} on host {entry.name} failed: "
                f"{(result.stderr or result.stdout).strip() or f'exit status {result.returncode}'}; allow the "
                "user password-less sudo (a NOPASSWD line in /etc/sudoers.d), or log in as root")
    return None


def link_down_problem(shell: "Shell", entry: "InventoryHost", interface: str) -> str | None:
    """Return why cutting *interface* on *entry* would also cut the harness's SSH connection, or None.

    The inventory must reach the host over SSH at another address than its
    lab address, and the host's SSH replies must leave through another
    interface than the one link-down cuts (or the bridge it is a port of).
    """
    fix = (f"give host {entry.name} an SSH address (address) on another network than its lab_address, and "
           "let migration_interface name the interface of the lab network only")
    if entry.address == entry.lab_address:
        return (f"link-down would cut the SSH connection to host {entry.name}: its SSH address {entry.address} "
                f"is its lab_address, which carries the migration; {fix}")
    connection = shell.run(["sh", "-c", 'echo "$SSH_CONNECTION"'], timeout=COMMAND_TIMEOUT_S,
                           check=False).stdout.split()
    if len(connection) < 3:
        return None
    client = connection[0]
    cut = {interface}
    try:
        link = json.loads(shell.run(["ip", "-j", "link", "show", "dev", interface], timeout=COMMAND_TIMEOUT_S,
                                    check=False).stdout or "[]")
        cut.update(str(entry_["master"]) for entry_ in link if entry_.get("master"))
        route = json.loads(shell.run(["ip", "-j", "route", "get", client], timeout=COMMAND_TIMEOUT_S,
                                     check=False).stdout or "[]")
    except json.JSONDecodeError:
        return None
    devices = {str(hop.get("dev")) for hop in route}
    if devices & cut:
        return (f"link-down would cut the SSH connection to host {entry.name}: its replies to the harness "
                f"({client}) leave through {', '.join(sorted(devices & cut))}, the interface that link-down "
                f"cuts; {fix}")
    return None


def fault_host_problems(shell: "Shell", entry: "InventoryHost", kinds: set[str] | list[str], *, interface: str,
                        restart_outside_systemd: bool = False) -> list[str]:
    """Return what keeps the fault *kinds* from striking on one inventory host, each with its fix.

    *kinds* are those that strike on this host (link-down, kill-qemu and
    kill-libvirtd on the destination, bandwidth on the source); *interface*
    is the host's migration interface. With *restart_outside_systemd*, a
    daemon that runs outside systemd is fine (the local lab starts it).
    """
    kinds = sorted(set(kinds))
    if not kinds:
        return []
    problems = []
    problem = privilege_problem(shell, entry)
    if problem:
        problems.append(problem)
    needed = sorted({tool for kind in kinds for tool in FAULT_TOOLS[kind]})
    missing = missing_tools(shell, needed)
    if "kill-libvirtd" in kinds and "systemctl" in missing and restart_outside_systemd:
        missing.remove("systemctl")
    if missing:
        users = ", ".join(kind for kind in kinds if set(FAULT_TOOLS[kind]) & set(missing))
        problems.append(f"host {entry.name} lacks {', '.join(missing)}, which the faults {users} run; install "
                        "them (iproute2, util-linux, procps, python3, systemd)")
    if "link-down" in kinds:
        problem = link_down_problem(shell, entry, interface)
        if problem:
            problems.append(problem)
    if "kill-libvirtd" in kinds and entry.local_libvirt_uri != "qemu:///system":
        problems.append(f"kill-libvirtd on host {entry.name} needs libvirt_uri qemu:///system, not "
                        f"{entry.local_libvirt_uri}; a session daemon is the user's own, which the harness does not "
                        "kill")
    elif "kill-libvirtd" in kinds and "python3" not in missing and not problems:
        strikes = ShellStrikes(destination=shell, destination_entry=entry, link_interface=interface, source=shell,
                               source_entry=entry, source_interface=interface)
        try:
            name, pid, unit = strikes.describe_daemon()
        except HostError as error:
            problems.append(f"{error}; kill-libvirtd needs the daemon of qemu:///system running")
        else:
            if unit == "-" and not restart_outside_systemd:
                problems.append(f"{name} (pid {pid}) of host {entry.name} runs outside a systemd service, so the "
                                f"harness could not start it again after kill-libvirtd; run it as "
                                f"{name}.service, or remove the kill-libvirtd fault")
    return problems


class ShellStrikes:
    """Strike and undo faults on the hosts of an inventory, through their shells.

    *destination* and *source* are the hosts' shells (SSH on real hosts),
    *link_interface* the destination interface that link-down cuts,
    *source_interface* the one a bandwidth fault shapes. *restart_daemon*
    starts a killed daemon again when it ran outside systemd (the local lab's
    own libvirtd); otherwise ``systemctl start`` does. *shared_proc* is set
    for hosts that share this machine's /proc (the local lab over SSH), so
    that the cleanup on each host keeps to its own network namespace.
    """

    def __init__(self, *, destination: "Shell", destination_entry: "InventoryHost", link_interface: str,
                 source: "Shell", source_entry: "InventoryHost", source_interface: str,
                 restart_daemon: Any = None, shared_proc: bool = False):
        self.destination = destination
        self.destination_entry = destination_entry
        self.link_interface = link_interface
        self.source = source
        self.source_entry = source_entry
        self.source_interface = source_interface
        self.restart_daemon = restart_daemon
        self.shared_proc = shared_proc
        self._restore_pid: int | None = None
        self._daemon: tuple[str, int, str] | None = None

    @property
    def host(self) -> str:
        return self.destination_entry.name

    def _run(self, argv: list[str], *, check: bool = True):
        return self.destination.run(privileged(argv, self.destination_entry.sudo), timeout=COMMAND_TIMEOUT_S,
                                    check=check)

    def arm_restore(self, after_s: float) -> int:
        """Start a process on the destination that brings the link up after *after_s*; return its pid."""
        result = self._run(["sh", "-c", ARM_RESTORE_SCRIPT, RESTORE_NAME, f"{after_s:g}", self.link_interface])
        try:
            self._restore_pid = int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise HostError(f"arming the link restore on host {self.host} printed {result.stdout!r}, "
                            "expected a pid") from None
        return self._restore_pid

    def cancel_restore(self) -> None:
        if self._restore_pid is not None:
            self._run(["sh", "-c", CANCEL_RESTORE_SCRIPT, RESTORE_NAME, str(self._restore_pid)], check=False)
            self._restore_pid = None

    def set_link(self, up: bool) -> None:
        self._run(["ip", "link", "set", "dev", self.link_interface, "up" if up else "down"])
        if up:
            self.cancel_restore()

    def kill_qemu(self, guest_name: str) -> int:
        result = self._run(["python3", "-c", KILL_QEMU_SCRIPT, guest_name, f"{SYSTEM_PID_DIR}/{guest_name}.pid",
                            "kill"], check=False)
        if result.returncode != 0:
            raise HostError(f"no destination QEMU of {guest_name} killed on host {self.host}: "
                            f"{(result.stdout or result.stderr).strip()}")
        return int(result.stdout.split()[-1])

    def kill_leftover_qemu(self, guest_name: str) -> list[LeftoverQemu]:
        """SIGKILL the QEMU processes of *guest_name* on the destination, then the source; return them per host.

        A host whose shell fails gets its error in the result instead of
        raising, so that the other host is still cleaned.
        """
        leftovers = []
        for shell, entry in ((self.destination, self.destination_entry), (self.source, self.source_entry)):
            try:
                leftover = kill_leftover_qemu_through_shell(shell, entry, guest_name, own_netns=self.shared_proc)
            except HostError as error:
                log.warning("looking for leftover QEMU processes of %s on host %s failed: %s", guest_name,
                            entry.name, error)
                leftover = LeftoverQemu(host=entry.name, error=str(error))
            if leftover.killed:
                log.warning("killed leftover QEMU processes of %s on host %s: %s", guest_name, entry.name,
                            leftover.killed)
            leftovers.append(leftover)
        return leftovers

    def describe_daemon(self) -> tuple[str, int, str]:
        """Return the name, pid and systemd unit ("-" for none) of the destination's libvirt daemon."""
        return self._daemon_script("check")

    def _daemon_script(self, mode: str) -> tuple[str, int, str]:
        result = self._run(["python3", "-c", KILL_DAEMON_SCRIPT, mode], check=False)
        fields = result.stdout.split()
        if result.returncode != 0 or len(fields) != 3:
            raise HostError(f"libvirt daemon of host {self.host}: {(result.stdout or result.stderr).strip()}")
        return fields[0], int(fields[1]), fields[2]

    def kill_daemon(self) -> tuple[str, int, str]:
        name, pid, unit = self._daemon_script("kill")
        self._daemon = (name, pid, unit)
        return name, pid, unit

    def start_daemon(self) -> str:
        """Start the killed daemon again; return how."""
        name, _pid, unit = self._daemon or self.describe_daemon()
        if unit != "-":
            self._run(["systemctl", "start", unit])
            self._daemon = None
            return f"systemctl start {unit}"
        if self.restart_daemon is not None:
            self.restart_daemon()
            self._daemon = None
            return "the local lab started it"
        raise HostError(f"{name} of host {self.host} ran outside a systemd service, so the harness cannot start "
                        f"it again; start it by hand, and run it as a systemd service")

    def shape(self, rate_mib_s: int) -> None:
        shaping.shape(self._source_shell(), self.source_interface, rate_mib_s)

    def unshape(self) -> None:
        shaping.unshape(self._source_shell(), self.source_interface)

    def _source_shell(self) -> "Shell":
        if not self.source_entry.sudo:
            return self.source
        from lab.hosts.remote import SudoShell
        return SudoShell(self.source)


# Verdicts of poll() for the sampling loop.
CONTINUE = None
ABORT = "abort"
GIVE_UP = "give-up"


class FaultInjector:
    """Strike one fault during a migration, and undo it afterwards.

    On the local lab's fast path it reaches the namespaces of *lab*; with
    *strikes* it acts through the shells of inventory hosts instead.
    ``poll`` runs in the sampling loop and never blocks for longer than one
    command. ``undo`` is idempotent and brings the lab back: link up,
    shaping removed, libvirtd running on the destination.
    """

    def __init__(self, spec: FaultSpec, lab: "LocalLab | None", *, source_host: str, destination_host: str,
                 source_shell: "Shell", source_interface: str, guest_name: str, source_domain: libvirt.virDomain,
                 timeouts: FaultTimeouts, hosts: int = 2, strikes: ShellStrikes | None = None):
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
        self.strikes = strikes
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
                name, pid = self._kill_libvirtd()
                report.steps.append(f"{now_s:.1f} s: SIGKILL to {name} of {self.destination_host}, pid {pid}")
            else:
                self._shaped = True
                if self.strikes is not None:
                    self.strikes.shape(int(self.spec.bandwidth_mib_s))
                else:
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
                self._pause_through_qmp(now_s)
            verdict = CONTINUE
        else:
            report.steps.append(f"{now_s:.1f} s: no end {self.timeouts.settle_s:g} s after the strike; "
                                "migration job aborted")
        # With the link back, the source's closed socket reaches the destination,
        # which lets the destination's side of the job end too.
        if self._link_down:
            self._set_link(up=True, now_s=now_s)
        return verdict

    def _pause_through_qmp(self, now_s: float) -> None:
        """Pause a postcopy migration with QEMU's migrate-pause when libvirt rejects the pause.

        libvirt 11.3 accepts abortJobFlags(POSTCOPY) only once its job has
        reached its postcopy phase ("current job is not outgoing migration in
        post-copy mode" before). QEMU accepts migrate-pause only in
        postcopy-active or postcopy-recover, so a migration still in precopy
        is left alone.

        NOTE: on the local lab, a link cut right after the switch request
        found QEMU still before its switch too (it rejected migrate-pause).
        QEMU switched once the link was back, and the recovery then waits for
        that postcopy to complete. A pause through this path was not observed.
        """
        try:
            libvirt_monitor(self.source_domain)("migrate-pause")
        except (LabError, libvirt.libvirtError) as exc:
            self.report.steps.append(f"{now_s:.1f} s: migrate-pause on the source QEMU failed: {exc}")
            return
        self.report.steps.append(f"{now_s:.1f} s: postcopy paused with QEMU's migrate-pause on the source")

    # -- actions --------------------------------------------------------------

    @property
    def link_name(self) -> str:
        return self.strikes.link_interface if self.strikes is not None else HOST_LINK

    def safety_restore_s(self) -> float:
        """Seconds after the cut at which the host brings the link up by itself, without the harness."""
        if self.spec.restore_after_s is not None:
            return self.spec.restore_after_s
        return self.timeouts.settle_s + self.timeouts.abort_s + 2 * COMMAND_TIMEOUT_S

    def _set_link(self, *, up: bool, now_s: float | None = None) -> None:
        state = "up" if up else "down"
        when = f"{now_s:.1f} s: " if now_s is not None else ""
        if self.strikes is not None and not up:
            # Armed before the cut, so the link comes back even if the harness loses the host.
            after_s = self.safety_restore_s()
            pid = self.strikes.arm_restore(after_s)
            self.report.steps.append(f"{when}restore armed on {self.destination_host}: link "
                                     f"{self.link_name} up after {after_s:g} s without the harness (pid {pid})")
        if not up:
            self._link_down = True
        if self.strikes is not None:
            self.strikes.set_link(up)
        else:
            self.lab.exec(self.destination_host, ["ip", "link", "set", HOST_LINK, state], timeout=COMMAND_TIMEOUT_S)
        if up:
            self._link_down = False
            self.report.restored_at_s = now_s
        self.report.steps.append(f"{when}link {self.link_name} of {self.destination_host} set {state}")

    def qemu_pid_file(self) -> Path:
        return self.lab.outside_path(self.destination_host, f"/run/libvirt/qemu/{self.guest_name}.pid")

    def _kill_qemu(self) -> int:
        if self.strikes is not None:
            return self.strikes.kill_qemu(self.guest_name)
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

    def _kill_libvirtd(self) -> tuple[str, int]:
        if self.strikes is not None:
            self._libvirtd_killed = True
            name, pid, _unit = self.strikes.kill_daemon()
            return name, pid
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
        return "libvirtd", pid

    # -- afterwards ------------------------------------------------------------

    @property
    def libvirtd_killed(self) -> bool:
        return self._libvirtd_killed

    def start_daemon(self) -> str:
        """Start the destination's libvirt daemon again; return how. Raises LabError."""
        if self.strikes is not None:
            return self.strikes.start_daemon()
        self.lab.up(hosts=self.hosts)
        return "the local lab started it"

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
                    later = (f"; the host sets it up by itself {self.safety_restore_s():g} s after the cut"
                             if self.strikes is not None else "")
                    errors.append(f"bringing the link up failed: {exc}{later}")
            if self._shaped:
                try:
                    if self.strikes is not None:
                        self.strikes.unshape()
                    else:
                        shaping.unshape(self.source_shell, self.source_interface)
                    self._shaped = False
                except LabError as exc:
                    errors.append(f"removing the shaping failed: {exc}")
            if self._libvirtd_killed:
                t = time.monotonic()
                try:
                    how = self.start_daemon()
                    self._libvirtd_killed = False
                    self.report.steps.append(f"libvirtd of {self.destination_host} started again in "
                                             f"{time.monotonic() - t:.1f} s ({how})")
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


def qemu_status(conn: libvirt.virConnect | None, name: str) -> str | None:
    """Return the run state that the guest's QEMU reports (QMP query-status), or None if it cannot be asked.

    libvirt's domain state follows QEMU's events and can lag behind QEMU
    around a postcopy switch, so QEMU's own state decides which host
    executes the guest. On a
    destination whose incoming migration job is still open, libvirt 11.3
    waits up to 30 s for the job lock before it fails.
    """
    if conn is None:
        return None
    try:
        dom = conn.lookupByName(name)
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "query-status"}), 0))
    except libvirt.libvirtError as exc:
        log.debug("query-status of %s failed: %s", name, exc.get_error_message())
        return None
    status = (reply.get("return") or {}).get("status")
    return str(status) if status is not None else None


def runs_guest(libvirt_state: str, qemu_state: str | None) -> bool:
    """Return whether one host executes the guest: QEMU's state decides, libvirt's only when QEMU gave none."""
    if qemu_state is not None:
        return qemu_state == "running"
    return libvirt_state == "running"


def host_state_text(libvirt_state: str, qemu_state: str | None) -> str:
    """Return the state to record for one host: libvirt's, followed by QEMU's where the two differ."""
    if qemu_state is None or qemu_state == libvirt_state.split("/")[0]:
        return libvirt_state
    return f"{libvirt_state} (QEMU: {qemu_state})"


def classify_fault(*, struck: bool, run_outcome: str, recovered: bool | None, guest_alive: bool,
                   switched: bool, source_runs: bool, destination_runs: bool) -> str:
    """Return the fault outcome (:data:`FAULT_OUTCOMES`) of one run.

    *switched* means the destination QEMU ran the guest at some point (the
    postcopy switch happened, or the destination's console shows the
    workload), so the source's memory is no longer the guest's. Two running
    QEMUs are ``split-brain`` whatever else happened, also without a strike.
    """
    if source_runs and destination_runs:
        return "split-brain"
    if not struck:
        return "not-struck"
    if run_outcome == "completed":
        return "postcopy-recovered" if recovered else "completed"
    if guest_alive and source_runs and not switched:
        return "source-running"
    return "guest-lost"


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
# QEMU's query-migrate status while postcopy moves pages.
POSTCOPY_ACTIVE = "postcopy-active"


@dataclass
class ResumeResult:
    """Outcome of one postcopy recovery: whether QEMU finished the migration, and how long it took."""

    finished: bool
    # Whether the source got the resume command; False for a migration that completed without it.
    resumed: bool = False
    error: str | None = None
    # From the source's resume command to the destination reporting the migration completed.
    took_s: float = 0.0
    steps: list[str] = field(default_factory=list)
    # The clock's value at the first poll that found the destination completed, at
    # most one poll interval after QEMU completed. None when the very first poll
    # found it completed, because the time of the completion is then unknown.
    completed_at: float | None = None
    # The destination's query-migrate reply that reported the migration completed.
    destination_status: dict[str, Any] = field(default_factory=dict)


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
    in any other state is left as it is. A migration that the destination
    reports as ``postcopy-active`` (and the source as ``postcopy-active`` or
    ``completed``) still moves pages (as after a cut that QEMU's
    switch came after), so it gets *timeout_s* to complete or pause instead.

    libvirt's VIR_MIGRATE_POSTCOPY_RESUME is not used: libvirtd 11.3
    dereferences a NULL pointer in qemuMigrationDstPrepareResume and crashes
    on every resume (docs/postcopy-recovery.md). Once QEMU reports the
    migration completed, libvirt finishes the job on both hosts by itself,
    as it does for a migration that completed while no API call watched it.
    """
    result = ResumeResult(finished=False)
    started = clock()
    deadline = started + pause_wait_s
    active_noted = False
    polls = 0
    while True:
        try:
            # The destination first: once it completed, the source's guest may be gone.
            destination_status = destination_monitor("query-migrate")
            destination_state = destination_status.get("status")
            if destination_state == "completed":
                result.finished = True
                result.destination_status = destination_status
                result.completed_at = clock() if polls else None
                result.steps.append("the destination QEMU reports the migration completed without a resume")
                result.took_s = clock() - started
                return result
            polls += 1
            states = {"source": source_monitor("query-migrate").get("status"), "destination": destination_state}
        except (LabError, *QMP_FAILURES) as exc:
            result.error = f"reading the migration state failed: {exc}"
            return result
        if all(state == POSTCOPY_PAUSED for state in states.values()):
            break
        # The source reports completed once it has sent the last page, before the destination does.
        active = destination_state == POSTCOPY_ACTIVE and states["source"] in (POSTCOPY_ACTIVE, "completed")
        if active and not active_noted:
            active_noted = True
            result.steps.append(f"QEMU reports the migration as {states['source']} on the source and "
                                f"{destination_state} on the destination; waiting up to {timeout_s:g} s for it "
                                "to complete or pause")
        if clock() >= (started + timeout_s if active else deadline):
            result.error = (f"not resumed: QEMU reports the migration as {states['source']} on the source and "
                            f"{states['destination']} on the destination, not both {POSTCOPY_PAUSED}")
            result.took_s = clock() - started
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
    except (LabError, *QMP_FAILURES, KeyError, ValueError) as exc:
        result.error = f"migrate-recover on the destination failed: {exc}"
        return result
    uri = f"tcp:{listen_host}:{port}"
    result.steps.append(f"destination QEMU listens for the recovery on {uri}")

    started = clock()
    try:
        source_monitor("migrate", uri=uri, resume=True)
    except (LabError, *QMP_FAILURES) as exc:
        result.error = f"migrate with resume on the source failed: {exc}"
        return result
    result.resumed = True
    result.steps.append("source QEMU resumed the migration")

    deadline = started + timeout_s
    status = None
    while clock() < deadline:
        try:
            destination_status = destination_monitor("query-migrate")
        except (LabError, *QMP_FAILURES) as exc:
            result.error = f"reading the destination's migration state failed: {exc}"
            break
        status = destination_status.get("status")
        if status == "completed":
            result.finished = True
            result.completed_at = clock()
            result.destination_status = destination_status
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
    except QMP_FAILURES as exc:
        return ResumeResult(finished=False,
                            error=f"connecting to the destination's QMP socket {destination_socket} failed: {exc}")
    finally:
        close_quietly(destination_qmp, "the destination's QMP socket")


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
