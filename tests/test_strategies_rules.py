"""Strategy tuning fields in playbooks, and the libvirt flags and parameters they become."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from lab.errors import ConfigError
from lab.migrate import MigrationSettings, guest_rate_figures, migration_connections_argv
from lab.playbook import load_playbook
from lab.ranking import strategy_ranking

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
URI = "tcp://10.77.0.12"
BASE = """experiment: rules
guest:
  memory_mib: 192
workload:
  working_set_mib: 64
  dirty_rate_mib_s: 8
migration:
  strategy: precopy
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "playbook.yaml"
    path.write_text(text)
    return load_playbook(path)


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


@pytest.mark.parametrize("name", ["strategies.yaml", "convergence.yaml"])
def test_shipped_playbooks_load(name):
    playbook = load_playbook(REPO / "playbooks" / name)
    assert playbook.scenarios()


def test_strategies_playbook_lists_every_lab_strategy():
    strategies = {scenario.strategy for scenario in load_playbook(REPO / "playbooks" / "strategies.yaml").scenarios()}
    assert strategies == {"stop-and-copy", "precopy", "downtime-steps", "auto-converge", "xbzrle", "multifd",
                          "postcopy", "postcopy-preempt", "hybrid", "flushing"}


def test_convergence_sweeps_dirty_rate_over_bandwidth():
    playbook = load_playbook(REPO / "playbooks" / "convergence.yaml")
    ratios = sorted({scenario.dirty_rate_mib_s / scenario.bandwidth_mib_s for scenario in playbook.scenarios()})
    assert ratios[0] == pytest.approx(0.1)
    assert ratios[-1] == pytest.approx(1.5)


def test_base_tuning_applies_only_to_its_strategy(tmp_path):
    text = BASE + "  xbzrle_cache_mib: 16\n  multifd_channels: 3\nmatrix:\n  strategy: [precopy, xbzrle, multifd]\n"
    by_id = {scenario.scenario_id: scenario for scenario in load(tmp_path, text).scenarios()}
    assert by_id["xbzrle"].xbzrle_cache_mib == 16
    assert by_id["precopy"].xbzrle_cache_mib is None
    assert by_id["multifd"].multifd_channels == 3
    assert by_id["xbzrle"].multifd_channels is None


def test_base_compression_follows_its_method(tmp_path):
    text = BASE + "  compression: zstd\n  compression_level: 5\nmatrix:\n  strategy: [precopy, multifd]\n"
    by_id = {scenario.scenario_id: scenario for scenario in load(tmp_path, text).scenarios()}
    assert (by_id["multifd"].compression, by_id["multifd"].compression_level) == ("zstd", 5)
    assert (by_id["precopy"].compression, by_id["precopy"].compression_level) == ("none", None)


def test_matrix_tuning_for_wrong_strategy_rejected(tmp_path):
    text = BASE + "matrix:\n  strategy: [precopy]\n  xbzrle_cache_mib: [16, 32]\n"
    message = load_error(tmp_path, text)
    assert "xbzrle_cache_mib applies only to xbzrle, not to precopy" in message


def test_unused_base_tuning_rejected(tmp_path):
    message = load_error(tmp_path, BASE + "  auto_converge_initial_pct: 40\n")
    assert "migration.auto_converge_initial_pct" in message
    assert "applies only to auto-converge, and no scenario uses it" in message


def test_zlib_outside_multifd_rejected(tmp_path):
    text = BASE.replace("strategy: precopy", "strategy: xbzrle") + "  compression: zlib\n"
    message = load_error(tmp_path, text)
    assert "compression" in message


def test_compression_level_range_checked(tmp_path):
    text = BASE.replace("strategy: precopy", "strategy: multifd") + "  compression: zlib\n  compression_level: 12\n"
    assert "zlib compression levels run from 0 to 9, not 12" in load_error(tmp_path, text)


def test_zerocopy_with_compression_rejected(tmp_path):
    text = BASE.replace("strategy: precopy", "strategy: multifd") + "  compression: zstd\n  zerocopy: true\n"
    assert "zero-copy send works only without compression" in load_error(tmp_path, text)


def test_downtime_steps_needs_all_three_fields(tmp_path):
    text = BASE.replace("strategy: precopy", "strategy: downtime-steps") + "  downtime_step_ms: 100\n"
    message = load_error(tmp_path, text)
    assert "downtime_step_after_s, downtime_max_ms is missing" in message


def test_downtime_max_above_start(tmp_path):
    text = (BASE.replace("strategy: precopy", "strategy: downtime-steps") + "  downtime_limit_ms: 500\n"
            "  downtime_step_ms: 100\n  downtime_step_after_s: 2\n  downtime_max_ms: 400\n")
    assert "downtime_max_ms 400 is not above the starting downtime limit of 500 ms" in load_error(tmp_path, text)


def test_hybrid_takes_time_or_iterations(tmp_path):
    text = BASE.replace("strategy: precopy", "strategy: hybrid") + "  postcopy_after_s: 5\n"
    assert load(tmp_path, text).scenarios()[0].postcopy_after_s == 5.0
    both = text + "  postcopy_after_iterations: 2\n"
    assert "either after N iterations or after a time, not both" in load_error(tmp_path, both)


def test_parallel_save_needs_sparse(tmp_path):
    text = (BASE.replace("strategy: precopy", "strategy: flushing")
            + "  save_format: raw\n  save_parallel_channels: 2\n")
    assert "parallel save channels need the sparse save format" in load_error(tmp_path, text)


