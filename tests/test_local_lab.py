"""Tests of the local lab on the real machine: namespaces, libvirtd, QEMU.

The tests marked ``lab`` need root, iproute2, util-linux, libvirtd and QEMU.
Each test run uses its own namespace prefix ``migrlab-t<pid>``, and a state
directory derived from it, so it never meets a lab that a user has up or a
concurrent test run. Namespaces that a crashed earlier run left behind are
removed when the process that made them no longer exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.errors import ConfigError, HostError
from lab.hosts import netns
from lab.hosts.libvirtd import call_with_timeout, override_settings, read_pid, write_config
from lab.hosts.local import LocalLab
from lab.hosts.processes import find_processes, is_alive
from lab.hosts.system import mount_points_under

libvirt = pytest.importorskip("libvirt")
libvirt_qemu = pytest.importorskip("libvirt_qemu")

RUN_PREFIX = f"migrlab-t{os.getpid()}"
CRASH_PREFIX = f"{RUN_PREFIX}c"
_RUN_PATTERN = re.compile(r"^migrlab-t(\d+)c?-")

GUEST_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <serial type='file'><source path='/var/log/libvirt/qemu/{name}.serial'/></serial>
  </devices>
</domain>
"""
GUEST_MAC = "52:54:00:4d:4c:64"
MIGRATION_TIMEOUT = 180.0


def _state_dir(prefix: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{prefix}-state"


def _require_lab_prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.skip("the local lab needs root")
    missing = [tool for tool in ("ip", "unshare", "nsenter", "libvirtd", "qemu-system-x86_64", "ping")
               if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        pytest.skip(f"missing tools for the local lab: {', '.join(missing)}")


def _remove_dead_runs() -> None:
    """Take down the labs of earlier test runs whose pytest process is gone."""
    dead_prefixes = set()
    for name in netns.list_netns():
        match = _RUN_PATTERN.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            dead_prefixes.add(name.rsplit("-", 1)[0])
    for prefix in sorted(dead_prefixes):
        LocalLab(_state_dir(prefix) / "lab", prefix=prefix).down()
        shutil.rmtree(_state_dir(prefix), ignore_errors=True)


def _root_netns_snapshot() -> dict[str, object]:
    def ip_json(*args: str) -> object:
        return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                                         timeout=10, check=True).stdout)

    return {
        "links": sorted(link["ifname"] for link in ip_json("link", "show")),
        "addresses": sorted((link["ifname"], info["local"]) for link in ip_json("addr", "show")
                            for info in link.get("addr_info", [])),
        "routes": ip_json("route", "show"),
    }


def _guest_xml(lab: LocalLab, host: str, name: str) -> str:
    return GUEST_XML.format(name=name, bridge=lab.host(host).guest_bridge, mac=GUEST_MAC)


def _qemu_pid(lab: LocalLab, host: str, guest: str) -> int:
    pid = read_pid(lab.host(host).run_dir / "libvirt/qemu" / f"{guest}.pid")
    assert pid is not None, f"no QEMU pid file for {guest} on {host}"
    return pid


@dataclass
class LabRun:
    lab: LocalLab
    root_netns_before: dict[str, object]
    up_seconds: float


@pytest.fixture(scope="module")
def lab_run():
    _require_lab_prerequisites()
    _remove_dead_runs()
    state_dir = _state_dir(RUN_PREFIX)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIGRLAB_STATE", str(state_dir))
        local_lab = LocalLab(prefix=RUN_PREFIX)
        root_netns_before = _root_netns_snapshot()
        started = time.monotonic()
        local_lab.up(hosts=2)
        up_seconds = time.monotonic() - started
        print(f"up of a 2-host lab took {up_seconds:.2f} s")
        try:
            yield LabRun(local_lab, root_netns_before, up_seconds)
        finally:
            local_lab.down()
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def lab(lab_run):
    return lab_run.lab


# Tests that need no lab: input checks.

