//! Scratch buffers for copy-up and verification, shared process-wide.

use std::sync::Mutex;

use super::lock;

/// Scratch buffers shared by every thread and every disk in the process, so requests do not
/// allocate and memory follows how many copies run at once, not how many threads or clones a
/// server has (a pool per disk kept a few blocks per clone: 8 clones reading a fresh base held
/// 8 times the buffers of one).
pub(super) struct ScratchPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Free scratch buffers kept per pool (about the number of CPUs that copy at once).
const SCRATCH_KEPT: usize = 8;

/// Bytes read at once when verifying a block without keeping it: a page, so the dozens of
/// threads a server with many clients has verify without holding much memory (16 KiB pieces
/// held ~180 KiB more at the peak of 8 clones reading a fresh base; throughput the same).
pub(super) const VERIFY_PIECE: usize = 4 * 1024;

/// Block buffers for copy-up, and page buffers for verification: two pools, so a burst of
/// verifications cannot fill the pool with pages and leave every copy-up allocating a block.
pub(super) static BLOCK_SCRATCH: ScratchPool = ScratchPool {
    free: Mutex::new(Vec::new()),
};
pub(super) static PIECE_SCRATCH: ScratchPool = ScratchPool {
    free: Mutex::new(Vec::new()),
};

impl ScratchPool {
    /// Runs `f` with a zero-initialised-once buffer of exactly `len` bytes.
    pub(super) fn with<R>(&self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let taken = {
            let mut free = lock(&self.free);
            let pos = free.iter().position(|b| b.len() >= len);
            pos.map(|i| free.swap_remove(i))
        };
        let mut buf = taken.unwrap_or_else(|| vec![0u8; len]);
        let r = f(&mut buf[..len]);
        let mut free = lock(&self.free);
        if free.len() < SCRATCH_KEPT {
            free.push(buf);
        }
        r
    }
}
