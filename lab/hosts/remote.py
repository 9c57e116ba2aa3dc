"""Hosts of an inventory reached over SSH with fabric, and their libvirt over libssh.

Host keys are pinned on first use in the inventory's known_hosts file: the
first connection to a host records the key it presents, and every later
connection, from fabric or from libvirt, must present the same key. A
changed key raises HostKeyChangedError, whose message explains how to
accept the new key if the change is expected.

Commands are argument vectors. Each argument is quoted with shlex before
the remote login shell parses the line, so no value from an inventory or a
playbook is ever interpreted by that shell. Key contents never leave the
key file: messages and logs name the key file's path only.
"""

from __future__ import annotations

import fcntl
import logging
import shlex
import socket
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

import libvirt
import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut
from paramiko.hostkeys import HostKeys

from lab.errors import HostError
from lab.events import open_connection
from lab.hosts.innetns import call_in_netns
from lab.hosts.shell import CommandResult, LineCollector, LineStream, failure_message
from lab.inventory import Inventory, InventoryHost

log = logging.getLogger(__name__)

# Timeouts in seconds for SSH's banner exchange and authentication.
BANNER_TIMEOUT = 15
AUTH_TIMEOUT = 15
# Time allowed to open a libvirt connection over libssh.
LIBVIRT_OPEN_TIMEOUT = 60.0

# Serializes known_hosts updates between the threads of this process; an
# flock on a lock file beside it serializes them between processes.
_known_hosts_lock = threading.Lock()


class HostKeyChangedError(HostError):
    """A host presented an SSH host key other than the one pinned in known_hosts."""


def fingerprint(key: paramiko.PKey) -> str:
    """Return the key type and OpenSSH SHA256 fingerprint, as ``ssh-keygen -l`` prints them."""
    return f"{key.get_name()} {key.fingerprint}"


def known_hosts_name(address: str, port: int) -> str:
    """Return the host name that OpenSSH, paramiko and libssh use in known_hosts."""
    return address if port == 22 else f"[{address}]:{port}"


class PinOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept and record the key of a host that known_hosts does not list yet; reject any other change.

    paramiko calls this policy when known_hosts has no key of the presented
    key type for the host. The file is read again under the lock, so a key
    that another thread or process pinned meanwhile is compared, not added
    twice, and a host pinned with a key of another type is rejected.
    """

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with _known_hosts_lock, _file_lock(self.known_hosts):
            pinned = HostKeys()
            if self.known_hosts.is_file():
                pinned.load(str(self.known_hosts))
            entries = pinned.lookup(hostname)
            if entries:
                same = entries.get(key.get_name())
                if same is not None and same == key:
                    client.get_host_keys().add(hostname, key.get_name(), key)
                    return
                expected = same if same is not None else next(iter(entries.values()))
                raise paramiko.BadHostKeyException(hostname, key, expected)
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            self.known_hosts.chmod(stat.S_IRUSR | stat.S_IWUSR)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.info("pinned the SSH host key of %s (%s) in %s", hostname, fingerprint(key), self.known_hosts)


class _file_lock:
    """An flock on ``<path>.lock`` for the duration of a with block."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *_exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _changed_key_message(host: InventoryHost, known_hosts: Path, error: paramiko.BadHostKeyException) -> str:
    name = known_hosts_name(host.address, host.port)
    return (f"the SSH host key of {host.name} ({host.address} port {host.port}) does not match the key "
            f"pinned in {known_hosts}: pinned {fingerprint(error.expected_key)}, presented "
            f"{fingerprint(error.key)}. The run stops here. If the host was reinstalled or its keys were "
            f"changed on purpose, remove the old key with: ssh-keygen -R {shlex.quote(name)} -f "
            f"{shlex.quote(str(known_hosts))} and connect again to pin the new one; otherwise the "
            "connection may be intercepted, so find out why the key changed first")


