# shellcheck shell=bash
# Helpers for the guest tests (sourced). Each test runs as root in a fresh folder under /tmp
# (tmpfs), with COWDISK and REPO set by tools/vm/guest-run.sh.
set -euo pipefail
# Any failing command names itself, not only fail().
# shellcheck disable=SC2154  # rc is set inside the trap string
trap 'rc=$?; echo "FAILED: line $LINENO of $(basename "$0"): $BASH_COMMAND (status $rc)" >&2' ERR
T0=$(date +%s)
# Whatever happens, the next test starts with nothing mounted or attached.
cleanup_test() {
  local st
  grep -q " $PWD/mnt " /proc/mounts 2>/dev/null && umount -l "$PWD/mnt" 2>/dev/null
  for st in /run/cowdisk/*.state; do
    [ -e "$st" ] || continue
    case $(basename "$st") in
      ublkb*) bash /repo/tools/ublk-detach.sh "/dev/$(basename "$st" .state)" >/dev/null 2>&1 || true ;;
      *) bash /repo/tools/nbd-detach.sh "/dev/$(basename "$st" .state)" >/dev/null 2>&1 || true ;;
    esac
  done
  return 0
}
trap cleanup_test EXIT
step() { echo "-- [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# expect_eq WHAT GOT WANT
expect_eq() { [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"; }
# The server PID nbd-attach.sh recorded for DEV.
attach_state() { # attach_state DEV VAR
  sed -n "s/^$2=//p" "/run/cowdisk/$(basename "$1").state"
}
# PIDs of running `cowdisk serve` processes, one a line.
server_pids() {
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q '^[^ ]*cowdisk serve ' && basename "$p"
  done
  return 0
}
# Sockets the process holds (listener included).
socket_count() {
  local f n=0
  for f in "/proc/$1"/fd/*; do [[ $(readlink "$f") == socket:* ]] && n=$((n + 1)); done
  echo "$n"
}
# A base with recognisable content: 32 MiB of random data at the start, then 4 MiB at 200 MiB,
# of a 256 MiB disk; prints nothing. Leaves base.raw for comparisons.
make_base() {
  truncate -s 256M base.raw
  dd if=/dev/urandom of=base.raw bs=1M count=32 conv=notrunc status=none
  dd if=/dev/urandom of=base.raw bs=1M count=4 seek=200 conv=notrunc status=none
  cowdisk -q import base.raw base.cow >/dev/null
  cowdisk create vm1.cow --backing base.cow >/dev/null
}
# ext4 on a block device DEV (mkfs.ext4 given the options after DEV): files written, fio
# verify on the file system, fstrim, remount with every file intact, e2fsck clean. Leaves
# DEV unmounted and files.sum (the files' sums) behind.
ext4_exercise() {
  local DEV=$1; shift
  mkfs.ext4 -q -F "$@" "$DEV"
  mkdir -p mnt
  mount "$DEV" mnt
  dd if=/dev/urandom of=mnt/a.bin bs=1M count=16 status=none
  mkdir mnt/dir
  for i in $(seq 1 40); do head -c $((i * 1000)) /dev/urandom > "mnt/dir/f$i"; done
  head -c $((32 << 20)) base.raw > mnt/base-head.bin
  (cd mnt && find . -type f | sort | xargs sha256sum) > files.sum
  step "fio on ext4 + verify"
  fio --name=fs --directory=mnt --filename=fio.dat --size=16m --rw=randwrite --bs=16k --direct=1 \
      --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null
  echo "fio on ext4 verify: ok"
  rm mnt/fio.dat
  step "fstrim, remount, e2fsck"
  fstrim -v mnt
  umount mnt
  mount "$DEV" mnt
  (cd mnt && sha256sum -c --quiet ../files.sum) || fail "files differ after remount"
  umount mnt
  e2fsck -fn "$DEV" || fail "e2fsck -fn found problems"
}
