"""The shortest classroom exercise, run end to end on the real local lab with one repetition."""

from __future__ import annotations

import json

import pytest
from ruamel.yaml import YAML

from lab.classroom import SOURCE_CLASSROOM_DIR, answer_key, load_exercise
from lab.playbook import load_playbook
from lab.runner import ExperimentRunner

pytestmark = pytest.mark.lab

EXERCISE = "05-what-moves"


@pytest.fixture(scope="module")
def experiment(shared_lab, guest_image, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classroom")
    yaml = YAML()
    document = yaml.load((SOURCE_CLASSROOM_DIR / EXERCISE / "playbook.yaml").read_text(encoding="utf-8"))
    # One repetition of each of the three strategies keeps the test near 2 minutes.
    document["repetitions"] = 1
    playbook_path = folder / "playbook.yaml"
    with playbook_path.open("w", encoding="utf-8") as stream:
        yaml.dump(document, stream)
    runner = ExperimentRunner(load_playbook(playbook_path), results_root=folder / "results",
                              lab=shared_lab, show_progress=False)
    return runner.run()


def test_exercise_runs_complete(experiment):
    assert experiment.outcomes == {"stop-and-copy-r1": "completed", "precopy-r1": "completed",
                                   "postcopy-r1": "completed"}


def test_key_reports_each_run(experiment):
    key = answer_key(EXERCISE, experiment.experiment_dir)
    spec = load_exercise(EXERCISE)
    for question in spec.questions:
        assert question.text["es"] in key
    for scenario_id in ("stop-and-copy", "precopy", "postcopy"):
        record = json.loads((experiment.experiment_dir / "runs" / f"{scenario_id}-r1" / "record.json").read_text())
        row = next(line for line in key.splitlines() if line.startswith(f"| `{scenario_id}` | 1 |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # Question 1: share of surviving TCP connections, then the longest stall.
        assert cells[2] == ("100" if record["observed"]["stream"]["survived"] else "0.00")
