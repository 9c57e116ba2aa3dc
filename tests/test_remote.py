"""Remote host parts that need no lab: host key pinning, quoting, shaping, host-side figures, sshd config."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

from lab.errors import HostError
from lab.hosts import shaping, sshd
from lab.hosts.figures import HostWindow, Sample, parse_sample, parse_ticks
from lab.hosts.remote import PinOnFirstUse, RemoteHost, _changed_key_message, known_hosts_name
from lab.hosts.shell import CommandResult, HostFile
from lab.inventory import InventoryHost


def make_key(folder: Path, name: str) -> paramiko.PKey:
    path = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture
def keys(tmp_path):
    return make_key(tmp_path, "first"), make_key(tmp_path, "second")


def test_known_hosts_name_brackets_other_ports():
    assert known_hosts_name("10.77.0.11", 22) == "10.77.0.11"
    assert known_hosts_name("10.77.0.11", 2222) == "[10.77.0.11]:2222"


def test_first_use_pins_key(tmp_path, keys):
    known_hosts = tmp_path / "lab/known_hosts"
    client = paramiko.SSHClient()
    PinOnFirstUse(known_hosts).missing_host_key(client, "10.77.0.11", keys[0])
    lines = known_hosts.read_text().splitlines()
    assert lines == [f"10.77.0.11 ssh-ed25519 {keys[0].get_base64()}"]
    assert known_hosts.stat().st_mode & 0o077 == 0
    assert client.get_host_keys().lookup("10.77.0.11")["ssh-ed25519"] == keys[0]


def test_same_key_again_adds_no_line(tmp_path, keys):
    known_hosts = tmp_path / "known_hosts"
    policy = PinOnFirstUse(known_hosts)
    policy.missing_host_key(paramiko.SSHClient(), "10.77.0.11", keys[0])
    policy.missing_host_key(paramiko.SSHClient(), "10.77.0.11", keys[0])
    assert len(known_hosts.read_text().splitlines()) == 1


def test_changed_key_is_rejected(tmp_path, keys):
    known_hosts = tmp_path / "known_hosts"
    policy = PinOnFirstUse(known_hosts)
    policy.missing_host_key(paramiko.SSHClient(), "[10.77.0.11]:2222", keys[0])
    with pytest.raises(paramiko.BadHostKeyException) as caught:
        policy.missing_host_key(paramiko.SSHClient(), "[10.77.0.11]:2222", keys[1])
    assert caught.value.expected_key == keys[0]
    assert len(known_hosts.read_text().splitlines()) == 1


def test_key_of_other_type_is_rejected(tmp_path, keys):
    known_hosts = tmp_path / "known_hosts"
    rsa_key = paramiko.RSAKey.generate(2048)
    known_hosts.write_text(f"10.77.0.12 ssh-rsa {rsa_key.get_base64()}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        PinOnFirstUse(known_hosts).missing_host_key(paramiko.SSHClient(), "10.77.0.12", keys[0])


def test_other_hosts_are_pinned_beside(tmp_path, keys):
    known_hosts = tmp_path / "known_hosts"
    policy = PinOnFirstUse(known_hosts)
    policy.missing_host_key(paramiko.SSHClient(), "10.77.0.11", keys[0])
    policy.missing_host_key(paramiko.SSHClient(), "10.77.0.12", keys[1])
    assert [line.split()[0] for line in known_hosts.read_text().splitlines()] == ["10.77.0.11", "10.77.0.12"]


def test_changed_key_message_says_what_to_do(tmp_path, keys):
    host = InventoryHost(name="h1", role="libvirt", address="10.77.0.11", port=2222, user="root",
                         key_file="key", lab_address="10.77.0.11")
    known_hosts = tmp_path / "my lab/known_hosts"
    error = paramiko.BadHostKeyException("[10.77.0.11]:2222", keys[1], keys[0])
    message = _changed_key_message(host, known_hosts, error)
    assert f"ssh-keygen -R '[10.77.0.11]:2222' -f '{known_hosts}'" in message
    assert keys[0].fingerprint in message
    assert keys[1].fingerprint in message
    assert "The run stops here" in message
    # Fingerprints only: neither key's base64 text appears.
    assert keys[0].get_base64() not in message
    assert keys[1].get_base64() not in message


@dataclass
class FakeResult:
    exited: int = 0
    stdout: str = ""
    stderr: str = ""


@dataclass
class FakeConnection:
    """Stands in for fabric.Connection: records the command lines it would send."""

    commands: list[str] = field(default_factory=list)
    is_connected: bool = True

    def run(self, command, **_options):
        self.commands.append(command)
        return FakeResult()


def test_run_quotes_every_argument(tmp_path):
    host = InventoryHost(name="h1", role="libvirt", address="10.77.0.11", user="root", key_file="key",
                         lab_address="10.77.0.11")
    remote = RemoteHost(host, inventory=None)  # type: ignore[arg-type]
    connection = FakeConnection()
    remote._connection = connection  # type: ignore[assignment]
    hostile = "x'; touch /tmp/owned; echo '$(id)"
    remote.run(["ls", "--", hostile, "a b"], timeout=5)
    assert shlex.split(connection.commands[0]) == ["ls", "--", hostile, "a b"]


def test_run_reports_failures_with_host_name():
    host = InventoryHost(name="h1", role="libvirt", address="10.77.0.11", user="root", key_file="key",
                         lab_address="10.77.0.11")
    remote = RemoteHost(host, inventory=None)  # type: ignore[arg-type]

    class Failing(FakeConnection):
        def run(self, command, **_options):
            return FakeResult(exited=2, stderr="no such file\n")

    remote._connection = Failing()  # type: ignore[assignment]
    with pytest.raises(HostError, match="on host h1 failed with exit status 2: no such file"):
        remote.run(["cat", "/absent"], timeout=5)
    assert remote.run(["cat", "/absent"], timeout=5, check=False).returncode == 2


# Link shaping, against a shell that plays tc.

@dataclass
class FakeShell:
    """A host whose tc keeps one root qdisc per interface, and which records every command."""

    name: str = "h1"
    roots: dict[str, tuple[str, str]] = field(default_factory=lambda: {"br0": ("noqueue", "0:")})
    commands: list[list[str]] = field(default_factory=list)

    def run(self, argv, *, timeout, check=True):
        argv = list(argv)
        self.commands.append(argv)
        if argv[:4] == ["tc", "-j", "qdisc", "show"]:
            kind, handle = self.roots[argv[5]]
            return CommandResult(0, f'[{{"kind":"{kind}","handle":"{handle}","root":true}}]', "")
        if argv[:3] == ["tc", "qdisc", "replace"]:
            self.roots[argv[4]] = (argv[8], argv[7])
        elif argv[:3] == ["tc", "qdisc", "del"]:
            self.roots[argv[4]] = ("noqueue", "0:")
        return CommandResult(0, "", "")

    def read_bytes(self, path):
        return None

    def remove(self, path):
        pass

    def stream(self, argv):
        raise NotImplementedError


def test_tbf_argv_rate_and_burst():
    argv = shaping.tbf_argv("br0", 32)
    assert argv[:9] == ["tc", "qdisc", "replace", "dev", "br0", "root", "handle", "4d4c:", "tbf"]
    assert argv[argv.index("rate") + 1] == f"{32 * 2**20 * 8}bit"
    assert int(argv[argv.index("burst") + 1]) == int(32 * 2**20 * 0.01)
    assert shaping.tbf_argv("br0", 1)[shaping.tbf_argv("br0", 1).index("burst") + 1] == str(64 * 1024)


def test_shaping_applied_and_removed():
    shells = [FakeShell("h1"), FakeShell("h2")]
    with shaping.LinkShaping([(shell, "br0") for shell in shells], 24):
        assert [shell.roots["br0"] for shell in shells] == [("tbf", "4d4c:")] * 2
    assert [shell.roots["br0"] for shell in shells] == [("noqueue", "0:")] * 2


def test_shaping_removed_when_block_fails():
    shell = FakeShell()
    with pytest.raises(KeyboardInterrupt):
        with shaping.LinkShaping([(shell, "br0")], 24):
            raise KeyboardInterrupt
    assert shell.roots["br0"] == ("noqueue", "0:")


def test_shaping_none_runs_no_command():
    shell = FakeShell()
    with shaping.LinkShaping([(shell, "br0")], None):
        pass
    assert shell.commands == []


def test_foreign_qdisc_is_not_replaced():
    shell = FakeShell(roots={"eth1": ("htb", "1:")})
    other = FakeShell("h0")
    with pytest.raises(HostError, match="htb root qdisc .* that the harness did not set"):
        with shaping.LinkShaping([(other, "br0"), (shell, "eth1")], 24):
            pass
    assert shell.roots["eth1"] == ("htb", "1:")
    # The host shaped before the failure is unshaped again.
    assert other.roots["br0"] == ("noqueue", "0:")


def test_unshape_leaves_foreign_qdisc():
    shell = FakeShell(roots={"eth1": ("htb", "1:")})
    assert not shaping.unshape(shell, "eth1")
    assert shell.roots["eth1"] == ("htb", "1:")


# Host-side figures.

STAT = ("4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 5000 0 0 0 {utime} {stime} 0 0 20 0 3 0 100 "
        "1000000 5000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0")


def test_parse_sample_with_stat():
    sample = parse_sample("s 1234.56 1000 2000 " + STAT.format(utime=300, stime=50))
    assert sample == Sample(1234.56, 1000, 2000, 4242, 350)


def test_parse_sample_command_with_spaces():
    stat = STAT.replace("(qemu-system-x86)", "(a) b (c)").format(utime=1, stime=2)
    assert parse_sample("s 1.0 - - " + stat).qemu_cpu_ticks == 3


def test_parse_sample_without_process():
    assert parse_sample("s 10.5 7 8 -") == Sample(10.5, 7, 8, None, None)
    assert parse_sample("hz 100") is None
    assert parse_ticks(["hz 100", "s 1 2 3 -"]) == 100


def window(role, samples):
    return HostWindow("h1", role, "br0", 100, samples)


def test_source_figures_count_from_first_sample():
    figures = window("source", [Sample(10.0, 100, 1000, 7, 500), Sample(11.0, 150, 9000, 7, 560),
                                Sample(11.1, 160, 9100, None, None)]).figures()
    assert figures["qemu_cpu_ms"] == 600.0
    assert figures["tx_bytes"] == 8100
    assert figures["rx_bytes"] == 60
    assert figures["window_ms"] == pytest.approx(1100.0)
    assert figures["samples"] == 3


def test_destination_counts_from_process_start():
    figures = window("destination", [Sample(5.0, 0, 0, None, None), Sample(5.5, 4000, 10, 9, 40),
                                     Sample(6.0, 8000, 20, 9, 90)]).figures()
    assert figures["qemu_cpu_ms"] == 900.0
    assert figures["rx_bytes"] == 8000


def test_pid_change_gives_no_cpu_time():
    figures = window("source", [Sample(1.0, 0, 0, 7, 10), Sample(2.0, 0, 0, 8, 20)]).figures()
    assert figures["qemu_cpu_ms"] is None


def test_empty_window_has_no_figures():
    figures = window("source", []).figures()
    assert figures["samples"] == 0
    assert figures["tx_bytes"] is None


# sshd of the local lab and files read over a shell.

def test_sshd_config_allows_keys_only(tmp_path):
    text = sshd.config_text("10.77.0.11", tmp_path / "ssh_host_ed25519_key")
    lines = text.splitlines()
    assert "ListenAddress 10.77.0.11:22" in lines
    assert "PasswordAuthentication no" in lines
    assert "KbdInteractiveAuthentication no" in lines
    assert "PermitRootLogin prohibit-password" in lines
    assert "AuthorizedKeysFile /run/migrlab-ssh/authorized_keys" in lines
    assert not any(line.startswith("ListenAddress 0.0.0.0") for line in lines)


def test_sshd_files_are_private(tmp_path):
    public_key = tmp_path / "id.pub"
    public_key.write_text("ssh-ed25519 AAAA test\n")
    config = sshd.prepare_files(tmp_path / "ssh", tmp_path / "run", address="10.77.0.11", host_name="h1",
                                public_key=public_key)
    assert config.read_text().startswith("# sshd configuration")
    assert (tmp_path / "ssh/ssh_host_ed25519_key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "run/migrlab-ssh").stat().st_mode & 0o077 == 0
    assert (tmp_path / "run/migrlab-ssh/authorized_keys").read_text() == "ssh-ed25519 AAAA test\n"
    assert (tmp_path / "run/sshd").is_dir()


def test_host_file_behaves_like_a_path():
    class Files(FakeShell):
        def __init__(self):
            super().__init__()
            self.content = {"/var/log/x.log": b"line\n"}

        def read_bytes(self, path):
            return self.content.get(path)

        def remove(self, path):
            self.content.pop(path, None)

    shell = Files()
    present = HostFile(shell, "/var/log/x.log")
    assert present.exists()
    assert present.read_text() == "line\n"
    present.unlink()
    assert not present.exists()
    with pytest.raises(FileNotFoundError):
        present.read_text()
    present.unlink(missing_ok=True)
