"""Running commands and reading files on a host, over SSH or in a local lab host's namespaces.

Preflight checks, image push, link shaping and host-side figures use only
the ``Shell`` interface, so they run unchanged on real servers (``RemoteHost``
in lab.hosts.remote) and on the local lab's fast path (``NamespaceShell``).
A command is always an argument vector; an SSH shell quotes each argument
with shlex before the remote shell parses the line.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lab.errors import HostError
from lab.hosts.system import format_argv, run, tail

if TYPE_CHECKING:
    from lab.hosts.local import LocalLab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    """Exit status and text output of a command on a host."""

    returncode: int
    stdout: str
    stderr: str


class LineStream(Protocol):
    """Output lines of a long-running command, read in a background thread."""

    def lines(self) -> list[str]: ...

    def close(self) -> None: ...


class Shell(Protocol):
    """A host on which the harness runs commands and reads files."""

    name: str

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> CommandResult: ...

    def read_bytes(self, path: str) -> bytes | None: ...

    def remove(self, path: str) -> None: ...

    def stream(self, argv: Sequence[str]) -> LineStream: ...


def failure_message(host: str, argv: Sequence[str], result: CommandResult) -> str:
    return (f"command {format_argv(list(argv))} on host {host} failed with exit status {result.returncode}: "
            f"{tail(result.stderr or result.stdout)}")


class LineCollector:
    """Collect the lines of a binary stream in a daemon thread until it ends."""

    def __init__(self, stream, description: str):
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name=description, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in iter(self._stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                with self._lock:
                    self._lines.append(line)
        except (OSError, ValueError) as error:
            # The stream was closed under the reader, which is how it is stopped.
            log.debug("line reader stopped: %s", error)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _ProcessStream:
    """A local process whose output lines are collected until close()."""

    def __init__(self, argv: list[str], description: str):
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
        self._collector = LineCollector(self._process.stdout, description)

    def lines(self) -> list[str]:
        return self._collector.lines()

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._collector.join(5)
        if self._process.stdout is not None:
            self._process.stdout.close()


class NamespaceShell:
    """A host of the local lab reached through nsenter, the fast path without SSH."""

    def __init__(self, lab: LocalLab, host: str):
        self.lab = lab
        self.name = host

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> CommandResult:
        result = self.lab.exec(self.name, list(argv), timeout, check=False)
        outcome = CommandResult(result.returncode, result.stdout, result.stderr)
        if check and outcome.returncode != 0:
            raise HostError(failure_message(self.name, argv, outcome))
        return outcome

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return self.lab.outside_path(self.name, path).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, path: str) -> None:
        self.lab.outside_path(self.name, path).unlink(missing_ok=True)

    def stream(self, argv: Sequence[str]) -> LineStream:
        return _ProcessStream(self.lab.command(self.name, list(argv)), f"stream on {self.name}")


class HostFile:
    """A file on a host, with the part of pathlib.Path's interface that console readers use."""

    def __init__(self, shell: Shell, path: str):
        self.shell = shell
        self.path = path
        self.name = Path(path).name

    def __repr__(self) -> str:
        return f"HostFile({self.shell.name}:{self.path})"

    def __str__(self) -> str:
        return f"{self.shell.name}:{self.path}"

    def read_bytes(self) -> bytes:
        data = self.shell.read_bytes(self.path)
        if data is None:
            raise FileNotFoundError(f"{self.path} not found on host {self.shell.name}")
        return data

    def read_text(self, errors: str = "strict") -> str:
        return self.read_bytes().decode("utf-8", errors=errors)

    def exists(self) -> bool:
        return self.shell.read_bytes(self.path) is not None

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.exists():
            raise FileNotFoundError(f"{self.path} not found on host {self.shell.name}")
        self.shell.remove(self.path)


def run_local(argv: list[str], timeout: float) -> CommandResult:
    """Run a command on the harness's own machine, with the same result type as a host shell."""
    result = run(argv, timeout=timeout, check=False)
    return CommandResult(result.returncode, result.stdout, result.stderr)
