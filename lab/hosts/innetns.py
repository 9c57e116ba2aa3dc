"""Calls made from inside a named network namespace, without a helper process.

setns(2) with CLONE_NEWNET moves only the calling thread into the namespace,
so a fresh thread joins it, makes the call and ends. Sockets keep the
namespace they were created in, and a child process inherits the namespace
of the thread that forked it. So an SSH socket, or a libvirt connection
whose libssh transport opens its socket in the calling thread, keeps
working from every thread of the harness afterwards.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from lab.errors import HostError
from lab.hosts.netns import netns_path

T = TypeVar("T")

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    path = netns_path(netns)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HostError(f"network namespace {netns!r} not found ({path} is missing); the inventory's "
                        "control_netns must name a namespace that exists, so bring the local lab up "
                        "with 'migrlab lab up'") from None
    try:
        if _libc.setns(descriptor, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise HostError(f"cannot enter network namespace {netns!r}: {os.strerror(error)} "
                            "(setns needs root)")
    finally:
        os.close(descriptor)


def call_in_netns(netns: str | None, function: Callable[[], T], timeout: float, description: str) -> T:
    """Call ``function`` in a new thread inside network namespace ``netns`` and return its result.

    With ``netns`` None the thread stays in the caller's namespace, which
    still bounds the call by ``timeout`` seconds. Exceptions of ``function``
    are raised in the caller. A call that times out raises HostError and
    keeps its daemon thread until the call returns.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            if netns is not None:
                _enter(netns)
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name=description, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise HostError(f"{description} timed out after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
