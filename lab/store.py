"""Results on disk: one folder per experiment, one folder per run.

Layout::

    <results>/<experiment>/
        playbook.yaml          copy of the playbook file
        experiment.json        name, playbook sha256, created_at, environment of the first run
        runs.parquet           cache of load_runs(), rebuilt when missing or stale (lab.run_table)
        runs/<run_id>/
            record.json        the RunRecord
            timeline.parquet   progress samples, columns of records.TIMELINE_COLUMNS
            events.json        list of events, keys of records.EVENT_KEYS
            console-<host>.log and other extra files

A run folder appears only complete: write_run() fills a hidden temporary
sibling, fsyncs it and renames it into place. Folders whose names start with
a dot are never runs.
"""

from __future__ import annotations

import ctypes
import difflib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pandas as pd
from pydantic import ValidationError

from lab.errors import ConfigError, LabError
from lab.playbook import SCENARIO_FIELDS, Playbook, Scenario
from lab.records import (DISK_COLUMNS, FAULT_COLUMNS, OBSERVED_COLUMNS, Environment, Integrity,
                         Measured, MigrationStats, RecordVersionError, RunRecord, make_timeline, run_id_for,
                         validate_events)

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.json"
PLAYBOOK_COPY = "playbook.yaml"
RUNS_DIR = "runs"
RECORD_FILE = "record.json"
TIMELINE_FILE = "timeline.parquet"
EVENTS_FILE = "events.json"
_RESERVED_FILES = {RECORD_FILE, TIMELINE_FILE, EVENTS_FILE}
_EXTRA_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EXPERIMENT_SCHEMA_VERSION = 1


