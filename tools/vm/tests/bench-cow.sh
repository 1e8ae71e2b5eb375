#!/usr/bin/env bash
# Measures copy-on-write block devices over the same base content, in one guest run.
# Not in the default set (it takes about 15 minutes under TCG and needs more memory):
#   VM_MEM=4096 VM_TEST_TIMEOUT=1800 VM_TIMEOUT=2400 tools/vm-test.sh bench-cow
#
# Contenders (every file on the guest's tmpfs, 64 KiB granularity everywhere):
#   ublk     cowdisk, writable top over base.cow, tools/ublk-attach.sh (cowdisk serve --ublk)
#   nbd      cowdisk, writable top over base.cow, tools/nbd-attach.sh (kernel nbd, 4 connections)
#   qcow2    qemu-nbd -c (kernel nbd, 1 connection) on a qcow2 overlay over base.raw
#   dm-thin  thin snapshot (create_snap) of a thin volume holding the base, 64 KiB pool blocks
#   dm-snap  classic dm-snapshot (persistent, 64 KiB chunks) over a loop device of base.raw
#   loop     a copy of base.raw on a loop device: no copy-on-write, the ceiling
# The device is SIZE_MB (192) of random data, in three thirds: reads of the untouched base in
# the first, 4 KiB writes one per 64 KiB block in the second (first writes, then the same
# offsets again: rewrites), 1 MiB sequential allocating writes in the third.
# Every repetition (BENCH_REPS, 3) makes every device afresh (so first writes are first), then
# runs each job on each contender in turn, the order of contenders rotated per repetition:
#   rr4k-qd1, rr4k-qd16  4 KiB random reads, BENCH_RUNTIME (3) s
#   sr1m                 1 MiB sequential reads (qd16), BENCH_RUNTIME s
#   fw4k                 first writes: one 4 KiB write per 64 KiB block of the second third, qd16
#   rw4k                 rewrites: the same writes again
#   aw1m                 1 MiB sequential allocating writes over the third third, qd16
# Then (BENCH_CHAIN=1) reads through a chain of 16 snapshots for cowdisk (ublk), qcow2 and
# dm-thin: layers that hold nothing of their own, so every read walks the chain to the base.
# Prints "BENCH rep name job IOPS MiB/s" lines, a table of medians and the goal ratios of
# issue 14. Under TCG every figure is emulated: only ratios within one run mean anything.
. /repo/tools/vm/tests/lib.sh
SIZE_MB=${BENCH_SIZE_MB:-192}
RUNTIME=${BENCH_RUNTIME:-3}
REPS=${BENCH_REPS:-3}
CHAIN=${BENCH_CHAIN:-1}
BS=65536
SECTORS=$((SIZE_MB * 2048))
THIRD=$((SIZE_MB / 3))          # MiB
NAMES=(ublk nbd qcow2 dm-thin dm-snap loop)
JOBS=(rr4k-qd1 rr4k-qd16 sr1m fw4k rw4k aw1m)

step "base: ${SIZE_MB} MiB of random data"
dd if=/dev/urandom of=base.raw bs=1M count="$SIZE_MB" status=none
cowdisk -q import base.raw base.cow >/dev/null
modprobe nbd nbds_max=16 2>/dev/null || modprobe nbd
modprobe dm-snapshot; modprobe dm-thin-pool; modprobe loop
export DM_DISABLE_UDEV=1
dm() { dmsetup --noudevsync "$@"; }
BASE_LOOP=$(losetup --find --show --read-only base.raw)
declare -A DEVS=() LOOPS=()

