#!/usr/bin/env bash
# bench-remote.sh: reading a disk whose base layer is in S3-compatible object storage.
#
# A local S3 server (SeaweedFS `weed mini` on 127.0.0.1, telemetry off) holds the base;
# each contender serves a writable top over it by NBD and fio reads the whole disk:
#   cowdisk-remote   cowdisk serve on a top over the pushed base (host cache on disk)
#   nbdkit-curl      nbdkit --filter=cow --filter=cache curl ... cache-on-read=true (range
#                    GETs of the raw base object; the closest peer to a writable top over
#                    a remote base)
#   cowdisk-local    cowdisk serve on a top over the same base as a local file (what warm
#                    remote reads should approach)
# Also: bytes fetched for a cold whole-disk read against the data the base holds (the host
# cache's allocated bytes afterwards), and a recorded "boot" (dependent 4 KiB reads, QD 1,
# over a quarter of the disk) replayed on a cold cache with and without `serve --prefetch`
# of its trace.
#   qemu-curl        qemu-nbd on a qcow2 top whose backing file is the raw object through
#                    qemu's curl driver (Debian's qemu-block-extra, from bookworm-backports
#                    to match qemu-utils 10.0; tools/install-deps.sh --bench installs it).
#                    No host cache: its warm reads go to the store again.
# Each is measured cold (fresh cache, every block comes from the store) and warm (the
# same server again, every block cached). A loopback store has no real latency, so the
# cold rows measure the fetch path's overheads (request count, verification, caching),
# not a WAN.
#
# Usage: tools/bench-remote.sh [--quick] [--help]
# Environment (defaults in brackets; --quick changes them):
#   BENCH_DIR      scratch directory [/var/tmp/cowdisk-bench-remote]
#   BENCH_SIZE_MB  virtual size of the base, all of it data [512; quick 128]
#   BENCH_REPS     repetitions [3; quick 1]
#   COWDISK        cowdisk binary [target/release/cowdisk]
#   BENCH_OUT      where results.tsv and the table go [bench-results/remote]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-remote: unknown argument $a" >&2; exit 2 ;;
  esac
done
if ((QUICK)); then d_size=128 d_reps=1; else d_size=512 d_reps=3; fi
BENCH_DIR=${BENCH_DIR:-/var/tmp/cowdisk-bench-remote}
SIZE_MB=${BENCH_SIZE_MB:-$d_size}
REPS=${BENCH_REPS:-$d_reps}
COWDISK=${COWDISK:-$ROOT/target/release/cowdisk}
OUT=${BENCH_OUT:-$ROOT/bench-results/remote}
BUCKET=cowdisk-bench
S3_PORT=${BENCH_S3_PORT:-28433}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for t in weed fio nbdkit jq curl; do command -v "$t" >/dev/null || die "$t missing (tools/install-deps.sh)"; done
[[ -x $COWDISK ]] || die "$COWDISK missing: cargo build --release"
HAVE_QEMU_CURL=0
if ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1; then HAVE_QEMU_CURL=1
else log "qemu's curl driver missing (tools/install-deps.sh --bench): no qemu-curl rows"; fi

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

rm -rf "$BENCH_DIR" && mkdir -p "$BENCH_DIR/weed" "$OUT"
RUN=$BENCH_DIR
SOCK=$RUN/nbd.sock
RES=$OUT/results.tsv
printf 'rep\tworkload\tcontender\tMiB_s\tIOPS\n' >"$RES"
: >"$OUT/fetched.tsv"

log "starting SeaweedFS on 127.0.0.1:$S3_PORT"
weed mini -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -admin.ui=false -webdav=false \
  -s3.port.iceberg=0 -s3.port.lance=0 -dir="$RUN/weed" -bucket=$BUCKET \
  -master.port=$((S3_PORT + 1)) -volume.port=$((S3_PORT + 2)) -filer.port=$((S3_PORT + 3)) \
  -s3.port=$S3_PORT -admin.port=$((S3_PORT + 4)) >"$RUN/weed.log" 2>&1 &
PIDS+=($!)
ENDPOINT=http://127.0.0.1:$S3_PORT
for _ in $(seq 100); do
  [[ $(curl -s -o /dev/null -w '%{http_code}' "$ENDPOINT/$BUCKET/") == 200 ]] && break
  sleep 0.2
