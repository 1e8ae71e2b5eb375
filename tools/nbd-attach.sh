#!/usr/bin/env bash
# Attaches a cowdisk image as a block device.
#   tools/nbd-attach.sh IMAGE [DEVICE]     serve on a private unix socket, nbd-client -> /dev/nbdN
#   tools/nbd-attach.sh --fuse IMAGE       no kernel nbd: nbdfuse + losetup -> /dev/loopN
# Prints the device. tools/nbd-detach.sh DEVICE undoes it.
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage() { echo "usage: $0 [--fuse] IMAGE [DEVICE]" >&2; exit 2; }
MODE=kernel
[ "${1:-}" = "--fuse" ] && { MODE=fuse; shift; }
[ $# -ge 1 ] || usage
IMAGE=$1; DEV=${2:-}
[ -f "$IMAGE" ] || { echo "$0: $IMAGE: no such image" >&2; exit 1; }
BIN=$(cowdisk_bin)

if [ "$MODE" = kernel ] && [ ! -e /sys/module/nbd ]; then
  modprobe nbd 2>/dev/null || { echo "$0: kernel has no nbd module; use --fuse" >&2; exit 1; }
fi

mkdir -p "$STATE_DIR"; chmod 700 "$STATE_DIR"
WORK=$(mktemp -d "$STATE_DIR/attach.XXXXXX")   # private 0700 folder for the socket
SOCK=$WORK/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
cleanup_fail() {
  [ -n "${FUSEPID:-}" ] && { fusermount3 -u "$WORK/fuse" 2>/dev/null || true; wait_exit "$FUSEPID" || true; }
  [ -n "${SRV:-}" ] && { kill -TERM "$SRV" 2>/dev/null || true; wait_exit "$SRV" || true; }
  rm -rf "$WORK"
}
trap 'cleanup_fail' ERR

setsid "$BIN" serve "$IMAGE" --socket "$SOCK" >"$WORK/serve.log" 2>&1 < /dev/null &
SRV=$!
# Ready when it answers; a server that exits at once (image in use, bad image) is reported
# without waiting out the timeout.
for _ in $(seq 100); do
  nbdinfo --size "$URI" >/dev/null 2>&1 && break
  if ! kill -0 "$SRV" 2>/dev/null; then
    echo "$0: cowdisk serve $IMAGE exited:" >&2; cat "$WORK/serve.log" >&2; false
  fi
  sleep 0.1
done
wait_nbd "$URI" || { cat "$WORK/serve.log" >&2; false; }

if [ "$MODE" = kernel ]; then
  if [ -z "$DEV" ]; then
    for d in /sys/block/nbd*; do
      [ "$(cat "$d/size")" = 0 ] && { DEV=/dev/$(basename "$d"); break; }
    done
  fi
  [ -n "$DEV" ] || { echo "$0: no free /dev/nbdN" >&2; false; }
  # Several connections only where the server offers multi-conn (the kernel refuses otherwise).
  CONNS=1
  nbdinfo --json "$URI" 2>/dev/null | grep -q '"can_multi_conn": *true' && CONNS=${NBD_CONNECTIONS:-4}
  nbd-client -unix "$SOCK" "$DEV" -b 4096 -C "$CONNS" >/dev/null
else
  mkdir "$WORK/fuse"
  setsid nbdfuse -P "$WORK/fuse.pid" "$WORK/fuse/disk" "$URI" </dev/null >"$WORK/fuse.log" 2>&1 &
  FUSEPID=$!
  for _ in $(seq 100); do [ -s "$WORK/fuse.pid" ] && break; sleep 0.1; done
  [ -s "$WORK/fuse.pid" ] || { cat "$WORK/fuse.log" >&2; false; }
  DEV=$(losetup --find --show "$WORK/fuse/disk")
fi
trap - ERR
NAME=$(basename "$DEV")
cat > "$STATE_DIR/$NAME.state" <<STATE
MODE=$MODE
WORK=$WORK
SRV=$SRV
FUSEPID=${FUSEPID:-}
DEV=$DEV
STATE
echo "$DEV"