free_nbd() {
  local d
  for d in /sys/block/nbd*; do
    [ "$(cat "$d/size")" = 0 ] && [ ! -e "/run/cowdisk/$(basename "$d").state" ] && { echo "/dev/$(basename "$d")"; return; }
  done
  fail "no free nbd device"
}
# qcow2_attach OVERLAY -> the /dev/nbdN qemu-nbd connected
qcow2_attach() {
  local q
  q=$(free_nbd)
  qemu-nbd -c "$q" -f qcow2 --cache=writeback --aio=threads "$1"
  for _ in $(seq 100); do [ "$(cat "/sys/block/${q#/dev/}/size")" != 0 ] && break; sleep 0.1; done
  echo "$q"
}
new_loop() { # new_loop NAME FILE: a loop device, remembered for teardown
  LOOPS[$1]=$(losetup --find --show "$2")
}
# A thin pool on loop devices; $1: its name. Thin 0 holds the base (written through the device,
# so it is the pool's own data, as for a thin volume that was filled and then snapshotted).
make_pool() {
  local p=$1
  truncate -s 16M "$p-meta.img"; truncate -s "$((SIZE_MB * 2 + 64))M" "$p-data.img"
  new_loop "$p-meta" "$p-meta.img"; new_loop "$p-data" "$p-data.img"
  dd if=/dev/zero of="${LOOPS[$p-meta]}" bs=4k count=1 status=none
  dm create "$p" --table "0 $(( (SIZE_MB * 2 + 64) * 2048 )) thin-pool ${LOOPS[$p-meta]} ${LOOPS[$p-data]} $((BS / 512)) 0 1 skip_block_zeroing"
  dm message "$p" 0 "create_thin 0"
  dm create "$p-t0" --table "0 $SECTORS thin /dev/mapper/$p 0"
  dd if=base.raw of="/dev/mapper/$p-t0" bs=1M oflag=direct status=none
  dm remove "$p-t0"
}

setup_devices() {
  rm -f top-ublk.cow top-nbd.cow ov.qcow2 snap-cow.img loop.raw ./*-meta.img ./*-data.img
  cowdisk create top-ublk.cow --backing base.cow >/dev/null
  cowdisk create top-nbd.cow --backing base.cow >/dev/null
  DEVS[ublk]=$(bash /repo/tools/ublk-attach.sh top-ublk.cow)
  DEVS[nbd]=$(bash /repo/tools/nbd-attach.sh top-nbd.cow)
  qemu-img create -q -f qcow2 -b base.raw -F raw -o cluster_size=$BS ov.qcow2
  DEVS[qcow2]=$(qcow2_attach ov.qcow2)
  make_pool pool
  dm message pool 0 "create_snap 1 0"
  dm create thin --table "0 $SECTORS thin /dev/mapper/pool 1"
  DEVS[dm-thin]=/dev/mapper/thin
  truncate -s "$((SIZE_MB + 32))M" snap-cow.img   # room for the exception metadata
  new_loop snapcow snap-cow.img
  dm create snap --table "0 $SECTORS snapshot $BASE_LOOP ${LOOPS[snapcow]} P $((BS / 512))"
  DEVS[dm-snap]=/dev/mapper/snap
  cp base.raw loop.raw
  new_loop raw loop.raw
  DEVS[loop]=${LOOPS[raw]}
  local n
  for n in "${NAMES[@]}"; do
    expect_eq "$n size" "$(blockdev --getsize64 "${DEVS[$n]}")" $((SIZE_MB << 20))
    cmp -n $((4 << 20)) "${DEVS[$n]}" base.raw || fail "$n does not read the base"
  done
}
teardown_devices() {
  local d l
  for d in ublk nbd; do
    [ -n "${DEVS[$d]:-}" ] && [ -e "/run/cowdisk/$(basename "${DEVS[$d]}").state" ] && \
      bash "/repo/tools/$d-detach.sh" "${DEVS[$d]}" >/dev/null
  done
  [ -n "${DEVS[qcow2]:-}" ] && qemu-nbd -d "${DEVS[qcow2]}" >/dev/null 2>&1
  for d in thin snap pool; do dm remove "$d" 2>/dev/null || true; done
  for l in "${!LOOPS[@]}"; do losetup -d "${LOOPS[$l]}" 2>/dev/null || true; done
  DEVS=(); LOOPS=()
  rm -f top-ublk.cow top-nbd.cow ov.qcow2 snap-cow.img loop.raw pool-meta.img pool-data.img
  return 0
}
cleanup_bench() {
  teardown_devices
  for d in c16 q16 chainpool-t16 chainpool; do dm remove "$d" 2>/dev/null || true; done
  losetup -d "$BASE_LOOP" 2>/dev/null || true
  cleanup_test
}
trap cleanup_bench EXIT

# run_fio REP NAME JOB DEV -> "BENCH REP NAME JOB IOPS MiB/s" (terse v3: read iops $8, bw KiB/s
# $7; write iops $49, bw $48)
run_fio() {
  local rep=$1 n=$2 job=$3 dev=$4 a=() fw_io=$(( (THIRD << 20) / 16 ))
  case $job in
    rr4k-qd1)  a=(--rw=randread --bs=4k --iodepth=1 "--size=${THIRD}m" --time_based --runtime="$RUNTIME") ;;
    rr4k-qd16) a=(--rw=randread --bs=4k --iodepth=16 "--size=${THIRD}m" --time_based --runtime="$RUNTIME") ;;
    sr1m)      a=(--rw=read --bs=1m --iodepth=16 "--size=${THIRD}m" --time_based --runtime="$RUNTIME") ;;
    fw4k|rw4k) a=(--rw=write:60k --bs=4k --iodepth=16 "--offset=${THIRD}m" "--size=${THIRD}m" "--io_size=$fw_io") ;;
    aw1m)      a=(--rw=write --bs=1m --iodepth=16 "--offset=$((2 * THIRD))m" "--size=${THIRD}m") ;;
  esac
  fio --name="$job" --filename="$dev" --direct=1 --ioengine=libaio --randrepeat=0 --norandommap \
    --output-format=terse --terse-version=3 "${a[@]}" |
    awk -F';' -v r="$rep" -v n="$n" -v j="$job" '{
      printf "BENCH %s %s %s %d %.1f\n", r, n, j, $8 + $49, ($7 + $48) / 1024 }'
}

: > bench.txt
for rep in $(seq "$REPS"); do
  step "repetition $rep of $REPS: devices"
  setup_devices
  # Rotate the order of contenders each repetition.
  order=("${NAMES[@]:$(( (rep - 1) % ${#NAMES[@]} ))}" "${NAMES[@]:0:$(( (rep - 1) % ${#NAMES[@]} ))}")
  for job in "${JOBS[@]}"; do
    step "rep $rep: fio $job (${order[*]})"
    for n in "${order[@]}"; do
      run_fio "$rep" "$n" "$job" "${DEVS[$n]}" | tee -a bench.txt
    done
  done
  # What the writes left is what was written, on every contender.
  for n in "${NAMES[@]}"; do
    cmp -n $((THIRD << 20)) "${DEVS[$n]}" base.raw || fail "$n: the read third changed"
  done
  teardown_devices
done

if [ "$CHAIN" = 1 ]; then
  step "chains of 16 snapshots (empty layers) over the base"
  prev=base.cow
  for i in $(seq 16); do cowdisk create "c$i.cow" --backing "$prev" >/dev/null; prev=c$i.cow; done
  prev=base.raw fmt=raw
  for i in $(seq 16); do
    qemu-img create -q -f qcow2 -b "$prev" -F $fmt -o cluster_size=$BS "q$i.qcow2"; prev=q$i.qcow2 fmt=qcow2
  done
  make_pool chainpool
  for i in $(seq 16); do dm message chainpool 0 "create_snap $i $((i - 1))"; done
  dm create chainpool-t16 --table "0 $SECTORS thin /dev/mapper/chainpool 16"
  DEVS[ublk-c16]=$(bash /repo/tools/ublk-attach.sh c16.cow)
  DEVS[qcow2-c16]=$(qcow2_attach q16.qcow2)
  DEVS[dm-thin-c16]=/dev/mapper/chainpool-t16
  CNAMES=(ublk-c16 qcow2-c16 dm-thin-c16)
  for n in "${CNAMES[@]}"; do
    cmp -n $((4 << 20)) "${DEVS[$n]}" base.raw || fail "$n does not read the base"
  done
  for rep in $(seq "$REPS"); do
    for job in rr4k-qd16 sr1m; do
      for n in "${CNAMES[@]}"; do run_fio "$rep" "$n" "$job" "${DEVS[$n]}" | tee -a bench.txt; done
    done
  done
  bash /repo/tools/ublk-detach.sh "${DEVS[ublk-c16]}" >/dev/null
  qemu-nbd -d "${DEVS[qcow2-c16]}" >/dev/null
  dm remove chainpool-t16
  dm remove chainpool
  for l in "${!LOOPS[@]}"; do losetup -d "${LOOPS[$l]}"; done
  DEVS=(); LOOPS=()
fi

# ---- Summary: medians, spreads, goal ratios ----
med() { # med NAME JOB [FIELD: 5 IOPS (default), 6 MiB/s]
  awk -v n="$1" -v j="$2" -v f="${3:-5}" '$3 == n && $4 == j {print $f}' bench.txt | sort -n |
    awk '{v[NR] = $1} END {if (NR == 0) print "-"; else print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
spread() { # min-max of the repetitions
  awk -v n="$1" -v j="$2" -v f="${3:-5}" '$3 == n && $4 == j {print $f}' bench.txt | sort -n |
    awk 'NR == 1 {lo = $1} {hi = $1} END {if (NR) printf "%s-%s", lo, hi; else printf "-"}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b}'; }
echo
echo "guest: $(nproc) vCPUs, kernel $(uname -r), $(fio --version); libaio direct, ${RUNTIME}s timed runs," \
  "median of $REPS repetitions (devices made afresh each), ${SIZE_MB} MiB devices"
echo "Under TCG every figure is emulated: only ratios within this run mean anything."
echo
echo "IOPS (4 KiB jobs) or MiB/s (1 MiB jobs), median [min-max of the repetitions]:"
printf '%-10s' job; for n in "${NAMES[@]}"; do printf ' | %-20s' "$n"; done; echo
for job in "${JOBS[@]}"; do
  f=5; case $job in *1m) f=6 ;; esac
  printf '%-10s' "$job"
  for n in "${NAMES[@]}"; do printf ' | %-20s' "$(med "$n" "$job" $f) [$(spread "$n" "$job" $f)]"; done
  echo
done
if [ "$CHAIN" = 1 ]; then
  echo
  echo "Chains of 16 empty snapshots (ratio to the same contender's depth-1 device above):"
  for job in rr4k-qd16 sr1m; do
    f=5; case $job in *1m) f=6 ;; esac
    printf '%-10s' "$job"
    for n in ublk qcow2 dm-thin; do
      v=$(med "$n-c16" "$job" $f)
      printf ' | %-32s' "$n-c16 $v [$(spread "$n-c16" "$job" $f)] ($(ratio "$v" "$(med "$n" "$job" $f)"))"
    done
    echo
  done
fi

echo
echo "Goals of issue 14 (medians):"
goal() { # goal DESCRIPTION VALUE MIN
  local ok=missed
  [ "$2" != "-" ] && awk -v v="$2" -v m="$3" 'BEGIN {exit !(v >= m)}' && ok=met
  printf '  %-44s %6s  (goal >= %s)  %s\n' "$1" "$2" "$3" "$ok"
}
goal "ublk / nbd, rr4k-qd16" "$(ratio "$(med ublk rr4k-qd16)" "$(med nbd rr4k-qd16)")" 1.5
goal "ublk / nbd, fw4k" "$(ratio "$(med ublk fw4k)" "$(med nbd fw4k)")" 1.5
goal "ublk / loop, rr4k-qd16" "$(ratio "$(med ublk rr4k-qd16)" "$(med loop rr4k-qd16)")" 0.7
goal "ublk / loop, fw4k" "$(ratio "$(med ublk fw4k)" "$(med loop fw4k)")" 0.7
for job in "${JOBS[@]}"; do
  f=5; case $job in *1m) f=6 ;; esac
  goal "nbd / qcow2, $job" "$(ratio "$(med nbd "$job" $f)" "$(med qcow2 "$job" $f)")" 1.0
done
goal "ublk / dm-snap, fw4k" "$(ratio "$(med ublk fw4k)" "$(med dm-snap fw4k)")" 1.0
goal "ublk / dm-thin, fw4k" "$(ratio "$(med ublk fw4k)" "$(med dm-thin fw4k)")" 0.8
step "done"
