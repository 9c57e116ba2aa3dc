"""Bandwidth limits on the migration link with tc, applied before a run and removed after it.

Each libvirt host gets a token bucket filter (tbf) as root qdisc of its
migration interface, which limits what the host sends, so the link is
shaped in both directions. tbf and htb are the shaping qdiscs this project
relies on; netem (delay, loss) may be missing from a kernel.

The harness marks its qdisc with its own handle and removes only a root
qdisc with that handle. It replaces only the kernel's default root qdiscs,
so a qdisc that an administrator set up is never touched: the run fails
with a message instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from lab.errors import HostError
from lab.hosts.shell import Shell

log = logging.getLogger(__name__)

# Handle of the harness's root qdisc ("ML" in ASCII).
HANDLE = "4d4c:"
# Root qdiscs the kernel attaches by itself, which the harness may replace.
DEFAULT_ROOT_KINDS = frozenset({"noqueue", "pfifo_fast", "fq_codel", "mq"})
TC_TIMEOUT_S = 30.0
# Queue delay that tbf allows before it drops, which bounds its queue length.
LATENCY_MS = 50
# Burst of the token bucket: 10 ms of traffic at the rate, and at least 64 KiB.
# Linux needs at least rate / HZ to reach the rate, which is 4 ms at HZ=250.
BURST_S = 0.01
MIN_BURST_BYTES = 64 * 1024


@dataclass(frozen=True)
class Qdisc:
    kind: str
    handle: str


def root_qdisc(shell: Shell, interface: str) -> Qdisc | None:
    """Return the root qdisc of an interface, or None if tc lists none."""
    result = shell.run(["tc", "-j", "qdisc", "show", "dev", interface], timeout=TC_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise HostError(f"cannot list the qdiscs of {interface} on host {shell.name}: "
                        f"{result.stderr.strip() or result.stdout.strip()}; check that the interface exists "
                        "and that iproute2 is installed")
    try:
        entries = json.loads(result.stdout or "[]")
    except json.JSONDecodeError as error:
        raise HostError(f"tc on host {shell.name} printed no JSON for {interface}: {error}") from error
    for entry in entries:
        if entry.get("root"):
            return Qdisc(kind=str(entry.get("kind")), handle=str(entry.get("handle")))
    return None


def tbf_argv(interface: str, rate_mib_s: int) -> list[str]:
    """Return the tc command that sets a token bucket of ``rate_mib_s`` MiB/s as root qdisc."""
    rate_bytes_s = rate_mib_s * 2**20
    burst = max(int(rate_bytes_s * BURST_S), MIN_BURST_BYTES)
    return ["tc", "qdisc", "replace", "dev", interface, "root", "handle", HANDLE, "tbf",
            "rate", f"{rate_bytes_s * 8}bit", "burst", str(burst), "latency", f"{LATENCY_MS}ms"]


def shape(shell: Shell, interface: str, rate_mib_s: int) -> None:
    """Limit what the host sends on ``interface`` to ``rate_mib_s`` MiB/s."""
    current = root_qdisc(shell, interface)
    if current is not None and current.handle != HANDLE and current.kind not in DEFAULT_ROOT_KINDS:
        raise HostError(f"interface {interface} on host {shell.name} has a {current.kind} root qdisc "
                        f"(handle {current.handle}) that the harness did not set, so it does not replace it; "
                        f"remove it with 'tc qdisc del dev {interface} root', or run without link.rate_mib_s")
    result = shell.run(tbf_argv(interface, rate_mib_s), timeout=TC_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise HostError(f"cannot shape {interface} on host {shell.name} to {rate_mib_s} MiB/s: "
                        f"{result.stderr.strip()}; tc needs root and the tbf qdisc (sch_tbf)")
    log.info("shaped %s on %s to %d MiB/s", interface, shell.name, rate_mib_s)


def unshape(shell: Shell, interface: str) -> bool:
    """Remove the harness's root qdisc from ``interface``; return whether there was one."""
    current = root_qdisc(shell, interface)
    if current is None or current.handle != HANDLE:
        return False
    shell.run(["tc", "qdisc", "del", "dev", interface, "root"], timeout=TC_TIMEOUT_S)
    log.info("removed the shaping of %s on %s", interface, shell.name)
    return True


class LinkShaping:
    """Shape the migration interfaces of some hosts for the duration of a with block.

    With ``rate_mib_s`` None the block runs unshaped and nothing is changed.
    The shaping is removed on exit whatever happened inside, Ctrl-C
    included. A failure to remove it is logged, so it does not hide the
    block's own exception.
    """

    def __init__(self, targets: list[tuple[Shell, str]], rate_mib_s: int | None):
        self.targets = targets
        self.rate_mib_s = rate_mib_s
        self._shaped: list[tuple[Shell, str]] = []

    def __enter__(self) -> LinkShaping:
        if self.rate_mib_s is None:
            return self
        try:
            for shell, interface in self.targets:
                # Recorded first, so that a half-applied tc call is undone too.
                self._shaped.append((shell, interface))
                shape(shell, interface, self.rate_mib_s)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()

    def remove(self) -> list[str]:
        """Remove the shaping applied so far; return the errors, which are also logged."""
        errors = []
        while self._shaped:
            shell, interface = self._shaped.pop()
            try:
                unshape(shell, interface)
            except HostError as error:
                log.error("could not remove the shaping of %s on %s: %s", interface, shell.name, error)
                errors.append(str(error))
        return errors


def clear(targets: list[tuple[Shell, str]]) -> None:
    """Remove shaping that a killed harness left on the targets; other qdiscs stay."""
    for shell, interface in targets:
        try:
            if unshape(shell, interface):
                log.warning("removed link shaping that an earlier run left on %s of %s", interface, shell.name)
        except HostError as error:
            log.warning("could not check %s on %s for leftover shaping: %s", interface, shell.name, error)
