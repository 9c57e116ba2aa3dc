"""The doctor's verdict per strategy and option, from made-up stacks."""

from __future__ import annotations

from lab.capabilities import Stack
from lab.doctor import stack_report
from tests.test_capabilities import QEMU_7_CAPABILITIES, QEMU_10_CAPABILITIES


def test_backports_tcg_report():
    report = stack_report(Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES,
                                accelerator="tcg", locked_memory_limit_bytes=8 << 20,
                                can_raise_locked_memory=False))
    assert report["strategy postcopy-preempt"] == "supported"
    assert report["strategy flushing"] == "supported"
    assert report["strategy dirty-limit"] == "needs KVM with a dirty ring, but the lab runs TCG"
    assert report["option compression=mt"].startswith("needs QEMU older than 9.1")
    assert "CAP_SYS_RESOURCE" in report["option zerocopy (256 MiB guest)"]
    assert report["option save_format=sparse"] == "supported"


def test_bookworm_report_names_versions():
    report = stack_report(Stack(qemu=(7, 2, 0), libvirt=(9, 0, 0), capabilities=QEMU_7_CAPABILITIES,
                                accelerator="kvm"))
    assert "QEMU 8.1 or newer" in report["strategy dirty-limit"]
    assert "libvirt 9.4 or newer" in report["option compression=zstd"]
    assert report["option compression=mt"] == "supported"
    assert "libvirt 11.3 or newer" in report["strategy postcopy-preempt"]
    assert report["strategy precopy"] == "supported"


def test_report_covers_every_strategy():
    from lab.strategies import STRATEGY_NAMES

    report = stack_report(Stack(qemu=(10, 0, 2), libvirt=(11, 3, 0), capabilities=QEMU_10_CAPABILITIES))
    assert {f"strategy {name}" for name in STRATEGY_NAMES} <= set(report)
