"""QMP connections that the harness opens itself, to a QEMU's own socket."""

from __future__ import annotations

import logging

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

log = logging.getLogger(__name__)

# What a QMP call raises when QEMU answers with an error, closes the socket or
# has gone away; qemu.qmp raises a bare EOFError when the peer hung up first.
FAILURES = (QMPError, OSError, EOFError)


def close_quietly(client: QEMUMonitorProtocol, what: str) -> None:
    """Close *client*, logging instead of raising when QEMU has already gone."""
    try:
        client.close()
    except FAILURES as exc:
        log.debug("closing %s failed: %s", what, exc)
