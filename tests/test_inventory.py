"""Inventory loading and validation: every problem names file, line, field, value and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.errors import ConfigError
from lab.hosts.access import LOCAL, LOCAL_SSH, choose_lab
from lab.inventory import (Inventory, InventoryError, _address_problem, load_inventory, render_inventory,
                           write_inventory)
from lab.playbook import load_playbook

VALID = """\
name: two-servers
network:
  subnet: 10.77.0.0/24
  guest_address: 10.77.0.100/24
hosts:
  - name: h1
    role: libvirt
    address: 10.77.0.11
    user: root
    key_file: keys/lab_key
    lab_address: 10.77.0.11
  - name: h2
    role: libvirt
    address: 10.77.0.12
    port: 2222
    user: root
    key_file: keys/lab_key
    libvirt_uri: qemu:///system
    lab_address: 10.77.0.12
    migration_interface: br0
  - name: client
    role: client
    address: 10.77.0.2
    user: root
    key_file: keys/lab_key
    lab_address: 10.77.0.2
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/lab_key").write_text("not a real key; the loader checks only that the file exists\n")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "inventory.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(folder: Path, text: str) -> InventoryError:
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        load_inventory(path)
    assert isinstance(caught.value, InventoryError)
    return caught.value


def error_for(error: InventoryError, field: str) -> ConfigError:
    matches = [item for item in error.errors if item.field == field]
    assert matches, f"no error for {field}: {[str(item) for item in error.errors]}"
    return matches[0]


def test_valid_inventory_loads(folder):
    inventory = load_inventory(write(folder, VALID))
    assert [host.name for host in inventory.libvirt_hosts] == ["h1", "h2"]
    assert inventory.hosts[0].port == 22
    assert inventory.hosts[0].local_libvirt_uri == "qemu:///system"
    assert inventory.hosts[2].local_libvirt_uri is None
    assert inventory.key_path(inventory.hosts[0]) == folder.resolve() / "keys/lab_key"
    assert inventory.known_hosts_path == folder.resolve() / "known_hosts"
    assert inventory.hosts[1].migration_uri == "tcp://10.77.0.12"
    assert str(inventory.guest_interface) == "10.77.0.100/24"


def test_remote_uri_uses_libssh(folder):
    inventory = load_inventory(write(folder, VALID))
    uri = urlsplit(inventory.remote_libvirt_uri(inventory.hosts[1]))
    assert uri.scheme == "qemu+libssh"
    assert uri.netloc == "root@10.77.0.12:2222"
    assert uri.path == "/system"
    params = parse_qs(uri.query)
    assert params["keyfile"] == [str(folder.resolve() / "keys/lab_key")]
    assert params["known_hosts"] == [str(folder.resolve() / "known_hosts")]
    assert params["known_hosts_verify"] == ["normal"]
    assert params["sshauth"] == ["privkey"]


def test_remote_uri_quotes_paths(tmp_path):
    folder = tmp_path / "lab with space&more"
    (folder / "keys").mkdir(parents=True)
    (folder / "keys/lab_key").write_text("key\n")
    inventory = load_inventory(write(folder, VALID))
    uri = inventory.remote_libvirt_uri(inventory.hosts[0])
    assert " " not in uri
    assert "&more" not in uri
    assert parse_qs(urlsplit(uri).query)["keyfile"] == [str(folder.resolve() / "keys/lab_key")]


def test_missing_field_names_host_and_fix(folder):
    error = load_error(folder, VALID.replace("    user: root\n    key_file: keys/lab_key\n    lab_address: 10.77.0.11\n",
                                             "    key_file: keys/lab_key\n    lab_address: 10.77.0.11\n"))
    problem = error_for(error, "hosts[0].user")
    assert problem.args[0] == "required key is missing"
    assert problem.line == 6
    assert problem.fix == "Add it"
    assert str(problem).startswith(f"{folder / 'inventory.yaml'}:6: field 'hosts[0].user'")


def test_unknown_key_suggests_the_right_one(folder):
    error = load_error(folder, VALID.replace("    address: 10.77.0.12\n", "    adress: 10.77.0.12\n"))
    problem = error_for(error, "hosts[1].adress")
    assert problem.args[0] == "unknown key"
    assert problem.value == "adress"
    assert problem.fix == "Did you mean 'address'?"
    assert problem.line == 14
    # The missing address is reported too, on the host's line.
    assert error_for(error, "hosts[1].address").args[0] == "required key is missing"


def test_unknown_top_level_key_lists_valid_keys(folder):
    error = load_error(folder, VALID + "colour: blue\n")
    problem = error_for(error, "colour")
    assert problem.args[0] == "unknown key"
    assert "hosts" in problem.fix
    assert "network" in problem.fix


