//! The sub-block bitmaps of a writable top's partial blocks (FORMAT.md §Partial blocks).
//!
//! A first write smaller than a block held below writes only the sub-blocks it touches
//! and marks the block *partial*; its bitmap (one `u32`) names the sub-blocks the top
//! holds, and the rest still read from below. Bitmaps live in pages after the data area,
//! each with an A and a B slot like a map page, so a torn page write leaves the older copy.
//!
//! A map page and the bitmap page of the same block are separate writes. That is safe
//! because while a block is partial its bitmap only gains bits, and when it stops being
//! partial its bitmap is left as it was (or set to all bits, when it became data by being
//! filled). So a flush torn between the two shows, per block, the older bitmap (writes
//! since the last flush fall back to the layer below) or the newer one (whose data the
//! flush synced first). A bitmap can only be set-but-stale for a block the map calls
//! absent after a crash; opening the top for writing clears those first
//! ([`SubMap::clear_stale`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::FormatError;
use crate::format::{self, BlockState, Geometry, PageSlot, PAGE_HEADER, PAGE_SIZE, SUB_PER_PAGE};
use crate::map::AllocMap;
use crate::storage::{ReadStorage, Storage};

#[derive(Debug, Clone, Copy)]
struct Entry {
    bits: u32,
    /// Still partial. A block that left (filled, or whited out) keeps its entry until a
    /// flush made its new map state durable, so no page write clears its bitmap before.
    live: bool,
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<u64, Entry>,
    dirty: BTreeSet<u64>,
    /// Pages whose slots' space was reserved in this process.
    ready: BTreeSet<u64>,
    /// Per written page: the slot holding its current version and its sequence.
    metas: BTreeMap<u64, (usize, u64)>,
    /// The entries no longer live, so a flush finds them without visiting every entry.
    left: BTreeSet<u64>,
    /// Partial blocks that may hold every sub-block, for the next full flush to make data.
    filled: BTreeSet<u64>,
}

/// The partial blocks of one top, in memory: costs memory in proportion to them.
#[derive(Debug, Default)]
pub struct SubMap {
    inner: Mutex<Inner>,
}

/// Bitmap pages encoded for writing, taken with the map's dirty pages.
#[derive(Debug, Default)]
pub struct SubPending {
    pages: Vec<(u64, Vec<u8>)>,
    /// Entries of blocks no longer partial whose state this flush makes durable.
    retired: Vec<(u64, u32)>,
    /// Slots written: (page, slot, sequence), current once the flush's sync succeeded.
    written: Vec<(u64, usize, u64)>,
}

impl SubPending {
    /// True if no bitmap page is pending.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

impl SubMap {
    /// Reads the bitmaps of `map`'s partial blocks. For a top opened to write
    /// (`writable`) it also returns the pages holding a bitmap of an absent block (left by
    /// a crash before the map page that made it partial), to clear with
    /// [`SubMap::clear_stale`] before any write, so a later partial write of that block
    /// cannot expose them.
    pub fn load(
        storage: &dyn ReadStorage,
        g: &Geometry,
        map: &AllocMap,
        writable: bool,
    ) -> std::io::Result<Result<(SubMap, Vec<u64>), FormatError>> {
        let mut inner = Inner::default();
        let mut stale = Vec::new();
        if g.sub_pages == 0 {
            return Ok(match map.first_partial() {
                Some(block) => Err(FormatError::MapEntry {
                    block,
                    reason: "partial block in a layer without a bitmap area",
                }),
                None => Ok((SubMap::default(), stale)),
            });
        }
        // Opened to write, every page (holes skipped below); else the partial blocks' pages.
        let mut partial = map.blocks_in(BlockState::Partial).map(|b| b / SUB_PER_PAGE);
        let mut last = None;
        let pages: Box<dyn Iterator<Item = u64>> = if writable {
            Box::new(0..g.sub_pages)
        } else {
            Box::new(std::iter::from_fn(move || {
                let p = partial.find(|&p| Some(p) != last)?;
                last = Some(p);
                Some(p)
            }))
        };
        let mut buf = vec![0u8; 2 * PAGE_SIZE as usize];
        let mut data_at = Some(0);
        for p in pages {
            let off = g.sub_page_offset(p, 0);
            if data_at.is_some_and(|d| d < off) {
                data_at = storage.data_after(off)?;
            }
            if data_at.is_none_or(|d| d >= off + 2 * PAGE_SIZE) {
                continue;
            }
            storage.read_at(&mut buf, off)?;
            let Some((slot, seq)) = (match current_slot(&buf, p) {
                Ok(x) => x,
                Err(e) => return Ok(Err(e)),
            }) else {
                continue;
            };
            inner.metas.insert(p, (slot, seq));
            let words = &buf[slot * PAGE_SIZE as usize + PAGE_HEADER..];
            let first = p * SUB_PER_PAGE;
            for b in first..(first + SUB_PER_PAGE).min(g.blocks) {
                let bits = LE::read_u32(&words[((b - first) * 4) as usize..]);
                match map.get(b) {
                    BlockState::Partial if bits & !g.sub_full(b) != 0 => {
                        return Ok(Err(FormatError::MapEntry {
                            block: b,
                            reason: "partial block's bitmap names sub-blocks past its end",
                        }));
                    }
                    BlockState::Partial => {
                        inner.entries.insert(b, Entry { bits, live: true });
                        if bits == g.sub_full(b) {
                            inner.filled.insert(b);
                        }
                    }
                    BlockState::Absent if bits != 0 && stale.last() != Some(&p) => stale.push(p),
                    _ => {}
                }
            }
        }
        Ok(Ok((
            SubMap {
                inner: Mutex::new(inner),
            },
            stale,
        )))
    }

