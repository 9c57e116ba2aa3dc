"""Report of an experiment: tables of per-scenario statistics and figures.

write_report() writes into <experiment>/report/:

runs.csv
    one row per run, the columns of store.load_runs().
summary.csv
    one row per scenario: n, n_completed, n_excluded, and mean, std, min and
    max of each metric in METRICS over the completed runs, and of DISK_METRICS
    when a run had a guest disk.
summary.md
    the same statistics as a Markdown table, the excluded runs, and quality
    warnings.
ranking.csv
    one row per strategy with the figures of lab.ranking and their ranks.
downtime_by_strategy.png, time_and_bytes_vs_dirty_rate.png, downtime_qemu_vs_client.png,
strategy_ranking.png
    figures, see lab.plots.

Runs whose outcome is not "completed" count in n and n_excluded but never in
the statistics. std is the sample standard deviation (ddof=1), so it is NaN
for a scenario with one completed run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from lab.errors import ConfigError
from lab.playbook import SCENARIO_FIELDS, load_playbook
from lab.plots import (FIELD_LABELS, plot_downtime_by_strategy, plot_downtime_views, plot_strategy_ranking,
                       plot_time_and_bytes_vs_dirty_rate)
from lab.ranking import RANKING_METRICS, ranking_markdown, strategy_ranking
from lab.store import PLAYBOOK_COPY, find_experiment_dir, load_runs, read_experiment_file

log = logging.getLogger(__name__)

# Metrics summarized per scenario, with the heading used in summary.md.
METRICS = {
    "downtime_ms": "QEMU downtime (ms)",
    "client_downtime_ms": "client downtime, longest time without echo replies (ms)",
    "switchover_outage_ms": "client outage at the switch-over (ms)",
    "wall_downtime_ms": "paused, source stop to destination run (ms)",
    "total_time_ms": "QEMU total time (ms)",
    "transfer_time_ms": "migration time, to the end of postcopy (ms)",
    "transferred_bytes": "transferred (bytes)",
    "transferred_mib": "transferred (MiB)",
    "iterations": "iterations",
    "postcopy_requests": "postcopy requests",
    "lost_requests": "echo requests lost",
    "stream_survived": "TCP connection survived (share of runs)",
    "stream_max_stall_ms": "TCP stall, longest (ms)",
    "guest_slowdown_pct": "guest slowdown, lowest throughput against before (%)",
}
# Metrics of experiments whose guests have a disk (guest.disk): the disk bytes
# libvirt copied over NBD, which is 0 for shared storage.
DISK_METRICS = {
    "disk_copied_mib": "disk copied (MiB)",
}
STATISTICS = ("mean", "std", "min", "max")

# Quality thresholds for the warnings in summary.md.
MAX_VARIATION = 0.25  # coefficient of variation, std / mean
MIN_COMPLETED = 3
_VARIATION_METRICS = ("downtime_ms", "total_time_ms", "transferred_bytes", "wall_downtime_ms",
                      "transfer_time_ms", "client_downtime_ms")


def matrix_fields(experiment_dir: Path, runs: pd.DataFrame) -> list[str]:
    """Return the matrix keys of the experiment's playbook copy, in matrix order.

    Without a readable playbook copy, the scenario fields that take more than
    one value among the runs stand in for the matrix.
    """
    try:
        playbook = load_playbook(experiment_dir / PLAYBOOK_COPY)
    except ConfigError as exc:
        log.warning("cannot read the playbook copy, so varying fields stand in for the "
                    "matrix: %s", exc)
        return [field for field in SCENARIO_FIELDS
                if field in runs and runs[field].nunique(dropna=False) > 1]
    return list(playbook.matrix)


def _scenario_order(experiment_dir: Path, runs: pd.DataFrame) -> list[str]:
    ids = list(dict.fromkeys(runs["scenario_id"]))
    try:
        planned = [scenario.scenario_id
                   for scenario in load_playbook(experiment_dir / PLAYBOOK_COPY).scenarios()]
    except ConfigError:
        planned = []
    known = [scenario_id for scenario_id in planned if scenario_id in ids]
    return known + sorted(set(ids) - set(known))


def has_disks(runs: pd.DataFrame) -> bool:
    """Return whether any run had a guest disk."""
    return "disk_storage" in runs and bool(runs["disk_storage"].notna().any())


def summarize(runs: pd.DataFrame, fields: list[str], order: list[str] | None = None) -> pd.DataFrame:
    """Compute per-scenario counts and statistics of METRICS over completed runs.

    Columns: scenario_id, strategy, the other fields, n, n_completed,
    n_excluded, then <metric>_mean, _std, _min and _max for each metric,
    DISK_METRICS included when a run had a guest disk.
    """
    runs = runs.copy()
    metrics = {**METRICS, **(DISK_METRICS if has_disks(runs) else {})}
    for metric in metrics:
        if metric not in runs and metric not in ("transferred_mib", "disk_copied_mib"):
            runs[metric] = float("nan")
    runs["transferred_mib"] = runs["transferred_bytes"] / 2**20
    if "disk_copied_mib" in metrics:
        runs["disk_copied_mib"] = pd.to_numeric(runs.get("disk_processed_bytes"), errors="coerce") / 2**20
    label_fields = ["strategy"] + [field for field in fields if field != "strategy"]
    order = order or sorted(runs["scenario_id"].unique())

    rows = []
    for scenario_id in order:
        scenario_runs = runs[runs["scenario_id"] == scenario_id]
        completed = scenario_runs[scenario_runs["outcome"] == "completed"]
        first = scenario_runs.iloc[0]
        row: dict[str, Any] = {"scenario_id": scenario_id}
        row.update({field: first.get(field) for field in label_fields})
        row["n"] = len(scenario_runs)
        row["n_completed"] = len(completed)
        row["n_excluded"] = len(scenario_runs) - len(completed)
        for metric in metrics:
            values = completed[metric].dropna().astype(float)
            row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{metric}_min"] = values.min() if len(values) else math.nan
            row[f"{metric}_max"] = values.max() if len(values) else math.nan
        rows.append(row)
    columns = (["scenario_id"] + label_fields + ["n", "n_completed", "n_excluded"]
               + [f"{metric}_{statistic}" for metric in metrics for statistic in STATISTICS])
    return pd.DataFrame(rows, columns=columns)


def quality_warnings(summary: pd.DataFrame) -> list[str]:
    """List scenarios with too few completed runs or a coefficient of variation above 25 %."""
    warnings = []
    for row in summary.itertuples(index=False):
        row_values = row._asdict()
        scenario_id = row_values["scenario_id"]
        completed = row_values["n_completed"]
        if completed == 0:
            warnings.append(f"{scenario_id}: no completed runs, so it has no statistics")
            continue
        if completed < MIN_COMPLETED:
            warnings.append(f"{scenario_id}: only {completed} completed run"
                            f"{'s' if completed != 1 else ''}, fewer than {MIN_COMPLETED}")
        for metric in _VARIATION_METRICS:
            mean = row_values[f"{metric}_mean"]
            std = row_values[f"{metric}_std"]
            if math.isnan(mean) or math.isnan(std) or mean <= 0:
                continue
            variation = std / mean
            if variation > MAX_VARIATION:
                warnings.append(f"{scenario_id}: {metric} varies with a coefficient of variation "
                                f"of {variation:.0%}, above {MAX_VARIATION:.0%}")
    return warnings


def _decimals(value: float) -> int:
    if abs(value) >= 100:
        return 0
    if abs(value) >= 10:
        return 1
    return 2


def _format_mean_std(mean: float, std: float) -> str:
    """Format 'mean ± std' with the decimals that suit the mean for both numbers."""
    if math.isnan(mean):
        return "n/a"
    decimals = _decimals(mean)
    text = f"{mean:,.{decimals}f}"
    if not math.isnan(std):
        text += f" ± {std:,.{decimals}f}"
    return text


def _field_heading(field: str) -> str:
    name, unit = FIELD_LABELS.get(field, (field, ""))
    return f"{name} ({unit})" if unit else name


def _markdown_table(summary: pd.DataFrame, fields: list[str]) -> str:
    table = pd.DataFrame()
    table["scenario"] = summary["scenario_id"]
    for field in ["strategy"] + [field for field in fields if field != "strategy"]:
        table[_field_heading(field)] = summary[field].map(
            lambda value: "n/a" if value is None or (isinstance(value, float) and math.isnan(value))
            else (int(value) if isinstance(value, float) and value.is_integer() else value))
    table["runs"] = summary["n"]
    table["completed"] = summary["n_completed"]
    for metric, heading in {**METRICS, **DISK_METRICS}.items():
        if metric == "transferred_bytes" or f"{metric}_mean" not in summary:
            continue
        table[f"{heading}, mean ± std"] = [
            _format_mean_std(mean, std)
            for mean, std in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"])]
    return table.to_markdown(index=False)


# Fault columns of the runs table shown in the report, with their headings.
FAULT_TABLE_COLUMNS = {"run_id": "run", "fault_kind": "fault", "fault_trigger": "trigger",
                       "fault_struck_at_s": "struck at (s)", "fault_in_postcopy": "in postcopy",
                       "outcome": "run outcome", "fault_outcome": "fault outcome",
                       "fault_timed_out": "wait timed out", "fault_recovered": "recovered",
                       "fault_recovery_ms": "recovery (ms)"}


def _faults_markdown(runs: pd.DataFrame) -> list[str]:
    """Return the lines of the faults section: one row per run that had a fault, or none."""
    if "fault_kind" not in runs or not runs["fault_kind"].notna().any():
        return []
    faulty = runs[runs["fault_kind"].notna()]
    table = pd.DataFrame()
    for column, heading in FAULT_TABLE_COLUMNS.items():
        if column in faulty:
            table[heading] = [_fault_cell(column, value) for value in faulty[column]]
    return ["## Faults", "",
            "Fault outcome: completed, source-running (the migration failed and the guest still runs on "
            "the source), postcopy-recovered (paused in postcopy, resumed and finished), guest-lost, "
            "split-brain (the QEMUs of both hosts ran the guest) or not-struck (the migration ended before "
            "the trigger).", "",
            table.to_markdown(index=False), ""]


def _fault_cell(column: str, value: Any) -> str:
    """Format one cell of the faults table: flags as yes or no, seconds and ms with one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "n/a"
    if column in ("fault_in_postcopy", "fault_timed_out", "fault_recovered"):
        return "yes" if bool(value) else "no"
    if isinstance(value, (int, float)):
        return f"{value:.1f}"
    return str(value)


