"""The capture process: frames of the guest's MAC address on the ports of the lab's switch.

ProbeSession starts it inside the switch's network namespace::

    python -m lab.probes.capture --mac 52:54:00:6d:00:64 --output FILE \\
        --port source=veth-h1 --port destination=veth-h2 --announce-port client=veth-client

A ``--port`` socket receives every frame from or to the guest's MAC address
that crosses that switch port, in both directions. An ``--announce-port``
socket receives only ARP and RARP frames from the guest's MAC address, which
shows when the destination's announcements reached that port. A classic BPF
filter in the kernel drops every other frame, so the migration stream that
crosses the same ports costs nothing here.

Output lines (times are CLOCK_MONOTONIC ns, converted from the kernel's
receive timestamp of each frame):

    H <json>                          settings and start time
    F <t_ns> <port> <way> <direction> <kind> <detail>
                                      one ARP or RARP frame; detail is the
                                      ARP operation and addresses
    G <port> <way> <direction> <kind> <first_ns> <last_ns> <frames> <first_seq> <last_seq>
                                      a segment of other frames of one kind
                                      (echo, stream, ip, other), closed after
                                      a gap longer than --segment-gap-ms;
                                      seq is the echo sequence number or -1
    Z <json>                          summary at exit

``way`` is "in" for a frame that entered the switch through the port and
"out" for one the switch sent out of it. So a broadcast from the guest
shows as "in" on the port of the host that runs the guest and as "out" on
every other port. ``direction`` is from-guest when the guest's MAC address
is the source, else to-guest.

It stops when a line ``stop`` arrives on standard input, when standard input
closes, on SIGTERM or SIGINT, or after ``--max-duration-s``. The file is
flushed at least every 100 ms.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from lab.probes import protocol

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
SO_ATTACH_FILTER = 26
FLUSH_INTERVAL_NS = 100_000_000
# Bytes of each frame the kernel copies: enough for the Ethernet, IPv4 and
# UDP headers and the echo sequence number.
SNAP_BYTES = 128
RECEIVE_BUFFER_BYTES = 4 << 20

# Classic BPF opcodes from <linux/filter.h>.
_BPF_LD_W_ABS = 0x20
_BPF_LD_H_ABS = 0x28
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SOCK_FILTER = struct.Struct("HBBI")


def parse_mac(text: str) -> bytes:
    """Return the 6 bytes of a MAC address written as six colon-separated hex pairs."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(part) == 2 for part in parts):
        raise ValueError(f"invalid MAC address {text!r}: expected six hex pairs such as 52:54:00:6d:00:64")
    return bytes(int(part, 16) for part in parts)


def format_mac(data: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in data)


# A program is a list of (opcode, true-target, false-target, constant), where
# targets are labels. Every program ends with the two return instructions
# "accept" and "drop".
_Instruction = tuple[int, str | None, str | None, int]


def _assemble(program: list[tuple[str | None, _Instruction]]) -> list[tuple[int, int, int, int]]:
    """Resolve the labels of a BPF program into the relative jump offsets the kernel expects."""
    full = [*program, ("accept", (_BPF_RET_K, None, None, SNAP_BYTES)), ("drop", (_BPF_RET_K, None, None, 0))]
    positions = {label: index for index, (label, _) in enumerate(full) if label is not None}
    assembled = []
    for index, (_label, (code, true_label, false_label, constant)) in enumerate(full):
        true_offset = positions[true_label] - index - 1 if true_label else 0
        false_offset = positions[false_label] - index - 1 if false_label else 0
        if not (0 <= true_offset < 256 and 0 <= false_offset < 256):
            raise ValueError(f"BPF jump out of range at instruction {index}")
        assembled.append((code, true_offset, false_offset, constant))
    return assembled


