"""migration-lab: live-migration experiments with QEMU guests driven through libvirt.

Terms used throughout the package:

host
    A machine running libvirtd that can hold guests: a namespace host of the
    local lab, or a real server reached over SSH.
lab
    The hosts and the network between them, described by an inventory.
guest
    The VM under study, booted from a guest image (kernel and initramfs that
    carries the workload).
workload
    What runs inside the guest: memory dirtying over a working set, at a dirty
    rate, with a pattern; it also verifies the memory it wrote.
strategy
    How memory moves: stop-and-copy, precopy, postcopy, hybrid.
scenario
    One point of an experiment matrix: strategy, tunables, workload and guest
    size.
run
    One migration of one scenario in one repetition; the unit that is stored.
playbook
    A YAML file that declares an experiment: lab, guest, matrix, repetitions.
experiment
    The execution of a playbook, with its results directory.
timeline
    The time series sampled during a run: progress samples and events.
probe
    A measurement taken from outside the guest.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``lab.load_runs(path)`` loads an experiment into pandas; the import is
    # deferred so that ``migrlab`` starts without loading pandas.
    if name == "load_runs":
        from lab.store import load_runs

        return load_runs
    raise AttributeError(f"module 'lab' has no attribute {name!r}")


__all__ = ["load_runs", "__version__"]
