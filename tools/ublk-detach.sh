#!/usr/bin/env bash
# Detaches a device made by tools/ublk-attach.sh (unmount it first): SIGTERM to the server,
# which stops the device (/dev/ublkbN goes away), flushes the image and exits.
# Exit status 3: the server had died while attached (reported on stderr; see README).
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ $# -eq 1 ] || { echo "usage: $0 DEVICE" >&2; exit 2; }
DEV=$1; NAME=$(basename "$DEV")
STATE="$STATE_DIR/$NAME.state"
[ -f "$STATE" ] || { echo "$0: $DEV was not attached by ublk-attach.sh ($STATE missing)" >&2; exit 1; }
# shellcheck disable=SC1090
. "$STATE"
if findmnt -rn -S "$DEV" >/dev/null 2>&1; then
  echo "$0: $DEV is mounted; unmount it first" >&2; exit 1
fi
if ! kill -0 "$SRV" 2>/dev/null; then
  echo "$0: the server (PID $SRV) had exited while $DEV was attached; its last messages:" >&2
  tail -n 5 "$WORK/serve.log" >&2 2>/dev/null || true
  echo "$0: the driver failed I/O on $DEV and removed it; what was flushed before is in the" \
       "image, later writes are lost. Attach the image again (and run e2fsck or mount)." >&2
  # The driver keeps the dead device's /dev/ublkcN (and its number) until it is deleted.
  ID=${NAME#ublkb}
  if [ -e "/sys/class/ublk-char/ublkc$ID" ]; then
    "$(cowdisk_bin)" ublk-remove "$ID" || echo "$0: could not remove the dead /dev/ublkc$ID" >&2
  fi
  rm -rf "$WORK" "$STATE"
  exit 3
fi
kill -TERM "$SRV"
# The server answers what is queued, removes the device, then flushes: under emulation
# that can take a while.
wait_exit "$SRV" 60 || { echo "$0: server $SRV did not exit" >&2; exit 1; }
[ ! -e "$DEV" ] || { echo "$0: $DEV still exists after the server exited" >&2; exit 1; }
if [ -s "$WORK/serve.log" ]; then cat "$WORK/serve.log" >&2; fi
rm -rf "$WORK" "$STATE"
echo "detached $DEV"
