"""The doctor and the runner's stack check on the real local lab."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.capabilities import PROBE_PREFIX
from lab.doctor import run_doctor
from lab.errors import ConfigError
from lab.playbook import load_playbook
from lab.runner import ExperimentRunner

pytestmark = pytest.mark.lab

DIRTY_LIMIT_PLAYBOOK = """
experiment: lab-dirty-limit
guest:
  memory_mib: 192
workload:
  working_set_mib: 32
  dirty_rate_mib_s: 8
migration:
  strategy: dirty-limit
  dirty_limit_mib_s: 4
"""


@pytest.fixture(scope="module")
def doctor_report(shared_lab, guest_image):
    return run_doctor(accelerator="tcg", lab=shared_lab)


def test_doctor_reads_versions_and_capabilities(doctor_report):
    assert doctor_report["QEMU"].count(".") == 2
    assert doctor_report["libvirt"].count(".") == 2
    assert doctor_report["accelerator"].startswith("tcg")
    capabilities = doctor_report["QEMU migration capabilities"].split(", ")
    assert "postcopy-ram" in capabilities
    assert "multifd" in capabilities


def test_doctor_verdicts_for_this_lab(doctor_report):
    assert doctor_report["strategy precopy"] == "supported"
    assert doctor_report["strategy dirty-limit"] == "needs KVM with a dirty ring, but the lab runs TCG"


def test_doctor_leaves_no_probe_guest(doctor_report, shared_lab):
    status = shared_lab.status()
    assert all(not names for names in status.domains.values())


def test_doctor_leaves_no_probe_console(doctor_report, shared_lab):
    console_dir = Path(shared_lab.host("h1").log_dir) / "qemu"
    assert list(console_dir.glob(f"{PROBE_PREFIX}*-console.log")) == []


def test_runner_rejects_dirty_limit_under_tcg(shared_lab, guest_image, tmp_path):
    path = tmp_path / "playbook.yaml"
    path.write_text(DIRTY_LIMIT_PLAYBOOK)
    runner = ExperimentRunner(load_playbook(path), results_root=tmp_path / "results", lab=shared_lab,
                              accelerator="tcg", show_progress=False)
    with pytest.raises(ConfigError) as info:
        runner.run()
    message = str(info.value)
    assert "strategy dirty-limit needs KVM with a dirty ring, but the lab runs TCG" in message
    assert "scenarios dirty-limit" in message
    assert not list((tmp_path / "results").glob("*/runs/*/record.json"))
