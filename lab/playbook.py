"""Playbook models and loader.

A playbook is a YAML file that declares one experiment: the base guest,
workload and migration settings, and a matrix of values to vary. The loader
validates the whole file before returning, so a typo fails before any host is
touched, and it reports every problem it finds with the file, the line and the
field path.

A scenario is one point of the matrix, merged over the base sections. Its
fields, and the names that a matrix may vary, are listed in SCENARIO_FIELDS.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError,
                      ValidationInfo, model_validator)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from lab.errors import ConfigError
from lab.faults import FaultSpec, fault_strategy_problems
from lab.strategies import STRATEGY_FIELDS, reset_inapplicable, strategy_problems, unused_base_fields, value_applies

log = logging.getLogger(__name__)

Strategy = Literal["stop-and-copy", "precopy", "downtime-steps", "auto-converge", "dirty-limit", "xbzrle", "multifd",
                   "postcopy", "postcopy-preempt", "hybrid", "flushing"]
Pattern = Literal["sequential", "random"]
# Guest NIC models: libvirt's <model type=...> values the guest image has drivers for.
NicModel = Literal["e1000", "virtio"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PATTERNS: tuple[str, ...] = get_args(Pattern)
Compression = Literal["none", "zlib", "zstd", "mt"]
SaveFormat = Literal["raw", "sparse"]
NIC_MODELS: tuple[str, ...] = get_args(NicModel)
# Storage modes of the guest's disk (see GuestDiskSection).
DiskStorage = Literal["shared", "local", "copy"]
DISK_STORAGES: tuple[str, ...] = get_args(DiskStorage)

# Guest memory that the working set cannot use, because the guest kernel and
# the initramfs that carries the workload live there.
GUEST_HEADROOM_MIB = 48

ExperimentName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
MemoryMiB = Annotated[int, Field(gt=0)]
Vcpus = Annotated[int, Field(ge=1)]
WorkingSetMiB = Annotated[int, Field(gt=0)]
# 0 means that the workload dirties memory as fast as the guest can.
DirtyRateMiBs = Annotated[float, Field(ge=0, allow_inf_nan=False)]
BandwidthMiBs = Annotated[int, Field(gt=0)]
DowntimeLimitMs = Annotated[int, Field(gt=0)]
MaxTimeS = Annotated[int, Field(gt=0)]
PostcopyAfterIterations = Annotated[int, Field(ge=1)]
# Size of the guest's disk. The harness writes every byte of it before the
# guest boots, so the limit keeps that step and the copy to a few minutes.
MAX_DISK_MIB = 16384
DiskSizeMiB = Annotated[int, Field(gt=0, le=MAX_DISK_MIB)]
# Rate of the shaped migration link in MiB/s; None leaves the link unshaped.
LinkRateMiBs = Annotated[int, Field(gt=0)]
ScenarioId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=200)]
# Tuning fields of single strategies; lab.strategies.STRATEGY_FIELDS maps each to its strategies.
Percent = Annotated[int, Field(ge=1, le=100)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
CompressionLevel = Annotated[int, Field(ge=0)]
# QEMU takes 1 to 255 multifd channels.
MultifdChannels = Annotated[int, Field(ge=1, le=255)]
# QEMU takes x-vcpu-dirty-limit-period from 1 to 1000 ms.
DirtyLimitPeriodMs = Annotated[int, Field(ge=1, le=1000)]

# Scenario fields in id order, each with the playbook section that sets its base value.
SCENARIO_FIELDS: dict[str, str] = {
    "strategy": "migration",
    "memory_mib": "guest",
    "vcpus": "guest",
    "nic_model": "guest",
    "disk_size_mib": "guest",
    "disk_storage": "guest",
    "working_set_mib": "workload",
    "dirty_rate_mib_s": "workload",
    "pattern": "workload",
    "bandwidth_mib_s": "migration",
    "downtime_limit_ms": "migration",
    "max_time_s": "migration",
    "postcopy_after_iterations": "migration",
    "link_rate_mib_s": "link",
    "fault": "migration",
}

# Scenario fields whose attribute in their section has another name.
_SECTION_ATTRIBUTES = {"link_rate_mib_s": "rate_mib_s"}
# Scenario fields set in the guest's disk mapping (guest.disk), with their key there.
_DISK_ATTRIBUTES = {"disk_size_mib": "size_mib", "disk_storage": "storage"}

# Fields without a usable default: the base section or the matrix must set them.
REQUIRED_FIELDS = ("strategy", "memory_mib", "working_set_mib", "dirty_rate_mib_s")

# Scenario id parts: a prefix before the value, and the word that stands for null.
_ID_PREFIX = {
    "strategy": "", "memory_mib": "mem", "vcpus": "cpu", "nic_model": "", "disk_size_mib": "disk",
    "disk_storage": "disk-", "working_set_mib": "ws",
    "dirty_rate_mib_s": "rate", "pattern": "", "bandwidth_mib_s": "bw",
    "downtime_limit_ms": "dt", "max_time_s": "max", "postcopy_after_iterations": "pc",
    "link_rate_mib_s": "link", "fault": "fault-",
}
_ID_NULL = {"bandwidth_mib_s": "unlimited", "downtime_limit_ms": "default",
            "postcopy_after_iterations": "off", "link_rate_mib_s": "unshaped", "fault": "none",
            "disk_size_mib": "none", "disk_storage": "none"}

# Strategy tuning fields (lab.strategies), all set in the migration section.
SCENARIO_FIELDS.update(dict.fromkeys(STRATEGY_FIELDS, "migration"))
_ID_PREFIX.update({
    "postcopy_after_s": "pcs", "postcopy_bandwidth_mib_s": "pcbw", "auto_converge_initial_pct": "aci",
    "auto_converge_increment_pct": "acs", "dirty_limit_mib_s": "dl", "dirty_limit_period_ms": "dlp",
    "xbzrle_cache_mib": "xc", "multifd_channels": "ch", "compression": "", "compression_level": "lvl",
    "zerocopy": "zc", "downtime_step_ms": "dtstep", "downtime_step_after_s": "dtafter",
    "downtime_max_ms": "dtmax", "save_format": "", "save_parallel_channels": "savech",
})
_ID_NULL.update({
    "postcopy_after_s": "off", "postcopy_bandwidth_mib_s": "unlimited",
    "auto_converge_initial_pct": "default", "auto_converge_increment_pct": "default",
    "dirty_limit_mib_s": "default", "dirty_limit_period_ms": "default", "xbzrle_cache_mib": "default",
    "multifd_channels": "default", "compression_level": "default", "downtime_step_ms": "off",
    "downtime_step_after_s": "off", "downtime_max_ms": "off", "save_format": "auto",
    "save_parallel_channels": "off",
})

_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)


class StrategyTuning(BaseModel):
    """Tuning of single strategies and the fault, shared by the migration section and Scenario.

    Each tuning field applies only to the strategies that
    lab.strategies.STRATEGY_FIELDS lists for it. None means QEMU's or
    libvirt's default.
    """

    model_config = _CONFIG

    postcopy_after_s: PositiveSeconds | None = None
    postcopy_bandwidth_mib_s: BandwidthMiBs | None = None
    auto_converge_initial_pct: Percent | None = None
    auto_converge_increment_pct: Percent | None = None
    dirty_limit_mib_s: PositiveInt | None = None
    dirty_limit_period_ms: DirtyLimitPeriodMs | None = None
    xbzrle_cache_mib: PositiveInt | None = None
    multifd_channels: MultifdChannels | None = None
    compression: Compression = "none"
    compression_level: CompressionLevel | None = None
    zerocopy: bool = False
    downtime_step_ms: PositiveInt | None = None
    downtime_step_after_s: PositiveSeconds | None = None
    downtime_max_ms: PositiveInt | None = None
    save_format: SaveFormat | None = None
    save_parallel_channels: PositiveInt | None = None
    # A fault struck during the migration (lab.faults); None runs without one.
    fault: FaultSpec | None = None


class Scenario(StrategyTuning):
    """One point of the experiment matrix: every setting a run needs.

    ``scenario_id`` defaults to the strategy name when the scenario is built by
    hand. Playbook.scenarios() sets it from the matrix values.
    """

    model_config = _CONFIG

    scenario_id: ScenarioId
    strategy: Strategy
    memory_mib: MemoryMiB
    vcpus: Vcpus
    working_set_mib: WorkingSetMiB
    dirty_rate_mib_s: DirtyRateMiBs
    pattern: Pattern
    bandwidth_mib_s: BandwidthMiBs | None
    downtime_limit_ms: DowntimeLimitMs | None
    max_time_s: MaxTimeS
    postcopy_after_iterations: PostcopyAfterIterations | None
    link_rate_mib_s: LinkRateMiBs | None = None
    nic_model: NicModel = "e1000"
    # The guest's disk (GuestDiskSection); None for both boots a diskless guest.
    disk_size_mib: DiskSizeMiB | None = None
    disk_storage: DiskStorage | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "scenario_id" not in data:
            data = {**data, "scenario_id": data.get("strategy")}
        return data

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Scenario:
        problems = cross_field_problems(self.values())
        if problems:
            raise ValueError("; ".join(f"{message}. {fix}" for _, message, fix in problems))
        return self

    def values(self) -> dict[str, Any]:
        """Return the settings as a plain dict, without the scenario id."""
        return self.model_dump(exclude={"scenario_id"})


def cross_field_problems(values: dict[str, Any]) -> list[tuple[tuple[str, ...], str, str]]:
    """Check rules that involve more than one scenario field.

    Returns (fields involved, message, fix) per broken rule. The values must
    already be valid one by one.
    """
    problems = []
    memory_mib = values["memory_mib"]
    working_set_mib = values["working_set_mib"]
    usable_mib = memory_mib - GUEST_HEADROOM_MIB
    if working_set_mib > usable_mib:
        problems.append((
            ("working_set_mib", "memory_mib"),
            f"working set of {working_set_mib} MiB does not fit in a {memory_mib} MiB guest, "
            f"which leaves at most {usable_mib} MiB after {GUEST_HEADROOM_MIB} MiB for the guest "
            f"kernel and initramfs",
            "Lower working_set_mib or raise memory_mib",
        ))

    strategy = values["strategy"]
    after_iterations = values["postcopy_after_iterations"]
    if strategy == "hybrid" and after_iterations is None and values.get("postcopy_after_s") is None:
        problems.append((
            ("strategy", "postcopy_after_iterations"),
            "the hybrid strategy needs postcopy_after_iterations or postcopy_after_s",
            "Set migration.postcopy_after_iterations to the number of precopy iterations "
            "before the switch to postcopy, or migration.postcopy_after_s to the seconds before it",
        ))
    if strategy != "hybrid" and after_iterations is not None:
        problems.append((
            ("strategy", "postcopy_after_iterations"),
            f"postcopy_after_iterations applies only to the hybrid strategy, not to {strategy}",
            "List postcopy_after_iterations values only for hybrid runs, or use null",
        ))
    problems += disk_problems(values)
    problems += strategy_problems(values)
    for message in fault_strategy_problems(values.get("fault"), strategy):
        problems.append((("strategy", "fault"), message,
                         "Use at_s, at_progress_pct or at_iteration, or list this fault only for postcopy runs"))
    return problems


class LabSection(BaseModel):
    """Size of the local lab. The source host is h1 and the destination h2."""

    model_config = _CONFIG
    hosts: Annotated[int, Field(ge=2)] = 2


def disk_problems(values: dict[str, Any]) -> list[tuple[tuple[str, ...], str, str]]:
    """Check the guest disk of one scenario against its strategy; return (fields, message, fix) per problem."""
    size, storage = values.get("disk_size_mib"), values.get("disk_storage")
    problems = []
    if storage is not None and size is None:
        problems.append((
            ("disk_storage", "disk_size_mib"),
            f"disk_storage {storage} needs a guest disk, and this scenario has none",
            "Set guest.disk.size_mib, or list disk_size_mib values in the matrix without null",
        ))
    if values["strategy"] == "flushing" and storage in ("local", "copy"):
        problems.append((
            ("disk_storage", "strategy"),
            f"the flushing strategy restores the guest on the destination from a save file and copies no "
            f"disk, so disk_storage {storage} cannot work with it",
            "Use disk_storage shared for flushing runs",
        ))
    return problems


class GuestDiskSection(BaseModel):
    """A disk for the guest (virtio-blk, raw file), created for each run and removed after it.

    shared: one file in a folder both hosts see, so only memory moves.
    local: the file exists on the source host only, and a plain migration
    fails. copy: a file on each host, and libvirt copies the disk over NBD
    during the migration (VIR_MIGRATE_NON_SHARED_DISK).
    """

    model_config = _CONFIG
    size_mib: DiskSizeMiB
    storage: DiskStorage = "shared"


class GuestSection(BaseModel):
    model_config = _CONFIG
    memory_mib: MemoryMiB | None = None
    vcpus: Vcpus = 1
    # e1000: QEMU sends RARP announcements after the switch-over. virtio: the
    # guest's virtio-net driver sends gratuitous ARP when QEMU asks it to.
    nic_model: NicModel = "e1000"
    # None boots a diskless guest, as every playbook without this key does.
    disk: GuestDiskSection | None = None


class WorkloadSection(BaseModel):
    model_config = _CONFIG
    working_set_mib: WorkingSetMiB | None = None
    dirty_rate_mib_s: DirtyRateMiBs | None = None
    pattern: Pattern = "random"


class MigrationSection(StrategyTuning):
    """Base migration settings. A null bandwidth is unlimited, a null downtime limit QEMU's default."""

    model_config = _CONFIG
    strategy: Strategy | None = None
    bandwidth_mib_s: BandwidthMiBs | None = None
    downtime_limit_ms: DowntimeLimitMs | None = None
    max_time_s: MaxTimeS = 300
    postcopy_after_iterations: PostcopyAfterIterations | None = None


