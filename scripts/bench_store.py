#!/usr/bin/env python3
"""Benchmark loading an experiment of many runs and writing its report.

For each run count N given on the command line, the script fabricates an
experiment of N runs in a temporary folder and then measures, each time in a
fresh Python process:

  load, no cache     lab.load_runs(path, cache=False): parse every record.json
  load, cold cache   lab.load_runs(path) without runs.parquet: parse every
                     record.json and write the cache
  load, warm cache   lab.load_runs(path) with an up-to-date runs.parquet
  load, 1 changed    lab.load_runs(path) after one record.json was rewritten
  report             `migrlab report <experiment>` with a warm cache, run as
                     `python -m lab.cli report`, the same command

Times of the load phases cover the load_runs() call only, after the imports. The report time is
the wall time of the whole migrlab process, interpreter start included. Peak
RSS is ru_maxrss of the measuring process, so it includes the interpreter and
the imported libraries.

The fabricated runs contain record.json only (no timeline.parquet, no
events.json, no console logs), written without fsync and without the
temporary-folder rename of lab.store.write_run(), so that 100,000 runs can be
written in minutes. load_runs() and the report read record.json only, so the
missing files do not change what is measured. The OS page cache is not
dropped, so "cold" means no runs.parquet, not an empty page cache.

Usage: scripts/bench_store.py 1000 10000 [--repeat 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Scenario matrix of the fabricated experiment: 4 strategies x 5 dirty rates.
PLAYBOOK_TEXT = """\
experiment: bench
description: Fabricated runs for scripts/bench_store.py
guest:
  memory_mib: 256
workload:
  working_set_mib: 96
  dirty_rate_mib_s: 8
migration:
  strategy: precopy
  bandwidth_mib_s: 32
  postcopy_after_iterations: 2
matrix:
  strategy: [stop-and-copy, precopy, postcopy, hybrid]
  dirty_rate_mib_s: [2, 4, 8, 16, 24]
repetitions: {repetitions}
"""

CHILD_TIMEOUT_S = 3600.0
MIB = 2**20


def fabricate(root: Path, run_count: int, seed: int = 1) -> Path:
    """Write a playbook and an experiment of run_count runs under root; return the experiment folder."""
    from lab.store import init_experiment
    from tests.fixtures.fabricate import fabricate_record, write_playbook

    random.seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    scenario_count = 20
    repetitions = -(-run_count // scenario_count)
    playbook = write_playbook(root, PLAYBOOK_TEXT.format(repetitions=repetitions))
    experiment_dir = init_experiment(root / "results", playbook)
    runs_dir = experiment_dir / "runs"

    for index, (scenario, repetition) in enumerate(playbook.runs()):
        if index == run_count:
            break
        outcome = "completed" if random.random() > 0.02 else "failed"
        record = fabricate_record(playbook, scenario.scenario_id, repetition, outcome,
                                  index=index)
        record = record.model_copy(update={"stats": _libvirt_stats(scenario.values()),
                                           "measured": _measured()})
        run_dir = runs_dir / record.run_id
        run_dir.mkdir()
        (run_dir / "record.json").write_bytes(record.model_dump_json(indent=2).encode())
    return experiment_dir


def _libvirt_stats(scenario: dict):
    """Return MigrationStats with the keys that libvirt 11.3 reports after a precopy run."""
    from lab.records import MigrationStats

    total_ms = int(random.gauss(4000 + 400 * scenario["dirty_rate_mib_s"], 300))
    processed = int(random.gauss(256 + 8 * scenario["dirty_rate_mib_s"], 10)) * MIB
    downtime = max(1, int(random.gauss(20 + 4 * scenario["dirty_rate_mib_s"], 5)))
    memory_total = 269230080
    return MigrationStats.from_libvirt({
        "operation": 5, "type": 3,
        "time_elapsed": max(1, total_ms), "time_elapsed_net": max(1, total_ms - 1),
        "downtime": downtime, "downtime_net": max(0, downtime - 1), "setup_time": 1,
        "data_total": memory_total, "data_processed": max(0, processed), "data_remaining": 0,
        "memory_total": memory_total, "memory_processed": max(0, processed),
        "memory_remaining": 0, "memory_bps": 35065704, "memory_constant": 24946,
        "memory_normal": 83755, "memory_normal_bytes": 343060480,
        "memory_dirty_rate": random.randint(0, 6000), "memory_iteration": random.randint(1, 20),
        "memory_postcopy_requests": random.randint(0, 50), "memory_page_size": 4096,
        "disk_total": 0, "disk_processed": 0, "disk_remaining": 0,
    })


def _measured():
    from lab.records import Measured

    wall_total_ms = random.uniform(4000, 15000)
    return Measured(wall_total_ms=wall_total_ms, wall_downtime_ms=random.uniform(10, 400),
                    switchover_at_s=wall_total_ms / 1000 - 0.2,
                    phases={"boot_s": random.uniform(6, 10),
                            "migration_s": wall_total_ms / 1000 + 0.01,
                            "integrity_s": random.uniform(0.9, 1.2)})


def peak_rss_kib() -> int:
    """Return this process's peak resident set size in KiB (ru_maxrss on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_phase(phase: str, experiment_dir: Path) -> dict:
    """Run one load phase in this process and return its time, row count and peak RSS."""
    import lab
    import lab.run_table  # noqa: F401  (imported before the clock starts, as load_runs imports it)

    cache = phase != "load-no-cache"
    started = time.perf_counter()
    runs = lab.load_runs(experiment_dir, cache=cache)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": len(runs), "peak_rss_kib": peak_rss_kib()}


