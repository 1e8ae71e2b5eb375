#!/usr/bin/env bash
# Attaches a cowdisk image as a ublk block device: `cowdisk serve --ublk` answers the kernel's
# ublk driver directly over io_uring (no NBD socket in between).
#   tools/ublk-attach.sh IMAGE       loads ublk_drv if needed, prints /dev/ublkbN
# UBLK_QUEUES=N sets the hardware queues (default: one per CPU, at most 8); UBLK_THREADS=N
# worker threads per queue (default 1: the queue's thread runs its requests in turn).
# tools/ublk-detach.sh DEVICE undoes it (or `kill -TERM` the server: it flushes and removes
# the device).
set -euo pipefail
. "$(dirname "$0")/common.sh"

[ $# -eq 1 ] || { echo "usage: $0 IMAGE" >&2; exit 2; }
IMAGE=$1
[ -f "$IMAGE" ] || { echo "$0: $IMAGE: no such image" >&2; exit 1; }
BIN=$(cowdisk_bin)
if [ ! -e /dev/ublk-control ]; then
  modprobe ublk_drv 2>/dev/null || { echo "$0: kernel has no ublk_drv module (Linux 6.0 or later); use tools/nbd-attach.sh" >&2; exit 1; }
  # devtmpfs makes the node right after the module registers it.
  for _ in $(seq 50); do [ -e /dev/ublk-control ] && break; sleep 0.1; done
fi

mkdir -p "$STATE_DIR"; chmod 700 "$STATE_DIR"
WORK=$(mktemp -d "$STATE_DIR/attach.XXXXXX")
cleanup_fail() {
  [ -n "${SRV:-}" ] && { kill -TERM "$SRV" 2>/dev/null || true; wait_exit "$SRV" 60 || true; }
  rm -rf "$WORK"
}
trap 'cleanup_fail' ERR

args=()
[ -n "${UBLK_QUEUES:-}" ] && args+=(--queues "$UBLK_QUEUES")
[ -n "${UBLK_THREADS:-}" ] && args+=(--threads "$UBLK_THREADS")
setsid "$BIN" serve --ublk "${args[@]}" "$IMAGE" >"$WORK/device" 2>"$WORK/serve.log" </dev/null &
SRV=$!
# The server prints the device once it exists; one that exits at once (image in use, no
# driver) is reported without waiting out the timeout. Under emulation a start takes seconds.
DEV=""
for _ in $(seq 300); do
  DEV=$(head -n1 "$WORK/device")
  [ -n "$DEV" ] && break
  if ! kill -0 "$SRV" 2>/dev/null; then
    echo "$0: cowdisk serve --ublk $IMAGE exited:" >&2; cat "$WORK/serve.log" >&2; false
  fi
  sleep 0.1
done
[ -n "$DEV" ] || { echo "$0: no device after 30 s" >&2; cat "$WORK/serve.log" >&2; false; }
[ -b "$DEV" ] || { echo "$0: $DEV is not a block device" >&2; false; }
trap - ERR
NAME=$(basename "$DEV")
cat > "$STATE_DIR/$NAME.state" <<STATE
MODE=ublk
WORK=$WORK
SRV=$SRV
DEV=$DEV
STATE
echo "$DEV"