class LinkSection(BaseModel):
    """Shaping of the migration link: a token bucket (tc tbf) on each libvirt host's migration interface.

    A null rate leaves the link as it is. The shaping is applied before each
    run and removed after it, so a run can compare a link rate with QEMU's
    own bandwidth cap (migration.bandwidth_mib_s).
    """

    model_config = _CONFIG
    rate_mib_s: LinkRateMiBs | None = None


class EchoProbeSection(BaseModel):
    """UDP echo requests from the client host to the guest, one every 1 / rate_hz seconds."""

    model_config = _CONFIG
    enabled: bool = True
    rate_hz: Annotated[float, Field(gt=0, le=10000, allow_inf_nan=False)] = 1000.0


class StreamProbeSection(BaseModel):
    """A TCP connection from the client host that streams records the guest echoes back."""

    model_config = _CONFIG
    enabled: bool = True
    rate_kib_s: Annotated[float, Field(gt=0, le=10240, allow_inf_nan=False)] = 64.0


class CaptureProbeSection(BaseModel):
    """Frames of the guest's MAC address on the lab switch's ports, to time the announcements."""

    model_config = _CONFIG
    enabled: bool = True


class ProbesSection(BaseModel):
    """Measurements taken from outside the guest during each run; all run unless turned off here."""

    model_config = _CONFIG
    echo: EchoProbeSection = EchoProbeSection()
    stream: StreamProbeSection = StreamProbeSection()
    capture: CaptureProbeSection = CaptureProbeSection()
    # Time the probes run before the migration call, so that round trips and
    # guest throughput have a baseline, in seconds.
    baseline_s: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False)] = 3.0
    # From the start of the probes until the guest must have answered, in seconds.
    ready_timeout_s: Annotated[int, Field(gt=0)] = 30


