#!/usr/bin/env bash
# The server is SIGKILLed while /dev/nbdN is attached and ext4 is mounted on it. Checks what
# the README promises: every request fails at once with EIO (the kernel finds no live
# connection), ext4 aborts its journal and turns read-only, umount still works, and
# tools/nbd-detach.sh detaches, reports the dead server and exits 3. Re-attached (new server),
# the image passes cowdisk check, ext4 replays its journal, what was synced before the kill
# is intact and e2fsck -fn is clean.
. /repo/tools/vm/tests/lib.sh
A=/repo/tools/nbd-attach.sh D=/repo/tools/nbd-detach.sh
make_base
DEV=$(bash $A vm1.cow); NAME=$(basename "$DEV")
SRV=$(attach_state "$DEV" SRV)
mkfs.ext4 -q -F -E nodiscard "$DEV"
mkdir mnt; mount "$DEV" mnt
dd if=/dev/urandom of=mnt/synced.bin bs=1M count=4 status=none
sync
(cd mnt && sha256sum synced.bin) > synced.sum
dd if=/dev/urandom of=mnt/unsynced.bin bs=1M count=4 status=none

step "kill -9 the server ($SRV) while mounted"
kill -KILL "$SRV"
for _ in $(seq 50); do [ -d "/proc/$SRV" ] || break; sleep 0.1; done
[ ! -d "/proc/$SRV" ] || fail "server $SRV still there after SIGKILL"
expect_eq "device size after the kill" "$(cat /sys/block/$NAME/size)" $(( (256 << 20) / 512 ))
if err=$(dd if="$DEV" of=/dev/null bs=4k count=1 skip=1000 iflag=direct 2>&1); then
  fail "reading $DEV after the server died succeeded"
fi
echo "$err" | grep -q 'Input/output error' || fail "read error is not EIO: $err"
echo "raw read: EIO"
if err=$(dd if=/dev/urandom of=mnt/after.bin bs=64k count=4 conv=fsync status=none 2>&1); then
  fail "a write+fsync on ext4 after the server died succeeded"
fi
echo "$err" | grep -q 'Input/output error' || fail "fsync error is not EIO: $err"
echo "write+fsync on ext4: EIO"
sync || true
# The failed journal write aborts the journal; the next change ext4 starts finds it aborted
# and turns the file system read-only.
if touch mnt/new-file 2>/dev/null; then fail "creating a file after the server died succeeded"; fi
# (6.12 marks it "emergency read-only" internally; /proc/mounts still says rw.)
dmesg | grep -q "EXT4-fs ($NAME): Remounting filesystem read-only" || fail "ext4 did not report turning read-only"
if err=$(touch mnt/second-file 2>&1); then fail "a file could be created after ext4 turned read-only"; fi
echo "$err" | grep -Eq 'Read-only file system|Input/output error' || fail "after the abort, creating a file failed oddly: $err"
echo "ext4: journal aborted, read-only; creating a file: ${err##*: }"
dmesg | grep -q "$NAME: Dead connection" || fail "kernel did not log the dead connection"

step "umount, detach"
timeout 30 umount mnt || fail "umount of the dead device failed or hung"
rc=0; timeout 30 bash $D "$DEV" 2>detach.err || rc=$?
cat detach.err
expect_eq "nbd-detach.sh exit status (dead server)" "$rc" 3
grep -q "had exited while $DEV was attached" detach.err || fail "detach did not report the dead server"
expect_eq "device size after detach" "$(cat /sys/block/$NAME/size)" 0
[ ! -e "/run/cowdisk/$NAME.state" ] || fail "state file left behind"
! compgen -G '/run/cowdisk/attach.*' >/dev/null || fail "socket folder left behind: $(ls /run/cowdisk)"

step "the image after the kill"
cowdisk -q check vm1.cow || fail "cowdisk check after SIGKILL (exit $?)"

step "re-attach, mount (journal replay), synced data intact"
DEV=$(bash $A vm1.cow)
mount "$DEV" mnt
(cd mnt && sha256sum -c ../synced.sum) || fail "data synced before the kill differs"
echo "synced.bin intact; unsynced.bin: $( [ -e mnt/unsynced.bin ] && stat -c '%s bytes' mnt/unsynced.bin || echo absent)"
dmesg | grep -q "EXT4-fs ($NAME): recovery complete" && echo "ext4 replayed its journal"
umount mnt
e2fsck -fn "$DEV" >/dev/null || fail "e2fsck -fn after recovery"
bash $D "$DEV"
step "done"
