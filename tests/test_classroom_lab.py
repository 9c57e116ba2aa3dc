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
    # One repetition of each strategy, with the disk copied, keeps the test near 2 minutes.
    # test_disk_lab covers the shared and local storage modes.
    document["repetitions"] = 1
    document["matrix"]["disk_storage"] = ["copy"]
    playbook_path = folder / "playbook.yaml"
    with playbook_path.open("w", encoding="utf-8") as stream:
        yaml.dump(document, stream)
    runner = ExperimentRunner(load_playbook(playbook_path), results_root=folder / "results",
                              lab=shared_lab, show_progress=False)
    return runner.run()


SCENARIOS = ("stop-and-copy-disk-copy", "precopy-disk-copy", "postcopy-disk-copy")


def test_exercise_runs_complete(experiment):
    assert experiment.outcomes == {f"{scenario_id}-r1": "completed" for scenario_id in SCENARIOS}


def test_key_reports_each_run(experiment):
    key = answer_key(EXERCISE, experiment.experiment_dir)
    spec = load_exercise(EXERCISE)
    for question in spec.questions:
        assert question.text["es"] in key
    for scenario_id in SCENARIOS:
        record = json.loads((experiment.experiment_dir / "runs" / f"{scenario_id}-r1" / "record.json").read_text())
        row = next(line for line in key.splitlines() if line.startswith(f"| `{scenario_id}` | 1 |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # Question 1: share of surviving TCP connections, then the longest stall.
        assert cells[2] == ("100" if record["observed"]["stream"]["survived"] else "0.00")


def test_key_reports_disk_copied(experiment):
    key = answer_key(EXERCISE, experiment.experiment_dir)
    section = key.split("## Pregunta 5", 1)[1].split("## Pregunta 6", 1)[0]
    for scenario_id in SCENARIOS:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{scenario_id}` | 1 |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # The disk copied, in MiB: the whole 128 MiB disk, plus what the guest wrote meanwhile.
        assert float(cells[2]) >= 128