class TimeoutsSection(BaseModel):
    """Timeouts in seconds."""

    model_config = _CONFIG
    # From guest start until its workload reports.
    guest_boot_s: Annotated[int, Field(gt=0)] = 60
    # After migration, until the guest's workload has reported on the host that runs it.
    integrity_s: Annotated[int, Field(gt=0)] = 30
    # From a fault's strike until the migration must have ended by itself;
    # then the harness aborts it (postcopy: pauses it for recovery).
    fault_settle_s: Annotated[int, Field(gt=0)] = 30
    # From that abort until virDomainMigrate3 must have returned.
    fault_abort_s: Annotated[int, Field(gt=0)] = 30
    # From the postcopy resume command until QEMU reports the migration completed.
    postcopy_recovery_s: Annotated[int, Field(gt=0)] = 60
    # For a killed libvirtd to be started again and accept connections.
    daemon_restart_s: Annotated[int, Field(gt=0)] = 90


class Playbook(BaseModel):
    """A validated playbook. Build it with load_playbook() to get path and sha256."""

    model_config = _CONFIG

    experiment: ExperimentName
    description: str = ""
    lab: LabSection = LabSection()
    guest: GuestSection = GuestSection()
    workload: WorkloadSection = WorkloadSection()
    migration: MigrationSection = MigrationSection()
    link: LinkSection = LinkSection()
    # "local" runs on the local lab through its namespaces, "local-ssh" on the
    # local lab through SSH, and any other value is the path of an inventory
    # file, relative to the playbook's folder.
    inventory: Annotated[str, Field(min_length=1)] = "local"
    matrix: dict[str, list[Any]] = {}
    repetitions: Annotated[int, Field(ge=1)] = 1
    probes: ProbesSection = ProbesSection()
    timeouts: TimeoutsSection = TimeoutsSection()

    _path: Path | None = PrivateAttr(None)
    _sha256: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_matrix_and_scenarios(self, info: ValidationInfo) -> Playbook:
        return _run_semantic_checks(self, info, lambda: _matrix_problems(self.matrix) or _scenario_problems(self))

    @property
    def path(self) -> Path | None:
        """File the playbook was loaded from, or None when built in code."""
        return self._path

    @property
    def sha256(self) -> str | None:
        """SHA-256 hex digest of the file bytes, or None when built in code."""
        return self._sha256

    def base_values(self) -> dict[str, Any]:
        """Return the scenario fields as the base sections set them."""
        sections = {"guest": self.guest, "workload": self.workload, "migration": self.migration,
                    "link": self.link}
        values = {}
        for name, section in SCENARIO_FIELDS.items():
            if name in _DISK_ATTRIBUTES:
                disk = self.guest.disk
                values[name] = None if disk is None else getattr(disk, _DISK_ATTRIBUTES[name])
            else:
                values[name] = getattr(sections[section], _SECTION_ATTRIBUTES.get(name, name))
        return values

    def scenarios(self) -> list[Scenario]:
        """Expand the matrix into scenarios.

        The order is the cartesian product in matrix key order, with the first
        key varying slowest.
        """
        return [Scenario.model_validate({**values, "scenario_id": scenario_id})
                for scenario_id, values in _expand(self)]

    def runs(self) -> Iterator[tuple[Scenario, int]]:
        """Yield (scenario, repetition) pairs in execution order.

        Repetition is the outer loop, so an interrupted experiment has results
        for every scenario as early as possible. Repetitions count from 1.
        """
        scenarios = self.scenarios()
        for repetition in range(1, self.repetitions + 1):
            for scenario in scenarios:
                yield scenario, repetition