def _wait_with_rusage(argv: list[str], timeout_s: float) -> tuple[int, bytes, float, int]:
    """Run argv; return its exit code, stdout, wall time in s and peak RSS in KiB."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=_child_environment(), cwd=REPO)
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    try:
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
        process.stdout.close()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, output, seconds, usage.ru_maxrss


def _child_environment() -> dict[str, str]:
    """Return the environment for child processes, which import lab from this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def measure_load(phase: str, experiment_dir: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", phase,
            "--experiment", str(experiment_dir)]
    code, output, _, _ = _wait_with_rusage(argv, CHILD_TIMEOUT_S)
    if code != 0:
        raise SystemExit(f"phase {phase} failed with exit code {code}: rerun {' '.join(argv)}")
    return json.loads(output)


def measure_report(experiment_dir: Path) -> dict:
    # python -m lab.cli runs the same click command as the migrlab script.
    argv = [sys.executable, "-m", "lab.cli", "report", str(experiment_dir)]
    code, _, seconds, rss_kib = _wait_with_rusage(argv, CHILD_TIMEOUT_S)
    if code != 0:
        raise SystemExit(f"migrlab report failed with exit code {code}: rerun {' '.join(argv)}")
    return {"seconds": seconds, "peak_rss_kib": rss_kib}


def rewrite_one_record(experiment_dir: Path, index: int) -> None:
    """Rewrite one record.json with another downtime, as a re-run would."""
    runs_dir = experiment_dir / "runs"
    run_dir = sorted(runs_dir.iterdir())[index]
    path = run_dir / "record.json"
    record = json.loads(path.read_text())
    record["stats"]["downtime_ms"] = (record["stats"]["downtime_ms"] or 0) + 1
    path.write_text(json.dumps(record, indent=2))


def machine_facts() -> str:
    import pandas
    import pyarrow
    import pydantic

    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return (f"{cpu}, {os.cpu_count()} cores, {memory_kib / 2**20:.1f} GiB, Linux "
            f"{platform.release()}, Python {platform.python_version()}, pandas "
            f"{pandas.__version__}, pyarrow {pyarrow.__version__}, pydantic {pydantic.__version__}")


def _cell(values: list[float]) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(values):.2f}–{max(values):.2f})"


def bench(run_count: int, workdir: Path, repeat: int, keep: bool) -> str:
    root = Path(tempfile.mkdtemp(prefix=f"bench-store-{run_count}-", dir=workdir))
    try:
        started = time.perf_counter()
        experiment_dir = fabricate(root, run_count)
        print(f"fabricated {run_count} runs in {time.perf_counter() - started:.1f} s under "
              f"{experiment_dir}", file=sys.stderr, flush=True)
        cache_file = experiment_dir / "runs.parquet"
        results: dict[str, list[dict]] = {}

        def record(name: str, result: dict) -> None:
            results.setdefault(name, []).append(result)
            print(f"  {name}: {result}", file=sys.stderr, flush=True)

        for _ in range(repeat):
            record("load, no cache", measure_load("load-no-cache", experiment_dir))
        for _ in range(repeat):
            cache_file.unlink(missing_ok=True)
            record("load, cold cache", measure_load("load-cache", experiment_dir))
        for _ in range(repeat):
            record("load, warm cache", measure_load("load-cache", experiment_dir))
        for attempt in range(repeat):
            rewrite_one_record(experiment_dir, attempt)
            record("load, 1 changed", measure_load("load-cache", experiment_dir))
        for _ in range(repeat):
            record("report", measure_report(experiment_dir))

        for name, rows in results.items():
            if "rows" in rows[0] and any(row["rows"] != run_count for row in rows):
                raise SystemExit(f"{name}: loaded {[row['rows'] for row in rows]} rows, "
                                 f"expected {run_count}")
        cells = [_cell([row["seconds"] for row in rows]) for rows in results.values()]
        load_rss = max(row["peak_rss_kib"] for name, rows in results.items()
                       for row in rows if name != "report")
        report_rss = max(row["peak_rss_kib"] for row in results["report"])
        return (f"| {run_count:,} | " + " | ".join(cells)
                + f" | {load_rss / 1024:.0f} | {report_rss / 1024:.0f} |")
    finally:
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=int, help="run counts to benchmark, e.g. 1000 10000")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per phase (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder for the temporary experiments (default: the system temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the fabricated experiments")
    # --phase and --experiment run one measurement in a child process.
    parser.add_argument("--phase", choices=["load-no-cache", "load-cache"], help=argparse.SUPPRESS)
    parser.add_argument("--experiment", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.phase:
        print(json.dumps(run_phase(arguments.phase, arguments.experiment)))
        return
    if not arguments.runs or min(arguments.runs) < 1 or arguments.repeat < 1:
        parser.error("give one or more run counts of at least 1, and --repeat of at least 1")

    print(f"Machine: {machine_facts()}")
    print(f"Date: {time.strftime('%Y-%m-%d')}, {arguments.repeat} measurements per phase, "
          f"times in s as median (min–max), peak RSS in MiB")
    print()
    print("| runs | load, no cache | load, cold cache | load, warm cache | load, 1 changed "
          "| migrlab report | load peak RSS | report peak RSS |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run_count in arguments.runs:
        print(bench(run_count, arguments.workdir, arguments.repeat, arguments.keep), flush=True)


if __name__ == "__main__":
    main()
