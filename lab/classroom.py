"""Classroom exercises: the simple precopy model and the answer key of each exercise.

The model is the one of Liu et al. (HPDC 2011). With memory M, link rate R and
dirty rate D, the ratio L = D / R sets the size of each precopy round: round
0 sends all of M, round i sends M * L**i, and the rounds stop at the first n
where M * L**n fits in the downtime budget, M * L**n <= R * downtime_limit.
That last round is sent with the guest paused. Without throttling or
postcopy, precopy does not converge when L >= 1.

An exercise is a folder under playbooks/classroom with playbook.yaml, the
two guides (guia.md in Spanish, guide.md in English) and questions.yaml, the
machine-readable list of questions that the guides and the answer key share.
A wheel ships these folders as package data under lab/exercises
(pyproject.toml maps the package lab.exercises to playbooks/classroom), so
the exercises are found in an installed package as in the source tree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pandas as pd
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from lab.errors import ConfigError
from lab.store import load_runs

log = logging.getLogger(__name__)

MIB = 2**20
# The exercises in a source checkout; an installed wheel has them under lab/exercises.
SOURCE_CLASSROOM_DIR = Path(__file__).resolve().parent.parent / "playbooks" / "classroom"
PACKAGE_DATA_DIR = "exercises"
# The files of an exercise folder, in the order `migrlab exercise copy` lists them.
EXERCISE_FILES = ("playbook.yaml", "guide.md", "guia.md", "questions.yaml")
LANGUAGES = ("es", "en")

# QEMU's default maximum downtime (migrate-set-parameters downtime-limit), used
# when a scenario leaves downtime_limit_ms null.
QEMU_DEFAULT_DOWNTIME_MS = 300
# Memory the guest itself keeps resident besides the workload's working set:
# kernel, initramfs and the files unpacked from it. QEMU skips zero pages, so M
# is this plus the working set rather than the whole guest RAM. Measured with
# QEMU 10.0.2 under TCG: stop-and-copy of a 192 MiB guest with a 64 MiB working
# set sent about 33,300 normal pages (130 MiB) and skipped about 16,100 zero pages.
# With a 32 MiB working set the same guest sent 106 MiB, so 74 MiB besides it.
# NOTE: measured for 192 MiB guests only; other guests keep more or less.
GUEST_RESIDENT_MIB = 66
# Passes that libvirt's iteration count (memory_iteration) adds to the model's
# rounds: every stop-and-copy run of the measurement above reported 3 iterations
# for one copy, and precopy runs reported the model's rounds plus 2.
EXTRA_ITERATIONS = 2
# Relative difference between measurement and model above which the key flags a row.
FLAG_THRESHOLD = 0.5
# Strategies the precopy model describes: plain precopy, and stop-and-copy as
# precopy with no live rounds.
MODEL_STRATEGIES = ("precopy", "stop-and-copy")

# Measured columns a question may ask for, with their labels per language.
# DERIVED_METRICS are computed from other columns (scenario_means); the rest
# are columns of lab.store.load_runs.
METRICS: dict[str, dict[str, str]] = {
    "completed_pct": {"es": "migraciones completadas (%)", "en": "completed migrations (%)"},
    "guest_alive_pct": {"es": "guest vivo tras la ejecución (%)", "en": "guest alive after the run (%)"},
    "downtime_ms": {"es": "tiempo de inactividad (ms)", "en": "downtime (ms)"},
    "wall_downtime_ms": {"es": "guest en pausa (ms)", "en": "guest paused (ms)"},
    "client_downtime_ms": {"es": "corte visto por el cliente (ms)", "en": "outage seen by the client (ms)"},
    "total_time_ms": {"es": "tiempo total (ms)", "en": "total time (ms)"},
    "transfer_time_ms": {"es": "tiempo de transferencia (ms)", "en": "transfer time (ms)"},
    "transferred_mib": {"es": "memoria enviada (MiB)", "en": "memory sent (MiB)"},
    "iterations": {"es": "rondas", "en": "rounds"},
    "postcopy_requests": {"es": "peticiones postcopy", "en": "postcopy requests"},
    "postcopy_blocktime_ms": {"es": "vCPU bloqueada esperando páginas (ms)",
                              "en": "vCPU blocked waiting for pages (ms)"},
    "guest_slowdown_pct": {"es": "ralentización del guest (%)", "en": "guest slowdown (%)"},
    "stream_survived_pct": {"es": "conexiones TCP que sobreviven (%)", "en": "TCP connections that survive (%)"},
    "stream_max_stall_ms": {"es": "pausa máxima de la conexión TCP (ms)", "en": "longest TCP stall (ms)"},
    "announce_after_pause_ms": {"es": "de la pausa al primer anuncio ARP/RARP (ms)",
                                "en": "from pause to the first ARP/RARP announcement (ms)"},
    "forward_after_announce_ms": {"es": "del anuncio al primer paquete reenviado al destino (ms)",
                                  "en": "from announcement to the first frame forwarded to the destination (ms)"},
    "lost_requests": {"es": "peticiones de eco perdidas", "en": "lost echo requests"},
    "auto_converge_throttle_max_pct": {"es": "freno máximo de auto-converge (%)",
                                       "en": "highest auto-converge throttle (%)"},
    "save_ms": {"es": "tiempo de guardado (ms)", "en": "save time (ms)"},
    "disk_copied_mib": {"es": "disco copiado (MiB)", "en": "disk copied (MiB)"},
    "restore_ms": {"es": "tiempo de restauración (ms)", "en": "restore time (ms)"},
}
DERIVED_METRICS = ("completed_pct", "guest_alive_pct", "transferred_mib", "stream_survived_pct", "disk_copied_mib")
# Measured metrics the model predicts. The guest's paused time (wall_downtime_ms,
# from libvirt's lifecycle events) is the downtime to compare for stop-and-copy,
# because that strategy pauses the guest before the migration starts and QEMU's
# downtime_ms then covers only the last step.
MODEL_METRICS = ("wall_downtime_ms", "downtime_ms", "total_time_ms", "transferred_mib", "iterations")

_TEXT = {
    "es": {
        "title": "Clave de respuestas", "results": "Resultados", "runs": "ejecuciones",
        "question": "Pregunta", "scenario": "Escenario", "measured": "medido", "model": "modelo",
        "difference": "diferencia", "flag": "¡revisar!", "no_data": "sin datos",
        "model_inputs": "Entradas del modelo",
        "model_note": ("Modelo simple de precopy: M = working set + {resident} MiB residentes del guest, "
                       "R = mínimo de bandwidth_mib_s y link_rate_mib_s, D = dirty_rate_mib_s, L = D/R. "
                       "Las iteraciones de libvirt (iterations) se comparan con las rondas del modelo más {extra}. "
                       "Se marca «¡revisar!» cuando |medido − modelo| / modelo supera {threshold:.0%}. "
                       "Los escenarios que faltan en esta tabla no tienen predicción (—)."),
        "not_converging": "no converge",
        "converges": "converge",
        "means": "Medias por escenario de las ejecuciones completadas.",
        "faults_note": ("Una fila por ejecución con fallo, tal como la guarda record.json (sección fault). "
                        "Resultado del fallo: completed (la migración terminó), source-running (la migración "
                        "falló y el guest sigue en la fuente), postcopy-recovered (postcopy se pausó y la "
                        "recuperación la terminó), guest-lost (ningún host ejecuta el guest), split-brain (los QEMU de "
                        "ambos hosts ejecutaron el guest), not-struck (la "
                        "migración terminó antes del disparo). La recuperación va desde la orden de reanudar la "
                        "migración hasta que el QEMU del destino la da por completada."),
        "no_faults": "Ninguna ejecución de estos resultados tuvo un fallo.",
        "fault_columns": {"run_id": "ejecución", "fault_kind": "fallo", "fault_trigger": "disparo",
                          "fault_struck_at_s": "ocurrió a los (s)", "fault_in_postcopy": "en postcopy",
                          "outcome": "resultado de la ejecución", "fault_outcome": "resultado del fallo",
                          "fault_recovered": "recuperado", "fault_recovery_ms": "recuperación (ms)",
                          "client_downtime_ms": "corte visto por el cliente (ms)"},
        "yes": "sí", "no": "no",
    },
    "en": {
        "title": "Answer key", "results": "Results", "runs": "runs",
        "question": "Question", "scenario": "Scenario", "measured": "measured", "model": "model",
        "difference": "difference", "flag": "check!", "no_data": "no data",
        "model_inputs": "Model inputs",
        "model_note": ("Simple precopy model: M = working set + {resident} MiB resident in the guest, "
                       "R = the lower of bandwidth_mib_s and link_rate_mib_s, D = dirty_rate_mib_s, L = D/R. "
                       "libvirt's iterations are compared with the model's rounds plus {extra}. A row is flagged \"check!\" when |measured − model| / model exceeds {threshold:.0%}. "
                       "Scenarios missing from this table have no prediction (—)."),
        "not_converging": "does not converge",
        "converges": "converges",
        "means": "Means per scenario of the completed runs.",
        "faults_note": ("One row per run with a fault, as record.json stores it (its fault section). "
                        "Fault outcome: completed (the migration finished), source-running (the migration "
                        "failed and the guest still runs on the source), postcopy-recovered (postcopy was "
                        "paused and recovery finished it), guest-lost (no host runs the guest), split-brain (the QEMUs "
                        "of both hosts ran the guest), not-struck "
                        "(the migration ended before the trigger). Recovery runs from the command that resumes "
                        "the migration until the destination QEMU reports it completed."),
        "no_faults": "No run of these results had a fault.",
        "fault_columns": {"run_id": "run", "fault_kind": "fault", "fault_trigger": "trigger",
                          "fault_struck_at_s": "struck at (s)", "fault_in_postcopy": "in postcopy",
                          "outcome": "run outcome", "fault_outcome": "fault outcome",
                          "fault_recovered": "recovered", "fault_recovery_ms": "recovery (ms)",
                          "client_downtime_ms": "outage seen by the client (ms)"},
        "yes": "yes", "no": "no",
    },
}


@dataclass(frozen=True)
class ModelPrediction:
    """Prediction of the simple precopy model for one migration.

    ``rounds`` counts the passes over memory: the first full pass, the live
    rounds and the last round sent while the guest is paused. Without
    convergence within ``max_rounds`` rounds, ``rounds`` is ``max_rounds``,
    bytes and total time are infinite and ``downtime_ms`` is None.
    """

    ratio: float
    rounds: int
    transferred_bytes: float
    total_time_ms: float
    downtime_ms: float | None
    converges: bool


def precopy_model(memory_bytes: float, rate_bytes_s: float, dirty_bytes_s: float,
                  downtime_limit_ms: float, max_rounds: int = 30) -> ModelPrediction:
    """Predict rounds, bytes, total time and downtime of a precopy migration.

    Raises ValueError on a non-positive memory, rate, downtime limit or
    max_rounds, or a negative dirty rate.
    """
    if memory_bytes <= 0 or rate_bytes_s <= 0:
        raise ValueError(f"memory_bytes and rate_bytes_s must be positive, got {memory_bytes} and {rate_bytes_s}")
    if dirty_bytes_s < 0:
        raise ValueError(f"dirty_bytes_s must not be negative, got {dirty_bytes_s}")
    if downtime_limit_ms <= 0 or max_rounds < 1:
        raise ValueError(f"downtime_limit_ms and max_rounds must be positive, got {downtime_limit_ms} "
                         f"and {max_rounds}")

    ratio = dirty_bytes_s / rate_bytes_s
    budget_bytes = rate_bytes_s * downtime_limit_ms / 1000

    # n is the index of the last round, the one sent while the guest is paused.
    last = None
    for n in range(max_rounds):
        if memory_bytes * ratio**n <= budget_bytes:
            last = n
            break
    converges = last is not None

    if not converges:
        return ModelPrediction(ratio=ratio, rounds=max_rounds, transferred_bytes=math.inf,
                               total_time_ms=math.inf, downtime_ms=None, converges=False)
    # Converging implies ratio < 1 or a first pass that fits the budget (n = 0).
    if ratio == 1:
        total_bytes = memory_bytes * (last + 1)
    else:
        total_bytes = memory_bytes * (1 - ratio ** (last + 1)) / (1 - ratio)
    downtime_ms = memory_bytes * ratio**last / rate_bytes_s * 1000
    return ModelPrediction(ratio=ratio, rounds=last + 1, transferred_bytes=total_bytes,
                           total_time_ms=total_bytes / rate_bytes_s * 1000,
                           downtime_ms=downtime_ms, converges=converges)


def stop_and_copy_model(memory_bytes: float, rate_bytes_s: float) -> ModelPrediction:
    """Predict a stop-and-copy migration: one pass with the guest paused throughout."""
    if memory_bytes <= 0 or rate_bytes_s <= 0:
        raise ValueError(f"memory_bytes and rate_bytes_s must be positive, got {memory_bytes} and {rate_bytes_s}")
    time_ms = memory_bytes / rate_bytes_s * 1000
    return ModelPrediction(ratio=0.0, rounds=1, transferred_bytes=memory_bytes, total_time_ms=time_ms,
                           downtime_ms=time_ms, converges=True)


def scenario_prediction(scenario: dict[str, Any]) -> ModelPrediction | None:
    """Return the model's prediction for a scenario's settings, or None where it does not apply.

    The model applies to precopy and stop-and-copy without a fault, with a
    known rate (a bandwidth cap or a shaped link) and a set dirty rate (0
    means "as fast as the guest can", which the model cannot know).
    """
    strategy = scenario.get("strategy")
    if strategy not in MODEL_STRATEGIES or _present(scenario.get("fault")):
        return None
    rates = [value for value in (scenario.get("bandwidth_mib_s"), scenario.get("link_rate_mib_s"))
             if _present(value)]
    if not rates:
        return None
    rate_bytes_s = min(float(value) for value in rates) * MIB
    memory_bytes = (float(scenario["working_set_mib"]) + GUEST_RESIDENT_MIB) * MIB
    if strategy == "stop-and-copy":
        return stop_and_copy_model(memory_bytes, rate_bytes_s)
    dirty = scenario.get("dirty_rate_mib_s")
    if not _present(dirty) or float(dirty) <= 0:
        return None
    limit = scenario.get("downtime_limit_ms")
    limit_ms = float(limit) if _present(limit) else QEMU_DEFAULT_DOWNTIME_MS
    return precopy_model(memory_bytes, rate_bytes_s, float(dirty) * MIB, limit_ms)


def _present(value: Any) -> bool:
    """Return whether a table cell contains a value: not None, NaN or pandas' NA."""
    if value is None:
        return False
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):
        # pd.isna of a list or array returns an array: a value is there.
        return True


