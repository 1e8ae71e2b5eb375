//! The disks an export has served, append-only, found in constant time.
//!
//! Zero-copy reads hand out file descriptors borrowed from a disk for as long as the
//! reply is being sent, so a disk replaced by a chain change cannot be dropped while the
//! export serves (and safe Rust has no way to borrow from something that may go away).
//! The table is two levels of `OnceLock`s: fixed in size, so the number of chain changes
//! an export takes between restarts is bounded ([`MAX_GENERATIONS`]), and so is what the
//! kept disks cost (per generation: the old top's descriptor and map).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;

use cowdisk_core::Disk;

const CHUNK: usize = 32;
/// Disks an export can have served (its first included) before chain changes are
/// refused until the server restarts. Each kept disk costs its top's descriptor and map
/// and its chain's resolved map (2 bytes per block the sealed layers hold, shared when the
/// sealed part did not change, as after a reset).
pub const MAX_GENERATIONS: usize = CHUNK * CHUNK;

/// One chunk of slots, made when first needed.
type Chunk = OnceLock<Box<[OnceLock<Disk>]>>;

/// See the module doc.
pub struct Generations {
    first: Disk,
    later: Box<[Chunk]>,
    /// Disks stored, the first included; the last one is current.
    count: AtomicUsize,
}

impl Generations {
    /// A table holding `first`.
    pub fn new(first: Disk) -> Generations {
        Generations {
            first,
            later: (0..CHUNK).map(|_| OnceLock::new()).collect(),
            count: AtomicUsize::new(1),
        }
    }

    fn slot(&self, i: usize, create: bool) -> Option<&OnceLock<Disk>> {
        let j = i.checked_sub(1)?;
        let chunk = self.later.get(j / CHUNK)?;
        let chunk = if create {
            chunk.get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect())
        } else {
            chunk.get()?
        };
        chunk.get(j % CHUNK)
    }

    fn get(&self, i: usize) -> Option<&Disk> {
        if i == 0 {
            return Some(&self.first);
        }
        self.slot(i, false)?.get()
    }

    /// The disk requests go to now.
    pub fn current(&self) -> &Disk {
        self.current_indexed().1
    }

    /// The current disk with its index (for [`Generations::at`] later).
    pub fn current_indexed(&self) -> (usize, &Disk) {
        let n = self.count.load(SeqCst);
        match self.get(n - 1) {
            Some(d) => (n - 1, d),
            None => (0, &self.first),
        }
    }

    /// The disk with index `i`, if there is one.
    pub fn at(&self, i: usize) -> Option<&Disk> {
        self.get(i).filter(|_| i < self.count.load(SeqCst))
    }

    /// Every disk, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &Disk> {
        (0..self.count.load(SeqCst)).filter_map(|i| self.get(i))
    }

    /// True when no other disk can be added.
    pub fn is_full(&self) -> bool {
        self.count.load(SeqCst) >= MAX_GENERATIONS
    }

    /// Makes `disk` current; false (and `disk` dropped) if the table is full. One caller
    /// at a time.
    pub fn push(&self, disk: Disk) -> bool {
        let i = self.count.load(SeqCst);
        if i >= MAX_GENERATIONS {
            return false;
        }
        let Some(slot) = self.slot(i, true) else {
            return false;
        };
        if slot.set(disk).is_err() {
            return false;
        }
        // Published after the slot is filled: readers never see an empty current slot.
        self.count.store(i + 1, SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowdisk_core::{Access, OpenOptions};

    #[test]
    fn current_is_the_last_pushed_across_chunks_until_full() {
        let dir = std::env::temp_dir().join(format!("cowdisk-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("g.cow");
        let _ = std::fs::remove_file(&img);
        cowdisk_core::create::create_image(&img, 1 << 20, 65536).unwrap();
        // Read-only opens without locks: one file stands in for every generation.
        let open = || {
            let o = OpenOptions::new().access(Access::ReadOnly).force_share();
            Disk::open(&img, &o).unwrap()
        };
        let g = Generations::new(open());
        assert!(std::ptr::eq(g.current(), g.get(0).unwrap()));
        for i in 1..CHUNK + 3 {
            assert!(g.push(open()));
            assert!(std::ptr::eq(g.current(), g.get(i).unwrap()), "{i}");
        }
        assert_eq!(g.all().count(), CHUNK + 3);
        // Fill up (cheaply: the slots are what is bounded, not what they hold).
        while !g.is_full() {
            assert!(g.push(open()));
        }
        assert!(!g.push(open()), "full: refused, nothing replaced");
        assert_eq!(g.all().count(), MAX_GENERATIONS);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
