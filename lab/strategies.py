"""Strategies and the scenario fields that tune them, with their validation rules.

A strategy names how memory moves. The plain ones (stop-and-copy, precopy,
postcopy, hybrid) are the mechanisms of the course notes. The others are
precopy or postcopy with one QEMU feature or policy switched on, so a
playbook can compare them all in one ``strategy`` list:

downtime-steps    precopy whose maximum downtime is raised step by step without progress
auto-converge     precopy that throttles the vCPUs more each iteration
dirty-limit       precopy that caps each vCPU's dirty page rate (needs KVM)
xbzrle            precopy that sends XOR deltas of pages it sent before
multifd           precopy over several connections, optionally compressed
postcopy-preempt  postcopy with a separate channel for page requests
flushing          the guest saved to a file both hosts see, restored on the destination

Each tuning field applies to some strategies only (STRATEGY_FIELDS). A base
value of such a field applies to the scenarios whose strategy uses it, so one
playbook can give xbzrle a cache size and still list precopy. This module
has no libvirt dependency: the playbook loader uses it.
"""

from __future__ import annotations

from typing import Any

STRATEGY_NAMES = ("stop-and-copy", "precopy", "downtime-steps", "auto-converge", "dirty-limit", "xbzrle", "multifd",
                  "postcopy", "postcopy-preempt", "hybrid", "flushing")

# Strategies with a live precopy phase, where a downtime limit acts.
PRECOPY_PHASE = ("precopy", "downtime-steps", "auto-converge", "dirty-limit", "xbzrle", "multifd", "hybrid")
# Strategies that switch to postcopy.
POSTCOPY_STRATEGIES = ("postcopy", "postcopy-preempt", "hybrid")

# Tuning field -> strategies it applies to.
STRATEGY_FIELDS: dict[str, tuple[str, ...]] = {
    "postcopy_after_iterations": ("hybrid",),
    "postcopy_after_s": ("hybrid",),
    "postcopy_bandwidth_mib_s": POSTCOPY_STRATEGIES,
    "auto_converge_initial_pct": ("auto-converge",),
    "auto_converge_increment_pct": ("auto-converge",),
    "dirty_limit_mib_s": ("dirty-limit",),
    "dirty_limit_period_ms": ("dirty-limit",),
    "xbzrle_cache_mib": ("xbzrle",),
    "multifd_channels": ("multifd",),
    "compression": ("multifd", "precopy"),
    "compression_level": ("multifd", "precopy"),
    "zerocopy": ("multifd",),
    "downtime_step_ms": ("downtime-steps",),
    "downtime_step_after_s": ("downtime-steps",),
    "downtime_max_ms": ("downtime-steps",),
    "save_format": ("flushing",),
    "save_parallel_channels": ("flushing",),
}

# The value of a tuning field that means "not set".
FIELD_OFF_VALUES: dict[str, Any] = {name: None for name in STRATEGY_FIELDS}
FIELD_OFF_VALUES.update({"compression": "none", "zerocopy": False})

COMPRESSION_METHODS = ("none", "zlib", "zstd", "mt")
# Strategies each compression method works with: zlib and zstd compress multifd
# channels, mt is QEMU's old multi-threaded compression of the main stream.
COMPRESSION_STRATEGIES = {"zlib": ("multifd",), "zstd": ("multifd",), "mt": ("precopy",)}
# Valid compression levels per method: QEMU's multifd-zlib-level is 0 to 9,
# multifd-zstd-level 0 to 20 and the old compress-level 0 to 9.
COMPRESSION_LEVELS = {"zlib": (0, 9), "zstd": (0, 20), "mt": (0, 9)}
SAVE_FORMATS = ("raw", "sparse")
DOWNTIME_POLICY_FIELDS = ("downtime_step_ms", "downtime_step_after_s", "downtime_max_ms")

Problem = tuple[tuple[str, ...], str, str]


def field_applies(name: str, strategy: str) -> bool:
    """Return True when scenario field *name* has an effect under *strategy*."""
    strategies = STRATEGY_FIELDS.get(name)
    return strategies is None or strategy in strategies


def is_off(name: str, value: Any) -> bool:
    return value == FIELD_OFF_VALUES[name]


def value_applies(name: str, value: Any, strategy: str) -> bool:
    """Return True when *value* of field *name* has an effect under *strategy*.

    The compression method decides where compression applies: zlib and zstd
    to multifd, mt to precopy.
    """
    if name == "compression":
        return value == "none" or strategy in COMPRESSION_STRATEGIES[value]
    return field_applies(name, strategy)


