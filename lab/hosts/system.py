"""Subprocess and mount-table helpers shared by the lab's host modules."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.errors import HostError

log = logging.getLogger(__name__)

# Timeout of one ip, mount or nsenter command, in seconds. These commands
# finish in milliseconds, so hitting it means the kernel or a tool is stuck.
COMMAND_TIMEOUT = 30.0

# PATH given to commands and daemons started inside the lab, so that the
# caller's environment (a virtual environment, a user's bin directory) does
# not leak into libvirtd and from there into QEMU.
LAB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(argv: list[str], *, timeout: float = COMMAND_TIMEOUT, check: bool = True,
        input: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a command with captured text output.

    Raises HostError when the command is not found, times out, or (with
    ``check``) exits with a non-zero status. The message contains the command
    and the end of its standard error.
    """
    log.debug("running %s", argv)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=input, env=env, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as error:
        raise HostError(f"command not found: {argv[0]!r} ({error}); install it or fix PATH") from error
    except subprocess.TimeoutExpired as error:
        raise HostError(f"command timed out after {timeout:g} s: {format_argv(argv)}") from error
    if check and result.returncode != 0:
        raise HostError(f"command failed with exit status {result.returncode}: {format_argv(argv)}: "
                        f"{tail(result.stderr or result.stdout)}")
    return result


def format_argv(argv: list[str]) -> str:
    return " ".join(argv)


def tail(text: str, lines: int = 20) -> str:
    """Return the last lines of a text, stripped, or "(no output)"."""
    kept = text.strip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"


def tail_file(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log file, or a note that it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as error:
        return f"({path} cannot be read: {error.strerror})"
    return tail(text, lines)


def check_root() -> None:
    if os.geteuid() != 0:
        raise HostError("the local lab needs root (namespaces, mounts and libvirtd); "
                        f"running as uid {os.geteuid()}, so run it as root")


def check_tools(tools: list[str]) -> None:
    """Raise HostError naming every tool that is not on PATH."""
    search_path = os.environ.get("PATH", "") + os.pathsep + LAB_PATH
    missing = [tool for tool in tools if shutil.which(tool, path=search_path) is None]
    if missing:
        raise HostError(f"missing tools for the local lab: {', '.join(missing)}; "
                        "install them with scripts/setup-debian")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/<pid>/mountinfo."""

    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        separator = fields.index("-")
        entries.append(MountEntry(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            fs_type=fields[separator + 1],
            source=_unescape(fields[separator + 2]),
        ))
    return entries


def read_mountinfo() -> list[MountEntry]:
    """Return the mount table of the caller's mount namespace."""
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def is_within(path: str, directory: Path) -> bool:
    """Tell whether ``path`` is ``directory`` or lies below it (lexically)."""
    base = str(directory).rstrip("/") or "/"
    return path == base or path.startswith(base + "/")


def mount_points_under(directory: Path, entries: list[MountEntry] | None = None) -> list[str]:
    """Return the mount points at or below ``directory``, deepest first.

    A path mounted several times appears once per mount, so unmounting the
    list in order removes every layer.
    """
    if entries is None:
        entries = read_mountinfo()
    points = [entry.mount_point for entry in entries if is_within(entry.mount_point, directory)]
    return sorted(points, key=lambda point: point.count("/"), reverse=True)


def topmost_mount_points(points: list[str]) -> list[str]:
    """Drop every mount point that lies below another one of the list."""
    unique = sorted(set(points), key=len)
    kept: list[str] = []
    for point in unique:
        if not any(is_within(point, Path(parent)) for parent in kept):
            kept.append(point)
    return kept


@contextmanager
def exclusive_lock(path: Path, timeout: float, holder: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, creating it and its directory if needed.

    Raises HostError after ``timeout`` seconds, with ``holder`` saying who
    probably has the lock. The holder may delete the file (down deletes the
    lab directory), so a waiter that gets the lock checks that its file is
    still the one at the path, and starts again if not.
    """
    deadline = time.monotonic() + timeout
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            current = _acquire_flock(path, descriptor, deadline, timeout, holder)
        except BaseException:
            os.close(descriptor)
            raise
        if current:
            break
        os.close(descriptor)
    try:
        yield
    finally:
        os.close(descriptor)


def _acquire_flock(path: Path, descriptor: int, deadline: float, timeout: float, holder: str) -> bool:
    """Lock an open file; return whether it is still the file at ``path``."""
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise HostError(f"timed out after {timeout:g} s waiting for the lock {path}; {holder}") from None
            time.sleep(0.2)
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False
