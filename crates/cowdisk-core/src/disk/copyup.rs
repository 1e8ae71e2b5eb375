//! Copy-up: the first partial write to a block held below brings the whole block into the
//! top. Where both layers are files the kernel can copy (`copy_file_range`); on XFS with
//! reflink and on btrfs that shares the block's extents ([`CopyUp::Share`]), so a copy-up
//! costs metadata and the written part is the only new space. Else, through one buffered
//! read and write.

use std::sync::atomic::Ordering::SeqCst;

use super::scratch::BLOCK_SCRATCH;
use super::{lock, CopyUp, Disk};
use crate::error::IoError;
use crate::storage::Copied;

/// The unit the kernel can share extents in: 4 KiB file-system blocks.
const FS_BLOCK: usize = 4096;

impl Disk {
    /// Copies block `b` from lower layer `i` into the top, with `chunk` applied at
    /// `within`. If the lower read fails nothing is written or allocated
    /// (docs/reliability.md, rule 3).
    ///
    /// A block not yet verified must be read for its CRC anyway; where the kernel would
    /// only copy it again (no reflink), one buffered read and write is cheaper (measured:
    /// 1.75x slower for cold 4 KiB copy-ups through `copy_file_range` on ext4 and tmpfs).
    pub(super) fn copy_up(
        &self,
        b: u64,
        i: usize,
        within: usize,
        chunk: &[u8],
    ) -> Result<(), IoError> {
        let worth = match self.copy_up_mode() {
            CopyUp::Buffer => false,
            // There the kernel's copy is a share.
            mode if self.reflink_likely => mode == CopyUp::Share,
            _ => self.lower.layers[i].is_verified(b),
        };
        if !(worth
            && self.kernel_copy.load(SeqCst)
            && self.copy_up_in_kernel(b, i, within, chunk)?)
        {
            self.copy_up_buffered(b, i, within, chunk)?;
        }
        self.copy_ups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Verifies block `b` of lower layer `i` (once), then has the kernel copy the parts of
    /// the block around the written file-system blocks, and writes those through a small
    /// buffer. Writing into a shared extent would make the file system copy it again (XFS
    /// also reserves a copy-on-write area beyond it); writing fresh blocks does not.
    /// `false` if the kernel did not copy (then the buffered path does it all).
    fn copy_up_in_kernel(
        &self,
        b: u64,
        i: usize,
        within: usize,
        chunk: &[u8],
    ) -> Result<bool, IoError> {
        let layer = &self.lower.layers[i];
        // Bad lower data must not become "real" top data: checked before it is copied.
        let bs = u64::from(self.geometry.block_size);
        self.verify_run(i as u32 + 1, b * bs, 1)?;
        let blen = self.geometry.block_len(b);
        let head = within / FS_BLOCK * FS_BLOCK;
        let tail = (within + chunk.len())
            .div_ceil(FS_BLOCK)
            .saturating_mul(FS_BLOCK)
            .min(blen);
        let (from, to) = (
            layer.header.geometry.block_offset(b),
            self.geometry.block_offset(b),
        );
        let _c = lock(&self.copy_lock);
        for (start, end) in [(0, head), (tail, blen)] {
            let n = (end - start) as u64;
            let at = to + start as u64;
            let copied = self
                .top
                .storage
                .copy_range_from(&*layer.storage, from + start as u64, at, n)
                .map_err(|e| Self::io_err(&self.top.path, "copy-up", at, e))?;
            match copied {
                Copied::Done => {}
                Copied::Refused => {
                    // Between two files the file system will not: never ask again. A
                    // layer that is no file (remote) refuses without a system call.
                    if layer.storage.fd().is_some() {
                        self.kernel_copy.store(false, SeqCst);
                    }
                    return Ok(false);
                }
                Copied::Partly => return Ok(false),
            }
        }
        // The written file-system blocks: the lower bytes around `chunk`, then `chunk`.
        BLOCK_SCRATCH.with(tail - head, |buf| {
            let lower_off = from + head as u64;
            layer
                .storage
                .read_at(buf, lower_off)
                .map_err(|e| Self::io_err(&layer.path, "read for copy-up", lower_off, e))?;
            buf[within - head..within - head + chunk.len()].copy_from_slice(chunk);
            let o = to + head as u64;
            self.top
                .storage
                .write_at(buf, o)
                .map_err(|e| Self::io_err(&self.top.path, "copy-up write", o, e))
        })?;
        Ok(true)
    }

    /// Copy-up through a block buffer: read, verify, apply `chunk`, write once.
    fn copy_up_buffered(
        &self,
        b: u64,
        i: usize,
        within: usize,
        chunk: &[u8],
    ) -> Result<(), IoError> {
        let blen = self.geometry.block_len(b);
        let off = self.geometry.block_offset(b);
        let layer = &self.lower.layers[i];
        let lower_off = layer.header.geometry.block_offset(b);
        BLOCK_SCRATCH.with(blen, |buf| {
            // A smaller parent's last block is short in its virtual size but whole in its
            // file (zeros past the end), so reading a full block there is in bounds.
            layer
                .storage
                .read_at(buf, lower_off)
                .map_err(|e| Self::io_err(&layer.path, "read for copy-up", lower_off, e))?;
            if !layer.is_verified(b) {
                // Bad lower data must not become "real" top data.
                // Its own length: within `blen`, as a parent is never larger than its child.
                layer.verify(b, &buf[..layer.header.geometry.block_len(b).min(blen)])?;
            }
            buf[within..within + chunk.len()].copy_from_slice(chunk);
            let _c = lock(&self.copy_lock);
            self.top
                .storage
                .write_at(buf, off)
                .map_err(|e| Self::io_err(&self.top.path, "copy-up write", off, e))
        })
    }
}
