#!/usr/bin/env bash
# The guest has what the other tests need: the modules load, the tools run, loopback works.
# (sed -n 1p, not head: head exits early, and under pipefail the writer's SIGPIPE fails the test.)
set -euo pipefail
modprobe nbd
[ -b /dev/nbd0 ] || { echo "modprobe nbd gave no /dev/nbd0" >&2; exit 1; }
modprobe dm-thin-pool; modprobe dm-snapshot; modprobe ublk_drv; modprobe loop
[ -c /dev/ublk-control ] || { echo "no /dev/ublk-control" >&2; exit 1; }
cowdisk --version
nbd-client --version 2>&1 | sed -n 1p || true
fio --version; mkfs.ext4 -V 2>&1 | sed -n 1p; qemu-img --version | sed -n 1p; dmsetup version
ip addr show lo | grep -q 127.0.0.1
echo "cpus $(nproc), memory $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
