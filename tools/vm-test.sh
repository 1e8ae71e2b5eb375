#!/usr/bin/env bash
# Runs kernel-level tests in a throwaway guest: Debian's 6.12 kernel (nbd, ublk, dm-thin and
# dm-snapshot as modules, which this host's kernel lacks) under qemu-system-x86_64, with no
# network device, booted from an initramfs holding busybox, the client tools (nbd-client,
# e2fsprogs, fio, util-linux, kmod, dmsetup, nbdinfo, qemu-img/qemu-nbd), the modules, the
# freshly built cowdisk binary and this repo's tools/.
#
#   tools/vm-test.sh [TEST...]        default: all of DEFAULT_TESTS below
#
# A TEST is tools/vm/tests/TEST.sh, run as root inside the guest. Each prints its output on the
# serial console, which is shown here, then "VMTEST: RESULT TEST PASS|FAIL"; this script exits
# non-zero when any test fails or does not report. It uses KVM when the guest boots with it and
# falls back to TCG (emulation: correct, but timings are not the host's).
#
# Environment: COWDISK (binary to test; default: cargo build --release), VM_ACCEL (auto, kvm or
# tcg), VM_MEM (MiB, 2048), VM_SMP (2), VM_TIMEOUT (whole run, seconds, 900), VM_TEST_TIMEOUT
# (per test, 300), VM_CACHE (~/.cache/cowdisk-vm: downloaded packages, the built initramfs),
# VM_SKIP_DEPS=1 (do not run tools/install-deps.sh), VM_KEEP_LOG (copy the console log here).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DEFAULT_TESTS=(smoke nbd-e2e nbd-server-killed nbd-double-attach ublk-e2e ublk-server-killed)
VM_CACHE=${VM_CACHE:-$HOME/.cache/cowdisk-vm}
VM_ACCEL=${VM_ACCEL:-auto}
VM_MEM=${VM_MEM:-2048}
VM_SMP=${VM_SMP:-2}
VM_TIMEOUT=${VM_TIMEOUT:-900}
VM_TEST_TIMEOUT=${VM_TEST_TIMEOUT:-300}
export VM_CACHE

die() { echo "vm-test.sh: $*" >&2; exit 1; }
say() { echo "vm-test.sh: $*" >&2; }

TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=("${DEFAULT_TESTS[@]}")
for t in "${TESTS[@]}"; do
  [[ $t =~ ^[A-Za-z0-9_-]+$ ]] || die "bad test name '$t'"
  [ -f "tools/vm/tests/$t.sh" ] || die "no such test: tools/vm/tests/$t.sh"
done
[ "$(id -u)" -eq 0 ] || die "run as root (installs packages, builds the initramfs)"
T0=$(date +%s)

# 1. Host packages and the guest's kernel, busybox and emulator (unpacked, not installed).
if [ "${VM_SKIP_DEPS:-0}" = 1 ]; then bash tools/vm/fetch.sh; else bash tools/install-deps.sh; fi
# shellcheck disable=SC1091
. "$VM_CACHE/fetched.env"
QEMU_LIBS="" QEMU_FW=()
for r in $QEMU_ROOTS; do
  [ -d "$r/usr/lib/x86_64-linux-gnu" ] && QEMU_LIBS="$QEMU_LIBS${QEMU_LIBS:+:}$r/usr/lib/x86_64-linux-gnu"
  [ -d "$r/usr/bin" ] && [ -x "$r/usr/bin/qemu-system-x86_64" ] && QEMU_BIN=$r/usr/bin/qemu-system-x86_64
  [ -d "$r/usr/share/qemu" ] && QEMU_FW+=(-L "$r/usr/share/qemu")
  [ -d "$r/usr/share/seabios" ] && QEMU_FW+=(-L "$r/usr/share/seabios")
  [ -e "$r/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so" ] && QEMU_MODULE_DIR=$r/usr/lib/x86_64-linux-gnu/qemu
