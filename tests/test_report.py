"""Tests of the experiment report: statistics, Markdown summary and figures.

The fabricated experiment of tests.fixtures.fabricate has values chosen so
that every expected statistic below is computed by hand.
"""

from __future__ import annotations

import math

import matplotlib.image
import pandas as pd
import pytest

from lab.plots import STRATEGY_COLORS, _use_log_scale, ordered_strategies, strategy_color
from lab.playbook import STRATEGIES
from lab.report import summarize, write_report
from lab.store import StoreError, load_runs
from tests.fixtures.fabricate import MIB, fabricate_experiment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["downtime_by_strategy.png", "paused_time_by_strategy.png", "time_and_bytes_vs_dirty_rate.png",
           "strategy_ranking.png", "downtime_qemu_vs_client.png"]


@pytest.fixture
def report(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path)
    paths = write_report(experiment_dir)
    summary = pd.read_csv(experiment_dir / "report" / "summary.csv").set_index("scenario_id")
    return experiment_dir, paths, summary


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100
    assert image.shape[1] > 100


# Files


def test_report_writes_all_files(report):
    experiment_dir, paths, _ = report
    names = sorted(path.name for path in paths)
    assert names == sorted(["runs.csv", "summary.csv", "summary.md", "ranking.csv", *FIGURES])
    for path in paths:
        assert path.parent == experiment_dir / "report"
        assert path.stat().st_size > 0


def test_figures_are_valid_png(report):
    experiment_dir, _, _ = report
    for name in FIGURES:
        assert_valid_png(experiment_dir / "report" / name)


def test_runs_csv_has_every_run(report):
    experiment_dir, _, _ = report
    runs = pd.read_csv(experiment_dir / "report" / "runs.csv")
    assert len(runs) == 12
    assert set(runs["outcome"]) == {"completed", "failed", "timed-out"}


def test_report_into_other_folder(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path / "data")
    paths = write_report(experiment_dir, tmp_path / "elsewhere")
    assert {path.parent for path in paths} == {tmp_path / "elsewhere"}
    assert not (experiment_dir / "report").exists()


def test_report_of_missing_experiment(tmp_path):
    with pytest.raises(StoreError):
        write_report(tmp_path)


# Statistics against hand-computed values


def test_summary_scenario_order_and_labels(report):
    _, _, summary = report
    assert list(summary.index) == ["precopy-rate4", "precopy-rate24", "postcopy-rate4",
                                   "postcopy-rate24"]
    assert list(summary["strategy"]) == ["precopy", "precopy", "postcopy", "postcopy"]
    assert list(summary["dirty_rate_mib_s"]) == [4.0, 24.0, 4.0, 24.0]


def test_summary_counts(report):
    _, _, summary = report
    assert list(summary["n"]) == [3, 3, 3, 3]
    assert list(summary["n_completed"]) == [3, 2, 3, 2]
    assert list(summary["n_excluded"]) == [0, 1, 0, 1]


def test_summary_precopy_rate4(report):
    row = report[2].loc["precopy-rate4"]
    assert row["downtime_ms_mean"] == 110
    assert row["downtime_ms_std"] == pytest.approx(10)
    assert row["downtime_ms_min"] == 100
    assert row["downtime_ms_max"] == 120
    assert row["total_time_ms_mean"] == 4200
    assert row["total_time_ms_std"] == pytest.approx(200)
    assert row["transferred_bytes_mean"] == 104 * MIB
    assert row["transferred_mib_mean"] == 104
    assert row["transferred_mib_std"] == pytest.approx(4)
    assert row["iterations_mean"] == pytest.approx(10 / 3)
    assert row["iterations_std"] == pytest.approx(math.sqrt(1 / 3))
    assert row["wall_downtime_ms_mean"] == 160
    assert math.isnan(row["postcopy_requests_mean"])


def test_summary_excludes_failed_run(report):
    row = report[2].loc["precopy-rate24"]
    assert row["downtime_ms_mean"] == 300
    assert row["downtime_ms_std"] == pytest.approx(math.sqrt(5000))
    assert row["downtime_ms_max"] == 350
    assert row["total_time_ms_max"] == 9000
    assert row["transferred_mib_max"] == 220
    assert row["iterations_mean"] == 11


def test_summary_postcopy_requests(report):
    row = report[2].loc["postcopy-rate4"]
    assert row["postcopy_requests_mean"] == 20
    assert row["postcopy_requests_std"] == pytest.approx(10)
    assert row["postcopy_requests_min"] == 10
    assert row["postcopy_requests_max"] == 30
    assert row["total_time_ms_std"] == 0


def test_summary_timed_out_excluded(report):
    row = report[2].loc["postcopy-rate24"]
    assert row["downtime_ms_mean"] == 50
    assert row["downtime_ms_std"] == pytest.approx(math.sqrt(200))
    assert row["downtime_ms_min"] == 40
    assert math.isnan(row["wall_downtime_ms_mean"])


# summary.md


