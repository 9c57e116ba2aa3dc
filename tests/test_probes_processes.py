"""The probe processes on loopback: the guest's responder, the client agent and the capture.

The responder is compiled from the guest image's source and listens on
127.0.0.1 only. The capture needs root for its packet sockets and watches
the loopback interface, where every frame has the all-zero MAC address.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.guest import image as image_module
from lab.probes import analysis, capture, protocol
from lab.probes.parse import parse_agent_output, parse_capture_output

ZERO_MAC = "00:00:00:00:00:00"
PROCESS_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def responder_binary(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed; scripts/setup-debian installs it")
    binary = tmp_path_factory.mktemp("responder") / "mlab-responder"
    subprocess.run(["gcc", *image_module.WORKLOAD_CFLAGS, "-o", str(binary), str(image_module.RESPONDER_SOURCE)],
                   check=True, timeout=120)
    return binary


class Responder:
    def __init__(self, binary: Path):
        self.process = subprocess.Popen([str(binary), "--bind=127.0.0.1", "--udp-port=0", "--tcp-port=0"],
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("mlab-responder: listening"), line
        fields = dict(part.split("=") for part in line.split()[2:])
        self.udp_port = int(fields["udp"])
        self.tcp_port = int(fields["tcp"])

    def stop(self):
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        self.process.wait(timeout=PROCESS_TIMEOUT_S)
        self.process.stdout.close()


@pytest.fixture
def responder(responder_binary):
    running = Responder(responder_binary)
    yield running
    running.stop()


def start_module(module: str, arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *arguments], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_module(process: subprocess.Popen) -> int:
    process.stdin.write("stop\n")
    process.stdin.close()
    status = process.wait(timeout=PROCESS_TIMEOUT_S)
    process.stderr.close()
    return status


def run_agent(tmp_path, port_udp, port_tcp, seconds, *, during=None, extra=()):
    output = tmp_path / "agent.txt"
    agent = start_module("lab.probes.agent", [
        "--target", "127.0.0.1", "--echo-port", str(port_udp), "--stream-port", str(port_tcp),
        "--echo-rate-hz", "500", "--stream-rate-kib-s", "32", "--drain-s", "0.3", "--output", str(output),
        *extra])
    time.sleep(seconds / 2)
    if during is not None:
        during()
    time.sleep(seconds / 2)
    assert stop_module(agent) == 0
    return parse_agent_output(output.read_text())


# -- protocol ----------------------------------------------------------------------------

def test_echo_request_and_reply_formats():
    request = protocol.pack_echo_request(7, 123)
    assert len(request) == protocol.ECHO_REQUEST_BYTES
    reply = protocol.unpack_echo_reply(request + struct.pack(">Q", 456))
    assert reply == protocol.EchoReply(seq=7, client_ns=123, guest_ns=456)
    assert protocol.unpack_echo_reply(request) is None
    assert protocol.unpack_echo_reply(b"XXXX" + request[4:] + bytes(8)) is None


def test_stream_records_carry_checked_sequence():
    record = protocol.pack_stream_record(41, 99)
    assert len(record) == protocol.STREAM_RECORD_BYTES
    assert protocol.unpack_stream_seq(record) == 41
    damaged = record[:-1] + bytes([record[-1] ^ 1])
    assert protocol.unpack_stream_seq(damaged) is None


# -- responder and agent -----------------------------------------------------------------

def test_responder_replies_with_guest_time(responder):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        before = time.monotonic_ns()
        sock.sendto(protocol.pack_echo_request(3, before), ("127.0.0.1", responder.udp_port))
        data = sock.recv(64)
        after = time.monotonic_ns()
    reply = protocol.unpack_echo_reply(data)
    assert reply.seq == 3
    assert reply.client_ns == before
    # On this machine the responder's CLOCK_MONOTONIC is the test's own.
    assert before <= reply.guest_ns <= after


def test_responder_drops_foreign_datagrams(responder):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(b"hello, is anyone there?.....", ("127.0.0.1", responder.udp_port))
        with pytest.raises(socket.timeout):
            sock.recv(64)


def test_responder_rejects_bad_option(responder_binary):
    result = subprocess.run([str(responder_binary), "--udp-port=99999"], capture_output=True, text=True,
                            timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 2
    assert "invalid --udp-port" in result.stdout


def test_agent_measures_clean_loopback(responder, tmp_path):
    agent = run_agent(tmp_path, responder.udp_port, responder.tcp_port, 1.0)
    echo = agent.echo
    assert len(echo) >= 100
    # 500 requests per second over the time the agent sent, counting the slots it skipped when late.
    span_s = (echo["sent_ns"].max() - echo["sent_ns"].min()) / 1e9
    expected = 500 * span_s + 1
    assert abs(len(echo) + agent.summary["echo_skipped"] - expected) <= 0.05 * expected + 2
    assert echo["received_ns"].notna().all()
    # The kernel receive time, moved onto CLOCK_MONOTONIC, follows the responder's receive time.
    assert (echo["sent_ns"] <= echo["guest_ns"]).all()
    assert (echo["guest_ns"] <= echo["received_ns"]).all()
    figures = analysis.stream_figures(agent, int(echo["sent_ns"].min()))
    assert figures.survived
    assert figures.intact
    assert figures.sent_bytes > 16 * 1024
    assert agent.summary["stream_unechoed_bytes"] == 0


def test_agent_sees_a_paused_responder(responder, tmp_path):
    def pause():
        responder.process.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        responder.process.send_signal(signal.SIGCONT)

    agent = run_agent(tmp_path, responder.udp_port, responder.tcp_port, 1.6, during=pause)
    t0 = int(agent.echo["sent_ns"].min())
    echo = analysis.echo_figures(agent, t0, transfer_end_s=None)
    # Requests queue in the socket while the responder is stopped, so none is lost,
    # but no reply arrives for the length of the pause.
    assert 290 <= echo.client_downtime_ms <= 800
    assert echo.lost_requests == 0
    stream = analysis.stream_figures(agent, t0)
    assert stream.survived
    assert stream.intact
    assert 250 <= stream.max_stall_ms <= 1000


def test_agent_reports_refused_stream(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        free_port = unused.getsockname()[1]
    agent = run_agent(tmp_path, free_port, free_port, 1.6, extra=["--stream-connect-timeout-s", "0.5"])
    stream = analysis.stream_figures(agent, int(agent.echo["sent_ns"].min()))
    assert not stream.connected
    assert not stream.survived
    assert "no connection" in stream.error
    assert agent.echo["received_ns"].isna().all()


def corrupting_echo_server(listener: socket.socket) -> None:
    connection, _ = listener.accept()
    with connection:
        total = 0
        while True:
            data = connection.recv(4096)
            if not data:
                return
            if total <= 100 < total + len(data):
                data = bytearray(data)
                data[100 - total] ^= 0xFF
            total += len(data)
            connection.sendall(bytes(data))


def test_agent_detects_changed_stream_byte(responder, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=corrupting_echo_server, args=(listener,), daemon=True)
        server.start()
        agent = run_agent(tmp_path, responder.udp_port, listener.getsockname()[1], 1.0)
        server.join(timeout=5)
    stream = analysis.stream_figures(agent, int(agent.echo["sent_ns"].min()))
    assert not stream.intact
    assert not stream.survived
    assert "echoed byte 100 differs" in stream.error


def test_agent_rejects_negative_rate(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.probes.agent", "--target", "127.0.0.1", "--output",
                             str(tmp_path / "out.txt"), "--echo-rate-hz", "-1"],
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 2
    assert "rates must be zero (off) or positive" in result.stderr


def test_agent_stops_when_stdin_closes(responder, tmp_path):
    output = tmp_path / "agent.txt"
    agent = start_module("lab.probes.agent", ["--target", "127.0.0.1", "--echo-port", str(responder.udp_port),
                                              "--stream-rate-kib-s", "0", "--drain-s", "0.1",
                                              "--output", str(output)])
    time.sleep(0.5)
    agent.stdin.close()
    assert agent.wait(timeout=PROCESS_TIMEOUT_S) == 0
    agent.stderr.close()
    parsed = parse_agent_output(output.read_text())
    assert parsed.summary is not None
    assert parsed.summary["echo_requests"] == len(parsed.echo)


# -- capture -----------------------------------------------------------------------------

def needs_root():
    if os.geteuid() != 0:
        pytest.skip("packet sockets need root")


def test_mac_filter_on_loopback():
    needs_root()
    zero = capture.parse_mac(ZERO_MAC)
    other = capture.parse_mac("52:54:00:6d:00:64")
    matching = capture.open_port_socket("lo", zero, announcements_only=False)
    foreign = capture.open_port_socket("lo", other, announcements_only=False)
    announcements = capture.open_port_socket("lo", zero, announcements_only=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(protocol.pack_echo_request(42, 1), ("127.0.0.1", 9))
        time.sleep(0.2)
        # Other programs of the machine also send over lo, so their frames may
        # come first. A packet socket on lo receives each frame twice: outgoing and incoming.
        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                data, _ancillary, _flags, _address = matching.recvmsg(256, protocol.ancillary_space())
                frames.append(capture.classify(data, zero, 9, protocol.STREAM_PORT))
        echoes = [frame for frame in frames if frame.kind == "echo"]
        assert echoes, frames
        assert {frame.seq for frame in echoes} == {42}
        for sock in (foreign, announcements):
            with pytest.raises(BlockingIOError):
                sock.recv(256)
    finally:
        for sock in (matching, foreign, announcements):
            sock.close()


def arp_frame(source_mac: bytes, ethertype: int, operation: int) -> bytes:
    sender_ip = socket.inet_aton("10.77.0.100")
    header = b"\xff" * 6 + source_mac + struct.pack(">H", ethertype)
    body = struct.pack(">HHBBH", 1, 0x0800, 6, 4, operation) + source_mac + sender_ip + source_mac + sender_ip
    return header + body


def test_classify_announcements():
    mac = capture.parse_mac("52:54:00:6d:00:64")
    rarp = capture.classify(arp_frame(mac, capture.ETH_P_RARP, 3), mac, 7007, 7008)
    assert (rarp.kind, rarp.direction) == ("rarp", "from-guest")
    assert rarp.detail.startswith("rarp-request sender=52:54:00:6d:00:64/10.77.0.100")
    garp = capture.classify(arp_frame(mac, capture.ETH_P_ARP, 1), mac, 7007, 7008)
    assert garp.kind == "arp"
    assert garp.detail.startswith("request")


def test_classify_frame_to_guest():
    mac = capture.parse_mac("52:54:00:6d:00:64")
    frame = mac + b"\x02" * 6 + struct.pack(">H", 0x86DD) + bytes(40)
    assert capture.classify(frame, mac, 7007, 7008) == capture.Frame("to-guest", "other", -1, "")


def test_parse_mac_rejects_bad_text():
    with pytest.raises(ValueError, match="six hex pairs"):
        capture.parse_mac("52:54:00:6d:00")


def test_segmenter_splits_at_gaps():
    segmenter = capture.Segmenter(gap_ns=20)
    echo = capture.Frame("to-guest", "echo", 0, "")
    closed = []
    for t_ns, seq in ((0, 1), (10, 2), (25, 3), (60, 4)):
        row = segmenter.add("source", "out", capture.Frame(echo.direction, echo.kind, seq, ""), t_ns)
        if row is not None:
            closed.append(row)
    assert closed == [("source", "out", "to-guest", "echo", 0, 25, 3, 1, 3)]
    assert segmenter.close_all() == [("source", "out", "to-guest", "echo", 60, 60, 1, 4, 4)]


def test_capture_process_on_loopback(responder, tmp_path):
    needs_root()
    output = tmp_path / "capture.txt"
    process = start_module("lab.probes.capture", ["--mac", ZERO_MAC, "--port", "loop=lo",
                                                  "--echo-port", str(responder.udp_port), "--output", str(output)])
    time.sleep(1.0)
    run_agent(tmp_path, responder.udp_port, responder.tcp_port, 0.6)
    assert stop_module(process) == 0
    parsed = parse_capture_output(output.read_text())
    assert parsed.summary["frames"] > 200
    echo = parsed.segments[parsed.segments["kind"] == "echo"]
    assert echo["frames"].sum() > 200
    # On loopback every frame leaves through lo and comes back in.
    assert set(echo["way"]) == {"in", "out"}
    assert echo["first_seq"].min() == 0
    assert parsed.ports == {"loop": "lo"}


def test_capture_rejects_bad_port_option(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.probes.capture", "--mac", ZERO_MAC, "--output",
                             str(tmp_path / "out.txt"), "--port", "veth-h1"],
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 2
    assert "expected LABEL=INTERFACE" in result.stderr
