//! The flush journal (FORMAT.md §Flush journal), chosen per open (`serve` keeps one by
//! default on disk file systems).
//!
//! A full flush syncs the top, and on a disk file system that sync allocates every hole
//! the writes since the last one filled (the sub-blocks of partial blocks) and writes
//! small overwrites back where they lie, scattered. A client flush whose changes since
//! the last full flush are all writes into blocks the top already held (data, or
//! partial: one a write fills stays partial until the next full flush), and not only
//! whole-block overwrites of data blocks while no epoch is live, instead copies the
//! changed ranges from the page cache into a side file written in advance,
//! `TOP.journal`, and syncs that file only: one sequential overwrite, with nothing to
//! allocate. The top keeps the writes in its page cache until the next full flush,
//! which also retires the journal.
//!
//! Rules that keep it safe:
//! - Records are written only while the top's header carries `INCOMPAT_FLUSH_JOURNAL`
//!   (set, and synced with the top, before the epoch's first record), and each names
//!   the top's UUID and that header's generation (the epoch): no other reader takes the
//!   top without replaying, and no record outlives its epoch.
//! - A block's record is taken under its stripe lock and only in the state the write
//!   left it in (data, or partial); anything else makes the flush a full one.
//! - Only a flush that finds the map unchanged since a successful full flush may use
//!   the journal, so every record's block is in the durable map as it was recorded.
//! - Replay (at a writable open) applies a record only where the durable map still has
//!   its block in that state, in order, then runs a full flush that clears the bit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use super::{lock, Disk};
use crate::error::{IoError, OpenError};
pub use crate::format::journal::journal_path;
use crate::format::journal::{Record, RecordKind, BATCH_ALIGN, RECORD_HEADER};
use crate::format::{BlockState, INCOMPAT_FLUSH_JOURNAL};
use crate::storage::{fs_facts, FsFacts, Storage};

/// Why an automatic journal is left off.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A sync writes nothing there, so the journal would only add a copy.
    InMemory,
    /// Bytes free, fewer than 16 times the journal: the space is the guest's.
    LowSpace(u64),
}

/// Whether an automatic journal of `capacity` bytes would not pay on a file system with
/// `facts` (`None`: it pays, as where the file system says nothing).
pub(crate) fn auto_refusal(facts: Option<FsFacts>, capacity: u64) -> Option<Refusal> {
    let f = facts?;
    if f.in_memory {
        Some(Refusal::InMemory)
    } else if f.free / 16 < capacity {
        Some(Refusal::LowSpace(f.free))
    } else {
        None
    }
}

/// Opens a top's journal file (`create`: making it if missing, durably).
pub type JournalOpener =
    Arc<dyn Fn(&Path, bool) -> std::io::Result<Arc<dyn Storage>> + Send + Sync>;

/// Most bytes of records one journal flush writes (its batch is built in memory); more
/// changed data makes the flush a full one.
const MAX_BATCH: u64 = 16 << 20;

/// Ranges written since the last flush, per block, with the state they were written in.
#[derive(Default)]
struct Dirty {
    ranges: HashMap<u64, (RecordKind, u32, u32)>,
    bytes: u64,
    overflow: bool,
}

/// The journal file and its epoch. Used under the disk's flush lock only.
#[derive(Default)]
struct Epoch {
    storage: Option<Arc<dyn Storage>>,
    /// The header carries the bit (durably): records of `epoch` may exist.
    live: bool,
    epoch: u64,
    seq: u64,
    tail: u64,
    /// The last full flush succeeded and the journal may take the next.
    clean: bool,
}

/// A disk's flush journal.
#[derive(Default)]
pub(super) struct Journal {
    pub(super) opener: Option<JournalOpener>,
    /// Bytes the journal file holds (0: no journal).
    capacity: u64,
    /// Chosen by the engine (`OpenOptions::flush_journal_auto`): not made where it would
    /// not pay (see [`auto_refusal`]).
    auto: bool,
    /// Set when the file could not be made: every flush is a full one.
    disabled: AtomicBool,
    dirty: Mutex<Dirty>,
    epoch: Mutex<Epoch>,
    /// Client flushes made durable in the journal (for statistics).
    flushes: AtomicU64,
}

impl Journal {
    fn enabled(&self) -> bool {
        self.capacity > 0 && !self.disabled.load(SeqCst)
    }
}

