"""The ``migrlab`` command: parses arguments, calls the library, prints results.

It is the only place that turns errors into exit codes: 1 for an error the
harness raised on purpose (with its message, no traceback), 130 after
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from lab.errors import LabError

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger(__name__)


class LabGroup(click.Group):
    """A click group that reports LabError as one line and exits 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LabError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            ctx.exit(130)


@click.group(cls=LabGroup)
@click.option("-v", "--verbose", count=True, help="More log output: -v for progress, -vv for debug.")
@click.version_option(package_name="migration-lab", prog_name="migrlab")
def main(verbose: int) -> None:
    """Live-migration experiments with QEMU guests on libvirt hosts."""
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = levels.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False)])
    # The runner's own log lines at INFO are useful without -v.
    logging.getLogger("lab").setLevel(min(level, logging.INFO))


# -- lab ---------------------------------------------------------------------

def local_lab():
    """Return the local lab this command works on.

    ``MIGRLAB_LAB_DIR`` and ``MIGRLAB_LAB_PREFIX`` select another lab than the
    default one (``$MIGRLAB_STATE/lab``, namespaces ``migrlab-*``), for example
    the one a test session brought up.
    """
    from lab.hosts.local import LocalLab

    root = os.environ.get("MIGRLAB_LAB_DIR")
    return LocalLab(root=Path(root) if root else None, prefix=os.environ.get("MIGRLAB_LAB_PREFIX", "migrlab"))


@main.group("lab")
def lab_group() -> None:
    """Start, inspect and remove the local lab (hosts in namespaces)."""


@lab_group.command("up")
@click.option("--hosts", default=2, show_default=True, type=click.IntRange(2, 8),
              help="Number of libvirt hosts.")
def lab_up(hosts: int) -> None:
    """Bring up the local lab; does nothing for hosts already up."""
    lab_instance = local_lab()
    state = lab_instance.up(hosts=hosts)
    console.print(f"lab up: {len(state.hosts)} hosts")
    _print_hosts(lab_instance)


@lab_group.command("down")
@click.option("--force", is_flag=True, help="Remove the lab even while an experiment runs on it.")
def lab_down(force: bool) -> None:
    """Remove every process, link, mount and directory of the local lab."""
    from lab.locking import experiment_lock

    lab_instance = local_lab()
    if force:
        removed = lab_instance.down()
    else:
        with experiment_lock(lab_instance.prefix):
            removed = lab_instance.down()
    if not removed:
        console.print("nothing to remove")
    for item in removed:
        console.print(f"removed {item}")


@lab_group.command("status")
def lab_status() -> None:
    """Show the lab's hosts, daemons, guests and any leftovers."""
    status = local_lab().status()
    console.print(status.render() if hasattr(status, "render") else status)


def _print_hosts(local_lab) -> None:
    table = Table("host", "address", "libvirt URI", "migration URI")
    for host in local_lab.hosts():
        table.add_row(host.name, host.address, host.libvirt_uri if host.is_libvirt_host else "-",
                      host.migration_uri if host.is_libvirt_host else "-")
    console.print(table)


# -- image -------------------------------------------------------------------

@main.group("image")
def image_group() -> None:
    """Build the guest image (kernel and initramfs with the workload) and copy it to hosts."""


@image_group.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when an image with the same inputs exists.")
def image_build(force: bool) -> None:
    """Build the guest image, or reuse the one built from the same inputs."""
    from lab.guest.image import build_image

    image = build_image(force=force)
    console.print(f"image {image.digest[:16]} kernel {image.kernel_version}")
    console.print(f"  kernel: {image.kernel}")
    console.print(f"  initrd: {image.initrd}")


@image_group.command("push")
@click.argument("inventory")
def image_push(inventory: str) -> None:
    """Copy the guest image to every libvirt host of INVENTORY, verified by SHA-256.

    INVENTORY is an inventory file, or 'local' for the local lab's. Hosts
    that already have the image are skipped.
    """
    from lab.guest.image import build_image
    from lab.hosts.image_push import push_image

    inventory_model = _load_inventory_argument(inventory)
    image = build_image()
    results = push_image(inventory_model, image)
    table = Table("host", "result", "MiB sent", "seconds")
    for result in results:
        style = {"present": "green", "pushed": "green", "failed": "red"}[result.action]
        table.add_row(result.host, f"[{style}]{result.action}[/]", f"{result.bytes_sent / 2**20:.1f}",
                      f"{result.seconds:.1f}")
    console.print(f"image {image.digest[:16]} to {inventory_model.image_dir}/{image.digest[:16]}…")
    console.print(table)
    failed = [result for result in results if result.action == "failed"]
    for result in failed:
        err_console.print(f"{result.host}: {escape(result.error or '')}", highlight=False, soft_wrap=True)
    if failed:
        raise LabError(f"image push failed on {len(failed)} of {len(results)} hosts")