def test_subnet_rejects_invalid_values(tmp_path):
    for subnet in ("not-a-subnet", "10.77.0.1/24", "fd00:77::/64", "10.77.0.0/25", "100.64.0.0/24",
                   "127.0.0.0/8", "169.254.0.0/16"):
        with pytest.raises(ConfigError) as error:
            LocalLab(tmp_path, subnet=subnet)
        assert subnet in str(error.value)


def test_prefix_rejects_invalid_values(tmp_path):
    for prefix in ("", "Migrlab", "1lab", "lab-", "lab_x", "x" * 41):
        with pytest.raises(ConfigError):
            LocalLab(tmp_path, prefix=prefix)


def test_root_rejects_covered_paths():
    for root in ("/run/migrlab", "/var/lib/libvirt/lab", "/etc/libvirt", "/"):
        with pytest.raises(ConfigError):
            LocalLab(Path(root))


def test_up_rejects_invalid_host_count(tmp_path):
    local_lab = LocalLab(tmp_path / "lab", prefix="migrlab-unused")
    for hosts in (0, -1, 90, 2.5):
        with pytest.raises(ConfigError):
            local_lab.up(hosts=hosts)
    assert not (tmp_path / "lab").exists()


def test_guest_address_offsets(tmp_path):
    local_lab = LocalLab(tmp_path, subnet="10.78.0.0/24")
    assert local_lab.guest_address() == "10.78.0.100"
    assert local_lab.guest_address(254) == "10.78.0.254"
    for offset in (12, 99, 255):
        with pytest.raises(ConfigError):
            local_lab.guest_address(offset)


def test_override_settings_comments_old_values():
    machine_config = ('user = "qemu"\n'
                      '#group = "qemu"\n'
                      'cgroup_controllers = [ "cpu",\n'
                      '    "memory" ]\n'
                      'max_files = 2048\n')

    text = override_settings(machine_config, {"user": '"root"', "cgroup_controllers": "[ ]"})

    lines = text.splitlines()
    assert '# user = "qemu"' in lines
    assert '#group = "qemu"' in lines
    assert '# cgroup_controllers = [ "cpu",' in lines
    assert '#     "memory" ]' in lines
    assert "max_files = 2048" in lines
    assert lines[-2:] == ['user = "root"', "cgroup_controllers = [ ]"]
    assigned = [line.split("=")[0].strip() for line in lines if "=" in line and not line.startswith("#")]
    assert assigned == ["max_files", "user", "cgroup_controllers"]


def test_write_config_lists_shared_folders(tmp_path):
    machine = tmp_path / "machine"
    machine.mkdir()
    (machine / "qemu.conf").write_text('#shared_filesystems = [\n#  "/path/to/images"\n#]\nuser = "qemu"\n')
    shared = tmp_path / "shared"
    shared.mkdir()
    link = tmp_path / "link"
    link.symlink_to(shared)
    host_uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"

    assert write_config(tmp_path / "etc", host_uuid, source=machine, shared_dirs=[link])

    lines = (tmp_path / "etc" / "qemu.conf").read_text().splitlines()
    assert f'shared_filesystems = [ "{shared}" ]' in lines
    assert '# user = "qemu"' in lines
    assert 'user = "root"' in lines
    assert not write_config(tmp_path / "etc", host_uuid, source=machine, shared_dirs=[link])
    assert write_config(tmp_path / "etc", host_uuid, source=machine)
    assert not any(line.startswith("shared_filesystems") for line in
                   (tmp_path / "etc" / "qemu.conf").read_text().splitlines())


def test_hosts_empty_without_lab(tmp_path):
    local_lab = LocalLab(tmp_path / "lab", prefix="migrlab-unused")
    assert local_lab.hosts() == []
    with pytest.raises(HostError, match="not up"):
        local_lab.host("h1")


# Tests on a lab of two hosts, in file order.