def reset_inapplicable(values: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """Turn off the tuning fields that *values*' strategy does not use, except those in *keep*.

    *keep* contains the fields a matrix sets explicitly: a value listed there for
    the wrong strategy is an error, not something to drop silently.
    """
    strategy = values["strategy"]
    result = dict(values)
    for name in STRATEGY_FIELDS:
        if name in result and name not in keep and not value_applies(name, result[name], strategy):
            result[name] = FIELD_OFF_VALUES[name]
    if result.get("compression") == "none" and "compression_level" not in keep:
        result["compression_level"] = None
    return result


def unused_base_fields(base: dict[str, Any], strategies: list[str]) -> list[tuple[str, Any]]:
    """List the (field, value) pairs set in the base sections that no listed strategy uses."""
    unused = []
    for name in STRATEGY_FIELDS:
        if name == "postcopy_after_iterations" or name not in base or is_off(name, base[name]):
            continue
        if not any(value_applies(name, base[name], strategy) for strategy in strategies):
            unused.append((name, base[name]))
    return unused


def strategy_problems(values: dict[str, Any]) -> list[Problem]:
    """Check the tuning fields of one scenario against its strategy and each other.

    Returns (fields involved, message, fix) per broken rule; *values* must
    already be valid one by one. The hybrid rules on postcopy_after_iterations
    are checked by the playbook module itself.
    """
    strategy = values["strategy"]
    problems: list[Problem] = []
    for name, strategies in STRATEGY_FIELDS.items():
        if name == "postcopy_after_iterations" or name not in values:
            continue
        if name == "compression":
            continue  # its values have their own rules below
        if not is_off(name, values[name]) and strategy not in strategies:
            problems.append(((name, "strategy"),
                             f"{name} applies only to {_join(strategies)}, not to {strategy}",
                             f"List {name} values only for those strategies, or leave it unset"))
    problems += _compression_problems(values)
    problems += _downtime_policy_problems(values)
    problems += _hybrid_problems(values)
    problems += _flushing_problems(values)
    return problems


def _compression_problems(values: dict[str, Any]) -> list[Problem]:
    strategy = values["strategy"]
    method = values.get("compression", "none")
    level = values.get("compression_level")
    problems: list[Problem] = []
    if method in ("zlib", "zstd") and strategy != "multifd":
        problems.append((("compression", "strategy"),
                         f"{method} compression works only with the multifd strategy, not with {strategy}",
                         "Use strategy multifd, or compression none"))
    if method == "mt" and strategy != "precopy":
        problems.append((("compression", "strategy"),
                         f"multi-threaded (mt) compression applies only to precopy, not to {strategy}",
                         "Use strategy precopy, or compression none"))
    if level is not None:
        if method == "none":
            problems.append((("compression_level", "compression"),
                             "compression_level needs a compression method",
                             "Set compression to zlib or zstd (multifd) or mt (precopy)"))
        else:
            low, high = COMPRESSION_LEVELS[method]
            if not low <= level <= high:
                problems.append((("compression_level", "compression"),
                                 f"{method} compression levels run from {low} to {high}, not {level}",
                                 f"Pick a level from {low} to {high}"))
    if values.get("zerocopy") and method != "none":
        problems.append((("zerocopy", "compression"),
                         "zero-copy send works only without compression, because QEMU sends "
                         "guest pages straight from guest memory",
                         "Set compression to none, or zerocopy to false"))
    return problems


def _downtime_policy_problems(values: dict[str, Any]) -> list[Problem]:
    settings = {name: values.get(name) for name in DOWNTIME_POLICY_FIELDS}
    present = [name for name, value in settings.items() if value is not None]
    if values["strategy"] != "downtime-steps":
        return []
    if len(present) != len(DOWNTIME_POLICY_FIELDS):
        missing = [name for name in DOWNTIME_POLICY_FIELDS if name not in present]
        return [(tuple(DOWNTIME_POLICY_FIELDS),
                 f"the downtime-steps strategy needs all of {', '.join(DOWNTIME_POLICY_FIELDS)}; "
                 f"{', '.join(missing)} is missing",
                 "Set the step, the time without progress before a step, and the maximum")]
    start = values.get("downtime_limit_ms") or 300  # QEMU's default downtime-limit is 300 ms
    if settings["downtime_max_ms"] <= start:
        return [(("downtime_max_ms", "downtime_limit_ms"),
                 f"downtime_max_ms {settings['downtime_max_ms']} is not above the starting downtime "
                 f"limit of {start} ms, so the policy could never raise it",
                 "Raise downtime_max_ms above downtime_limit_ms (300 ms when unset)")]
    return []


def _hybrid_problems(values: dict[str, Any]) -> list[Problem]:
    if values["strategy"] != "hybrid":
        return []
    if values.get("postcopy_after_iterations") is not None and values.get("postcopy_after_s") is not None:
        return [(("postcopy_after_iterations", "postcopy_after_s"),
                 "hybrid switches either after N iterations or after a time, not both",
                 "Set postcopy_after_iterations or postcopy_after_s, and null the other")]
    return []


def _flushing_problems(values: dict[str, Any]) -> list[Problem]:
    channels = values.get("save_parallel_channels")
    if values["strategy"] == "flushing" and channels is not None and values.get("save_format") == "raw":
        return [(("save_parallel_channels", "save_format"),
                 "parallel save channels need the sparse save format (QEMU's mapped-ram)",
                 "Set save_format to sparse or null, or remove save_parallel_channels")]
    return []


def _join(names: tuple[str, ...]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]
