"""The guest: its image (Debian kernel plus an initramfs with the workload) and its console output.

``image`` builds and finds content-addressed images and writes the kernel
command line, ``console`` parses what the guest prints on ttyS0, and
``workload/workload.c`` and ``init.sh`` are the programs the guest runs.
"""

from lab.guest.console import BadPageLine, ConsoleSummary, ReadyLine, WorkloadReport, parse_line, scan_console
from lab.guest.image import GuestImage, build_image, find_image, kernel_cmdline

__all__ = [
    "BadPageLine",
    "ConsoleSummary",
    "GuestImage",
    "ReadyLine",
    "WorkloadReport",
    "build_image",
    "find_image",
    "kernel_cmdline",
    "parse_line",
    "scan_console",
]
