//! A layer's allocation map in memory: 2 bits per block in atomic words, so readers
//! never lock; dirty pages are tracked for the next flush.
//!
//! Crash atomicity comes from the A/B page slots (see FORMAT.md): a flush writes each
//! dirty page into the slot that does not hold its current version, with the next
//! sequence number, so a torn page write leaves the previous version intact.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, OnceLock};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::FormatError;
use crate::format::{
    self, BlockState, Geometry, PageSlot, ENTRIES_PER_PAGE, PAGE_HEADER, PAGE_SIZE,
};
use crate::storage::{ReadStorage, Storage};

const ENTRIES_PER_WORD: u64 = 32;
/// The low bit of every 2-bit entry in a word.
const LOW_BITS: u64 = 0x5555_5555_5555_5555;

/// A 2-bit map entry's state (every value is one).
#[inline]
fn decode_state(v: u64) -> BlockState {
    match v {
        1 => BlockState::Data,
        2 => BlockState::Zero,
        3 => BlockState::Partial,
        _ => BlockState::Absent,
    }
}
const WORDS_PER_PAGE: u64 = ENTRIES_PER_PAGE / ENTRIES_PER_WORD;

/// A damaged-but-tolerated map slot, reported by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFinding {
    /// Page index.
    pub page: u64,
    /// Slot (0 = A, 1 = B).
    pub slot: usize,
    /// What was wrong.
    pub reason: &'static str,
    /// False only when the slot is provably the older copy of its page (harmless). True
    /// when it may hold a newer flush than the slot in use: a torn flush, or damage
    /// after a completed one, which the format cannot tell apart (FORMAT.md).
    pub maybe_newer: bool,
    /// The sequence the slot claims, when its magic and page index are intact.
    pub claimed_sequence: Option<u64>,
    /// The sequence of the slot in use (`None`: the page reads as all absent).
    pub current_sequence: Option<u64>,
    /// Data and whiteouts the damaged slot records beyond the slot in use, when its
    /// magic and page index are intact.
    pub beyond_current: Option<crate::map_slots::SlotEntries>,
}

#[derive(Debug, Clone, Copy)]
struct PageMeta {
    /// Slot holding the current version; `None` if neither was ever written.
    active: Option<usize>,
    sequence: u64,
}

/// How many blocks of a map hold data, are partial or are whiteouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Blocks holding data, partial blocks included (they hold some).
    pub data: u64,
    /// Of those, partial blocks (entry 3; only a writable top has them).
    pub partial: u64,
    /// Whiteout blocks.
    pub zero: u64,
}

/// One layer's allocation map. Pages are materialised only once they hold a non-absent
/// entry, so a huge, mostly empty layer costs memory in proportion to what it holds
/// (plus a few dozen bytes per page of its virtual size).
#[derive(Debug)]
pub struct AllocMap {
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
    blocks: u64,
    dirty: Vec<AtomicU64>,
    /// One bit per page: space for both its slots was reserved in this process, so its
    /// write-back needs no allocation.
    space_ready: Vec<AtomicU64>,
    metas: Mutex<Vec<PageMeta>>,
}

/// Bytes of memory a map costs before any page is materialised, and per materialised page.
pub const MAP_BYTES_PER_PAGE: u64 = 40;
/// Bytes of one materialised map page in memory.
pub const MAP_PAGE_BYTES: u64 = WORDS_PER_PAGE * 8;

/// Allocates `n` items without aborting when `n` comes from untrusted input.
fn try_vec<T>(n: u64, f: impl FnMut() -> T) -> Result<Vec<T>, FormatError> {
    let mut v = Vec::new();
    usize::try_from(n)
        .ok()
        .and_then(|n| v.try_reserve_exact(n).ok())
        .ok_or(FormatError::Field {
            field: "virtual_size",
            value: Some(n),
            reason: "map too large for this host's memory",
        })?;
    v.extend(std::iter::repeat_with(f).take(n as usize));
    Ok(v)
}

/// Pages encoded for writing, taken before the data sync of a flush.
pub struct PendingPages {
    pages: Vec<(u64, Vec<u8>)>,
}

