#!/usr/bin/env bash
# bench-afterfirst.sh: flushing writes after the first-write pass, in runs long enough to
# leave the first seconds behind. On a fresh top: the first-write pass (one 4 KiB write
# into each 64 KiB block of the base), then random 4 KiB writes at QD 16 with a FLUSH
# every 16 writes (fio --fsync=16) for BENCH_RUNTIME seconds, on the same server. This is
# bench-peers.sh's afterfirst-flush row, which runs 3 s; a VM's guest keeps writing.
# Contenders: cowdisk --flush-journal off, cowdisk as served by default (`default`: auto,
# a 64M journal on these file systems), --flush-journal SIZE for each of BENCH_JOURNALS
# (empty for none), qemu-nbd
# on qcow2 (64 KiB clusters) and on qcow2 with extended_l2=on (subclusters), and nbdkit's
# file plugin on a raw copy of the base (written whole and synced: no copy-on-write, no
# allocation). ext4, XFS (reflink=1) and btrfs are made in a loop file on the machine's
# disk; the contenders alternate. Prints IOPS per run (whole run, and its first 3 s from
# fio's IOPS log) and the medians' ratios to qcow2 64K.
#
# Usage: tools/bench-afterfirst.sh [--fs "ext4 xfs btrfs"] [--help]
# Environment: BENCH_DIR [/var/tmp/cowdisk-af], BENCH_BASE_MB [512], BENCH_REPS [3],
#   BENCH_RUNTIME [20], BENCH_JOURNALS ["64M"], COWDISK [target/release/cowdisk].
#   Needs root (mount), mkfs.{ext4,xfs,btrfs}, fio, jq, qemu-nbd, nbdkit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/common.sh
. "$ROOT/tools/common.sh"
FSES="ext4 xfs btrfs"
while (($#)); do
  case $1 in
    --fs) FSES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-afterfirst: unknown argument $1" >&2; exit 2 ;;
  esac
done
D=${BENCH_DIR:-/var/tmp/cowdisk-af}
MB=${BENCH_BASE_MB:-512}
REPS=${BENCH_REPS:-3}
RT=${BENCH_RUNTIME:-20}
read -r -a JOURNALS <<<"${BENCH_JOURNALS-64M}"
BIN=${COWDISK:-$ROOT/target/release/cowdisk}
[[ $(id -u) == 0 ]] || { echo "bench-afterfirst: needs root (mount)" >&2; exit 1; }
for t in fio jq qemu-img qemu-nbd nbdkit python3; do
  command -v $t >/dev/null || { echo "$t missing" >&2; exit 1; }
done
[[ -x $BIN ]] || { echo "$BIN missing: cargo build --release" >&2; exit 1; }
mkdir -p "$D"
M="" S=""
cleanup() {
  [[ -n $S ]] && kill "$S" 2>/dev/null && wait "$S" 2>/dev/null
  [[ -n $M ]] && umount "$M" 2>/dev/null
  rm -f "$D"/*.img
}
trap cleanup EXIT

mount_fs() {  # mount_fs FS: a fresh, empty file system on $M
  M=$D/mnt-$1
  [[ $1 != tmpfs ]] || { echo "bench-afterfirst: not on tmpfs (no sync to save)" >&2; exit 2; }
  mount_fresh_fs "$M" "$1" $((MB * 6 + 2048)) "$D/$1.img" || exit 2
}

serve() {  # serve CONTENDER: a fresh top (or the raw copy) and its server on $M/s.sock
  rm -f "$M"/t.cow "$M"/t.cow.journal "$M"/t.qcow2 "$M"/s.sock
  case $1 in
    cowdisk|default|journal-*)
      "$BIN" create "$M/t.cow" --backing "$M/base.cow" >/dev/null
      local j=(--flush-journal off); [[ $1 == journal-* ]] && j=(--flush-journal "${1#journal-}")
      [[ $1 == default ]] && j=()
      "$BIN" serve "$M/t.cow" --socket "$M/s.sock" "${j[@]}" >/dev/null 2>&1 & S=$! ;;
    qcow2|qcow2x)
      local o=cluster_size=65536; [[ $1 == qcow2x ]] && o+=,extended_l2=on
      qemu-img create -q -f qcow2 -o "$o" -b "$M/base.qcow2" -F qcow2 "$M/t.qcow2"
      qemu-nbd -t --shared=16 --cache=writeback --aio=threads -k "$M/s.sock" -f qcow2 "$M/t.qcow2" & S=$! ;;
    raw) nbdkit -f -U "$M/s.sock" file "file=$M/raw.img" & S=$! ;;
  esac
  sync -f "$M"
  for _ in $(seq 200); do [[ -S $M/s.sock ]] && return; sleep 0.05; done
  echo "bench-afterfirst: $1 did not start" >&2; exit 1
}

fio_iops() {  # fio_iops ARGS…: IOPS of one fio run over NBD
  fio --name=af --ioengine=nbd --uri="nbd+unix:///?socket=$M/s.sock" --size=${MB}m \
    --rw=randwrite --bs=4k --iodepth=16 "$@" --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | jq -r '.jobs[0].write.iops | floor'
}

run() {  # run CONTENDER: "WHOLE FIRST3" IOPS of the flushing writes after the pass
  serve "$1"
  # The raw file has no copy-on-write: its pass is plain rewrites, not timed either way.
  fio_iops --zonemode=strided --zonesize=4k --zonerange=64k --io_size=$((MB / 16))m >/dev/null
  local log=$M/iops
  rm -f "$log"*
  local whole
  whole=$(fio_iops --fsync=16 --time_based --runtime="$RT" --ramp_time=1 \
    --write_iops_log="$log" --log_avg_msec=100)
  # fio's log: msec, IOPS over the last 100 ms, …; the first 3 s after the ramp.
  local first3
  first3=$(awk -F, '$1 <= 3000 { s += $2; n++ } END { printf "%d", n ? s / n : 0 }' "$log"_iops.1.log)
  kill "$S"; wait "$S" 2>/dev/null || true; S=""
  echo "$whole $first3"
}

med() { python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
ratio() { python3 -c "print(round($1 / $2, 2))"; }

for fs in $FSES; do
  mount_fs "$fs"
  head -c $((MB << 20)) /dev/urandom >"$M/base.raw"
  "$BIN" import -q "$M/base.raw" "$M/base.cow" >/dev/null
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$M/base.raw" "$M/base.qcow2"
  mv "$M/base.raw" "$M/raw.img"
  cs=(cowdisk default)
  for j in "${JOURNALS[@]}"; do cs+=("journal-$j"); done
  cs+=(qcow2 qcow2x raw)
  declare -A whole=() first=()
  for rep in $(seq "$REPS"); do
    line="$fs rep $rep (whole ${RT}s / first 3 s):"
    for c in "${cs[@]}"; do
      read -r w f < <(run "$c")
      whole[$c]+=" $w"; first[$c]+=" $f"; line+=" $c=$w/$f"
    done
    echo "$line"
  done
  q=$(med ${whole[qcow2]}) qf=$(med ${first[qcow2]})
  for c in "${cs[@]}"; do
    [[ $c == qcow2 ]] && continue
    echo "$fs: $c ÷ qcow2 = $(ratio "$(med ${whole[$c]})" "$q") (whole ${RT}s), $(ratio "$(med ${first[$c]})" "$qf") (first 3 s); medians $(med ${whole[$c]}) / $(med ${first[$c]}) IOPS"
  done
  echo "$fs: qcow2 medians $q / $qf IOPS"
  unset whole first
  umount "$M"; M=""
  rm -f "$D/$fs.img"
done
