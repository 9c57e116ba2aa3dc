"""Locations of the harness's state on the machine that runs it.

Everything lives under one directory, ``/var/lib/migrlab`` unless the
``MIGRLAB_STATE`` environment variable names another:

``lab/``
    the local lab: one folder per host with its private /run, /etc/libvirt,
    /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, the
    namespace files, and ``lab.json`` describing what is up.
``images/``
    content-addressed guest images, one folder per digest.
``downloads/``
    Debian packages fetched to build guest images (the guest kernel).
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("MIGRLAB_STATE", "/var/lib/migrlab"))


def lab_dir() -> Path:
    return state_dir() / "lab"


def image_dir() -> Path:
    return state_dir() / "images"


def download_dir() -> Path:
    return state_dir() / "downloads"
