#!/usr/bin/env bash
# ublk end to end: tools/ublk-attach.sh loads ublk_drv, `cowdisk serve --ublk` makes
# /dev/ublkbN with one queue per CPU; reads show the base; DISCARD and WRITE_ZEROES become
# whiteouts (cowdisk map through the server's control socket); raw fio with crc32c
# verification; ext4 made, files written, read back after a remount; e2fsck -fn clean;
# a write acknowledged just before SIGTERM is in the image (the server flushes); the device
# is gone, the base file unchanged, cowdisk check clean; files intact under a new server.
. /repo/tools/vm/tests/lib.sh
A=/repo/tools/ublk-attach.sh D=/repo/tools/ublk-detach.sh
make_base
sha256sum base.cow > base.sum
# Unloaded (smoke loads it), so the attach script has to load it.
if [ -e /sys/module/ublk_drv ]; then modprobe -r ublk_drv; fi
[ ! -e /sys/module/ublk_drv ] || fail "could not unload ublk_drv before the test"

step "attach"
# Worker threads per queue (serve --threads): the parallel path under fio verify and ext4;
# the second attach below and ublk-server-killed use the default (none).
DEV=$(UBLK_THREADS=4 bash $A vm1.cow)
echo "attached $DEV"
[ -b "$DEV" ] || fail "$DEV is not a block device"
[ -e /sys/module/ublk_drv ] || fail "ublk-attach.sh did not load ublk_drv"
NAME=$(basename "$DEV")
SRV=$(attach_state "$DEV" SRV)
kill -0 "$SRV" || fail "server $SRV not running"
expect_eq "device size" "$(blockdev --getsize64 "$DEV")" $((256 << 20))
expect_eq "hardware queues (one per CPU)" "$(find "/sys/block/$NAME/mq" -mindepth 1 -maxdepth 1 | wc -l)" "$(nproc)"
Q="/sys/block/$NAME/queue"
echo "max_sectors_kb $(cat "$Q/max_sectors_kb"), discard_granularity $(cat "$Q/discard_granularity")," \
     "write_zeroes_max_bytes $(cat "$Q/write_zeroes_max_bytes"), write_cache $(cat "$Q/write_cache"), fua $(cat "$Q/fua")"
expect_eq "max request" "$(cat "$Q/max_sectors_kb")" 512
expect_eq "write cache (FLUSH reaches the engine)" "$(cat "$Q/write_cache")" "write back"
expect_eq "discard granularity (the image's block)" "$(cat "$Q/discard_granularity")" 65536

step "a second serve of the same image is refused"
if out=$(cowdisk serve --ublk vm1.cow 2>&1); then fail "second serve --ublk succeeded: $out"; fi
echo "$out"
echo "$out" | grep -q "in use" || fail "second serve: unexpected message"

step "reads show the base"
cmp -n $((32 << 20)) "$DEV" base.raw || fail "first 32 MiB differ from the base"
cmp -i $((200 << 20)) -n $((4 << 20)) "$DEV" base.raw || fail "base data at 200 MiB differs"

step "DISCARD and WRITE_ZEROES: whiteouts over the base, or zeros kept allocated (NOUNMAP)"
blkdiscard -o $((1 << 20)) -l $((1 << 20)) "$DEV"                  # DISCARD
fallocate -p -o $((4 << 20)) -l $((512 << 10)) "$DEV"              # WRITE_ZEROES
blkdiscard -z -o $((6 << 20)) -l $((512 << 10)) "$DEV"             # WRITE_ZEROES | NOUNMAP
for r in "1 1024" "4 512" "6 512"; do
  # shellcheck disable=SC2086  # split on purpose
  set -- $r
  cmp -n $(($2 << 10)) -i $(($1 << 20)):0 "$DEV" /dev/zero || fail "range at $1 MiB does not read as zeros"
done
cmp -i $((2 << 20)) -n $((2 << 20)) "$DEV" base.raw || fail "base data next to the whiteouts changed"
cowdisk map vm1.cow > map.txt   # served: answered by the server through its control socket
cat map.txt
for ext in "0x100000 0x100000 zero" "0x400000 0x80000 zero" "0x600000 0x80000 data"; do
  # shellcheck disable=SC2086  # split on purpose
  set -- $ext
  awk -v s="$1" -v l="$2" -v st="$3" '$1 == s && $2 == l && $3 == st && $4 == "0" {f=1} END {exit !f}' map.txt \
    || fail "no extent '$ext' in the top"
done
echo "whiteouts at 1 and 4 MiB, zero data at 6 MiB, in the top (map through the control socket)"

# Sizes are small: under TCG every request is emulated.
step "fio randwrite 4k qd16 + verify crc32c on the raw device (16 MiB at 96 MiB)"
fio --name=raw --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \
    --offset=96m --size=16m --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null
echo "fio raw 4k: ok"
step "fio randrw 512k qd8 + verify crc32c (32 MiB at 128 MiB)"
fio --name=raw2 --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=8 --rw=randrw --bs=512k \
    --offset=128m --size=32m --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 >/dev/null
echo "fio raw 512k: ok"
cmp -n $((1 << 20)) "$DEV" base.raw || fail "fio outside its range changed the first MiB"

step "mkfs.ext4 (discarding the whole device), files"
ext4_exercise "$DEV"

step "a write acknowledged but never flushed, then SIGTERM: flushed, device removed"
head -c $((256 << 10)) /dev/urandom > last.bin
dd if=last.bin of="$DEV" bs=256k seek=$(( (250 << 20) / (256 << 10) )) oflag=direct status=none
bash $D "$DEV"
[ ! -e "$DEV" ] || fail "$DEV still there after detach"
[ ! -e "/sys/block/$NAME" ] || fail "/sys/block/$NAME still there after detach"
! kill -0 "$SRV" 2>/dev/null || fail "server $SRV still running after detach"
[ ! -e "/run/cowdisk/$NAME.state" ] || fail "state file left behind"
sha256sum -c base.sum || fail "base.cow changed"
cowdisk -q check vm1.cow || fail "cowdisk check vm1.cow reported problems (exit $?)"
cowdisk export vm1.cow out.raw
cmp -i $((250 << 20)):0 -n $((256 << 10)) out.raw last.bin || fail "the last write is not in the image"
echo "last write is in the image, check clean"
rm out.raw

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
