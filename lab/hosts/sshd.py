"""An OpenSSH server per host of the local lab, so the lab can be driven over SSH like real servers.

Each host's sshd runs inside the host's namespaces and listens only on the
host's lab address. Its configuration and host key live in the host's
folder of the lab directory, and its pid file, privilege separation
directory and authorized_keys in the host's private /run. Password and
keyboard-interactive logins are off; the only accepted key is the lab's own
key pair, generated once per lab.

sshd's StrictModes check walks up from authorized_keys and rejects any
group- or world-writable directory on the way, such as /tmp, where a lab
directory may lie. Inside a host, /run is the host's private directory,
owned by root and not writable by others, so the check passes there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from lab.errors import HostError
from lab.hosts.netns import namespace_id
from lab.hosts.processes import is_alive
from lab.hosts.system import LAB_PATH, run, tail, tail_file

log = logging.getLogger(__name__)

SSH_PORT = 22
SSH_USER = "root"
KEY_NAME = "id_ed25519"
HOST_KEY_NAME = "ssh_host_ed25519_key"
# Paths inside the host, where its private /run is mounted.
PID_FILE_INSIDE = "/run/migrlab-sshd.pid"
AUTHORIZED_KEYS_DIR_INSIDE = "/run/migrlab-ssh"
# Debian's sshd refuses to start without its privilege separation directory.
PRIVSEP_DIR_INSIDE = "/run/sshd"

START_TIMEOUT = 20.0


def find_sshd() -> str:
    """Return the absolute path of sshd, which it needs to re-execute itself per connection."""
    path = shutil.which("sshd", path=LAB_PATH)
    if path is None:
        raise HostError("sshd not found; install openssh-server with scripts/setup-debian")
    return path


def ensure_key_pair(private_key: Path, comment: str) -> bool:
    """Generate an ed25519 key pair without passphrase unless ``private_key`` exists; return whether it was made."""
    if private_key.is_file() and private_key.with_suffix(".pub").is_file():
        return False
    private_key.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_key.parent, 0o700)
    for path in (private_key, private_key.with_suffix(".pub")):
        path.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private_key)])
    log.info("generated SSH key pair %s", private_key)
    return True


def config_text(address: str, host_key: Path) -> str:
    """Return the sshd_config of one lab host; sshd reads only this file."""
    lines = [
        "# sshd configuration of a migration-lab local lab host, written by 'migrlab lab up'.",
        f"ListenAddress {address}:{SSH_PORT}",
        f"HostKey {host_key}",
        f"PidFile {PID_FILE_INSIDE}",
        f"AuthorizedKeysFile {AUTHORIZED_KEYS_DIR_INSIDE}/authorized_keys",
        f"AllowUsers {SSH_USER}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        # PAM would apply the machine's login policy, which is not the lab's.
        "UsePAM no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
        "LogLevel INFO",
    ]
    return "\n".join(lines) + "\n"


def prepare_files(ssh_dir: Path, run_dir: Path, *, address: str, host_name: str, public_key: Path) -> Path:
    """Write a host's key, configuration and /run files; return the configuration path.

    The host key is made once and kept, so that the key pinned in
    known_hosts stays valid when ``up`` repairs the host.
    """
    host_key = ssh_dir / HOST_KEY_NAME
    ensure_key_pair(host_key, f"migrlab-{host_name}")
    config = ssh_dir / "sshd_config"
    text = config_text(address, host_key)
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)

    privsep = run_dir / PRIVSEP_DIR_INSIDE.removeprefix("/run/")
    privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    keys_dir = run_dir / AUTHORIZED_KEYS_DIR_INSIDE.removeprefix("/run/")
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o755)
    authorized = keys_dir / "authorized_keys"
    authorized.write_text(public_key.read_text())
    os.chmod(authorized, 0o600)
    return config


def pid_file(run_dir: Path) -> Path:
    return run_dir / PID_FILE_INSIDE.removeprefix("/run/")


def running_pid(run_dir: Path, netns: Path) -> int | None:
    """Return the pid of the host's sshd if it runs in the host's network namespace."""
    try:
        pid = int(pid_file(run_dir).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    if name != "sshd" or not is_alive(pid):
        return None
    if namespace_id(Path(f"/proc/{pid}/ns/net")) != namespace_id(netns):
        return None
    return pid


def start(argv: list[str], *, run_dir: Path, netns: Path, log_file: Path, host_name: str) -> int:
    """Start sshd with ``argv`` (which ends in the sshd command line) and wait for its pid file.

    sshd binds its listening socket before it forks into the background, so
    once its pid file names a live sshd in the host's namespace, it accepts
    connections.
    """
    pid_file(run_dir).unlink(missing_ok=True)
    result = run(argv, timeout=START_TIMEOUT, check=False, env={"PATH": LAB_PATH, "LC_ALL": "C"})
    if result.returncode != 0:
        raise HostError(f"sshd of lab host {host_name} failed to start (exit status {result.returncode}): "
                        f"{tail(result.stderr)}\nend of {log_file}:\n{tail_file(log_file)}")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pid = running_pid(run_dir, netns)
        if pid is not None:
            log.info("sshd of %s runs as pid %d", host_name, pid)
            return pid
        time.sleep(0.05)
    raise HostError(f"sshd of lab host {host_name} wrote no pid file within {START_TIMEOUT:g} s; "
                    f"end of {log_file}:\n{tail_file(log_file)}")


def sshd_argv(config: Path, log_file: Path) -> list[str]:
    # -E appends sshd's log to a file: the lab hosts have no syslog.
    return [find_sshd(), "-f", str(config), "-E", str(log_file)]


def client_argv(nsenter: list[str], run_dir: Path, config: Path, log_file: Path) -> list[str]:
    """Return the command that starts the client's sshd in a mount namespace of its own.

    The client host is a network namespace only, so sshd gets a private
    mount namespace with the client's run folder over /run, and sshd keeps
    that namespace alive. The paths are positional parameters of the script,
    so the shell parses none of them.
    """
    script = 'mount --bind "$1" /run && shift && exec "$@"'
    return [*nsenter, "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", script, "sh", str(run_dir), *sshd_argv(config, log_file)]
