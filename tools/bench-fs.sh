#!/usr/bin/env bash
# bench-fs.sh: tools/bench-peers.sh on the file systems VMs run on. Each of ext4, XFS
# (reflink=1) and btrfs is made in a loop file on the machine's own disk (not tmpfs) and
# mounted; tmpfs is mounted fresh. Every contender of bench-peers.sh runs on each, in the
# same run, so ratios within one file system compare like with like.
#
# Usage: tools/bench-fs.sh [--fs "ext4 xfs btrfs tmpfs"] [bench-peers.sh arguments…]
#   e.g. tools/bench-fs.sh --quick ; tools/bench-fs.sh --fs xfs
# Environment: BENCH_FS_DIR, where the loop files and mount points go [/var/tmp/cowdisk-fs];
#   BENCH_FS_SIZE_MB, size of each loop file [4096]; BENCH_FS_TAG, appended to the results
#   directory [none]. Results: bench-results/fs-<name>[-TAG]/.
# Needs root, mkfs.ext4, mkfs.xfs and mkfs.btrfs (tools/install-deps.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/common.sh
. "$ROOT/tools/common.sh"
FSES="ext4 xfs btrfs tmpfs"
ARGS=()
while (($#)); do
  case $1 in
    --fs) FSES=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
BASE=${BENCH_FS_DIR:-/var/tmp/cowdisk-fs}
SIZE=${BENCH_FS_SIZE_MB:-4096}
[[ $(id -u) == 0 ]] || { echo "bench-fs: needs root (mount)" >&2; exit 1; }
mkdir -p "$BASE"
cleanup() { for fs in $FSES; do umount "$BASE/mnt-$fs" 2>/dev/null || true; done; }
trap cleanup EXIT
for fs in $FSES; do
  mnt=$BASE/mnt-$fs
  mount_fresh_fs "$mnt" "$fs" "$SIZE" "$BASE/$fs.img" || exit 2
  out=$ROOT/bench-results/fs-$fs${BENCH_FS_TAG:+-$BENCH_FS_TAG}
  mkdir -p "$out"
  echo "bench-fs: $fs on $mnt" >&2
  BENCH_DIR=$mnt BENCH_OUT=$out BENCH_MD= \
    bash "$ROOT/tools/bench-peers.sh" "${ARGS[@]}"
  umount "$mnt"
  rm -f "$BASE/$fs.img"
done
