"""Probes: what a client of the guest and the guest itself see during a migration.

QEMU reports downtime as measured on the source, from stopping the vCPUs to
sending the last state. A client sees more: the pause, then the time until
the destination's announcements (RARP from QEMU, or the guest's own
gratuitous ARP with virtio-net) teach the switch the guest's new port, then
the time until the guest replies. The probes measure each part:

agent
    runs in the lab's client host: echo requests over UDP at a fixed rate
    (1000 per second by default) and a TCP connection that streams records
    the guest echoes back (``lab.probes.agent``).
capture
    runs in the lab's switch: frames of the guest's MAC address on the switch
    ports of the source, the destination and the client (``lab.probes.capture``).
responder
    runs in the guest: replies to the echo requests with its own clock and
    echoes the stream (``lab/guest/responder/responder.c``).
guest view
    the workload's progress reports, put on the harness's clock
    (``lab.probes.guest``).

``lab.probes.observe.observe_run()`` turns the raw observations of one run
into the Observed section of its record and the Parquet parts of its
timeline (see lab.timeline). This package imports nothing itself, so that
the probe processes start without loading pandas or libvirt.
"""
