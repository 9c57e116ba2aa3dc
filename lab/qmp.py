"""QMP connections that the harness opens itself, to a QEMU's own socket."""

from __future__ import annotations

import logging

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

log = logging.getLogger(__name__)

# Exceptions of a QMP call when QEMU returns an error, closes the socket or has
# exited. qemu.qmp raises a bare EOFError when QEMU closed the socket first.
FAILURES = (QMPError, OSError, EOFError)


def close_quietly(client: QEMUMonitorProtocol, description: str) -> None:
    """Close *client*, and log instead of raising when QEMU has already exited."""
    try:
        client.close()
    except FAILURES as exc:
        log.debug("closing %s failed: %s", description, exc)
