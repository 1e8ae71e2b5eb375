//! Which cached blocks of one layer this process has verified, and under which eviction
//! generation of the cache (see `cache.rs`): the memory that lets warm reads skip the
//! block-sized read and CRC that a first read costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

/// The verified set of one layer.
pub struct Verified {
    state: RwLock<State>,
}

/// Blocks (by rank) verified while the cache's eviction generation was `generation`.
pub struct State {
    generation: Option<u64>,
    bits: Vec<AtomicU64>,
}

impl State {
    /// True if the block of `rank` was verified under the current generation.
    pub fn has(&self, rank: usize) -> bool {
        self.bits
            .get(rank / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (rank % 64)) != 0)
    }

    /// The generation the set belongs to.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    fn set(&self, rank: usize) {
        if let Some(w) = self.bits.get(rank / 64) {
            w.fetch_or(1 << (rank % 64), Ordering::Relaxed);
        }
    }
}

impl Verified {
    /// An empty set for a layer of `ranks` data blocks.
    pub fn new(ranks: usize) -> Verified {
        Verified {
            state: RwLock::new(State {
                generation: None,
                bits: (0..ranks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    /// The set, for lookups; writers of the set wait while it is held.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets everything: the cache was evicted from since the set was made (or a
    /// trusted read failed). The set then belongs to `generation`.
    pub fn reset(&self, generation: Option<u64>) {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        for w in &s.bits {
            w.store(0, Ordering::Relaxed);
        }
        s.generation = generation;
    }

    /// Records `ranks` as verified by reads that the generation `g` framed (read before
    /// and after them, unchanged and even). Forgets the rest if `g` is newer than the set.
    pub fn mark(&self, g: u64, ranks: &[usize]) {
        if ranks.is_empty() {
            return;
        }
        if self.read().generation != Some(g) {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            if s.generation.is_none_or(|c| c < g) {
                for w in &s.bits {
                    w.store(0, Ordering::Relaxed);
                }
                s.generation = Some(g);
            }
        }
        let s = self.read();
        // The set may have moved on to a newer generation meanwhile: these reads do not
        // vouch for that one.
        if s.generation == Some(g) {
            for &r in ranks {
                s.set(r);
            }
        }
    }
}
