//! Partial blocks ([`CopyUp::Partial`]): a first write smaller than a block held below
//! writes only the sub-blocks it touches, and the rest of the block keeps reading from
//! below until the top is sealed ([`Disk::fill_partial_blocks`]). A first 4 KiB write
//! then costs the file system 4 KiB, not a block, and reads nothing.

use super::scratch::BLOCK_SCRATCH;
use super::{lock, CopyUp, Disk};
use crate::error::IoError;
use crate::format::BlockState;
use crate::resolve::LowerOwner;

/// Bits `s..t` of a sub-block bitmap.
pub(super) fn span(s: usize, t: usize) -> u32 {
    let hi = if t >= 32 { u32::MAX } else { (1u32 << t) - 1 };
    hi & !((1u32 << s) - 1)
}

impl Disk {
    /// True if writing `len` bytes at `within` into block `b`, absent from the top, should
    /// make it partial rather than copy it up.
    pub(super) fn goes_partial(&self, b: u64, within: usize, len: usize) -> bool {
        self.copy_up_mode() == CopyUp::Partial
            // A 1.0 layer has no bitmap area: it copies blocks up.
            && self.geometry.sub_pages > 0
            && self.geometry.sub_size() < self.geometry.block_len(b)
            && !(within == 0 && len == self.geometry.block_len(b))
            && matches!(self.lower.resolved.get(b), LowerOwner::Data(_))
    }

    /// Writes `chunk` at `within` into block `b`, absent (held below) or partial: the
    /// sub-blocks it touches, completed from the top or from below where it covers them
    /// in part. The caller holds the block's stripe lock.
    pub(super) fn write_sub(&self, b: u64, within: usize, chunk: &[u8]) -> Result<(), IoError> {
        let g = &self.geometry;
        let sub = g.sub_size();
        let (a, t0) = (within / sub * sub, within + chunk.len());
        let e = (t0.div_ceil(sub) * sub).min(g.block_len(b));
        let have = self.top.sub.bits(b);
        let mask = span(a / sub, (e - 1) / sub + 1);
        let at = g.block_offset(b) + a as u64;
        let path = &self.top.path;
        let res = if a == within && e == t0 {
            self.top
                .storage
                .write_at(chunk, at)
                .map_err(|e| Self::io_err(path, "write", at, e))
        } else {
            BLOCK_SCRATCH.with(e - a, |buf| {
                self.sub_edge(b, have, a, &mut buf[..within - a])?;
                self.sub_edge(b, have, t0, &mut buf[t0 - a..])?;
                buf[within - a..t0 - a].copy_from_slice(chunk);
                self.top
                    .storage
                    .write_at(buf, at)
                    .map_err(|e| Self::io_err(path, "write", at, e))
            })
        };
        if res.is_err() {
            // Give back what the failed write allocated, never a sub-block already held.
            for s in 0..32 {
                if (mask & !have) >> s & 1 == 1 {
                    let o = g.block_offset(b) + (s * sub) as u64;
                    let _ = self.top.storage.punch_hole(o, sub as u64);
                }
            }
            return res;
        }
        let bits = have | mask;
        if bits != have || self.top.map.get(b) != BlockState::Partial {
            // A block this fills stays partial until the next full flush makes it data
            // (`promote_filled`): a map change would make every flush until then a full
            // one, where the flush journal could have taken them.
            self.top.sub.set(g, b, bits);
            self.top.map.set(b, BlockState::Partial);
        }
        Ok(())
    }

    /// Makes data blocks of the partial blocks that hold every sub-block. A full flush
    /// calls it before it takes the dirty bitmaps and map pages.
    pub(super) fn promote_filled(&self) {
        for b in self.top.sub.take_filled() {
            let _s = lock(self.stripe(b));
            let full = self.geometry.sub_full(b);
            if self.top.map.get(b) == BlockState::Partial && self.top.sub.bits(b) == full {
                // The map first: a bitmap entry is forgotten only after a flush that took
                // the block's new state (crate::sub).
                self.top.map.set(b, BlockState::Data);
                self.top.sub.leave(b, Some(full));
            }
        }
    }

    /// Fills `buf` with block `b`'s bytes from `from` on, inside one sub-block: the top's
    /// if it holds that sub-block (`have`), else what lies below.
    fn sub_edge(&self, b: u64, have: u32, from: usize, buf: &mut [u8]) -> Result<(), IoError> {
        if buf.is_empty() {
            return Ok(());
        }
        if have >> (from / self.geometry.sub_size()) & 1 == 1 {
            let o = self.geometry.block_offset(b) + from as u64;
            return self
                .top
                .storage
                .read_at(buf, o)
                .map_err(|e| Self::io_err(&self.top.path, "read", o, e));
        }
        self.read_below(b, from, buf)
    }

    /// Reads block `b`'s bytes from `from` as the layers below the top hold them,
    /// verified as a read would be.
    fn read_below(&self, b: u64, from: usize, buf: &mut [u8]) -> Result<(), IoError> {
        match self.lower.resolved.get(b) {
            LowerOwner::Data(i) => {
                let bs = u64::from(self.geometry.block_size);
                self.verify_run(i as u32 + 1, b * bs, 1)?;
                let layer = &self.lower.layers[i];
                let o = layer.header.geometry.block_offset(b) + from as u64;
                layer
                    .storage
                    .read_at(buf, o)
                    .map_err(|e| Self::io_err(&layer.path, "read", o, e))
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes the sub-blocks of partial block `b` that `have` does not name, from below.
    fn fill_from_below(&self, b: u64, have: u32) -> Result<(), IoError> {
        let g = &self.geometry;
        let sub = g.sub_size();
        let blen = g.block_len(b);
        BLOCK_SCRATCH.with(blen, |buf| {
            self.read_below(b, 0, buf)?;
            let mut s = 0;
            while s * sub < blen {
                if have >> s & 1 == 1 {
                    s += 1;
                    continue;
                }
                let mut t = s + 1;
                while t * sub < blen && have >> t & 1 == 0 {
                    t += 1;
                }
                let (x, y) = (s * sub, (t * sub).min(blen));
                let o = g.block_offset(b) + x as u64;
                self.top
                    .storage
                    .write_at(&buf[x..y], o)
                    .map_err(|e| Self::io_err(&self.top.path, "fill partial block", o, e))?;
                s = t;
            }
            Ok(())
        })
    }

    /// Completes every partial block from below, making it a data block: sealing needs
    /// whole blocks (their CRCs, and a layer below a child is read whole). The caller
    /// flushes after. Returns how many blocks it filled.
    pub fn fill_partial_blocks(&self) -> Result<u64, IoError> {
        self.check_writable()?;
        let g = &self.geometry;
        let mut filled = 0;
        for b in self.top.sub.live_blocks() {
            let _s = lock(self.stripe(b));
            if self.top.map.get(b) != BlockState::Partial {
                continue;
            }
            let have = self.top.sub.bits(b);
            // A filled block has nothing to read from below.
            if have != g.sub_full(b) {
                self.fill_from_below(b, have)?;
            }
            self.top.map.set(b, BlockState::Data);
            self.top.sub.leave(b, Some(g.sub_full(b)));
            // A change like a write: the next flush must not find nothing to do.
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            filled += 1;
        }
        Ok(filled)
    }
}

#[cfg(test)]
mod tests {
    use super::span;

    #[test]
    fn spans() {
        assert_eq!(span(0, 1), 1);
        assert_eq!(span(1, 3), 0b110);
        assert_eq!(span(0, 32), u32::MAX);
        assert_eq!(span(31, 32), 1 << 31);
    }
}