done
export AWS_ENDPOINT_URL=$ENDPOINT AWS_SHARED_CREDENTIALS_FILE=/nonexistent AWS_CONFIG_FILE=/nonexistent

log "making a ${SIZE_MB} MiB base (all data) and pushing it"
head -c $((SIZE_MB * 1048576)) /dev/urandom >"$RUN/base.raw"
"$COWDISK" import -q "$RUN/base.raw" "$RUN/base.cow" >/dev/null
"$COWDISK" create "$RUN/top.cow" --backing "$RUN/base.cow" >/dev/null
URL=$("$COWDISK" push "$RUN/top.cow" "s3://$BUCKET/base" 2>/dev/null)
curl -s -f -T "$RUN/base.raw" "$ENDPOINT/$BUCKET/raw/base.raw" >/dev/null || die "upload of base.raw"

start() {  # start CMD...: in the background on $SOCK, waits until it answers
  rm -f "$SOCK"
  "$@" >>"$RUN/server.log" 2>&1 &
  SERVER=$!
  PIDS+=("$SERVER")
  for _ in $(seq 200); do [[ -S $SOCK ]] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return; sleep 0.05; done
  die "server did not start: $*"
}
stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }

fio_once() {  # fio_once WORKLOAD CONTENDER REP -- FIO-ARGS
  local wl=$1 who=$2 rep=$3; shift 4
  local json=$RUN/$wl.$who.$rep.json
  fio --output-format=json --output="$json" --name="$who" --ioengine=nbd \
    --uri="nbd+unix:///?socket=$SOCK" "$@" >/dev/null || die "fio $wl $who"
  sed -n '/^{/,$p' "$json" | jq -r --arg w "$wl" --arg c "$who" --arg r "$rep" \
    '.jobs[0].read as $x | [$r, $w, $c, ($x.bw_bytes / 1048576), $x.iops] | @tsv' >>"$RES"
}
SEQ=(--rw=read --bs=1M --iodepth=8 --size=${SIZE_MB}m)
RAND=(--rw=randread --bs=4k --iodepth=16 --size=${SIZE_MB}m --io_size=$((SIZE_MB / 8))m --randseed=7)
# A boot: dependent reads (one at a time) scattered over a quarter of the disk.
BOOT=(--rw=randread --bs=4k --iodepth=1 --size=$((SIZE_MB / 4))m --io_size=$((SIZE_MB / 64))m --randseed=11)