impl PendingPages {
    /// True if no page is pending.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

impl AllocMap {
    /// An all-absent map (a new layer).
    pub fn new(g: &Geometry) -> AllocMap {
        AllocMap::try_new(g).expect("map of a validated geometry")
    }

    /// As [`AllocMap::new`], failing instead of aborting where memory runs out.
    pub fn try_new(g: &Geometry) -> Result<AllocMap, FormatError> {
        let meta = PageMeta {
            active: None,
            sequence: 0,
        };
        Ok(AllocMap {
            pages: try_vec(g.map_pages, OnceLock::new)?.into_boxed_slice(),
            blocks: g.blocks,
            dirty: try_vec(g.map_pages.div_ceil(64), || AtomicU64::new(0))?,
            space_ready: try_vec(g.map_pages.div_ceil(64), || AtomicU64::new(0))?,
            metas: Mutex::new(try_vec(g.map_pages, || meta)?),
        })
    }

    /// Reads and validates every page, choosing the newer valid slot of each. Pages in a
    /// hole of the file (never written) are skipped without reading.
    pub fn load(
        storage: &dyn ReadStorage,
        g: &Geometry,
    ) -> Result<(AllocMap, Vec<SlotFinding>), LoadError> {
        let map = AllocMap::try_new(g).map_err(LoadError::Format)?;
        let mut findings = Vec::new();
        let mut buf = vec![0u8; 2 * PAGE_SIZE as usize];
        let mut metas = lock(&map.metas);
        let mut data_at = Some(0);
        for p in 0..g.map_pages {
            let off = g.page_offset(p, 0);
            if data_at.is_some_and(|d| d < off) {
                data_at = storage.data_after(off).map_err(LoadError::Io)?;
            }
            if data_at.is_none_or(|d| d >= off + 2 * PAGE_SIZE) {
                continue;
            }
            storage.read_at(&mut buf, off).map_err(LoadError::Io)?;
            let Some((s, seq)) = map.load_page(p, &buf, &mut findings)? else {
                continue;
            };
            metas[p as usize] = PageMeta {
                active: Some(s),
                sequence: seq,
            };
        }
        drop(metas);
        Ok((map, findings))
    }

    /// Decodes both slots of page `p`, keeps the newer valid one's entries; returns its
    /// slot and sequence (`None` if neither was ever written).
    fn load_page(
        &self,
        p: u64,
        buf: &[u8],
        findings: &mut Vec<SlotFinding>,
    ) -> Result<Option<(usize, u64)>, LoadError> {
        let slots = [
            format::decode_page(&buf[..PAGE_SIZE as usize], p),
            format::decode_page(&buf[PAGE_SIZE as usize..], p),
        ];
        let mut best: Option<(usize, u64)> = None;
        for (s, slot) in slots.iter().enumerate() {
            if let PageSlot::Valid { sequence } = slot {
                if best.is_none_or(|(_, q)| *sequence > q) {
                    best = Some((s, *sequence));
                }
            }
        }
        for (s, slot) in slots.iter().enumerate() {
            if let PageSlot::Invalid(reason) = slot {
                findings.push(slot_finding(buf, p, s, reason, best, self.blocks));
            }
        }
        if slots.iter().all(|s| matches!(s, PageSlot::Invalid(_))) {
            let reason = match &slots[0] {
                PageSlot::Invalid(r) => r,
                _ => "damaged",
            };
            return Err(LoadError::Format(FormatError::MapPage { page: p, reason }));
        }
        let Some((s, _)) = best else { return Ok(None) };
        let start = s * PAGE_SIZE as usize + PAGE_HEADER;
        let entries = &buf[start..start + (PAGE_SIZE as usize - PAGE_HEADER)];
        for w in 0..WORDS_PER_PAGE {
            let word = LE::read_u64(&entries[(w * 8) as usize..]);
            if word != 0 {
                self.check_word(p * WORDS_PER_PAGE + w, word)
                    .map_err(LoadError::Format)?;
                self.page_mut(p)[w as usize].store(word, SeqCst);
            }
        }
        Ok(best)
    }

    /// Page `p`'s words, materialised.
    fn page_mut(&self, p: u64) -> &[AtomicU64] {
        self.pages[p as usize].get_or_init(|| {
            (0..WORDS_PER_PAGE)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice()
        })
    }

