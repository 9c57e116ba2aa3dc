"""The client probe process: echo requests at a fixed rate and an echoed TCP stream to the guest.

ProbeSession starts it inside the lab's client network namespace::

    python -m lab.probes.agent --target 10.77.0.100 --output FILE \\
        [--echo-rate-hz 1000] [--stream-rate-kib-s 64]

It stops sending when a line ``stop`` arrives on standard input, when
standard input closes, on SIGTERM or SIGINT, or after ``--max-duration-s``.
Then it waits ``--drain-s`` for late echo replies and up to
``--stream-drain-s`` until the guest has echoed every stream byte, writes a
summary line and exits with status 0.

Output lines (times are CLOCK_MONOTONIC ns of this machine; kernel receive
times where the kernel provides them):

    H <json>                       settings and start time
    S <seq> <sent_ns>              echo request sent
    R <seq> <received_ns> <guest_ns>   echo reply received
    W <t_ns> <bytes>               stream bytes handed to the socket so far
    A <t_ns> <bytes>               stream bytes echoed back and verified so far
    X <t_ns> <kind> <message>      an event: stream-connected, stream-error,
                                   stream-mismatch, echo-error, echo-skipped
    Z <json>                       summary at exit

The file is flushed at least every FLUSH_INTERVAL_NS, so an agent that is
killed loses at most that much output, and nothing sits in a stdio buffer
when it exits normally.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from lab.probes import protocol

FLUSH_INTERVAL_NS = 100_000_000
STREAM_TICK_NS = 10_000_000
# Bytes generated for the stream but not yet taken by the socket. Above it the
# agent generates nothing, so a stalled connection does not queue data without bound.
MAX_STREAM_OUTBOX_BYTES = 65536
STREAM_CONNECT_RETRY_NS = 500_000_000
# A send more than this late counts as skipped instead of being sent in a burst.
MAX_SEND_LAG_NS = 50_000_000
# _count_error() writes an echo error of one kind at most once per this interval, with the count so far.
ERROR_REPORT_INTERVAL_NS = 1_000_000_000


@dataclass
class AgentSettings:
    target: str
    output: str
    echo_port: int = protocol.ECHO_PORT
    echo_rate_hz: float = 1000.0
    stream_port: int = protocol.STREAM_PORT
    stream_rate_kib_s: float = 64.0
    stream_connect_timeout_s: float = 30.0
    drain_s: float = 1.0
    stream_drain_s: float = 10.0
    max_duration_s: float = 3600.0


@dataclass
class _Stream:
    """State of the echoed TCP stream."""

    sock: socket.socket | None = None
    connected: bool = False
    failed: str | None = None
    next_connect_ns: int = 0
    started_ns: int = 0
    records: int = 0
    outbox: bytearray = field(default_factory=bytearray)
    unverified: bytearray = field(default_factory=bytearray)
    sent_bytes: int = 0
    echoed_bytes: int = 0


class Agent:
    """One probe run: owns its sockets and output file until run() returns."""

    def __init__(self, settings: AgentSettings, output: TextIO):
        self.settings = settings
        self.output = output
        self.selector = selectors.SelectSelector()  # select() waits with µs resolution, epoll with ms
        self.stop_requested = False
        self.echo: socket.socket | None = None
        self.stream = _Stream()
        self.seq = 0
        self.replies = 0
        self.skipped = 0
        self.error_counts: dict[str, int] = {}
        self._error_reported_ns: dict[str, int] = {}
        self._next_flush_ns = 0

    # -- output ------------------------------------------------------------

    def _write(self, line: str) -> None:
        self.output.write(line + "\n")

    def _event(self, kind: str, message: str) -> None:
        self._write(f"X {time.monotonic_ns()} {kind} {message}")

    def _flush_if_due(self, now: int) -> None:
        if now >= self._next_flush_ns:
            self.output.flush()
            self._next_flush_ns = now + FLUSH_INTERVAL_NS

    def _count_error(self, kind: str, error: OSError) -> None:
        self.error_counts[kind] = self.error_counts.get(kind, 0) + 1
        now = time.monotonic_ns()
        if now - self._error_reported_ns.get(kind, -ERROR_REPORT_INTERVAL_NS) >= ERROR_REPORT_INTERVAL_NS:
            self._error_reported_ns[kind] = now
            self._event(kind, f"{error.strerror or error} (errors of this kind so far: "
                              f"{self.error_counts[kind]})")

    # -- setup -------------------------------------------------------------

    def _open_echo(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        protocol.enable_kernel_timestamps(sock)
        sock.connect((self.settings.target, self.settings.echo_port))
        self.echo = sock
        self.selector.register(sock, selectors.EVENT_READ, self._receive_echo)

    def _connect_stream(self, now: int) -> None:
        stream = self.stream
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((self.settings.target, self.settings.stream_port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            stream.next_connect_ns = now + STREAM_CONNECT_RETRY_NS
            return
        stream.sock = sock
        self.selector.register(sock, selectors.EVENT_WRITE, self._stream_connecting)

    def _stream_connecting(self, _mask: int) -> None:
        stream = self.stream
        sock = stream.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.selector.unregister(sock)
        now = time.monotonic_ns()
        if code != 0:
            sock.close()
            stream.sock = None
            stream.next_connect_ns = now + STREAM_CONNECT_RETRY_NS
            return
        stream.connected = True
        stream.started_ns = now
        self.selector.register(sock, selectors.EVENT_READ, self._stream_ready)
        self._event("stream-connected", f"{self.settings.target}:{self.settings.stream_port}")

    # -- echo --------------------------------------------------------------

    def _send_echo(self, now: int) -> None:
        assert self.echo is not None
        try:
            self.echo.send(protocol.pack_echo_request(self.seq, now))
        except OSError as error:
            self._count_error("echo-error", error)
            return
        self._write(f"S {self.seq} {now}")
        self.seq += 1

    def _receive_echo(self, _mask: int) -> None:
        assert self.echo is not None
        while True:
            try:
                data, ancillary, _flags, _address = self.echo.recvmsg(64, protocol.ancillary_space())
            except BlockingIOError:
                return
            except OSError as error:
                # An ICMP error reported on the connected socket, such as "connection refused".
                self._count_error("echo-error", error)
                continue
            received_ns = protocol.receive_time_ns(ancillary)
            reply = protocol.unpack_echo_reply(data)
            if reply is None:
                continue
            self.replies += 1
            self._write(f"R {reply.seq} {received_ns} {reply.guest_ns}")

    # -- stream ------------------------------------------------------------

    def _stream_fail(self, message: str, kind: str = "stream-error") -> None:
        stream = self.stream
        if stream.failed is None:
            stream.failed = message
            self._event(kind, message)
        if stream.sock is not None:
            try:
                self.selector.unregister(stream.sock)
            except (KeyError, ValueError):
                pass
            stream.sock.close()
            stream.sock = None

    def _generate_stream(self, now: int, sending: bool) -> None:
        stream = self.stream
        if not sending or not stream.connected or stream.failed:
            return
        rate_bytes_s = self.settings.stream_rate_kib_s * 1024.0
        due = int(rate_bytes_s * (now - stream.started_ns) / 1e9) // protocol.STREAM_RECORD_BYTES
        while stream.records < due and len(stream.outbox) < MAX_STREAM_OUTBOX_BYTES:
            stream.outbox += protocol.pack_stream_record(stream.records, now)
            stream.records += 1
        # Records that did not fit are not made up later: the stream's rate drops while it is stalled.
        stream.records = max(stream.records, due)
        self._send_stream()

    def _send_stream(self) -> None:
        stream = self.stream
        if stream.sock is None or not stream.outbox:
            self._watch_stream(writable=False)
            return
        try:
            sent = stream.sock.send(stream.outbox)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._stream_fail(f"send failed: {error.strerror or error}")
            return
        if sent:
            stream.unverified += stream.outbox[:sent]
            del stream.outbox[:sent]
            stream.sent_bytes += sent
            self._write(f"W {time.monotonic_ns()} {stream.sent_bytes}")
        self._watch_stream(writable=bool(stream.outbox))

    def _watch_stream(self, writable: bool) -> None:
        sock = self.stream.sock
        if sock is None or not self.stream.connected:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        if self.selector.get_key(sock).events != events:
            self.selector.modify(sock, events, self._stream_ready)

    def _stream_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._receive_stream()
        if mask & selectors.EVENT_WRITE and self.stream.sock is not None:
            self._send_stream()

    def _receive_stream(self) -> None:
        stream = self.stream
        assert stream.sock is not None
        try:
            data = stream.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            self._stream_fail(f"receive failed: {error.strerror or error}")
            return
        now = time.monotonic_ns()
        if not data:
            self._stream_fail("the guest closed the connection")
            return
        expected = bytes(stream.unverified[:len(data)])
        if data != expected:
            index = next((i for i, (a, b) in enumerate(zip(data, expected)) if a != b), len(expected))
            offset = stream.echoed_bytes + index
            self._stream_fail(f"echoed byte {offset} differs from the byte sent (record "
                              f"{offset // protocol.STREAM_RECORD_BYTES})", kind="stream-mismatch")
            return
        del stream.unverified[:len(data)]
        stream.echoed_bytes += len(data)
        self._write(f"A {now} {stream.echoed_bytes}")

    # -- main loop ---------------------------------------------------------

    def _read_stdin(self, _mask: int) -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            self.stop_requested = True
            self.selector.unregister(sys.stdin)

    def run(self) -> int:
        settings = self.settings
        start = time.monotonic_ns()
        self._write("H " + json.dumps({"version": protocol.FORMAT_VERSION, "start_ns": start,
                                       **vars(settings)}))
        self.output.flush()
        self.selector.register(sys.stdin, selectors.EVENT_READ, self._read_stdin)
        echo_interval = int(1e9 / settings.echo_rate_hz) if settings.echo_rate_hz > 0 else 0
        if echo_interval:
            self._open_echo()
        stream_enabled = settings.stream_rate_kib_s > 0
        stream_deadline = start + int(settings.stream_connect_timeout_s * 1e9)
        next_echo = start
        next_stream_tick = start
        deadline = start + int(settings.max_duration_s * 1e9)
        stop_at: int | None = None

        while True:
            now = time.monotonic_ns()
            if stop_at is None and (self.stop_requested or now >= deadline):
                stop_at = now
            sending = stop_at is None
            if stop_at is not None and self._drained(now, stop_at):
                break

            if sending and echo_interval and now >= next_echo:
                if now - next_echo > MAX_SEND_LAG_NS:
                    missed = (now - next_echo) // echo_interval
                    self.skipped += missed
                    self._event("echo-skipped", f"{missed} requests not sent: the agent was "
                                                f"{(now - next_echo) / 1e6:.1f} ms late")
                    next_echo = now
                self._send_echo(now)
                next_echo += echo_interval
            stream = self.stream
            if stream_enabled and stream.sock is None and not stream.connected and not stream.failed:
                if now >= stream_deadline:
                    self._stream_fail(f"no connection to {settings.target}:{settings.stream_port} "
                                      f"within {settings.stream_connect_timeout_s:g} s")
                elif sending and now >= stream.next_connect_ns:
                    self._connect_stream(now)
            if now >= next_stream_tick:
                self._generate_stream(now, sending)
                next_stream_tick += STREAM_TICK_NS
                if next_stream_tick < now:
                    next_stream_tick = now + STREAM_TICK_NS
            self._flush_if_due(now)

            wake = min(next_stream_tick, self._next_flush_ns)
            if sending and echo_interval:
                wake = min(wake, next_echo)
            timeout = max(0.0, (wake - time.monotonic_ns()) / 1e9)
            for key, mask in self.selector.select(timeout):
                key.data(mask)

        self._finish(start, stop_at or time.monotonic_ns())
        return 0

    def _drained(self, now: int, stop_at: int) -> bool:
        if now - stop_at < self.settings.drain_s * 1e9:
            return False
        stream = self.stream
        waiting_for_stream = (stream.connected and not stream.failed
                              and (stream.unverified or stream.outbox))
        return not waiting_for_stream or now - stop_at >= self.settings.stream_drain_s * 1e9

    def _finish(self, start: int, stop_at: int) -> None:
        stream = self.stream
        summary = {
            "start_ns": start,
            "stop_ns": stop_at,
            "end_ns": time.monotonic_ns(),
            "echo_requests": self.seq,
            "echo_replies": self.replies,
            "echo_skipped": self.skipped,
            "errors": self.error_counts,
            "stream_connected": stream.connected,
            "stream_error": stream.failed,
            "stream_sent_bytes": stream.sent_bytes,
            "stream_echoed_bytes": stream.echoed_bytes,
            "stream_unechoed_bytes": len(stream.unverified) + len(stream.outbox),
        }
        self._write("Z " + json.dumps(summary))
        self.output.flush()
        for sock in (self.echo, stream.sock):
            if sock is not None:
                sock.close()


def parse_arguments(argv: list[str]) -> AgentSettings:
    parser = argparse.ArgumentParser(prog="python -m lab.probes.agent",
                                     description="Probe a guest with echo requests and an echoed TCP stream.")
    parser.add_argument("--target", required=True, help="IPv4 address of the guest")
    parser.add_argument("--output", required=True, help="file that receives the observations")
    parser.add_argument("--echo-port", type=int, default=protocol.ECHO_PORT)
    parser.add_argument("--echo-rate-hz", type=float, default=1000.0,
                        help="echo requests per second; 0 turns the echo probe off")
    parser.add_argument("--stream-port", type=int, default=protocol.STREAM_PORT)
    parser.add_argument("--stream-rate-kib-s", type=float, default=64.0,
                        help="stream rate in KiB/s; 0 turns the stream off")
    parser.add_argument("--stream-connect-timeout-s", type=float, default=30.0)
    parser.add_argument("--drain-s", type=float, default=1.0,
                        help="time to wait for late echo replies after the stop, in seconds")
    parser.add_argument("--stream-drain-s", type=float, default=10.0,
                        help="maximum time to wait until the guest echoed every stream byte, in seconds")
    parser.add_argument("--max-duration-s", type=float, default=3600.0,
                        help="stop by itself after this many seconds")
    arguments = parser.parse_args(argv)
    if arguments.echo_rate_hz < 0 or arguments.stream_rate_kib_s < 0:
        parser.error("rates must be zero (off) or positive")
    return AgentSettings(**vars(arguments))


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(sys.argv[1:] if argv is None else argv)
    return protocol.run_probe_process(settings.output, lambda output: Agent(settings, output))


if __name__ == "__main__":
    sys.exit(main())
