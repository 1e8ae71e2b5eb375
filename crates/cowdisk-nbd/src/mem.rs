//! A sparse in-memory [`Backend`] for tests, examples and benchmarks of the protocol layer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{Backend, BackendError, BackendErrorKind, Extent, ZeroFlags};

enum Block {
    Data(Box<[u8]>),
    /// Allocated but known to be zero (`WRITE_ZEROES` with `NO_HOLE`).
    Zero,
}

/// Sparse RAM disk: absent blocks read as zeros and report `HOLE|ZERO`, depth 0.
///
/// Writes of whole blocks allocate; `TRIM` and `WRITE_ZEROES` of whole blocks deallocate
/// (`NO_HOLE` keeps them allocated as zero). Everything is "durable" at once; `flush` only counts.
pub struct MemBackend {
    size: u64,
    block_size: u32,
    read_only: bool,
    blocks: RwLock<HashMap<u64, Block>>,
    flushes: AtomicU64,
    fail_next: Mutex<Option<BackendErrorKind>>,
}

/// One block's share of a byte range.
struct Piece {
    index: u64,
    /// Offset inside the block.
    start: usize,
    len: usize,
    /// Offset inside the caller's range.
    pos: usize,
    /// Covers the whole block (or its whole in-disk part at the end of the disk).
    whole: bool,
}