@pytest.mark.lab
def test_up_creates_hosts_and_network(lab_run):
    lab = lab_run.lab
    hosts = lab.hosts()
    assert [host.name for host in hosts] == ["h1", "h2", "client"]
    assert [host.address for host in hosts] == ["10.77.0.11", "10.77.0.12", "10.77.0.2"]
    h1 = lab.host("h1")
    assert h1.migration_uri == "tcp://10.77.0.11"
    assert h1.guest_bridge == "br0"
    assert h1.is_libvirt_host
    assert h1.log_dir == lab.root / "hosts/h1/var/log/libvirt"
    assert (h1.log_dir / "libvirtd.log").is_file()
    assert not lab.host("client").is_libvirt_host
    assert lab.root == _state_dir(RUN_PREFIX).resolve() / "lab"

    namespaces = [name for name in netns.list_netns() if name.startswith(RUN_PREFIX + "-")]
    assert sorted(namespaces) == sorted(f"{RUN_PREFIX}-{name}" for name in ("sw", "client", "h1", "h2"))
    for name in namespaces:
        routes = netns.list_routes(name)
        assert all(route["dst"] != "default" for route in routes), (name, routes)
        assert [route["dst"] for route in routes] in ([], ["10.77.0.0/24"]), (name, routes)

    assert _root_netns_snapshot() == lab_run.root_netns_before

    state = json.loads((lab.root / "lab.json").read_text())
    assert state["prefix"] == RUN_PREFIX
    assert state["subnet"] == "10.77.0.0/24"
    assert set(state["pids"]) == {"h1", "h2"}
    assert lab_run.up_seconds < 60


@pytest.mark.lab
def test_up_again_changes_nothing(lab):
    state_before = (lab.root / "lab.json").read_text()
    state_mtime = (lab.root / "lab.json").stat().st_mtime_ns
    namespace_ids = {path: netns.namespace_id(path) for path in sorted((lab.root / "ns").iterdir())}
    links_before = netns.list_links(f"{RUN_PREFIX}-h1")

    state = lab.up(hosts=2)

    assert (lab.root / "lab.json").read_text() == state_before
    assert (lab.root / "lab.json").stat().st_mtime_ns == state_mtime
    assert {path: netns.namespace_id(path) for path in sorted((lab.root / "ns").iterdir())} == namespace_ids
    assert netns.list_links(f"{RUN_PREFIX}-h1").keys() == links_before.keys()
    for name, pid in state.pids.items():
        assert read_pid(lab.host(name).run_dir / "libvirtd.pid") == pid


@pytest.mark.lab
def test_hosts_have_own_hostname_and_uuid(lab):
    state = json.loads((lab.root / "lab.json").read_text())
    recorded_uuids = {host["name"]: host["host_uuid"] for host in state["hosts"]}
    seen_uuids = set()
    for name in ("h1", "h2"):
        info = lab.host(name)
        connection = libvirt.open(info.libvirt_uri)
        try:
            assert connection.getHostname() == f"{RUN_PREFIX}-{name}"
            host_uuid = ET.fromstring(connection.getCapabilities()).findtext("host/uuid")
        finally:
            connection.close()
        assert host_uuid == recorded_uuids[name]
        seen_uuids.add(host_uuid)
        assert lab.exec(name, ["hostname"], timeout=10).stdout.strip() == info.hostname
    assert len(seen_uuids) == 2


@pytest.mark.lab
def test_hosts_reach_each_other(lab):
    h2 = lab.host("h2")
    result = lab.exec("h1", ["ping", "-c", "1", "-W", "5", h2.address], timeout=15)
    assert "1 received" in result.stdout
    result = lab.exec("client", ["ping", "-c", "1", "-W", "5", lab.host("h1").address], timeout=15)
    assert "1 received" in result.stdout
    # /etc/hosts inside a libvirt host names the other hosts.
    result = lab.exec("h2", ["ping", "-c", "1", "-W", "5", "h1"], timeout=15)
    assert "1 received" in result.stdout


