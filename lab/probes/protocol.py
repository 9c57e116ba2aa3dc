"""Wire formats shared by the client probe and the guest's mlab-responder, and kernel receive times.

Echo request (UDP, 24 bytes, big-endian): magic ``MLPE``, format version
(uint32), sequence number (uint64), client send time in ns (uint64). The
reply repeats those 24 bytes and appends the guest's CLOCK_MONOTONIC time
of receipt in ns (uint64). responder.c in lab/guest/responder implements the
guest side; the two must change together.

Stream record (TCP, 32 bytes, big-endian): magic ``MLTS``, format version
(uint32), sequence number (uint64), client time in ns (uint64), and a check
word derived from the sequence number (uint64). The guest echoes the byte
stream unchanged, so the client compares what comes back with what it sent.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO

ECHO_PORT = 7007
STREAM_PORT = 7008
FORMAT_VERSION = 1

# Labels of the switch ports the capture watches: those that lead to the
# migration's source and destination hosts and to the client.
SOURCE_PORT = "source"
DESTINATION_PORT = "destination"
CLIENT_PORT = "client"

ECHO_MAGIC = b"MLPE"
_ECHO_REQUEST = struct.Struct(">4sIQQ")
_ECHO_REPLY = struct.Struct(">4sIQQQ")
ECHO_REQUEST_BYTES = _ECHO_REQUEST.size
ECHO_REPLY_BYTES = _ECHO_REPLY.size

STREAM_MAGIC = b"MLTS"
_STREAM_RECORD = struct.Struct(">4sIQQQ")
STREAM_RECORD_BYTES = _STREAM_RECORD.size

# SO_TIMESTAMPNS from <asm-generic/socket.h>; Python 3.11 does not export it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


@dataclass(frozen=True)
class EchoReply:
    """A parsed echo reply: the request's fields and the guest's receive time."""

    seq: int
    client_ns: int
    guest_ns: int


def pack_echo_request(seq: int, client_ns: int) -> bytes:
    return _ECHO_REQUEST.pack(ECHO_MAGIC, FORMAT_VERSION, seq, client_ns)


def unpack_echo_reply(data: bytes) -> EchoReply | None:
    """Parse an echo reply, or return None for a datagram of another size, magic or version."""
    if len(data) != ECHO_REPLY_BYTES:
        return None
    magic, version, seq, client_ns, guest_ns = _ECHO_REPLY.unpack(data)
    if magic != ECHO_MAGIC or version != FORMAT_VERSION:
        return None
    return EchoReply(seq, client_ns, guest_ns)


def stream_check(seq: int) -> int:
    """Return the check word of stream record ``seq``: a splitmix64 mix of the sequence number."""
    x = (seq + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def pack_stream_record(seq: int, client_ns: int) -> bytes:
    return _STREAM_RECORD.pack(STREAM_MAGIC, FORMAT_VERSION, seq, client_ns, stream_check(seq))


def unpack_stream_seq(record: bytes) -> int | None:
    """Return the sequence number of a 32-byte stream record, or None when its magic or check is wrong."""
    if len(record) != STREAM_RECORD_BYTES:
        return None
    magic, version, seq, _client_ns, check = _STREAM_RECORD.unpack(record)
    if magic != STREAM_MAGIC or version != FORMAT_VERSION or check != stream_check(seq):
        return None
    return seq


def enable_kernel_timestamps(sock: socket.socket) -> None:
    """Ask the kernel to attach its receive time (CLOCK_REALTIME, ns) to every datagram or frame."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def receive_time_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """Return the kernel receive time from recvmsg() ancillary data, on CLOCK_MONOTONIC.

    The kernel stamps with CLOCK_REALTIME. The offset between the two clocks
    is read now, right after the receive, so a step of the wall clock before
    the packet arrived does not shift the result. Without a timestamp in
    ``ancillary`` the current CLOCK_MONOTONIC time is returned.
    """
    realtime_ns = None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            realtime_ns = seconds * 1_000_000_000 + nanoseconds
    if realtime_ns is None:
        return time.monotonic_ns()
    return realtime_ns - realtime_offset_ns()


# Widest bracket of CLOCK_MONOTONIC reads around a CLOCK_REALTIME read that
# realtime_offset_ns() accepts at once; a preemption between the reads widens it.
_MAX_BRACKET_NS = 20_000
_OFFSET_ATTEMPTS = 5


def realtime_offset_ns() -> int:
    """Return CLOCK_REALTIME minus CLOCK_MONOTONIC, read between two monotonic reads.

    The narrowest of up to _OFFSET_ATTEMPTS brackets is used, so the error is
    at most half its width: a few µs unless the process was preempted in
    every attempt.
    """
    best = None
    for _ in range(_OFFSET_ATTEMPTS):
        before = time.monotonic_ns()
        realtime = time.time_ns()
        after = time.monotonic_ns()
        width = after - before
        if best is None or width < best[0]:
            best = (width, realtime - (before + after) // 2)
        if width <= _MAX_BRACKET_NS:
            break
    return best[1]


def ancillary_space() -> int:
    """Return the recvmsg() ancillary buffer size that fits one receive timestamp."""
    return socket.CMSG_SPACE(_TIMESPEC.size)


class ProbeLoop(Protocol):
    """A probe process's main loop: run() returns the exit code once stop_requested is set or it ends."""

    stop_requested: bool

    def run(self) -> int: ...


def run_probe_process(output_path: str, make_loop: Callable[[TextIO], ProbeLoop]) -> int:
    """Run a probe loop that writes to *output_path* until it ends or SIGTERM or SIGINT stops it.

    The output is flushed and fsynced on every exit, so the harness can parse
    what the probe saw even when it stopped the probe early.
    """
    with open(output_path, "w", encoding="ascii", buffering=1 << 16) as output:
        loop = make_loop(output)

        def request_stop(_signum, _frame):
            loop.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        try:
            return loop.run()
        finally:
            output.flush()
            os.fsync(output.fileno())
