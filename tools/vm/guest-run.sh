#!/usr/bin/env bash
# Runs inside the tools/vm-test.sh guest: each named test is tools/vm/tests/NAME.sh, run
# with bash under a timeout ($VMTEST_TIMEOUT seconds) from a fresh folder under /tmp.
# Prints "VMTEST: RESULT NAME PASS|FAIL SECONDSs" per test and "VMTEST: DONE" at the end;
# the host decides from those lines.
set -euo pipefail
export CI=true COWDISK=/usr/local/bin/cowdisk REPO=/repo
cd /repo
for t in "$@"; do
  script=/repo/tools/vm/tests/$t.sh
  start=$(date +%s)
  echo "VMTEST: START $t"
  if [ ! -f "$script" ]; then
    echo "no such test: $script"
    rc=127
  else
    work=$(mktemp -d "/tmp/$t.XXXXXX")
    rc=0
    (cd "$work" && timeout -s KILL "${VMTEST_TIMEOUT:-300}" bash "$script") </dev/null 2>&1 || rc=$?
  fi
  secs=$(( $(date +%s) - start ))
  if [ "$rc" -eq 0 ]; then res=PASS; else res=FAIL; echo "$t: exit status $rc"; fi
  echo "VMTEST: RESULT $t $res ${secs}s"
done
echo "VMTEST: DONE"
