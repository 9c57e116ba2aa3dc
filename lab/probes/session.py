"""Starting and stopping the probe processes of one run in the local lab's namespaces.

The probe agent runs in the client host's network namespace and the capture
process in the switch's, each as ``nsenter --net=/run/netns/<name> python -m
...`` in a session of its own, so a Ctrl-C at the terminal reaches only the
harness, which stops them. Both stop by themselves when their standard input
closes, so they do not outlive a harness that was killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lab
from lab.errors import HostError
from lab.hosts import netns
from lab.hosts.local import CLIENT, SWITCH, LocalLab
from lab.playbook import ProbesSection
from lab.probes.parse import AgentOutput, CaptureOutput, parse_agent_output, parse_capture_output
from lab.probes.protocol import CLIENT_PORT, DESTINATION_PORT, SOURCE_PORT

log = logging.getLogger(__name__)

# Time for a probe process to exit after the stop request, on top of its own drain time.
STOP_GRACE_S = 10.0
# Time between SIGTERM and SIGKILL for a probe process that did not stop.
KILL_GRACE_S = 3.0
READY_POLL_S = 0.1


@dataclass(frozen=True)
class ProbePlan:
    """The probes to run and their rates. A rate of 0 turns that probe off."""

    echo_rate_hz: float = 1000.0
    stream_rate_kib_s: float = 64.0
    capture: bool = True
    drain_s: float = 1.0
    stream_drain_s: float = 10.0

    @property
    def any(self) -> bool:
        return self.echo_rate_hz > 0 or self.stream_rate_kib_s > 0 or self.capture

    @classmethod
    def from_section(cls, section: ProbesSection) -> ProbePlan:
        """Build the plan from a playbook's probes section."""
        return cls(echo_rate_hz=section.echo.rate_hz if section.echo.enabled else 0.0,
                   stream_rate_kib_s=section.stream.rate_kib_s if section.stream.enabled else 0.0,
                   capture=section.capture.enabled)


@dataclass
class ProbeOutputs:
    """The parsed output of the probe processes; None for a probe that did not run."""

    agent: AgentOutput | None
    capture: CaptureOutput | None
    problems: list[str]


def switch_port(host: str) -> str:
    """Return the name of the switch's veth port that leads to a lab host."""
    return f"veth-{host}"