class StoreError(LabError):
    """The results folder is missing, damaged or does not match the request."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Create path, let write() fill it, then flush and fsync it."""
    with open(path, "xb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def _replace_file(path: Path, data: bytes) -> None:
    """Replace path with data through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        _write_durable(temporary, lambda file: file.write(data))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_RENAME_EXCHANGE = 2  # from <linux/fs.h>


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE).

    Returns False where the C library or the file system lacks it
    (glibc before 2.28, some network file systems).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second),
                       _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(first))


def _move_into_place(temporary: Path, final: Path) -> None:
    """Rename a complete run folder to its final name, replacing an older one.

    An older folder is swapped out atomically where renameat2 works. Elsewhere
    it is first renamed to a hidden name, so a crash between the two renames
    leaves the run absent (and re-run on resume) but never half-written.
    """
    if not final.exists():
        os.rename(temporary, final)
        return
    if _exchange(temporary, final):
        shutil.rmtree(temporary)
        log.info("replaced run folder %s", final)
        return
    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
    os.rename(final, old)
    os.rename(temporary, final)
    shutil.rmtree(old)
    log.info("replaced run folder %s", final)


def _now_utc() -> str:
    return datetime.now(timezone.utc).isoformat()


def read_experiment_file(experiment_dir: str | Path) -> dict[str, Any]:
    """Return the contents of experiment.json."""
    experiment_dir = Path(experiment_dir)
    path = experiment_dir / EXPERIMENT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: not found; {experiment_dir} is not an experiment folder "
                         f"made by init_experiment()") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: invalid JSON: {exc}") from exc


def _remove_leftovers(runs_dir: Path) -> list[Path]:
    """Delete temporary folders that a killed writer left behind and return them."""
    removed = []
    for entry in runs_dir.iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
            log.warning("removing leftover folder %s of an interrupted write", entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def remove_partial_writes(results_root: str | Path) -> list[Path]:
    """Delete half-written run folders under every experiment of a results folder."""
    removed: list[Path] = []
    for runs_dir in sorted(Path(results_root).glob(f"*/{RUNS_DIR}")):
        if runs_dir.is_dir():
            removed.extend(_remove_leftovers(runs_dir))
    return removed


def init_experiment(results_root: str | Path, playbook: Playbook, *,
                    resume: bool = False) -> Path:
    """Create or reopen the experiment folder for a playbook and return its path.

    An existing folder of a playbook with the same sha256 is reopened when it
    contains no runs, or when resume is true, so that an interrupted experiment
    can continue. Raises ConfigError when the folder contains results of another
    playbook, or runs while resume is false.
    """
    if playbook.path is None or playbook.sha256 is None:
        raise ValueError("the playbook must come from load_playbook(), which sets path and sha256")
    experiment_dir = Path(results_root) / playbook.experiment
    runs_dir = experiment_dir / RUNS_DIR
    experiment_file = experiment_dir / EXPERIMENT_FILE

    if experiment_file.exists():
        existing = read_experiment_file(experiment_dir)
        if existing.get("playbook_sha256") != playbook.sha256:
            raise ConfigError(
                f"results folder {experiment_dir} contains runs of another version of this "
                f"playbook (sha256 {existing.get('playbook_sha256')}). What changed:\n"
                + _playbook_diff(experiment_dir / PLAYBOOK_COPY, playbook.path),
                path=str(playbook.path), field="experiment", value=playbook.experiment,
                fix="Give the experiment a new name, or move the old results folder away")
        runs_dir.mkdir(exist_ok=True)
        if not resume and finished_run_ids(experiment_dir):
            raise ConfigError(
                f"results folder {experiment_dir} already contains runs of this playbook",
                path=str(playbook.path), field="experiment", value=playbook.experiment,
                fix="Resume the experiment to run only the missing runs, or move the folder away")
        _remove_leftovers(runs_dir)
        log.info("reopened experiment folder %s", experiment_dir)
        return experiment_dir

    runs_dir.mkdir(parents=True, exist_ok=True)
    _replace_file(experiment_dir / PLAYBOOK_COPY, playbook.path.read_bytes())
    content = {
        "schema_version": _EXPERIMENT_SCHEMA_VERSION,
        "experiment": playbook.experiment,
        "playbook_sha256": playbook.sha256,
        "created_at": _now_utc(),
        "environment": None,
    }
    _replace_file(experiment_file, json.dumps(content, indent=2).encode())
    _fsync_dir(experiment_dir.parent)
    log.info("created experiment folder %s", experiment_dir)
    return experiment_dir


def _playbook_diff(stored: Path, current: Path, max_lines: int = 40) -> str:
    """Return a unified diff from the stored playbook copy to the current file."""
    try:
        before = stored.read_text(encoding="utf-8").splitlines()
    except OSError:
        return "(the stored copy of the playbook is missing)"
    after = current.read_text(encoding="utf-8").splitlines()
    lines = list(difflib.unified_diff(before, after, fromfile=f"{stored} (stored)", tofile=str(current),
                                      lineterm=""))
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... {len(lines) - max_lines} more lines"]
    return "\n".join(lines)


def run_id(scenario: Scenario | str, repetition: int) -> str:
    """Return the run id of a scenario (or scenario id) and repetition, e.g. precopy-rate4-r1."""
    scenario_id = scenario.scenario_id if isinstance(scenario, Scenario) else scenario
    return run_id_for(scenario_id, repetition)


def _check_extra_name(name: str) -> None:
    if not _EXTRA_FILE_NAME.match(name) or name in _RESERVED_FILES:
        raise ValueError(f"invalid extra file name {name!r}: use letters, digits, '.', '_' and "
                         f"'-', without a leading dot, and none of {sorted(_RESERVED_FILES)}")


def _write_run_files(folder: Path, record: RunRecord, timeline: pd.DataFrame,
                     events: list[dict[str, Any]], extra_files: dict[str, bytes | Path]) -> None:
    record_json = record.model_dump_json(indent=2).encode()
    _write_durable(folder / RECORD_FILE, lambda file: file.write(record_json))
    _write_durable(folder / TIMELINE_FILE, lambda file: timeline.to_parquet(file, index=False))
    events_json = json.dumps(events, indent=2).encode()
    _write_durable(folder / EVENTS_FILE, lambda file: file.write(events_json))
    for name, content in extra_files.items():
        if isinstance(content, Path):
            with open(content, "rb") as source:
                _write_durable(folder / name,
                               lambda file, source=source: shutil.copyfileobj(source, file))
        else:
            _write_durable(folder / name, lambda file, content=content: file.write(content))
    _fsync_dir(folder)


def write_run(experiment_dir: str | Path, record: RunRecord, timeline_df: pd.DataFrame,
              events: list[dict[str, Any]],
              extra_files: dict[str, bytes | Path] | None = None) -> Path:
    """Store one run and return its folder, runs/<run_id>.

    The folder appears complete or not at all. It is written under a hidden
    temporary name, fsynced, then renamed into place, replacing an older run
    with the same id. If anything fails, the temporary folder is removed, the
    error is raised, and earlier runs stay as they were.
    """
    experiment_dir = Path(experiment_dir)
    experiment = read_experiment_file(experiment_dir)
    if record.experiment != experiment.get("experiment"):
        raise ValueError(f"record of experiment {record.experiment!r} does not belong in "
                         f"{experiment_dir}, the folder of {experiment.get('experiment')!r}")
    extra_files = dict(extra_files or {})
    for name, content in extra_files.items():
        _check_extra_name(name)
        if not isinstance(content, (bytes, Path)):
            raise TypeError(f"extra file {name!r} must be bytes or a Path, "
                            f"not {type(content).__name__}")
    timeline = make_timeline(timeline_df)
    validate_events(events)

    runs_dir = experiment_dir / RUNS_DIR
    final = runs_dir / record.run_id
    temporary = runs_dir / f".{record.run_id}.tmp-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        _write_run_files(temporary, record, timeline, events, extra_files)
        _move_into_place(temporary, final)
        _fsync_dir(runs_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        log.error("failed to write run %s into %s; no partial run was left", record.run_id,
                  runs_dir)
        raise

    if experiment.get("environment") is None:
        experiment["environment"] = record.environment.model_dump(mode="json")
        try:
            _replace_file(experiment_dir / EXPERIMENT_FILE, json.dumps(experiment, indent=2).encode())
        except OSError as exc:
            # The run is stored; the next write_run() fills in the environment.
            log.warning("run %s is stored, but adding the environment to %s failed: %s", record.run_id,
                        experiment_dir / EXPERIMENT_FILE, exc)
    log.info("stored run %s (%s) in %s", record.run_id, record.outcome, final)
    return final


def storage_fix(folder: Path, error: OSError) -> str:
    """Return what the user can do about *error* when writing into *folder*."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the file system of {folder} (see: df -h {folder}), or give another results folder"
    if error.errno == errno.EROFS:
        return f"{folder} is on a read-only file system; give another results folder"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"let this user write {folder}, or give another results folder"
    return f"check the file system of {folder}, or give another results folder"


def finished_run_ids(experiment_dir: str | Path) -> set[str]:
    """Return the ids of runs stored in the experiment folder."""
    runs_dir = Path(experiment_dir) / RUNS_DIR
    if not runs_dir.is_dir():
        return set()
    return {entry.name for entry in runs_dir.iterdir()
            if not entry.name.startswith(".") and (entry / RECORD_FILE).is_file()}


def load_record(run_dir: str | Path) -> RunRecord:
    """Read and validate runs/<run_id>/record.json.

    Raises StoreError when the file is missing or invalid, and
    RecordVersionError when a newer harness wrote it.
    """
    path = Path(run_dir) / RECORD_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: not found") from None
    try:
        record = RunRecord.model_validate_json(data)
    except RecordVersionError as exc:
        raise RecordVersionError(f"{path}: {exc}") from None
    except ValidationError as exc:
        raise StoreError(f"{path}: invalid record: {exc}") from exc
    if record.run_id != Path(run_dir).name:
        raise StoreError(f"{path}: run_id {record.run_id!r} does not match its folder name")
    return record


def load_timeline(run_dir: str | Path) -> pd.DataFrame:
    """Read timeline.parquet with the dtypes of TIMELINE_COLUMNS."""
    path = Path(run_dir) / TIMELINE_FILE
    if not path.is_file():
        raise StoreError(f"{path}: not found")
    return make_timeline(pd.read_parquet(path))


def load_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Read events.json."""
    path = Path(run_dir) / EVENTS_FILE
    try:
        return validate_events(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise StoreError(f"{path}: not found") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise StoreError(f"{path}: invalid events: {exc}") from exc


def find_experiment_dir(path: str | Path) -> Path:
    """Return path if it is an experiment folder, or the single experiment under it.

    Raises StoreError when path contains no experiment or more than one.
    """
    path = Path(path)
    if (path / EXPERIMENT_FILE).is_file():
        return path
    if not path.is_dir():
        raise StoreError(f"{path}: not found or not a folder")
    found = sorted(entry for entry in path.iterdir() if (entry / EXPERIMENT_FILE).is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise StoreError(f"{path}: no experiment folder (one with {EXPERIMENT_FILE}) found")
    names = ", ".join(entry.name for entry in found)
    raise StoreError(f"{path}: contains {len(found)} experiments ({names}); pass one of them")


_STATS_COLUMNS = [name for name in MigrationStats.model_fields if name != "raw"]
_MEASURED_COLUMNS = [name for name in Measured.model_fields if name != "phases"]
_INTEGRITY_COLUMNS = [name if name != "console_trouble" else "console_trouble_count"
                      for name in Integrity.model_fields]
_ENV_COLUMNS = [f"env_{name}" for name in Environment.model_fields]
_FRONT_COLUMNS = ["run_id", "scenario_id", "repetition", "outcome", "error"]
_BACK_COLUMNS = ["source_host", "destination_host", "warning_count", "started_at", "ended_at"]
RUN_COLUMNS = (_FRONT_COLUMNS + list(SCENARIO_FIELDS) + _STATS_COLUMNS + _MEASURED_COLUMNS
               + _INTEGRITY_COLUMNS + OBSERVED_COLUMNS + FAULT_COLUMNS + DISK_COLUMNS + _ENV_COLUMNS
               + _BACK_COLUMNS)
_TEXT_COLUMNS = {"run_id", "scenario_id", "outcome", "error", "strategy", "pattern", "nic_model", "fault",
                 "fault_kind", "fault_trigger", "fault_outcome", "disk_storage", "disk_cache",
                 "source_host", "destination_host", *_ENV_COLUMNS}


def _flatten(record: RunRecord) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": record.run_id,
        "scenario_id": record.scenario_id,
        "repetition": record.repetition,
        "outcome": record.outcome,
        "error": record.error,
    }
    row.update(record.scenario)
    stats = record.stats.model_dump(exclude={"raw"})
    row.update(stats)
    measured = record.measured.model_dump(exclude={"phases"})
    row.update(measured)
    for phase, seconds in record.measured.phases.items():
        row[f"phase_{phase}"] = seconds
    integrity = record.integrity.model_dump()
    integrity["console_trouble_count"] = len(integrity.pop("console_trouble"))
    row.update(integrity)
    row.update(record.observed.columns())
    if record.fault is not None:
        row.update(record.fault.columns())
    if record.disk is not None:
        row.update(record.disk.columns())
    row.update({f"env_{name}": value for name, value in record.environment.model_dump().items()})
    row["source_host"] = record.source_host
    row["destination_host"] = record.destination_host
    row["warning_count"] = len(record.warnings)
    row["started_at"] = record.started_at
    row["ended_at"] = record.ended_at
    return row


def load_runs(path: str | Path, *, cache: bool = True) -> pd.DataFrame:
    """Load every run of an experiment into a DataFrame, one row per run.

    path is an experiment folder, or a results folder that contains exactly one
    experiment. Columns are RUN_COLUMNS, then one ``phase_<name>`` column per
    key of Measured.phases, such as phase_boot_s, and any scenario key that Scenario does not list. Missing
    values are NaN, except in guest_alive (<NA>) and the dates (NaT). Rows are
    sorted by started_at, then run_id.

    With cache true, rows of unchanged records come from <experiment>/runs.parquet,
    which is created or updated as needed (see lab.run_table). The DataFrame
    is the same with and without the cache.
    """
    from lab import run_table  # imported here because run_table imports this module

    experiment_dir = find_experiment_dir(path)
    frame = run_table.table_to_frame(run_table.load_table(experiment_dir, cache=cache))
    log.debug("loaded %d runs from %s", len(frame), experiment_dir)
    return frame
