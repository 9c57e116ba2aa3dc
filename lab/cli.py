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
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
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
    """Build the guest image (kernel and initramfs with the workload)."""


@image_group.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when an image with the same inputs exists.")
def image_build(force: bool) -> None:
    """Build the guest image, or reuse the one built from the same inputs."""
    from lab.guest.image import build_image

    image = build_image(force=force)
    console.print(f"image {image.digest[:16]} kernel {image.kernel_version}")
    console.print(f"  kernel: {image.kernel}")
    console.print(f"  initrd: {image.initrd}")


# -- doctor ------------------------------------------------------------------

@main.command("doctor")
@click.option("--accelerator", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="Accelerator to check; auto boots the guest under KVM and falls back to TCG.")
def doctor(accelerator: str) -> None:
    """Report the accelerator, QEMU and libvirt versions, userfaultfd and strategies."""
    from lab.doctor import run_doctor

    report = run_doctor(accelerator=accelerator)
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
def run(playbook: Path, results_root: Path, resume: bool, accelerator: str, make_report: bool) -> None:
    """Run every scenario of PLAYBOOK on the local lab and store each run."""
    from lab.playbook import load_playbook
    from lab.report import write_report
    from lab.runner import ExperimentRunner

    book = load_playbook(playbook)
    runner = ExperimentRunner(book, results_root=results_root, lab=local_lab(), accelerator=accelerator,
                              show_progress=sys.stderr.isatty())
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


@main.command("clean")
@click.option("--results", "results_root", type=click.Path(path_type=Path), default=Path("results"),
              show_default=True, help="Results folder whose half-written runs are deleted.")
def clean(results_root: Path) -> None:
    """Remove guests, console logs and half-written runs that a killed run left behind.

    Only guests with the harness's ownership mark are destroyed. The lab
    itself stays up; 'migrlab lab down' removes it.
    """
    from lab.cleanup import clean_hosts
    from lab.locking import experiment_lock
    from lab.store import remove_partial_writes

    lab_instance = local_lab()
    with experiment_lock(lab_instance.prefix):
        report = clean_hosts(lab_instance)
    removed = report.removed + [f"half-written run {path}" for path in remove_partial_writes(results_root)]
    for item in removed:
        console.print(f"removed {item}")
    for item in report.foreign:
        console.print(f"left {item}: it has no migration-lab ownership mark")
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


if __name__ == "__main__":
    main()