class ConfigFileError(ConfigError):
    """All problems found in one YAML file, with one ConfigError per problem in ``errors``."""

    kind = "file"

    def __init__(self, errors: list[ConfigError], path: str):
        self.errors = list(errors)
        if len(self.errors) == 1:
            first = self.errors[0]
            super().__init__(first.args[0], path=first.path, field=first.field, value=first.value,
                             fix=first.fix, line=first.line)
        else:
            listing = "\n".join(f"  - {error}" for error in self.errors)
            super().__init__(f"invalid {self.kind}, {len(self.errors)} errors:\n{listing}", path=path)


class PlaybookError(ConfigFileError):
    """All problems found in one playbook."""

    kind = "playbook"


@dataclass(frozen=True)
class _Problem:
    """A problem before it gets a line number: field path, message, value, fix."""

    loc: tuple[str | int, ...]
    message: str
    value: Any = None
    fix: str | None = None

    def key(self) -> tuple:
        return (self.loc, self.message)


def _base_loc(name: str) -> tuple[str, ...]:
    """Return the (section, key) that sets the base value of scenario field ``name``."""
    if name in _DISK_ATTRIBUTES:
        return ("guest", "disk", _DISK_ATTRIBUTES[name])
    return (SCENARIO_FIELDS[name], _SECTION_ATTRIBUTES.get(name, name))