@pytest.mark.lab
def test_exec_sees_private_directories(lab):
    listing = lab.exec("h1", ["ls", "/run/libvirt"], timeout=10).stdout.split()
    assert "libvirt-sock" in listing
    assert lab.exec("h1", ["cat", "/sys/class/net/br0/address"], timeout=10, check=False).returncode == 0
    qemu_conf = lab.exec("h1", ["cat", "/etc/libvirt/qemu.conf"], timeout=10).stdout.splitlines()
    assert "cgroup_controllers = [ ]" in qemu_conf
    assert f'shared_filesystems = [ "{lab.shared_dir}" ]' in qemu_conf
    # libvirtd resolves the listed folder when it starts, so the folder must exist by then.
    assert lab.exec("h2", ["test", "-d", str(lab.shared_dir)], timeout=10, check=False).returncode == 0


@pytest.mark.lab
def test_exec_reports_failures(lab):
    with pytest.raises(HostError, match="exit status 1"):
        lab.exec("h1", ["false"], timeout=10)
    assert lab.exec("h1", ["false"], timeout=10, check=False).returncode == 1
    with pytest.raises(HostError, match="timed out"):
        lab.exec("client", ["sleep", "5"], timeout=0.5)
    with pytest.raises(HostError, match="'h7' not found"):
        lab.exec("h7", ["true"], timeout=10)
    with pytest.raises(ConfigError):
        lab.exec("h1", [], timeout=10)


@pytest.mark.lab
def test_up_rejects_other_subnet(lab):
    other = LocalLab(lab.root, subnet="10.78.0.0/24", prefix=RUN_PREFIX)
    with pytest.raises(HostError, match="subnet"):
        other.up(hosts=2)


@pytest.mark.lab
def test_live_migration_h1_to_h2(lab):
    h1, h2 = lab.host("h1"), lab.host("h2")
    guest = f"{RUN_PREFIX}-guest"
    source = libvirt.open(h1.libvirt_uri)
    destination = libvirt.open(h2.libvirt_uri)
    try:
        domain = source.createXML(_guest_xml(lab, "h1", guest), 0)
        assert domain.isActive()
        assert netns.namespace_id(f"/proc/{_qemu_pid(lab, 'h1', guest)}/ns/net") \
            == netns.namespace_id(netns.netns_path(h1.netns))

        params = {libvirt.VIR_MIGRATE_PARAM_URI: h2.migration_uri}
        started = time.monotonic()
        call_with_timeout(lambda: domain.migrate3(destination, params, libvirt.VIR_MIGRATE_LIVE),
                          MIGRATION_TIMEOUT, "migration to h2")
        print(f"migration of a 64 MiB TCG guest took {time.monotonic() - started:.1f} s")

        migrated = destination.lookupByName(guest)
        state, reason = migrated.state()
        assert state == libvirt.VIR_DOMAIN_RUNNING
        assert reason == libvirt.VIR_DOMAIN_RUNNING_MIGRATED
        with pytest.raises(libvirt.libvirtError):
            source.lookupByName(guest)
        assert GUEST_MAC in migrated.XMLDesc(0)

        qemu_pid = _qemu_pid(lab, "h2", guest)
        assert netns.namespace_id(f"/proc/{qemu_pid}/ns/net") == netns.namespace_id(netns.netns_path(h2.netns))
        ports = json.loads(lab.exec("h2", ["ip", "-j", "link", "show", "master", "br0"], timeout=10).stdout)
        assert any(port["address"] == "fe" + GUEST_MAC[2:] for port in ports), ports

        # The guest has no disk, so its firmware halts the vCPU: CPU time is
        # no evidence, but QEMU's own run state on h2 is.
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(migrated, '{"execute": "query-status"}', 0))
        assert reply["return"]["status"] == "running"
    finally:
        source.close()
        destination.close()


