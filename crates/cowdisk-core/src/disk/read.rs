//! The read path: resolved runs read from their owning layer, sealed blocks verified
//! once; and the plan of a zero-copy read.

use super::scratch::{PIECE_SCRATCH, VERIFY_PIECE};
use super::{Disk, ReadPiece};
use crate::error::IoError;
use crate::resolve::MappingKind;
use crate::storage_direct::DIRECT_ALIGN;

impl Disk {
    /// Reads `buf.len()` bytes at `offset`. Never copies or writes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.resolve(offset, buf.len() as u64, |m| {
            let s = (m.offset - offset) as usize;
            let out = &mut buf[s..s + m.len as usize];
            match m.kind {
                MappingKind::Data { depth } => {
                    self.verify_run(depth, m.offset, m.len)?;
                    let (st, path, data_offset) = self.storage_at(depth);
                    let off = data_offset + m.offset;
                    st.read_at(out, off)
                        .map_err(|e| Self::io_err(path, "read", off, e))
                }
                _ => {
                    out.fill(0);
                    Ok(())
                }
            }
        })
    }

    /// Plans a read of `[offset, offset + len)` as pieces of layer files and zeros, for
    /// callers that send the bytes without copying them through memory (`sendfile`), or,
    /// from files opened for direct I/O, read them straight into their own buffers. Checks
    /// the range and verifies sealed blocks exactly as [`Disk::read`] does, so a piece is
    /// only ever good data. Returns `false` if a layer has no file
    /// descriptor (simulated storage) or a direct file's part is not aligned: discard the
    /// pieces `f` got and use `read` then.
    ///
    /// The pieces stay valid while the disk lives: lower layers never change, and a top
    /// block keeps its file offset. Like `read`, a concurrent write or discard of the same
    /// range may be seen in part.
    pub fn read_pieces<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(ReadPiece<'a>),
    ) -> Result<bool, IoError> {
        let mut complete = true;
        self.resolve(offset, len, |m| {
            let piece = match m.kind {
                MappingKind::Data { depth } => {
                    self.verify_run(depth, m.offset, m.len)?;
                    let (st, _, data_offset) = self.storage_at(depth);
                    let at = data_offset + m.offset;
                    if let Some(fd) = st.fd().filter(|_| st.moves_data_by_fd()) {
                        ReadPiece::File {
                            fd,
                            offset: at,
                            len: m.len,
                        }
                    } else if let Some(fd) = st.direct_fd() {
                        if !at.is_multiple_of(DIRECT_ALIGN) || !m.len.is_multiple_of(DIRECT_ALIGN) {
                            // Direct I/O cannot read it in place: `read` goes through a
                            // bounce buffer.
                            complete = false;
                            return Ok(());
                        }
                        ReadPiece::Direct {
                            fd,
                            offset: at,
                            len: m.len,
                        }
                    } else {
                        let mut runs = Vec::new();
                        let Some((fd, token)) = st.staged(at, m.len, &mut runs) else {
                            complete = false;
                            return Ok(());
                        };
                        for (offset, len) in runs {
                            f(ReadPiece::Staged {
                                fd,
                                offset,
                                len,
                                depth,
                                token,
                            });
                        }
                        return Ok(());
                    }
                }
                _ => ReadPiece::Zeros(m.len),
            };
            f(piece);
            Ok::<(), IoError>(())
        })?;
        Ok(complete)
    }

    /// Whether the bytes of [`ReadPiece::Staged`] pieces of layer `depth` with `token`
    /// were good when read: ask after reading them, before using them.
    pub fn staged_valid(&self, depth: u32, token: u64) -> bool {
        depth as usize <= self.lower.layers.len() && self.storage_at(depth).0.staged_valid(token)
    }

    /// Checks every not-yet-verified block in a run of the sealed layer at `depth` (0: the
    /// top, if sealed) against its CRC; a writable top has nothing to check. Reads go through
    /// a small buffer in pieces: a zero-copy read needs the bytes only for their CRC, so it
    /// should not cost a block-sized buffer per thread.
    pub(super) fn verify_run(&self, depth: u32, offset: u64, len: u64) -> Result<(), IoError> {
        let layer = match depth {
            0 => match &self.sealed_top {
                Some(l) => l,
                None => return Ok(()),
            },
            d => &self.lower.layers[d as usize - 1],
        };
        let g = &layer.header.geometry;
        let bs = u64::from(g.block_size);
        for b in offset / bs..(offset + len).div_ceil(bs) {
            if layer.is_verified(b) {
                continue;
            }
            let n = g.block_len(b);
            let off = g.block_offset(b);
            let piece = n.min(VERIFY_PIECE);
            let crc = PIECE_SCRATCH.with(piece, |s| {
                let mut h = crc32fast::Hasher::new();
                let mut done = 0;
                while done < n {
                    let k = piece.min(n - done);
                    let o = off + done as u64;
                    layer
                        .storage
                        .read_at(&mut s[..k], o)
                        .map_err(|e| Self::io_err(&layer.path, "read", o, e))?;
                    h.update(&s[..k]);
                    done += k;
                }
                Ok::<u32, IoError>(h.finalize())
            })?;
            layer.verify_crc(b, crc)?;
        }
        Ok(())
    }
}
