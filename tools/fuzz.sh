#!/usr/bin/env bash
# Builds the AFL++ fuzz targets in fuzz/ and runs each for SECONDS (default 60), one at
# a time (the machine has two cores). Exits non-zero if any target crashed, printing
# where the crashing inputs are; timeouts ("hangs") are listed but do not fail the run,
# since a shared, loaded machine makes them noisy. Replay a crash with
#   ${CARGO_TARGET_DIR:-fuzz/target}/release/<target> < <input>
# Usage: tools/fuzz.sh [SECONDS] [TARGET...]   (FUZZ_OUT=dir to keep findings elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(header layer chain nbd model)
out=${FUZZ_OUT:-fuzz/out}
root=$(pwd)
# Where cargo puts the binaries: the fuzz workspace's own target/ unless CARGO_TARGET_DIR
# says otherwise.
bin=${CARGO_TARGET_DIR:-fuzz/target}/release

# Run as root in CI without changing the host: no core_pattern, CPU governor or
# affinity requirements, no curses UI. AFL++ only warns about each of these.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1
# Short runs: skip the seeds' timing calibration, start fuzzing at once.
export AFL_NO_STARTUP_CALIBRATION=1

echo "fuzz: building targets"
(cd fuzz && cargo afl build --release --bins --quiet)

failed=0
for t in "${targets[@]}"; do
  dir="$out/$t"
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "fuzz: $t for ${secs}s"
  # -t: per-input timeout in ms (the NBD target waits up to 5 s for a hang-up itself).
  # -s: a fixed RNG seed, so a short CI run is repeatable.
  # -m: address-space cap in MiB, so an input that makes the engine allocate without
  # bound is reported as a crash instead of exhausting the machine.
  if ! cargo afl fuzz -V "$secs" -t 10000 -m 4096 -s 1 -i "fuzz/seeds/$t" -o "$dir" \
    "$bin/$t" >"$dir/afl.log" 2>&1; then
    echo "fuzz: afl-fuzz failed on $t; its log ($dir/afl.log) ends:" >&2
    tail -n 30 "$dir/afl.log" >&2
    failed=1
    continue
  fi
  stats="$dir/default/fuzzer_stats"
  if [ -f "$stats" ]; then
    awk -F' *: *' '/^(execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs|bitmap_cvg) /{printf "  %s=%s", $1, $2} END{print ""}' "$stats"
  fi
  crashes=$(find "$dir/default/crashes" -type f -name 'id:*' 2>/dev/null || true)
  hangs=$(find "$dir/default/hangs" -type f -name 'id:*' 2>/dev/null || true)
  if [ -n "$hangs" ]; then
    echo "fuzz: $t: inputs that timed out (not counted as failures):"
    sed "s|^|  $root/|" <<<"$hangs"
  fi
  if [ -n "$crashes" ]; then
    echo "fuzz: $t CRASHED; inputs:" >&2
    sed "s|^|  $root/|" <<<"$crashes" >&2
    echo "  replay: $bin/$t < <input>" >&2
    failed=1
  fi
done
exit "$failed"