def _run_semantic_checks(model: BaseModel, info: ValidationInfo, find_problems: Callable[[], list[_Problem]]):
    """Return *model*, or raise ValueError with the problems that *find_problems* returns.

    A model built in code gets these checks here. The file loaders skip them
    here (context ``skip_semantic_checks``) and run them to attach line numbers.
    """
    if info.context and info.context.get("skip_semantic_checks"):
        return model
    problems = find_problems()
    if problems:
        raise ValueError("; ".join(f"{_format_loc(p.loc)}: {p.message}" for p in problems))
    return model


def _format_loc(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _field_adapter(name: str) -> TypeAdapter:
    field = Scenario.model_fields[name]
    annotation = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation, config=ConfigDict(strict=True))


_FIELD_ADAPTERS = {name: _field_adapter(name) for name in SCENARIO_FIELDS}


def _close_match(word: Any, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _model_at(loc: tuple[str | int, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """Return the model that validates the mapping at ``loc`` below ``root`` (the Playbook by default)."""
    model: type[BaseModel] = root or Playbook
    for part in loc:
        if isinstance(part, int):
            # An index into a list of models: the model stays the list's item model.
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if get_origin(annotation) in (Union, UnionType):
            # An optional mapping such as guest.disk: its model is the non-None member.
            members = [member for member in get_args(annotation) if member is not type(None)]
            annotation = members[0] if len(members) == 1 else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


_TYPE_NAMES = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
    "bool_type": "true or false", "dict_type": "a mapping", "model_type": "a mapping",
    "list_type": "a list",
}


def _describe_pydantic_error(error: dict[str, Any],
                             root: type[BaseModel] | None = None) -> tuple[str, str | None]:
    """Turn one pydantic error into (message, fix); ``root`` is the model validated (the Playbook by default)."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc = error["loc"]
    field = loc[-1] if loc else None

    if kind == "missing":
        return "required key is missing", "Add it"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], root)
        names = sorted(model.model_fields) if model else []
        match = _close_match(field, names)
        fix = f"Did you mean '{match}'?" if match else f"Valid keys: {', '.join(names)}"
        return "unknown key", fix
    if kind == "literal_error":
        is_strategy = field == "strategy" or loc[:2] == ("matrix", "strategy")
        message = "unknown strategy" if is_strategy else "invalid value"
        return message, f"Allowed: {ctx.get('expected')}"

    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}", None
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}", None
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}", None
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}", None
    if kind == "finite_number":
        return "must be a finite number", None
    if kind == "string_pattern_mismatch":
        return ("invalid name", "Use lowercase letters, digits, '_' and '-', starting with a "
                "letter or digit")
    if kind == "string_too_long":
        return f"longer than {ctx['max_length']} characters", None
    return error["msg"], None


def _pydantic_problems(exc: ValidationError, prefix: tuple[str | int, ...] = (),
                       root: type[BaseModel] | None = None) -> list[_Problem]:
    problems = []
    for error in exc.errors():
        loc = prefix + tuple(error["loc"])
        message, fix = _describe_pydantic_error({**error, "loc": loc}, root)
        if error["type"] == "extra_forbidden":
            value = loc[-1]
        elif error["type"] == "missing":
            value = None
        else:
            value = error.get("input")
        problems.append(_Problem(loc, message, value, fix))
    return problems


def _matrix_problems(matrix: Any) -> list[_Problem]:
    """Check matrix keys and values one by one; structure errors are pydantic's."""
    if not isinstance(matrix, dict):
        return []
    problems = []
    allowed = list(SCENARIO_FIELDS)
    for key, values in matrix.items():
        if not isinstance(key, str) or not isinstance(values, list):
            continue
        if key not in SCENARIO_FIELDS:
            match = _close_match(key, allowed)
            fix = (f"Did you mean '{match}'? " if match else "") + f"Allowed: {', '.join(allowed)}"
            problems.append(_Problem(("matrix", key), "unknown matrix key", key, fix))
            continue
        if not values:
            problems.append(_Problem(("matrix", key), "empty list", values,
                                     "Give at least one value or remove the key"))
            continue
        adapter = _FIELD_ADAPTERS[key]
        seen: dict[Any, int] = {}
        for index, value in enumerate(values):
            try:
                valid = adapter.validate_python(value)
            except ValidationError as exc:
                problems.extend(_pydantic_problems(exc, ("matrix", key, index)))
                continue
            if valid in seen:
                problems.append(_Problem(("matrix", key, index), f"duplicate of matrix.{key}"
                                         f"[{seen[valid]}]", value, "List each value once"))
            else:
                seen[valid] = index
    return problems


def _combination_label(combination: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in combination.items())


def _scenario_problems(playbook: Playbook) -> list[_Problem]:
    """Check what only the merged scenarios show: required fields and cross-field rules."""
    base = playbook.base_values()
    matrix = playbook.matrix
    problems = []
    for name in REQUIRED_FIELDS:
        if base[name] is None and name not in matrix:
            problems.append(_Problem(_base_loc(name), "required key is missing",
                                     None, f"Set it here or list its values under matrix.{name}"))
    if problems:
        return problems

    after_iterations = base["postcopy_after_iterations"]
    hybrid_listed = "hybrid" in matrix.get("strategy", [base["strategy"]])
    if after_iterations is not None and not hybrid_listed:
        problems.append(_Problem(("migration", "postcopy_after_iterations"),
                                 "applies only to the hybrid strategy, and no scenario uses it",
                                 after_iterations, "Remove it or add hybrid to matrix.strategy"))
    listed = matrix.get("strategy", [base["strategy"]])
    for name, value in unused_base_fields(base, listed):
        users = ", ".join(strategy for strategy in STRATEGY_FIELDS[name] if value_applies(name, value, strategy))
        problems.append(_Problem(_base_loc(name), f"applies only to {users}, and no scenario uses it",
                                 value, f"Remove it or add one of {users} to matrix.strategy"))

    seen: set[tuple] = set()
    for combination, values in _combinations(playbook):
        for fields, message, fix in cross_field_problems(values):
            if any(name in combination for name in fields):
                problem = _Problem(("matrix",),
                                   f"scenario {_combination_label(combination)}: {message}",
                                   None, fix)
            else:
                name = fields[0]
                problem = _Problem(_base_loc(name), message, base[name], fix)
            if problem.key() not in seen:
                seen.add(problem.key())
                problems.append(problem)
    return problems


def _combinations(playbook: Playbook) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (matrix values, merged scenario values) in matrix order.

    A base postcopy_after_iterations applies only to hybrid scenarios, and a
    base value of any strategy tuning field only to the strategies that use it
    (lab.strategies), so that one playbook can compare strategies. A scenario
    without a disk (disk_size_mib null) drops the base disk_storage, and one
    with a disk but no storage mode gets shared.
    """
    base = playbook.base_values()
    keys = list(playbook.matrix)
    for picked in itertools.product(*(playbook.matrix[key] for key in keys)):
        combination = {key: _FIELD_ADAPTERS[key].validate_python(value)
                       for key, value in zip(keys, picked)}
        values = {**base, **combination}
        if values["strategy"] != "hybrid" and "postcopy_after_iterations" not in combination:
            values["postcopy_after_iterations"] = None
        if values["disk_size_mib"] is None and "disk_storage" not in combination:
            values["disk_storage"] = None
        elif values["disk_size_mib"] is not None and values["disk_storage"] is None:
            values["disk_storage"] = GuestDiskSection.model_fields["storage"].default
        values = reset_inapplicable(values, keep=set(combination))
        yield combination, values


def _format_id_value(name: str, value: Any) -> str:
    if value is None:
        text = _ID_NULL.get(name, "none")
    elif isinstance(value, FaultSpec):
        text = value.id_text()
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, float):
        text = f"{value:g}".replace(".", "p").replace("+", "")
    else:
        text = str(value)
    return _ID_PREFIX[name] + text


def _expand(playbook: Playbook) -> list[tuple[str, dict[str, Any]]]:
    """Return (scenario_id, values) per scenario.

    Ids join the matrix values in matrix order. Ids that collide, which only
    happens when rounding makes two float values look alike, get a hash of
    the scenario values as suffix.
    """
    pairs = []
    for combination, values in _combinations(playbook):
        if combination:
            scenario_id = "-".join(_format_id_value(name, value)
                                   for name, value in combination.items())
        else:
            scenario_id = values["strategy"]
        pairs.append((scenario_id, values))

    counts: dict[str, int] = {}
    for scenario_id, _ in pairs:
        counts[scenario_id] = counts.get(scenario_id, 0) + 1
    unique = []
    for scenario_id, values in pairs:
        if counts[scenario_id] > 1:
            digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
            scenario_id = f"{scenario_id}-{digest[:8]}"
        unique.append((scenario_id, values))
    return unique


def _plain(node: Any) -> Any:
    """Convert ruamel.yaml round-trip nodes to plain Python values."""
    if isinstance(node, dict):
        return {_plain(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _line_of(document: Any, loc: tuple[str | int, ...]) -> int | None:
    """Return the 1-based line of the deepest part of loc found in the document."""
    node = document
    line = None
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0]
        elif (isinstance(node, CommentedSeq) and isinstance(part, int)
              and 0 <= part < len(node)):
            line = node.lc.item(part)[0]
        else:
            break
        node = node[part]
    return None if line is None else line + 1


def _read_yaml(path: Path, kind: str = "playbook",
               missing_fix: str = "Check the path, or start from playbooks/quickstart.yaml") -> tuple[bytes, Any]:
    """Read a YAML file of the given ``kind`` with ruamel's round-trip loader, which keeps line numbers."""
    where = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{kind} not found", path=where, fix=missing_fix) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {kind}: {exc.strerror}", path=where) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", path=where,
                          fix="Save the file as UTF-8") from None
    try:
        document = YAML(typ="rt").load(text)
    except YAMLError as exc:
        line = None
        if isinstance(exc, MarkedYAMLError) and exc.problem_mark is not None:
            line = exc.problem_mark.line + 1
        message = " ".join(part for part in (getattr(exc, "context", None),
                                             getattr(exc, "problem", None)) if part)
        raise ConfigError(f"invalid YAML: {message or exc}", path=where, line=line,
                          fix="Fix the YAML syntax") from None
    return data, document


