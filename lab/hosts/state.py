"""lab.json: what the local lab created, written before it creates it."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from lab.errors import HostError

STATE_VERSION = 1


class HostRecord(BaseModel):
    """One host of the lab as lab.json stores it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    address: str
    is_libvirt_host: bool
    # Set only for libvirt hosts, which have their own UTS namespace and
    # libvirtd.conf.
    hostname: str | None = None
    host_uuid: str | None = None


class LabState(BaseModel):
    """Content of lab.json."""

    model_config = ConfigDict(extra="forbid")

    version: int = STATE_VERSION
    prefix: str
    subnet: str
    created_at: datetime
    hosts: list[HostRecord]
    # libvirtd pid of each libvirt host, by host name.
    pids: dict[str, int] = {}

    def host(self, name: str) -> HostRecord | None:
        for record in self.hosts:
            if record.name == name:
                return record
        return None


def read_state(path: Path) -> LabState | None:
    """Read lab.json; return None if it does not exist.

    Raises HostError if the file cannot be parsed or has another version.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise HostError(f"invalid lab state file {path}: {error}; run down to remove the lab "
                        "and up to make a new one") from error
    if isinstance(data, dict) and data.get("version") != STATE_VERSION:
        raise HostError(f"lab state file {path} has version {data.get('version')!r}, expected "
                        f"{STATE_VERSION}; run down with the version of migration-lab that made it")
    try:
        return LabState.model_validate(data)
    except ValidationError as error:
        raise HostError(f"invalid lab state file {path}: {error}; run down to remove the lab "
                        "and up to make a new one") from error


def write_state(path: Path, state: LabState) -> None:
    """Write lab.json atomically: a crash leaves the old or the new file, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(state.model_dump_json(indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
