# Shared helpers for the tools/ scripts (sourced, not run).

# The cowdisk binary: $COWDISK, else the repo's release build, else PATH.
cowdisk_bin() {
  if [ -n "${COWDISK:-}" ]; then echo "$COWDISK"; return; fi
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -x "$root/target/release/cowdisk" ]; then echo "$root/target/release/cowdisk"; return; fi
  command -v cowdisk || { echo "cowdisk not found: run 'cargo build --release' or set COWDISK" >&2; return 1; }
}

# Waits until an NBD URI answers (up to ~10 s).
wait_nbd() {
  local uri=$1 i
  for i in $(seq 100); do
    nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "NBD server at $uri did not become ready" >&2
  return 1
}

# Waits for a PID to exit (up to SECS, default 10); returns non-zero if it did not.
wait_exit() {
  local pid=$1 i
  for i in $(seq $(( ${2:-10} * 10 ))); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

STATE_DIR=${COWDISK_STATE_DIR:-/run/cowdisk}

# A base of MB MiB of random data in the current folder, once: base.raw, base.cow (imported
# with the cowdisk binary BIN) and base.qcow2 (64 KiB clusters), the same bytes in each.
bench_base() {  # bench_base BIN MB
  [ -e base.raw ] && return 0
  head -c $(($2 << 20)) /dev/urandom >base.raw
  "$1" import -q base.raw base.cow >/dev/null
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 base.raw base.qcow2
}

# Mounts a fresh, empty file system of FS (tmpfs, ext4, xfs with reflink, btrfs) and
# SIZE_MB MiB on MNT; a disk one lives in the loop file IMG (recreated).
mount_fresh_fs() {  # mount_fresh_fs MNT FS SIZE_MB IMG
  local mnt=$1 fs=$2 size=$3 img=$4
  mkdir -p "$mnt"; umount "$mnt" 2>/dev/null || true
  if [ "$fs" = tmpfs ]; then mount -t tmpfs -o "size=${size}m" tmpfs "$mnt"; return; fi
  case $fs in ext4|xfs|btrfs) ;; *) echo "unknown file system $fs" >&2; return 2 ;; esac
  rm -f "$img"; truncate -s "${size}M" "$img"
  case $fs in
    ext4) mkfs.ext4 -q -F "$img" ;;
    xfs) mkfs.xfs -q -m reflink=1 "$img" ;;
    btrfs) mkfs.btrfs -q "$img" >/dev/null ;;
  esac
  mount -o loop "$img" "$mnt"
}