@pytest.mark.lab
def test_up_adds_third_host(lab):
    pids_before = json.loads((lab.root / "lab.json").read_text())["pids"]

    state = lab.up(hosts=3)

    assert state.pids["h1"] == pids_before["h1"]
    assert state.pids["h2"] == pids_before["h2"]
    h3 = lab.host("h3")
    assert h3.address == "10.77.0.13"
    connection = libvirt.open(h3.libvirt_uri)
    try:
        assert connection.getHostname() == f"{RUN_PREFIX}-h3"
    finally:
        connection.close()
    assert "1 received" in lab.exec("h3", ["ping", "-c", "1", "-W", "5", "h1"], timeout=15).stdout
    assert "h3" in lab.exec("h1", ["cat", "/etc/hosts"], timeout=10).stdout
    assert [host.name for host in lab.hosts()] == ["h1", "h2", "h3", "client"]


@pytest.mark.lab
def test_status_reports_crash_leftovers(lab):
    guest = f"{RUN_PREFIX}-guest"
    status = lab.status()
    assert status.problems == []
    assert status.domains["h2"] == [guest]
    assert status.domains["h1"] == []

    killed = status.daemons["h2"]
    os.kill(killed, signal.SIGKILL)
    leftover = f"{RUN_PREFIX}-h9"
    subprocess.run(["ip", "netns", "add", leftover], check=True, timeout=10)
    deadline = time.monotonic() + 10
    while is_alive(killed) and time.monotonic() < deadline:
        time.sleep(0.1)

    status = lab.status()
    assert "h2" not in status.daemons
    assert status.unrecorded_namespaces == [leftover]
    assert any("libvirtd of h2 is not running" in problem for problem in status.problems), status.problems
    assert any(leftover in problem for problem in status.problems), status.problems
    qemu_namespaces = [process.namespace for process in status.processes if process.name.startswith("qemu-system")]
    assert qemu_namespaces == [f"{RUN_PREFIX}-h2"]
    assert "h9" in status.render()


@pytest.mark.lab
def test_up_restarts_killed_libvirtd(lab):
    guest = f"{RUN_PREFIX}-guest"
    state = lab.up(hosts=3)

    assert is_alive(state.pids["h2"])
    connection = libvirt.open(lab.host("h2").libvirt_uri)
    try:
        # The new libvirtd finds the guest that kept running without it.
        assert connection.lookupByName(guest).isActive()
    finally:
        connection.close()
    assert not any("libvirtd" in problem for problem in lab.status().problems)


@pytest.mark.lab
def test_up_restarts_libvirtd_after_config_change(lab):
    guest = f"{RUN_PREFIX}-guest"
    qemu_conf = lab.host_dir("h2") / "etc/libvirt/qemu.conf"
    written = qemu_conf.read_text()
    pids_before = json.loads((lab.root / "lab.json").read_text())["pids"]
    qemu_conf.write_text(written.replace("shared_filesystems = ", "# shared_filesystems = "))

    state = lab.up(hosts=3)

    assert qemu_conf.read_text() == written
    assert state.pids["h2"] != pids_before["h2"]
    assert not is_alive(pids_before["h2"])
    assert state.pids["h1"] == pids_before["h1"]
    assert state.pids["h3"] == pids_before["h3"]
    connection = libvirt.open(lab.host("h2").libvirt_uri)
    try:
        assert connection.lookupByName(guest).isActive()
    finally:
        connection.close()


@pytest.mark.lab
def test_down_removes_everything(lab_run):
    lab = lab_run.lab
    namespaces = [name for name in netns.list_netns() if name.startswith(RUN_PREFIX + "-")]
    ids = {}
    for name in namespaces:
        ids[netns.namespace_id(netns.netns_path(name))] = name
    for path in (lab.root / "ns").iterdir():
        ids[netns.namespace_id(path)] = path.name
    processes = find_processes(ids)
    assert {process.name for process in processes} >= {"libvirtd", "qemu-system-x86"}

    started = time.monotonic()
    removed = lab.down()
    print(f"down of a 3-host lab with one guest took {time.monotonic() - started:.1f} s")

    assert f"network namespace {RUN_PREFIX}-h9" in removed
    assert f"directory {lab.root}" in removed
    assert any(item.startswith("process ") and "qemu" in item for item in removed), removed
    assert [name for name in netns.list_netns() if name.startswith(RUN_PREFIX + "-")] == []
    assert mount_points_under(lab.root) == []
    assert find_processes(ids) == []
    assert not any(is_alive(process.pid) for process in processes)
    assert not lab.root.exists()
    assert _root_netns_snapshot() == lab_run.root_netns_before
    assert not lab.status().exists


