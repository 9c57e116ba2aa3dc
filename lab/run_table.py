"""The runs of an experiment as one DataFrame, with a cache in runs.parquet.

Parsing and validating 100,000 record.json files takes over 10 s on a
2-core machine (docs/benchmarks.md), so load_runs() keeps the flattened rows in ``<experiment>/runs.parquet``
together with the stamp of each record.json: inode, mtime in ns and size.
A load stats every record.json, reuses the cached rows whose stamp is
unchanged, parses new or changed records, drops the rows of runs that are
gone, and rewrites the cache only when something changed.

Rows are kept as Arrow columns that hold the values exactly as _flatten()
returned them, so the DataFrame is the same whether its rows came from the
cache or from the records. A column whose values are all str, all int, all
float, all bool or all datetimes (None allowed anywhere) gets that Arrow type.
A column that mixes types, or holds an int beyond int64, is stored as JSON
text per value, marked in the field metadata.

The cache is derived data and is not fsynced. A cache that is unreadable,
damaged or written by a harness with another row layout is ignored with a
warning and rebuilt. The file is replaced by a rename, so a reader never sees
a half-written cache. A record.json edited in place within one mtime tick
without changing its size or inode would not be noticed, but
lab.store.write_run() always writes a new file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic

import lab
from lab import store

log = logging.getLogger(__name__)

CACHE_FILE = "runs.parquet"
# Raise when the layout of the cache file changes.
_CACHE_FORMAT = 1
_METADATA_KEY = b"migration-lab.runs-cache"
_ENCODING_KEY = b"encoding"
_JSON = b"json"
_DATE_COLUMNS = ("started_at", "ended_at")

# Column names in the cache file. Row values are stored as "row.<key>" so
# that no key of a record can collide with the stamp columns.
_ROW_PREFIX = "row."
_STAMP_COLUMNS = {"stamp.inode": pa.int64(), "stamp.mtime_ns": pa.int64(),
                  "stamp.size": pa.int64()}
_EXTRA_KEYS = "extra_keys"

Stamp = tuple[int, int, int]


# Modules whose code decides how a record.json becomes a row.
_LAYOUT_MODULES = ("lab.records", "lab.playbook", "lab.store", "lab.run_table")


def layout_fingerprint() -> str:
    """Return a digest of what decides a cached row: the cache format, RUN_COLUMNS,
    the pydantic version and the source files of _LAYOUT_MODULES.

    Any edit to those files makes existing caches stale, so they are rebuilt once.
    """
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_FORMAT}\n{store.RUN_COLUMNS}\n{pydantic.VERSION}\n".encode())
    for name in _LAYOUT_MODULES:
        source = getattr(sys.modules.get(name), "__file__", None)
        try:
            digest.update(Path(source).read_bytes() if source else name.encode())
        except OSError:
            # NOTE: without readable sources, only the version distinguishes layouts.
            digest.update(f"{name} {lab.__version__}".encode())
    return digest.hexdigest()


# Scanning


def scan_records(runs_dir: Path) -> dict[str, Stamp]:
    """Return the stamp of record.json of every run folder, keyed by run id.

    A run folder is an entry whose name does not start with a dot and that
    contains a regular file record.json, as in store.finished_run_ids().
    """
    stamps: dict[str, Stamp] = {}
    try:
        directory = os.open(runs_dir, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return stamps
    try:
        names = os.listdir(directory)
        record_suffix = "/" + store.RECORD_FILE
        for name in names:
            if name.startswith("."):
                continue
            try:
                status = os.stat(name + record_suffix, dir_fd=directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(status.st_mode):
                stamps[name] = (status.st_ino, status.st_mtime_ns, status.st_size)
    finally:
        os.close(directory)
    return stamps


# Rows as Arrow columns


def _json_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata={_ENCODING_KEY: _JSON})


def _is_json(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(_ENCODING_KEY) == _JSON


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                datetime: pa.timestamp("us", tz="UTC")}


def _cells_to_column(name: str, cells: list[Any]) -> tuple[pa.Field, pa.Array]:
    """Store cells in the narrowest Arrow type that keeps every value as it is."""
    kinds = {type(value) for value in cells} - {type(None)}
    if not kinds:
        return pa.field(name, pa.null()), pa.nulls(len(cells))
    if len(kinds) == 1:
        arrow_type = _ARROW_TYPES.get(kinds.pop())
        if arrow_type is not None:
            try:
                return pa.field(name, arrow_type), pa.array(cells, arrow_type)
            except (OverflowError, pa.ArrowInvalid):
                pass  # an int beyond int64 is stored as JSON text
    encoded = [None if value is None else json.dumps(value) for value in cells]
    return _json_field(name), pa.array(encoded, pa.string())


def rows_to_table(rows: list[dict[str, Any]], stamps: list[Stamp]) -> pa.Table:
    """Build a table with one column per row key, the extra keys of each row and its stamp.

    Raises TypeError from json.dumps() on a value in a mixed column that JSON
    cannot encode.
    """
    run_columns = set(store.RUN_COLUMNS)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    fields = []
    arrays = []
    for key in keys:
        field, array = _cells_to_column(_ROW_PREFIX + key, [row.get(key) for row in rows])
        fields.append(field)
        arrays.append(array)
    extra_keys = [sorted(key for key in row if key not in run_columns) for row in rows]
    fields.append(pa.field(_EXTRA_KEYS, pa.list_(pa.string())))
    arrays.append(pa.array(extra_keys, pa.list_(pa.string())))
    for position, (name, arrow_type) in enumerate(_STAMP_COLUMNS.items()):
        fields.append(pa.field(name, arrow_type))
        arrays.append(pa.array([stamp[position] for stamp in stamps], arrow_type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _python_cells(field: pa.Field, column: pa.ChunkedArray) -> np.ndarray:
    """Return the values of a column as Python objects, None where null."""
    if pa.types.is_string(field.type) and not _is_json(field):
        return column.to_numpy().astype(object, copy=False)
    if not _is_json(field):
        cells = np.empty(len(column), dtype=object)
        cells[:] = column.to_pylist()
        return cells
    encoded = column.combine_chunks().dictionary_encode()
    decoded = np.empty(len(encoded.dictionary) + 1, dtype=object)
    decoded[:-1] = [json.loads(text) for text in encoded.dictionary.to_pylist()]
    decoded[-1] = None
    indices = encoded.indices.fill_null(len(encoded.dictionary)).to_numpy()
    return decoded[indices]


def _concat_column(name: str, parts: list[tuple[pa.Field, pa.ChunkedArray]]) -> tuple[pa.Field, pa.ChunkedArray]:
    """Join the same key's column from several tables, keeping every value exact."""
    typed = [(field, column) for field, column in parts if field.type != pa.null()]
    if not typed:
        return parts[0][0], pa.chunked_array([chunk for _, column in parts for chunk in column.chunks],
                                             pa.null())
    first = typed[0][0]
    if all(field.type == first.type and _is_json(field) == _is_json(first) for field, _ in typed):
        chunks = []
        for field, column in parts:
            chunks.extend(column.cast(first.type).chunks if field.type == pa.null() else column.chunks)
        return first, pa.chunked_array(chunks, first.type)
    # The parts hold different types, so the joined column is rebuilt from the
    # Python values of all of them.
    cells = np.concatenate([_python_cells(field, column) for field, column in parts])
    field, array = _cells_to_column(name, list(cells))
    return field, pa.chunked_array([array], field.type)