# -- hosts -------------------------------------------------------------------

def _load_inventory_argument(value: str):
    """Load the inventory a command names: a file, or 'local' or 'local-ssh' for the local lab's own."""
    from lab.inventory import load_inventory

    if value in ("local", "local-ssh"):
        lab_instance = local_lab()
        if not lab_instance.inventory_file.is_file():
            raise LabError(f"the local lab at {lab_instance.root} is not up, so it has no inventory; "
                           "run 'migrlab lab up' first")
        return load_inventory(lab_instance.inventory_file)
    return load_inventory(Path(value))


_STATUS_STYLES = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}


@main.group("hosts")
def hosts_group() -> None:
    """Check the hosts of an inventory (real servers or the local lab) over SSH."""


@hosts_group.command("check")
@click.argument("inventory")
@click.option("--playbook", "playbook_path", type=click.Path(path_type=Path),
              help="Count only the checks this playbook needs: userfaultfd only for postcopy strategies, "
                   "memory for its largest guest.")
@click.option("--accelerator", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="Accelerator to prove by booting the guest; auto tries KVM, then TCG.")
def hosts_check(inventory: str, playbook_path: Path | None, accelerator: str) -> None:
    """Run the preflight checks on every host of INVENTORY in parallel and print one table.

    INVENTORY is an inventory file, or 'local' for the local lab's. Exits
    with status 1 if a host fails a check that the playbook needs.
    """
    from lab.guest.image import build_image
    from lab.hosts.checks import CHECKS, Requirements, check_hosts
    from lab.playbook import load_playbook

    inventory_model = _load_inventory_argument(inventory)
    book = load_playbook(playbook_path) if playbook_path is not None else None
    report = check_hosts(inventory_model, build_image(), Requirements.from_playbook(book, accelerator))

    # Versions read libvirt/QEMU, memory is MemAvailable, clock the offset to this machine.
    table = Table("host", "role", *CHECKS, title=f"preflight of {inventory_model.name}", box=box.SIMPLE_HEAD)
    for host_report in report.hosts:
        cells = []
        for name in CHECKS:
            result = host_report.results.get(name)
            if result is None:
                cells.append("-")
                continue
            note = "" if result.needed else " (not needed)"
            cells.append(f"[{_STATUS_STYLES[result.status]}]{escape(result.summary)}{note}[/]")
        table.add_row(host_report.host.name, host_report.host.role, *cells)
    console.print(table)
    for host_report in report.hosts:
        for name, result in host_report.results.items():
            if result.status in ("fail", "warn") and result.detail:
                console.print(f"{host_report.host.name} {name} {result.status}: {escape(result.detail)}",
                              highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    if not report.ok:
        failed = sorted({host_report.host.name for host_report in report.hosts if host_report.failures})
        raise LabError(f"hosts failed needed checks: {', '.join(failed)}")


# -- doctor ------------------------------------------------------------------

@main.command("doctor")
@click.option("--accelerator", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="Accelerator to check; auto boots the guest under KVM and falls back to TCG.")
def doctor(accelerator: str) -> None:
    """Report the accelerator, QEMU and libvirt versions, userfaultfd and strategies."""
    from lab.doctor import run_doctor

    report = run_doctor(accelerator=accelerator, lab=local_lab())
    table = Table("check", "result")
    for check, value in report.items():
        table.add_row(check, str(value))
    console.print(table)


# -- run and report ------------------------------------------------------------

@main.command("run")
@click.argument("playbook", type=click.Path(path_type=Path))
@click.option("--results", "results_root", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Folder that receives <experiment>/ with one folder per run.")
@click.option("--resume", is_flag=True, help="Skip runs already stored for this playbook.")
@click.option("--accelerator", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto uses KVM only after it booted the guest, else TCG.")
@click.option("--report/--no-report", "make_report", default=True, show_default=True,
              help="Write the report when the runs are done.")
@click.option("--inventory", default=None,
              help="Lab to run on instead of the playbook's: 'local' (namespaces), 'local-ssh' (the local lab "
                   "over SSH) or an inventory file.")
def run(playbook: Path, results_root: Path, resume: bool, accelerator: str, make_report: bool,
        inventory: str | None) -> None:
    """Run every scenario of PLAYBOOK on the lab its inventory names and store each run."""
    from lab.playbook import load_playbook
    from lab.report import write_report
    from lab.runner import ExperimentRunner

    book = load_playbook(playbook)
    runner = ExperimentRunner(book, results_root=results_root, lab=local_lab(), accelerator=accelerator,
                              show_progress=sys.stderr.isatty(), inventory=inventory)
    summary = runner.run(resume=resume)
    counts: dict[str, int] = {}
    for outcome in summary.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    done = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no runs"
    console.print(f"{book.experiment}: {done}; skipped {len(summary.skipped)} already stored")
    console.print(f"results: {summary.experiment_dir}")
    if summary.interrupted:
        err_console.print(f"interrupted: finished runs are kept. Resume with: migrlab run {playbook} "
                          f"--results {results_root} --resume")
        sys.exit(130)
    if make_report:
        for path in write_report(summary.experiment_dir):
            console.print(f"wrote {path}")


@main.command("plan")
@click.argument("playbook", type=click.Path(path_type=Path))
@click.option("--format", "output_format", type=click.Choice(["table", "csv"]), default="table",
              show_default=True, help="table for reading, csv for other tools.")
def plan(playbook: Path, output_format: str) -> None:
    """Validate PLAYBOOK and list its scenarios with the simple precopy model's prediction, without running.

    The model (rounds, downtime, MiB sent, time) applies to precopy and
    stop-and-copy scenarios with a bandwidth cap or a shaped link; other
    scenarios show no prediction.
    """
    import pandas as pd

    from lab.playbook import load_playbook
    from lab.plan import make_plan

    book = load_playbook(playbook)
    the_plan = make_plan(book)
    if output_format == "csv":
        click.echo(pd.DataFrame(the_plan.rows()).convert_dtypes().to_csv(index=False), nl=False)
        return
    # The scenario ids show the values of the matrix keys, so the table leaves those columns out.
    rows = the_plan.rows(with_matrix_keys=False)
    common = ", ".join(f"{name} {value}" for name, value in the_plan.common_values().items())
    console.print(f"all scenarios: {common}", highlight=False)
    headers = {"memory_mib": "memory MiB", "working_set_mib": "ws MiB", "dirty_rate_mib_s": "dirty MiB/s",
               "bandwidth_mib_s": "bw MiB/s", "link_rate_mib_s": "link MiB/s", "downtime_limit_ms": "limit ms",
               "postcopy_after_iterations": "pc after it", "postcopy_after_s": "pc after s",
               "max_time_s": "max s", "model_ratio": "L", "model_rounds": "rounds",
               "model_downtime_ms": "downtime ms", "model_sent_mib": "sent MiB", "model_time_s": "time s"}
    table = Table(box=box.SIMPLE_HEAD, title="simple precopy model: L = dirty rate / link rate",
                  title_justify="left")
    for name in rows[0]:
        text_column = name in ("scenario", "strategy", "fault", "pattern")
        table.add_column(headers.get(name, name), justify="left" if text_column else "right",
                         no_wrap=name == "scenario")
    for row in rows:
        table.add_row(*("-" if value is None else str(value) for value in row.values()))
    console.print(table)
    console.print(f"{book.experiment}: {len(the_plan.scenarios)} scenarios x {book.repetitions} repetitions = "
                  f"{the_plan.run_count} runs on inventory {book.inventory}; the migration phases take at most "
                  f"{the_plan.migration_time_bound_s / 60:.1f} min (the sum of max_time_s), plus guest boot "
                  f"and probes per run")


@main.command("clean")
@click.option("--results", "results_root", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Results folder whose half-written runs are deleted.")
@click.option("--inventory", default=None,
              help="Clean the libvirt hosts of this inventory over SSH instead of the local lab: an inventory "
                   "file, or 'local' or 'local-ssh' for the local lab's own. Only guests that this machine "
                   "created are destroyed.")
def clean(results_root: Path, inventory: str | None) -> None:
    """Remove guests, their logs and half-written runs that a killed run left behind.

    Only guests with the harness's ownership mark are destroyed. With
    --inventory, the mark must also name this machine as the guest's
    controller, because other people may run migrlab against the same
    servers. The lab itself stays up; 'migrlab lab down' removes it.
    """
    from lab.cleanup import clean_hosts, clean_inventory
    from lab.domain import controller_id
    from lab.locking import experiment_lock
    from lab.store import remove_partial_writes

    if inventory is None:
        lab_instance = local_lab()
        with experiment_lock(lab_instance.prefix):
            report = clean_hosts(lab_instance)
    else:
        inventory_model = _load_inventory_argument(inventory)
        # 'migrlab run' takes the lock named after the inventory, and the local
        # lab names its inventory after its prefix.
        # NOTE: the lock is this machine's only, per inventory name, so a run
        # from this machine under another inventory file naming the same
        # servers does not hold it, and this clean would destroy its guests.
        with experiment_lock(inventory_model.name):
            report = clean_inventory(inventory_model)
        console.print(f"controller ID of this machine: {controller_id()}", highlight=False)
    removed = report.removed + [f"half-written run {path}" for path in remove_partial_writes(results_root)]
    for item in removed:
        console.print(f"removed {escape(item)}", highlight=False, soft_wrap=True)
    for item in report.foreign:
        console.print(f"left {escape(item)}", highlight=False, soft_wrap=True)
    if not removed:
        console.print("nothing to remove")
    if report.failures:
        raise LabError("clean could not remove everything: " + "; ".join(report.failures))


@main.command("report")
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(results_dir: Path) -> None:
    """Write summary tables and figures for the runs under RESULTS_DIR."""
    from lab.report import write_report

    for path in write_report(results_dir):
        console.print(f"wrote {path}")


# -- plot --------------------------------------------------------------------

@main.group("plot")
def plot_group() -> None:
    """Draw figures of single runs."""


@plot_group.command("timeline")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG file to write; default RUN_DIR/timeline.png.")
def plot_timeline_command(run_dir: Path, out_path: Path | None) -> None:
    """Draw the timeline of the run in RUN_DIR: transfer, dirty rate, pause, probes and guest throughput."""
    from lab.timeline import load_run_timeline, plot_timeline

    path = plot_timeline(load_run_timeline(run_dir), out_path or run_dir / "timeline.png")
    console.print(f"wrote {path}")


# -- exercise ----------------------------------------------------------------

@main.group("exercise")
def exercise_group() -> None:
    """Classroom exercises (playbooks/classroom, shipped in the package) and their answer keys."""


@exercise_group.command("list")
def exercise_list() -> None:
    """List the classroom exercises with their titles."""
    from lab.classroom import list_exercises, load_exercise

    for name in list_exercises():
        exercise = load_exercise(name)
        click.echo(f"{name}\t{exercise.title['en']}")


@exercise_group.command("copy")
@click.argument("exercise")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite exercise files that already exist in TARGET.")
def exercise_copy(exercise: str, target: Path, force: bool) -> None:
    """Write the playbook, guides and questions of EXERCISE into the folder TARGET."""
    from lab.classroom import copy_exercise, load_exercise

    spec = load_exercise(exercise)
    for path in copy_exercise(exercise, target, overwrite=force):
        click.echo(f"wrote {path}")
    click.echo(f"run it with: migrlab run {target / 'playbook.yaml'}")
    click.echo(f"answer key:  migrlab exercise key {spec.name} RESULTS_DIR")


@exercise_group.command("key")
@click.argument("exercise")
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--lang", type=click.Choice(["es", "en"]), default="es", show_default=True,
              help="Language of the key: es (Spanish) or en (English).")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Markdown file to write; default standard output.")
def exercise_key(exercise: str, results_dir: Path, lang: str, output_path: Path | None) -> None:
    """Write the answer key of EXERCISE (a name or folder) from the runs under RESULTS_DIR."""
    from lab.classroom import answer_key

    text = answer_key(exercise, results_dir, lang=lang)
    if output_path is None:
        click.echo(text)
        return
    output_path.write_text(text, encoding="utf-8")
    console.print(f"wrote {output_path}")


if __name__ == "__main__":
    main()
