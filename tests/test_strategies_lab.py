"""One run per strategy family on the real local lab, each checked for the figure only it produces.

The workload dirties memory at the link's rate, so auto-converge must
throttle, xbzrle finds pages in its cache, multifd opens several connections,
postcopy-preempt fetches pages on demand and flushing restores a save file.
"""

from __future__ import annotations

import pytest

from lab.store import load_events, load_record, load_timeline
from tests.lab_helpers import run_playbook_text

pytestmark = pytest.mark.lab

STRATEGIES = ["auto-converge", "xbzrle", "multifd", "postcopy-preempt", "flushing"]
PLAYBOOK = """
experiment: lab-strategies
guest:
  memory_mib: 192
workload:
  working_set_mib: 64
  dirty_rate_mib_s: 24
  pattern: random
migration:
  bandwidth_mib_s: 24
  max_time_s: 90
  auto_converge_initial_pct: 30
  auto_converge_increment_pct: 20
  xbzrle_cache_mib: 32
  multifd_channels: 4
  compression: zstd
  compression_level: 1
  postcopy_bandwidth_mib_s: 64
  save_format: sparse
  save_parallel_channels: 2
matrix:
  strategy: [auto-converge, xbzrle, multifd, postcopy-preempt, flushing]
repetitions: 1
"""


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, tmp_path_factory):
    return run_playbook_text(PLAYBOOK, shared_lab, tmp_path_factory.mktemp("strategies"), "strategy")


def record(experiment, strategy):
    return load_record(experiment.experiment_dir / "runs" / f"{strategy}-r1")


def test_every_strategy_completed(experiment):
    assert experiment.outcomes == {f"{strategy}-r1": "completed" for strategy in STRATEGIES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_guest_intact_after_strategy(experiment, strategy):
    integrity = record(experiment, strategy).integrity
    assert integrity.guest_alive
    assert integrity.bad_pages == 0
    assert integrity.console_trouble == []


def test_auto_converge_throttled_the_guest(experiment):
    measured = record(experiment, "auto-converge").measured
    assert measured.auto_converge_throttle_max_pct >= 30
    timeline = load_timeline(experiment.experiment_dir / "runs" / "auto-converge-r1")
    throttle = timeline["auto_converge_throttle_pct"].dropna()
    assert len(throttle) > 0
    assert throttle.max() > 0
    assert throttle.is_monotonic_increasing


def test_xbzrle_used_its_cache(experiment):
    stats = record(experiment, "xbzrle").stats
    assert stats.xbzrle_cache_bytes == 32 << 20
    assert stats.xbzrle_cache_misses > 0 or stats.xbzrle_pages > 0


def test_multifd_opened_several_connections(experiment):
    measured = record(experiment, "multifd").measured
    assert measured.multifd_connections_max > 1


def test_postcopy_preempt_fetched_pages_on_demand(experiment):
    current = record(experiment, "postcopy-preempt")
    assert current.stats.postcopy_requests > 0
    assert current.measured.postcopy_preempt is True
    assert current.measured.postcopy_started_at_s is not None
    assert current.measured.postcopy_blocktime_ms is not None


def test_flushing_restored_from_the_save_file(experiment):
    current = record(experiment, "flushing")
    measured = current.measured
    assert measured.save_format_used == "sparse"
    assert measured.save_file_disk_bytes > 0
    assert measured.restore_ms > 0
    assert measured.wall_downtime_ms >= measured.save_ms
    kinds = [(event["host"], event["kind"]) for event in load_events(
        experiment.experiment_dir / "runs" / "flushing-r1")]
    assert ("h1", "save-completed") in kinds
    assert ("h2", "restore-completed") in kinds


def test_no_save_file_left(experiment, shared_lab):
    assert not list((shared_lab.root / "shared").glob("*.save"))