def concat_tables(tables: list[pa.Table]) -> pa.Table:
    """Stack tables of rows_to_table() whose columns may differ in set and type."""
    tables = [table for table in tables if table.num_rows] or tables[:1]
    if len(tables) == 1:
        return tables[0]
    names = list(dict.fromkeys(name for table in tables for name in table.column_names))
    fields = []
    columns = []
    for name in names:
        parts = []
        for table in tables:
            if name in table.column_names:
                parts.append((table.schema.field(name), table.column(name)))
            else:
                parts.append((pa.field(name, pa.null()),
                              pa.chunked_array([pa.nulls(table.num_rows)], pa.null())))
        field, column = _concat_column(name, parts)
        fields.append(field)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# Table to DataFrame


def _final_column(name: str, field: pa.Field, column: pa.ChunkedArray) -> pd.Series:
    """Convert one column to its load_runs() dtype; the result depends on the values only."""
    if name in _DATE_COLUMNS:
        if pa.types.is_timestamp(field.type):
            dates = pd.to_datetime(column.to_pandas(), utc=True)
        else:
            dates = pd.to_datetime(pd.Series(_python_cells(field, column), dtype=object), utc=True)
        return dates.dt.as_unit("us")
    if name == "guest_alive":
        return pd.Series(pd.array(list(_python_cells(field, column)), dtype="boolean"))
    if name == "repetition":
        return pd.Series(_python_cells(field, column), dtype=object).astype("int64")

    if pa.types.is_string(field.type) and not _is_json(field):
        has_text = column.null_count < len(column)
        cells = None
    elif pa.types.is_null(field.type) or pa.types.is_integer(field.type) \
            or pa.types.is_floating(field.type) or pa.types.is_boolean(field.type):
        has_text = False
        cells = None
    else:
        cells = _python_cells(field, column)
        has_text = any(isinstance(value, str) for value in cells)

    if name in store._TEXT_COLUMNS or has_text:
        if cells is None:
            cells = _python_cells(field, column)
        cells[pd.isna(cells)] = np.nan
        return pd.Series(cells, dtype=object)
    # Numbers become float64 so that a missing value is NaN in every column.
    if cells is not None:
        return pd.Series(cells, dtype=object).astype("float64")
    values = column.cast(pa.float64(), safe=False).to_numpy()
    return pd.Series(values, dtype="float64")