@pytest.mark.parametrize("address, message", [
    ("10.77.0.300", "invalid IPv4 address"),
    ("-oProxyCommand=touch /tmp/x", "invalid address: neither an IP address nor a DNS name"),
    ("host name", "invalid address: neither an IP address nor a DNS name"),
    ("host_name.example", "invalid address: neither an IP address nor a DNS name"),
])
def test_bad_ssh_address(folder, address, message):
    error = load_error(folder, VALID.replace("    address: 10.77.0.11\n", f"    address: '{address}'\n"))
    problem = error_for(error, "hosts[0].address")
    assert problem.args[0] == message
    assert problem.value == address
    assert problem.fix == "Give the SSH server's IP address or DNS name"
    assert problem.line == 8


@pytest.mark.parametrize("address", ["server-a", "server-a.lab.internal", "10.77.0.11", "fd00::11"])
def test_good_ssh_addresses(address):
    assert _address_problem(address) is None


@given(st.text(min_size=1, max_size=40))
def test_address_check_never_accepts_option_like_text(text):
    if text.startswith("-") or any(character.isspace() for character in text):
        assert _address_problem(text) is not None


def test_lab_address_outside_subnet(folder):
    error = load_error(folder, VALID.replace("    lab_address: 10.77.0.12\n", "    lab_address: 10.78.0.12\n"))
    problem = error_for(error, "hosts[1].lab_address")
    assert problem.args[0] == "not a host address of the lab network 10.77.0.0/24"
    assert problem.value == "10.78.0.12"
    assert "10.77.0.0/24" in problem.fix


def test_lab_address_not_an_address(folder):
    error = load_error(folder, VALID.replace("    lab_address: 10.77.0.2\n", "    lab_address: client\n"))
    problem = error_for(error, "hosts[2].lab_address")
    assert problem.args[0] == "invalid IP address"
    assert problem.value == "client"


def test_bad_subnet_and_guest_address(folder):
    error = load_error(folder, VALID.replace("subnet: 10.77.0.0/24", "subnet: 10.77.0.1/24")
                       .replace("guest_address: 10.77.0.100/24", "guest_address: 10.77.0.11/24"))
    assert error_for(error, "network.subnet").args[0] == "invalid network"
    assert error_for(error, "network.subnet").line == 3
    assert error_for(error, "network.guest_address").args[0] == "is also the lab address of a host"


def test_key_file_not_found(folder):
    error = load_error(folder, VALID.replace("    key_file: keys/lab_key\n    lab_address: 10.77.0.2\n",
                                             "    key_file: keys/missing_key\n    lab_address: 10.77.0.2\n"))
    problem = error_for(error, "hosts[2].key_file")
    assert problem.args[0] == "key file not found"
    assert problem.value == "keys/missing_key"
    assert f"ssh-keygen -t ed25519 -N '' -f {folder / 'keys/missing_key'}" in problem.fix
    text = str(problem)
    assert str(folder / "inventory.yaml") in text
    assert "hosts[2].key_file" in text
    assert "'keys/missing_key'" in text


def test_duplicate_host_names(folder):
    error = load_error(folder, VALID.replace("  - name: h2\n", "  - name: h1\n"))
    problem = error_for(error, "hosts[1].name")
    assert problem.args[0] == "duplicate of hosts[0].name"
    assert problem.value == "h1"
    assert problem.fix == "Give each host a unique name"
    assert problem.line == 12


def test_duplicate_lab_addresses(folder):
    error = load_error(folder, VALID.replace("    lab_address: 10.77.0.12\n", "    lab_address: 10.77.0.11\n"))
    assert error_for(error, "hosts[1].lab_address").args[0] == "duplicate of hosts[0].lab_address"


def test_one_libvirt_host_cannot_migrate(folder):
    path = write(folder, VALID.replace("    role: libvirt\n    address: 10.77.0.12", "    role: client\n    address: 10.77.0.12")
                 .replace("    libvirt_uri: qemu:///system\n", ""))
    inventory = load_inventory(path)
    assert [host.name for host in inventory.libvirt_hosts] == ["h1"]
    with pytest.raises(ConfigError) as caught:
        inventory.migration_hosts()
    assert caught.value.args[0] == "a migration needs two libvirt hosts, found 1"
    assert caught.value.path == str(path.resolve())
    assert caught.value.field == "hosts"
    assert caught.value.value == ["h1"]
    assert caught.value.fix == "List two hosts with role: libvirt"


def test_migration_hosts_are_first_two(folder):
    source, destination = load_inventory(write(folder, VALID)).migration_hosts()
    assert (source.name, destination.name) == ("h1", "h2")


def test_inventory_without_libvirt_host(folder):
    text = VALID.replace("role: libvirt", "role: client").replace("    libvirt_uri: qemu:///system\n", "")
    problem = error_for(load_error(folder, text), "hosts")
    assert problem.args[0] == "no host has role: libvirt"


def test_remote_libvirt_uri_rejected(folder):
    error = load_error(folder, VALID.replace("libvirt_uri: qemu:///system", "libvirt_uri: qemu+ssh://h2/system"))
    problem = error_for(error, "hosts[1].libvirt_uri")
    assert "without transport or host name" in problem.args[0]
    assert problem.fix.startswith("Use qemu:///system")


