"""Classroom exercises: playbooks, guides, the precopy model and the answer key."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from lab.classroom import (DERIVED_METRICS, EXTRA_ITERATIONS, FLAG_THRESHOLD, GUEST_RESIDENT_MIB, METRICS, MIB,
                           SOURCE_CLASSROOM_DIR, answer_key, fault_table, list_exercises, load_exercise,
                           precopy_model, predicted_value, relative_difference, scenario_means,
                           scenario_prediction, stop_and_copy_model)
from lab.cli import main
from lab.errors import ConfigError
from lab.playbook import load_playbook
from lab.store import RUN_COLUMNS, load_runs

FIXTURE = Path(__file__).parent / "fixtures" / "classroom" / "class-eager-precopy"
EXERCISES = list_exercises()
# Exercises must run to a report in 10 minutes on 2 cores under TCG, about 20 s a run.
MAX_RUNS = 24


@pytest.fixture
def results(tmp_path):
    """A copy of the stored results, so that the runs cache is written outside the repository."""
    target = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, target)
    return target


def test_six_exercises_listed():
    assert EXERCISES == ["01-eager-precopy", "02-precopy-convergence", "03-postcopy", "04-hybrid",
                         "05-what-moves", "06-flushing"]


@pytest.mark.parametrize("exercise", EXERCISES)
def test_playbook_validates_within_budget(exercise):
    playbook = load_playbook(SOURCE_CLASSROOM_DIR / exercise / "playbook.yaml")
    runs = len(playbook.scenarios()) * playbook.repetitions
    assert runs <= MAX_RUNS
    assert playbook.experiment.startswith("class-")


def _headings(text: str) -> list[int]:
    return [len(match.group(1)) for match in re.finditer(r"^(#+) ", text, flags=re.MULTILINE)]


def _numbered_items(text: str, heading: str) -> list[str]:
    """Return the numbered list items of the section under the given level-2 heading."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [" ".join(match.group(1).split())
            for match in re.finditer(r"^\d+\. (.+)$", section, flags=re.MULTILINE)]


@pytest.mark.parametrize("exercise", EXERCISES)
def test_guides_have_same_sections(exercise):
    folder = SOURCE_CLASSROOM_DIR / exercise
    spanish = (folder / "guia.md").read_text(encoding="utf-8")
    english = (folder / "guide.md").read_text(encoding="utf-8")
    assert _headings(spanish) == _headings(english)
    assert len(_headings(spanish)) >= 7


@pytest.mark.parametrize("exercise", EXERCISES)
def test_guides_list_the_questions(exercise):
    folder = SOURCE_CLASSROOM_DIR / exercise
    spec = load_exercise(exercise)
    spanish = (folder / "guia.md").read_text(encoding="utf-8")
    english = (folder / "guide.md").read_text(encoding="utf-8")
    assert _numbered_items(spanish, "Preguntas") == [question.text["es"] for question in spec.questions]
    assert _numbered_items(english, "Questions") == [question.text["en"] for question in spec.questions]


@pytest.mark.parametrize("exercise", EXERCISES)
def test_guides_state_command_and_runs(exercise):
    folder = SOURCE_CLASSROOM_DIR / exercise
    playbook = load_playbook(folder / "playbook.yaml")
    runs = len(playbook.scenarios()) * playbook.repetitions
    for name, word in (("guia.md", "ejecuciones"), ("guide.md", "runs")):
        text = (folder / name).read_text(encoding="utf-8")
        assert f"migrlab run playbooks/classroom/{exercise}/playbook.yaml" in text
        assert f"migrlab exercise key {exercise} results/{playbook.experiment}" in text
        assert f"{runs} {word}" in text


# -- model ----------------------------------------------------------------------

def test_model_converging_hand_values():
    # M = 80 MiB, R = 32 MiB/s, D = 16 MiB/s: L = 0.5, budget 9.6 MiB.
    # Rounds send 80, 40, 20, 10, 5 MiB; 5 MiB is the first to fit, so n = 4.
    prediction = precopy_model(80 * MIB, 32 * MIB, 16 * MIB, 300)
    assert prediction.converges
    assert prediction.ratio == 0.5
    assert prediction.rounds == 5
    assert prediction.transferred_bytes == pytest.approx(155 * MIB)
    assert prediction.total_time_ms == pytest.approx(155 / 32 * 1000)
    assert prediction.downtime_ms == pytest.approx(5 / 32 * 1000)


def test_model_matches_closed_form():
    memory, rate, dirty = 80 * MIB, 20 * MIB, 16 * MIB
    prediction = precopy_model(memory, rate, dirty, 100)
    ratio = 0.8
    n = prediction.rounds - 1
    assert memory * ratio**n <= rate * 0.1
    assert memory * ratio ** (n - 1) > rate * 0.1
    assert prediction.transferred_bytes == pytest.approx(memory * (1 - ratio ** (n + 1)) / (1 - ratio))