def sort_rows(table: pa.Table) -> pa.Table:
    """Sort rows by started_at, then run_id; return the table itself when it is sorted."""
    if table.num_rows < 2:
        return table
    started_at = table.column(_ROW_PREFIX + "started_at")
    if pa.types.is_timestamp(started_at.type) and not started_at.null_count:
        steps = np.diff(started_at.cast(pa.int64()).to_numpy())
        if (steps > 0).all():
            return table
    order = pc.sort_indices(table, sort_keys=[(_ROW_PREFIX + "started_at", "ascending"),
                                              (_ROW_PREFIX + "run_id", "ascending")])
    return table.take(order)


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """Build the load_runs() DataFrame from a table of rows_to_table() or the cache."""
    table = sort_rows(table)
    present = {name[len(_ROW_PREFIX):]: name for name in table.column_names
               if name.startswith(_ROW_PREFIX)}
    extra_keys = set(table.column(_EXTRA_KEYS).combine_chunks().flatten().to_pylist())
    columns = list(dict.fromkeys(store.RUN_COLUMNS + sorted(extra_keys)))
    data = {}
    for name in columns:
        if name in present:
            column_name = present[name]
            field = table.schema.field(column_name)
            column = table.column(column_name)
        else:
            field = pa.field(name, pa.null())
            column = pa.chunked_array([pa.nulls(table.num_rows)], pa.null())
        data[name] = _final_column(name, field, column)
    return pd.DataFrame(data, columns=columns)


# Parsing


def parse_records(runs_dir: Path, run_ids: list[str], stamps: dict[str, Stamp]) -> pa.Table:
    """Read, validate and flatten the records of run_ids into a table with their stamps."""
    rows = [store._flatten(store.load_record(runs_dir / run_id)) for run_id in run_ids]
    return rows_to_table(rows, [stamps[run_id] for run_id in run_ids])


# Cache file


