"""Strategies turned into libvirt flags and parameters."""

from __future__ import annotations

import libvirt
import pytest

from lab.errors import MigrationError
from lab.migrate import Event, MigrationSettings, _first_event, _sample

URI = "tcp://10.77.0.12"


def test_precopy_is_live_without_postcopy():
    settings = MigrationSettings("precopy", URI)
    assert settings.flags() & libvirt.VIR_MIGRATE_LIVE
    assert not settings.flags() & libvirt.VIR_MIGRATE_POSTCOPY
    assert not settings.uses_postcopy


def test_stop_and_copy_is_not_live():
    assert MigrationSettings("stop-and-copy", URI).flags() & libvirt.VIR_MIGRATE_LIVE == 0


@pytest.mark.parametrize("strategy", ["postcopy", "hybrid"])
def test_postcopy_strategies_set_postcopy_flag(strategy):
    settings = MigrationSettings(strategy, URI, postcopy_after_iterations=2)
    assert settings.flags() & libvirt.VIR_MIGRATE_POSTCOPY
    assert settings.flags() & libvirt.VIR_MIGRATE_LIVE
    assert settings.uses_postcopy


def test_params_carry_uri_and_whole_bandwidth():
    params = MigrationSettings("precopy", URI, bandwidth_mib_s=31.6).params()
    assert params[libvirt.VIR_MIGRATE_PARAM_URI] == URI
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 32


def test_params_without_bandwidth_leave_it_unset():
    assert libvirt.VIR_MIGRATE_PARAM_BANDWIDTH not in MigrationSettings("precopy", URI).params()


def test_tiny_bandwidth_rounds_up_to_one():
    assert MigrationSettings("precopy", URI, bandwidth_mib_s=0.2).params()[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 1


def test_unknown_strategy_rejected():
    with pytest.raises(MigrationError, match="unknown strategy 'teleport'"):
        MigrationSettings("teleport", URI)


def test_sample_converts_dirty_rate_pages_to_bytes():
    sample = _sample({"memory_dirty_rate": 100, "memory_page_size": 4096, "data_processed": 5,
                      "memory_iteration": 3}, 1.5, "h1")
    assert sample["dirty_rate_bytes_s"] == 409600
    assert sample["iteration"] == 3
    assert sample["data_processed_bytes"] == 5
    assert sample["t_s"] == 1.5


def test_first_event_respects_host_and_time():
    events = [Event(0.5, 0, "h1", "suspended", "migrated"), Event(1.0, 0, "h2", "resumed", "migrated"),
              Event(2.0, 0, "h2", "resumed", "migrated")]
    assert _first_event(events, "h2", "resumed", ("migrated",), after_s=0.5).t_s == 1.0
    assert _first_event(events, "h2", "resumed", ("migrated",), after_s=1.5).t_s == 2.0
    assert _first_event(events, "h1", "resumed", ("migrated",)) is None


def test_lifecycle_names_match_libvirt_constants():
    from lab.migrate import _LIFECYCLE_DETAILS, LIFECYCLE_EVENTS

    assert LIFECYCLE_EVENTS[libvirt.VIR_DOMAIN_EVENT_SUSPENDED] == "suspended"
    assert LIFECYCLE_EVENTS[libvirt.VIR_DOMAIN_EVENT_RESUMED] == "resumed"
    assert LIFECYCLE_EVENTS[libvirt.VIR_DOMAIN_EVENT_STARTED] == "started"
    suspended = _LIFECYCLE_DETAILS[libvirt.VIR_DOMAIN_EVENT_SUSPENDED]
    assert suspended[libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY] == "postcopy"
    assert suspended[libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED] == "migrated"
    resumed = _LIFECYCLE_DETAILS[libvirt.VIR_DOMAIN_EVENT_RESUMED]
    assert resumed[libvirt.VIR_DOMAIN_EVENT_RESUMED_POSTCOPY] == "postcopy"