def mac_filter(mac: bytes, *, announcements_only: bool) -> list[tuple[int, int, int, int]]:
    """Build a BPF program that accepts frames from or to ``mac``.

    With ``announcements_only`` it accepts only ARP and RARP frames whose
    source is ``mac``.
    """
    high, low = struct.unpack(">IH", mac)
    source_check: list[tuple[str | None, _Instruction]] = [
        ("source", (_BPF_LD_W_ABS, None, None, 6)),
        (None, (_BPF_JEQ_K, "source_low", "drop", high)),
        ("source_low", (_BPF_LD_H_ABS, None, None, 10)),
    ]
    if announcements_only:
        return _assemble([
            *source_check,
            (None, (_BPF_JEQ_K, "ethertype", "drop", low)),
            ("ethertype", (_BPF_LD_H_ABS, None, None, 12)),
            (None, (_BPF_JEQ_K, "accept", "rarp", ETH_P_ARP)),
            ("rarp", (_BPF_JEQ_K, "accept", "drop", ETH_P_RARP)),
        ])
    return _assemble([
        (None, (_BPF_LD_W_ABS, None, None, 0)),
        (None, (_BPF_JEQ_K, "destination_low", "source", high)),
        ("destination_low", (_BPF_LD_H_ABS, None, None, 4)),
        (None, (_BPF_JEQ_K, "accept", "source", low)),
        *source_check,
        (None, (_BPF_JEQ_K, "accept", "drop", low)),
    ])


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF program to a socket with SO_ATTACH_FILTER."""
    code = b"".join(_SOCK_FILTER.pack(*instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }; the
    # kernel copies the program during setsockopt, so the buffer may go afterwards.
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


@dataclass(frozen=True)
class Frame:
    """The fields the capture keeps of one frame."""

    direction: str  # from-guest or to-guest
    kind: str  # rarp, arp, echo, stream, ip or other
    seq: int  # echo sequence number, or -1
    detail: str  # ARP operation and addresses, or ""


def classify(frame: bytes, mac: bytes, echo_port: int, stream_port: int) -> Frame:
    """Sort a captured frame into a kind and read its echo sequence number if it has one."""
    direction = "from-guest" if frame[6:12] == mac else "to-guest"
    if len(frame) < 14:
        return Frame(direction, "other", -1, "")
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    if ethertype in (ETH_P_ARP, ETH_P_RARP):
        return Frame(direction, "rarp" if ethertype == ETH_P_RARP else "arp", -1, _arp_detail(frame))
    if ethertype != ETH_P_IP or len(frame) < 34:
        return Frame(direction, "other", -1, "")
    header_bytes = (frame[14] & 0x0F) * 4
    protocol_number = frame[23]
    transport = 14 + header_bytes
    if len(frame) < transport + 4:
        return Frame(direction, "ip", -1, "")
    source_port, destination_port = struct.unpack_from(">HH", frame, transport)
    ports = (source_port, destination_port)
    if protocol_number == socket.IPPROTO_UDP and echo_port in ports:
        payload = transport + 8
        seq = -1
        if len(frame) >= payload + 16 and frame[payload:payload + 4] == protocol.ECHO_MAGIC:
            seq = struct.unpack_from(">Q", frame, payload + 8)[0]
        return Frame(direction, "echo", seq, "")
    if protocol_number == socket.IPPROTO_TCP and stream_port in ports:
        return Frame(direction, "stream", -1, "")
    return Frame(direction, "ip", -1, "")


_ARP_OPERATIONS = {1: "request", 2: "reply", 3: "rarp-request", 4: "rarp-reply"}


def _arp_detail(frame: bytes) -> str:
    if len(frame) < 42:
        return "truncated"
    operation = struct.unpack_from(">H", frame, 20)[0]
    sender_ip = socket.inet_ntoa(frame[28:32])
    target_ip = socket.inet_ntoa(frame[38:42])
    name = _ARP_OPERATIONS.get(operation, f"op{operation}")
    return f"{name} sender={format_mac(frame[22:28])}/{sender_ip} target={format_mac(frame[32:38])}/{target_ip}"


@dataclass
class _Segment:
    first_ns: int
    last_ns: int
    frames: int
    first_seq: int
    last_seq: int


class Segmenter:
    """Group frames of one (port, way, direction, kind) into segments separated by gaps.

    add() returns the segment that a gap closed, if any, and close_all()
    returns those still open. Each is a tuple (port, way, direction, kind,
    first_ns, last_ns, frames, first_seq, last_seq).
    """

    def __init__(self, gap_ns: int):
        self.gap_ns = gap_ns
        self._open: dict[tuple[str, str, str, str], _Segment] = {}

    def add(self, port: str, way: str, frame: Frame, t_ns: int) -> tuple | None:
        key = (port, way, frame.direction, frame.kind)
        segment = self._open.get(key)
        closed = None
        if segment is not None and t_ns - segment.last_ns > self.gap_ns:
            closed = self._row(key, segment)
            segment = None
        if segment is None:
            self._open[key] = _Segment(t_ns, t_ns, 1, frame.seq, frame.seq)
        else:
            segment.last_ns = max(segment.last_ns, t_ns)
            segment.frames += 1
            if frame.seq >= 0:
                segment.last_seq = frame.seq
                if segment.first_seq < 0:
                    segment.first_seq = frame.seq
        return closed

    def close_all(self) -> list[tuple]:
        rows = [self._row(key, segment) for key, segment in self._open.items()]
        self._open.clear()
        return sorted(rows, key=lambda row: row[4])

    @staticmethod
    def _row(key: tuple[str, str, str, str], segment: _Segment) -> tuple:
        return (*key, segment.first_ns, segment.last_ns, segment.frames, segment.first_seq, segment.last_seq)


@dataclass
class CaptureSettings:
    mac: str
    output: str
    ports: dict[str, str]
    announce_ports: dict[str, str]
    echo_port: int = protocol.ECHO_PORT
    stream_port: int = protocol.STREAM_PORT
    segment_gap_ms: float = 20.0
    max_duration_s: float = 3600.0


def open_port_socket(interface: str, mac: bytes, *, announcements_only: bool) -> socket.socket:
    """Open a packet socket on ``interface`` that receives the guest's frames, non-blocking."""
    # Protocol 0 receives nothing until bind(), so no frame arrives before the filter is in place.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        attach_filter(sock, mac_filter(mac, announcements_only=announcements_only))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        protocol.enable_kernel_timestamps(sock)
        sock.bind((interface, ETH_P_ALL))  # Python converts the protocol to network order
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Capture:
    def __init__(self, settings: CaptureSettings, output: TextIO):
        self.settings = settings
        self.output = output
        self.mac = parse_mac(settings.mac)
        self.selector = selectors.SelectSelector()
        self.segmenter = Segmenter(int(settings.segment_gap_ms * 1e6))
        self.stop_requested = False
        self.frames = 0
        self.sockets: list[socket.socket] = []

    def _write_segment(self, row: tuple) -> None:
        self.output.write("G " + " ".join(str(value) for value in row) + "\n")

    def _receive(self, sock: socket.socket, port: str) -> None:
        while True:
            try:
                data, ancillary, _flags, address = sock.recvmsg(SNAP_BYTES, protocol.ancillary_space())
            except BlockingIOError:
                return
            t_ns = protocol.receive_time_ns(ancillary)
            self.frames += 1
            # The address of a packet socket is (interface, protocol, packet type, ARP type, MAC address).
            way = "out" if address[2] == socket.PACKET_OUTGOING else "in"
            frame = classify(data, self.mac, self.settings.echo_port, self.settings.stream_port)
            if frame.kind in ("arp", "rarp"):
                self.output.write(f"F {t_ns} {port} {way} {frame.direction} {frame.kind} {frame.detail}\n")
                continue
            closed = self.segmenter.add(port, way, frame, t_ns)
            if closed is not None:
                self._write_segment(closed)

    def _read_stdin(self, _sock: object, _port: str) -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            self.stop_requested = True
            self.selector.unregister(sys.stdin)

    def run(self) -> int:
        settings = self.settings
        start = time.monotonic_ns()
        for port, interface in settings.ports.items():
            sock = open_port_socket(interface, self.mac, announcements_only=False)
            self.sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, port)
        for port, interface in settings.announce_ports.items():
            sock = open_port_socket(interface, self.mac, announcements_only=True)
            self.sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, port)
        self.output.write("H " + json.dumps({"start_ns": start, **vars(settings)}) + "\n")
        self.output.flush()
        self.selector.register(sys.stdin, selectors.EVENT_READ, None)
        deadline = start + int(settings.max_duration_s * 1e9)
        next_flush = start + FLUSH_INTERVAL_NS
        while not self.stop_requested and time.monotonic_ns() < deadline:
            timeout = max(0.0, (next_flush - time.monotonic_ns()) / 1e9)
            for key, _mask in self.selector.select(timeout):
                if key.data is None:
                    self._read_stdin(key.fileobj, "")
                else:
                    self._receive(key.fileobj, key.data)
            if time.monotonic_ns() >= next_flush:
                self.output.flush()
                next_flush = time.monotonic_ns() + FLUSH_INTERVAL_NS
        for row in self.segmenter.close_all():
            self._write_segment(row)
        self.output.write("Z " + json.dumps({"start_ns": start, "end_ns": time.monotonic_ns(),
                                             "frames": self.frames}) + "\n")
        self.output.flush()
        for sock in self.sockets:
            sock.close()
        return 0


