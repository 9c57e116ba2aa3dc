#!/usr/bin/env python3
"""Benchmark the harness's own cost during a real migration on a local lab.

Brings up a private local lab (its own namespace prefix and root folder),
runs a small precopy experiment through lab.runner.ExperimentRunner under
TCG, and takes the lab down again, also after an error or Ctrl-C.

For every run it measures, around lab.migrate.Migration.run():

  migration s        wall time of Migration.run(), from the migrate3 call to
                     the collected result
  samples            job-stat samples stored (lab.migrate samples every
                     SAMPLE_INTERVAL_S while the job is active)
  samples/s          samples per second of migration wall time
  sampled s          first to last sample: the time the job was active, less
                     the setup before the first sample
  Hz in span         (samples - 1) / sampled s, the rate the sampling loop
                     achieved while it sampled
  median gap ms      median time between consecutive samples
  harness CPU s      user + system CPU time of the whole harness process
                     (every thread: sampler, migrate3 worker, libvirt event
                     loop) during Migration.run(), from getrusage(RUSAGE_SELF)
  CPU s per s        harness CPU s divided by migration s

QEMU and libvirtd run in other processes and are not counted. Other guests
on the same machine compete for the CPUs, so the script repeats the run and
prints the load average before and after.

Usage: scripts/bench_harness.py [--repetitions 3] [--prefix mbh] [--root /tmp/mbh-lab]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GUEST_MEMORY_MIB = 128
PLAYBOOK_TEXT = """\
experiment: bench-harness
description: Precopy runs for scripts/bench_harness.py
lab:
  hosts: 2
guest:
  memory_mib: {memory_mib}
  vcpus: 1
workload:
  working_set_mib: 48
  dirty_rate_mib_s: 4
  pattern: random
migration:
  strategy: precopy
  bandwidth_mib_s: 16
  downtime_limit_ms: 300
  max_time_s: 120
repetitions: {repetitions}
"""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def install_meter(measurements: list[dict]) -> None:
    """Wrap Migration.run() to record its wall time, the process's CPU time and the samples."""
    from lab import migrate

    original_run = migrate.Migration.run

    def measured_run(self):
        cpu_before = cpu_seconds()
        wall_before = time.monotonic()
        result = original_run(self)
        wall_s = time.monotonic() - wall_before
        cpu_s = cpu_seconds() - cpu_before
        times = [sample["t_s"] for sample in result.samples]
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        measurements.append({
            "outcome": result.outcome, "wall_s": wall_s, "cpu_s": cpu_s,
            "samples": len(result.samples),
            "span_s": times[-1] - times[0] if len(times) > 1 else float("nan"),
            "median_gap_ms": statistics.median(gaps) * 1000 if gaps else float("nan"),
        })
        return result

    migrate.Migration.run = measured_run


def machine_facts() -> str:
    import libvirt
    import pandas

    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
            f"{platform.python_version()}, libvirt {_version_text(libvirt.getVersion())}, pandas "
            f"{pandas.__version__}")


def _version_text(number: int) -> str:
    """Format a libvirt version number such as 11003000 as 11.3.0."""
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def median_and_range(values: list[float], digits: int) -> str:
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}–{max(values):.{digits}f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="precopy runs (default 3)")
    parser.add_argument("--prefix", default="mbh", help="namespace prefix of the private lab")
    parser.add_argument("--root", type=Path, default=Path("/tmp/mbh-lab"),
                        help="state folder of the private lab")
    arguments = parser.parse_args()
    if arguments.repetitions < 1:
        parser.error("--repetitions must be at least 1")

    from lab.hosts.local import LocalLab
    from lab.migrate import SAMPLE_INTERVAL_S
    from lab.playbook import load_playbook
    from lab.runner import ExperimentRunner

    measurements: list[dict] = []
    install_meter(measurements)
    work = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    playbook_path = work / "playbook.yaml"
    playbook_path.write_text(PLAYBOOK_TEXT.format(memory_mib=GUEST_MEMORY_MIB,
                                                  repetitions=arguments.repetitions))
    local_lab = LocalLab(root=arguments.root, prefix=arguments.prefix)
    load_before = load_average()
    try:
        local_lab.up(hosts=2)
        runner = ExperimentRunner(load_playbook(playbook_path), results_root=work / "results",
                                  lab=local_lab, accelerator="tcg", show_progress=False)
        summary = runner.run()
    finally:
        local_lab.down()
        shutil.rmtree(arguments.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    load_after = load_average()

    print(f"Machine: {machine_facts()}")
    print(f"Date: {time.strftime('%Y-%m-%d')}; sampling interval {SAMPLE_INTERVAL_S * 1000:.0f} ms "
          f"({1 / SAMPLE_INTERVAL_S:.0f} Hz); precopy, TCG, {GUEST_MEMORY_MIB} MiB guest, "
          f"48 MiB working set at 4 MiB/s, 16 MiB/s bandwidth")
    print(f"Load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    print(f"Outcomes: {summary.outcomes}")
    print()
    print("| run | outcome | migration s | samples | samples/s | sampled s | Hz in span "
          "| median gap ms | harness CPU s | CPU s per s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for number, row in enumerate(measurements, start=1):
        print(f"| {number} | {row['outcome']} | {row['wall_s']:.2f} | {row['samples']} "
              f"| {row['samples'] / row['wall_s']:.1f} | {row['span_s']:.2f} "
              f"| {(row['samples'] - 1) / row['span_s']:.1f} | {row['median_gap_ms']:.1f} "
              f"| {row['cpu_s']:.3f} | {row['cpu_s'] / row['wall_s']:.3f} |")
    if measurements:
        rates = [row["samples"] / row["wall_s"] for row in measurements]
        span_rates = [(row["samples"] - 1) / row["span_s"] for row in measurements]
        costs = [row["cpu_s"] / row["wall_s"] for row in measurements]
        print()
        print(f"Median (min–max) of {len(measurements)} runs: samples/s "
              f"{median_and_range(rates, 1)}, Hz in span {median_and_range(span_rates, 1)}, "
              f"harness CPU s per s of migration {median_and_range(costs, 3)}")


if __name__ == "__main__":
    main()