    /// Rewrites `pages` from the entries in memory (absent blocks: 0) and syncs.
    pub fn clear_stale(
        &self,
        storage: &dyn Storage,
        g: &Geometry,
        pages: &[u64],
    ) -> std::io::Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let mut pending = SubPending::default();
        {
            let i = lock(&self.inner);
            for &p in pages {
                pending.pages.push((p, encode(&i, g, p)));
            }
        }
        self.write_back(storage, g, &mut pending)?;
        storage.sync()?;
        self.committed(&pending);
        Ok(())
    }

    /// The bitmap of block `b` (0 if it holds no sub-block).
    pub fn bits(&self, b: u64) -> u32 {
        lock(&self.inner).entries.get(&b).map_or(0, |e| e.bits)
    }

    /// Sets partial block `b`'s bitmap (a superset of the one it had). One that names
    /// every sub-block is remembered for the next full flush to make the block data
    /// ([`SubMap::take_filled`]).
    pub fn set(&self, g: &Geometry, b: u64, bits: u32) {
        let mut i = lock(&self.inner);
        i.entries.insert(b, Entry { bits, live: true });
        i.dirty.insert(b / SUB_PER_PAGE);
        if bits == g.sub_full(b) {
            i.filled.insert(b);
        }
    }

    /// The blocks [`SubMap::set`] was told hold every sub-block, in order, forgotten here:
    /// the caller checks each is still partial and full.
    pub fn take_filled(&self) -> Vec<u64> {
        let mut i = lock(&self.inner);
        std::mem::take(&mut i.filled).into_iter().collect()
    }

    /// Block `b` stopped being partial: `Some(all)` when it became data with every
    /// sub-block written (its stored bitmap becomes `all`), `None` when it was whited out
    /// (its stored bitmap stays).
    pub fn leave(&self, b: u64, all: Option<u32>) {
        let mut i = lock(&self.inner);
        let Some(e) = i.entries.get_mut(&b) else {
            return;
        };
        e.live = false;
        if let Some(all) = all {
            e.bits = all;
            i.dirty.insert(b / SUB_PER_PAGE);
        }
        i.left.insert(b);
    }

    /// The partial blocks, in order.
    pub fn live_blocks(&self) -> Vec<u64> {
        let i = lock(&self.inner);
        i.entries
            .iter()
            .filter(|(_, e)| e.live)
            .map(|(b, _)| *b)
            .collect()
    }

    /// Reserves both slots of the page holding block `b`'s bitmap once, so a flush never
    /// allocates.
    pub fn ensure_space(&self, storage: &dyn Storage, g: &Geometry, b: u64) -> std::io::Result<()> {
        let p = b / SUB_PER_PAGE;
        if lock(&self.inner).ready.contains(&p) {
            return Ok(());
        }
        storage.allocate(g.sub_page_offset(p, 0), 2 * PAGE_SIZE)?;
        lock(&self.inner).ready.insert(p);
        Ok(())
    }

