#!/usr/bin/env bash
# bench-peers.sh: cowdisk against its peers over NBD, same data, same client, same run.
#
# Contenders (fio ioengine=nbd over a unix socket, except psync-raw):
#   cowdisk-dN    cowdisk serve on a chain of depth N (base + N-1 layers); writable ones
#                 with --flush-journal off (the journal rows are the default on disks)
#   qcow2-dN      qemu-nbd -f qcow2 on a qcow2 backing chain of the same depth and bytes
#   cowdisk-share-top  (writes, on XFS and btrfs) serve --copy-up share: copy-ups share
#                 the base's extents
#   cowdisk-journal-top  (writes) serve --flush-journal 64M (what the default, auto, gives
#                 on a disk file system): flushes of writes into blocks the top holds
#                 sync a journal beside the top, not the top
#   qcow2x-top    (writes) a qcow2 top with extended_l2=on: 2 KiB subclusters, a first
#                 4 KiB write copies nothing
#   nbdkit-cow    nbdkit --filter=cow file base.raw (one overlay)
#   nbdkit-file   nbdkit file base.raw               (raw over NBD: the NBD ceiling)
#   qemu-nbd-raw  qemu-nbd -f raw base.raw           (raw over NBD)
#   psync-raw     fio ioengine=psync on base.raw     (no NBD: the machine's limit)
#   psync-fresh64k  fio psync, 64 KiB writes into a fresh sparse file (first writes' floor:
#                 what the file system charges for the 64 KiB a copy-up allocates)
#
# Usage: tools/bench-peers.sh [--quick] [--no-cowdisk] [--rebuild] [--no-report]
#                             [--only-report] [--help]
# Environment (defaults in brackets; --quick changes them):
#   BENCH_DIR      scratch directory for images and raw results [/var/tmp/cowdisk-bench]
#   BENCH_SIZE_MB  virtual size of every image in MiB [1024; quick 256]
#   BENCH_RUNTIME  seconds per time-based fio run [3; quick 2]
#   BENCH_RAMP     fio ramp_time seconds (not measured) [1; quick 0]
#   BENCH_REPS     repetitions, contenders interleaved in each [3; quick 1]
#   BENCH_DEPTHS   chain depths [1 16 64]
#   BENCH_LAYER_PCT  percent of blocks each intermediate layer overwrites [2]
#   BENCH_CLONES   clones served by one process [8]
#   BENCH_FW_PASSES  first-write passes (fresh tops) per repetition [3]
#   BENCH_ROUNDS   which rounds run, any of "reads writes clones" [all three]
#   BENCH_ONLY     contenders to run, an extended glob such as "cowdisk-*|qcow2-top" [all]
#   COWDISK        cowdisk binary [target/release/cowdisk]
#   BENCH_OUT      where the summary, chart and commands go [bench-results]
#   BENCH_MD       markdown report to update between its GENERATED markers, or empty for none
#                  (the report stays in BENCH_OUT/report.md) [BENCHMARKS.md]
#
# Page cache is on for every contender (qemu-nbd --cache=writeback, nbdkit's default,
# cowdisk's default, buffered psync); images are read once before the runs, so reads are
# served from memory and the numbers measure the servers, not the disk.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0 COW=1 REBUILD=0 REPORT=1 ONLY_REPORT=0
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    --no-cowdisk) COW=0 ;;
    --rebuild) REBUILD=1 ;;
    --no-report) REPORT=0 ;;
    --only-report) ONLY_REPORT=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-peers: unknown argument $a" >&2; exit 2 ;;
  esac
done

if ((QUICK)); then d_size=256 d_rt=2 d_ramp=0 d_reps=1; else d_size=1024 d_rt=3 d_ramp=1 d_reps=3; fi
BENCH_DIR=${BENCH_DIR:-/var/tmp/cowdisk-bench}
SIZE_MB=${BENCH_SIZE_MB:-$d_size}
RUNTIME=${BENCH_RUNTIME:-$d_rt}
RAMP=${BENCH_RAMP:-$d_ramp}
REPS=${BENCH_REPS:-$d_reps}
read -r -a DEPTHS <<<"${BENCH_DEPTHS:-1 16 64}"
PCT=${BENCH_LAYER_PCT:-2}
NCLONES=${BENCH_CLONES:-8}
FW_PASSES=${BENCH_FW_PASSES:-3}
ROUNDS=" ${BENCH_ROUNDS:-reads writes clones} "
COWDISK=${COWDISK:-$ROOT/target/release/cowdisk}
OUT=${BENCH_OUT:-$ROOT/bench-results}
MD=${BENCH_MD-$ROOT/BENCHMARKS.md}
BS=65536                                   # cowdisk block size = qcow2 cluster size
NBLOCKS=$((SIZE_MB * 1048576 / BS))
MAXDEPTH=1
for d in "${DEPTHS[@]}"; do ((d > MAXDEPTH)) && MAXDEPTH=$d; done