    /// Memory this map holds: the per-page index and the materialised pages.
    pub fn memory_bytes(&self) -> u64 {
        let held = self.pages.iter().filter(|p| p.get().is_some()).count() as u64;
        self.pages.len() as u64 * MAP_BYTES_PER_PAGE + held * MAP_PAGE_BYTES
    }

    fn check_word(&self, widx: u64, word: u64) -> Result<(), FormatError> {
        if word == 0 {
            return Ok(());
        }
        for j in 0..ENTRIES_PER_WORD {
            let v = (word >> (2 * j)) & 3;
            let block = widx * ENTRIES_PER_WORD + j;
            if v != 0 && block >= self.blocks {
                return Err(FormatError::MapEntry {
                    block,
                    reason: "beyond the last block",
                });
            }
        }
        Ok(())
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// State of block `b` (must be < blocks).
    #[inline]
    pub fn get(&self, b: u64) -> BlockState {
        let w = self.word((b / ENTRIES_PER_WORD) as usize);
        decode_state((w >> (2 * (b % ENTRIES_PER_WORD))) & 3)
    }

    /// Page `p`'s words, if it holds anything (for scans that visit its blocks in turn).
    #[inline]
    pub(crate) fn page_words(&self, p: u64) -> Option<&[AtomicU64]> {
        self.pages
            .get(p as usize)
            .and_then(OnceLock::get)
            .map(|b| &**b)
    }

    /// State of block `b` given its page's words from [`AllocMap::page_words`].
    #[inline]
    pub(crate) fn state_in(words: Option<&[AtomicU64]>, b: u64) -> BlockState {
        let Some(ws) = words else {
            return BlockState::Absent;
        };
        let w = ws[((b % ENTRIES_PER_PAGE) / ENTRIES_PER_WORD) as usize].load(SeqCst);
        decode_state((w >> (2 * (b % ENTRIES_PER_WORD))) & 3)
    }

    /// The raw word holding blocks `32*i .. 32*i+32` (0 where the page is not held).
    #[inline]
    pub(crate) fn word(&self, i: usize) -> u64 {
        let (p, w) = (i as u64 / WORDS_PER_PAGE, i as u64 % WORDS_PER_PAGE);
        match self.pages.get(p as usize).and_then(OnceLock::get) {
            Some(ws) => ws[w as usize].load(SeqCst),
            None => 0,
        }
    }

    /// Calls `f(word index, word)` for every non-zero word, skipping pages not held.
    pub(crate) fn for_each_word(&self, mut f: impl FnMut(usize, u64)) {
        for (p, page) in self.pages.iter().enumerate() {
            let Some(ws) = page.get() else { continue };
            for (j, w) in ws.iter().enumerate() {
                let w = w.load(SeqCst);
                if w != 0 {
                    f(p * WORDS_PER_PAGE as usize + j, w);
                }
            }
        }
    }

    /// True once both slots of page `p` have space reserved.
    pub(crate) fn page_space_ready(&self, p: u64) -> bool {
        self.space_ready[(p / 64) as usize].load(SeqCst) & (1 << (p % 64)) != 0
    }

    /// Records that both slots of page `p` have space reserved.
    pub(crate) fn set_page_space_ready(&self, p: u64) {
        self.space_ready[(p / 64) as usize].fetch_or(1 << (p % 64), SeqCst);
    }

    /// The pages that hold entries, for reserving their slots when a top is opened.
    pub(crate) fn held_pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages.len() as u64).filter(|&p| !self.page_unheld(p))
    }

    /// True if every block of `[first, first + n)` lies in pages that hold nothing.
    pub(crate) fn unheld(&self, first: u64, n: u64) -> bool {
        let (p0, p1) = (
            first / ENTRIES_PER_PAGE,
            (first + n).div_ceil(ENTRIES_PER_PAGE),
        );
        (p0..p1).all(|p| self.page_unheld(p))
    }

    /// The end of the run of blocks from `b` that lie in a page holding nothing (`b`
    /// itself if its page holds something).
    pub(crate) fn unheld_until(&self, b: u64) -> u64 {
        let p = b / ENTRIES_PER_PAGE;
        if self.page_unheld(p) {
            (p + 1) * ENTRIES_PER_PAGE
        } else {
            b
        }
    }