    /// Takes the dirty pages, encoded, and the entries this flush retires. Runs just
    /// before the map's `take_dirty` (a block's map state changes before it leaves), and
    /// before the flush's data sync.
    pub fn take_dirty(&self, g: &Geometry) -> SubPending {
        let mut i = lock(&self.inner);
        let dirty = std::mem::take(&mut i.dirty);
        let pages = dirty.into_iter().map(|p| (p, encode(&i, g, p))).collect();
        let retired = i
            .left
            .iter()
            .filter_map(|b| i.entries.get(b).filter(|e| !e.live).map(|e| (*b, e.bits)))
            .collect();
        SubPending {
            pages,
            retired,
            written: Vec::new(),
        }
    }

    /// Writes pending pages into their inactive slots with the next sequence; they become
    /// current in [`SubMap::committed`], after the flush's sync.
    pub fn write_back(
        &self,
        storage: &dyn Storage,
        g: &Geometry,
        pending: &mut SubPending,
    ) -> std::io::Result<()> {
        let mut slot_buf = vec![0u8; PAGE_SIZE as usize];
        pending.written.clear();
        for (p, bitmaps) in &pending.pages {
            let (slot, seq) = match lock(&self.inner).metas.get(p) {
                Some(&(s, q)) => (1 - s, q + 1),
                None => (0, 1),
            };
            format::encode_sub_page(&mut slot_buf, *p, seq, bitmaps);
            storage.write_at(&slot_buf, g.sub_page_offset(*p, slot))?;
            pending.written.push((*p, slot, seq));
        }
        Ok(())
    }

    /// After a failed flush: its pages are written again by the next.
    pub fn redirty(&self, pending: &SubPending) {
        let mut i = lock(&self.inner);
        i.dirty.extend(pending.pages.iter().map(|(p, _)| *p));
    }

    /// After a successful flush: the written slots are current, and the entries it
    /// retired (unchanged since) are forgotten.
    pub fn committed(&self, pending: &SubPending) {
        let mut i = lock(&self.inner);
        for &(p, slot, seq) in &pending.written {
            i.metas.insert(p, (slot, seq));
        }
        for (b, bits) in &pending.retired {
            if i.entries.get(b).is_some_and(|e| !e.live && e.bits == *bits) {
                i.entries.remove(b);
                i.left.remove(b);
            }
        }
    }

    /// Memory the entries take, about.
    pub fn memory_bytes(&self) -> u64 {
        lock(&self.inner).entries.len() as u64 * 48
    }
}

/// Page `p`'s bitmaps from the entries in memory (0 for blocks without one).
fn encode(i: &Inner, g: &Geometry, p: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; (SUB_PER_PAGE * 4) as usize];
    let first = p * SUB_PER_PAGE;
    for (b, e) in i.entries.range(first..(first + SUB_PER_PAGE).min(g.blocks)) {
        LE::write_u32(&mut bytes[((b - first) * 4) as usize..], e.bits);
    }
    bytes
}

/// The slot holding page `p`'s current version (both slots in `buf`), with its
/// sequence; `None` if neither was written; an error if both are damaged.
fn current_slot(buf: &[u8], p: u64) -> Result<Option<(usize, u64)>, FormatError> {
    let ps = PAGE_SIZE as usize;
    let slots = [
        format::decode_sub_page(&buf[..ps], p),
        format::decode_sub_page(&buf[ps..], p),
    ];
    if let [PageSlot::Invalid(_), PageSlot::Invalid(_)] = slots {
        return Err(FormatError::MapEntry {
            block: p * SUB_PER_PAGE,
            reason: "partial-block bitmap page: both slots damaged",
        });
    }
    let mut best: Option<(usize, u64)> = None;
    for (s, slot) in slots.iter().enumerate() {
        if let PageSlot::Valid { sequence } = slot {
            if best.is_none_or(|(_, q)| *sequence > q) {
                best = Some((s, *sequence));
            }
        }
    }
    Ok(best)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
