//! Judging a damaged map slot: is it provably the *older* copy of its page (harmless:
//! the slot in use holds the last flush), or may it hold a *newer* flush than the slot
//! in use (writes flushed into it may be lost)?
//!
//! The format alternates slots, so the older copy of a page whose current slot has
//! sequence `q` always has sequence `q - 1`. A torn flush and damage after a completed
//! flush look the same on disk, so anything that does not show `q - 1` is treated as
//! possibly newer (FORMAT.md, "Damaged slots").

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::format::{BlockState, ENTRIES_PER_PAGE, PAGE_HEADER, PAGE_MAGIC};

/// Most example blocks a [`SlotEntries`] keeps; the rest are only counted.
pub const MAX_EXAMPLES: usize = 16;

/// What a damaged slot's entries record beyond the slot in use (read despite the bad
/// CRC, so one of them may itself be the damaged bit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotEntries {
    /// Blocks the damaged slot marks as data that the slot in use does not.
    pub data: u64,
    /// Blocks the damaged slot marks as whiteouts that the slot in use does not.
    pub zero: u64,
    /// The first `MAX_EXAMPLES` of them, in block order.
    pub examples: Vec<(u64, BlockState)>,
}

/// The facts `check` reports about a damaged slot of page `page`.
pub(crate) struct Damaged<'a> {
    pub page: u64,
    /// The damaged slot's 4096 bytes.
    pub raw: &'a [u8],
    /// The slot in use: its sequence and its entries (`None`: the page reads all absent).
    pub current: Option<(u64, &'a [u8])>,
    /// Blocks in the layer (entries at or past it are ignored).
    pub blocks: u64,
}

impl Damaged<'_> {
    /// True if the slot's magic and page index are intact, so its sequence and entries
    /// are worth reading.
    pub fn header_intact(&self) -> bool {
        self.raw[0..4] == PAGE_MAGIC && u64::from(LE::read_u32(&self.raw[4..8])) == self.page
    }

    /// The sequence the slot claims, if its header is intact.
    pub fn claimed_sequence(&self) -> Option<u64> {
        self.header_intact().then(|| LE::read_u64(&self.raw[8..16]))
    }

    /// False only when the slot is provably the older copy: it claims exactly the
    /// predecessor of the sequence in use.
    pub fn maybe_newer(&self) -> bool {
        let older = match (self.current, LE::read_u64(&self.raw[8..16])) {
            (Some((q, _)), claimed) => q >= 2 && claimed == q - 1,
            (None, _) => false,
        };
        !older
    }

    /// Data and whiteout entries of the damaged slot that the slot in use lacks, when
    /// its header is intact.
    pub fn entries_beyond_current(&self) -> Option<SlotEntries> {
        if !self.header_intact() {
            return None;
        }
        let mut out = SlotEntries::default();
        let damaged = &self.raw[PAGE_HEADER..];
        for (w, chunk) in damaged.chunks_exact(8).enumerate() {
            let dw = LE::read_u64(chunk);
            let cw = self
                .current
                .map_or(0, |(_, e)| LE::read_u64(&e[w * 8..w * 8 + 8]));
            if dw == cw {
                continue;
            }
            for j in 0..32u64 {
                let (dv, cv) = ((dw >> (2 * j)) & 3, (cw >> (2 * j)) & 3);
                let block = self.page * ENTRIES_PER_PAGE + w as u64 * 32 + j;
                let state = match dv {
                    1 => BlockState::Data,
                    2 => BlockState::Zero,
                    _ => continue,
                };
                if dv == cv || block >= self.blocks {
                    continue;
                }
                match state {
                    BlockState::Data => out.data += 1,
                    _ => out.zero += 1,
                }
                if out.examples.len() < MAX_EXAMPLES {
                    out.examples.push((block, state));
                }
            }
        }
        Some(out)
    }
}