def read_cache(path: Path) -> pa.Table | None:
    """Return the cached table, or None when it is absent, damaged or of another layout."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        log.warning("ignoring the runs cache %s, which cannot be read, and rebuilding it: %s",
                    path, exc)
        return None
    problem = _cache_problem(table)
    if problem:
        log.warning("ignoring the runs cache %s and rebuilding it: %s", path, problem)
        return None
    return table


def _cache_problem(table: pa.Table) -> str | None:
    metadata = table.schema.metadata or {}
    try:
        stored = json.loads(metadata.get(_METADATA_KEY, b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its metadata is not valid JSON"
    if not isinstance(stored, dict) or stored.get("fingerprint") != layout_fingerprint():
        return "it was written for another row layout"
    for name, arrow_type in {**_STAMP_COLUMNS, _ROW_PREFIX + "run_id": pa.string(),
                             _EXTRA_KEYS: pa.list_(pa.string())}.items():
        if name not in table.column_names:
            return f"column {name} is missing"
        if table.schema.field(name).type != arrow_type:
            return f"column {name} has type {table.schema.field(name).type}, expected {arrow_type}"
    run_ids = table.column(_ROW_PREFIX + "run_id")
    if run_ids.null_count or len(pc.unique(run_ids)) != table.num_rows:
        return "its run ids are missing or repeated"
    return None


def write_cache(path: Path, table: pa.Table) -> None:
    """Replace the cache through a temporary file and a rename; log and go on if that fails."""
    metadata = {_METADATA_KEY: json.dumps({"fingerprint": layout_fingerprint(),
                                           "format": _CACHE_FORMAT}).encode()}
    table = table.replace_schema_metadata(metadata)
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        log.warning("cannot write the runs cache %s, so the next load parses every record "
                    "again: %s", path, exc)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _kept_rows(cached: pa.Table, stamps: dict[str, Stamp]) -> tuple[np.ndarray, set[str]]:
    """Return the cached row indexes whose stamp is current, and the run ids they cover."""
    current_ids = list(stamps)
    positions = pc.index_in(pa.array(current_ids, pa.string()),
                            value_set=cached.column(_ROW_PREFIX + "run_id").combine_chunks())
    positions = positions.fill_null(-1).to_numpy()
    current = np.array(list(stamps.values()), dtype=np.int64).reshape(len(current_ids), 3)
    found = positions >= 0
    matches = found.copy()
    for column, name in enumerate(_STAMP_COLUMNS):
        stored = cached.column(name).to_numpy()
        matches[found] &= stored[positions[found]] == current[found, column]
    kept = np.sort(positions[matches])
    covered = {run_id for run_id, match in zip(current_ids, matches) if match}
    return kept, covered


def _drop_unused_columns(table: pa.Table) -> pa.Table:
    """Drop the columns of keys that no remaining row has, left over from dropped rows."""
    used = set(store.RUN_COLUMNS)
    used.update(table.column(_EXTRA_KEYS).combine_chunks().flatten().to_pylist())
    unused = [name for name in table.column_names
              if name.startswith(_ROW_PREFIX) and name[len(_ROW_PREFIX):] not in used]
    return table.drop_columns(unused)


def load_table(experiment_dir: Path, *, cache: bool = True) -> pa.Table:
    """Return the rows of every run of the experiment, through the cache when cache is true."""
    runs_dir = experiment_dir / store.RUNS_DIR
    stamps = scan_records(runs_dir)
    if not cache:
        return parse_records(runs_dir, sorted(stamps), stamps)

    cache_path = experiment_dir / CACHE_FILE
    cached = read_cache(cache_path)
    if cached is None:
        kept, covered = [], set()
    else:
        kept, covered = _kept_rows(cached, stamps)
    changed = sorted(set(stamps) - covered)
    fresh = parse_records(runs_dir, changed, stamps)
    if cached is not None and not changed and len(kept) == cached.num_rows:
        log.debug("runs cache %s is up to date with %d runs", cache_path, len(kept))
        return cached

    parts = [fresh] if cached is None else [cached.take(kept), fresh]
    table = sort_rows(_drop_unused_columns(concat_tables(parts)))
    dropped = 0 if cached is None else cached.num_rows - len(kept)
    log.info("runs cache %s: %d rows reused, %d records parsed, %d rows dropped", cache_path,
             len(kept), len(changed), dropped)
    if table.num_rows:
        write_cache(cache_path, table)
    else:
        cache_path.unlink(missing_ok=True)
    return table