@pytest.mark.parametrize("dirty_mib_s", [32, 48])
def test_model_not_converging_at_ratio_one_or_more(dirty_mib_s):
    prediction = precopy_model(80 * MIB, 32 * MIB, dirty_mib_s * MIB, 300, max_rounds=12)
    assert not prediction.converges
    assert prediction.rounds == 12
    assert prediction.downtime_ms is None
    assert math.isinf(prediction.total_time_ms)


def test_model_not_converging_within_max_rounds():
    # L = 0.9 needs 21 rounds to fall from 80 MiB below a 9.6 MiB budget.
    assert not precopy_model(80 * MIB, 32 * MIB, 0.9 * 32 * MIB, 300, max_rounds=5).converges
    assert precopy_model(80 * MIB, 32 * MIB, 0.9 * 32 * MIB, 300, max_rounds=30).rounds == 22


def test_model_memory_within_budget_sends_once():
    # 8 MiB fit in 32 MiB/s * 300 ms, even at L >= 1.
    prediction = precopy_model(8 * MIB, 32 * MIB, 64 * MIB, 300)
    assert prediction.converges
    assert prediction.rounds == 1
    assert prediction.transferred_bytes == pytest.approx(8 * MIB)
    assert prediction.downtime_ms == pytest.approx(250)


def test_model_zero_dirty_rate():
    prediction = precopy_model(80 * MIB, 32 * MIB, 0, 300)
    assert prediction.rounds == 2
    assert prediction.transferred_bytes == pytest.approx(80 * MIB)
    assert prediction.downtime_ms == 0


@pytest.mark.parametrize("args", [(0, 1, 1, 300), (1, 0, 1, 300), (1, 1, -1, 300), (1, 1, 1, 0)])
def test_model_rejects_bad_input(args):
    with pytest.raises(ValueError):
        precopy_model(*args)


def test_stop_and_copy_model():
    prediction = stop_and_copy_model(80 * MIB, 32 * MIB)
    assert prediction.downtime_ms == pytest.approx(2500)
    assert prediction.total_time_ms == pytest.approx(2500)


def test_scenario_prediction_inputs():
    scenario = {"strategy": "precopy", "working_set_mib": 64, "bandwidth_mib_s": 32, "link_rate_mib_s": 16,
                "dirty_rate_mib_s": 4, "downtime_limit_ms": None}
    prediction = scenario_prediction(scenario)
    expected = precopy_model((64 + GUEST_RESIDENT_MIB) * MIB, 16 * MIB, 4 * MIB, 300)
    assert prediction == expected
    assert scenario_prediction({**scenario, "strategy": "postcopy"}) is None
    assert scenario_prediction({**scenario, "dirty_rate_mib_s": 0}) is None
    assert scenario_prediction({**scenario, "bandwidth_mib_s": None, "link_rate_mib_s": None}) is None


def test_metrics_are_run_columns():
    missing = [name for name in METRICS if name not in RUN_COLUMNS and name not in DERIVED_METRICS]
    assert missing == []


def test_predicted_value_without_convergence():
    prediction = precopy_model(80 * MIB, 32 * MIB, 48 * MIB, 300)
    for metric in ("downtime_ms", "wall_downtime_ms", "total_time_ms", "transferred_mib", "iterations"):
        assert math.isnan(predicted_value(prediction, metric))


def test_predicted_value_converging():
    prediction = precopy_model(80 * MIB, 32 * MIB, 16 * MIB, 300)
    assert predicted_value(prediction, "iterations") == 5 + EXTRA_ITERATIONS
    assert predicted_value(prediction, "transferred_mib") == pytest.approx(155)
    assert predicted_value(prediction, "wall_downtime_ms") == pytest.approx(5 / 32 * 1000)
    with pytest.raises(ValueError):
        predicted_value(prediction, "postcopy_requests")


def test_relative_difference():
    assert relative_difference(150, 100) == pytest.approx(0.5)
    assert math.isnan(relative_difference(1, 0))
    assert math.isnan(relative_difference(float("nan"), 1))


# -- answer key -------------------------------------------------------------------

def _records(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((folder / "runs").glob("*/record.json"))]


def _expected_mean(records: list[dict], scenario_id: str, key: str, section: str = "stats") -> float:
    values = [record[section][key] for record in records
              if record["scenario_id"] == scenario_id and record["outcome"] == "completed"]
    return sum(values) / len(values)


def _fixture_memory_bytes() -> float:
    # The exercise's working set is 64 MiB.
    return (64 + GUEST_RESIDENT_MIB) * MIB