def test_unknown_strategy_lists_new_names(tmp_path):
    message = load_error(tmp_path, BASE.replace("strategy: precopy", "strategy: teleport"))
    assert "postcopy-preempt" in message
    assert "flushing" in message


def test_multifd_flags_and_params():
    settings = MigrationSettings("multifd", URI, multifd_channels=4, compression="zstd", compression_level=3)
    assert settings.flags() & libvirt.VIR_MIGRATE_PARALLEL
    assert not settings.flags() & libvirt.VIR_MIGRATE_ZEROCOPY
    params = settings.params()
    assert params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 4
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == "zstd"
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_ZSTD_LEVEL] == 3


def test_zerocopy_flag():
    assert MigrationSettings("multifd", URI, zerocopy=True).flags() & libvirt.VIR_MIGRATE_ZEROCOPY


def test_xbzrle_cache_in_bytes():
    settings = MigrationSettings("xbzrle", URI, xbzrle_cache_mib=32)
    assert settings.flags() & libvirt.VIR_MIGRATE_COMPRESSED
    assert settings.params()[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == "xbzrle"
    assert settings.params()[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] == 32 << 20


def test_auto_converge_flag_and_params():
    settings = MigrationSettings("auto-converge", URI, auto_converge_initial_pct=30, auto_converge_increment_pct=20)
    assert settings.flags() & libvirt.VIR_MIGRATE_AUTO_CONVERGE
    assert settings.params()[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] == 30
    assert settings.params()[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] == 20


def test_postcopy_preempt_uses_postcopy_flag_and_bandwidth():
    settings = MigrationSettings("postcopy-preempt", URI, postcopy_bandwidth_mib_s=64)
    assert settings.uses_postcopy
    assert settings.flags() & libvirt.VIR_MIGRATE_POSTCOPY
    assert settings.params()[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] == 64


def test_postcopy_bandwidth_ignored_for_precopy():
    params = MigrationSettings("precopy", URI, postcopy_bandwidth_mib_s=64).params()
    assert libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY not in params


def test_mt_compression_is_compressed_flag():
    settings = MigrationSettings("precopy", URI, compression="mt", compression_level=4)
    assert settings.flags() & libvirt.VIR_MIGRATE_COMPRESSED
    assert settings.params()[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_MT_LEVEL] == 4


def test_flushing_needs_save_dir():
    with pytest.raises(Exception, match="save_dir"):
        MigrationSettings("flushing", URI)


def test_settings_from_scenario_values():
    values = {"strategy": "hybrid", "memory_mib": 192, "postcopy_after_s": 4.0, "bandwidth_mib_s": 24,
              "xbzrle_cache_mib": None}
    settings = MigrationSettings.from_values(values, migration_uri=URI)
    assert settings.postcopy_after_s == 4.0
    assert settings.bandwidth_mib_s == 24
    assert settings.migration_uri == URI


def test_connection_count_command_filters_source_and_ports():
    argv = migration_connections_argv("10.77.0.11")
    assert argv[:4] == ["ss", "-Htn", "state", "established"]
    assert "10.77.0.11" in argv
    assert argv[-1] == "( sport >= :49152 and sport <= :49215 )"


def report_line(seq: int, rate: int) -> str:
    return f"mlab-workload: t_ms={seq * 1000} seq={seq} dirtied={seq * rate} rate_pps={rate} checked=0 bad=0 sweeps=0"


def test_guest_rate_figures():
    source = "\n".join([report_line(0, 6000), report_line(1, 6100), report_line(2, 6200),
                        report_line(3, 3000), report_line(4, 5000)])
    destination = "\n".join([report_line(5, 2500), report_line(6, 6100)])
    before, lowest = guest_rate_figures(source, destination, last_seq_before=2)
    assert before == 6100.0
    assert lowest == 2500.0


def test_guest_rate_figures_without_reports():
    assert guest_rate_figures("", "", last_seq_before=2) == (None, None)


def test_ranking_orders_and_counts_timeouts():
    runs = pd.DataFrame({
        "strategy": ["precopy", "precopy", "postcopy", "flushing"],
        "outcome": ["timed-out", "completed", "completed", "completed"],
        "wall_downtime_ms": [None, 300.0, 20.0, 3000.0],
        "transfer_time_ms": [None, 30000.0, 3000.0, 3500.0],
        "total_time_ms": [None, 30000.0, 2000.0, None],
        "transferred_bytes": [None, 4 * 192 * 2**20, 192 * 2**20, None],
        "save_file_disk_bytes": [None, None, None, 96 * 2**20],
        "memory_mib": [192, 192, 192, 192],
        "guest_rate_before_pps": [6000.0, 6000.0, 6000.0, 6000.0],
        "guest_rate_min_pps": [3000.0, 3000.0, 1500.0, 6000.0],
    })
    table = strategy_ranking(runs).set_index("strategy")
    assert table.loc["precopy", "converged_pct"] == 50.0
    assert table.loc["precopy", "converged_pct_rank"] == 3
    assert table.loc["postcopy", "downtime_ms_rank"] == 1
    assert table.loc["flushing", "downtime_ms_rank"] == 3
    assert table.loc["flushing", "transferred_ratio"] == pytest.approx(0.5)
    assert table.loc["precopy", "transferred_ratio"] == pytest.approx(4.0)
    assert table.loc["postcopy", "guest_slowdown_pct"] == pytest.approx(75.0)
    assert table.loc["flushing", "guest_slowdown_pct_rank"] == 1