    /// True if no entry of page `p` was ever non-absent.
    fn page_unheld(&self, p: u64) -> bool {
        self.pages.get(p as usize).is_none_or(|x| x.get().is_none())
    }

    /// True if any block in `[first, first + n)` holds data (`first` word-aligned).
    pub fn any_data(&self, first: u64, n: u64) -> bool {
        let (p0, p1) = (
            first / ENTRIES_PER_PAGE,
            (first + n).div_ceil(ENTRIES_PER_PAGE),
        );
        if (p0..p1).all(|p| self.page_unheld(p)) {
            return false;
        }
        let words =
            (first / ENTRIES_PER_WORD) as usize..(first + n).div_ceil(ENTRIES_PER_WORD) as usize;
        // The low bit of each 2-bit entry is set only for data (and partial blocks).
        words.into_iter().any(|w| self.word(w) & LOW_BITS != 0)
    }

    /// Feeds the states of blocks `[first, first + n)` (none of them data) to a digest,
    /// a whole word at a time where all 32 are absent.
    pub fn digest_states(&self, digest: &mut crate::format::DigestBuilder, first: u64, n: u64) {
        let end = first + n;
        let mut b = first;
        while b < end {
            let page_end = ((b / ENTRIES_PER_PAGE + 1) * ENTRIES_PER_PAGE).min(end);
            if self.page_unheld(b / ENTRIES_PER_PAGE) {
                digest.absent(page_end - b);
                b = page_end;
            } else if b.is_multiple_of(ENTRIES_PER_WORD)
                && end - b >= ENTRIES_PER_WORD
                && self.word((b / ENTRIES_PER_WORD) as usize) == 0
            {
                digest.absent(ENTRIES_PER_WORD);
                b += ENTRIES_PER_WORD;
            } else {
                digest.block(self.get(b), 0);
                b += 1;
            }
        }
    }

    /// Sets block `b`'s state and marks its page dirty. Callers publish a state only
    /// after the data it exposes was written (see `flush`).
    pub fn set(&self, b: u64, state: BlockState) {
        let shift = 2 * (b % ENTRIES_PER_WORD);
        let page = b / ENTRIES_PER_PAGE;
        if state == BlockState::Absent && self.page_unheld(page) {
            return;
        }
        let word = &self.page_mut(page)[((b % ENTRIES_PER_PAGE) / ENTRIES_PER_WORD) as usize];
        let mut cur = word.load(SeqCst);
        loop {
            let new = (cur & !(3 << shift)) | ((state as u64) << shift);
            if new == cur {
                return;
            }
            match word.compare_exchange(cur, new, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), SeqCst);
    }

    /// True if some entry changed since the last [`AllocMap::take_dirty`] (or was put
    /// back by [`AllocMap::redirty`]).
    pub fn has_dirty(&self) -> bool {
        self.dirty.iter().any(|d| d.load(SeqCst) != 0)
    }

    /// Marks page `page` dirty without changing it, so the next write-back rewrites it
    /// (into its inactive slot): how `check --repair` replaces a damaged inactive slot.
    pub fn mark_page_dirty(&self, page: u64) {
        if let Some(d) = self.dirty.get((page / 64) as usize) {
            d.fetch_or(1 << (page % 64), SeqCst);
        }
    }

