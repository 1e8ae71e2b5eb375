#!/usr/bin/env bash
# The one command that runs every test on a fresh machine: installs the real NBD
# clients, checks formatting and lints, then runs the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
# Tests that need a client tool fail (rather than skip) when it is missing.
export CI="${CI:-true}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The NBD client tests spawn the memserve example; --all-targets builds examples only as
# test binaries, so build the real ones first.
cargo build --workspace --examples
cargo test --workspace --all-targets
cargo test --workspace --doc
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# The fuzz package (its own workspace, outside the one above): lints, its seed replay
# test, then a short AFL++ run of every target (tools/fuzz.sh; longer runs: README).
(cd fuzz && cargo fmt -- --check && cargo clippy --lib --examples -- -D warnings && cargo test --lib)
bash tools/fuzz.sh 20
# Kernel nbd and ublk (and dm) end to end in a throwaway guest: this host's kernel has
# neither module.
VM_SKIP_DEPS=1 bash tools/vm-test.sh
