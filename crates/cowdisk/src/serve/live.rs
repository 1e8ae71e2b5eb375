//! A served image whose chain can change under its clients: the open [`Disk`] can be
//! replaced by a new one (a live snapshot's new top) without the export noticing.
//!
//! **Write gate.** Every request that changes the disk or makes it durable (WRITE, TRIM,
//! WRITE_ZEROES, FLUSH) holds the gate shared for its whole duration; a snapshot holds
//! it exclusively while it flushes, seals and swaps the top. So a write lands wholly in
//! the old top (and then in the snapshot, which the seal flushed) or wholly in the new
//! one, and every write acknowledged before the snapshot started is in the snapshot.
//! std's `RwLock` makes new shared takers wait behind a waiting exclusive one, so a
//! stream of writes cannot starve a snapshot. Reads and block status take no gate: while
//! the gate is held nothing changes, so they read the same from either disk. A WRITE
//! applied in pieces as its payload arrives holds the gate per piece, so a chain change
//! also waits for those to end (`close_gate`).
//!
//! **Generations.** A replaced disk stays open until the export ends
//! ([`super::generations`]): each chain change keeps the old top's file and map (one
//! descriptor and the map's memory, which the new chain's copy of that layer also costs),
//! up to [`MAX_GENERATIONS`] changes, after which they are refused until the server
//! restarts. FUTURE: count the borrowers and release old generations.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Longest a chain change waits for WRITEs arriving in pieces (the default payload
/// timeout: a payload slower than that is cut off anyway).
const STREAM_WAIT: Duration = Duration::from_secs(30);

use cowdisk_core::create::sync_folder;
use cowdisk_core::{folder_of, Disk, LayerState, LowerCache};

use super::generations::{Generations, MAX_GENERATIONS};
use super::reuse::Reusing;
use super::stats::Stats;
use crate::error::{Error, Result};
use crate::ops::{exists, reset, snapshot, squash};

/// A served image (see the module doc).
pub struct LiveDisk {
    disks: Generations,
    gate: RwLock<()>,
    /// WRITEs arriving in pieces (too large for the write budget) now in progress.
    streaming: AtomicUsize,
    /// One chain-changing operation at a time.
    op: Mutex<()>,
    image: PathBuf,
    cache: Arc<LowerCache>,
    /// Request counters of the export.
    pub stats: Stats,
}

impl LiveDisk {
    /// Serves `disk`, opened from `image` with `cache`.
    pub fn new(disk: Disk, image: PathBuf, cache: Arc<LowerCache>) -> LiveDisk {
        LiveDisk {
            disks: Generations::new(disk),
            gate: RwLock::new(()),
            streaming: AtomicUsize::new(0),
            op: Mutex::new(()),
            image,
            cache,
            stats: Stats::default(),
        }
    }

    /// The image path the export was opened from.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The disk requests go to now.
    pub fn current(&self) -> &Disk {
        self.disks.current()
    }

    /// A full flush of a writable image retires its flush journal, whose file then goes,
    /// so the image alone holds everything and any tool may read it, wherever it is
    /// copied: at exit, and when the export is removed (no client is left either time).
    pub fn retire_journal(&self) -> Result<()> {
        if crate::FLUSH_JOURNAL.get().is_none_or(|&(n, _)| n == 0) {
            return Ok(());
        }
        let disk = self.current();
        if disk.is_read_only() || disk.top_header().state == LayerState::Sealed {
            return Ok(());
        }
        disk.flush().map_err(|e| Error::disk(self.image(), e))?;
        let _ = std::fs::remove_file(cowdisk_core::journal_path(disk.top_path()));
        Ok(())
    }

    /// The current disk and its index among the chains served since the start.
    pub fn current_indexed(&self) -> (usize, &Disk) {
        self.disks.current_indexed()
    }

    /// The disk with index `i` (see [`LiveDisk::current_indexed`]).
    pub fn disk_at(&self, i: usize) -> Option<&Disk> {
        self.disks.at(i)
    }

    /// Counts WRITEs whose pieces are arriving (see `Backend::pieces_begin`).
    pub fn streamed_writes(&self, begin: bool) {
        if begin {
            self.streaming.fetch_add(1, SeqCst);
        } else {
            self.streaming.fetch_sub(1, SeqCst);
        }
    }