impl Disk {
    /// Lets client flushes go to a journal of `capacity` bytes beside the top, opened
    /// through `opener` (0 turns it off). Also what replay at open needs.
    /// With `auto`, the journal is left off where [`auto_refusal`] says it would not pay.
    pub(crate) fn set_journal(&mut self, opener: JournalOpener, capacity: u64, auto: bool) {
        self.journal.opener = Some(opener);
        self.journal.capacity = capacity;
        self.journal.auto = auto;
    }

    /// Client flushes made durable in the flush journal since the disk was opened.
    pub fn journal_flushes(&self) -> u64 {
        self.journal.flushes.load(SeqCst)
    }

    /// Remembers that `[lo, hi)` of block `b`, which the write found and left `kind`,
    /// was written. Called before the write returns.
    pub(super) fn journal_note(&self, b: u64, kind: RecordKind, lo: usize, hi: usize) {
        if !self.journal.enabled() {
            return;
        }
        let mut d = lock(&self.journal.dirty);
        if d.overflow {
            return;
        }
        // Whole sub-blocks, as the record will hold them: the batch's size is counted.
        let sub = self.geometry.sub_size();
        let lo = (lo / sub * sub) as u32;
        let hi = (hi.div_ceil(sub) * sub).min(self.geometry.block_len(b)) as u32;
        let (old, new) = match d.ranges.get(&b) {
            Some(&(k, a, z)) if k == kind => (
                u64::from(z - a) + RECORD_HEADER as u64,
                (k, a.min(lo), z.max(hi)),
            ),
            // It changed state in between: the map says so, and the next flush is full.
            Some(_) => {
                d.overflow = true;
                return;
            }
            None => (0, (kind, lo, hi)),
        };
        d.ranges.insert(b, new);
        d.bytes = d.bytes - old + u64::from(new.2 - new.1) + RECORD_HEADER as u64;
        // Bounds the memory of the ranges and of the batch built from them.
        if d.bytes > MAX_BATCH {
            d.overflow = true;
            d.ranges.clear();
        }
    }

    /// A full flush begins: it covers every write noted so far, and until it succeeds no
    /// flush may use the journal.
    pub(super) fn journal_full_begin(&self) {
        if self.journal.capacity == 0 {
            return;
        }
        lock(&self.journal.epoch).clean = false;
        let mut d = lock(&self.journal.dirty);
        d.ranges.clear();
        d.bytes = 0;
        d.overflow = false;
    }

    /// True while the journal may hold records (the header says so).
    pub(super) fn journal_live(&self) -> bool {
        lock(&self.journal.epoch).live
    }

    /// A full flush synced the top's data and map: the journal's records are redundant.
    /// Clears the header bit (a header write and sync) if an epoch was live.
    pub(super) fn journal_full_done(&self) -> Result<(), IoError> {
        let mut ep = lock(&self.journal.epoch);
        if ep.live {
            self.rewrite_header(|h| h.incompat &= !INCOMPAT_FLUSH_JOURNAL)
                .map_err(|e| self.journal_err("retire flush journal", e))?;
            ep.live = false;
        }
        ep.clean = true;
        Ok(())
    }

    /// A client flush through the journal, or `None` where it must be a full flush.
    pub(super) fn journal_flush(&self) -> Option<Result<(), IoError>> {
        if !self.journal.enabled() || self.top.map.has_dirty() {
            return None;
        }
        let mut ep = lock(&self.journal.epoch);
        if !ep.clean {
            return None;
        }
        let (ranges, bytes) = {
            let mut d = lock(&self.journal.dirty);
            if d.overflow {
                return None;
            }
            (std::mem::take(&mut d.ranges), std::mem::take(&mut d.bytes))
        };
        // Every write counted since was taken by a flush before (one that counted less
        // ran after the write's note): nothing is left to make durable.
        if ranges.is_empty() {
            return Some(Ok(()));
        }
        // Writes into data blocks alone allocate nothing: there the journal only turns
        // the top's scattered writeback of small overwrites into one sequential write.
        // Whole blocks the top writes back as sequentially, and the journal would write
        // them twice, so a flush of those alone stays a full one (unless an epoch is
        // live: its full flush would also allocate the holes the journal defers).
        if !ep.live && ranges.iter().all(|(&b, &r)| self.whole_data_block(b, r)) {
            return None;
        }
        // A new epoch starts at the beginning of the file; the batch's records are the
        // bytes counted, padded to BATCH_ALIGN at most.
        let tail = if ep.live { ep.tail } else { 0 };
        if tail + bytes + BATCH_ALIGN > self.journal.capacity {
            return None;
        }
        if let Err(e) = self.open_epoch(&mut ep) {
            return e.map(Err);
        }
        let (batch, seq) = match self.journal_batch(ranges, &ep)? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let st = ep.storage.clone()?;
        if st.write_at(&batch, ep.tail).is_err() {
            // Nothing acknowledged rests on it: a full flush covers these writes.
            return None;
        }
        if let Err(e) = st.sync() {
            self.poisoned.store(true, SeqCst);
            let path = journal_path(&self.top.path);
            return Some(Err(Self::io_err(&path, "sync flush journal", ep.tail, e)));
        }
        ep.tail += batch.len() as u64;
        ep.seq = seq;
        self.journal.flushes.fetch_add(1, SeqCst);
        Some(Ok(()))
    }