done
[ -n "${QEMU_MODULE_DIR:-}" ] || die "qemu's TCG module (qemu-system-common) missing from $VM_CACHE"
export QEMU_MODULE_DIR
[ -n "${QEMU_BIN:-}" ] || die "qemu-system-x86_64 missing from the unpacked packages in $VM_CACHE"
qemu() { LD_LIBRARY_PATH=$QEMU_LIBS "$QEMU_BIN" "$@"; }
qemu --version >/dev/null 2>&1 || die "the unpacked qemu-system-x86_64 does not run: $(LD_LIBRARY_PATH=$QEMU_LIBS ldd "$QEMU_BIN" | grep 'not found' | tr -s '\t\n' '  ')"
KERNEL=$(ls "$KERNEL_ROOT"/boot/vmlinuz-*)

# 2. The binary under test.
if [ -n "${COWDISK:-}" ]; then
  BIN=$COWDISK
else
  cargo build --release -q -p cowdisk --bin cowdisk
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/cowdisk
fi
[ -x "$BIN" ] || die "$BIN: not an executable"

# 3. The cached base initramfs, keyed by every package version and the builder itself.
host_versions=$(dpkg-query -W -f='${Package}=${Version}\n' bash nbd-client e2fsprogs fio util-linux \
  mount kmod dmsetup libnbd-bin qemu-utils coreutils diffutils libc6 2>/dev/null | sort)
KEY=$( { cat "$VM_CACHE/fetched.env"; echo "$host_versions"; cat tools/vm/build-base.sh; } | sha256sum | cut -c1-16)
BASE=$VM_CACHE/base-$KEY.cpio.zst
if [ ! -s "$BASE" ]; then
  say "building the guest's base initramfs (once per package versions) ..."
  rm -f "$VM_CACHE"/base-*.cpio.zst
  bash tools/vm/build-base.sh "$BASE"
fi

RUN=$(mktemp -d /tmp/cowdisk-vm.XXXXXX)
QPID=""
cleanup() {
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then kill -KILL "$QPID" 2>/dev/null || true; fi
  [ -n "${VM_KEEP_LOG:-}" ] && [ -f "$RUN/console.log" ] && cp "$RUN/console.log" "$VM_KEEP_LOG"
  rm -rf "$RUN"
}
trap cleanup EXIT

# 4. This run's part: /init, the repo's tools/ and the binary, appended as a second archive.
mkdir -p "$RUN/over/repo" "$RUN/over/usr/local/bin"
cp tools/vm/init "$RUN/over/init"
chmod 755 "$RUN/over/init"
cp -r tools "$RUN/over/repo/tools"
cp "$BIN" "$RUN/over/usr/local/bin/cowdisk"
(cd "$RUN/over" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | zstd -q -1 > "$RUN/over.cpio.zst"
cat "$BASE" "$RUN/over.cpio.zst" > "$RUN/initrd"

# 5. Boot. KVM first (unless a previous run found it broken on this host), else TCG.
ACCEL_NOTE=$VM_CACHE/accel-$( { uname -r; qemu --version | sed -n 1p; } | sha256sum | cut -c1-12)
kvm_usable() { [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ "$(cat "$ACCEL_NOTE" 2>/dev/null)" != tcg ]; }
case $VM_ACCEL in
  auto) if kvm_usable; then ACCELS=(kvm tcg); else ACCELS=(tcg); fi ;;
  kvm|tcg) ACCELS=("$VM_ACCEL") ;;
  *) die "VM_ACCEL must be auto, kvm or tcg" ;;
esac
TESTLIST=$(IFS=,; echo "${TESTS[*]}")

