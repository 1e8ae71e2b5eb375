#!/usr/bin/env bash
# Detaches a device made by tools/nbd-attach.sh, in order: (unmount first yourself)
# kernel: nbd-client -d; fuse: losetup -d -> fusermount3 -u -> wait nbdfuse; then SIGTERM
# the server (it flushes and exits) and remove the private socket folder.
# Exit status 3: detached, but the server had died while attached (reported on stderr).
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ $# -eq 1 ] || { echo "usage: $0 DEVICE" >&2; exit 2; }
DEV=$1; NAME=$(basename "$DEV")
STATE="$STATE_DIR/$NAME.state"
[ -f "$STATE" ] || { echo "$0: $DEV was not attached by nbd-attach.sh ($STATE missing)" >&2; exit 1; }
# shellcheck disable=SC1090
. "$STATE"
if findmnt -rn -S "$DEV" >/dev/null 2>&1; then
  echo "$0: $DEV is mounted; unmount it first" >&2; exit 1
fi
# A server that died while attached (killed, crashed) left the device failing every request
# with EIO; detaching still works and is the way back: re-attach, then mount (ext4 replays its
# journal). Report it once the detach is done.
SRV_DIED=0
kill -0 "$SRV" 2>/dev/null || SRV_DIED=1
if [ "$MODE" = kernel ]; then
  nbd-client -d "$DEV" >/dev/null
else
  losetup -d "$DEV"
  fusermount3 -u "$WORK/fuse"
  wait_exit "$FUSEPID" || { echo "$0: nbdfuse $FUSEPID did not exit" >&2; exit 1; }
fi
kill -TERM "$SRV" 2>/dev/null || true
wait_exit "$SRV" || { echo "$0: server $SRV did not exit" >&2; exit 1; }
if [ "$SRV_DIED" = 1 ]; then
  echo "$0: the server (PID $SRV) had exited while $DEV was attached; its last messages:" >&2
  tail -n 5 "$WORK/serve.log" >&2 2>/dev/null || true
  echo "$0: I/O on $DEV failed from then on; what was flushed before is in the image, later" \
       "writes are lost. $DEV is detached: attach the image again (and run e2fsck or mount)." >&2
  rm -rf "$WORK" "$STATE"
  exit 3
fi
rm -rf "$WORK" "$STATE"
echo "detached $DEV"