class _ChannelStream:
    """Output lines of a command running in an SSH channel, until the channel is closed."""

    def __init__(self, channel: paramiko.Channel, description: str):
        self._channel = channel
        self._file = channel.makefile("rb")
        self._collector = LineCollector(self._file, description)

    def lines(self) -> list[str]:
        return self._collector.lines()

    def close(self) -> None:
        # Closing the channel closes the remote command's output pipe, so its
        # next write fails with SIGPIPE and it exits.
        self._channel.close()
        self._collector.join(5)
        self._file.close()


class RemoteHost:
    """One host of an inventory, reached over SSH.

    ``connect`` opens the SSH connection and pins the host key; it raises
    HostKeyChangedError or HostError. The object is a context manager that
    closes the connection.
    """

    def __init__(self, host: InventoryHost, inventory: Inventory):
        self.host = host
        self.inventory = inventory
        self.name = host.name
        self._connection: Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> RemoteHost:
        self.connect()
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def known_hosts(self) -> Path:
        return self.inventory.known_hosts_path

    @property
    def key_file(self) -> Path:
        return self.inventory.key_path(self.host)

    def describe(self) -> str:
        return f"{self.name} ({self.host.user}@{self.host.address} port {self.host.port})"

    # Connection.

    def _open_socket(self) -> socket.socket:
        timeout = self.inventory.connect_timeout_s

        def connect() -> socket.socket:
            return socket.create_connection((self.host.address, self.host.port), timeout=timeout)

        try:
            return call_in_netns(self.inventory.control_netns, connect, timeout + 5,
                                 f"connecting to {self.name}")
        except OSError as error:
            raise HostError(f"cannot reach {self.describe()} over SSH: {error.strerror or error}; check that "
                            "the host is up, that sshd listens on that address and port, and the inventory's "
                            "address and port") from error

    def connect(self) -> None:
        """Open the SSH connection unless it is open, pinning the host key on first use."""
        with self._lock:
            if self._connection is not None and self._connection.is_connected:
                return
            self._connect()

    def _connect(self) -> None:
        if not self.key_file.is_file():
            raise HostError(f"SSH key file {self.key_file} of host {self.name} not found; create it or correct "
                            f"key_file in {self.inventory.path}")
        sock = self._open_socket()
        config = Config(overrides={"load_ssh_configs": False})
        connection = Connection(
            host=self.host.address, user=self.host.user, port=self.host.port, config=config,
            connect_timeout=self.inventory.connect_timeout_s,
            connect_kwargs={"key_filename": [str(self.key_file)], "look_for_keys": False, "allow_agent": False,
                            "sock": sock, "banner_timeout": BANNER_TIMEOUT, "auth_timeout": AUTH_TIMEOUT})
        client = connection.client
        if self.known_hosts.is_file():
            client.get_host_keys().load(str(self.known_hosts))
        client.set_missing_host_key_policy(PinOnFirstUse(self.known_hosts))
        try:
            connection.open()
        except paramiko.BadHostKeyException as error:
            sock.close()
            raise HostKeyChangedError(_changed_key_message(self.host, self.known_hosts, error)) from None
        except paramiko.PasswordRequiredException:
            sock.close()
            raise HostError(f"SSH key file {self.key_file} of host {self.name} is protected by a passphrase; "
                            "the harness needs a key without one, made for the lab") from None
        except paramiko.AuthenticationException:
            sock.close()
            raise HostError(f"SSH login to {self.describe()} with key file {self.key_file} was rejected; add "
                            f"the public key {self.key_file}.pub to ~{self.host.user}/.ssh/authorized_keys on "
                            "the host") from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            sock.close()
            raise HostError(f"SSH connection to {self.describe()} failed: {error}") from error
        self._connection = connection
        log.debug("connected to %s over SSH", self.describe())

    @property
    def connection(self) -> Connection:
        self.connect()
        assert self._connection is not None
        return self._connection

    def close(self) -> None:
        """Close the SFTP session and the SSH connection; closing twice does nothing."""
        with self._lock:
            if self._sftp is not None:
                try:
                    self._sftp.close()
                except (OSError, EOFError, paramiko.SSHException) as error:
                    log.debug("closing SFTP to %s failed: %s", self.name, error)
                self._sftp = None
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # Commands.

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> CommandResult:
        """Run a command on the host; raise HostError on timeout, and with ``check`` on a non-zero exit."""
        if not argv:
            raise HostError("empty command")
        command = shlex.join(argv)
        log.debug("running on %s: %s", self.name, command)
        try:
            result = self.connection.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
        except CommandTimedOut:
            raise HostError(f"command {command} on host {self.name} timed out after {timeout:g} s") from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise HostError(f"command {command} on host {self.name} failed: SSH error {error}") from error
        outcome = CommandResult(result.exited, result.stdout, result.stderr)
        if check and outcome.returncode != 0:
            raise HostError(failure_message(self.name, argv, outcome))
        return outcome

    def stream(self, argv: Sequence[str]) -> LineStream:
        """Start a command and collect its output lines until the stream is closed."""
        command = shlex.join(argv)
        try:
            transport = self.connection.client.get_transport()
            if transport is None:
                raise HostError(f"SSH connection to {self.name} is closed")
            channel = transport.open_session(timeout=self.inventory.connect_timeout_s)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as error:
            raise HostError(f"cannot start {command} on host {self.name}: {error}") from error
        return _ChannelStream(channel, f"stream on {self.name}")

    # Files.

    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                assert self._connection is not None, "connect() first"
                try:
                    self._sftp = self._connection.client.open_sftp()
                except (paramiko.SSHException, OSError, EOFError) as error:
                    raise HostError(f"cannot open SFTP on host {self.name}: {error}") from error
            return self._sftp

    def read_bytes(self, path: str) -> bytes | None:
        """Return a file's content, or None if it does not exist."""
        self.connect()
        try:
            with self.sftp().open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as error:
            raise HostError(f"cannot read {path} on host {self.name}: {error}") from error

    def remove(self, path: str) -> None:
        self.connect()
        try:
            self.sftp().remove(path)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as error:
            raise HostError(f"cannot remove {path} on host {self.name}: {error}") from error

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` on the host."""
        self.connect()
        try:
            self.sftp().put(str(local), remote, confirm=True)
        except (OSError, paramiko.SSHException) as error:
            raise HostError(f"cannot copy {local} to {remote} on host {self.name}: {error}") from error

    # libvirt.

    @property
    def libvirt_uri(self) -> str:
        return self.inventory.remote_libvirt_uri(self.host)

    def open_libvirt(self) -> libvirt.virConnect:
        """Open a libvirt connection to the host over libssh, with events and keepalive.

        The host key must already be pinned (``connect`` does that), because
        libvirt's libssh transport rejects a host that known_hosts does not list.
        """
        if not self.host.is_libvirt_host:
            raise HostError(f"host {self.name} is a client and runs no libvirtd")
        self.connect()
        uri = self.libvirt_uri
        try:
            return call_in_netns(self.inventory.control_netns, lambda: open_connection(uri),
                                 LIBVIRT_OPEN_TIMEOUT, f"opening libvirt on {self.name}")
        except HostError as error:
            raise HostError(f"libvirt on {self.describe()}: {error}") from error


class SudoShell:
    """A host's shell whose commands run through ``sudo -n``, which fails rather than ask for a password."""

    def __init__(self, shell):
        self.shell = shell
        self.name = shell.name

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> CommandResult:
        return self.shell.run(["sudo", "-n", "--", *argv], timeout=timeout, check=check)

    def read_bytes(self, path: str) -> bytes | None:
        return self.shell.read_bytes(path)

    def remove(self, path: str) -> None:
        self.shell.remove(path)

    def stream(self, argv: Sequence[str]) -> LineStream:
        return self.shell.stream(["sudo", "-n", "--", *argv])