boot() { # boot ACCEL: runs the guest to the end; returns 3 if KVM could not boot it
  local accel=$1 a=() i
  if [ "$accel" = kvm ]; then a=(-accel kvm -cpu host); else a=(-accel "tcg,thread=multi" -cpu max); fi
  : > "$RUN/console.log"
  # The binary itself, not the `qemu` function: `$!` of a backgrounded function is a
  # subshell, and killing it left a stuck KVM guest running after the run.
  LD_LIBRARY_PATH=$QEMU_LIBS "$QEMU_BIN" "${a[@]}" "${QEMU_FW[@]}" -M q35 -smp "$VM_SMP" -m "$VM_MEM" \
    -nographic -nic none -no-reboot -serial file:"$RUN/console.log" -monitor none \
    -kernel "$KERNEL" -initrd "$RUN/initrd" \
    -append "console=ttyS0 quiet panic=-1 vmtest.tests=$TESTLIST vmtest.timeout=$VM_TEST_TIMEOUT" \
    </dev/null >"$RUN/qemu.out" 2>&1 &
  QPID=$!
  # Show the console as it comes (tail stops with qemu).
  tail -n +1 -F --pid="$QPID" "$RUN/console.log" 2>/dev/null | sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' -e 's/^/guest| /' &
  local tailpid=$!
  local deadline=$(( $(date +%s) + VM_TIMEOUT )) probe=$(( $(date +%s) + ${VM_KVM_PROBE:-30} ))
  while kill -0 "$QPID" 2>/dev/null; do
    if [ "$accel" = kvm ] && ! grep -q 'VMTEST: BOOTED' "$RUN/console.log"; then
      if grep -q 'KVM internal error' "$RUN/qemu.out" || [ "$(date +%s)" -ge "$probe" ]; then
        kill -KILL "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true
        wait "$tailpid" 2>/dev/null || true
        say "KVM did not boot the guest ($(grep -m1 -o 'KVM internal error.*' "$RUN/qemu.out" || echo "no boot within ${VM_KVM_PROBE:-30}s")); using TCG from now on"
        echo tcg > "$ACCEL_NOTE"
        return 3
      fi
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "guest still running after ${VM_TIMEOUT}s: killed"
      kill -KILL "$QPID" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  i=0; wait "$QPID" 2>/dev/null || i=$?
  wait "$tailpid" 2>/dev/null || true
  QPID=""
  if [ "$accel" = kvm ] && ! grep -q 'VMTEST: BOOTED' "$RUN/console.log"; then
    say "KVM did not boot the guest (qemu: $(grep -m1 -i 'error' "$RUN/qemu.out" || echo "exit status $i")); using TCG from now on"
    echo tcg > "$ACCEL_NOTE"
    return 3
  fi
  [ "$i" -eq 0 ] || { say "qemu exited with status $i:"; cat "$RUN/qemu.out" >&2; }
  return 0
}

USED=""
for accel in "${ACCELS[@]}"; do
  say "booting $(basename "$KERNEL") under ${accel^^} ($VM_SMP CPUs, ${VM_MEM} MiB, no network device): ${TESTS[*]}"
  B0=$(date +%s)
  rc=0; boot "$accel" || rc=$?
  [ "$rc" -eq 3 ] && continue
  USED=$accel
  break
done
[ -n "$USED" ] || die "the guest did not boot"

# 6. Results.
LOG=$RUN/console.log
boot_s=$(tr -d '\r' < "$LOG" | sed -n 's/.*VMTEST: BOOTED \([0-9.]*\)s.*/\1/p' | sed -n 1p)
echo
echo "== guest results ($USED, guest booted in ${boot_s:-?}s, VM run $(( $(date +%s) - B0 ))s, total $(( $(date +%s) - T0 ))s)"
fail=0
for t in "${TESTS[@]}"; do
  line=$(tr -d '\r' < "$LOG" | grep -o "VMTEST: RESULT $t [A-Z]* [0-9]*s" | tail -n1 || true)
  if [ -z "$line" ]; then
    printf '%-24s %s\n' "$t" "FAIL (no result: the guest stopped or timed out before it finished)"
    fail=1
  else
    set -- $line
    printf '%-24s %s %s\n' "$t" "$4" "$5"
    [ "$4" = PASS ] || fail=1
  fi
done
grep -q 'VMTEST: DONE' <(tr -d '\r' < "$LOG") || { echo "the guest did not finish its test list"; fail=1; }
echo "(host qemu-img: $(qemu-img --version | sed -n 1p); guest emulator: $(qemu --version | sed -n 1p))"
exit "$fail"
