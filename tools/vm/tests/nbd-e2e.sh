#!/usr/bin/env bash
# Kernel nbd end to end: tools/nbd-attach.sh loads the module, serves and attaches /dev/nbdN
# with 4 connections (the server offers multi-conn); reads show the base; raw fio with crc32c
# verification; ext4 made, files written, read back after a remount and after a detach and
# re-attach (a new server process); e2fsck -fn clean; detached; base file unchanged;
# cowdisk check clean.
. /repo/tools/vm/tests/lib.sh
A=/repo/tools/nbd-attach.sh D=/repo/tools/nbd-detach.sh
make_base
sha256sum base.cow > base.sum
# Unloaded (an earlier test may have loaded it), so the attach script has to load it.
if [ -e /sys/module/nbd ]; then modprobe -r nbd; fi
[ ! -e /sys/module/nbd ] || fail "could not unload nbd before the test"

step "attach"
DEV=$(bash $A vm1.cow)
echo "attached $DEV"
[ -b "$DEV" ] || fail "$DEV is not a block device"
[ -e /sys/module/nbd ] || fail "nbd-attach.sh did not load the nbd module"
NAME=$(basename "$DEV")
expect_eq "device size" "$(blockdev --getsize64 "$DEV")" $((256 << 20))
SRV=$(attach_state "$DEV" SRV)
kill -0 "$SRV" || fail "server $SRV not running"
# listener + one socket per connection
socks=$(socket_count "$SRV")
echo "server $SRV holds $socks sockets"
[ "$socks" -ge 5 ] || fail "expected 4 NBD connections (multi-conn), server holds $socks sockets"
[ "$(cat /sys/block/$NAME/queue/max_sectors_kb)" -gt 0 ]
echo "max_sectors_kb $(cat /sys/block/$NAME/queue/max_sectors_kb), logical block $(cat /sys/block/$NAME/queue/logical_block_size)"

step "reads show the base"
cmp -n $((32 << 20)) "$DEV" base.raw || fail "first 32 MiB differ from the base"
cmp -i $((200 << 20)) -n $((4 << 20)) "$DEV" base.raw || fail "base data at 200 MiB differs"

# Sizes are small: under TCG a 4 KiB round trip through the kernel, the socket and the
# server takes milliseconds.
step "fio randwrite 4k qd16 + verify crc32c on the raw device (16 MiB at 96 MiB)"
fio --name=raw --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \
    --offset=96m --size=16m --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
    --output-format=terse --terse-version=3 >fio-raw.out
echo "fio raw 4k: ok"
step "fio randrw 64k qd16 + verify crc32c (32 MiB at 128 MiB)"
fio --name=raw2 --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --rw=randrw --bs=64k \
    --offset=128m --size=32m --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null
echo "fio raw 64k: ok"
cmp -n $((32 << 20)) "$DEV" base.raw || fail "fio outside its range changed the first 32 MiB"

step "mkfs.ext4, files"
ext4_exercise "$DEV" -E nodiscard

step "detach"
bash $D "$DEV"
[ "$(cat /sys/block/$NAME/size)" = 0 ] || fail "$DEV still has a size after detach"
! kill -0 "$SRV" 2>/dev/null || fail "server $SRV still running after detach"
[ ! -e "/run/cowdisk/$NAME.state" ] || fail "state file left behind"
sha256sum -c base.sum || fail "base.cow changed"
cowdisk -q check vm1.cow || fail "cowdisk check vm1.cow reported problems (exit $?)"

step "re-attach (new server): files still there"
DEV=$(bash $A vm1.cow)
mount -o ro "$DEV" mnt
(cd mnt && sha256sum -c --quiet ../files.sum) || fail "files differ after re-attach"
umount mnt
e2fsck -fn "$DEV" >/dev/null || fail "e2fsck after re-attach"
bash $D "$DEV"
sha256sum -c base.sum
cowdisk -q check vm1.cow
cowdisk info vm1.cow | sed -n "1,12p"
step "done"
