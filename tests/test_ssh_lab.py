"""The SSH path on the real local lab: sshd per host, preflight, image push, host keys, runs.

Every namespace host of the session's lab runs an sshd on its lab address,
and the harness reaches it from the client's namespace exactly as it
reaches real servers. Two experiments of one precopy run each, one over SSH
and one on the fast path, both with a shaped link, serve several tests.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import libvirt
import paramiko
import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from lab.cli import main
from lab.errors import HostError
from lab.hosts.checks import CHECKS, CLIENT_CHECKS, Requirements, check_host, check_hosts
from lab.hosts.image_push import IMAGE_FILES, push_image
from lab.hosts.innetns import call_in_netns
from lab.hosts.remote import HostKeyChangedError, RemoteHost
from lab.inventory import load_inventory, render_inventory, write_inventory
from lab.paths import state_dir
from lab.playbook import load_playbook
from lab.runner import ExperimentRunner
from lab.store import load_record

pytestmark = pytest.mark.lab

WORKING_SET_MIB = 48
LINK_RATE_MIB_S = 24
# A private directory of every libvirt host of the local lab, so a push to
# it really copies the image to each host separately.
PRIVATE_IMAGE_DIR = "/var/cache/libvirt/migrlab-push-test"

PLAYBOOK = f"""
experiment: ssh-precopy
description: one precopy run on a link shaped to {LINK_RATE_MIB_S} MiB/s
guest:
  memory_mib: 192
workload:
  working_set_mib: {WORKING_SET_MIB}
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: precopy
  downtime_limit_ms: 300
  max_time_s: 120
link:
  rate_mib_s: {LINK_RATE_MIB_S}
