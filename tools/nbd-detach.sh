#!/usr/bin/env bash
# Detaches a device made by tools/nbd-attach.sh, in order: (unmount first yourself)
# kernel: nbd-client -d; fuse: losetup -d -> fusermount3 -u -> wait nbdfuse; then SIGTERM
# the server (it flushes and exits) and remove the private socket folder.
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
if [ "$MODE" = kernel ]; then
  nbd-client -d "$DEV" >/dev/null
else
  losetup -d "$DEV"
  fusermount3 -u "$WORK/fuse"
  wait_exit "$FUSEPID" || { echo "$0: nbdfuse $FUSEPID did not exit" >&2; exit 1; }
fi
kill -TERM "$SRV" 2>/dev/null || true
wait_exit "$SRV" || { echo "$0: server $SRV did not exit" >&2; exit 1; }
rm -rf "$WORK" "$STATE"
echo "detached $DEV"