DATA=$BENCH_DIR/data-${SIZE_MB}m-${PCT}pct-d${MAXDEPTH}
RUN=$BENCH_DIR/run
SOCK=$RUN/nbd.sock
RAW=$RUN/json
RES=$OUT/results.tsv
ALLOC=$OUT/allocated.tsv   # contender, top's allocated bytes after first writes, blocks, fs
CMDLOG=$OUT/commands.log

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- process control
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -f "$SOCK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SRV=""        # pid of the running server
URI=""        # its NBD URI
# start_server CMD...: runs CMD in the background listening on $SOCK, waits until it answers.
start_server() {
  rm -f "$SOCK"
  echo "server: $*" >>"$CMDLOG"
  "$@" >"$RUN/server.log" 2>&1 &
  SRV=$!
  PIDS+=("$SRV")
  local i
  for ((i = 0; i < 300; i++)); do
    if [[ -S $SOCK ]] && nbdinfo --list "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$SRV" 2>/dev/null || { cat "$RUN/server.log" >&2; die "server exited: $*"; }
    sleep 0.05
  done
  cat "$RUN/server.log" >&2
  die "server not ready after 15 s: $*"
}
# export_uri [N]: URI of the server's N-th export (0-based; names from NBD_OPT_LIST).
export_uri() {
  local n=${1:-0} name
  name=$(nbdinfo --list --json "nbd+unix:///?socket=$SOCK" | jq -r ".exports[$n][\"export-name\"]")
  [[ $name != null ]] || die "no export $n"
  printf 'nbd+unix:///%s?socket=%s' "$name" "$SOCK"
}
stop_server() {
  [[ -n $SRV ]] || return 0
  kill -TERM "$SRV" 2>/dev/null || true
  local rc=0
  wait "$SRV" || rc=$?
  local p keep=()
  for p in "${PIDS[@]}"; do [[ $p == "$SRV" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  SRV=""
  rm -f "$SOCK"
  # 143 = killed by SIGTERM (qemu-nbd, nbdkit); cowdisk exits 0.
  ((rc == 0 || rc == 143)) || log "warning: server exited $rc"
}
vmhwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# ---------------------------------------------------------------- servers
QEMU_NBD=(qemu-nbd -t --shared=16 --cache=writeback --aio=threads -k "$SOCK")
NBDKIT=(nbdkit -f -U "$SOCK")
serve_contender() {  # serve_contender NAME MODE(ro|rw) [IMAGE]: starts the server, sets URI
  local name=$1 mode=$2 img=${3:-}
  local ro=() ; [[ $mode == ro ]] && ro=(-r)
  case $name in
    cowdisk-*)
      local cro=(); [[ $mode == ro ]] && cro=(--read-only)
      [[ $name == cowdisk-share-* ]] && cro+=(--copy-up share)
      # the plain rows stay without the journal (auto, the default, makes one on disk
      # file systems): the journal rows are the default there
      if [[ $name == cowdisk-journal-* ]]; then cro+=(--flush-journal 64M)
      elif [[ $mode == rw ]]; then cro+=(--flush-journal off); fi
      start_server "$COWDISK" serve "$img" --socket "$SOCK" "${cro[@]}" ;;
    qcow2*) start_server "${QEMU_NBD[@]}" "${ro[@]}" -f qcow2 "$img" ;;
    qemu-nbd-raw) start_server "${QEMU_NBD[@]}" "${ro[@]}" -f raw "$img" ;;
    nbdkit-file) start_server "${NBDKIT[@]}" "${ro[@]}" file "file=$img" ;;
    # the cow filter keeps its overlay in $TMPDIR: put it on the same file system as the tops
    nbdkit-cow) mkdir -p "$BENCH_DIR/tmp"
      start_server env TMPDIR="$BENCH_DIR/tmp" "${NBDKIT[@]}" --filter=cow file "file=$img" ;;
    *) die "unknown contender $name" ;;
  esac
  URI=$(export_uri 0)
}

