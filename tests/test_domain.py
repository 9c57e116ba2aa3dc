"""Domain XML and ownership marks, on libvirt's test driver."""

from __future__ import annotations

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