def test_markdown_counts_excluded_runs(report):
    experiment_dir, _, _ = report
    text = (experiment_dir / "report" / "summary.md").read_text()
    assert "12 runs in 4 scenarios, 10 completed." in text
    assert "2 runs are counted but excluded (1 failed, 1 timed-out)" in text
    assert "| precopy-rate24-r3  | failed" in text


def test_markdown_table_values(report):
    experiment_dir, _, _ = report
    text = (experiment_dir / "report" / "summary.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| precopy-rate4 "))
    assert "110 ± 10" in row
    assert "4,200 ± 200" in row
    assert "3.33 ± 0.58" in row


def test_markdown_quality_warnings(report):
    experiment_dir, _, _ = report
    text = (experiment_dir / "report" / "summary.md").read_text()
    warnings = [line for line in text.splitlines() if line.startswith("- ")]
    assert "- precopy-rate24: only 2 completed runs, fewer than 3" in warnings
    assert "- postcopy-rate24: only 2 completed runs, fewer than 3" in warnings
    assert ("- postcopy-rate24: downtime_ms varies with a coefficient of variation of 28%, "
            "above 25%") in warnings
    assert not [line for line in warnings if line.startswith("- precopy-rate4:")]
    assert len(warnings) == 3


def test_markdown_links_figures(report):
    experiment_dir, _, _ = report
    text = (experiment_dir / "report" / "summary.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in text


# Edge cases


def test_single_run(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path, runs=[
        ("postcopy-rate4", 1, "completed", 20, 3000, 96, 1, 10, 30.0)])
    write_report(experiment_dir)
    summary = pd.read_csv(experiment_dir / "report" / "summary.csv")
    assert len(summary) == 1
    assert summary.loc[0, "downtime_ms_mean"] == 20
    assert math.isnan(summary.loc[0, "downtime_ms_std"])
    text = (experiment_dir / "report" / "summary.md").read_text()
    assert "postcopy-rate4: only 1 completed run, fewer than 3" in text
    for name in FIGURES:
        assert_valid_png(experiment_dir / "report" / name)


def test_all_runs_failed(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path, runs=[
        ("precopy-rate4", 1, "failed", None, None, None, None, None, None),
        ("postcopy-rate24", 1, "guest-crashed", None, None, None, None, None, None),
    ])
    write_report(experiment_dir)
    summary = pd.read_csv(experiment_dir / "report" / "summary.csv")
    assert list(summary["n_completed"]) == [0, 0]
    assert list(summary["n_excluded"]) == [1, 1]
    assert summary["downtime_ms_mean"].isna().all()
    text = (experiment_dir / "report" / "summary.md").read_text()
    assert "precopy-rate4: no completed runs" in text
    assert "(1 failed, 1 guest-crashed)" in text
    for name in FIGURES:
        assert_valid_png(experiment_dir / "report" / name)


def test_no_runs(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path, runs=[])
    write_report(experiment_dir)
    summary = pd.read_csv(experiment_dir / "report" / "summary.csv")
    assert len(summary) == 0
    assert "0 runs in 0 scenarios" in (experiment_dir / "report" / "summary.md").read_text()
    for name in FIGURES:
        assert_valid_png(experiment_dir / "report" / name)


def test_summarize_missing_metric_column(tmp_path):
    runs = load_runs(fabricate_experiment(tmp_path))
    runs = runs.drop(columns=["postcopy_requests", "wall_downtime_ms"])
    summary = summarize(runs, ["strategy", "dirty_rate_mib_s"]).set_index("scenario_id")
    assert summary["postcopy_requests_mean"].isna().all()
    assert summary.loc["precopy-rate4", "downtime_ms_mean"] == 110


def test_matrix_guessed_without_playbook_copy(tmp_path):
    experiment_dir = fabricate_experiment(tmp_path)
    (experiment_dir / "playbook.yaml").unlink()
    write_report(experiment_dir)
    summary = pd.read_csv(experiment_dir / "report" / "summary.csv")
    assert "dirty_rate_mib_s" in summary.columns
    assert "memory_mib" not in summary.columns
    assert sorted(summary["scenario_id"]) == sorted(["precopy-rate4", "precopy-rate24",
                                                     "postcopy-rate4", "postcopy-rate24"])


# Plot helpers


def test_log_scale_above_two_decades():
    assert _use_log_scale(pd.Series([5.0, 600.0]))
    assert not _use_log_scale(pd.Series([5.0, 500.0]))
    assert not _use_log_scale(pd.Series([0.0, 0.0]))


def test_strategy_colors_are_fixed():
    assert len(set(STRATEGY_COLORS.values())) == len(STRATEGY_COLORS)
    assert set(STRATEGY_COLORS) == set(STRATEGIES)
    assert strategy_color("postcopy", ["postcopy"]) == STRATEGY_COLORS["postcopy"]
    assert strategy_color("postcopy", ["precopy", "postcopy", "other"]) == \
        STRATEGY_COLORS["postcopy"]
    assert strategy_color("other", ["precopy", "other"]) not in STRATEGY_COLORS.values()


def test_strategies_in_canonical_order():
    assert ordered_strategies(["hybrid", "precopy", "zzz", "stop-and-copy", "precopy"]) == \
        ["stop-and-copy", "precopy", "hybrid", "zzz"]
