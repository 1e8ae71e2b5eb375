#!/usr/bin/env bash
# Measures copy-on-write block devices over the same base content, in one guest run:
#   cowdisk   base.cow + writable top, kernel nbd via tools/nbd-attach.sh (4 connections)
#   qcow2     qemu-nbd -c (kernel nbd, 1 connection) on a qcow2 overlay over base.raw
#   dm-snap   dm-snapshot (persistent, 64 KiB chunks) over a loop device of base.raw
#   dm-thin   dm-thin external-origin volume (64 KiB blocks) over a loop device of base.raw
# Every image/store is a file on the guest's tmpfs. fio (libaio, direct, qd16) runs, in order:
# 4 KiB random reads of the untouched overlay (served by the base), 4 KiB random writes (first
# writes: copy-up; later rounds rewrite), 256 KiB sequential reads; contenders interleaved,
# BENCH_REPS rounds (3) of BENCH_RUNTIME seconds (5). Prints "BENCH name job IOPS MiB/s" lines and a
# table with each contender's ratio to cowdisk. Not in the default set: tools/vm-test.sh bench-cow.
. /repo/tools/vm/tests/lib.sh
SIZE_MB=${BENCH_SIZE_MB:-128}
RUNTIME=${BENCH_RUNTIME:-5}
REPS=${BENCH_REPS:-3}
BS=65536
SECTORS=$((SIZE_MB * 2048))

step "base: ${SIZE_MB} MiB of random data"
dd if=/dev/urandom of=base.raw bs=1M count="$SIZE_MB" status=none
cowdisk -q import base.raw base.cow >/dev/null
cowdisk create vm1.cow --backing base.cow >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw -o cluster_size=$BS ov.qcow2
modprobe nbd nbds_max=16 2>/dev/null || modprobe nbd
modprobe dm-snapshot; modprobe dm-thin-pool; modprobe loop
export DM_DISABLE_UDEV=1
dm() { dmsetup --noudevsync "$@"; }

BASE_LOOP=$(losetup --find --show --read-only base.raw)
truncate -s "$((SIZE_MB + 32))M" snap-cow.img   # room for the exception metadata
SNAP_LOOP=$(losetup --find --show snap-cow.img)
truncate -s 16M thin-meta.img
truncate -s "$((SIZE_MB + 32))M" thin-data.img
META_LOOP=$(losetup --find --show thin-meta.img)
DATA_LOOP=$(losetup --find --show thin-data.img)
dd if=/dev/zero of="$META_LOOP" bs=4k count=1 status=none
cleanup_bench() {
  dm remove thin 2>/dev/null; dm remove pool 2>/dev/null; dm remove snap 2>/dev/null
  [ -n "${QDEV:-}" ] && qemu-nbd -d "$QDEV" >/dev/null 2>&1
  for l in "$BASE_LOOP" "$SNAP_LOOP" "$META_LOOP" "$DATA_LOOP"; do losetup -d "$l" 2>/dev/null; done
  cleanup_test
}
trap cleanup_bench EXIT

step "devices"
COW_DEV=$(bash /repo/tools/nbd-attach.sh vm1.cow)
QDEV=""
for d in /sys/block/nbd*; do
  [ "$(cat "$d/size")" = 0 ] && { QDEV=/dev/$(basename "$d"); break; }
done
qemu-nbd -c "$QDEV" -f qcow2 --cache=writeback --aio=threads ov.qcow2
for _ in $(seq 100); do [ "$(cat "/sys/block/${QDEV#/dev/}/size")" != 0 ] && break; sleep 0.1; done
dm create snap --table "0 $SECTORS snapshot $BASE_LOOP $SNAP_LOOP P $((BS / 512))"
dm create pool --table "0 $SECTORS thin-pool $META_LOOP $DATA_LOOP $((BS / 512)) 0 1 skip_block_zeroing"
dm message pool 0 "create_thin 0"
dm create thin --table "0 $SECTORS thin /dev/mapper/pool 0 $BASE_LOOP"
declare -A DEVS=([cowdisk]=$COW_DEV [qcow2]=$QDEV [dm-snap]=/dev/mapper/snap [dm-thin]=/dev/mapper/thin)
NAMES=(cowdisk qcow2 dm-snap dm-thin)
for n in "${NAMES[@]}"; do
  echo "$n: ${DEVS[$n]} $(blockdev --getsize64 "${DEVS[$n]}") bytes"
  expect_eq "$n size" "$(blockdev --getsize64 "${DEVS[$n]}")" $((SIZE_MB << 20))
  cmp -n $((4 << 20)) "${DEVS[$n]}" base.raw || fail "$n does not read the base"
done

# run_fio NAME JOB ARGS... -> "BENCH NAME JOB IOPS MiB/s" (terse v3: read iops $8, bw KiB/s $7;
# write iops $49, bw $48)
run_fio() {
  local n=$1 job=$2; shift 2
  local out
  out=$(fio --name="$job" --filename="${DEVS[$n]}" --direct=1 --ioengine=libaio --iodepth=16 \
    --time_based --runtime="$RUNTIME" --size="${SIZE_MB}m" --randrepeat=0 --norandommap \
    --output-format=terse --terse-version=3 "$@")
  echo "$out" | awk -F';' -v n="$n" -v j="$job" '{
    iops = $8 + $49; bw = ($7 + $48) / 1024
    printf "BENCH %s %s %d %.1f\n", n, j, iops, bw }'
}
: > bench.txt
# Contenders interleaved, REPS rounds; the table gives each one's median.
for job in rr4k rw4k sr256k; do
  for rep in $(seq "$REPS"); do
    step "fio $job, round $rep of $REPS"
    for n in "${NAMES[@]}"; do
      case $job in
        rr4k) run_fio "$n" $job --rw=randread --bs=4k ;;
        rw4k) run_fio "$n" $job --rw=randwrite --bs=4k ;;
        sr256k) run_fio "$n" $job --rw=read --bs=256k ;;
      esac | tee -a bench.txt
    done
  done
done
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
echo
echo "guest: $(nproc) vCPUs, kernel $(uname -r); fio libaio direct qd16, ${RUNTIME}s per run, median of $REPS interleaved rounds, ${SIZE_MB} MiB device"
printf '%-8s' job; for n in "${NAMES[@]}"; do printf ' | %-18s' "$n IOPS (x cowdisk)"; done; echo
for job in rr4k rw4k sr256k; do
  ref=$(awk -v j=$job '$2 == "cowdisk" && $3 == j {print $4}' bench.txt | median)
  printf '%-8s' "$job"
  for n in "${NAMES[@]}"; do
    v=$(awk -v n="$n" -v j=$job '$2 == n && $3 == j {print $4}' bench.txt | median)
    printf ' | %-18s' "$v ($(awk -v a="$v" -v b="$ref" 'BEGIN {printf "%.2f", b ? a / b : 0}'))"
  done
  echo
done
step "done"