class _ProbeProcess:
    """One probe process with its output file; stop() and kill() may be called in any order, repeatedly."""

    def __init__(self, name: str, argv: list[str], output: Path, stderr: Path, stop_timeout_s: float):
        self.name = name
        self.output = output
        self.stop_timeout_s = stop_timeout_s
        self.stderr = stderr
        self._stderr_file = stderr.open("wb")
        package_root = str(Path(lab.__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        log.debug("starting %s: %s", name, argv)
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=self._stderr_file, env=environment, start_new_session=True)
        except OSError as error:
            self._stderr_file.close()
            raise HostError(f"starting the {name} failed: {error}") from error

    def running(self) -> bool:
        return self.process.poll() is None

    def read_output(self) -> str:
        try:
            return self.output.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> str | None:
        """Ask the process to stop and wait for it; return a problem, or None when it exited cleanly."""
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(b"stop\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            status = self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"the {self.name} did not stop within {self.stop_timeout_s:.0f} s and was killed"
        finally:
            self._stderr_file.close()
        if status != 0:
            return f"the {self.name} exited with status {status}: {self.stderr_tail()}"
        return None

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            lines = []
        return lines[-1] if lines else "no message"

    def kill(self) -> None:
        try:
            if self.process.poll() is not None:
                return
            self.process.terminate()
            try:
                self.process.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("the %s (pid %d) ignored SIGTERM; killing it", self.name, self.process.pid)
                self.process.kill()
                self.process.wait(timeout=KILL_GRACE_S)
        finally:
            self._stderr_file.close()


class ProbeSession:
    """The probes of one run: start them, wait until the guest replies, stop them and read their output.

    Use it as a context manager, so the processes and their folder are
    removed on every exit path. The client is ``lab``'s client host; the
    capture watches the switch ports that lead to the source, the
    destination and the client.
    """

    def __init__(self, local_lab: LocalLab, plan: ProbePlan, *, guest_address: str, guest_mac: str,
                 source_host: str, destination_host: str):
        self.lab = local_lab
        self.plan = plan
        self.guest_address = guest_address
        self.guest_mac = guest_mac
        self.source_host = source_host
        self.destination_host = destination_host
        self._folder: Path | None = None
        self._agent: _ProbeProcess | None = None
        self._capture: _ProbeProcess | None = None
        self._outputs: ProbeOutputs | None = None

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the capture first, then the agent, so the capture records the agent's first frames."""
        self._folder = Path(tempfile.mkdtemp(prefix="mlab-probes-"))
        python = [sys.executable, "-m"]
        if self.plan.capture:
            switch = netns.nsenter_argv(net=netns.netns_path(self.lab.netns_name(SWITCH)))
            argv = [*switch, *python, "lab.probes.capture", "--mac", self.guest_mac,
                    "--output", str(self._folder / "capture.txt"),
                    "--port", f"{SOURCE_PORT}={switch_port(self.source_host)}",
                    "--port", f"{DESTINATION_PORT}={switch_port(self.destination_host)}",
                    "--announce-port", f"{CLIENT_PORT}={switch_port(CLIENT)}"]
            self._capture = _ProbeProcess("capture process", argv, self._folder / "capture.txt",
                                          self._folder / "capture.err", STOP_GRACE_S)
        if self.plan.echo_rate_hz > 0 or self.plan.stream_rate_kib_s > 0:
            client = netns.nsenter_argv(net=netns.netns_path(self.lab.host(CLIENT).netns))
            argv = [*client, *python, "lab.probes.agent", "--target", self.guest_address,
                    "--output", str(self._folder / "agent.txt"),
                    "--echo-rate-hz", f"{self.plan.echo_rate_hz:g}",
                    "--stream-rate-kib-s", f"{self.plan.stream_rate_kib_s:g}",
                    "--drain-s", f"{self.plan.drain_s:g}", "--stream-drain-s", f"{self.plan.stream_drain_s:g}"]
            self._agent = _ProbeProcess("probe agent", argv, self._folder / "agent.txt",
                                        self._folder / "agent.err",
                                        self.plan.drain_s + self.plan.stream_drain_s + STOP_GRACE_S)
        log.info("probes started: echo %g Hz, stream %g KiB/s, capture %s", self.plan.echo_rate_hz,
                 self.plan.stream_rate_kib_s, "on" if self.plan.capture else "off")

    def wait_for_replies(self, timeout_s: float) -> str | None:
        """Wait until the guest replies to an echo request and accepted the stream.

        Returns None when it did, or a sentence saying what is missing after
        ``timeout_s``. Returns None at once when no agent runs.
        """
        if self._agent is None:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            if self._capture is not None and not self._capture.running():
                return "the capture process exited: " + self._capture.stderr_tail()
            text = self._agent.read_output()
            echo_ready = self.plan.echo_rate_hz <= 0 or "\nR " in text
            stream_ready = self.plan.stream_rate_kib_s <= 0 or " stream-connected " in text
            if echo_ready and stream_ready:
                return None
            if not self._agent.running():
                return "the probe agent exited before the guest replied: " + self._agent.stderr_tail()
            if " stream-error " in text:
                return "the probe's stream connection to the guest failed before the migration"
            if time.monotonic() >= deadline:
                missing = [name for name, ready in (("an echo reply", echo_ready),
                                                    ("the stream connection", stream_ready)) if not ready]
                return (f"the guest at {self.guest_address} gave no {' and no '.join(missing)} "
                        f"within {timeout_s:.0f} s")
            time.sleep(READY_POLL_S)

    def stop(self) -> ProbeOutputs:
        """Stop the probes and return their parsed output; calling it again returns the same result."""
        if self._outputs is not None:
            return self._outputs
        problems = []
        agent = capture = None
        # The agent stops first, so the capture still records the frames of its last requests.
        if self._agent is not None:
            problem = self._agent.stop()
            if problem:
                problems.append(problem)
            agent = parse_agent_output(self._agent.read_output())
        if self._capture is not None:
            problem = self._capture.stop()
            if problem:
                problems.append(problem)
            capture = parse_capture_output(self._capture.read_output())
        for problem in problems:
            log.warning("probes: %s", problem)
        self._outputs = ProbeOutputs(agent=agent, capture=capture, problems=problems)
        return self._outputs

    def close(self) -> None:
        """Kill any probe process still running and remove the output folder; safe to call twice."""
        for process in (self._agent, self._capture):
            if process is not None:
                try:
                    process.kill()
                except (OSError, subprocess.TimeoutExpired) as error:
                    log.error("could not stop the %s (pid %d): %s", process.name, process.process.pid, error)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
