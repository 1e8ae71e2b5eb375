#!/usr/bin/env bash
# Fetches what tools/vm-test.sh boots, without installing any of it on the host:
#   - Debian's linux-image-6.12.*-amd64 (nbd, ublk, dm-thin and dm-snapshot as modules),
#   - busybox-static (the guest's shell and core utilities),
#   - qemu-system-x86 with its firmware and the few libraries the host lacks.
# Each .deb is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into
# $VM_CACHE (default ~/.cache/cowdisk-vm). Installing qemu-system-x86 would replace the
# host's newer qemu-utils (qemu-img, qemu-nbd) with Debian 12's 7.2; unpacking it privately
# leaves them alone. Prints nothing on success unless something was downloaded.
set -euo pipefail

VM_CACHE=${VM_CACHE:-$HOME/.cache/cowdisk-vm}
DEBS=$VM_CACHE/debs
mkdir -p "$DEBS"

die() { echo "vm/fetch.sh: $*" >&2; exit 1; }

# The newest linux-image-6.12.N+deb12-amd64 the apt sources offer (the 6.12 meta-package's
# dependency), unless VM_KERNEL_PKG names one.
kernel_pkg() {
  if [ -n "${VM_KERNEL_PKG:-}" ]; then echo "$VM_KERNEL_PKG"; return; fi
  apt-cache depends linux-image-6.12-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-6\.12\.[0-9]*+deb[0-9]*-amd64\)$/\1/p' | sed -n 1p
}

KPKG=$(kernel_pkg)
if [ -z "$KPKG" ]; then
  apt-get update -qq
  KPKG=$(kernel_pkg)
fi
[ -n "$KPKG" ] || die "no linux-image-6.12.*-amd64 package in the apt sources (is this Debian 12 with bookworm-updates/security?)"

# qemu-system-x86 (its TCG accelerator is a module in qemu-system-common) and what it needs that
# a machine with qemu-utils lacks; the rest of its libraries (glib, gnutls, ...) come with
# qemu-utils.
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios libcapstone4 libfdt1 libslirp0 libvdeplug2)
PKGS=("$KPKG" busybox-static "${QEMU_PKGS[@]}")

# Name of the .deb `apt-get download` writes for a package's candidate version.
deb_file() {
  local v
  v=$(apt-cache policy "$1" | sed -n 's/^ *Candidate: //p')
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "package $1 is not in the apt sources"
  # apt escapes ':' in the version as %3a
  ls "$DEBS/$1_${v//:/%3a}_"*.deb 2>/dev/null | sed -n 1p
}

need=()
for p in "${PKGS[@]}"; do
  [ -n "$(deb_file "$p")" ] || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "vm/fetch.sh: downloading ${need[*]}" >&2
  # apt's sandbox user cannot write into root's home: download in a scratch folder it can.
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -q "${need[@]}" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' >&2 || true)
  for p in "${need[@]}"; do
    ls "$tmp/$p"_*.deb >/dev/null 2>&1 || { rm -rf "$tmp"; die "apt-get download $p failed"; }
  done
  mv "$tmp"/*.deb "$DEBS/"
  rmdir "$tmp"
fi

# Unpacks each package once into $VM_CACHE/<name>_<version>/ and records the folders.
unpack() {
  local deb=$1 dir
  dir=$VM_CACHE/root/$(basename "$deb" .deb)
  if [ ! -e "$dir/.done" ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    dpkg-deb -x "$deb" "$dir"
    touch "$dir/.done"
  fi
  echo "$dir"
}

{
  echo "KERNEL_PKG=$KPKG"
  echo "KERNEL_ROOT=$(unpack "$(deb_file "$KPKG")")"
  echo "BUSYBOX_ROOT=$(unpack "$(deb_file busybox-static)")"
  printf 'QEMU_ROOTS="'
  for p in "${QEMU_PKGS[@]}"; do printf '%s ' "$(unpack "$(deb_file "$p")")"; done
  echo '"'
} > "$VM_CACHE/fetched.env.tmp"
mv "$VM_CACHE/fetched.env.tmp" "$VM_CACHE/fetched.env"