inventory: {{inventory}}
"""


@pytest.fixture(scope="module")
def inventory(shared_lab):
    loaded = load_inventory(shared_lab.inventory_file)
    yield loaded
    # The accelerator verdicts that preflight and the SSH run cached for this session's lab.
    shutil.rmtree(state_dir() / "accelerator" / loaded.name, ignore_errors=True)


def copy_inventory(inventory, folder: Path, *, known_hosts: Path | None = None, image_dir: str | None = None,
                   ports: dict[str, int] | None = None) -> Path:
    """Write a copy of the lab's inventory into ``folder`` with absolute paths and the given changes."""
    data = inventory.model_dump(mode="json", exclude_none=True)
    data["known_hosts"] = str(known_hosts or inventory.known_hosts_path)
    if image_dir is not None:
        data["image_dir"] = image_dir
    for host in data["hosts"]:
        host["key_file"] = str(inventory.resolve(host["key_file"]))
        host["port"] = (ports or {}).get(host["name"], host["port"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inventory.yaml"
    write_inventory(path, render_inventory(type(inventory).model_validate(data)))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The local lab's SSH servers.

def test_lab_writes_inventory_and_runs_sshd(shared_lab, inventory):
    assert [host.name for host in inventory.hosts] == ["h1", "h2", "client"]
    assert inventory.control_netns == shared_lab.netns_name("client")
    status = shared_lab.status()
    assert set(status.ssh_daemons) == {"h1", "h2", "client"}
    assert not [problem for problem in status.problems if "sshd" in problem]


@pytest.mark.parametrize("name", ["h1", "client"])
def test_sshd_listens_only_on_lab_address(shared_lab, name):
    listening = shared_lab.exec(name, ["ss", "-Hltn", "sport", "=", ":22"], timeout=10).stdout.split()
    addresses = [field for field in listening if field.endswith(":22")]
    assert addresses == [f"{shared_lab.host(name).address}:22"]


def test_sshd_offers_public_key_login_only(shared_lab, inventory):
    host = inventory.host("h2")

    def offered() -> list[str]:
        with paramiko.Transport((host.address, host.port)) as transport:
            transport.start_client(timeout=10)
            try:
                transport.auth_none("root")
            except paramiko.BadAuthenticationType as error:
                return list(error.allowed_types)
        return []

    assert call_in_netns(inventory.control_netns, offered, 30, "asking sshd for its methods") == ["publickey"]


# Preflight.

@pytest.fixture(scope="module")
def preflight(inventory, guest_image):
    return check_hosts(inventory, guest_image, Requirements())


def test_preflight_passes_on_every_host(preflight):
    assert preflight.ok, [(report.host.name, report.failures) for report in preflight.hosts]
    assert [report.host.name for report in preflight.hosts] == ["h1", "h2", "client"]


@pytest.mark.parametrize("name", ["h1", "h2"])
def test_preflight_checks_libvirt_hosts(preflight, name):
    results = next(report for report in preflight.hosts if report.host.name == name).results
    assert set(results) == set(CHECKS)
    assert {check: result.status for check, result in results.items()} == dict.fromkeys(CHECKS, "ok")
    assert results["accelerator"].summary in ("kvm", "tcg")
    assert results["libvirt"].summary.count("/") == 1
    assert results["ssh"].detail.startswith("ssh-ed25519 SHA256:")


def test_preflight_checks_client(preflight):
    results = next(report for report in preflight.hosts if report.host.name == "client").results
    assert set(results) == set(CLIENT_CHECKS)
    # All hosts of the local lab share this machine's clock.
    offset = float(results["clock"].summary.split("±")[0])
    assert abs(offset) < 50


def test_preflight_reports_unreachable_host(inventory, guest_image, tmp_path):
    path = copy_inventory(inventory, tmp_path, ports={"h2": 2222})
    broken = load_inventory(path)
    report = check_host(broken.host("h2"), broken, guest_image, {}, Requirements())
    assert report.results["ssh"].status == "fail"
    assert report.results["ssh"].summary == "unreachable"
    assert "10.77.0.12 port 2222" in report.results["ssh"].detail
    assert {report.results[name].status for name in CHECKS[1:]} == {"skip"}
    assert report.failures


def test_hosts_check_command_fails_for_unreachable_hosts(inventory, tmp_path):
    path = copy_inventory(inventory, tmp_path, ports={"h1": 2222, "h2": 2222, "client": 2222})
    result = CliRunner().invoke(main, ["hosts", "check", str(path)])
    assert result.exit_code == 1
    for name in ("h1", "h2", "client"):
        assert f"{name} ssh fail: cannot reach {name} (root@" in result.output
    assert "error: hosts failed needed checks: client, h1, h2" in result.output


# Image push.

@pytest.fixture
def private_image_dir(shared_lab):
    folders = [shared_lab.host_dir(name) / PRIVATE_IMAGE_DIR.lstrip("/") for name in ("h1", "h2")]
    yield folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def test_image_push_copies_then_skips(inventory, guest_image, tmp_path, private_image_dir):
    inventory_copy = load_inventory(copy_inventory(inventory, tmp_path, image_dir=PRIVATE_IMAGE_DIR))
    assert not any(folder.exists() for folder in private_image_dir)

    first = push_image(inventory_copy, guest_image)
    assert [(result.host, result.action) for result in first] == [("h1", "pushed"), ("h2", "pushed")]
    assert all(result.bytes_sent > 1_000_000 for result in first)
    for folder in private_image_dir:
        files = sorted(path.name for path in (folder / guest_image.digest).iterdir())
        assert files == sorted(IMAGE_FILES)
        for name in IMAGE_FILES:
            assert sha256(folder / guest_image.digest / name) == sha256(guest_image.directory / name)

    second = push_image(inventory_copy, guest_image)
    assert [(result.host, result.action) for result in second] == [("h1", "present"), ("h2", "present")]
    assert all(result.bytes_sent == 0 for result in second)


def test_image_push_replaces_damaged_file(inventory, guest_image, tmp_path, private_image_dir):
    inventory_copy = load_inventory(copy_inventory(inventory, tmp_path, image_dir=PRIVATE_IMAGE_DIR))
    push_image(inventory_copy, guest_image)
    damaged = private_image_dir[1] / guest_image.digest / "initrd.img"
    damaged.write_bytes(b"not an initramfs")

    results = push_image(inventory_copy, guest_image)
    assert [(result.host, result.action) for result in results] == [("h1", "present"), ("h2", "pushed")]
    assert results[1].bytes_sent == guest_image.initrd.stat().st_size
    assert sha256(damaged) == sha256(guest_image.initrd)


# Host keys.

@pytest.fixture
def wrong_known_hosts(tmp_path, inventory):
    """A known_hosts that pins a key of another machine for h1."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
                   check=True, timeout=30)
    other = (tmp_path / "other.pub").read_text().split()
    path = tmp_path / "known_hosts"
    path.write_text(f"{inventory.host('h1').address} {other[0]} {other[1]}\n")
    return path


def test_changed_host_key_is_rejected(inventory, tmp_path, wrong_known_hosts):
    copy = load_inventory(copy_inventory(inventory, tmp_path / "copy", known_hosts=wrong_known_hosts))
    pinned_before = wrong_known_hosts.read_text()
    with pytest.raises(HostKeyChangedError) as caught:
        RemoteHost(copy.host("h1"), copy).connect()
    message = str(caught.value)
    assert f"ssh-keygen -R 10.77.0.11 -f {wrong_known_hosts}" in message
    assert "does not match the key pinned" in message
    private_key = copy.key_path(copy.host("h1")).read_text()
    assert "PRIVATE KEY" not in message
    assert private_key.splitlines()[1] not in message
    assert wrong_known_hosts.read_text() == pinned_before


def test_changed_host_key_is_rejected_by_libvirt(inventory, tmp_path, wrong_known_hosts):
    copy = load_inventory(copy_inventory(inventory, tmp_path / "copy", known_hosts=wrong_known_hosts))
    uri = copy.remote_libvirt_uri(copy.host("h1"))
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    with pytest.raises(libvirt.libvirtError, match="HOST KEY VERIFICATION FAILED"):
        call_in_netns(copy.control_netns, lambda: libvirt.open(uri), 60, "opening libvirt")


def test_changed_host_key_stops_the_run(inventory, tmp_path, wrong_known_hosts):
    copy_path = copy_inventory(inventory, tmp_path / "copy", known_hosts=wrong_known_hosts)
    playbook_path = tmp_path / "playbook.yaml"
    playbook_path.write_text(PLAYBOOK.format(inventory=copy_path))
    runner = ExperimentRunner(load_playbook(playbook_path), results_root=tmp_path / "results",
                              show_progress=False)
    with pytest.raises(HostKeyChangedError):
        runner.run()
    assert not list((tmp_path / "results/ssh-precopy/runs").glob("*"))


def test_unknown_host_key_is_pinned_on_first_use(shared_lab, inventory, tmp_path):
    known_hosts = tmp_path / "fresh_known_hosts"
    copy = load_inventory(copy_inventory(inventory, tmp_path / "copy", known_hosts=known_hosts))
    with RemoteHost(copy.host("h2"), copy) as remote:
        assert remote.run(["hostname"], timeout=30).stdout.strip() == shared_lab.netns_name("h2")
    server_key = (shared_lab.host_dir("h2") / "ssh/ssh_host_ed25519_key.pub").read_text().split()
    assert known_hosts.read_text().split() == ["10.77.0.12", server_key[0], server_key[1]]


def test_missing_key_file_is_reported_without_contents(inventory, tmp_path):
    data = YAML(typ="safe").load(copy_inventory(inventory, tmp_path / "copy").read_text())
    data["hosts"][0]["key_file"] = str(tmp_path / "gone")
    copy = type(inventory).model_validate(data)
    with pytest.raises(HostError, match="SSH key file .*gone of host h1 not found"):
        RemoteHost(copy.hosts[0], copy).connect()


# Experiments over SSH and on the fast path.

def run_experiment(shared_lab, folder: Path, inventory_value: str):
    folder.mkdir(parents=True, exist_ok=True)
    playbook_path = folder / "playbook.yaml"
    playbook_path.write_text(PLAYBOOK.format(inventory=inventory_value))
    runner = ExperimentRunner(load_playbook(playbook_path), results_root=folder / "results", lab=shared_lab,
                              show_progress=False)
    return runner.run()


@pytest.fixture(scope="module")
def ssh_experiment(shared_lab, guest_image, preflight, tmp_path_factory):
    # The playbook names the lab's own inventory file, so no part of the run
    # uses the local lab's namespaces: libvirt, consoles, tc and the
    # host-side figures all go over SSH.
    return run_experiment(shared_lab, tmp_path_factory.mktemp("ssh"), str(shared_lab.inventory_file))


@pytest.fixture(scope="module")
def local_experiment(shared_lab, guest_image, tmp_path_factory):
    return run_experiment(shared_lab, tmp_path_factory.mktemp("local"), "local")


def run_folder(experiment) -> Path:
    return experiment.experiment_dir / "runs" / "precopy-r1"


def test_precopy_over_ssh_completes(ssh_experiment):
    assert ssh_experiment.outcomes == {"precopy-r1": "completed"}
    record = load_record(run_folder(ssh_experiment))
    assert record.integrity.guest_alive
    assert record.integrity.bad_pages == 0
    assert record.stats.transferred_bytes >= WORKING_SET_MIB * 2**20
    assert any("probes skipped" in warning for warning in record.warnings)


@pytest.mark.parametrize("name", ["ssh_experiment", "local_experiment"])
def test_link_rate_limits_migration(request, name):
    record = load_record(run_folder(request.getfixturevalue(name)))
    assert record.scenario["link_rate_mib_s"] == LINK_RATE_MIB_S
    assert record.outcome == "completed"
    assert record.stats.memory_bps <= LINK_RATE_MIB_S * 2**20 * 1.1


@pytest.mark.parametrize("name", ["ssh_experiment", "local_experiment"])
def test_host_figures_in_record(request, name):
    record = load_record(run_folder(request.getfixturevalue(name)))
    figures = {figure.role: figure for figure in record.host_figures}
    assert set(figures) == {"source", "destination"}
    assert figures["source"].host == "h1"
    assert figures["destination"].host == "h2"
    assert figures["source"].interface == "br0"
    working_set = WORKING_SET_MIB * 2**20
    assert figures["source"].tx_bytes >= working_set
    assert figures["destination"].rx_bytes >= working_set
    assert figures["source"].tx_bytes >= record.stats.transferred_bytes
    for figure in figures.values():
        assert figure.qemu_cpu_ms > 0
        assert figure.samples >= 10
        assert figure.window_ms >= record.measured.wall_total_ms * 0.9
    samples = (run_folder(request.getfixturevalue(name)) / "host-samples.csv").read_text().splitlines()
    assert samples[0] == "t_s,host,role,rx_bytes,tx_bytes,qemu_cpu_ms"
    assert {line.split(",")[1] for line in samples[1:]} == {"h1", "h2"}


def test_same_results_layout_on_both_paths(ssh_experiment, local_experiment):
    over_ssh = {path.name for path in run_folder(ssh_experiment).iterdir()}
    local = {path.name for path in run_folder(local_experiment).iterdir()}
    core = {"record.json", "timeline.parquet", "events.json", "console-h1.log", "console-h2.log",
            "host-samples.csv"}
    assert core <= over_ssh
    # The fast path adds the client's probe files; everything the SSH run stores, it stores too.
    assert over_ssh <= local


def test_environment_read_from_source_host(ssh_experiment, shared_lab):
    environment = load_record(run_folder(ssh_experiment)).environment
    assert environment.host_kernel == shared_lab.exec("h1", ["uname", "-r"], timeout=10).stdout.strip()
    assert environment.cpu_model


def test_shaping_removed_after_runs(ssh_experiment, local_experiment, shared_lab):
    for name in ("h1", "h2"):
        qdiscs = shared_lab.exec(name, ["tc", "qdisc", "show", "dev", "br0"], timeout=10).stdout
        assert "tbf" not in qdiscs, (name, qdiscs)


def test_no_guest_left_after_runs(ssh_experiment, local_experiment, shared_lab):
    assert all(not names for names in shared_lab.status().domains.values())
