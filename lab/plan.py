"""The plan of a playbook: its scenarios, the runs they make, and what the simple precopy model predicts.

``migrlab plan`` prints it without touching a lab, so a playbook can be
checked and its cost judged before a run. The model is the one of
lab.classroom: precopy rounds from memory, dirty rate and link rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lab.classroom import MIB, ModelPrediction, scenario_prediction
from lab.playbook import Playbook, Scenario

# Scenario fields the plan shows: in the table where they vary between
# scenarios, else once above it.
_SHOWN_FIELDS = ("strategy", "memory_mib", "working_set_mib", "dirty_rate_mib_s", "pattern", "bandwidth_mib_s",
                 "link_rate_mib_s", "downtime_limit_ms", "postcopy_after_iterations", "postcopy_after_s",
                 "max_time_s", "fault")


@dataclass(frozen=True)
class PlannedScenario:
    """A scenario of the plan with the model's prediction, None where the model does not apply."""

    scenario: Scenario
    prediction: ModelPrediction | None


@dataclass(frozen=True)
class Plan:
    """Scenarios and run count of a playbook."""

    playbook: Playbook
    scenarios: list[PlannedScenario]

    @property
    def run_count(self) -> int:
        return len(self.scenarios) * self.playbook.repetitions

    @property
    def migration_time_bound_s(self) -> float:
        """Sum of max_time_s over all runs, the limit on the total time of the migration phases."""
        return sum(planned.scenario.max_time_s for planned in self.scenarios) * self.playbook.repetitions

    def varying_fields(self, *, with_matrix_keys: bool = True) -> list[str]:
        """Return the shown scenario fields whose value differs between scenarios.

        Without *with_matrix_keys*, the fields the matrix varies are left out,
        because the scenario ids already show their values.
        """
        return [name for name in _SHOWN_FIELDS
                if self._differs(name) and (with_matrix_keys or name not in self.playbook.matrix)]

    def common_values(self) -> dict[str, str]:
        """Return the shown scenario fields that all scenarios share, with their values as text."""
        first = self.scenarios[0].scenario
        return {name: _text(getattr(first, name)) for name in _SHOWN_FIELDS
                if not self._differs(name) and getattr(first, name) is not None}

    def _differs(self, name: str) -> bool:
        return len({_text(getattr(planned.scenario, name)) for planned in self.scenarios}) > 1

    def rows(self, *, with_matrix_keys: bool = True) -> list[dict[str, Any]]:
        """Return one row per scenario: its id, the fields that vary, and the model's figures."""
        fields = self.varying_fields(with_matrix_keys=with_matrix_keys)
        rows = []
        for planned in self.scenarios:
            row: dict[str, Any] = {"scenario": planned.scenario.scenario_id}
            for name in fields:
                value = getattr(planned.scenario, name)
                row[name] = _text(value) if name == "fault" else value
            row.update(_model_figures(planned.prediction))
            rows.append(row)
        return rows


def make_plan(playbook: Playbook) -> Plan:
    """Expand the playbook's matrix and predict each scenario with the simple precopy model."""
    return Plan(playbook=playbook,
                scenarios=[PlannedScenario(scenario, scenario_prediction(scenario.values()))
                           for scenario in playbook.scenarios()])


def _model_figures(prediction: ModelPrediction | None) -> dict[str, Any]:
    """Return the model's ratio L, rounds, downtime, MiB sent and time; None where there is no prediction."""
    if prediction is None:
        return {"model_ratio": None, "model_rounds": None, "model_downtime_ms": None,
                "model_sent_mib": None, "model_time_s": None}
    converged = prediction.converges
    return {
        "model_ratio": round(prediction.ratio, 3),
        "model_rounds": prediction.rounds if converged else None,
        "model_downtime_ms": round(prediction.downtime_ms) if prediction.downtime_ms is not None else None,
        "model_sent_mib": round(prediction.transferred_bytes / MIB) if converged else math.inf,
        "model_time_s": round(prediction.total_time_ms / 1000, 1) if converged else math.inf,
    }


def _text(value: Any) -> str:
    """Return a field value as the plan prints it: a fault by its id text, null as "-"."""
    if value is None:
        return "-"
    if hasattr(value, "id_text"):
        return value.id_text()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