def _summary_markdown(experiment: str, playbook_sha256: str | None, runs: pd.DataFrame,
                      summary: pd.DataFrame, fields: list[str], figures: list[Path]) -> str:
    completed = int((runs["outcome"] == "completed").sum())
    excluded = runs[runs["outcome"] != "completed"]
    lines = [f"# Experiment {experiment}", ""]
    if playbook_sha256:
        lines += [f"Playbook sha256: `{playbook_sha256}`", ""]
    lines += [f"{len(runs)} runs in {len(summary)} scenarios, {completed} completed.", ""]
    if len(excluded):
        counts = excluded["outcome"].value_counts().sort_index()
        by_outcome = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
        lines += [f"Statistics use completed runs only: {len(excluded)} runs are counted but "
                  f"excluded ({by_outcome}).", ""]
    else:
        lines += ["Statistics use completed runs only, and every run completed.", ""]

    lines += ["## Statistics per scenario", "",
              "Values are mean ± sample standard deviation over completed runs. "
              "summary.csv also has min and max.", "",
              _markdown_table(summary, fields), ""]

    if len(excluded):
        table = excluded[["run_id", "outcome", "error"]].rename(
            columns={"run_id": "run", "error": "error message"})
        lines += ["## Excluded runs", "", table.to_markdown(index=False), ""]

    lines += _faults_markdown(runs)

    if len(runs):
        lines += ["## Strategy ranking", "",
                  "Per strategy over all its runs: converged is the share of runs that completed (a run "
                  "cancelled at max_time_s did not converge); the other figures are medians over completed "
                  "runs, with the rank in brackets (1 is best). Downtime is the paused time from libvirt's "
                  "events, total time runs to the end of postcopy or of the restore, and guest slowdown "
                  "compares the workload's lowest rate during the migration with its rate before.", "",
                  ranking_markdown(strategy_ranking(runs)), ""]

    warnings = quality_warnings(summary)
    lines += ["## Quality warnings", ""]
    lines += [f"- {warning}" for warning in warnings] if warnings else ["None."]
    lines += [""]

    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{figure.stem.replace('_', ' ')}]({figure.name})" for figure in figures]
        lines += [""]
    return "\n".join(lines)