    /// The range noted for block `b` is an overwrite of all of a data block.
    fn whole_data_block(&self, b: u64, (kind, lo, hi): (RecordKind, u32, u32)) -> bool {
        kind == RecordKind::Data && lo == 0 && hi as usize == self.geometry.block_len(b)
    }

    /// Makes the epoch live: the file exists (written in advance), then the header bit
    /// is set and synced. `Err(None)`: the file could not be made (the journal is off
    /// from now on; a full flush follows).
    fn open_epoch(&self, ep: &mut Epoch) -> Result<(), Option<IoError>> {
        if ep.live {
            return Ok(());
        }
        if !self.ensure_journal_file(ep) {
            return Err(None);
        }
        let h = self
            .rewrite_header(|h| h.incompat |= INCOMPAT_FLUSH_JOURNAL)
            .map_err(|e| {
                // The header sync may have dropped data writes too.
                self.poisoned.store(true, SeqCst);
                Some(self.journal_err("open flush journal", e))
            })?;
        ep.live = true;
        ep.epoch = h.generation;
        ep.seq = 0;
        ep.tail = 0;
        Ok(())
    }

    /// Makes the journal file now (a server, once it opened its image), so the first
    /// flush that uses it does not write it out; else that flush makes it. A file that
    /// cannot be made turns the journal off, with a warning.
    pub fn prepare_journal(&self) {
        if !self.journal.enabled() || self.is_read_only() {
            return;
        }
        self.ensure_journal_file(&mut lock(&self.journal.epoch));
    }

    /// The journal file is open in `ep`, made if need be; false if it cannot be made,
    /// which turns the journal off with a warning.
    fn ensure_journal_file(&self, ep: &mut Epoch) -> bool {
        if ep.storage.is_some() {
            return true;
        }
        let refusal = if self.journal.auto {
            auto_refusal(fs_facts(&*self.top.storage), self.journal.capacity)
        } else {
            None
        };
        let path = journal_path(&self.top.path);
        match refusal {
            Some(Refusal::InMemory) => {}
            Some(Refusal::LowSpace(free)) => eprintln!(
                "cowdisk: {}: {} MiB free on its file system, under 16 times the flush \
                 journal's {} MiB; flushes go without the flush journal",
                path.display(),
                free >> 20,
                self.journal.capacity >> 20
            ),
            None => match self.make_journal_file() {
                Ok(st) => ep.storage = Some(st),
                Err(e) => {
                    eprintln!("cowdisk: {e}; flushes go without the flush journal");
                    // No epoch is live (its file would be open), so the file holds
                    // nothing to replay: a part written out before the error only
                    // takes space.
                    let _ = std::fs::remove_file(&path);
                }
            },
        }
        if ep.storage.is_none() {
            self.journal.disabled.store(true, SeqCst);
        }
        ep.storage.is_some()
    }

    /// The top is named `to` from now on (a new top opened under a temporary name): a
    /// journal file made under the old name goes, and the next epoch makes one under the
    /// new. Only before any flush used it (the caller renames a top it just opened).
    pub(super) fn journal_renamed(&mut self, to: &Path) {
        let ep = self
            .journal
            .epoch
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        if to != self.top.path && ep.storage.take().is_some() {
            debug_assert!(!ep.live, "a top renamed with records in its journal");
            let _ = std::fs::remove_file(journal_path(&self.top.path));
        }
    }

