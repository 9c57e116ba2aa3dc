"""A results folder that runs out of space during an experiment, on the real local lab.

The results folder is a small tmpfs. Once the first run's record is stored,
a thread fills the tmpfs until a write fails with ENOSPC, so the second run
ends with nowhere to go. ``migrlab run`` must then stop with a message that
names the folder, the error and a fix, keep the first run intact, leave no
temporary or half-written file, and leave nothing of its runs on the lab.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.hosts.netns import list_netns
from lab.store import load_record
from tests.lab_helpers import lab_qemu_pids

pytestmark = pytest.mark.lab

TMPFS_SIZE = "4m"
PLAYBOOK = """
experiment: full-disk
guest:
  memory_mib: 128
  vcpus: 1
workload:
  working_set_mib: 16
  dirty_rate_mib_s: 2
  pattern: random
migration:
  strategy: precopy
  max_time_s: 60
repetitions: 2
probes:
  echo: {enabled: false}
  stream: {enabled: false}
  capture: {enabled: false}
"""


@pytest.fixture
def small_results(tmp_path):
    """A tmpfs of a few MiB as the results folder, unmounted afterwards."""
    folder = tmp_path / "results"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "migrlab-test-results",
                    str(folder)], check=True, timeout=30)
    try:
        yield folder
    finally:
        result = subprocess.run(["umount", str(folder)], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], timeout=30)


class Filler(threading.Thread):
    """Wait for the first stored record, then write a file until the file system is full."""

    def __init__(self, folder: Path, timeout_s: float):
        super().__init__(daemon=True, name="filler")
        self.folder = folder
        self.timeout_s = timeout_s
        self.stop = threading.Event()
        self.first_record: Path | None = None
        self.filled = threading.Event()
        self.written = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            records = list(self.folder.glob("full-disk/runs/*/record.json"))
            if records:
                self.first_record = records[0]
                break
            time.sleep(0.05)
        else:
            return
        fd = os.open(self.folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        chunk = b"\0" * 65536
        try:
            while True:
                try:
                    self.written += os.write(fd, chunk)
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
            # Smaller writes take what the large ones left.
            while True:
                try:
                    self.written += os.write(fd, b"\0")
                except OSError:
                    break
        finally:
            os.close(fd)
        self.filled.set()


def lab_namespaces(shared_lab) -> set[str]:
    # Other labs on the machine come and go; only this lab's namespaces count.
    return {name for name in list_netns() if name.startswith(f"{shared_lab.prefix}-")}


def guest_consoles(shared_lab) -> set[Path]:
    return {path for host in ("h1", "h2")
            for path in (shared_lab.host_dir(host) / "var/log/libvirt/qemu").glob("mlab-*-console.log")}




def test_full_results_folder_stops_run_cleanly(shared_lab, guest_image, small_results, tmp_path):
    playbook = tmp_path / "full-disk.yaml"
    playbook.write_text(PLAYBOOK)
    namespaces_before = lab_namespaces(shared_lab)
    consoles_before = guest_consoles(shared_lab)
    filler = Filler(small_results, timeout_s=600)
    filler.start()
    env = {**os.environ, "MIGRLAB_LAB_PREFIX": shared_lab.prefix, "MIGRLAB_LAB_DIR": str(shared_lab.root)}
    try:
        process = subprocess.run([sys.executable, "-m", "lab.cli", "run", str(playbook), "--results",
                                  str(small_results)], capture_output=True, text=True, timeout=900, env=env)
    finally:
        filler.stop.set()
        filler.join(30)
    assert filler.filled.is_set(), process.stderr
    runs_dir = small_results / "full-disk" / "runs"

    assert process.returncode == 1, process.stderr
    message = process.stderr
    assert f"error: cannot store run precopy-r2 in {runs_dir}: No space left on device (errno 28)" in message
    assert "The runs stored before it are intact." in message
    assert f"Fix: free space on the file system of {small_results} (see: df -h {small_results})" in message
    assert f"then resume with: migrlab run {playbook} --results {small_results} --resume" in message
    assert "Traceback" not in message

    # The first run is whole; the second left a bare failed record only if one fitted.
    first = load_record(runs_dir / "precopy-r1")
    assert first.run_id == "precopy-r1"
    assert first.outcome == "completed"
    assert filler.first_record == runs_dir / "precopy-r1" / "record.json"
    second = runs_dir / "precopy-r2"
    if second.exists():
        record = load_record(second)
        assert record.outcome == "failed"
        assert "storing it failed: No space left on device" in record.error
    else:
        assert "no record of run precopy-r2 fits either" in message

    leftovers = [path for path in small_results.rglob("*") if ".tmp-" in path.name or ".old-" in path.name]
    assert leftovers == []
    assert sorted(entry.name for entry in runs_dir.iterdir()) in (["precopy-r1"], ["precopy-r1", "precopy-r2"])

    assert all(not names for names in shared_lab.status().domains.values())
    assert lab_qemu_pids(shared_lab) == []
    assert lab_namespaces(shared_lab) == namespaces_before
    assert guest_consoles(shared_lab) - consoles_before == set()
