"""Finding and stopping the processes that live in the lab's namespaces."""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from dataclasses import dataclass

from lab.hosts.netns import namespace_id

log = logging.getLogger(__name__)

NamespaceId = tuple[int, int]


@dataclass(frozen=True)
class LabProcess:
    """A process found in one of the lab's namespaces."""

    pid: int
    name: str
    namespace: str
    command: str


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def is_alive(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie.

    A zombie has released its namespaces and waits for its parent to reap
    it. On a machine whose init reaps late, zombies of the lab's daemons can
    stay for a while after down.
    """
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return False
    # The state follows the command name, which is in parentheses and may
    # itself contain spaces or parentheses.
    return not stat[stat.rfind(")") + 2:].startswith("Z")


def find_processes(namespaces: dict[NamespaceId, str]) -> list[LabProcess]:
    """Return the live processes whose net, mount or UTS namespace is in ``namespaces``.

    ``namespaces`` maps a namespace id from ``namespace_id`` to the name that
    the result reports. The caller itself and zombies are left out.
    """
    found = []
    own_pid = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own_pid:
            continue
        pid = int(entry)
        for kind in ("net", "mnt", "uts"):
            ns = namespace_id(f"/proc/{pid}/ns/{kind}")
            if ns is not None and ns in namespaces:
                break
        else:
            continue
        if not is_alive(pid):
            continue
        name = (_read_text(f"/proc/{pid}/comm") or "?").strip()
        command = (_read_text(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
        found.append(LabProcess(pid=pid, name=name, namespace=namespaces[ns], command=command))
    return found


def _open_pidfd(process: LabProcess, namespaces: dict[NamespaceId, str]) -> int | None:
    """Open a pidfd for a process that is still in a lab namespace.

    The namespace is checked again after the pidfd is open, so a pid reused
    by an unrelated process since the scan is never signalled.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return None
    for kind in ("net", "mnt", "uts"):
        if namespace_id(f"/proc/{process.pid}/ns/{kind}") in namespaces:
            return pidfd
    os.close(pidfd)
    return None


def _wait_for_exit(pidfds: dict[int, int], timeout: float) -> None:
    """Wait until every process behind ``pidfds`` exits or ``timeout`` passes.

    Removes the pids that exited from ``pidfds`` and closes their pidfds. A
    pidfd becomes readable when its process exits, whether or not the caller
    is its parent.
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for pidfd in pidfds.values():
        poller.register(pidfd, select.POLLIN)
    by_fd = {pidfd: pid for pid, pidfd in pidfds.items()}
    while pidfds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for fd, _event in poller.poll(remaining * 1000):
            poller.unregister(fd)
            pidfds.pop(by_fd[fd], None)
            os.close(fd)


def terminate(processes: list[LabProcess], namespaces: dict[NamespaceId, str], *,
              grace: float = 10.0, kill_wait: float = 10.0) -> tuple[list[LabProcess], list[int]]:
    """Send SIGTERM to the processes, then SIGKILL to those alive after ``grace`` seconds.

    SIGKILL is needed because libvirtd and a QEMU paused in postcopy have
    been seen to ignore SIGTERM. Returns the processes that were signalled
    and the pids still alive ``kill_wait`` seconds after SIGKILL (a process
    stuck in uninterruptible sleep).
    """
    pidfds: dict[int, int] = {}
    signalled = []
    for process in processes:
        pidfd = _open_pidfd(process, namespaces)
        if pidfd is None:
            continue
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            os.close(pidfd)
            continue
        log.info("sent SIGTERM to %s (pid %d) in %s", process.name, process.pid, process.namespace)
        pidfds[process.pid] = pidfd
        signalled.append(process)

    _wait_for_exit(pidfds, grace)
    for pid, pidfd in pidfds.items():
        log.warning("pid %d still alive %g s after SIGTERM, sending SIGKILL", pid, grace)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_for_exit(pidfds, kill_wait)

    stuck = sorted(pidfds)
    for pidfd in pidfds.values():
        os.close(pidfd)
    if stuck:
        log.error("pids %s did not exit %g s after SIGKILL", stuck, kill_wait)
    return signalled, stuck


def stuck_message(stuck: list[int], kill_wait: float = 10.0) -> str:
    return (f"processes {stuck} did not exit {kill_wait:g} s after SIGKILL; check "
            "/proc/<pid>/stack and run down again once they are gone")
