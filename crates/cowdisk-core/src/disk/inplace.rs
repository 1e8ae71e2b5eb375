//! Writes the caller does itself: into a block the top already holds, with direct I/O, so
//! that a server can have many in flight at once (`serve --cache=none` puts them on an
//! io_uring) while the engine keeps its rules.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{MutexGuard, TryLockError};

use super::{lock, Disk};
use crate::format::journal::RecordKind;
use crate::format::BlockState;
use crate::storage_direct::DIRECT_ALIGN;

/// A write of `len` bytes that goes straight to the top's file at [`InPlace::offset`]
/// through [`InPlace::fd`] (opened with `O_DIRECT`: the caller's buffer must be aligned to
/// [`DIRECT_ALIGN`]). Its block's lock is held until [`InPlace::finish`], so the block stays
/// the top's data meanwhile (no copy-up, whiteout or other write of it runs).
pub struct InPlace<'a> {
    disk: &'a Disk,
    _block: MutexGuard<'a, ()>,
    fd: BorrowedFd<'a>,
    offset: u64,
    b: u64,
    within: usize,
    len: usize,
}

impl Disk {
    /// Whether [`Disk::write_in_place`] may give writes: the top is written with direct I/O.
    pub fn writes_in_place(&self) -> bool {
        self.top.storage.direct_fd().is_some()
    }

    /// An in-place write of `len` bytes at virtual `offset`, where one may be done: a
    /// writable disk whose top is read and written with direct I/O, a range within one
    /// block the top holds as data, file offset and length aligned to [`DIRECT_ALIGN`].
    /// Anything else is `None` and goes through [`Disk::write`]. With `wait` false, `None`
    /// too if another thread holds the block's lock (a caller holding other `InPlace`s must
    /// not wait: two such callers could wait for each other).
    pub fn write_in_place(&self, offset: u64, len: usize, wait: bool) -> Option<InPlace<'_>> {
        if len == 0
            || self.check_writable().is_err()
            || self.check_range(offset, len as u64).is_err()
        {
            return None;
        }
        let fd = self.top.storage.direct_fd()?;
        let bs = u64::from(self.geometry.block_size);
        let (b, within) = (offset / bs, (offset % bs) as usize);
        let at = self.geometry.block_offset(b) + within as u64;
        if within + len > self.geometry.block_len(b)
            || !at.is_multiple_of(DIRECT_ALIGN)
            || !(len as u64).is_multiple_of(DIRECT_ALIGN)
        {
            return None;
        }
        let stripe = self.stripe(b);
        let guard = if wait {
            lock(stripe)
        } else {
            match stripe.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return None,
            }
        };
        // Under the block's lock: what `write_block` does for a data block, the caller does.
        if self.top.map.get(b) != BlockState::Data {
            return None;
        }
        Some(InPlace {
            disk: self,
            _block: guard,
            fd,
            offset: at,
            b,
            within,
            len,
        })
    }
}

impl<'a> InPlace<'a> {
    /// The top's file, opened with `O_DIRECT`.
    pub fn fd(&self) -> BorrowedFd<'a> {
        self.fd
    }

    /// Where in [`InPlace::fd`] the bytes go.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Ends the write, releasing its block: `written` says whether all its bytes reached the
    /// file. One that did not must be done again with [`Disk::write`] (which names the
    /// cause if it fails again); either way the next flush covers whatever did land.
    pub fn finish(self, written: bool) {
        if written {
            self.disk.journal_note(
                self.b,
                RecordKind::Data,
                self.within,
                self.within + self.len,
            );
        }
        self.disk.changes.fetch_add(1, SeqCst);
    }
}
