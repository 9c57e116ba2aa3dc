"""The stored timeline of a run: parts on one clock, the merged table, the figure and the report columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from lab.cli import main
from lab.records import EchoFigures, GuestFigures, Observed, StreamFigures, SwitchoverPhases
from lab.report import write_report
from lab.store import init_experiment, load_runs, write_run
from lab.timeline import (MERGED_COLUMNS, PART_FILES, conform_part, empty_part, encode_parts,
                          load_run_timeline, plot_timeline)
from tests.fixtures.fabricate import PLAYBOOK_TEXT, fabricate_events, fabricate_record, fabricate_timeline, \
    write_playbook

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def observed(client_downtime_ms=80.0, survived=True) -> Observed:
    return Observed(
        echo=EchoFigures(interval_ms=1.0, requests_sent=1000, replies_received=940, lost_requests=60,
                         client_downtime_ms=client_downtime_ms, outage_start_s=0.999, outage_end_s=1.079),
        stream=StreamFigures(connected=True, survived=survived, intact=survived, sent_bytes=6400,
                             echoed_bytes=6400 if survived else 3200, max_stall_ms=210.0, stall_start_s=1.0),
        network=SwitchoverPhases(last_reply_before_s=0.999, paused_at_s=1.0, resumed_at_s=1.02,
                                 first_announce_at_s=1.025, announce_kind="rarp", announcements=5,
                                 switch_learned_at_s=1.025, first_forwarded_at_s=1.026,
                                 first_reply_after_s=1.079),
        guest=GuestFigures(clock="echo", throughput_before_pps=2048.0, throughput_min_during_pps=1800.0,
                           slowdown_pct=12.1, recovery_ms=0.0, reports_source=5, reports_destination=4),
    )


def parts() -> dict[str, pd.DataFrame]:
    seq = np.arange(3000)
    sent = -1.0 + seq / 1000.0
    received = sent + 0.0005
    received[(sent >= 1.0) & (sent < 1.06)] = np.nan
    return {
        "echo": pd.DataFrame({"seq": seq, "sent_s": sent, "received_s": received,
                              "rtt_ms": (received - sent) * 1000.0,
                              "guest_ns": pd.array([None] * len(seq), dtype="Int64")}),
        "stream": pd.DataFrame({"t_s": [0.0, 0.002, 0.5, 0.71], "kind": ["sent", "echoed", "sent", "echoed"],
                                "total_bytes": [64, 64, 128, 128]}),
        "probe_events": pd.DataFrame({"t_s": [-1.0], "kind": ["stream-connected"], "message": ["10.77.0.100:7008"]}),
        "capture_frames": pd.DataFrame({"t_s": [1.025], "port": ["destination"], "way": ["in"],
                                        "direction": ["from-guest"], "kind": ["rarp"], "detail": ["rarp-request"]}),
        "capture_segments": pd.DataFrame({"first_s": [-1.0, 1.026], "last_s": [1.02, 1.999],
                                          "port": ["source", "destination"], "way": ["out", "out"],
                                          "direction": ["to-guest"] * 2,
                                          "kind": ["echo"] * 2, "frames": [2020, 974], "first_seq": [0, 2026],
                                          "last_seq": [2019, 2026]}),
        "guest": pd.DataFrame({"t_s": [-1.0, 0.0, 1.2], "interval_start_s": [np.nan, -1.0, 0.0],
                               "host": ["h1", "h1", "h2"], "seq": [1, 2, 3], "guest_t_ms": [1000, 2000, 3000],
                               "dirtied_pages": [0, 2048, 4096], "rate_pps": [2048] * 3,
                               "throughput_pps": [np.nan, 2048.0, 2048 / 1.2]}),
    }


@pytest.fixture
def experiment(tmp_path):
    playbook = write_playbook(tmp_path, PLAYBOOK_TEXT)
    experiment_dir = init_experiment(tmp_path / "results", playbook)
    specs = [("precopy-rate4", 1, 26, 80.0, True), ("precopy-rate4", 2, 24, 100.0, True),
             ("postcopy-rate4", 1, 5, 360.0, False)]
    for index, (scenario_id, repetition, downtime, client, survived) in enumerate(specs):
        record = fabricate_record(playbook, scenario_id, repetition, downtime_ms=downtime, total_time_ms=4000,
                                  transferred_mib=100, wall_downtime_ms=downtime + 2.0, index=index)
        record = record.model_copy(update={"observed": observed(client, survived)})
        write_run(experiment_dir, record, fabricate_timeline(4000), fabricate_events(4000),
                  encode_parts(parts()))
    return experiment_dir


def test_parts_round_trip(experiment):
    timeline = load_run_timeline(experiment / "runs" / "precopy-rate4-r1")
    assert set(timeline.parts) == set(PART_FILES)
    echo = timeline.part("echo")
    assert len(echo) == 3000
    assert echo["guest_ns"].dtype == "Int64"
    assert echo["received_s"].isna().sum() == 60
    assert timeline.part("guest")["host"].tolist() == ["h1", "h1", "h2"]
    assert timeline.record.observed.echo.client_downtime_ms == 80.0


def test_missing_part_is_empty(tmp_path, experiment):
    run_dir = experiment / "runs" / "precopy-rate4-r1"
    (run_dir / PART_FILES["stream"]).unlink()
    timeline = load_run_timeline(run_dir)
    assert "stream" not in timeline.parts
    assert timeline.part("stream").empty
    assert list(timeline.part("stream").columns) == ["t_s", "kind", "total_bytes"]


def test_conform_part_rejects_missing_column():
    with pytest.raises(ValueError, match="lacks the columns"):
        conform_part("stream", pd.DataFrame({"t_s": [0.0]}))


def test_conform_part_rejects_unknown_part():
    with pytest.raises(ValueError, match="unknown timeline part"):
        conform_part("pings", empty_part("echo"))


def test_merged_puts_every_series_on_one_clock(experiment):
    merged = load_run_timeline(experiment / "runs" / "precopy-rate4-r1").merged()
    assert list(merged.columns) == list(MERGED_COLUMNS)
    assert merged["t_s"].is_monotonic_increasing
    series = set(merged["series"])
    assert {"data_remaining_bytes", "iteration", "event:resumed", "echo_rtt_ms", "echo_lost",
            "stream_sent_bytes", "stream_echoed_bytes", "announce:rarp", "segment:source:out:to-guest:echo",
            "guest_throughput_pps"} <= series
    lost = merged[merged["series"] == "echo_lost"]
    assert len(lost) == 60
    assert lost["t_s"].min() == pytest.approx(1.0)
    guest = merged[merged["series"] == "guest_throughput_pps"].dropna(subset=["value"])
    assert guest["value"].tolist() == pytest.approx([2048.0, 2048 / 1.2])


def test_merged_of_run_without_probes(tmp_path):
    playbook = write_playbook(tmp_path, PLAYBOOK_TEXT)
    experiment_dir = init_experiment(tmp_path / "results", playbook)
    record = fabricate_record(playbook, "precopy-rate4", 1, downtime_ms=20, total_time_ms=1000)
    write_run(experiment_dir, record, fabricate_timeline(1000), fabricate_events(1000))
    merged = load_run_timeline(experiment_dir / "runs" / "precopy-rate4-r1").merged()
    assert "echo_rtt_ms" not in set(merged["series"])
    assert "data_processed_bytes" in set(merged["series"])


def test_timeline_figure_is_png(experiment, tmp_path):
    path = plot_timeline(load_run_timeline(experiment / "runs" / "postcopy-rate4-r1"), tmp_path / "t.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 50_000


def test_cli_plot_timeline(experiment):
    run_dir = experiment / "runs" / "precopy-rate4-r2"
    result = CliRunner().invoke(main, ["plot", "timeline", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "timeline.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_plot_timeline_without_record(tmp_path):
    result = CliRunner().invoke(main, ["plot", "timeline", str(tmp_path)])
    assert result.exit_code == 1
    assert "record.json: not found" in result.output


def test_runs_table_has_client_columns(experiment):
    runs = load_runs(experiment, cache=False).set_index("run_id")
    assert runs.loc["precopy-rate4-r1", "client_downtime_ms"] == 80.0
    assert runs.loc["precopy-rate4-r1", "lost_requests"] == 60
    assert runs.loc["postcopy-rate4-r1", "stream_survived"] == 0
    assert runs.loc["precopy-rate4-r2", "stream_max_stall_ms"] == 210.0
    assert runs.loc["precopy-rate4-r1", "switchover_outage_ms"] == pytest.approx(80.0)
    assert runs.loc["precopy-rate4-r1", "silence_before_pause_ms"] == pytest.approx(1.0)
    assert runs.loc["precopy-rate4-r1", "announce_after_pause_ms"] == pytest.approx(25.0)
    assert runs.loc["precopy-rate4-r1", "forward_after_announce_ms"] == pytest.approx(1.0)
    assert runs.loc["precopy-rate4-r1", "reply_after_forward_ms"] == pytest.approx(53.0)
    assert runs.loc["precopy-rate4-r1", "guest_slowdown_pct"] == pytest.approx(12.1)


def test_report_sets_qemu_and_client_downtime_side_by_side(experiment):
    paths = {path.name: path for path in write_report(experiment)}
    assert paths["downtime_qemu_vs_client.png"].read_bytes()[:8] == PNG_SIGNATURE
    summary = pd.read_csv(paths["summary.csv"]).set_index("scenario_id")
    assert summary.loc["precopy-rate4", "client_downtime_ms_mean"] == pytest.approx(90.0)
    assert summary.loc["precopy-rate4", "downtime_ms_mean"] == pytest.approx(25.0)
    assert summary.loc["postcopy-rate4", "stream_survived_mean"] == 0.0
    markdown = paths["summary.md"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| scenario"))
    qemu = header.index("QEMU downtime (ms)")
    client = header.index("client downtime")
    assert 0 < client - qemu < 60
