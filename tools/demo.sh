#!/usr/bin/env bash
# The main job in one command: build cowdisk, make a base image with content, chain a
# writable top over it, serve it over NBD, write and discard through qemu-io, then show
# that exactly the written blocks were copied up, the discarded ones are whiteouts, and
# the base is byte-for-byte unchanged.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. tools/common.sh

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "installing tools and building the release binary"
bash tools/install-deps.sh
cargo build --release -q -p cowdisk
BIN=$ROOT/target/release/cowdisk

WORK=$(mktemp -d /tmp/cowdisk-demo.XXXXXX)
SRV=
cleanup() { [ -n "$SRV" ] && kill -TERM "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK"

step "base image: 64 MiB of content, 64 KiB blocks"
qemu-img create -q -f raw base.raw 64M
qemu-io -f raw -c 'write -P 0x11 0 16M' -c 'write -P 0x22 16M 16M' -c 'write -P 0x33 40M 8M' base.raw >/dev/null
"$BIN" import --quiet base.raw base.cow --block-size 64K
"$BIN" create top.cow --backing base.cow
BASE_SUM=$(sha256sum base.cow | cut -d' ' -f1)
echo "base.cow sha256 $BASE_SUM"

step "serving top.cow on a unix socket"
"$BIN" serve top.cow --socket "$WORK/nbd.sock" &
SRV=$!
URI="nbd+unix:///?socket=$WORK/nbd.sock"
wait_nbd "$URI"
nbdinfo "$URI" | sed -n '1,12p'

step "writing and discarding through qemu-io (a real NBD client)"
# 4 KiB into block 16 (copy-up of a base block), a whole block 64 (no copy needed),
# 1 KiB at 50 MiB (a block nobody holds), discard blocks 128-129 (whiteouts over base data).
qemu-io -f raw \
  -c 'write -P 0xaa 1M 4k' \
  -c 'write -P 0xbb 4M 64k' \
  -c 'write -P 0xcc 50M 1k' \
  -c 'discard 8M 128k' \
  -c 'flush' \
  -c 'read -P 0x11 1052672 61440' \
  -c 'read -P 0xaa 1M 4k' \
  -c 'read -P 0 8M 128k' \
  -c 'read -P 0x22 16M 64k' \
  "$URI"
kill -TERM "$SRV"; wait "$SRV"; SRV=

step "cowdisk info top.cow"
"$BIN" info top.cow

step "cowdisk map top.cow"
"$BIN" map top.cow

step "checking"
fail=0
top_data=$("$BIN" map top.cow --json | jq -c '[.[] | select(.depth == 0 and .state == "data") | [.start, .length]]')
top_zero=$("$BIN" map top.cow --json | jq -c '[.[] | select(.depth == 0 and .state == "zero") | [.start, .length]]')
want_data='[[1048576,65536],[4194304,65536],[52428800,65536]]'
want_zero='[[8388608,131072]]'
echo "top data extents:  $top_data"; echo "top whiteouts:     $top_zero"
[ "$top_data" = "$want_data" ] || { echo "FAIL: copied-up blocks differ from the written ones (want $want_data)"; fail=1; }
[ "$top_zero" = "$want_zero" ] || { echo "FAIL: whiteouts differ from the discarded blocks (want $want_zero)"; fail=1; }
NOW=$(sha256sum base.cow | cut -d' ' -f1)
if [ "$NOW" = "$BASE_SUM" ]; then echo "base.cow unchanged (sha256 $NOW)"; else echo "FAIL: base.cow changed"; fail=1; fi
"$BIN" check top.cow >/dev/null && echo "cowdisk check: clean" || { echo "FAIL: check"; fail=1; }
[ $fail = 0 ] && printf '\n\033[1mOK:\033[0m 3 blocks copied up or written, 2 whiteouts, base pristine.\n'
exit $fail
