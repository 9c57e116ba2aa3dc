"""Figures of an experiment, drawn with matplotlib's Agg backend into PNG files.

Each strategy has the same color in every figure (STRATEGY_COLORS). The
functions take the runs DataFrame of store.load_runs(), already reduced to
completed runs, and always write the file. Without data, the figure shows a note instead of a plot.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lab.playbook import STRATEGIES  # noqa: E402

log = logging.getLogger(__name__)

# Colors from matplotlib's tab10 palette.
STRATEGY_COLORS = {
    "stop-and-copy": "#d62728",
    "precopy": "#1f77b4",
    "postcopy": "#2ca02c",
    "hybrid": "#9467bd",
    # Colors of matplotlib's tab20 palette for the strategies with a QEMU feature.
    "downtime-steps": "#aec7e8",
    "auto-converge": "#ff7f0e",
    "dirty-limit": "#ffbb78",
    "xbzrle": "#8c564b",
    "multifd": "#17becf",
    "postcopy-preempt": "#98df8a",
    "flushing": "#7f7f7f",
}
_OTHER_COLORS = ["#e377c2", "#bcbd22", "#c5b0d5", "#c49c94", "#f7b6d2"]
_LINE_STYLES = ["-", "--", ":", "-."]

# Readable name and unit of each scenario field, for labels.
FIELD_LABELS = {
    "strategy": ("strategy", ""),
    "memory_mib": ("memory", "MiB"),
    "vcpus": ("vCPUs", ""),
    "working_set_mib": ("working set", "MiB"),
    "dirty_rate_mib_s": ("dirty rate", "MiB/s"),
    "pattern": ("pattern", ""),
    "bandwidth_mib_s": ("bandwidth", "MiB/s"),
    "downtime_limit_ms": ("downtime limit", "ms"),
    "max_time_s": ("max time", "s"),
    "postcopy_after_iterations": ("postcopy after", "iterations"),
    "nic_model": ("NIC model", ""),
    "disk_size_mib": ("disk size", "MiB"),
    "disk_storage": ("disk storage", ""),
}
_NULL_LABELS = {"bandwidth_mib_s": "unlimited", "downtime_limit_ms": "QEMU default",
                "postcopy_after_iterations": "never", "disk_size_mib": "no disk", "disk_storage": "no disk"}

# Widest figure in inches; more groups get narrower bars and slanted labels.
MAX_FIGURE_WIDTH_IN = 16.0

# A y axis switches to log scale when max / min of the plotted values exceeds this.
LOG_SCALE_RATIO = 100.0


def strategy_color(strategy: str, strategies: list[str]) -> str:
    """Return the color of a strategy; unknown strategies get the remaining colors."""
    if strategy in STRATEGY_COLORS:
        return STRATEGY_COLORS[strategy]
    unknown = sorted(name for name in strategies if name not in STRATEGY_COLORS)
    return _OTHER_COLORS[unknown.index(strategy) % len(_OTHER_COLORS)]


def ordered_strategies(values: Any) -> list[str]:
    """Return the distinct strategies in the order of STRATEGIES, unknown ones last."""
    present = {str(value) for value in values if isinstance(value, str)}
    known = [name for name in STRATEGIES if name in present]
    return known + sorted(present - set(known))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(field: str, value: Any) -> str:
    """Format one scenario value with its unit, e.g. '24 MiB/s'."""
    if _is_missing(value):
        return _NULL_LABELS.get(field, "none")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    unit = FIELD_LABELS.get(field, (field, ""))[1]
    return f"{value} {unit}".strip()


def group_label(fields: list[str], values: tuple, separator: str = ", ") -> str:
    """Label a combination of scenario values, e.g. 'dirty rate 24 MiB/s'."""
    if not fields:
        return "all runs"
    return separator.join(f"{FIELD_LABELS.get(field, (field, ''))[0]} {format_value(field, value)}"
                          for field, value in zip(fields, values))


def _sort_key(value: Any) -> tuple:
    if _is_missing(value):
        return (1, 0, "")
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (0, 0, str(value))


def _group_keys(runs: pd.DataFrame, fields: list[str]) -> list[tuple]:
    if not fields:
        return [()]
    keys = {tuple(row) for row in runs[fields].itertuples(index=False, name=None)}
    return sorted(keys, key=lambda key: tuple(_sort_key(value) for value in key))


def _select(runs: pd.DataFrame, fields: list[str], key: tuple) -> pd.DataFrame:
    mask = pd.Series(True, index=runs.index)
    for field, value in zip(fields, key):
        if _is_missing(value):
            mask &= runs[field].isna()
        else:
            mask &= runs[field] == value
    return runs[mask]


def _no_data(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])


def _use_log_scale(values: pd.Series) -> bool:
    positive = values[values > 0]
    return len(positive) > 1 and positive.max() / positive.min() > LOG_SCALE_RATIO


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.debug("wrote figure %s", path)
    return path


# Title and y-axis label of the downtime figure for each downtime metric.
DOWNTIME_LABELS = {
    "downtime_ms": ("Downtime reported by QEMU", "downtime reported by QEMU (ms)"),
    "wall_downtime_ms": ("Guest paused during the switch-over",
                         "source stop to destination run, from libvirt events (ms)"),
}


def plot_downtime_by_strategy(runs: pd.DataFrame, group_fields: list[str],
                              path: str | Path, metric: str = "downtime_ms") -> Path:
    """Draw mean downtime per strategy as bars, clustered by the other matrix values.

    Error bars are one standard deviation and each run is a black dot. The y
    axis is logarithmic when the values span more than two decades.
    """
    path = Path(path)
    data = runs[runs[metric].notna()] if metric in runs else runs.iloc[0:0]
    groups = _group_keys(data, group_fields) if not data.empty else [()]
    fig, ax = plt.subplots(figsize=(min(MAX_FIGURE_WIDTH_IN, max(6.0, 2.0 + 2.5 * len(groups))), 5))
    title, y_label = DOWNTIME_LABELS.get(metric, (metric, metric))
    title += " by strategy"
    if group_fields:
        title += " and " + ", ".join(FIELD_LABELS.get(field, (field, ""))[0]
                                     for field in group_fields)
    ax.set_title(title)
    ax.set_ylabel(y_label)
    if data.empty:
        _no_data(ax, f"no completed runs with {metric}")
        return _save(fig, path)

    strategies = ordered_strategies(data["strategy"])
    width = 0.8 / len(strategies)
    for strategy_index, strategy in enumerate(strategies):
        color = strategy_color(strategy, strategies)
        label: str | None = strategy
        for group_index, key in enumerate(groups):
            selected = _select(data[data["strategy"] == strategy], group_fields, key)
            values = selected[metric].to_numpy(dtype=float)
            if len(values) == 0:
                continue
            x = group_index - 0.4 + width * (strategy_index + 0.5)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(x, values.mean(), width * 0.9, color=color, alpha=0.8, yerr=std,
                   capsize=3, error_kw={"elinewidth": 1}, label=label)
            label = None
            # Spread the dots of one bar sideways so that equal values stay visible.
            offsets = np.zeros(1) if len(values) == 1 \
                else np.linspace(-width * 0.25, width * 0.25, len(values))
            ax.scatter(x + offsets, values, s=14, color="black", zorder=3)

    ax.set_xticks(range(len(groups)))
    if len(group_fields) == 1:
        # One field: its name goes on the axis, the ticks show only values.
        ax.set_xlabel(FIELD_LABELS.get(group_fields[0], (group_fields[0], ""))[0])
        tick_labels = [format_value(group_fields[0], key[0]) for key in groups]
    else:
        # One line per field, so that the labels of neighbouring groups do not overlap.
        tick_labels = [group_label(group_fields, key, separator="\n") for key in groups]
    ax.set_xticklabels(tick_labels,
                       rotation=0 if len(groups) <= 4 else 45,
                       ha="center" if len(groups) <= 4 else "right")
    if _use_log_scale(data[metric]):
        ax.set_yscale("log")
        ax.set_ylabel(y_label.replace("(ms)", "(ms, log scale)"))
    ax.legend(title="strategy", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _mean_std_by(data: pd.DataFrame, x_field: str, metric: str) -> pd.DataFrame:
    grouped = data.groupby(x_field)[metric]
    table = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1)})
    return table.sort_index()


def plot_time_and_bytes_vs_dirty_rate(runs: pd.DataFrame, other_fields: list[str],
                                      path: str | Path) -> Path:
    """Draw total time and transferred MiB against dirty rate, one line per strategy.

    Matrix fields other than strategy and dirty rate get one line style per
    value combination. Error bars are one standard deviation.
    """
    path = Path(path)
    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(12, 5))
    fig.suptitle("Migration time and transferred memory against dirty rate")
    panels = [
        (time_ax, "total_time_s", "migration time, to the end of postcopy (s)"),
        (bytes_ax, "transferred_mib", "transferred memory (MiB)"),
    ]
    data = runs.copy()
    # QEMU's total time ends at the switch-over for postcopy, so the measured
    # time to the end of the transfer is used where the run has it.
    total_ms = data["total_time_ms"]
    if "transfer_time_ms" in data:
        total_ms = data["transfer_time_ms"].fillna(total_ms)
    data["total_time_s"] = total_ms / 1000.0
    data["transferred_mib"] = data["transferred_bytes"] / 2**20
    x_label = "guest dirty rate (MiB/s)"
    if (data["dirty_rate_mib_s"] == 0).any():
        x_label += ", 0 = unthrottled"

    strategies = ordered_strategies(data["strategy"])
    groups = _group_keys(data, other_fields)
    for ax, metric, y_label in panels:
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(y_label.split(" (")[0].capitalize())
        measured = data[data[metric].notna() & data["dirty_rate_mib_s"].notna()]
        if measured.empty:
            _no_data(ax, f"no completed runs with {metric}")
            continue
        for strategy in strategies:
            color = strategy_color(strategy, strategies)
            for group_index, key in enumerate(groups):
                selected = _select(measured[measured["strategy"] == strategy], other_fields, key)
                if selected.empty:
                    continue
                table = _mean_std_by(selected, "dirty_rate_mib_s", metric)
                label = strategy if not other_fields \
                    else f"{strategy}, {group_label(other_fields, key)}"
                ax.errorbar(table.index, table["mean"], yerr=table["std"].fillna(0.0),
                            color=color, linestyle=_LINE_STYLES[group_index % len(_LINE_STYLES)],
                            marker="o", capsize=3, label=label)
        ax.set_xticks(sorted(measured["dirty_rate_mib_s"].unique()))
        if _use_log_scale(measured[metric]):
            ax.set_yscale("log")
            ax.set_ylabel(f"{y_label}, log scale")
        ax.grid(alpha=0.3)
        ax.legend(title="strategy", fontsize="small")
    return _save(fig, path)


def plot_strategy_ranking(table: pd.DataFrame, metrics: dict[str, tuple[str, bool]], path: str | Path) -> Path:
    """Draw one panel per metric with a horizontal bar per strategy, best at the top.

    *table* is lab.ranking.strategy_ranking()'s result and *metrics* maps a
    column to (heading, higher is better). Strategies without a value are
    listed last with "n/a".
    """
    path = Path(path)
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(MAX_FIGURE_WIDTH_IN * 1.25, 4.0 * len(metrics)),
                                                       max(3.0, 0.45 * len(table) + 1.5)))
    fig.suptitle("Strategies ranked on each figure (median of completed runs; best at the top)")
    strategies = list(table["strategy"])
    for ax, (metric, (heading, higher_is_better)) in zip(axes, metrics.items()):
        ax.set_title(heading + ("\n(higher is better)" if higher_is_better else "\n(lower is better)"),
                     fontsize="medium")
        if table.empty:
            _no_data(ax, "no runs")
            continue
        ordered = table.sort_values(f"{metric}_rank", kind="stable").iloc[::-1]
        values = ordered[metric].astype(float)
        positions = np.arange(len(ordered))
        ax.barh(positions, values.fillna(0.0),
                color=[strategy_color(name, strategies) for name in ordered["strategy"]], alpha=0.85)
        ax.set_yticks(positions)
        ax.set_yticklabels([f"{rank}. {name}" for rank, name in zip(ordered[f"{metric}_rank"], ordered["strategy"])])
        if _use_log_scale(values.dropna()):
            # Stop-and-copy's downtime can be 100 times that of live strategies.
            ax.set_xscale("log")
            ax.set_xlabel("log scale")
        for position, value in zip(positions, values):
            # Labels sit at the left edge in axes coordinates, which works on a log axis too.
            ax.text(0.01, position, "n/a" if math.isnan(value) else f"{value:,.3g}", va="center",
                    fontsize="small", transform=ax.get_yaxis_transform())
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# Downtime as QEMU reports it, as libvirt's events bracket it, and as the client sees it.
DOWNTIME_VIEWS = {
    "downtime_ms": ("QEMU downtime (source)", "#7f7f7f"),
    "wall_downtime_ms": ("paused, libvirt events", "#d62728"),
    "switchover_outage_ms": ("client outage at the switch-over", "#ffbb78"),
    "client_downtime_ms": ("client outage, longest in the run", "#ff7f0e"),
}


def plot_downtime_views(runs: pd.DataFrame, group_fields: list[str], path: str | Path) -> Path:
    """Draw QEMU's downtime, the paused time and the client's outage side by side for each strategy.

    One cluster per strategy, and per combination of the other matrix values
    in ``group_fields``, with one bar per view: the mean over completed
    runs, one standard deviation as error bar, and each run as a black dot.
    """
    path = Path(path)
    views = [metric for metric in DOWNTIME_VIEWS if metric in runs and runs[metric].notna().any()]
    keys = ["strategy", *group_fields]
    data = runs[runs[views].notna().any(axis=1)] if views else runs.iloc[0:0]
    groups = _group_keys(data, keys) if not data.empty else []
    strategies = ordered_strategies(data["strategy"]) if not data.empty else []
    groups.sort(key=lambda key: strategies.index(key[0]))
    fig, ax = plt.subplots(figsize=(min(MAX_FIGURE_WIDTH_IN, max(7.0, 2.0 + 2.2 * len(groups))), 5))
    ax.set_title("Downtime reported by QEMU against the outage a client sees")
    ax.set_ylabel("time (ms)")
    if not groups:
        _no_data(ax, "no completed runs with a downtime figure")
        return _save(fig, path)

    width = 0.8 / len(views)
    for view_index, metric in enumerate(views):
        label, color = DOWNTIME_VIEWS[metric]
        for group_index, key in enumerate(groups):
            values = _select(data, keys, key)[metric].dropna().to_numpy(dtype=float)
            if len(values) == 0:
                continue
            x = group_index - 0.4 + width * (view_index + 0.5)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(x, values.mean(), width * 0.9, color=color, alpha=0.85, yerr=std, capsize=3,
                   error_kw={"elinewidth": 1}, label=label if group_index == 0 else None)
            ax.text(x, values.mean(), f"{values.mean():.0f}", ha="center", va="bottom", fontsize="x-small")
            offsets = np.zeros(1) if len(values) == 1 else np.linspace(-width * 0.25, width * 0.25, len(values))
            ax.scatter(x + offsets, values, s=10, color="black", zorder=3)

    ax.set_xticks(range(len(groups)))
    tick_labels = [key[0] if not group_fields else f"{key[0]}\n{group_label(group_fields, key[1:])}"
                   for key in groups]
    ax.set_xticklabels(tick_labels, rotation=0 if len(groups) <= 5 else 30,
                       ha="center" if len(groups) <= 5 else "right", fontsize="small")
    if _use_log_scale(data[views].stack()):
        ax.set_yscale("log")
        ax.set_ylabel("time (ms, log scale)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
