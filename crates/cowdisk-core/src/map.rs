//! A layer's allocation map in memory: 2 bits per block in atomic words, so readers
//! never lock; dirty pages are tracked for the next flush.
//!
//! Crash atomicity comes from the A/B page slots (see FORMAT.md): a flush writes each
//! dirty page into the slot that does not hold its current version, with the next
//! sequence number, so a torn page write leaves the previous version intact.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::FormatError;
use crate::format::{
    self, BlockState, Geometry, PageSlot, ENTRIES_PER_PAGE, PAGE_HEADER, PAGE_SIZE,
};
use crate::storage::Storage;

const ENTRIES_PER_WORD: u64 = 32;
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

/// One layer's allocation map.
#[derive(Debug)]
pub struct AllocMap {
    words: Vec<AtomicU64>,
    blocks: u64,
    dirty: Vec<AtomicU64>,
    pages: Mutex<Vec<PageMeta>>,
}

/// Pages encoded for writing, taken before the data sync of a flush.
pub struct PendingPages {
    pages: Vec<(u64, Vec<u8>)>,
}

impl AllocMap {
    /// An all-absent map (a new layer).
    pub fn new(g: &Geometry) -> AllocMap {
        let nwords = (g.map_pages * WORDS_PER_PAGE) as usize;
        AllocMap {
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            blocks: g.blocks,
            dirty: (0..g.map_pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages: Mutex::new(vec![
                PageMeta {
                    active: None,
                    sequence: 0
                };
                g.map_pages as usize
            ]),
        }
    }

    /// Reads and validates every page, choosing the newer valid slot of each.
    pub fn load(
        storage: &dyn crate::storage::ReadStorage,
        g: &Geometry,
    ) -> Result<(AllocMap, Vec<SlotFinding>), LoadError> {
        let map = AllocMap::new(g);
        let mut findings = Vec::new();
        let mut buf = vec![0u8; 2 * PAGE_SIZE as usize];
        let mut metas = Vec::with_capacity(g.map_pages as usize);
        for p in 0..g.map_pages {
            storage
                .read_at(&mut buf, g.page_offset(p, 0))
                .map_err(LoadError::Io)?;
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
                    findings.push(slot_finding(&buf, p, s, reason, best, g.blocks));
                }
            }
            let all_invalid = slots.iter().all(|s| matches!(s, PageSlot::Invalid(_)));
            if all_invalid {
                let reason = match &slots[0] {
                    PageSlot::Invalid(r) => r,
                    _ => "damaged",
                };
                return Err(LoadError::Format(FormatError::MapPage { page: p, reason }));
            }
            if let Some((s, seq)) = best {
                let start = s * PAGE_SIZE as usize + PAGE_HEADER;
                let entries = &buf[start..start + (PAGE_SIZE as usize - PAGE_HEADER)];
                for w in 0..WORDS_PER_PAGE {
                    let word = LE::read_u64(&entries[(w * 8) as usize..]);
                    map.check_word(p * WORDS_PER_PAGE + w, word)
                        .map_err(LoadError::Format)?;
                    map.words[(p * WORDS_PER_PAGE + w) as usize].store(word, SeqCst);
                }
                metas.push(PageMeta {
                    active: Some(s),
                    sequence: seq,
                });
            } else {
                metas.push(PageMeta {
                    active: None,
                    sequence: 0,
                });
            }
        }
        *map.pages.lock().unwrap_or_else(|e| e.into_inner()) = metas;
        Ok((map, findings))
    }

    fn check_word(&self, widx: u64, word: u64) -> Result<(), FormatError> {
        if word == 0 {
            return Ok(());
        }
        for j in 0..ENTRIES_PER_WORD {
            let v = (word >> (2 * j)) & 3;
            let block = widx * ENTRIES_PER_WORD + j;
            if v == 3 {
                return Err(FormatError::MapEntry {
                    block,
                    reason: "reserved state 3",
                });
            }
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
        let w = self.words[(b / ENTRIES_PER_WORD) as usize].load(SeqCst);
        match (w >> (2 * (b % ENTRIES_PER_WORD))) & 3 {
            1 => BlockState::Data,
            2 => BlockState::Zero,
            _ => BlockState::Absent,
        }
    }

    /// The raw word holding blocks `32*i .. 32*i+32` (for fast scans).
    pub fn word(&self, i: usize) -> u64 {
        self.words.get(i).map_or(0, |w| w.load(SeqCst))
    }

    /// True if any block in `[first, first + n)` holds data (`first` word-aligned).
    pub fn any_data(&self, first: u64, n: u64) -> bool {
        let words =
            (first / ENTRIES_PER_WORD) as usize..(first + n).div_ceil(ENTRIES_PER_WORD) as usize;
        // The low bit of each 2-bit entry is set only for data.
        words
            .into_iter()
            .any(|w| self.word(w) & 0x5555_5555_5555_5555 != 0)
    }

    /// Feeds the states of blocks `[first, first + n)` (none of them data) to a digest,
    /// a whole word at a time where all 32 are absent.
    pub fn digest_states(&self, digest: &mut crate::format::DigestBuilder, first: u64, n: u64) {
        let end = first + n;
        let mut b = first;
        while b < end {
            if b.is_multiple_of(ENTRIES_PER_WORD)
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

    /// Number of words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Sets block `b`'s state and marks its page dirty. Callers publish a state only
    /// after the data it exposes was written (see `flush`).
    pub fn set(&self, b: u64, state: BlockState) {
        let shift = 2 * (b % ENTRIES_PER_WORD);
        let word = &self.words[(b / ENTRIES_PER_WORD) as usize];
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
        let page = b / ENTRIES_PER_PAGE;
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), SeqCst);
    }

    /// Marks page `page` dirty without changing it, so the next write-back rewrites it
    /// (into its inactive slot): how `check --repair` replaces a damaged inactive slot.
    pub fn mark_page_dirty(&self, page: u64) {
        if let Some(d) = self.dirty.get((page / 64) as usize) {
            d.fetch_or(1 << (page % 64), SeqCst);
        }
    }

    /// The blocks in `state` (not `Absent`), in order, skipping empty words.
    pub fn blocks_in(&self, state: BlockState) -> impl Iterator<Item = u64> + '_ {
        (0..self.words.len()).flat_map(move |wi| {
            let w = self.word(wi);
            let first = wi as u64 * ENTRIES_PER_WORD;
            (0..ENTRIES_PER_WORD)
                .filter(move |j| w != 0 && (w >> (2 * j)) & 3 == state as u64)
                .map(move |j| first + j)
                .filter(move |&b| b < self.blocks)
        })
    }

    /// Counts (data, zero) blocks.
    pub fn counts(&self) -> (u64, u64) {
        let (mut data, mut zero) = (0, 0);
        for w in &self.words {
            let w = w.load(SeqCst);
            // Low bit of each pair = data, high bit = zero.
            data += u64::from((w & 0x5555_5555_5555_5555).count_ones());
            zero += u64::from((w & 0xAAAA_AAAA_AAAA_AAAA).count_ones());
        }
        (data, zero)
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
                    let word = self.words[(p * WORDS_PER_PAGE + w) as usize].load(SeqCst);
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
    /// written slots become active.
    pub fn write_back(
        &self,
        storage: &dyn Storage,
        g: &Geometry,
        pending: &PendingPages,
    ) -> std::io::Result<()> {
        if pending.pages.is_empty() {
            return Ok(());
        }
        let mut metas = self.pages.lock().unwrap_or_else(|e| e.into_inner());
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
            storage.write_at(&buf, g.page_offset(*p, slot))?;
            next.push((
                *p,
                PageMeta {
                    active: Some(slot),
                    sequence: seq,
                },
            ));
        }
        storage.sync()?;
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

/// Why a map could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// Reading failed.
    Io(std::io::Error),
    /// The map is invalid.
    Format(FormatError),
}
