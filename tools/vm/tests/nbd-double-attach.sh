#!/usr/bin/env bash
# A writable image attached once cannot be attached a second time: the second nbd-attach.sh
# fails at once with the server's "in use" error, attaches no device and leaves nothing
# behind, and the first attachment keeps working. Attaching onto a device already in use fails
# the same way.
. /repo/tools/vm/tests/lib.sh
A=/repo/tools/nbd-attach.sh D=/repo/tools/nbd-detach.sh
make_base
cowdisk create other.cow --size 64M >/dev/null
DEV=$(bash $A vm1.cow); NAME=$(basename "$DEV")
echo "first attach: $DEV"
before=$(ls /run/cowdisk | sort)

step "second attach of vm1.cow"
t=$(date +%s)
if out=$(bash $A vm1.cow 2>&1); then fail "second attach succeeded: $out"; fi
echo "$out"
echo "$out" | grep -q 'in use' || fail "no 'in use' in the error"
[ $(( $(date +%s) - t )) -lt 8 ] || fail "refusal took $(( $(date +%s) - t ))s"
for d in /sys/block/nbd*; do
  [ "$(basename "$d")" = "$NAME" ] && continue
  expect_eq "size of $(basename "$d")" "$(cat "$d/size")" 0
done
expect_eq "/run/cowdisk after the refused attach" "$(ls /run/cowdisk | sort)" "$before"

step "another image onto the busy $DEV"
if out=$(bash $A other.cow "$DEV" 2>&1); then fail "attach onto busy $DEV succeeded: $out"; fi
echo "$out"
expect_eq "/run/cowdisk after the refused attach" "$(ls /run/cowdisk | sort)" "$before"
expect_eq "cowdisk serve processes" "$(server_pids | wc -l)" 1

step "the first attachment still works"
cmp -n $((32 << 20)) "$DEV" base.raw || fail "first device no longer reads the base"
dd if=/dev/urandom of=w.bin bs=64k count=16 status=none
dd if=w.bin of="$DEV" bs=64k seek=100 oflag=direct conv=fsync status=none
cmp -i 0:$((100 * 65536)) -n $((16 * 65536)) w.bin "$DEV" || fail "write through the first device"
bash $D "$DEV"
cowdisk -q check vm1.cow
step "done"