for rep in $(seq "$REPS"); do
  for wl in seqread randread; do
    if [[ $wl == seqread ]]; then args=("${SEQ[@]}"); else args=("${RAND[@]}"); fi
    log "rep $rep $wl: cowdisk-local"
    rm -f "$RUN/ltop.cow"
    "$COWDISK" create "$RUN/ltop.cow" --backing "$RUN/base.cow" >/dev/null
    start "$COWDISK" serve "$RUN/ltop.cow" --socket "$SOCK"
    fio_once "$wl-cold" cowdisk-local "$rep" -- "${args[@]}"
    fio_once "$wl-warm" cowdisk-local "$rep" -- "${args[@]}"
    stop
  done
  # Bytes fetched by a cold whole-disk read: what the host cache holds afterwards.
  rm -rf "$RUN/cache" "$RUN/rtop.cow"
  "$COWDISK" create "$RUN/rtop.cow" --backing "$URL" >/dev/null
  start "$COWDISK" serve "$RUN/rtop.cow" --socket "$SOCK" --cache-dir "$RUN/cache"
  fio --name=whole --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" "${SEQ[@]}" >/dev/null
  stop
  fetched=$(du -s --block-size=1 "$RUN/cache" | cut -f1)
  printf '%s\t%s\t%s\n' "$rep" "$fetched" "$((SIZE_MB * 1048576))" >>"$OUT/fetched.tsv"
  # A boot trace: recorded once, then replayed on a cold cache with and without prefetch.
  rm -rf "$RUN/cache" "$RUN/rtop.cow" "$RUN/boot.trace"
  "$COWDISK" create "$RUN/rtop.cow" --backing "$URL" >/dev/null
  start "$COWDISK" serve "$RUN/rtop.cow" --socket "$SOCK" --cache-dir "$RUN/cache" \
    --record-trace "$RUN/boot.trace"
  fio --name=record --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" "${BOOT[@]}" >/dev/null
  stop
  for mode in plain prefetch; do
    rm -rf "$RUN/cache"
    pf=(); [[ $mode == prefetch ]] && pf=(--prefetch "$RUN/boot.trace")
    start "$COWDISK" serve "$RUN/rtop.cow" --socket "$SOCK" --cache-dir "$RUN/cache" "${pf[@]}"
    fio_once "boot-$mode" cowdisk-remote "$rep" -- "${BOOT[@]}"
    stop
  done
  for wl in seqread randread; do
    if [[ $wl == seqread ]]; then args=("${SEQ[@]}"); else args=("${RAND[@]}"); fi
    log "rep $rep $wl: cowdisk-remote"
    rm -rf "$RUN/cache" "$RUN/rtop.cow"
    "$COWDISK" create "$RUN/rtop.cow" --backing "$URL" >/dev/null
    start "$COWDISK" serve "$RUN/rtop.cow" --socket "$SOCK" --cache-dir "$RUN/cache"
    fio_once "$wl-cold" cowdisk-remote "$rep" -- "${args[@]}"
    fio_once "$wl-warm" cowdisk-remote "$rep" -- "${args[@]}"
    stop
    log "rep $rep $wl: nbdkit-curl"
    mkdir -p "$RUN/tmp"
    start env TMPDIR="$RUN/tmp" nbdkit -f -U "$SOCK" --filter=cow --filter=cache \
      curl "$ENDPOINT/$BUCKET/raw/base.raw" cache-on-read=true
    fio_once "$wl-cold" nbdkit-curl "$rep" -- "${args[@]}"
    fio_once "$wl-warm" nbdkit-curl "$rep" -- "${args[@]}"
    stop
    if ((HAVE_QEMU_CURL)); then
      log "rep $rep $wl: qemu-curl"
      rm -f "$RUN/qtop.qcow2"
      qemu-img create -q -f qcow2 -F raw -b "$ENDPOINT/$BUCKET/raw/base.raw" "$RUN/qtop.qcow2"
      start qemu-nbd -t -e 8 -f qcow2 --socket "$SOCK" "$RUN/qtop.qcow2"
      fio_once "$wl-cold" qemu-curl "$rep" -- "${args[@]}"
      fio_once "$wl-warm" qemu-curl "$rep" -- "${args[@]}"
      stop
    fi
  done
done

# Median over repetitions, one row per workload and contender.
python3 - "$RES" <<'PY' | tee "$OUT/table.md"
import csv, statistics, sys
rows = {}
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    rows.setdefault((r["workload"], r["contender"]), []).append((float(r["MiB_s"]), float(r["IOPS"])))
print("| workload | contender | MiB/s | IOPS |")
print("|---|---|---|---|")
for (w, c), v in sorted(rows.items()):
    print(f"| {w} | {c} | {statistics.median(x[0] for x in v):.0f} | {statistics.median(x[1] for x in v):.0f} |")
med = lambda w, c: statistics.median(x[1] for x in rows.get((w, c), [(0, 0)]))
def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"
print()
print("| goal | measured | target |")
print("|---|---:|---:|")
for wl in ("seqread", "randread"):
    print(f"| warm {wl}: cowdisk-remote / cowdisk-local | {ratio(med(wl + '-warm', 'cowdisk-remote'), med(wl + '-warm', 'cowdisk-local'))} | >= 0.9 |")
print(f"| cold seqread: cowdisk-remote / nbdkit-curl | {ratio(med('seqread-cold', 'cowdisk-remote'), med('seqread-cold', 'nbdkit-curl'))} | >= 1.5 |")
print(f"| cold randread 4k qd16: cowdisk-remote / nbdkit-curl | {ratio(med('randread-cold', 'cowdisk-remote'), med('randread-cold', 'nbdkit-curl'))} | >= 1.5 |")
import os
fetched = os.path.join(os.path.dirname(sys.argv[1]), "fetched.tsv")
if os.path.exists(fetched):
    v = [int(l.split()[1]) / int(l.split()[2]) for l in open(fetched) if l.strip()]
    print(f"| bytes fetched for a cold whole-disk read / data held | {statistics.median(v):.3f} | <= 1.05 |")
print(f"| boot replay on a cold cache: with prefetch / without | {ratio(med('boot-prefetch', 'cowdisk-remote'), med('boot-plain', 'cowdisk-remote'))} | >= 2 |")
PY
