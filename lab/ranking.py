"""Ranking of strategies on the figures that decide between them.

One row per strategy over all its runs in an experiment:

converged_pct
    share of runs that completed; a run cancelled at max_time_s (timed-out)
    did not converge, nor did a failed one.
downtime_ms
    median paused time, from the source's pause to the destination's
    resume (libvirt events), so it is measured the same way for every
    strategy, flushing included.
total_time_s
    median time from the migration call until the destination ran with all
    memory (the end of postcopy, or of the restore).
transferred_ratio
    median bytes moved divided by the guest's memory: QEMU's
    memory_processed, or the save file's allocated size for flushing.
guest_slowdown_pct
    median of 100 * (1 - lowest workload rate during the migration / rate
    before): the client-side probe figure where a run has it, else the
    harness's figure from the console reports.

The medians use completed runs only. A lower value ranks better, except for
converged_pct.
"""

from __future__ import annotations

import math

import pandas as pd

# Metric -> (heading, True when higher is better).
RANKING_METRICS = {
    "converged_pct": ("converged (%)", True),
    "downtime_ms": ("downtime (ms)", False),
    "total_time_s": ("total time (s)", False),
    "transferred_ratio": ("transferred / guest memory", False),
    "guest_slowdown_pct": ("guest slowdown (%)", False),
}


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    if name in runs:
        return runs[name].astype("float64")
    return pd.Series(math.nan, index=runs.index, dtype="float64")


def run_figures(runs: pd.DataFrame) -> pd.DataFrame:
    """Return the ranking figures of each run: strategy, converged and the RANKING_METRICS inputs."""
    figures = pd.DataFrame(index=runs.index)
    figures["strategy"] = runs["strategy"]
    figures["converged"] = runs["outcome"] == "completed"
    figures["downtime_ms"] = _column(runs, "wall_downtime_ms")
    figures["total_time_s"] = _column(runs, "transfer_time_ms").fillna(_column(runs, "total_time_ms")) / 1000.0
    moved = _column(runs, "transferred_bytes").fillna(_column(runs, "save_file_disk_bytes"))
    figures["transferred_ratio"] = moved / (_column(runs, "memory_mib") * 2**20)
    own = 100.0 * (1.0 - _column(runs, "guest_rate_min_pps") / _column(runs, "guest_rate_before_pps"))
    figures["guest_slowdown_pct"] = _column(runs, "guest_slowdown_pct").fillna(own)
    return figures


def strategy_ranking(runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per strategy: runs, converged_pct and the median of each other metric.

    Each metric also gets a ``<metric>_rank`` column, 1 for the best
    strategy; strategies without a value share the last rank.
    """
    columns = ["strategy", "runs"] + [name for metric in RANKING_METRICS for name in (metric, f"{metric}_rank")]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    figures = run_figures(runs)
    rows = []
    for strategy, group in figures.groupby("strategy", sort=False):
        completed = group[group["converged"]]
        row = {"strategy": strategy, "runs": len(group), "converged_pct": 100.0 * group["converged"].mean()}
        for metric in RANKING_METRICS:
            if metric != "converged_pct":
                row[metric] = completed[metric].median() if len(completed) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    for metric, (_heading, higher_is_better) in RANKING_METRICS.items():
        ranks = table[metric].rank(method="min", ascending=not higher_is_better, na_option="bottom")
        table[f"{metric}_rank"] = ranks.astype("int64")
    return table[columns]


def ranking_markdown(table: pd.DataFrame) -> str:
    """Format the ranking as a Markdown table: each value followed by its rank in brackets."""
    shown = pd.DataFrame({"strategy": table["strategy"], "runs": table["runs"]})
    for metric, (heading, _higher_is_better) in RANKING_METRICS.items():
        shown[heading] = [_with_rank(value, rank) for value, rank in zip(table[metric], table[f"{metric}_rank"])]
    return shown.to_markdown(index=False)


def _with_rank(value: float, rank: int) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} ({rank})"