def _label_pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        label, separator, interface = value.partition("=")
        if not separator or not label or not interface or " " in value:
            raise ValueError(f"invalid {option} {value!r}: expected LABEL=INTERFACE, such as source=veth-h1")
        pairs[label] = interface
    return pairs


def parse_arguments(argv: list[str]) -> CaptureSettings:
    parser = argparse.ArgumentParser(prog="python -m lab.probes.capture",
                                     description="Record the guest's frames on switch ports.")
    parser.add_argument("--mac", required=True, help="the guest's MAC address")
    parser.add_argument("--output", required=True, help="file that receives the observations")
    parser.add_argument("--port", action="append", default=[], metavar="LABEL=INTERFACE",
                        help="a port whose guest frames are recorded, in both directions")
    parser.add_argument("--announce-port", action="append", default=[], metavar="LABEL=INTERFACE",
                        help="a port where only the guest's ARP and RARP frames are recorded")
    parser.add_argument("--echo-port", type=int, default=protocol.ECHO_PORT)
    parser.add_argument("--stream-port", type=int, default=protocol.STREAM_PORT)
    parser.add_argument("--segment-gap-ms", type=float, default=20.0,
                        help="a pause longer than this, in ms, starts a new segment")
    parser.add_argument("--max-duration-s", type=float, default=3600.0)
    arguments = parser.parse_args(argv)
    try:
        parse_mac(arguments.mac)
        ports = _label_pairs(arguments.port, "--port")
        announce_ports = _label_pairs(arguments.announce_port, "--announce-port")
    except ValueError as error:
        parser.error(str(error))
    if not ports and not announce_ports:
        parser.error("give at least one --port or --announce-port")
    return CaptureSettings(mac=arguments.mac, output=arguments.output, ports=ports,
                           announce_ports=announce_ports, echo_port=arguments.echo_port,
                           stream_port=arguments.stream_port, segment_gap_ms=arguments.segment_gap_ms,
                           max_duration_s=arguments.max_duration_s)


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(sys.argv[1:] if argv is None else argv)
    return protocol.run_probe_process(settings.output, lambda output: Capture(settings, output))


if __name__ == "__main__":
    sys.exit(main())
