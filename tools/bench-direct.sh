#!/usr/bin/env bash
# bench-direct.sh: `cowdisk serve --cache=none` against `qemu-nbd --cache=none --aio=io_uring`
# (qcow2, 64 KiB clusters) on the same file system, both over NBD on unix sockets.
#
# Each repetition: a fresh writable top over the same base (256 MiB of random data) for
# each contender, a sequential 1 MiB pass that allocates every block in the top, then fio
# random 4 KiB reads at QD 16 and QD 1 and random 4 KiB rewrites at QD 16 (5 s each),
# alternating the contenders. Prints one line per workload and repetition with the ratio.
#
# Usage: tools/bench-direct.sh [--help]
# Environment: BENCH_DIR (a folder on the file system to measure, not tmpfs before Linux
# 6.6) [/var/tmp/cowdisk-bench-direct], BENCH_FS (ext4, xfs, btrfs or tmpfs: measure on a
# fresh one of these instead, a loop file in BENCH_DIR; needs root) [none], BENCH_REPS [3],
# COWDISK [target/release/cowdisk], BENCH_SERVE_ARGS, more arguments for cowdisk serve
# (e.g. "--threads 16").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/common.sh
. "$ROOT/tools/common.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
D=${BENCH_DIR:-/var/tmp/cowdisk-bench-direct}
REPS=${BENCH_REPS:-3}
BIN=${COWDISK:-$ROOT/target/release/cowdisk}
read -r -a SERVE_ARGS <<<"${BENCH_SERVE_ARGS:-}"
for t in fio jq qemu-img qemu-nbd python3; do command -v $t >/dev/null || { echo "$t missing" >&2; exit 1; }; done
[[ -x $BIN ]] || { echo "$BIN missing: cargo build --release" >&2; exit 1; }
mkdir -p "$D"
PIDS=() MNT=""
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait; cd /; [[ -z $MNT ]] || umount "$MNT"' EXIT
if [[ -n ${BENCH_FS:-} ]]; then
  # Two bases and two tops of 256 MiB, and a flush journal: 2 GiB is room enough.
  MNT=$D/mnt; mount_fresh_fs "$MNT" "$BENCH_FS" 2048 "$D/$BENCH_FS.img" || exit 2
  D=$MNT
fi
cd "$D"
bench_base "$BIN" 256
iops() {  # iops URI FIO-ARGS...
  local u=$1; shift
  fio --name=b --ioengine=nbd --uri="$u" --size=256m --runtime=5 --time_based --randseed=3 \
    --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p' | jq -r '.jobs[0] | (.read.iops + .write.iops) | floor'
}
C="nbd+unix:///?socket=$D/c.sock" Q="nbd+unix:///?socket=$D/q.sock"
for rep in $(seq "$REPS"); do
  rm -f top.cow top.qcow2 c.sock q.sock
  "$BIN" create top.cow --backing base.cow >/dev/null
  qemu-img create -q -f qcow2 -F qcow2 -b "$D/base.qcow2" top.qcow2
  "$BIN" serve top.cow --socket "$D/c.sock" --cache=none "${SERVE_ARGS[@]}" >/dev/null 2>&1 & PIDS+=($!)
  qemu-nbd -t -e 8 -f qcow2 --cache=none --aio=io_uring --socket "$D/q.sock" "$D/top.qcow2" & PIDS+=($!)
  for _ in $(seq 100); do [[ -S c.sock && -S q.sock ]] && break; sleep 0.1; done
  for u in "$C" "$Q"; do
    fio --name=fill --ioengine=nbd --uri="$u" --rw=write --bs=1m --iodepth=4 --size=256m >/dev/null 2>&1
  done
  for wl in "randread-qd16:--rw=randread --bs=4k --iodepth=16" \
            "randread-qd1:--rw=randread --bs=4k --iodepth=1" \
            "rewrite-qd16:--rw=randwrite --bs=4k --iodepth=16"; do
    # shellcheck disable=SC2086
    c=$(iops "$C" ${wl#*:}); q=$(iops "$Q" ${wl#*:})
    echo "$rep ${wl%%:*} cowdisk=$c qemu-nbd=$q ratio=$(python3 -c "print(round($c / $q, 2))")"
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
done
