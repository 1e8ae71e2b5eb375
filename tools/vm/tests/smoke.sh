#!/usr/bin/env bash
# The guest has what the other tests need: the modules load, the tools run, loopback works.
set -euo pipefail
modprobe nbd
[ -b /dev/nbd0 ] || { echo "modprobe nbd gave no /dev/nbd0" >&2; exit 1; }
modprobe dm-thin-pool; modprobe dm-snapshot; modprobe ublk_drv; modprobe loop
[ -c /dev/ublk-control ] || { echo "no /dev/ublk-control" >&2; exit 1; }
cowdisk --version
nbd-client --version 2>&1 | head -n1 || true
fio --version; mkfs.ext4 -V 2>&1 | head -n1; qemu-img --version | head -n1; dmsetup version
ip addr show lo | grep -q 127.0.0.1
echo "cpus $(nproc), memory $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
