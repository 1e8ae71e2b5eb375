#!/usr/bin/env bash
# bench-firstwrite.sh: first writes only, on each file system, with passes long enough to
# leave the page cache's easy phase. One 4 KiB write into each 64 KiB block of a fresh top
# (every one a first write into a block the base holds), fio over NBD at QD 16, for:
# cowdisk (default: partial blocks), cowdisk --copy-up copy (whole-block copy-up), cowdisk
# --copy-up share (XFS and btrfs), qemu-nbd on qcow2 (64 KiB clusters) and on qcow2 with
# extended_l2=on (subclusters). Also prints the space each top took after its pass.
# ext4, XFS (reflink=1) and btrfs are made in a loop file on
# the machine's disk, tmpfs is mounted fresh; the file system is synced before each pass and
# the contenders alternate. Prints IOPS per pass and the medians' ratios.
#
# bench-fs.sh runs the same pass inside bench-peers.sh over a 512 MiB base; this one's
# default base is 1 GiB, and the ratio to qcow2 depends on that size (BENCHMARKS.md).
#
# Usage: tools/bench-firstwrite.sh [--fs "ext4 xfs btrfs tmpfs"] [--help]
# Environment: BENCH_DIR [/var/tmp/cowdisk-fw], BENCH_BASE_MB [1024], BENCH_REPS [3],
#   COWDISK [target/release/cowdisk]. Needs root (mount), mkfs.{ext4,xfs,btrfs}, fio, jq.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/common.sh
. "$ROOT/tools/common.sh"
FSES="ext4 xfs btrfs tmpfs"
while (($#)); do
  case $1 in
    --fs) FSES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-firstwrite: unknown argument $1" >&2; exit 2 ;;
  esac
done
D=${BENCH_DIR:-/var/tmp/cowdisk-fw}
MB=${BENCH_BASE_MB:-1024}
REPS=${BENCH_REPS:-3}
BIN=${COWDISK:-$ROOT/target/release/cowdisk}
[[ $(id -u) == 0 ]] || { echo "bench-firstwrite: needs root (mount)" >&2; exit 1; }
for t in fio jq qemu-img qemu-nbd python3; do command -v $t >/dev/null || { echo "$t missing" >&2; exit 1; }; done
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
  local size=$((MB * 4 + 2048)); [[ $1 == tmpfs ]] && size=$((MB * 4 + 512))
  mount_fresh_fs "$M" "$1" "$size" "$D/$1.img" || exit 2
}

serve() {  # serve CONTENDER: a fresh top and its server on $M/s.sock
  rm -f "$M"/t.cow "$M"/t.qcow2 "$M"/s.sock
  sync -f "$M"
  case $1 in
    cowdisk|copy|share)
      "$BIN" create "$M/t.cow" --backing "$M/base.cow" >/dev/null
      local mode=partial; [[ $1 != cowdisk ]] && mode=$1
      "$BIN" serve "$M/t.cow" --socket "$M/s.sock" --copy-up "$mode" >/dev/null 2>&1 & S=$! ;;
    qcow2|qcow2x)
      local o=cluster_size=65536; [[ $1 == qcow2x ]] && o+=,extended_l2=on
      qemu-img create -q -f qcow2 -o "$o" -b "$M/base.qcow2" -F qcow2 "$M/t.qcow2"
      qemu-nbd -t --shared=16 --cache=writeback --aio=threads -k "$M/s.sock" -f qcow2 "$M/t.qcow2" & S=$! ;;
  esac
  for _ in $(seq 200); do [[ -S $M/s.sock ]] && return; sleep 0.05; done
  echo "bench-firstwrite: $1 did not start" >&2; exit 1
}

pass() {  # pass: IOPS of one first-write pass over the whole base
  fio --name=fw --ioengine=nbd --uri="nbd+unix:///?socket=$M/s.sock" --size=${MB}m \
    --rw=randwrite --bs=4k --iodepth=16 --zonemode=strided --zonesize=4k --zonerange=64k \
    --io_size=$((MB / 16))m --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | jq -r '.jobs[0].write.iops | floor'
}

for fs in $FSES; do
  mount_fs "$fs"
  head -c $((MB << 20)) /dev/urandom >"$M/base.raw"
  "$BIN" import -q "$M/base.raw" "$M/base.cow" >/dev/null
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$M/base.raw" "$M/base.qcow2"
  rm -f "$M/base.raw"
  cs=(cowdisk copy qcow2 qcow2x); [[ $fs == xfs || $fs == btrfs ]] && cs+=(share)
  declare -A got=()
  space=""
  for rep in $(seq "$REPS"); do
    line="$fs rep $rep:"
    for c in "${cs[@]}"; do
      serve "$c"
      v=$(pass)
      kill "$S"; wait "$S" 2>/dev/null || true; S=""
      got[$c]+=" $v"; line+=" $c=$v"
      # The top's allocated space after its pass (st_blocks; shared extents count in full).
      top=$M/t.cow; [[ $c == qcow2* ]] && top=$M/t.qcow2
      ((rep == 1)) && space+=" $c=$(( $(stat -c '%b * %B' "$top") >> 20 ))MiB"
    done
    echo "$line"
  done
  echo "$fs top space after one pass:$space"
  med() { python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" $1; }
  c=$(med "${got[cowdisk]}")
  for p in qcow2 qcow2x copy; do
    echo "$fs: cowdisk ÷ $p = $(python3 -c "print(round($c / $(med "${got[$p]}"), 2))") (medians)"
  done
  [[ -n ${got[share]:-} ]] && echo "$fs: cowdisk share ÷ qcow2x = $(python3 -c "print(round($(med "${got[share]}") / $(med "${got[qcow2x]}"), 2))")"
  unset got
  umount "$M"; M=""
  rm -f "$D/$fs.img"
done
