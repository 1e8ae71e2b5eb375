#!/usr/bin/env bash
# bench-qd1.sh: random 4 KiB reads at queue depth 1 (and 16), `cowdisk serve` against
# `qemu-nbd` on qcow2, with fio and the server pinned to one CPU and unpinned.
#
# At queue depth 1 a request waits for no other, so what it costs is the server's own
# path: a thread hand-off or a wake-up shows up directly in the latency. Pinning fio and
# the server to the same CPU makes every hand-off a context switch.
#
# Each repetition alternates the contenders; both serve a read-only top over a base of
# random data (reads fall through to the base), both on the same file system, page cache
# warm. Prints one line per case and repetition (IOPS and p50 completion latency), then
# the medians and the ratios cowdisk ÷ qemu-nbd.
#
# Usage: tools/bench-qd1.sh [--help]
# Environment: BENCH_DIR [/var/tmp/cowdisk-bench-qd1], BENCH_REPS [5], BENCH_RUNTIME [5],
# COWDISK [target/release/cowdisk], BENCH_CPU, the CPU to pin to [0].
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/common.sh
. "$ROOT/tools/common.sh"
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
D=${BENCH_DIR:-/var/tmp/cowdisk-bench-qd1}
REPS=${BENCH_REPS:-5}
RT=${BENCH_RUNTIME:-5}
CPU=${BENCH_CPU:-0}
BIN=${COWDISK:-$ROOT/target/release/cowdisk}
for t in fio jq qemu-img qemu-nbd taskset python3; do
  command -v $t >/dev/null || { echo "bench-qd1: $t missing" >&2; exit 1; }
done
[[ -x $BIN ]] || { echo "bench-qd1: $BIN missing: cargo build --release" >&2; exit 1; }
mkdir -p "$D"; cd "$D"
bench_base "$BIN" 512
rm -f top.cow top.qcow2
"$BIN" create top.cow --backing base.cow >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=65536 -F qcow2 -b "$D/base.qcow2" top.qcow2
cat base.cow base.qcow2 >/dev/null  # what the servers read: page cache warm
PID=
trap '[[ -n $PID ]] && kill "$PID" 2>/dev/null; true' EXIT
SOCK=$D/s.sock
serve() {  # serve NAME PIN(0|1)
  local pin=(); (($2)) && pin=(taskset -c "$CPU")
  rm -f "$SOCK"
  case $1 in
    cowdisk) "${pin[@]}" "$BIN" serve top.cow --read-only --socket "$SOCK" >/dev/null 2>&1 & ;;
    qemu-nbd) "${pin[@]}" qemu-nbd -t -r --shared=16 --cache=writeback --aio=threads \
      -f qcow2 --socket "$SOCK" "$D/top.qcow2" & ;;
  esac
  PID=$!
  for _ in $(seq 100); do [[ -S $SOCK ]] && return; sleep 0.05; done
  echo "bench-qd1: $1 did not start" >&2; exit 1
}
measure() {  # measure PIN QD: prints "IOPS P50_US"
  local pin=(); (($1)) && pin=(taskset -c "$CPU")
  "${pin[@]}" fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=randread \
    --bs=4k --iodepth="$2" --size=512m --time_based --runtime="$RT" --ramp_time=1 \
    --randseed=7 --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
    jq -r '.jobs[0].read | "\(.iops | floor) \(.clat_ns.percentile["50.000000"] / 1000)"'
}
OUT=$D/results.txt; : >"$OUT"
for rep in $(seq "$REPS"); do
  for pin in 1 0; do
    for qd in 1 16; do
      for c in cowdisk qemu-nbd; do
        serve "$c" "$pin"
        r=$(measure "$pin" "$qd")
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
        echo "$rep $c pinned=$pin qd=$qd iops_p50us=$r" | tee -a "$OUT"
      done
    done
  done
done
python3 - "$OUT" <<'EOF'
import sys, statistics as st, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    rep, c, pin, qd, r = line.split()[:5]
    iops, p50 = float(r.split('=')[1]), float(line.split()[5])
    rows[(pin, qd, c)].append((iops, p50))
for pin in ("pinned=1", "pinned=0"):
    for qd in ("qd=1", "qd=16"):
        m = {c: (st.median(i for i, _ in rows[(pin, qd, c)]), st.median(p for _, p in rows[(pin, qd, c)]))
             for c in ("cowdisk", "qemu-nbd")}
        (ci, cp), (qi, qp) = m["cowdisk"], m["qemu-nbd"]
        print(f"{pin} {qd}: cowdisk {ci:.0f} IOPS p50 {cp:.1f} us; qemu-nbd {qi:.0f} IOPS p50 {qp:.1f} us; "
              f"ratio {ci / qi:.2f}")
EOF