impl MemBackend {
    /// An empty writable disk of `size` bytes with 4 KiB blocks.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            block_size: 4096,
            read_only: false,
            blocks: RwLock::new(HashMap::new()),
            flushes: AtomicU64::new(0),
            fail_next: Mutex::new(None),
        }
    }

    /// Sets the allocation granularity (rounded to a power of two in 512 B..=1 MiB).
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size.clamp(512, 1 << 20).next_power_of_two();
        self
    }

    /// Makes the disk read-only (contents can still be seeded with [`MemBackend::fill`]).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Writes `data` at `offset` regardless of read-only mode (test setup).
    pub fn fill(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.check(offset, data.len() as u64)?;
        self.write_inner(offset, data);
        Ok(())
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Number of allocated blocks (data or allocated zero).
    pub fn allocated_blocks(&self) -> usize {
        self.read_map().len()
    }

    /// Makes the next backend call fail with `kind` (fault injection for error-path tests).
    pub fn fail_next(&self, kind: BackendErrorKind) {
        *self.fail_next.lock().unwrap_or_else(|e| e.into_inner()) = Some(kind);
    }

    fn injected(&self) -> Result<(), BackendError> {
        match self
            .fail_next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(kind) => Err(BackendError::new(kind, "injected failure")),
            None => Ok(()),
        }
    }

    fn read_map(&self) -> RwLockReadGuard<'_, HashMap<u64, Block>> {
        self.blocks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, HashMap<u64, Block>> {
        self.blocks.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::new(
                BackendErrorKind::Invalid,
                "range beyond end of disk",
            )),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.injected()?;
        if self.read_only {
            return Err(BackendError::new(BackendErrorKind::ReadOnly, "read-only"));
        }
        self.check(offset, len)
    }

    /// Splits an in-range byte range into per-block pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let mut cur = offset;
        std::iter::from_fn(move || {
            if cur >= end {
                return None;
            }
            let index = cur / bs;
            let block_start = index * bs;
            let block_end = (block_start + bs).min(self.size);
            let piece_end = block_end.min(end);
            let p = Piece {
                index,
                start: (cur - block_start) as usize,
                len: (piece_end - cur) as usize,
                pos: (cur - offset) as usize,
                whole: cur == block_start && piece_end == block_end,
            };
            cur = piece_end;
            Some(p)
        })
    }

    fn write_inner(&self, offset: u64, data: &[u8]) {
        let mut map = self.write_map();
        let bs = self.block_size as usize;
        for p in self.pieces(offset, data.len() as u64) {
            let src = &data[p.pos..p.pos + p.len];
            let block = map
                .entry(p.index)
                .or_insert_with(|| Block::Data(vec![0u8; bs].into_boxed_slice()));
            if let Block::Zero = block {
                *block = Block::Data(vec![0u8; bs].into_boxed_slice());
            }
            if let Block::Data(d) = block {
                d[p.start..p.start + p.len].copy_from_slice(src);
            }
        }
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn preferred_block_size(&self) -> u32 {
        self.block_size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.injected()?;
        self.check(offset, buf.len() as u64)?;
        let map = self.read_map();
        for p in self.pieces(offset, buf.len() as u64) {
            let dst = &mut buf[p.pos..p.pos + p.len];
            match map.get(&p.index) {
                Some(Block::Data(d)) => dst.copy_from_slice(&d[p.start..p.start + p.len]),
                _ => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        self.check_write(offset, data.len() as u64)?;
        self.write_inner(offset, data);
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.injected()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        let mut map = self.write_map();
        // Partial blocks are left alone: TRIM is only a hint.
        for p in self.pieces(offset, len).filter(|p| p.whole) {
            map.remove(&p.index);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        let mut map = self.write_map();
        if flags.fast {
            // Fast only when no data bytes have to be overwritten in place.
            let slow = self
                .pieces(offset, len)
                .any(|p| !p.whole && matches!(map.get(&p.index), Some(Block::Data(_))));
            if slow {
                return Err(BackendError::new(
                    BackendErrorKind::NotSupported,
                    "partial-block zeroing is not fast",
                ));
            }
        }
        for p in self.pieces(offset, len) {
            if p.whole {
                if flags.no_hole {
                    map.insert(p.index, Block::Zero);
                } else {
                    map.remove(&p.index);
                }
            } else if let Some(Block::Data(d)) = map.get_mut(&p.index) {
                d[p.start..p.start + p.len].fill(0);
            }
        }
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BackendError> {
        self.injected()?;
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Err(BackendError::new(BackendErrorKind::Invalid, "empty range"));
        }
        let map = self.read_map();
        let first = out.len();
        for p in self.pieces(offset, len) {
            let (zero, hole, depth) = match map.get(&p.index) {
                None => (true, true, 0),
                Some(Block::Zero) => (true, false, 1),
                Some(Block::Data(_)) => (false, false, 1),
            };
            let length = p.len as u64;
            match out[first..].last_mut() {
                Some(e) if (e.zero, e.hole, e.depth) == (zero, hole, depth) => e.length += length,
                _ => out.push(Extent {
                    length,
                    zero,
                    hole,
                    depth,
                }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(m: &MemBackend, off: u64, len: u64) -> Vec<(u64, bool, bool, u32)> {
        let mut v = Vec::new();
        m.block_status(off, len, &mut v).unwrap();
        v.iter()
            .map(|e| (e.length, e.zero, e.hole, e.depth))
            .collect()
    }

    #[test]
    fn sparse_layout() {
        let m = MemBackend::new(10 * 4096 + 100);
        assert_eq!(status(&m, 0, u64::MAX), vec![(40_960 + 100, true, true, 0)]);
        m.write(4096 + 10, &[7u8; 10], false).unwrap();
        m.write_zeroes(
            3 * 4096,
            4096,
            ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            },
        )
        .unwrap();
        assert_eq!(
            status(&m, 100, 5 * 4096),
            vec![
                (4096 - 100, true, true, 0),
                (4096, false, false, 1),
                (4096, true, true, 0),
                (4096, true, false, 1),
                (4096 + 100, true, true, 0),
            ]
        );
        let mut buf = [1u8; 30];
        m.read(4096, &mut buf).unwrap();
        assert_eq!(&buf[..10], &[0; 10]);
        assert_eq!(&buf[10..20], &[7; 10]);
        // Partial fast zero over data is refused without change; a whole-block one is fine.
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        let e = m.write_zeroes(4096 + 12, 2, fast).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::NotSupported);
        m.write_zeroes(4096, 4096, fast).unwrap();
        assert_eq!(m.allocated_blocks(), 1);
        // The partial block at the end of the disk counts as whole.
        m.write(40_960, &[1u8; 100], false).unwrap();
        m.trim(40_960, 100, false).unwrap();
        assert_eq!(m.allocated_blocks(), 1);
    }
}
