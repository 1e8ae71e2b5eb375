#!/usr/bin/env bash
# Builds the cached part of the guest's initramfs: busybox, the client tools copied from the
# host's installed Debian packages with the shared libraries they load, and the kernel
# modules the tests use (with modules.dep, so `modprobe` works in the guest).
#   tools/vm/build-base.sh OUT.cpio.zst
# Needs tools/vm/fetch.sh to have run (it writes $VM_CACHE/fetched.env). The per-run part
# (the cowdisk binary, the repo's tools/, /init) is a second archive that tools/vm-test.sh
# appends; the kernel unpacks both.
set -euo pipefail

VM_CACHE=${VM_CACHE:-$HOME/.cache/cowdisk-vm}
OUT=${1:?usage: build-base.sh OUT.cpio.zst}
die() { echo "vm/build-base.sh: $*" >&2; exit 1; }
[ -f "$VM_CACHE/fetched.env" ] || die "run tools/vm/fetch.sh first"
# shellcheck disable=SC1091
. "$VM_CACHE/fetched.env"

KVER=$(basename "$(ls -d "$KERNEL_ROOT"/lib/modules/*)")

# Host programs the tests run in the guest, by package: nbd-client; e2fsprogs; fio;
# util-linux (blkdiscard and fallocate send discard and write-zeroes requests); kmod;
# dmsetup; libnbd-bin (nbdinfo, which tools/common.sh waits with);
# qemu-utils (the qcow2 peer); bash and a few GNU coreutils whose options the scripts use.
PROGS=(
  bash nbd-client mke2fs e2fsck tune2fs dumpe2fs fio
  losetup findmnt blockdev lsblk flock mount umount blkdiscard fallocate
  kmod dmsetup nbdinfo qemu-img qemu-nbd
  dd stat sha256sum mktemp timeout sync truncate cmp
)
# Kernel modules (their dependencies follow from modules.dep).
MODULES=(nbd loop ext4 dm-thin-pool dm-snapshot ublk_drv crc32c-intel crc32c_generic)

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/usr/{bin,lib/x86_64-linux-gnu,lib64} "$ROOT"/{dev,proc,sys,tmp,run,etc,root,mnt}
# The usr-merged layout Debian 12 has, so every path ldd prints resolves.
ln -s usr/bin "$ROOT/bin"; ln -s usr/bin "$ROOT/sbin"; ln -s bin "$ROOT/usr/sbin"
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"

# busybox first; the copied programs below replace its applets of the same name.
cp "$BUSYBOX_ROOT/bin/busybox" "$ROOT/usr/bin/busybox"
for a in $("$ROOT/usr/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$ROOT/usr/bin/$a"
done

copy_lib() { # a path ldd printed -> the same file under the usr-merged root
  local src=$1 dst
  dst=${src#/usr}; dst=$ROOT/usr$dst
  [ -e "$dst" ] && return 0
  mkdir -p "$(dirname "$dst")"
  cp -L "$src" "$dst"
}
for p in "${PROGS[@]}"; do
  src=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$p") || die "$p not found on the host (tools/install-deps.sh installs it)"
  rm -f "$ROOT/usr/bin/$p"
  cp -L "$src" "$ROOT/usr/bin/$p"
  ldd "$src" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do copy_lib "$lib"; done
done
ln -sf mke2fs "$ROOT/usr/bin/mkfs.ext4"
ln -sf e2fsck "$ROOT/usr/bin/fsck.ext4"
for a in modprobe insmod rmmod lsmod modinfo depmod; do ln -sf kmod "$ROOT/usr/bin/$a"; done
cp /etc/mke2fs.conf "$ROOT/etc/"
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
echo 'root:x:0:' > "$ROOT/etc/group"
: > "$ROOT/etc/fstab"

# Modules: the dependency closure, as shipped (xz; kmod reads it), then depmod over that subset.
[ -s "$KERNEL_ROOT/lib/modules/$KVER/modules.dep" ] || depmod -b "$KERNEL_ROOT" "$KVER"
mods=$(for m in "${MODULES[@]}"; do
  modprobe -d "$KERNEL_ROOT" -S "$KVER" -C /dev/null --show-depends "$m" || die "module $m not in $KERNEL_PKG"
done | awk '$1 == "insmod" {print $2}' | sort -u)
[ -n "$mods" ] || die "no modules found under $KERNEL_ROOT"
for f in $mods; do
  rel=${f#"$KERNEL_ROOT"/}
  mkdir -p "$ROOT/usr/$(dirname "$rel")"
  cp "$f" "$ROOT/usr/$rel"
done
cp "$KERNEL_ROOT/lib/modules/$KVER/modules.order" "$KERNEL_ROOT/lib/modules/$KVER/modules.builtin" \
   "$KERNEL_ROOT/lib/modules/$KVER/modules.builtin.modinfo" "$ROOT/usr/lib/modules/$KVER/"
depmod -b "$ROOT/usr" "$KVER"

mkdir -p "$(dirname "$OUT")"
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) | zstd -q -3 -T0 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
