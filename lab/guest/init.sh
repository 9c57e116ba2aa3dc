#!/bin/sh
# /init of the migration-lab guest initramfs, run by busybox sh as PID 1.
#
# It mounts the kernel file systems, loads the NIC and disk modules listed in
# /etc/mlab-modules (in that order, because insmod resolves no dependencies),
# configures eth0 when the kernel command line has mlab.ip=<addr/prefix>,
# starts /bin/mlab-responder (the guest end of the client probes) in the
# background, starts the disk writer when the command line has mlab.disk=1,
# and runs /bin/mlab-workload in the foreground. The kernel panics
# when PID 1 exits, so this script never returns: if the workload exits, it
# prints the exit status and sleeps forever.

export PATH=/bin
# No file name expansion: the kernel command line is split with $(...) below.
set -f

mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# The kernel starts /init with the console open when the initramfs has a
# /dev/console node. Reopening it from devtmpfs also covers an initramfs
# without that node, so all output reaches console= (ttyS0) either way.
exec </dev/console >/dev/console 2>&1

echo "mlab-init: up kernel=$(uname -r)"

if [ -f /etc/mlab-modules ]; then
    while read -r module; do
        [ -n "$module" ] || continue
        file=/lib/modules/$module.ko
        if [ ! -f "$file" ]; then
            echo "mlab-init: module $module not in the image, skipped"
            continue
        fi
        if insmod "$file"; then
            echo "mlab-init: module $module loaded"
        else
            echo "mlab-init: module $module failed to load (insmod status $?)"
        fi
    done </etc/mlab-modules
fi

ip link set lo up

ip_address=
disk=
for parameter in $(cat /proc/cmdline); do
    case "$parameter" in
        mlab.ip=*) ip_address=${parameter#mlab.ip=} ;;
        mlab.disk=*) disk=${parameter#mlab.disk=} ;;
    esac
done
if [ -n "$ip_address" ]; then
    if ip addr add "$ip_address" dev eth0 && ip link set eth0 up; then
        echo "mlab-init: eth0 up with $ip_address"
    else
        echo "mlab-init: error: configuring eth0 with mlab.ip=$ip_address failed"
    fi
fi

# The responder binds to every address, so it also serves an eth0 that came
# up without mlab.ip; it prints its own "listening" or "error" line.
if [ -x /bin/mlab-responder ]; then
    /bin/mlab-responder &
fi

# The disk writer writes 1 MiB of random data with O_DIRECT every second, at
# the next MiB of /dev/vda, wrapping at its end, so that a disk copied during
# the migration has blocks that change while it is copied. It prints one line
# per write, so the console shows on which host the writes went on.
disk_writer() {
    sectors=$(cat /sys/block/vda/size)
    size_mib=$((sectors / 2048))
    if [ "$size_mib" -lt 1 ]; then
        echo "mlab-disk: error: /dev/vda has $sectors sectors, less than 1 MiB"
        return
    fi
    echo "mlab-disk: writing 1 MiB per second to /dev/vda of $size_mib MiB"
    seq=0
    while true; do
        offset=$((seq % size_mib))
        if dd if=/dev/urandom of=/dev/vda bs=1048576 count=1 seek=$offset oflag=direct 2>/dev/null; then
            echo "mlab-disk: wrote seq=$seq offset_mib=$offset"
        else
            echo "mlab-disk: error: write seq=$seq at offset_mib=$offset failed"
        fi
        seq=$((seq + 1))
        sleep 1
    done
}
if [ "$disk" = 1 ]; then
    # virtio_blk probes the disk after insmod returns, so its node can come late.
    tries=0
    while [ ! -b /dev/vda ] && [ "$tries" -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    if [ -b /dev/vda ]; then
        disk_writer &
    else
        echo "mlab-disk: error: mlab.disk=1 but /dev/vda did not appear within 5 s"
    fi
fi

/bin/mlab-workload
status=$?
echo "mlab-init: workload exited with status $status"
while true; do
    sleep 3600
done