    /// Opens or creates the journal file and writes it out to its capacity, so a
    /// journal flush's sync finds nothing to allocate.
    fn make_journal_file(&self) -> Result<Arc<dyn Storage>, IoError> {
        let path = journal_path(&self.top.path);
        let err = |op, e| Self::io_err(&path, op, 0, e);
        let opener = self.journal.opener.as_ref().ok_or_else(|| {
            err(
                "create flush journal",
                std::io::Error::other("no way to open it given"),
            )
        })?;
        let st = opener(&path, true).map_err(|e| err("create flush journal", e))?;
        let mut at = st.len().map_err(|e| err("stat flush journal", e))?;
        let zeros = &crate::storage::ZERO_BLOCK[..];
        while at < self.journal.capacity {
            let n = (self.journal.capacity - at).min(zeros.len() as u64) as usize;
            st.write_at(&zeros[..n], at)
                .map_err(|e| err("write flush journal", e))?;
            at += n as u64;
        }
        st.sync().map_err(|e| err("sync flush journal", e))?;
        Ok(st)
    }

    /// The records of `ranges`, in block order, and the next sequence number. `None`:
    /// a block is no longer in the state it was written in.
    fn journal_batch(
        &self,
        ranges: HashMap<u64, (RecordKind, u32, u32)>,
        ep: &Epoch,
    ) -> Option<Result<(Vec<u8>, u64), IoError>> {
        let g = &self.geometry;
        let sub = g.sub_size();
        let mut blocks: Vec<_> = ranges.into_iter().collect();
        blocks.sort_unstable_by_key(|&(b, _)| b);
        let mut out = Vec::new();
        let mut seq = ep.seq;
        let uuid = self.top.header.get().uuid;
        for (b, (kind, lo, hi)) in blocks {
            let _s = lock(self.stripe(b));
            // Whole sub-blocks, as the partial blocks' own: a crash keeps each of them
            // whole, never part of one write's bytes in it.
            let (lo, hi) = (lo as usize / sub * sub, hi as usize);
            let hi = (hi.div_ceil(sub) * sub).min(g.block_len(b));
            let (lo, hi, bits) = match (kind, self.top.map.get(b)) {
                (RecordKind::Data, BlockState::Data) => (lo, hi, 0),
                (RecordKind::Partial, BlockState::Partial) => {
                    let (a, e) = (lo, hi);
                    let bits =
                        self.top.sub.bits(b) & super::partial::span(a / sub, e.div_ceil(sub));
                    if bits == 0 {
                        return None;
                    }
                    (a, e, bits)
                }
                _ => return None,
            };
            let at = out.len();
            out.resize(at + RECORD_HEADER + hi - lo, 0);
            let o = g.block_offset(b) + lo as u64;
            if let Err(e) = self.top.storage.read_at(&mut out[at + RECORD_HEADER..], o) {
                return Some(Err(Self::io_err(
                    &self.top.path,
                    "read for flush journal",
                    o,
                    e,
                )));
            }
            let rec = Record {
                uuid,
                epoch: ep.epoch,
                seq,
                block: b,
                kind,
                offset: lo as u32,
                len: (hi - lo) as u32,
                bits,
            };
            let h = rec.encode(&out[at + RECORD_HEADER..]);
            out[at..at + RECORD_HEADER].copy_from_slice(&h);
            seq += 1;
        }
        out.resize(
            out.len().div_ceil(BATCH_ALIGN as usize) * BATCH_ALIGN as usize,
            0,
        );
        Some(Ok((out, seq)))
    }

    /// After a replay: the epoch `epoch` is live until the next full flush retires it.
    /// The file is opened again (and written out to capacity) by the next epoch.
    pub(super) fn adopt_live_epoch(&self, epoch: u64) {
        let mut ep = lock(&self.journal.epoch);
        ep.live = true;
        ep.epoch = epoch;
    }

    fn journal_err(&self, op: &'static str, e: OpenError) -> IoError {
        Self::io_err(&self.top.path, op, 0, std::io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::{auto_refusal, Refusal};
    use crate::storage::FsFacts;

    #[test]
    fn the_automatic_journal_is_refused_in_memory_and_short_of_space() {
        let m = 64 << 20;
        let disk = |free| {
            Some(FsFacts {
                in_memory: false,
                free,
            })
        };
        assert_eq!(auto_refusal(disk(16 * m), m), None);
        assert_eq!(
            auto_refusal(disk(16 * m - 1), m),
            Some(Refusal::LowSpace(16 * m - 1))
        );
        assert_eq!(auto_refusal(disk(0), m), Some(Refusal::LowSpace(0)));
        let tmpfs = Some(FsFacts {
            in_memory: true,
            free: u64::MAX,
        });
        assert_eq!(auto_refusal(tmpfs, m), Some(Refusal::InMemory));
        // A file system that says nothing: the journal works anywhere.
        assert_eq!(auto_refusal(None, m), None);
    }
}