def test_scenario_means_match_records(results):
    records = _records(results)
    means = scenario_means(load_runs(results), ["downtime_ms", "total_time_ms", "transferred_mib",
                                                "completed_pct"]).set_index("scenario_id")
    for scenario_id in {record["scenario_id"] for record in records}:
        assert means.loc[scenario_id, "downtime_ms"] == pytest.approx(
            _expected_mean(records, scenario_id, "downtime_ms"))
        assert means.loc[scenario_id, "total_time_ms"] == pytest.approx(
            _expected_mean(records, scenario_id, "total_time_ms"))
        assert means.loc[scenario_id, "transferred_mib"] == pytest.approx(
            _expected_mean(records, scenario_id, "transferred_bytes") / MIB)
        outcomes = [record["outcome"] for record in records if record["scenario_id"] == scenario_id]
        assert means.loc[scenario_id, "completed_pct"] == pytest.approx(
            100 * outcomes.count("completed") / len(outcomes))


def _table_row(key: str, question: int, scenario_id: str) -> list[str]:
    section = key.split(f" {question}\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith(f"| `{scenario_id}` |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no row for {scenario_id} in question {question}")


def test_key_numbers_match_fixture(results):
    records = _records(results)
    key = answer_key("01-eager-precopy", results)
    paused = _expected_mean(records, "precopy-rate4", "wall_downtime_ms", section="measured")
    downtime = _expected_mean(records, "precopy-rate4", "downtime_ms")
    model = precopy_model(_fixture_memory_bytes(), 32 * MIB, 4 * MIB, 300)
    row = _table_row(key, 1, "precopy-rate4")
    assert row[1] == "2"
    assert float(row[2]) == pytest.approx(paused)
    assert float(row[3]) == pytest.approx(model.downtime_ms, abs=0.05)
    assert row[4] == f"{abs(paused - model.downtime_ms) / model.downtime_ms:.0%}"
    assert float(row[5]) == pytest.approx(downtime)


def test_key_compares_rounds_with_iterations(results):
    records = _records(results)
    key = answer_key("01-eager-precopy", results)
    iterations = _expected_mean(records, "precopy-rate16", "iterations")
    model = precopy_model(_fixture_memory_bytes(), 32 * MIB, 16 * MIB, 300)
    row = _table_row(key, 3, "precopy-rate16")
    assert row[1] == "3"
    assert float(row[2]) == pytest.approx(iterations, abs=0.005)
    assert float(row[3]) == model.rounds + EXTRA_ITERATIONS


def test_key_flags_large_differences(results):
    records = _records(results)
    key = answer_key("01-eager-precopy", results)
    total = _expected_mean(records, "precopy-rate16", "total_time_ms")
    model = precopy_model(_fixture_memory_bytes(), 32 * MIB, 16 * MIB, 300)
    assert abs(total - model.total_time_ms) / model.total_time_ms > FLAG_THRESHOLD
    row = _table_row(key, 2, "precopy-rate16")
    assert row[4].endswith("¡revisar!")
    assert not _table_row(key, 2, "precopy-rate4")[4].endswith("¡revisar!")


def test_key_in_english(results):
    key = answer_key("01-eager-precopy", results, lang="en")
    spec = load_exercise("01-eager-precopy")
    assert key.startswith("# Answer key: Eager (all) against precopy")
    for question in spec.questions:
        assert question.text["en"] in key
    assert "check!" in _table_row(key, 2, "precopy-rate16")[4]


def test_key_rejects_unknown_language(results):
    with pytest.raises(ConfigError, match="unknown language"):
        answer_key("01-eager-precopy", results, lang="fr")


def test_unknown_exercise_names_choices():
    with pytest.raises(ConfigError, match="01-eager-precopy"):
        load_exercise("no-such-exercise")


def test_questions_with_unknown_metric(tmp_path):
    (tmp_path / "questions.yaml").write_text(
        "title: {es: a, en: b}\nquestions:\n  - id: q\n    es: x\n    en: y\n    metrics: [speed]\n")
    with pytest.raises(ConfigError, match="unknown metric"):
        load_exercise(tmp_path)


def test_cli_exercise_list():
    result = CliRunner().invoke(main, ["exercise", "list"])
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == "01-eager-precopy\tEager (all) against precopy"
    assert len(result.output.splitlines()) == len(EXERCISES)


def test_cli_exercise_key_to_file(results, tmp_path):
    output = tmp_path / "clave.md"
    result = CliRunner().invoke(main, ["exercise", "key", "01-eager-precopy", str(results),
                                       "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert output.read_text(encoding="utf-8") == answer_key("01-eager-precopy", results)


def test_cli_exercise_key_unknown_exercise(results):
    result = CliRunner().invoke(main, ["exercise", "key", "nope", str(results)])
    assert result.exit_code == 1
    assert "exercise 'nope' not found" in result.output


def test_scenario_means_flushing_uses_save_file():
    runs = pd.DataFrame({
        "scenario_id": ["flushing", "flushing", "precopy"],
        "outcome": ["completed", "completed", "completed"],
        "transferred_bytes": [math.nan, math.nan, 150 * MIB],
        "save_file_disk_bytes": [130 * MIB, 132 * MIB, math.nan],
    })
    means = scenario_means(runs, ["transferred_mib"]).set_index("scenario_id")
    assert means.loc["flushing", "transferred_mib"] == pytest.approx(131)
    assert means.loc["precopy", "transferred_mib"] == pytest.approx(150)


def test_fault_table_one_row_per_run():
    runs = pd.DataFrame({
        "run_id": ["postcopy-fault-r1", "precopy-r1", "precopy-fault-r1"],
        "scenario_id": ["postcopy-fault", "precopy", "precopy-fault"],
        "outcome": ["failed", "completed", "failed"],
        "fault_kind": ["link-down", None, "link-down"],
        "fault_trigger": ["progress 50%", None, "progress 50%"],
        "fault_struck_at_s": [4.26, math.nan, 3.0],
        "fault_in_postcopy": [True, None, False],
        "fault_outcome": ["guest-lost", None, "source-running"],
        "fault_recovered": [False, None, None],
        "fault_recovery_ms": [61.69, math.nan, math.nan],
        "client_downtime_ms": [5079.06, 12.0, math.nan],
    })
    lines = fault_table(runs, "en")
    rows = [line for line in lines if line.startswith("| `")]
    assert rows == [
        "| `postcopy-fault-r1` | link-down | progress 50% | 4.3 | yes | failed | guest-lost | no | 61.7 | 5079 |",
        "| `precopy-fault-r1` | link-down | progress 50% | 3.0 | no | failed | source-running | — | — | — |",
    ]
    spanish = fault_table(runs, "es")
    assert "| `postcopy-fault-r1` | link-down | progress 50% | 4.3 | sí | failed | guest-lost | no | 61.7 | 5079 |" \
        in spanish


def test_fault_table_without_faults(results):
    assert fault_table(load_runs(results), "en") == ["No run of these results had a fault.", ""]


def test_prediction_none_for_fault_scenario():
    scenario = {"strategy": "precopy", "bandwidth_mib_s": 20, "working_set_mib": 64, "dirty_rate_mib_s": 4,
                "downtime_limit_ms": 300}
    assert scenario_prediction(scenario) is not None
    assert scenario_prediction({**scenario, "fault": "link-down-p50"}) is None


def test_questions_faults_must_be_boolean(tmp_path):
    (tmp_path / "questions.yaml").write_text(
        "title: {es: a, en: b}\nquestions:\n  - id: q\n    es: x\n    en: y\n    faults: sometimes\n")
    with pytest.raises(ConfigError, match="faults must be true or false"):
        load_exercise(tmp_path)


FAULT_FIXTURE = Path(__file__).parent / "fixtures" / "classroom" / "class-postcopy"


@pytest.fixture
def fault_results(tmp_path):
    """A copy of exercise 3's stored runs with a cut link, so that the runs cache is written outside the repository."""
    target = tmp_path / FAULT_FIXTURE.name
    shutil.copytree(FAULT_FIXTURE, target)
    return target


@pytest.mark.parametrize("lang", ["es", "en"])
def test_key_reports_fault_outcomes(fault_results, lang):
    records = [record for record in _records(fault_results) if record["fault"] is not None]
    spec = load_exercise("03-postcopy")
    number = next(index for index, question in enumerate(spec.questions, start=1) if question.faults)
    key = answer_key("03-postcopy", fault_results, lang=lang)
    assert records
    for record in records:
        row = _table_row(key, number, record["run_id"])
        assert row[1] == record["fault"]["kind"]
        assert row[5] == record["outcome"]
        assert row[6] == record["fault"]["outcome"]
        recovery_ms = record["fault"]["recovery_ms"]
        if recovery_ms is None:
            assert row[8] == "—"
        else:
            assert float(row[8]) == pytest.approx(recovery_ms, abs=0.5)
    # The fixture has recovered runs, so the recovery column is checked against numbers.
    assert any(record["fault"]["recovery_ms"] is not None for record in records)
    plain = [record["run_id"] for record in _records(fault_results) if record["fault"] is None]
    assert plain
    for run_id in plain:
        with pytest.raises(AssertionError, match="no row"):
            _table_row(key, number, run_id)
