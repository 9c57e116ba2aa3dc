"""Domain XML and ownership marks, on libvirt's test driver."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from lab import domain
from lab.errors import LabError, OwnershipError


def make_spec(name: str = "mlab-001-abc", run_id: str = "precopy-rate4-r1", **overrides) -> domain.GuestSpec:
    values = dict(name=name, run_id=run_id, memory_mib=256, vcpus=1, kernel=Path("/images/x/vmlinuz"),
                  initrd=Path("/images/x/initrd.img"), cmdline="console=ttyS0 mlab.wss=64",
                  accelerator="tcg", mac=domain.guest_mac(100))
    values.update(overrides)
    return domain.GuestSpec(**values)


def test_domain_xml_tcg_guest():
    root = ET.fromstring(domain.domain_xml(make_spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "mlab-001-abc"
    assert root.find("memory").get("unit") == "MiB"
    assert root.findtext("memory") == "256"
    assert root.findtext("os/kernel") == "/images/x/vmlinuz"
    assert root.findtext("os/cmdline") == "console=ttyS0 mlab.wss=64"
    assert root.find("devices/serial/source").get("path") == "/var/log/libvirt/qemu/mlab-001-abc-console.log"
    assert root.find("devices/interface/source").get("bridge") == "br0"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:6d:00:64"
    owner = root.find(f"metadata/{{{domain.OWNER_NAMESPACE}}}owner")
    assert owner is not None
    assert owner.get("run") == "precopy-rate4-r1"


def test_domain_xml_without_serial_console():
    root = ET.fromstring(domain.domain_xml(make_spec(serial_console=False)))
    assert root.find("devices/serial") is None
    assert root.find("devices/console") is None
    assert root.find("devices/interface/source").get("bridge") == "br0"


def test_domain_xml_kvm_has_no_tcg_cpu_model():
    root = ET.fromstring(domain.domain_xml(make_spec(accelerator="kvm")))
    assert root.get("type") == "kvm"
    assert root.find("cpu") is None


def test_domain_xml_escapes_values():
    root = ET.fromstring(domain.domain_xml(make_spec(cmdline="a<b & 'c'", run_id='r"1')))
    assert root.findtext("os/cmdline") == "a<b & 'c'"
    assert root.find(f"metadata/{{{domain.OWNER_NAMESPACE}}}owner").get("run") == 'r"1'


def test_domain_xml_rejects_unprefixed_name():
    with pytest.raises(LabError, match="must start with 'mlab-'"):
        domain.domain_xml(make_spec(name="guest1"))


@pytest.fixture
def test_conn():
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def driver_xml(spec: domain.GuestSpec) -> str:
    return domain.domain_xml(spec).replace('type="qemu"', 'type="test"', 1)


def test_owned_domain_recognised(test_conn):
    dom = test_conn.createXML(driver_xml(make_spec()), 0)
    assert domain.owner_run(dom) == "precopy-rate4-r1"
    assert domain.require_owned(dom) == "precopy-rate4-r1"
    assert [d.name() for d in domain.owned_domains(test_conn)] == ["mlab-001-abc"]


def test_foreign_domain_never_destroyed(test_conn):
    foreign = test_conn.lookupByName("test")
    with pytest.raises(OwnershipError, match="no migration-lab ownership mark"):
        domain.destroy(foreign)
    assert foreign.isActive()


def test_prefixed_name_without_mark_is_foreign(test_conn):
    xml = driver_xml(make_spec(name="mlab-impostor"))
    root = ET.fromstring(xml)
    root.remove(root.find("metadata"))
    impostor = test_conn.createXML(ET.tostring(root, encoding="unicode"), 0)
    assert domain.owner_run(impostor) is None
    with pytest.raises(OwnershipError):
        domain.destroy(impostor)
    assert impostor.isActive()


def test_destroy_owned_domain(test_conn):
    dom = test_conn.createXML(driver_xml(make_spec()), 0)
    domain.destroy(dom)
    assert "mlab-001-abc" not in [d.name() for d in test_conn.listAllDomains()]
    domain.destroy(dom)  # a second call finds nothing to do


def test_boot_refuses_name_collision_with_foreign_domain(test_conn):
    xml = driver_xml(make_spec(name="mlab-taken"))
    root = ET.fromstring(xml)
    root.remove(root.find("metadata"))
    test_conn.createXML(ET.tostring(root, encoding="unicode"), 0)
    with pytest.raises(OwnershipError):
        domain.boot(test_conn, make_spec(name="mlab-taken"))


# The controlling machine's identity in the ownership mark.

MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"


def write_machine_id(folder: Path, text: str) -> Path:
    path = folder / "machine-id"
    path.write_text(text)
    return path


def test_controller_id_derived_from_machine_id(tmp_path):
    path = write_machine_id(tmp_path, MACHINE_ID + "\n")
    first = domain.read_controller_id((path,), tmp_path / "fallback")
    again = domain.read_controller_id((path,), tmp_path / "fallback")
    assert first == again
    assert len(first) == 32
    assert int(first, 16) >= 0
    assert MACHINE_ID not in first
    assert not (tmp_path / "fallback").exists()


def test_controller_id_differs_between_machines(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = domain.read_controller_id((write_machine_id(tmp_path / "a", MACHINE_ID),), tmp_path / "fallback")
    other = domain.read_controller_id((write_machine_id(tmp_path / "b", "0123456789abcdef0123456789abcdef"),),
                                      tmp_path / "fallback")
    assert one != other


def test_controller_id_tries_next_file(tmp_path):
    second = write_machine_id(tmp_path, MACHINE_ID)
    direct = domain.read_controller_id((second,), tmp_path / "fallback")
    assert domain.read_controller_id((tmp_path / "missing", second), tmp_path / "fallback") == direct


@pytest.mark.parametrize("text", ["", "uninitialized\n", "0" * 32, "3D1219C7C4C5404AAA1F6D2A48ADFDA4"])
def test_controller_id_without_machine_id_is_stored(tmp_path, text):
    path = write_machine_id(tmp_path, text)
    fallback = tmp_path / "state" / "controller-id"
    first = domain.read_controller_id((path,), fallback)
    assert fallback.read_text().strip() == first
    assert len(first) == 32
    assert domain.read_controller_id((path,), fallback) == first


def test_mark_names_controller(test_conn):
    dom = test_conn.createXML(driver_xml(make_spec(controller="c" * 32, controller_host="laptop-b")), 0)
    mark = domain.owner_mark(dom)
    assert mark is not None
    assert mark.run == "precopy-rate4-r1"
    assert mark.controller == "c" * 32
    assert mark.controller_host == "laptop-b"


def test_mark_defaults_to_this_machine():
    spec = make_spec()
    assert spec.controller == domain.controller_id()
    owner = ET.fromstring(domain.domain_xml(spec)).find(f"metadata/{{{domain.OWNER_NAMESPACE}}}owner")
    assert owner.get("controller") == domain.controller_id()
    assert owner.get("controller-host") == socket.gethostname()


def test_controller_id_unwritable_fallback(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be\n")
    with pytest.raises(LabError, match="systemd-machine-id-setup"):
        domain.read_controller_id((tmp_path / "missing",), blocker / "controller-id")


def test_old_mark_has_unknown_controller(test_conn):
    xml = driver_xml(make_spec(controller=None))
    owner = ET.fromstring(xml).find(f"metadata/{{{domain.OWNER_NAMESPACE}}}owner")
    assert sorted(owner.attrib) == ["run"]
    dom = test_conn.createXML(xml, 0)
    mark = domain.owner_mark(dom)
    assert mark == domain.OwnerMark(run="precopy-rate4-r1", controller=None, controller_host=None)
    assert domain.owner_run(dom) == "precopy-rate4-r1"
    assert domain.require_owned(dom) == "precopy-rate4-r1"
