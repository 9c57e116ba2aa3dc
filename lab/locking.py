"""One experiment at a time per lab.

Two experiments on one lab would boot guests with the same address and MAC,
and ``migrlab clean`` would destroy a running experiment's guests. So
``migrlab run`` holds an exclusive lock on the lab for its whole duration,
and ``clean`` and ``lab down`` refuse while it is held. The lock is an flock, which the kernel
releases when the process dies, so a killed harness leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from lab.errors import LabError
from lab.paths import state_dir


def lock_path(prefix: str) -> Path:
    return state_dir() / "locks" / f"{prefix}.lock"


@contextlib.contextmanager
def experiment_lock(prefix: str) -> Iterator[None]:
    """Hold the lab's experiment lock, or raise LabError naming the process that holds it."""
    path = lock_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LabError(f"another experiment runs on lab '{prefix}' (process {holder}); "
                           "wait for it to end or stop it with Ctrl-C") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