def _file_error(error_class: type[ConfigFileError], problems: list[_Problem], document: Any,
                where: str) -> ConfigFileError:
    """Build one error of ``error_class`` from the problems, each with its line in ``document``."""
    errors = [ConfigError(problem.message, path=where, field=_format_loc(problem.loc),
                          value=problem.value, fix=problem.fix,
                          line=_line_of(document, problem.loc))
              for problem in problems]
    errors.sort(key=lambda error: error.line or 0)
    return error_class(errors, where)


def load_playbook(path: str | Path) -> Playbook:
    """Read and validate a playbook.

    Raises PlaybookError, a ConfigError, listing every problem found, each
    with file, line, field path, value and the allowed values.
    """
    path = Path(path)
    where = str(path)
    data, document = _read_yaml(path)
    if document is None:
        raise ConfigError("playbook is empty", path=where,
                          fix="Start from playbooks/quickstart.yaml")
    if not isinstance(document, CommentedMap):
        raise ConfigError("top level must be a mapping of keys such as experiment and matrix",
                          path=where, line=1, value=type(document).__name__)

    raw = _plain(document)
    problems: list[_Problem] = []
    playbook = None
    try:
        playbook = Playbook.model_validate(raw, context={"skip_semantic_checks": True})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc))
    problems.extend(_matrix_problems(raw.get("matrix")))
    if playbook is not None and not problems:
        problems.extend(_scenario_problems(playbook))

    if problems:
        raise _file_error(PlaybookError, problems, document, where)

    playbook._path = path
    playbook._sha256 = hashlib.sha256(data).hexdigest()
    log.debug("loaded playbook %s: experiment %s, %d scenarios", path, playbook.experiment,
              len(playbook.scenarios()))
    return playbook