# ---------------------------------------------------------------- fio
# run_fio TAG WORKLOAD CONTENDER REP DIR TARGET-ARGS -- WORKLOAD-ARGS: one run, one TSV row.
run_fio() {
  local wl=$1 who=$2 rep=$3 dir=$4; shift 4
  local json=$RAW/$wl.$who.$rep.json
  local cmd=(fio --output-format=json --output="$json" "$@")
  echo "fio: ${cmd[*]}" >>"$CMDLOG"
  "${cmd[@]}" >/dev/null || die "fio failed: ${cmd[*]}"
  # fio may put warnings before the JSON in its output file.
  sed -n '/^{/,$p' "$json" | jq -r --arg d "$dir" --arg w "$wl" --arg c "$who" --arg r "$rep" '
    .jobs[0][$d] as $x
    | [$r, $w, $c, ($x.bw_bytes / 1048576), $x.iops,
       (($x.clat_ns.percentile["99.000000"] // 0) / 1000), "", ""] | @tsv' >>"$RES"
  if [[ $(tail -n1 "$RES" | cut -f5) == 0 ]]; then die "fio did no I/O: ${cmd[*]}"; fi
}
TB=(--time_based "--runtime=$RUNTIME" "--ramp_time=$RAMP")
# Workloads: name -> fio arguments (direction read or write).
declare -A WL_ARGS=(
  [seqread]="--rw=read --bs=1M --iodepth=8 ${TB[*]}"
  [randread-qd1]="--rw=randread --bs=4k --iodepth=1 ${TB[*]}"
  [randread-qd16]="--rw=randread --bs=4k --iodepth=16 ${TB[*]}"
  [rewrite]="--rw=randwrite --bs=4k --iodepth=16 ${TB[*]}"
  [seqwrite]="--rw=write --bs=1M --iodepth=8 ${TB[*]}"
  # One 4 KiB write at a random offset inside every 64 KiB block, blocks in ascending
  # order: each is a first write (copy-up). fio's randommap cannot express "one write per
  # 64 KiB block in random block order" (blockalign turns it off), and read_iolog replay
  # closes the connection with writes in flight, so strided zones it is.
  [firstwrite]="--rw=randwrite --bs=4k --iodepth=16 --zonemode=strided --zonesize=4k --zonerange=64k --io_size=$((NBLOCKS * 4))k"
  # The same with a FLUSH every 16 writes, as a guest's file system journal asks.
  [firstwrite-flush]="--rw=randwrite --bs=4k --iodepth=16 --fsync=16 --zonemode=strided --zonesize=4k --zonerange=64k --io_size=$((NBLOCKS * 4))k"
  [rewrite-flush]="--rw=randwrite --bs=4k --iodepth=16 --fsync=16 ${TB[*]}"
  # The same on the top the first-write pass left: a top that copies up whole blocks (qcow2
  # 64K) now holds every block, one with partial blocks or subclusters holds 4 KiB of each,
  # so most of these are first writes into a block's other sub-blocks.
  [afterfirst-flush]="--rw=randwrite --bs=4k --iodepth=16 --fsync=16 ${TB[*]}"
  # Sequential 1 MiB writes over the whole disk, once (not timed): after it every contender's
  # top holds every block whole, so the rewrite rows that follow are rewrites for all.
  [fill]="--rw=write --bs=1M --iodepth=8"
)
READ_WL=(seqread randread-qd1 randread-qd16)
WRITE_WL=(firstwrite firstwrite-flush afterfirst-flush fill rewrite rewrite-flush seqwrite)
# fio target arguments for a contender (URI for NBD, the file for psync).
target_args() {  # target_args NAME FILE
  if [[ $1 == psync-raw ]]; then
    # invalidate=0: keep the page cache (fio drops it by default), as the NBD servers do
    echo "--name=$1 --ioengine=psync --invalidate=0 --filename=$2 --size=${SIZE_MB}m"
  else
    echo "--name=$1 --ioengine=nbd --uri=$URI"
  fi
}

# ---------------------------------------------------------------- machine and versions
machine_info() {
  local f=$OUT/machine.txt
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
    echo "fs: $(findmnt -n -f -o FSTYPE,SOURCE -T "$BENCH_DIR" | tr -s ' ')"
    echo "loadavg-start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "fio: $(fio --version)"
    echo "qemu-nbd: $(qemu-nbd --version | head -n1)"
    echo "qemu-img: $(qemu-img --version | head -n1)"
    echo "nbdkit: $(nbdkit --version)"
    echo "libnbd: $(nbdinfo --version | head -n1)"
    echo "gnuplot: $(gnuplot --version)"
    if ((COW)); then
      echo "cowdisk: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- crates || echo '+dirty') ($("$COWDISK" --version 2>/dev/null || echo unknown))"
      echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    fi
    echo "params: size=${SIZE_MB}MiB block=64KiB runtime=${RUNTIME}s ramp=${RAMP}s reps=$REPS depths=${DEPTHS[*]} layer_pct=$PCT clones=$NCLONES quick=$QUICK"
  } >"$f"
}

# ---------------------------------------------------------------- data
# Layer i (1..MAXDEPTH-1) overwrites PCT% of the 64 KiB blocks, chosen by a seeded RNG,
# with the byte pattern (i*37 % 255) + 1. The same qemu-io script writes the qcow2 layer
# (qemu-io -f qcow2) and the cowdisk layer (qemu-io over NBD to cowdisk serve).
layer_script() {
  awk -v seed="$1" -v n="$NBLOCKS" -v pct="$PCT" -v bs="$BS" 'BEGIN {
    srand(seed); pat = (seed * 37) % 255 + 1
    for (b = 0; b < n; b++) if (rand() * 100 < pct) printf "write -q -P %d %d %d\n", pat, b * bs, bs
  }'
}
build_common() {
  [[ -f $DATA/common.ok ]] && return 0
  log "building base ($SIZE_MB MiB of random data) and the qcow2 chain (depth $MAXDEPTH)"
  rm -rf "$DATA"; mkdir -p "$DATA/qcow" "$DATA/cmds"
  head -c "$((SIZE_MB * 1048576))" /dev/urandom >"$DATA/base.raw"
  cp "$DATA/base.raw" "$DATA/scratch.raw"          # write target for the raw contenders
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$DATA/base.raw" "$DATA/qcow/L0.qcow2"
  local i
  for ((i = 1; i < MAXDEPTH; i++)); do
    layer_script "$i" >"$DATA/cmds/L$i.qio"
    qemu-img create -q -f qcow2 -o cluster_size=65536 -b "L$((i - 1)).qcow2" -F qcow2 "$DATA/qcow/L$i.qcow2"
    qemu-io -f qcow2 "$DATA/qcow/L$i.qcow2" <"$DATA/cmds/L$i.qio" >/dev/null
  done
  touch "$DATA/common.ok"
}
build_cowdisk() {
  [[ -f $DATA/cowdisk.ok ]] && return 0
  log "building the cowdisk chain (depth $MAXDEPTH) through cowdisk serve + qemu-io"
  rm -rf "$DATA/cow"; mkdir -p "$DATA/cow"
  "$COWDISK" import "$DATA/base.raw" "$DATA/cow/L0.cow" --block-size 64K >/dev/null
  local i
  for ((i = 1; i < MAXDEPTH; i++)); do
    "$COWDISK" create "$DATA/cow/L$i.cow" --backing "$DATA/cow/L$((i - 1)).cow" >/dev/null
    serve_contender cowdisk-build rw "$DATA/cow/L$i.cow"
    qemu-io -f raw "$URI" <"$DATA/cmds/L$i.qio" >/dev/null
    stop_server
  done
  log "verifying that both chains export identical bytes (nbdcopy | sha256sum)"
  local d a b
  for d in "${DEPTHS[@]}"; do
    serve_contender cowdisk-verify ro "$DATA/cow/L$((d - 1)).cow"
    a=$(nbdcopy "$URI" - | sha256sum | cut -d' ' -f1)
    stop_server
    serve_contender qcow2-verify ro "$DATA/qcow/L$((d - 1)).qcow2"
    b=$(nbdcopy "$URI" - | sha256sum | cut -d' ' -f1)
    stop_server
    [[ $a == "$b" ]] || die "cowdisk and qcow2 chains differ at depth $d"
    echo "verified depth $d: cowdisk and qcow2 export sha256 $a" >>"$CMDLOG"
  done
  touch "$DATA/cowdisk.ok"
}
warm_cache() { cat "$DATA"/*.raw "$DATA"/qcow/* "$DATA"/cow/* >/dev/null 2>&1 || true; }

# ---------------------------------------------------------------- contenders
READERS=() WRITERS=()
setup_contenders() {
  local d
  if ((COW)); then for d in "${DEPTHS[@]}"; do READERS+=("cowdisk-d$d"); done; fi
  for d in "${DEPTHS[@]}"; do READERS+=("qcow2-d$d"); done
  READERS+=(nbdkit-cow nbdkit-file qemu-nbd-raw psync-raw)
  ((COW)) && WRITERS+=(cowdisk-top cowdisk-journal-top)
  # Where copy-up can share extents with the base, that mode too.
  if ((COW)) && [[ $(stat -f -c %T "$BENCH_DIR") == @(xfs|btrfs) ]]; then WRITERS+=(cowdisk-share-top); fi
  WRITERS+=(qcow2-top qcow2x-top nbdkit-cow nbdkit-file qemu-nbd-raw psync-raw)
  ((COW)) && CLONE_SERVERS+=(cowdisk)
  CLONE_SERVERS+=(qsd)
  if [[ -n ${BENCH_ONLY:-} ]]; then
    local keep=() c
    for c in "${READERS[@]}"; do [[ $c == @($BENCH_ONLY) ]] && keep+=("$c"); done
    READERS=("${keep[@]}") keep=()
    for c in "${WRITERS[@]}"; do [[ $c == @($BENCH_ONLY) ]] && keep+=("$c"); done
    WRITERS=("${keep[@]}")
  fi
}
image_for_read() {  # the image a read contender serves
  case $1 in
    cowdisk-d*) echo "$DATA/cow/L$((${1#cowdisk-d} - 1)).cow" ;;
    qcow2-d*) echo "$DATA/qcow/L$((${1#qcow2-d} - 1)).qcow2" ;;
    *) echo "$DATA/base.raw" ;;
  esac
}

read_round() {  # read_round REP WORKLOAD
  local rep=$1 wl=$2 c img
  for c in "${READERS[@]}"; do
    img=$(image_for_read "$c")
    [[ $c == psync-raw ]] || serve_contender "$c" ro "$img"
    # shellcheck disable=SC2046,SC2086
    run_fio "$wl" "$c" "$rep" read $(target_args "$c" "$img") ${WL_ARGS[$wl]}
    [[ $c == psync-raw ]] || stop_server
  done
}

# A fresh writable top for a write contender; sets img.
fresh_top() {  # fresh_top CONTENDER
  local top=$DATA/cow/top
  rm -f "$top".*
  case $1 in
    cowdisk-top | cowdisk-share-top | cowdisk-journal-top) img=$top.cow; "$COWDISK" create "$img" --backing "$DATA/cow/L0.cow" >/dev/null ;;
    qcow2-top) img=$top.qcow2
      qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$DATA/qcow/L0.qcow2" -F qcow2 "$img" ;;
    qcow2x-top) img=$top.qcow2
      qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on \
        -b "$DATA/qcow/L0.qcow2" -F qcow2 "$img" ;;
    nbdkit-cow) img=$DATA/base.raw ;;          # a fresh process = a fresh overlay
    *) img=$DATA/scratch.raw ;;                # raw: written in place, no copy-on-write
  esac
}

# One server per contender and repetition: first writes (one 4 KiB write into each
# 64 KiB block of a fresh top: every one a copy-up), then flushing 4 KiB random writes on
# that top, then a fill (every block whole; then synced), then 4 KiB random rewrites, with
# and without flushes, then 1 MiB sequential writes over the same top.
write_round() {  # write_round REP
  local rep=$1 c img top k
  for c in "${WRITERS[@]}"; do
    # A first-write pass is short (one write per block), so each repetition makes
    # FW_PASSES fresh tops (a fresh server each) and keeps every pass as a sample.
    # Pass 0 is a warm-up and is dropped: on this VM the first pass after the read
    # rounds ran 2-5x slower for every contender (probably first-touch cost of memory in the VM).
    for ((k = 0; k <= FW_PASSES; k++)); do
      fresh_top "$c"
      ((rep > 1 || k > 0)) || USED0=$(fs_used_settled)
      [[ $c == psync-raw ]] || serve_contender "$c" rw "$img"
      # shellcheck disable=SC2046,SC2086
      run_fio firstwrite "$c" "$rep.$k" write $(target_args "$c" "$img") ${WL_ARGS[firstwrite]}
      ((k > 0)) || sed -i '$d' "$RES"
      if ((rep == 1 && k == 0)) && [[ $c == cowdisk*-top || $c == qcow2*-top ]]; then
        # the top's map is only complete on disk once the server has exited
        stop_server; check_first_writes "$c"; serve_contender "$c" rw "$img"
      fi
      ((k == FW_PASSES)) || [[ $c == psync-raw ]] || stop_server
    done
    local wl
    for wl in afterfirst-flush fill rewrite rewrite-flush seqwrite; do
      # shellcheck disable=SC2046,SC2086
      run_fio "$wl" "$c" "$rep" write $(target_args "$c" "$img") ${WL_ARGS[$wl]}
      # The rewrites start from clean pages for every contender. Unsynced, they would
      # measure what the fill left dirty: on btrfs writes into dirty pages run 10-20x
      # faster than into clean ones, and a fill that filled holes between written
      # extents (partial blocks, subclusters) has btrfs write its pages back during
      # the next writes, so contenders would differ by what the file system did.
      [[ $wl != fill ]] || sync -f "$DATA"
    done
    [[ $c == psync-raw ]] || stop_server
    # First writes with flushes, on a fresh top of their own.
    fresh_top "$c"
    [[ $c == psync-raw ]] || serve_contender "$c" rw "$img"
    # shellcheck disable=SC2046,SC2086
    run_fio firstwrite-flush "$c" "$rep" write $(target_args "$c" "$img") ${WL_ARGS[firstwrite-flush]}
    [[ $c == psync-raw ]] || stop_server
  done
  rm -f "$DATA"/cow/top.*
  # For scale: what the file system alone charges for the 64 KiB a first write must allocate
  # (fio psync, 64 KiB writes into a fresh sparse file on the same file system, one job, each
  # block once, nothing read, no NBD). Every copy-on-write contender pays at least this.
  local floor=$DATA/floor.raw
  rm -f "$floor"; truncate -s "${SIZE_MB}m" "$floor"
  run_fio firstwrite-floor psync-fresh64k "$rep" write --name=psync-fresh64k --ioengine=psync \
    --invalidate=0 "--filename=$floor" "--size=${SIZE_MB}m" --rw=randwrite --bs=64k
  rm -f "$floor"
}
# Bytes in use on the bench file system, after syncing it (st_blocks would count extents
# a top shares with its base in full).
fs_used() {
  local b f s; sync -f "$DATA"; read -r b f s < <(stat -f -c '%b %f %S' "$DATA"); echo $(((b - f) * s))
}
# fs_used once it holds still: XFS frees a removed file's blocks in the background, so
# right after the previous contender's filled top is removed the count still falls (the
# tops measured after it then read a few KiB).
fs_used_settled() {
  local a b; a=$(fs_used)
  for _ in $(seq 30); do
    sleep 0.5; b=$(fs_used)
    [[ $a == "$b" ]] && break
    a=$b
  done
  echo "$a"
}
# After the first-write pass the top must hold every block (a copy-up) or every written
# sub-block (partial blocks, subclusters).
check_first_writes() {
  local n="?"
  # What the top cost the file system: one 4 KiB write into each 64 KiB block.
  local alloc; alloc=$(( $(fs_used) - USED0 ))
  printf '%s\t%s\t%s\t%s\n' "$1" "$alloc" "$NBLOCKS" "$(stat -f -c %T "$DATA")" >>"$ALLOC"
  case $1 in
    qcow2-top | qcow2x-top) n=$(qemu-img map --output=json -f qcow2 "$DATA/cow/top.qcow2" |
      jq '[.[] | select(.data and .depth == 0) | .length] | add') ;;
    cowdisk-top | cowdisk-share-top | cowdisk-journal-top) n=$("$COWDISK" map --json "$DATA/cow/top.cow" 2>/dev/null |
      jq '[.[] | select(.state == "data" and .depth == 0) | .length] | add' 2>/dev/null) || n="?" ;;
  esac
  # With subclusters qcow2 holds only the 4 KiB written in each cluster, and cowdisk's
  # partial blocks (its default) only the 4 KiB sub-block written.
  local want=$((NBLOCKS * BS))
  [[ $1 == @(qcow2x-top|cowdisk-top|cowdisk-journal-top) ]] && want=$((NBLOCKS * 4096))
  echo "first-write check $1: top holds $n bytes of $want" >>"$CMDLOG"
  [[ $n == "$want" ]] || die "first-write check $1: top holds $n bytes of $want"
}

# Clones: NCLONES fresh tops over the same base in ONE server process, one export each,
# all read at once (one fio job = one connection per export), against one clone alone.
# cowdisk serve vs qemu-storage-daemon (qcow2 clones sharing one backing node).
# Idle RSS is read before any client connects, peak RSS (VmHWM) after the run.
declare -A CLONE_WL=(
  [seq1M]="--rw=read --bs=1M --iodepth=8"
  [rand4k]="--rw=randread --bs=4k --iodepth=16"
)
CLONE_SERVERS=()
start_clones() {  # start_clones SERVER N
  local srv=$1 n=$2 i cmd=()
  case $srv in
    cowdisk)
      cmd=("$COWDISK" serve --socket "$SOCK")
      for ((i = 1; i <= n; i++)); do cmd+=("$DATA/cow/clone$i.cow"); done ;;
    qsd)
      cmd=(qemu-storage-daemon
        --blockdev "driver=qcow2,node-name=base,read-only=on,file.driver=file,file.filename=$DATA/qcow/L0.qcow2")
      for ((i = 1; i <= n; i++)); do
        cmd+=(--blockdev "driver=qcow2,node-name=c$i,backing=base,file.driver=file,file.filename=$DATA/qcow/clone$i.qcow2")
      done
      cmd+=(--nbd-server "addr.type=unix,addr.path=$SOCK")
      for ((i = 1; i <= n; i++)); do cmd+=(--export "type=nbd,id=e$i,node-name=c$i,name=clone$i,writable=on"); done ;;
  esac
  start_server "${cmd[@]}"
}
clone_round() {  # clone_round REP
  local rep=$1 i n srv wl
  if ((rep == 1)); then
    rm -f "$DATA"/cow/clone*.cow "$DATA"/qcow/clone*.qcow2
    for ((i = 1; i <= NCLONES; i++)); do
      ((COW)) && "$COWDISK" create "$DATA/cow/clone$i.cow" --backing "$DATA/cow/L0.cow" >/dev/null
      qemu-img create -q -f qcow2 -o cluster_size=65536 -b L0.qcow2 -F qcow2 "$DATA/qcow/clone$i.qcow2"
    done
  fi
  for wl in seq1M rand4k; do
    for srv in "${CLONE_SERVERS[@]}"; do
      for n in 1 "$NCLONES"; do
        local args=() idle hwm
        start_clones "$srv" "$n"
        idle=$(awk '/^VmRSS:/ {print $2}' "/proc/$SRV/status")
        for ((i = 0; i < n; i++)); do args+=("--name=clone$i" "--uri=$(export_uri "$i")"); done
        # shellcheck disable=SC2086
        run_fio "clones$n-$wl" "$srv" "$rep" read --ioengine=nbd --group_reporting \
          ${CLONE_WL[$wl]} "${TB[@]}" "${args[@]}"
        hwm=$(vmhwm_kib "$SRV")
        # fill the last two columns of the row just written
        sed -i '$ s/\t\t$/\t'"$hwm"'\t'"$idle"'/' "$RES"
        stop_server
      done
    done
  done
}

# ---------------------------------------------------------------- report
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
# med WORKLOAD CONTENDER COLUMN(4=MiB/s 5=IOPS 6=p99us 7=rss)
med() { awk -F'\t' -v w="$1" -v c="$2" -v k="$3" '$2 == w && $3 == c {print $k}' "$RES" | median; }
has() { awk -F'\t' -v w="$1" -v c="$2" '$2 == w && $3 == c {f = 1} END {exit !f}' "$RES"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || b == 0) print "–"; else printf "%.2f", a / b}'; }
fmt() { awk -v x="$1" -v p="$2" 'BEGIN {if (x == "nan") print "–"; else printf "%.*f", p, x}'; }
nreps() { awk -F'\t' -v w="$1" -v c="$2" '$2 == w && $3 == c' "$RES" | wc -l; }

# peer for a contender's ratio column: qcow2 at the same depth
same_depth_qcow2() { case $1 in cowdisk-d*) echo "qcow2-d${1#cowdisk-d}" ;; cowdisk-top | cowdisk-journal-top) echo qcow2-top ;; *) echo "" ;; esac; }

workload_table() {  # workload_table WORKLOAD CONTENDERS...
  local wl=$1 c q; shift
  echo "| contender | MiB/s | IOPS | p99 µs | ÷ qcow2 (same depth) | ÷ nbdkit-cow | ÷ nbdkit-file | ÷ qemu-nbd-raw | ÷ psync-raw | runs |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for c in "$@"; do
    has "$wl" "$c" || continue
    local iops; iops=$(med "$wl" "$c" 5)
    q=$(same_depth_qcow2 "$c")
    local rq="" rc="" rf="" rn="" rp=""
    if [[ $c == cowdisk-* ]]; then
      [[ -n $q ]] && rq=$(ratio "$iops" "$(med "$wl" "$q" 5)")
      rc=$(ratio "$iops" "$(med "$wl" nbdkit-cow 5)")
      rf=$(ratio "$iops" "$(med "$wl" nbdkit-file 5)")
      rn=$(ratio "$iops" "$(med "$wl" qemu-nbd-raw 5)")
      rp=$(ratio "$iops" "$(med "$wl" psync-raw 5)")
    fi
    local name=$c; [[ $c == cowdisk-* ]] && name="**$c**"
    echo "| $name | $(fmt "$(med "$wl" "$c" 4)" 1) | $(fmt "$iops" 0) | $(fmt "$(med "$wl" "$c" 6)" 0) | $rq | $rc | $rf | $rn | $rp | $(nreps "$wl" "$c") |"
  done
}

target_row() {  # target_row DESCRIPTION VALUE THRESHOLD(>= or <= as OP) OP
  local desc=$1 v=$2 thr=$3 op=${4:->=} ok
  if [[ $v == – ]]; then ok="not measured"
  else ok=$(awk -v v="$v" -v t="$thr" -v op="$op" 'BEGIN {p = (op == ">=") ? v >= t : v <= t; print p ? "met" : "**missed**"}'); fi
  echo "| $desc | $v | $op $thr | $ok |"
}
best_raw() {  # the faster raw-over-NBD server for a workload (the stricter baseline)
  awk -v a="$(med "$1" nbdkit-file 5)" -v b="$(med "$1" qemu-nbd-raw 5)" 'BEGIN {if (a == "nan") print b; else if (b == "nan" || a > b) print a; else print b}'
}
targets_table() {
  echo "| target | measured (median ratio, IOPS-based) | goal | verdict |"
  echo "|---|---:|---:|---|"
  target_row "randread 4k qd16, depth 1 ÷ qemu-nbd+qcow2 depth 1" "$(ratio "$(med randread-qd16 cowdisk-d1 5)" "$(med randread-qd16 qcow2-d1 5)")" 1.5
  target_row "randread 4k qd16, depth 1 ÷ best raw over NBD" "$(ratio "$(med randread-qd16 cowdisk-d1 5)" "$(best_raw randread-qd16)")" 0.8
  local dmax=${DEPTHS[-1]} wl
  for wl in randread-qd16 randread-qd1; do
    target_row "$wl, depth $dmax ÷ cowdisk depth 1" "$(ratio "$(med "$wl" "cowdisk-d$dmax" 5)" "$(med "$wl" cowdisk-d1 5)")" 0.9
  done
  target_row "first writes 4k qd16 ÷ qemu-nbd+qcow2" "$(ratio "$(med firstwrite cowdisk-top 5)" "$(med firstwrite qcow2-top 5)")" 2
  target_row "first writes 4k qd16 ÷ nbdkit-cow" "$(ratio "$(med firstwrite cowdisk-top 5)" "$(med firstwrite nbdkit-cow 5)")" 1.5
  target_row "rewrites 4k qd16 ÷ best raw over NBD" "$(ratio "$(med rewrite cowdisk-top 5)" "$(best_raw rewrite)")" 0.8
  for wl in firstwrite-flush afterfirst-flush rewrite-flush; do
    target_row "$wl ÷ qemu-nbd+qcow2" "$(ratio "$(med "$wl" cowdisk-top 5)" "$(med "$wl" qcow2-top 5)")" 1.2
  done
  # the journal rows are what serve does by default on a disk file system (auto)
  local j=cowdisk-journal-top
  for wl in firstwrite-flush afterfirst-flush rewrite-flush; do
    target_row "$wl, --flush-journal ÷ qemu-nbd+qcow2" "$(ratio "$(med "$wl" $j 5)" "$(med "$wl" qcow2-top 5)")" 1.2
  done
  target_row "first writes 4k qd16, --flush-journal ÷ qemu-nbd+qcow2" "$(ratio "$(med firstwrite $j 5)" "$(med firstwrite qcow2-top 5)")" 2
  target_row "rewrites 4k qd16, --flush-journal ÷ best raw over NBD" "$(ratio "$(med rewrite $j 5)" "$(best_raw rewrite)")" 0.8
  target_row "rewrite-flush, --flush-journal ÷ best raw over NBD" "$(ratio "$(med rewrite-flush $j 5)" "$(best_raw rewrite-flush)")" 0.8
  target_row "seq write 1M, --flush-journal ÷ best raw over NBD" "$(ratio "$(med seqwrite $j 5)" "$(best_raw seqwrite)")" 0.8
  target_row "rewrite-flush ÷ best raw over NBD" "$(ratio "$(med rewrite-flush cowdisk-top 5)" "$(best_raw rewrite-flush)")" 0.8
  target_row "seq read 1M, depth 1 ÷ best raw over NBD" "$(ratio "$(med seqread cowdisk-d1 5)" "$(best_raw seqread)")" 0.8
  target_row "seq read 1M, depth $dmax ÷ best raw over NBD" "$(ratio "$(med seqread "cowdisk-d$dmax" 5)" "$(best_raw seqread)")" 0.8
  target_row "seq write 1M ÷ best raw over NBD" "$(ratio "$(med seqwrite cowdisk-top 5)" "$(best_raw seqwrite)")" 0.8
  local cw
  for cw in seq1M rand4k; do
    target_row "$NCLONES clones $cw: peak RSS ÷ one clone" "$(ratio "$(med "clones$NCLONES-$cw" cowdisk 7)" "$(med "clones1-$cw" cowdisk 7)")" 1.2 "<="
    target_row "$NCLONES clones $cw: aggregate read ÷ one clone" "$(ratio "$(med "clones$NCLONES-$cw" cowdisk 5)" "$(med "clones1-$cw" cowdisk 5)")" 1
  done
  target_row "$NCLONES clones: idle RSS after open ÷ one clone" "$(ratio "$(med "clones$NCLONES-rand4k" cowdisk 8)" "$(med "clones1-rand4k" cowdisk 8)")" 1.2 "<="
}

chart() {
  local dat=$OUT/chart.dat png=$OUT/chart.png
  # rows: contender, then one column per workload: median throughput ÷ nbdkit-file's
  local wls=(seqread randread-qd1 randread-qd16 firstwrite rewrite seqwrite) c wl
  local all=("${READERS[@]}" "${WRITERS[@]}")
  {
    printf 'contender'; for wl in "${wls[@]}"; do printf '\t%s' "$wl"; done; echo
    local seen=" "
    for c in "${all[@]}"; do
      [[ $seen == *" $c "* ]] && continue; seen+="$c "
      printf '%s' "$c"
      for wl in "${wls[@]}"; do
        if has "$wl" "$c"; then printf '\t%s' "$(ratio "$(med "$wl" "$c" 5)" "$(med "$wl" nbdkit-file 5)")"; else printf '\t-'; fi
      done
      echo
    done
  } >"$dat"
  gnuplot <<EOF
set terminal pngcairo size 1500,760 font ",10" noenhanced
set output "$png"
set datafile separator "\t"
set datafile missing "-"
set title "Median throughput relative to nbdkit file (raw over NBD) = 1.0 — $(nproc) CPUs, ${SIZE_MB} MiB images, ${REPS} reps"
set style data histograms
set style histogram clustered gap 1
set xtics nomirror
set style fill solid 0.85 border -1
set boxwidth 0.9
set key outside right top vertical
set grid ytics
set ylabel "× nbdkit-file (log scale)"
set logscale y 2
set yrange [0.03:*]  # first writes of copy-on-write servers sit near 0.1x
set xtics rotate by -30
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 1.5 front
plot for [i=2:7] "$dat" using i:xtic(1) title columnheader(i)
EOF
  log "chart: $png"
}

report() {
  [[ -s $RES ]] || die "no results in $RES"
  local gen=$OUT/report.md
  {
    echo "<!-- BEGIN GENERATED by tools/bench-peers.sh; do not edit by hand -->"
    echo "## Results"
    echo
    echo "Medians over the repetitions; ratios are cowdisk's median IOPS (= throughput) divided by the peer's."
    echo "Raw per-run rows: \`bench-results/results.tsv\`; every command: \`bench-results/commands.log\`."
    echo
    echo "![median throughput relative to nbdkit file](bench-results/chart.png)"
    echo
    echo "### Machine and versions"
    echo
    echo '```'
    cat "$OUT/machine.txt"
    echo '```'
    echo
    echo "### Targets"
    echo
    targets_table
    echo
    local wl
    for wl in seqread randread-qd1 randread-qd16; do
      echo "### $wl — \`${WL_ARGS[$wl]}\`"; echo
      workload_table "$wl" "${READERS[@]}"; echo
    done
    echo "### firstwrite — \`${WL_ARGS[firstwrite]}\` (one 4 KiB write into each 64 KiB block of a fresh top)"
    echo
    workload_table firstwrite "${WRITERS[@]}"; echo
    if has firstwrite-floor psync-fresh64k; then
      local fl; fl=$(med firstwrite-floor psync-fresh64k 5)
      echo "For scale, the file system's own cost of the 64 KiB each first write allocates: fio psync writing 64 KiB blocks into a fresh sparse file on the same file system (one job, nothing read, no NBD) ran at **$(fmt "$fl" 0) IOPS** (median of $(nreps firstwrite-floor psync-fresh64k)). Twice qemu-nbd+qcow2 would be $(fmt "$(awk -v q="$(med firstwrite qcow2-top 5)" 'BEGIN {print 2 * q}')" 0) IOPS, $(awk -v q="$(med firstwrite qcow2-top 5)" -v f="$fl" 'BEGIN {if (f > 0) printf "%.0f", 200 * q / f; else print "–"}') % of that floor; cowdisk's first writes reach $(awk -v c="$(med firstwrite cowdisk-top 5)" -v f="$fl" 'BEGIN {if (f > 0) printf "%.0f", 100 * c / f; else print "–"}') % of it."
      echo
    fi
    echo "### afterfirst-flush — \`${WL_ARGS[afterfirst-flush]}\` (the top firstwrite left: qcow2 64K holds whole clusters, cowdisk and qcow2 subclusters 4 KiB of each block)"; echo
    workload_table afterfirst-flush "${WRITERS[@]}"; echo
    echo "### fill — \`${WL_ARGS[fill]}\` (once over the whole disk, after afterfirst-flush, then synced: from here every top holds every block whole)"; echo
    workload_table fill "${WRITERS[@]}"; echo
    for wl in rewrite rewrite-flush seqwrite; do
      echo "### $wl — \`${WL_ARGS[$wl]}\` (same top, after the synced fill: rewrites of clean pages for every contender)"; echo
      workload_table "$wl" "${WRITERS[@]}"; echo
    done
    echo "### firstwrite-flush — \`${WL_ARGS[firstwrite-flush]}\` (a fresh top)"; echo
    workload_table firstwrite-flush "${WRITERS[@]}"; echo
    if [[ -s $ALLOC ]]; then
      echo "### The top's allocated bytes after the first-write pass ($NBLOCKS writes of 4 KiB)"
      echo
      echo "| contender | file system | allocated | per first write |"
      echo "|---|---|---:|---:|"
      awk -F'\t' '{printf "| %s | %s | %.1f MiB | %.1f KiB |\n", $1, $4, $2 / 1048576, $2 / $3 / 1024}' "$ALLOC"
      echo
    fi
    echo "### $NCLONES clones of one base in one server process, read at once (one fio job and connection per export)"
    echo
    echo "cowdisk: \`cowdisk serve clone1.cow … clone$NCLONES.cow\`; qsd: \`qemu-storage-daemon\` with $NCLONES qcow2 clones sharing one backing node, one NBD export each. Peak RSS = VmHWM after the run; idle RSS = VmRSS after opening, before any client."
    echo
    echo "| server | workload (per export) | exports | aggregate MiB/s | aggregate IOPS | p99 µs | peak RSS KiB | idle RSS KiB | aggregate ÷ 1 export | peak RSS ÷ 1 export |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    local n srv cw
    for cw in seq1M rand4k; do
      for srv in "${CLONE_SERVERS[@]}"; do
        for n in 1 "$NCLONES"; do
          has "clones$n-$cw" "$srv" || continue
          local ra="" rr=""
          if ((n != 1)); then
            ra=$(ratio "$(med "clones$n-$cw" "$srv" 5)" "$(med "clones1-$cw" "$srv" 5)")
            rr=$(ratio "$(med "clones$n-$cw" "$srv" 7)" "$(med "clones1-$cw" "$srv" 7)")
          fi
          echo "| $srv | $cw \`${CLONE_WL[$cw]}\` | $n | $(fmt "$(med "clones$n-$cw" "$srv" 4)" 1) | $(fmt "$(med "clones$n-$cw" "$srv" 5)" 0) | $(fmt "$(med "clones$n-$cw" "$srv" 6)" 0) | $(fmt "$(med "clones$n-$cw" "$srv" 7)" 0) | $(fmt "$(med "clones$n-$cw" "$srv" 8)" 0) | $ra | $rr |"
        done
      done
    done
    echo
    echo "<!-- END GENERATED -->"
  } >"$gen"
  if [[ -z $MD ]]; then
    log "report: $gen"
    return
  fi
  if [[ -f $MD ]] && grep -q '^<!-- BEGIN GENERATED' "$MD"; then
    awk -v gen="$gen" '
      /^<!-- BEGIN GENERATED/ {while ((getline l < gen) > 0) print l; skip = 1; next}
      /^<!-- END GENERATED/ {skip = 0; next}
      !skip' "$MD" >"$MD.tmp" && mv "$MD.tmp" "$MD"
  else
    cat "$gen" >>"$MD"
  fi
  log "report: $gen (merged into $MD)"
}

# ---------------------------------------------------------------- main
for t in fio qemu-nbd qemu-img qemu-io nbdkit nbdinfo jq gnuplot awk; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
if ((COW)) && ! [[ -x $COWDISK ]]; then die "no cowdisk binary at $COWDISK (cargo build --release -p cowdisk, or --no-cowdisk)"; fi
mkdir -p "$OUT" "$RUN" "$RAW"
setup_contenders
if ((COW)); then  # pin the binary: others may rebuild target/ during the run
  cp "$COWDISK" "$RUN/cowdisk"; COWDISK=$RUN/cowdisk
fi
if ((ONLY_REPORT)); then chart; report; exit 0; fi
((REBUILD)) && rm -rf "$DATA"
: >"$CMDLOG"
machine_info
START=$SECONDS
build_common
((COW)) && build_cowdisk
warm_cache
: >"$RES"; : >"$ALLOC"
log "measuring: $REPS reps × (${#READERS[@]} readers × ${#READ_WL[@]} + ${#WRITERS[@]} writers × ${#WRITE_WL[@]}) runs, ${RUNTIME}s each"
for ((rep = 1; rep <= REPS; rep++)); do
  if [[ $ROUNDS == *" reads "* ]]; then
    for wl in "${READ_WL[@]}"; do log "rep $rep/$REPS: $wl"; read_round "$rep" "$wl"; done
  fi
  if [[ $ROUNDS == *" writes "* ]]; then log "rep $rep/$REPS: writes"; write_round "$rep"; fi
  if [[ $ROUNDS == *" clones "* ]]; then log "rep $rep/$REPS: clones"; clone_round "$rep"; fi
done
echo "loadavg-end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
echo "wall: $((SECONDS - START)) s (data build included)" >>"$OUT/machine.txt"
rm -f "$DATA"/cow/clone*.cow "$DATA"/qcow/clone*.qcow2
if ((REPORT)); then chart; report; fi
log "done in $((SECONDS - START)) s"