@pytest.mark.lab
def test_down_twice_removes_nothing(lab):
    assert lab.down() == []


# A second lab, for crashes in the middle of up and a lost lab.json.

@pytest.fixture
def crash_lab():
    _require_lab_prerequisites()
    state_dir = _state_dir(CRASH_PREFIX)
    local_lab = LocalLab(state_dir / "lab", prefix=CRASH_PREFIX, stop_grace=2.0)
    try:
        yield local_lab
    finally:
        local_lab.down()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.mark.lab
def test_up_repairs_half_made_host(crash_lab):
    crash_lab.up(hosts=1)
    switch = f"{CRASH_PREFIX}-sw"
    # What a crash in the middle of up leaves: a veth pair not yet made and
    # a mount namespace whose UTS partner is not pinned.
    subprocess.run(["ip", "-n", switch, "link", "delete", "veth-h1"], check=True, timeout=10)
    subprocess.run(["umount", str(crash_lab.root / "ns/h1.uts")], check=True, timeout=10)
    assert "1 received" not in crash_lab.exec("client", ["ping", "-c", "1", "-W", "1", "10.77.0.11"],
                                              timeout=10, check=False).stdout

    crash_lab.up(hosts=1)

    assert "1 received" in crash_lab.exec("client", ["ping", "-c", "1", "-W", "5", "10.77.0.11"],
                                          timeout=15).stdout
    connection = libvirt.open(crash_lab.host("h1").libvirt_uri)
    try:
        assert connection.getHostname() == f"{CRASH_PREFIX}-h1"
    finally:
        connection.close()
    assert crash_lab.status().problems == []


@pytest.mark.lab
def test_down_after_crash_without_state(crash_lab):
    crash_lab.up(hosts=1)
    guest = f"{CRASH_PREFIX}-guest"
    connection = libvirt.open(crash_lab.host("h1").libvirt_uri)
    try:
        connection.createXML(_guest_xml(crash_lab, "h1", guest), 0)
    finally:
        connection.close()
    qemu_pid = _qemu_pid(crash_lab, "h1", guest)
    libvirtd_pid = read_pid(crash_lab.host("h1").run_dir / "libvirtd.pid")
    # A stopped QEMU leaves SIGTERM pending, like a QEMU paused in postcopy
    # that ignores it, so down has to escalate to SIGKILL.
    os.kill(qemu_pid, signal.SIGSTOP)
    os.kill(libvirtd_pid, signal.SIGKILL)
    (crash_lab.root / "lab.json").unlink()

    status = crash_lab.status()
    assert status.state is None
    assert sorted(status.unrecorded_namespaces) == sorted(f"{CRASH_PREFIX}-{name}"
                                                          for name in ("sw", "client", "h1"))
    assert str(crash_lab.root / "ns/h1.mnt") in status.mounts
    assert any(process.pid == qemu_pid for process in status.processes)
    with pytest.raises(HostError, match="leftovers"):
        crash_lab.up(hosts=1)

    started = time.monotonic()
    removed = crash_lab.down()

    assert time.monotonic() - started >= 2.0, "down did not wait for SIGTERM before SIGKILL"
    assert any(item.startswith(f"process {qemu_pid} ") for item in removed), removed
    assert not is_alive(qemu_pid)
    assert [name for name in netns.list_netns() if name.startswith(CRASH_PREFIX + "-")] == []
    assert mount_points_under(crash_lab.root) == []
    assert not crash_lab.root.exists()
