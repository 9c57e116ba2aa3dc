"""libvirt's event loop, run once per process in a daemon thread.

libvirt delivers domain events (lifecycle, migration iteration, job completed)
only to connections opened after an event implementation is registered, so
every connection the harness opens goes through :func:`open_connection`.
"""

from __future__ import annotations

import logging
import threading

import libvirt

from lab.errors import HostError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _run_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and start its thread."""
    global _thread
    with _lock:
        if _thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _thread = threading.Thread(target=_run_loop, name="libvirt-events", daemon=True)
        _thread.start()


def _silence_default_error_handler() -> None:
    # libvirt prints every error to stderr unless a handler is registered; the
    # harness reports errors itself from the raised libvirtError.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def open_connection(uri: str, *, keepalive_s: int = 5) -> libvirt.virConnect:
    """Open a read-write connection with events enabled and keepalive on."""
    ensure_event_loop()
    _silence_default_error_handler()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}. "
                        "Check that the host is up ('migrlab lab status').") from exc
    # Keepalive makes a dead daemon show up as a closed connection instead of a hang.
    conn.setKeepAlive(keepalive_s, 3)
    return conn
