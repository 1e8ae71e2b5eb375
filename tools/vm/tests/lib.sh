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
