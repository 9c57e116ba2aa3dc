"""Hosts that run libvirtd for the experiments.

``local`` builds the local lab: libvirt hosts in namespaces of one machine.
``netns``, ``libvirtd``, ``processes``, ``state`` and ``system`` are its parts.
"""