    /// The blocks in `state` (not `Absent`), in order, skipping pages not held.
    pub fn blocks_in(&self, state: BlockState) -> impl Iterator<Item = u64> + '_ {
        let held = self.pages.iter().enumerate();
        held.filter_map(|(p, pg)| pg.get().map(|ws| (p as u64, ws)))
            .flat_map(move |(p, ws)| {
                ws.iter().enumerate().flat_map(move |(j, w)| {
                    let w = w.load(SeqCst);
                    let first = (p * WORDS_PER_PAGE + j as u64) * ENTRIES_PER_WORD;
                    (0..ENTRIES_PER_WORD)
                        .filter(move |k| w != 0 && (w >> (2 * k)) & 3 == state as u64)
                        .map(move |k| first + k)
                })
            })
            .filter(move |&b| b < self.blocks)
    }

    /// Counts the map's entries in one walk.
    pub fn counts(&self) -> BlockCounts {
        let mut c = BlockCounts::default();
        self.for_each_word(|_, w| {
            // Low bit of each pair = data (1) or partial (3); high bit alone = zero.
            let (lo, hi) = (w & LOW_BITS, (w >> 1) & LOW_BITS);
            c.data += u64::from(lo.count_ones());
            c.partial += u64::from((lo & hi).count_ones());
            c.zero += u64::from((hi & !lo).count_ones());
        });
        c
    }

    /// The first partial block, if any (only a writable top may hold them).
    pub fn first_partial(&self) -> Option<u64> {
        let mut first = None;
        self.for_each_word(|wi, w| {
            let both = w & (w >> 1) & LOW_BITS;
            if first.is_none() && both != 0 {
                first = Some(wi as u64 * ENTRIES_PER_WORD + u64::from(both.trailing_zeros() / 2));
            }
        });
        first
    }

    /// Takes the dirty set and encodes those pages from the current entries. Must run
    /// before the flush's data sync: every entry seen here was published after its
    /// data write completed, so that sync covers it.
    pub fn take_dirty(&self) -> PendingPages {
        let mut pages = Vec::new();
        for (i, d) in self.dirty.iter().enumerate() {
            let mut bits = d.swap(0, SeqCst);
            while bits != 0 {
                let j = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let p = i as u64 * 64 + j;
                let mut entries = vec![0u8; (WORDS_PER_PAGE * 8) as usize];
                for w in 0..WORDS_PER_PAGE {
                    let word = self.word((p * WORDS_PER_PAGE + w) as usize);
                    LE::write_u64(&mut entries[(w * 8) as usize..], word);
                }
                pages.push((p, entries));
            }
        }
        PendingPages { pages }
    }

    /// Marks pages dirty again (after a failed write-back).
    pub fn redirty(&self, pending: &PendingPages) {
        for (p, _) in &pending.pages {
            self.dirty[(p / 64) as usize].fetch_or(1 << (p % 64), SeqCst);
        }
    }

    /// Writes pending pages into their inactive slots and syncs. On success the
    /// written slots become active. An error says whether the sync failed (`true`) or a
    /// page write did (`false`, nothing changed that a retry would not redo).
    pub fn write_back(
        &self,
        storage: &dyn Storage,
        g: &Geometry,
        pending: &PendingPages,
    ) -> Result<(), (bool, std::io::Error)> {
        if pending.pages.is_empty() {
            return Ok(());
        }
        let mut metas = lock(&self.metas);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut next = Vec::with_capacity(pending.pages.len());
        for (p, entries) in &pending.pages {
            let meta = metas[*p as usize];
            let slot = match meta.active {
                Some(s) => 1 - s,
                None => 0,
            };
            let seq = meta.sequence + 1;
            format::encode_page(&mut buf, *p, seq, entries);
            storage
                .write_at(&buf, g.page_offset(*p, slot))
                .map_err(|e| (false, e))?;
            next.push((
                *p,
                PageMeta {
                    active: Some(slot),
                    sequence: seq,
                },
            ));
        }
        storage.sync().map_err(|e| (true, e))?;
        for (p, m) in next {
            metas[p as usize] = m;
        }
        Ok(())
    }
}

/// Describes damaged slot `s` of page `p` (`buf` holds both slots) against the slot in
/// use, `best`.
fn slot_finding(
    buf: &[u8],
    p: u64,
    s: usize,
    reason: &'static str,
    best: Option<(usize, u64)>,
    blocks: u64,
) -> SlotFinding {
    let ps = PAGE_SIZE as usize;
    let d = crate::map_slots::Damaged {
        page: p,
        raw: &buf[s * ps..(s + 1) * ps],
        current: best.map(|(c, q)| (q, &buf[c * ps + PAGE_HEADER..(c + 1) * ps])),
        blocks,
    };
    SlotFinding {
        page: p,
        slot: s,
        reason,
        maybe_newer: d.maybe_newer(),
        claimed_sequence: d.claimed_sequence(),
        current_sequence: best.map(|(_, q)| q),
        beyond_current: d.entries_beyond_current(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a map could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// Reading failed.
    Io(std::io::Error),
    /// The map is invalid.
    Format(FormatError),
}