def write_report(experiment_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write runs.csv, summary.csv, summary.md and the figures; return their paths.

    out_dir defaults to <experiment>/report. Raises StoreError when the folder
    contains no experiment.
    """
    experiment_dir = find_experiment_dir(experiment_dir)
    out_dir = Path(out_dir) if out_dir is not None else experiment_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(experiment_dir)
    fields = matrix_fields(experiment_dir, runs)
    written = []

    runs_csv = out_dir / "runs.csv"
    runs.to_csv(runs_csv, index=False)
    written.append(runs_csv)

    order = _scenario_order(experiment_dir, runs) if len(runs) else []
    summary = summarize(runs, fields, order)
    summary_csv = out_dir / "summary.csv"
    summary.to_csv(summary_csv, index=False)
    written.append(summary_csv)

    completed = runs[runs["outcome"] == "completed"]
    other_fields = [field for field in fields if field != "strategy"]
    figures = [
        plot_downtime_by_strategy(completed, other_fields, out_dir / "downtime_by_strategy.png"),
        plot_downtime_by_strategy(completed, other_fields, out_dir / "paused_time_by_strategy.png",
                                  metric="wall_downtime_ms"),
        plot_time_and_bytes_vs_dirty_rate(
            completed, [field for field in other_fields if field != "dirty_rate_mib_s"],
            out_dir / "time_and_bytes_vs_dirty_rate.png"),
        plot_downtime_views(completed, other_fields, out_dir / "downtime_qemu_vs_client.png"),
        plot_strategy_ranking(strategy_ranking(runs), RANKING_METRICS, out_dir / "strategy_ranking.png"),
    ]
    ranking_csv = out_dir / "ranking.csv"
    strategy_ranking(runs).to_csv(ranking_csv, index=False)
    written.append(ranking_csv)

    summary_md = out_dir / "summary.md"
    experiment = read_experiment_file(experiment_dir)
    text = _summary_markdown(experiment.get("experiment", experiment_dir.name),
                             experiment.get("playbook_sha256"), runs, summary, fields, figures)
    summary_md.write_text(text, encoding="utf-8")
    written.append(summary_md)
    written.extend(figures)
    log.info("wrote report of %d runs to %s", len(runs), out_dir)
    return written