# -- exercises -----------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    """One question of an exercise, with its text per language and the figures its answer needs.

    With ``faults`` set, the key adds the table of the runs that had a fault,
    one row per run, with the fault's outcome from the records.
    """

    question_id: str
    text: dict[str, str]
    metrics: tuple[str, ...]
    model: tuple[str, ...]
    faults: bool = False


@dataclass(frozen=True)
class Exercise:
    name: str
    folder: Traversable
    title: dict[str, str]
    questions: tuple[Question, ...]


def classroom_root(package: str = "lab") -> Traversable:
    """Return the folder that contains the exercises.

    That is the package data folder ``exercises`` of *package* when it exists
    (an installed wheel), else playbooks/classroom of the source tree.
    """
    packaged = resources.files(package).joinpath(PACKAGE_DATA_DIR)
    if packaged.is_dir():
        return packaged
    return SOURCE_CLASSROOM_DIR


def list_exercises(root: Traversable | None = None) -> list[str]:
    """Return the names of the exercise folders under root (default classroom_root()), sorted."""
    root = classroom_root() if root is None else root
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir() if path.joinpath("questions.yaml").is_file())


def exercise_folder(exercise: str | Path, root: Traversable | None = None) -> Traversable:
    """Return the folder of an exercise given by name or path; raise ConfigError when there is none.

    A name of an exercise in root comes first, then a path to a folder with
    questions.yaml.
    """
    root = classroom_root() if root is None else root
    name = str(exercise)
    if "/" not in name and name not in (".", ".."):
        candidate = root.joinpath(name)
        if candidate.joinpath("questions.yaml").is_file():
            return candidate
    path = Path(exercise)
    if (path / "questions.yaml").is_file():
        return path
    raise ConfigError(f"exercise {name!r} not found", value=name,
                      fix=f"Use one of: {', '.join(list_exercises(root)) or '(none)'}, "
                          f"or the path of a folder with questions.yaml")


def load_exercise(exercise: str | Path, root: Traversable | None = None) -> Exercise:
    """Read and check questions.yaml of an exercise."""
    folder = exercise_folder(exercise, root)
    path = folder.joinpath("questions.yaml")
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, YAMLError) as exc:
        raise ConfigError(f"cannot read questions: {exc}", path=str(path)) from exc
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ConfigError("questions.yaml must be a mapping with a 'questions' list", path=str(path),
                          fix="Start from the questions.yaml of another exercise")
    title = _texts(data.get("title"), path, "title")
    questions = []
    for index, item in enumerate(data["questions"]):
        where = f"questions[{index}]"
        if not isinstance(item, dict) or "id" not in item:
            raise ConfigError("question needs an id and a text for es and en", path=str(path), field=where,
                              fix="Write each question as a mapping with id, es, en and optional metrics, "
                                  "model and faults")
        metrics = tuple(item.get("metrics") or ())
        model = tuple(item.get("model") or ())
        for name in metrics:
            if name not in METRICS:
                raise ConfigError("unknown metric", path=str(path), field=f"{where}.metrics", value=name,
                                  fix=f"Allowed: {', '.join(METRICS)}")
        for name in model:
            if name not in MODEL_METRICS or name not in metrics:
                raise ConfigError("model figure not predicted or not among the metrics", path=str(path),
                                  field=f"{where}.model", value=name,
                                  fix=f"Use metrics of this question among: {', '.join(MODEL_METRICS)}")
        faults = item.get("faults", False)
        if not isinstance(faults, bool):
            raise ConfigError("faults must be true or false", path=str(path), field=f"{where}.faults",
                              value=str(faults), fix="Write faults: true to list the runs that had a fault")
        questions.append(Question(str(item["id"]), _texts(item, path, where), metrics, model, faults))
    return Exercise(folder.name, folder, title, tuple(questions))


def copy_exercise(exercise: str | Path, target: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the files of an exercise (EXERCISE_FILES) into the folder target; return the paths written.

    The folder is created when missing. Raises ConfigError when a file exists
    there and overwrite is false, before anything is written.
    """
    folder = exercise_folder(exercise)
    sources = [folder.joinpath(name) for name in EXERCISE_FILES]
    missing = [name for name, source in zip(EXERCISE_FILES, sources) if not source.is_file()]
    if missing:
        raise ConfigError(f"exercise {folder.name!r} has no {', '.join(missing)}", path=str(folder),
                          fix="Reinstall the package, or copy from a folder with every exercise file")
    if target.exists() and not target.is_dir():
        raise ConfigError("not a folder", path=str(target), fix="Give the path of a folder to write into")
    existing = [target / name for name in EXERCISE_FILES if (target / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists", path=str(target),
                          fix="Choose an empty folder, or pass --force to overwrite the exercise files")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in zip(EXERCISE_FILES, sources):
        destination = target / name
        destination.write_bytes(source.read_bytes())
        written.append(destination)
    return written


def _texts(item: Any, path: Traversable, where: str) -> dict[str, str]:
    if not isinstance(item, dict) or not all(isinstance(item.get(lang), str) for lang in LANGUAGES):
        raise ConfigError(f"needs a text for each language: {', '.join(LANGUAGES)}", path=str(path),
                          field=where)
    return {lang: " ".join(item[lang].split()) for lang in LANGUAGES}


# -- answer key ----------------------------------------------------------------

def scenario_means(runs: pd.DataFrame, metrics: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Return one row per scenario with the mean of each metric over its completed runs.

    completed_pct, guest_alive_pct and stream_survived_pct are shares over
    all runs of the scenario. A guest is alive when it reported after the
    migration: on the destination after a completed one, else on the source.
    transferred_mib is transferred_bytes in MiB, or the save file's allocated
    size for flushing runs. disk_copied_mib is disk_processed_bytes in MiB,
    the guest disk that libvirt copied. Scenarios keep the order of their
    first run.
    """
    frame = runs.copy()
    frame["completed_pct"] = (frame["outcome"] == "completed").astype(float) * 100
    if "guest_alive" in frame:
        frame["guest_alive_pct"] = frame["guest_alive"].astype("float64") * 100
    # A flushing run moves memory through its save file, whose allocated size is the bytes written.
    moved = pd.to_numeric(frame["transferred_bytes"], errors="coerce")
    if "save_file_disk_bytes" in frame:
        moved = moved.fillna(pd.to_numeric(frame["save_file_disk_bytes"], errors="coerce"))
    frame["transferred_mib"] = moved / MIB
    if "disk_processed_bytes" in frame:
        frame["disk_copied_mib"] = pd.to_numeric(frame["disk_processed_bytes"], errors="coerce") / MIB
    if "stream_survived" in frame:
        survived = frame["stream_survived"].map(lambda value: float(value) if isinstance(value, bool)
                                                else (float(value) if _present(value) else math.nan))
        frame["stream_survived_pct"] = survived * 100
    order = list(dict.fromkeys(frame["scenario_id"]))
    rows = []
    for scenario_id in order:
        group = frame[frame["scenario_id"] == scenario_id]
        completed = group[group["outcome"] == "completed"]
        row: dict[str, Any] = {"scenario_id": scenario_id, "runs": len(group)}
        for name in metrics:
            source = group if name in ("completed_pct", "guest_alive_pct", "stream_survived_pct") else completed
            values = pd.to_numeric(source[name], errors="coerce") if name in source else pd.Series(dtype=float)
            values = values.dropna()
            row[name] = float(values.mean()) if len(values) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["scenario_id", "runs", *metrics])


def relative_difference(measured: float, predicted: float) -> float:
    """Return |measured - predicted| / predicted, or NaN where it is undefined."""
    if not (_present(measured) and _present(predicted)) or predicted == 0:
        return math.nan
    return abs(measured - predicted) / abs(predicted)


def predicted_value(prediction: ModelPrediction, metric: str) -> float:
    """Return the model's value for a measured metric name of MODEL_METRICS; NaN where it does not converge."""
    if not prediction.converges:
        return math.nan
    if metric in ("downtime_ms", "wall_downtime_ms"):
        return math.nan if prediction.downtime_ms is None else prediction.downtime_ms
    if metric == "total_time_ms":
        return prediction.total_time_ms
    if metric == "transferred_mib":
        return prediction.transferred_bytes / MIB
    if metric == "iterations":
        return float(prediction.rounds + EXTRA_ITERATIONS)
    raise ValueError(f"the model does not predict {metric!r}; it predicts {', '.join(MODEL_METRICS)}")


def _format(value: float) -> str:
    if not _present(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _scenario_settings(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    settings = {}
    for scenario_id, group in runs.groupby("scenario_id", sort=False):
        settings[scenario_id] = group.iloc[0].to_dict()
    return settings


def answer_key(exercise: str | Path, results_dir: str | Path, lang: str = "es") -> str:
    """Write the answer key of an exercise from its stored runs, as Markdown.

    For each question, the key lists the mean of each figure per scenario and,
    for the figures the question compares with the model, the model's
    prediction and the relative difference, flagged above FLAG_THRESHOLD.
    """
    if lang not in LANGUAGES:
        raise ConfigError("unknown language", field="lang", value=lang, fix=f"Use one of: {', '.join(LANGUAGES)}")
    text = _TEXT[lang]
    spec = load_exercise(exercise)
    runs = load_runs(results_dir)
    settings = _scenario_settings(runs)
    predictions = {scenario_id: scenario_prediction(values) for scenario_id, values in settings.items()}

    lines = [f"# {text['title']}: {spec.title[lang]}", "",
             f"{text['results']}: {len(runs)} {text['runs']}, {len(settings)} "
             f"{'escenarios' if lang == 'es' else 'scenarios'}. {text['means']}", ""]
    if any(question.model for question in spec.questions):
        lines += [f"## {text['model_inputs']}", "",
                  text["model_note"].format(resident=GUEST_RESIDENT_MIB, extra=EXTRA_ITERATIONS,
                                            threshold=FLAG_THRESHOLD), ""]
        lines += _model_table(predictions, settings, lang)

    for number, question in enumerate(spec.questions, start=1):
        lines += [f"## {text['question']} {number}", "", question.text[lang], ""]
        if question.faults:
            lines += fault_table(runs, lang)
        if not question.metrics:
            continue
        means = scenario_means(runs, question.metrics)
        header = [text["scenario"], text["runs"]]
        for name in question.metrics:
            label = METRICS[name][lang]
            header.append(f"{label}, {text['measured']}" if name in question.model else label)
            if name in question.model:
                header += [f"{label}, {text['model']}", text["difference"]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, row in means.iterrows():
            cells = [f"`{row['scenario_id']}`", str(int(row["runs"]))]
            prediction = predictions.get(row["scenario_id"])
            for name in question.metrics:
                cells.append(_format(row[name]))
                if name not in question.model:
                    continue
                if prediction is None:
                    cells += ["—", ""]
                    continue
                predicted = predicted_value(prediction, name)
                difference = relative_difference(row[name], predicted)
                flag = f" {text['flag']}" if _present(difference) and difference > FLAG_THRESHOLD else ""
                cells += [_format(predicted) if _present(predicted) else text["not_converging"],
                          "—" if not _present(difference) else f"{difference:.0%}{flag}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _model_table(predictions: dict[str, ModelPrediction | None], settings: dict[str, dict[str, Any]],
                 lang: str) -> list[str]:
    text = _TEXT[lang]
    lines = [f"| {text['scenario']} | M (MiB) | R (MiB/s) | D (MiB/s) | L | "
             f"{'rondas' if lang == 'es' else 'rounds'} | |", "|---|---|---|---|---|---|---|"]
    for scenario_id, prediction in predictions.items():
        if prediction is None:
            continue
        values = settings[scenario_id]
        rates = [float(v) for v in (values.get("bandwidth_mib_s"), values.get("link_rate_mib_s")) if _present(v)]
        dirty = values.get("dirty_rate_mib_s")
        memory = float(values["working_set_mib"]) + GUEST_RESIDENT_MIB
        state = text["converges"] if prediction.converges else text["not_converging"]
        # Stop-and-copy sends memory once with the guest paused, so D and L play no part.
        live = values.get("strategy") != "stop-and-copy" and _present(dirty)
        lines.append(f"| `{scenario_id}` | {memory:.0f} | {min(rates):.0f} | "
                     f"{_format(float(dirty)) if live else '—'} | "
                     f"{f'{prediction.ratio:.2f}' if live else '—'} | {prediction.rounds if prediction.converges else '—'} | "
                     f"{state} |")
    lines.append("")
    return lines


def fault_table(runs: pd.DataFrame, lang: str) -> list[str]:
    """Return the Markdown lines of the runs that had a fault: one row per run, with the fault's outcome."""
    text = _TEXT[lang]
    if "fault_kind" not in runs or not runs["fault_kind"].notna().any():
        return [text["no_faults"], ""]
    columns = text["fault_columns"]
    lines = [text["faults_note"], "", "| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    faulty = runs[runs["fault_kind"].notna()].sort_values("run_id")
    for _, row in faulty.iterrows():
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "run_id":
                cells.append(f"`{value}`")
            elif column in ("fault_in_postcopy", "fault_recovered"):
                cells.append(_yes_no(value, lang))
            elif column == "fault_struck_at_s":
                cells.append("—" if not _present(value) else f"{float(value):.1f}")
            elif column in ("client_downtime_ms", "fault_recovery_ms"):
                cells.append(_format(float(value)) if _present(value) else "—")
            else:
                cells.append("—" if not _present(value) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _yes_no(value: Any, lang: str) -> str:
    if not _present(value):
        return "—"
    return _TEXT[lang]["yes"] if bool(value) else _TEXT[lang]["no"]