    /// Closes the write gate for a chain change. A WRITE arriving in pieces takes the gate
    /// per piece, so the gate alone could fall between two of them: wait (with the gate
    /// open) until none is in progress. One that starts once the gate is closed has all
    /// its pieces after the change. Bounded by [`STREAM_WAIT`]; past it (a payload that
    /// never ends is cut off by the payload timeout, unanswered) the change goes ahead.
    fn close_gate(&self) -> RwLockWriteGuard<'_, ()> {
        let deadline = Instant::now() + STREAM_WAIT;
        loop {
            let g = self.gate.write().unwrap_or_else(|e| e.into_inner());
            if self.streaming.load(SeqCst) == 0 || Instant::now() >= deadline {
                return g;
            }
            drop(g);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Held by every request that writes or flushes (see the module doc).
    pub fn write_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The write gate if it can be had without waiting (`None` also while a chain change
    /// waits for it): for a thread that already holds it, which must not wait again.
    pub fn try_write_gate(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.gate.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `f` with no other chain-changing operation on this export; `Busy` if one runs.
    pub fn exclusive<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _op = match self.op.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(Error::invalid(
                    &self.image,
                    "another snapshot or squash of this image is running",
                ))
            }
        };
        // Checked before anything changes: a chain change whose new disk could not be
        // served would leave the export refusing writes.
        if self.disks.is_full() {
            return Err(Error::invalid(
                &self.image,
                format!(
                    "this export reached {MAX_GENERATIONS} disks (chain changes); restart the server \
                     to release the old layers it keeps open"
                ),
            ));
        }
        f()
    }

    /// Blocks copied up from lower layers since the export started (every generation).
    pub fn copy_ups(&self) -> u64 {
        self.disks.all().map(|d| d.copy_ups()).sum()
    }

    /// Flushes made durable in the flush journal since the export started.
    pub fn journal_flushes(&self) -> u64 {
        self.disks.all().map(|d| d.journal_flushes()).sum()
    }

    /// How the next chain is opened: sharing lowers through the cache, reusing the files
    /// `cur` has open ([`Reusing`]).
    fn next_chain_options(&self, cur: &Disk) -> cowdisk_core::OpenOptions {
        let source = Arc::new(Reusing::over(crate::layer_source(), cur));
        crate::open_options()
            .cache(self.cache.clone())
            .source(source)
    }

    fn push(&self, disk: Disk) {
        // `exclusive` checked there is room, and only its callers push.
        if !self.disks.push(disk) {
            eprintln!(
                "cowdisk: serve: {}: no room for the new chain's disk",
                self.image.display()
            );
        }
    }

    /// Live squash (see `live_squash`). Call inside [`LiveDisk::exclusive`].
    pub fn squash(&self, layers: Option<u32>, rate: Option<u64>) -> Result<squash::Squashed> {
        live_squash(self, layers, rate)
    }

    /// `check` (read-only) of the served chain: writes are held at the gate and the top
    /// flushed, so the files are exactly what a crash now would leave, and stay so while
    /// the check reads them (reads go on). Returns what `check` prints and its exit code.
    pub fn check(&self) -> Result<(serde_json::Value, Vec<String>, i32)> {
        let _gate = self.close_gate();
        let cur = self.current();
        if !cur.is_read_only() {
            cur.flush().map_err(|e| Error::disk(&self.image, e))?;
        }
        let opts = crate::cmd::check::Options {
            repair: false,
            discard_unreferenced: false,
            show: false,
        };
        let report = crate::cmd::check::check_chain_with(&self.image, &opts, false)?;
        Ok(crate::cmd::check::render(
            &report,
            &self.image.display().to_string(),
            false,
        ))
    }

    /// Live reset: the steps of [`reset`] with writes held at the gate; the new empty top
    /// is opened under its temp name, then renamed over the image and served. Writes
    /// acknowledged before are discarded, as `reset` means. Call inside
    /// [`LiveDisk::exclusive`].
    pub fn reset(&self) -> Result<cowdisk_core::Header> {
        let _gate = self.close_gate();
        let cur = self.current();
        let mut opened: Option<Disk> = None;
        let new = reset::steps(cur, &self.image, &mut |tmp| {
            let mut d = Disk::open(tmp, &self.next_chain_options(cur))?;
            d.set_top_path(self.image.clone());
            opened = Some(d);
            Ok(())
        })?;
        if let Some(d) = opened {
            self.push(d);
        }
        Ok(new)
    }

