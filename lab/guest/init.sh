#!/bin/sh
# /init of the migration-lab guest initramfs, run by busybox sh as PID 1.
#
# It mounts the kernel file systems, loads the NIC modules listed in
# /etc/mlab-modules (in that order, because insmod resolves no dependencies),
# configures eth0 when the kernel command line has mlab.ip=<addr/prefix>,
# starts /bin/mlab-responder (the guest end of the client probes) in the
# background, and runs /bin/mlab-workload in the foreground. The kernel panics
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
for parameter in $(cat /proc/cmdline); do
    case "$parameter" in
        mlab.ip=*) ip_address=${parameter#mlab.ip=} ;;
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

/bin/mlab-workload
status=$?
echo "mlab-init: workload exited with status $status"
while true; do
    sleep 3600
done