def test_client_with_libvirt_uri_rejected(folder):
    error = load_error(folder, VALID.replace("    lab_address: 10.77.0.2\n",
                                             "    lab_address: 10.77.0.2\n    libvirt_uri: qemu:///system\n"))
    assert error_for(error, "hosts[2].libvirt_uri").args[0] == "a client host runs no libvirtd"


def test_unknown_role(folder):
    error = load_error(folder, VALID.replace("role: client", "role: probe"))
    problem = error_for(error, "hosts[2].role")
    assert problem.args[0] == "invalid value"
    assert "'libvirt'" in problem.fix
    assert "'client'" in problem.fix


def test_port_out_of_range(folder):
    error = load_error(folder, VALID.replace("port: 2222", "port: 70000"))
    assert error_for(error, "hosts[1].port").value == 70000


def test_relative_image_dir_rejected(folder):
    error = load_error(folder, VALID + "image_dir: images\n")
    assert error_for(error, "image_dir").args[0] == "must be an absolute path without '..'"


def test_errors_are_sorted_by_line(folder):
    error = load_error(folder, VALID.replace("  - name: h2\n", "  - name: h1\n").replace("10.77.0.300", "x")
                       .replace("    lab_address: 10.77.0.2\n", "    lab_address: nowhere\n"))
    lines = [item.line for item in error.errors]
    assert len(lines) == 2
    assert lines == sorted(lines)
    assert str(error).startswith(f"{folder / 'inventory.yaml'}: invalid inventory, 2 errors")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="inventory not found"):
        load_inventory(tmp_path / "absent.yaml")


def test_invalid_yaml_has_line(folder):
    path = write(folder, "hosts: [\n")
    with pytest.raises(ConfigError, match="invalid YAML") as caught:
        load_inventory(path)
    assert caught.value.line is not None


def test_rendered_inventory_loads_back(folder):
    inventory = load_inventory(write(folder, VALID))
    path = folder / "copy.yaml"
    write_inventory(path, render_inventory(inventory))
    copy = load_inventory(path)
    assert copy.model_dump() == inventory.model_dump()
    assert path.read_text().startswith("# Inventory of the lab two-servers")


def test_code_built_inventory_is_checked():
    with pytest.raises(ValueError, match=r"hosts\[0\].lab_address: not a host address"):
        Inventory.model_validate({"name": "x", "network": {"subnet": "10.77.0.0/24",
                                                           "guest_address": "10.77.0.100/24"},
                                  "hosts": [{"name": "h1", "role": "libvirt", "address": "10.77.0.11",
                                             "user": "root", "key_file": "k", "lab_address": "10.78.0.11"}]})


# The playbook's inventory and link values.

PLAYBOOK = """\
experiment: pick-lab
guest:
  memory_mib: 128
workload:
  working_set_mib: 16
  dirty_rate_mib_s: 4
migration:
  strategy: precopy
"""


def test_playbook_inventory_defaults_to_local(tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(PLAYBOOK)
    choice = choose_lab(load_playbook(path))
    assert choice.transport == "namespaces"
    assert choice.local
    assert choose_lab(load_playbook(path), LOCAL_SSH).transport == "ssh"
    assert choose_lab(load_playbook(path), LOCAL).label == "local"


def test_playbook_inventory_path_is_relative_to_playbook(folder):
    write(folder, VALID)
    playbooks = folder / "playbooks"
    playbooks.mkdir()
    path = playbooks / "playbook.yaml"
    path.write_text(PLAYBOOK + "inventory: ../inventory.yaml\n")
    choice = choose_lab(load_playbook(path))
    assert choice.transport == "ssh"
    assert not choice.local
    assert choice.inventory_path == (folder / "inventory.yaml").resolve()


def test_playbook_inventory_missing_file(tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(PLAYBOOK + "inventory: servers.yaml\n")
    with pytest.raises(ConfigError) as caught:
        choose_lab(load_playbook(path))
    assert caught.value.field == "inventory"
    assert caught.value.value == "servers.yaml"
    assert caught.value.path == str(path)
    assert "local-ssh" in caught.value.fix


def test_link_rate_in_matrix_names_scenarios(tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(PLAYBOOK + "link:\n  rate_mib_s: 16\nmatrix:\n  link_rate_mib_s: [16, null]\n")
    scenarios = load_playbook(path).scenarios()
    assert [scenario.scenario_id for scenario in scenarios] == ["link16", "linkunshaped"]
    assert [scenario.link_rate_mib_s for scenario in scenarios] == [16, None]


def test_link_rate_base_value(tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(PLAYBOOK + "link:\n  rate_mib_s: 24\n")
    assert load_playbook(path).scenarios()[0].link_rate_mib_s == 24


def test_link_rate_must_be_positive(tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(PLAYBOOK + "link:\n  rate_mib_s: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_playbook(path)
    assert caught.value.field == "link.rate_mib_s"
    assert caught.value.line == 10
