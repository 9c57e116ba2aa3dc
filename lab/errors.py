"""Exceptions raised by the package; only the CLI turns them into exit codes."""

from __future__ import annotations


class LabError(Exception):
    """Root of every error the harness raises on purpose."""


class ConfigError(LabError):
    """Invalid user input: a playbook, an inventory or a command-line value.

    The message names the file, the field, the offending value and the fix.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None,
                 value: object = None, fix: str | None = None, line: int | None = None):
        self.path = path
        self.field = field
        self.value = value
        self.fix = fix
        self.line = line
        super().__init__(message)

    def __str__(self) -> str:
        where = self.path or ""
        if where and self.line is not None:
            where = f"{where}:{self.line}"
        parts = [f"{where}: " if where else ""]
        if self.field:
            parts.append(f"field '{self.field}': ")
        parts.append(self.args[0])
        if self.value is not None:
            parts.append(f" (got {self.value!r})")
        if self.fix:
            parts.append(f". {self.fix}")
        return "".join(parts)


class HostError(LabError):
    """A host of the lab is missing, unreachable or failed to start."""


class ImageError(LabError):
    """The guest image could not be built or is missing."""


class MigrationError(LabError):
    """A migration failed in a way the runner cannot record as an outcome."""


class OwnershipError(LabError):
    """A domain exists that the harness did not create, so it must not be touched."""
