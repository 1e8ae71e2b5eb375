#!/usr/bin/env bash
# The ublk server killed (SIGKILL) under a mounted ext4, and what happens, in bounded time:
# the driver notices the dead server at once, fails the queued and later I/O with EIO and
# removes /dev/ublkbN (ext4 aborts its journal; new files fail with EIO; nothing hangs);
# /dev/ublkcN stays until deleted. umount works; tools/ublk-detach.sh exits 3, says why and
# deletes the dead device (cowdisk ublk-remove). The image is consistent as of the last
# flush: attached again, ext4 replays its journal, e2fsck is then clean, the synced file is
# intact, cowdisk check is clean and the base unchanged.
. /repo/tools/vm/tests/lib.sh
A=/repo/tools/ublk-attach.sh D=/repo/tools/ublk-detach.sh
make_base
sha256sum base.cow > base.sum

step "attach, mkfs, a file synced, a file only written"
DEV=$(bash $A vm1.cow)
NAME=$(basename "$DEV") ID=${NAME#ublkb}
SRV=$(attach_state "$DEV" SRV)
mkfs.ext4 -q -F "$DEV"
mkdir -p mnt
mount "$DEV" mnt
head -c $((4 << 20)) /dev/urandom > mnt/synced.bin
sync
(cd mnt && sha256sum synced.bin) > synced.sum
head -c $((4 << 20)) /dev/urandom > mnt/unsynced.bin

step "kill -9 the server"
kill -KILL "$SRV"
t0=$(date +%s)
gone=""
for _ in $(seq 150); do
  [ -e "/sys/block/$NAME" ] || { gone=$(( $(date +%s) - t0 )); break; }
  sleep 0.1
done
[ -n "$gone" ] || fail "/sys/block/$NAME still there 15 s after the server was killed"
echo "block device removed by the driver after ${gone}s"
[ -e "/sys/class/ublk-char/ublkc$ID" ] || fail "expected the dead /dev/ublkc$ID to stay until deleted"
echo "/dev/ublkc$ID stays (dead)"

step "I/O fails at once, nothing hangs"
rc=0; timeout 20 dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null || rc=$?
[ "$rc" -ne 0 ] || fail "a read of $DEV succeeded after the server died"
[ "$rc" -ne 124 ] || fail "a read of $DEV hung"
rc=0; timeout 20 sh -c 'echo x > mnt/new.txt && sync' 2>err.txt || rc=$?
cat err.txt
[ "$rc" -ne 0 ] || fail "a new file on the ext4 succeeded after the server died"
[ "$rc" -ne 124 ] || fail "writing to the ext4 hung"
dmesg | grep -q "Aborting journal on device $NAME" || fail "ext4 did not abort its journal"
echo "raw read and new file fail (EIO), ext4 aborted its journal, $(( $(date +%s) - t0 ))s after the kill"
timeout 30 umount mnt || fail "umount failed or hung"

step "detach: exit status 3, the dead device deleted"
rc=0; bash $D "$DEV" 2>detach.err || rc=$?
cat detach.err
expect_eq "ublk-detach.sh exit status" "$rc" 3
grep -q "had exited while $DEV was attached" detach.err || fail "detach did not say the server died"
[ ! -e "/sys/class/ublk-char/ublkc$ID" ] || fail "the dead /dev/ublkc$ID was not deleted"
[ ! -e "/run/cowdisk/$NAME.state" ] || fail "state file left behind"
cowdisk -q check vm1.cow || fail "cowdisk check after the kill (exit $?)"

step "attach again: journal replayed, synced file intact"
DEV=$(bash $A vm1.cow)
rc=0; e2fsck -fy "$DEV" >fsck.out 2>&1 || rc=$?
cat fsck.out
[ "$rc" -le 1 ] || fail "e2fsck -fy exit status $rc"
e2fsck -fn "$DEV" >/dev/null || fail "e2fsck -fn not clean after the repair"
mount "$DEV" mnt
(cd mnt && sha256sum -c ../synced.sum) || fail "the synced file differs"
ls -l mnt
umount mnt
bash $D "$DEV"
sha256sum -c base.sum || fail "base.cow changed"
cowdisk -q check vm1.cow || fail "cowdisk check (exit $?)"
step "done"
