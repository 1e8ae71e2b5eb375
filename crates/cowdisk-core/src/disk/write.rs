//! The write path: in-place writes to top blocks, copy-up of partially written blocks
//! held below, whiteouts and zeroing.

use std::sync::atomic::Ordering::SeqCst;

use super::{lock, Disk, WriteFlags, ZeroFlags};
use crate::error::IoError;
use crate::format::journal::RecordKind;
use crate::format::BlockState;
use crate::resolve::LowerOwner;

impl Disk {
    /// Writes `data` at `offset`, copying up partially written blocks from below.
    pub fn write(&self, offset: u64, data: &[u8], flags: WriteFlags) -> Result<(), IoError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let res = self.write_blocks(offset, data);
        // Counted even when it failed part way: what it did write is the next flush's.
        self.changes.fetch_add(1, SeqCst);
        res?;
        if flags.fua {
            self.client_flush()?;
        }
        Ok(())
    }

    fn write_blocks(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let bs = u64::from(self.geometry.block_size);
        let mut pos = 0usize;
        while pos < data.len() {
            let voff = offset + pos as u64;
            let b = voff / bs;
            let within = (voff % bs) as usize;
            let n = (self.geometry.block_len(b) - within).min(data.len() - pos);
            self.write_block(b, within, &data[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    fn write_block(&self, b: u64, within: usize, chunk: &[u8]) -> Result<(), IoError> {
        let _g = lock(self.stripe(b));
        let top = &*self.top.storage;
        let path = &self.top.path;
        let off = self.geometry.block_offset(b);
        let state = self.top.map.get(b);
        if state == BlockState::Data {
            let o = off + within as u64;
            top.write_at(chunk, o)
                .map_err(|e| Self::io_err(path, "write", o, e))?;
            self.journal_note(b, RecordKind::Data, within, within + chunk.len());
            return Ok(());
        }
        // The map page that will expose this block gets its space first, so the flush
        // that commits it never allocates (a full file system fails this write instead).
        self.ensure_map_space(b)?;
        if state == BlockState::Partial
            || (state == BlockState::Absent && self.goes_partial(b, within, chunk.len()))
        {
            self.top
                .sub
                .ensure_space(top, &self.geometry, b)
                .map_err(|e| Self::io_err(path, "allocate partial-block bitmap", off, e))?;
            self.write_sub(b, within, chunk)?;
            if state == BlockState::Partial && self.top.map.get(b) == BlockState::Partial {
                self.journal_note(b, RecordKind::Partial, within, within + chunk.len());
            }
            return Ok(());
        }
        let res = self.fill_new_block(b, state, within, chunk);
        if res.is_err() {
            // Give back what a failed write allocated: a full disk costs only the writes
            // that succeed. Best effort; `check` reports anything left.
            let _ = top.punch_hole(off, u64::from(self.geometry.block_size));
            return res;
        }
        self.top.map.set(b, BlockState::Data);
        Ok(())
    }

    /// Writes `chunk` into block `b`, which the top does not hold yet (`state`): whole,
    /// copied up from below, or over zeros.
    fn fill_new_block(
        &self,
        b: u64,
        state: BlockState,
        within: usize,
        chunk: &[u8],
    ) -> Result<(), IoError> {
        let top = &*self.top.storage;
        let path = &self.top.path;
        let off = self.geometry.block_offset(b);
        if within == 0 && chunk.len() == self.geometry.block_len(b) {
            // Covers the whole block: nothing below matters.
            top.write_at(chunk, off)
                .map_err(|e| Self::io_err(path, "write", off, e))?;
        } else {
            let lower = if state == BlockState::Absent {
                self.lower.resolved.get(b)
            } else {
                LowerOwner::Nothing
            };
            match lower {
                LowerOwner::Data(i) => self.copy_up(b, i, within, chunk)?,
                _ => {
                    // Starts from zeros. A crash may have left unreferenced bytes here,
                    // so clear the block before writing only our part.
                    top.punch_hole(off, u64::from(self.geometry.block_size))
                        .map_err(|e| Self::io_err(path, "punch hole", off, e))?;
                    let o = off + within as u64;
                    top.write_at(chunk, o)
                        .map_err(|e| Self::io_err(path, "write", o, e))?;
                }
            }
        }
        Ok(())
    }

    /// Allocates both slots of the map page holding block `b` if they may not be yet.
    pub(super) fn ensure_map_space(&self, b: u64) -> Result<(), IoError> {
        let page = b / crate::format::ENTRIES_PER_PAGE;
        if self.top.map.page_space_ready(page) {
            return Ok(());
        }
        let off = self.geometry.page_offset(page, 0);
        let len = 2 * crate::format::PAGE_SIZE;
        self.top
            .storage
            .allocate(off, len)
            .map_err(|e| Self::io_err(&self.top.path, "allocate map page", off, e))?;
        self.top.map.set_page_space_ready(page);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole blocks become whiteouts
    /// (or zero-filled data with `no_hole`); partial blocks get zeros written.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let bs = u64::from(self.geometry.block_size);
        let end = offset + len;
        if flags.fast
            && (flags.no_hole
                || !offset.is_multiple_of(bs)
                || (!end.is_multiple_of(bs) && end != self.size()))
        {
            return Err(IoError::NotFast);
        }
        let res = self.zero_blocks(offset, end, flags.no_hole);
        self.changes.fetch_add(1, SeqCst);
        res?;
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Discard (TRIM): like `write_zeroes` without `no_hole`. Reads return zeros after.
    pub fn discard(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<(), IoError> {
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                fua: flags.fua,
                no_hole: false,
                fast: false,
            },
        )
    }

    fn zero_blocks(&self, offset: u64, end: u64, no_hole: bool) -> Result<(), IoError> {
        let bs = u64::from(self.geometry.block_size);
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let within = (pos % bs) as usize;
            let blen = self.geometry.block_len(b);
            let n = ((blen - within) as u64).min(end - pos) as usize;
            if n == blen && !no_hole {
                self.whiteout_block(b)?;
            } else {
                self.zero_part(b, within, n)?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    fn whiteout_block(&self, b: u64) -> Result<(), IoError> {
        let _g = lock(self.stripe(b));
        match self.top.map.get(b) {
            BlockState::Zero => Ok(()),
            BlockState::Data | BlockState::Partial => {
                let off = self.geometry.block_offset(b);
                self.top
                    .storage
                    .punch_hole(off, u64::from(self.geometry.block_size))
                    .map_err(|e| Self::io_err(&self.top.path, "punch hole", off, e))?;
                self.top.map.set(b, BlockState::Zero);
                self.top.sub.leave(b, None);
                Ok(())
            }
            BlockState::Absent => {
                // Only lower data needs hiding; anything else already reads zeros.
                if matches!(self.lower.resolved.get(b), LowerOwner::Data(_)) {
                    self.ensure_map_space(b)?;
                    self.top.map.set(b, BlockState::Zero);
                }
                Ok(())
            }
        }
    }

    fn zero_part(&self, b: u64, within: usize, n: usize) -> Result<(), IoError> {
        let reads_zero = match self.top.map.get(b) {
            BlockState::Zero => true,
            BlockState::Data | BlockState::Partial => false,
            BlockState::Absent => !matches!(self.lower.resolved.get(b), LowerOwner::Data(_)),
        };
        if reads_zero && n < self.geometry.block_len(b) {
            return Ok(());
        }
        self.write_block(b, within, &crate::storage::ZERO_BLOCK[..n])
    }
}
