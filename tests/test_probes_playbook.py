"""The playbook's probes section and the NIC model as a matrix value."""

from __future__ import annotations

import pytest

from lab.domain import GuestSpec, domain_xml
from lab.playbook import PlaybookError, load_playbook
from lab.probes.session import ProbePlan

BASE = """\
experiment: probes-check
guest:
  memory_mib: 192
workload:
  working_set_mib: 64
  dirty_rate_mib_s: 8
migration:
  strategy: precopy
"""


def write(tmp_path, text):
    path = tmp_path / "playbook.yaml"
    path.write_text(text)
    return path


def test_probes_run_by_default(tmp_path):
    plan = ProbePlan.from_section(load_playbook(write(tmp_path, BASE)).probes)
    assert plan.echo_rate_hz == 1000.0
    assert plan.stream_rate_kib_s == 64.0
    assert plan.capture
    assert plan.any


def test_probes_turned_off_one_by_one(tmp_path):
    text = BASE + ("probes:\n  echo: {enabled: false}\n  stream: {enabled: true, rate_kib_s: 8}\n"
                   "  capture: {enabled: false}\n")
    plan = ProbePlan.from_section(load_playbook(write(tmp_path, text)).probes)
    assert plan.echo_rate_hz == 0.0
    assert plan.stream_rate_kib_s == 8.0
    assert not plan.capture
    assert plan.any


def test_all_probes_off(tmp_path):
    text = BASE + "probes:\n  echo: {enabled: false}\n  stream: {enabled: false}\n  capture: {enabled: false}\n"
    assert not ProbePlan.from_section(load_playbook(write(tmp_path, text)).probes).any


def test_zero_echo_rate_rejected_with_line(tmp_path):
    text = BASE + "probes:\n  echo:\n    rate_hz: 0\n"
    with pytest.raises(PlaybookError) as caught:
        load_playbook(write(tmp_path, text))
    error = caught.value
    assert error.field == "probes.echo.rate_hz"
    assert error.line == 11
    assert "greater than 0" in str(error)


def test_unknown_probe_key_suggests_name(tmp_path):
    text = BASE + "probes:\n  stream:\n    rate_kbps: 64\n"
    with pytest.raises(PlaybookError) as caught:
        load_playbook(write(tmp_path, text))
    assert "Did you mean 'rate_kib_s'?" in str(caught.value)


def test_nic_model_in_matrix_names_scenarios(tmp_path):
    text = BASE + "matrix:\n  nic_model: [e1000, virtio]\n"
    scenarios = load_playbook(write(tmp_path, text)).scenarios()
    assert [scenario.scenario_id for scenario in scenarios] == ["e1000", "virtio"]
    assert [scenario.nic_model for scenario in scenarios] == ["e1000", "virtio"]


def test_unknown_nic_model_rejected(tmp_path):
    text = BASE.replace("  memory_mib: 192\n", "  memory_mib: 192\n  nic_model: rtl8139\n")
    with pytest.raises(PlaybookError) as caught:
        load_playbook(write(tmp_path, text))
    assert caught.value.field == "guest.nic_model"
    assert "Allowed: 'e1000' or 'virtio'" in str(caught.value)


def test_virtio_nic_in_domain_xml(tmp_path):
    spec = GuestSpec(name="mlab-001-abc", run_id="virtio-r1", memory_mib=192, vcpus=1, kernel=tmp_path / "k",
                     initrd=tmp_path / "i", cmdline="console=ttyS0", accelerator="tcg", mac="52:54:00:6d:00:64",
                     nic_model="virtio")
    assert "<model type=\"virtio\" />" in domain_xml(spec)