    /// Live snapshot: the steps of [`snapshot`] on the served disk, with writes held at
    /// the gate from the flush before the seal until the new top serves. Call inside
    /// [`LiveDisk::exclusive`].
    pub fn snapshot(&self, snap: &Path) -> Result<snapshot::Snapshotted> {
        let cur = self.current();
        let image = self.image.clone();
        // The slow part of the seal (writing back the map) is done once before the gate
        // closes, so writes wait only for what arrived since.
        cur.flush().map_err(|e| Error::disk(&image, e))?;
        let _gate = self.close_gate();
        let (reference, pending) = snapshot::plan(cur, &image, snap)?;
        let mut opened: Option<Disk> = None;
        let res = snapshot::steps(cur, &image, snap, &pending, reference, &mut || {
            // After a live squash older generations hold the same top file (one of them
            // its exclusive lock): all of them must let go of exclusivity.
            for d in self.disks.all() {
                if same_file(d, cur) {
                    share_sealed_lock(d)?;
                }
            }
            let mut d = Disk::open(&pending, &self.next_chain_options(cur))?;
            d.set_top_path(image.clone());
            opened = Some(d);
            Ok(())
        });
        if let Some(d) = opened {
            // Even if the rename failed, the new top is what the chain continues with
            // (recovery renames it into place at the next start): serve it.
            self.push(d);
            self.stats.snapshot_taken();
        } else if res.is_err() && cur.top_header().state != LayerState::Sealed && exists(&pending) {
            // Before the commit point: undo, the served top goes on taking writes.
            let _ = std::fs::remove_file(&pending);
            let _ = sync_folder(&folder_of(&pending));
        }
        res
    }
}

/// Live squash: the steps of [`squash`], the merged layer written while the export
/// serves (it reads only sealed layers), then, with writes held at the gate, the top
/// flushed, repointed (the commit point) and reopened in place over the new chain.
/// Call inside [`LiveDisk::exclusive`].
fn live_squash(
    live: &LiveDisk,
    layers: Option<u32>,
    rate: Option<u64>,
) -> Result<squash::Squashed> {
    let built = squash::build(live.current(), &live.image, layers, false, rate)?;
    let _gate = live.close_gate();
    let cur = live.current();
    // The reopened top reads its map from the file: it must hold everything.
    cur.flush().map_err(|e| Error::disk(&live.image, e))?;
    let done = squash::commit(cur, &live.image, built)?;
    // This process keeps the top's lock through the current disk's file all along.
    let opts = live.next_chain_options(cur).top_locked_by_caller();
    match Disk::open(&live.image, &opts) {
        Ok(d) => live.push(d),
        Err(e) => {
            // The old chain reads the same; only its files stay open until restart.
            eprintln!(
                "cowdisk: serve: {}: squashed, but serving the old chain until restart: {e}",
                live.image.display()
            );
        }
    }
    Ok(done)
}

/// True if both disks' tops are the same file.
fn same_file(a: &Disk, b: &Disk) -> bool {
    let id = |d: &Disk| {
        d.top_storage()
            .fd()
            .and_then(|fd| rustix::fs::fstat(fd).ok())
            .map(|st| (st.st_dev, st.st_ino))
    };
    id(a).is_some() && id(a) == id(b)
}

/// Turns the exclusive lock of the just-sealed top into the shared lock every sealed
/// layer holds, so the new chain (and other processes) can open it as a parent. flock
/// converts a lock on the same open file; another process can slip in between only
/// with a lock it drops at once (a sealed layer opens read-only), hence the retries.
fn share_sealed_lock(disk: &Disk) -> Result<()> {
    let Some(fd) = disk.top_storage().fd() else {
        return Ok(());
    };
    let mut tries = 0;
    loop {
        match rustix::fs::flock(fd, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => return Ok(()),
            Err(e) if tries < 50 && e == rustix::io::Errno::WOULDBLOCK => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::os(
                    disk.top_path(),
                    "share the sealed layer's lock",
                    e.into(),
                ))
            }
        }
    }
}
