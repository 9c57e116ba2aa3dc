"""The stack check: which strategies and options a QEMU and libvirt version pair can run."""

from __future__ import annotations

import pytest

from lab.capabilities import (OPTION_REQUIREMENTS, REQUIREMENTS, Requirement, Stack, parse_version,
                              scenario_requirements, sparse_save_supported, stack_problems, unmet)

# QEMU 10.0 lists these; the old "compress" capability is gone since QEMU 9.1.
QEMU_10_CAPABILITIES = frozenset({
    "xbzrle", "auto-converge", "postcopy-ram", "postcopy-blocktime", "postcopy-preempt", "multifd",
    "dirty-limit", "mapped-ram", "zero-copy-send", "switchover-ack", "return-path", "events"})
# QEMU 7.2 still has "compress" and lacks dirty-limit and mapped-ram.
QEMU_7_CAPABILITIES = frozenset({
    "xbzrle", "auto-converge", "postcopy-ram", "postcopy-blocktime", "postcopy-preempt", "multifd",
    "compress", "zero-copy-send", "return-path", "events"})

BACKPORTS = Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES, accelerator="tcg")
BOOKWORM = Stack(qemu=(7, 2, 0), libvirt=(9, 0, 0), capabilities=QEMU_7_CAPABILITIES, accelerator="kvm")
KVM_BACKPORTS = Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES, accelerator="kvm")


def values(strategy: str, **tuning) -> dict:
    base = {"strategy": strategy, "memory_mib": 192, "compression": "none", "zerocopy": False}
    return {**base, **tuning}


def messages(stack: Stack, **scenarios) -> list[str]:
    return [rejection.message() for rejection in stack_problems(list(scenarios.items()), stack)]


def test_backports_stack_runs_lab_strategies():
    scenarios = {name: values(name) for name in
                 ("stop-and-copy", "precopy", "downtime-steps", "auto-converge", "xbzrle", "multifd",
                  "postcopy", "postcopy-preempt", "hybrid", "flushing")}
    assert stack_problems(list(scenarios.items()), BACKPORTS) == []


def test_dirty_limit_needs_qemu_8_1():
    found = messages(BOOKWORM, dl=values("dirty-limit", dirty_limit_mib_s=8))
    assert len(found) == 2
    assert "strategy dirty-limit needs QEMU 8.1 or newer (the hosts have 7.2.0)" in found[0]
    assert "'dirty-limit'" in found[0]
    assert "dirty_limit_mib_s needs QEMU 8.1 or newer" in found[1]


def test_dirty_limit_needs_kvm():
    found = messages(BACKPORTS, dl=values("dirty-limit"))
    assert found == ["strategy dirty-limit needs KVM with a dirty ring, but the lab runs TCG (scenarios dl)"]
    assert messages(KVM_BACKPORTS, dl=values("dirty-limit")) == []


def test_compression_levels_need_libvirt_9_4():
    found = messages(BOOKWORM, z=values("multifd", compression="zstd", compression_level=3))
    assert "compression=zstd needs libvirt 9.4 or newer (the hosts have 9.0.0) (scenarios z)" in found
    assert "compression_level needs libvirt 9.4 or newer (the hosts have 9.0.0) (scenarios z)" in found


def test_mt_compression_rejected_since_qemu_9_1():
    found = messages(BACKPORTS, mt=values("precopy", compression="mt"))
    assert found == ["compression=mt needs QEMU older than 9.1, which removed it (the hosts have 10.0.2) "
                     "(scenarios mt)"]


def test_mt_compression_accepted_on_qemu_7_2():
    assert messages(BOOKWORM, mt=values("precopy", compression="mt")) == []


def test_sparse_save_needs_mapped_ram():
    found = messages(BOOKWORM, f=values("flushing", save_format="sparse"))
    assert len(found) == 1
    assert "QEMU 9.0 or newer" in found[0]
    assert "libvirt 11.2 or newer" in found[0]
    assert "'mapped-ram'" in found[0]
    assert not sparse_save_supported(BOOKWORM)
    assert sparse_save_supported(BACKPORTS)


def test_zerocopy_rejected_without_locked_memory():
    stack = Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES,
                  locked_memory_limit_bytes=8 << 20, can_raise_locked_memory=False)
    found = messages(stack, zc=values("multifd", zerocopy=True))
    assert len(found) == 1
    assert "zerocopy needs a locked-memory limit of at least 192 MiB" in found[0]
    assert "hard limit is 8 MiB" in found[0]
    assert "CAP_SYS_RESOURCE" in found[0]


@pytest.mark.parametrize("limit, can_raise", [(None, False), (1 << 30, False), (8 << 20, True)])
def test_zerocopy_accepted_when_memory_can_be_locked(limit, can_raise):
    stack = Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES,
                  locked_memory_limit_bytes=limit, can_raise_locked_memory=can_raise)
    assert messages(stack, zc=values("multifd", zerocopy=True)) == []


def test_postcopy_needs_userfaultfd():
    stack = Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES, userfaultfd=False)
    found = messages(stack, pc=values("postcopy"))
    assert found == ["strategy postcopy needs a usable userfaultfd on the destination (run as root, or set "
                     "vm.unprivileged_userfaultfd=1) (scenarios pc)"]


def test_missing_capability_named():
    stack = Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES - {"xbzrle"})
    assert messages(stack, x=values("xbzrle")) == ["strategy xbzrle needs QEMU migration capability 'xbzrle' "
                                                   "(scenarios x)"]


def test_rejection_lists_every_scenario_once():
    rejections = stack_problems([("a", values("dirty-limit")), ("b", values("dirty-limit")),
                                 ("c", values("precopy"))], BACKPORTS)
    assert len(rejections) == 1
    assert rejections[0].scenarios == ("a", "b")
    assert rejections[0].option == "strategy dirty-limit"


def test_scenario_requirements_label_options():
    labels = [label for label, _ in scenario_requirements(
        values("multifd", multifd_channels=4, compression="zlib", compression_level=2, zerocopy=False))]
    assert labels == ["strategy multifd", "multifd_channels", "compression_level", "compression=zlib"]


def test_unmet_is_empty_for_no_requirement():
    assert unmet(Requirement(), BOOKWORM) == []


def test_every_strategy_has_a_requirement():
    from lab.strategies import STRATEGY_NAMES

    assert set(REQUIREMENTS) == set(STRATEGY_NAMES)
    assert "compression=mt" in OPTION_REQUIREMENTS


def test_parse_version():
    assert parse_version("10.0.2") == (10, 0, 2)
    assert parse_version("11.3.0") == (11, 3, 0)
