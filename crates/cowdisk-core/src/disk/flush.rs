//! The flush: data synced before the map pages that expose it (FORMAT.md §Crash).

use std::sync::atomic::Ordering::SeqCst;

use super::{lock, Access, Disk};
use crate::error::IoError;

impl Disk {
    /// Makes every write completed before this call durable. After a failed sync the
    /// disk is poisoned: this and every later flush fails. A failed map-page write (it
    /// should not happen: page space is reserved before a write needs it) fails this
    /// flush only; the pages stay dirty for the next one.
    pub fn flush(&self) -> Result<(), IoError> {
        self.flush_as(false)
    }

    /// A flush asked for by the disk's client (NBD FLUSH or FUA, a block device's
    /// flush): the same guarantee as [`Disk::flush`], but with a flush journal enabled
    /// (`OpenOptions::flush_journal`) it may be made durable in the journal, leaving the
    /// top's own sync to a later full flush. Tools that read the files after a flush
    /// (seal, squash, check) use [`Disk::flush`], which retires the journal.
    pub fn client_flush(&self) -> Result<(), IoError> {
        self.flush_as(true)
    }

    fn flush_as(&self, journal: bool) -> Result<(), IoError> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        // Every request completed before this call is counted here.
        let wanted = self.changes.load(SeqCst);
        let _f = lock(&self.flush_lock);
        if self.poisoned.load(SeqCst) {
            return Err(IoError::Poisoned {
                path: self.top.path.clone(),
            });
        }
        if self.synced.load(SeqCst) >= wanted && (journal || !self.journal_live()) {
            // Nothing written since, or a flush that ran while this one waited covered it
            // (a full flush still has a live journal to retire).
            return Ok(());
        }
        // Read before the dirty pages are taken and the data synced: every request it
        // counts has its data written and its map entries set.
        let covers = self.changes.load(SeqCst);
        if let Some(r) = journal.then(|| self.journal_flush()).flatten() {
            if r.is_ok() {
                self.synced.store(covers, SeqCst);
            }
            return r;
        }
        self.journal_full_begin();
        self.promote_filled();
        // Bitmaps before the map: an entry this flush retires left its partial state
        // before, so the map pages taken next hold its new state.
        let mut sub = self.top.sub.take_dirty(&self.geometry);
        let pending = self.top.map.take_dirty();
        let st = &*self.top.storage;
        let path = &self.top.path;
        let res = st
            .sync()
            .map_err(|e| (true, Self::io_err(path, "sync data", 0, e)))
            .and_then(|()| {
                // Bitmaps and map pages in either order: a torn flush shows each block's
                // older or newer bitmap, both safe (crate::sub).
                self.top
                    .sub
                    .write_back(st, &self.geometry, &mut sub)
                    .map_err(|e| {
                        (
                            false,
                            Self::io_err(path, "write partial-block bitmaps", 0, e),
                        )
                    })
            })
            .and_then(|()| {
                self.top
                    .map
                    .write_back(st, &self.geometry, &pending)
                    .map_err(|(failed_sync, e)| {
                        let op = if failed_sync {
                            "sync allocation map"
                        } else {
                            "write allocation map"
                        };
                        (failed_sync, Self::io_err(path, op, 0, e))
                    })
            })
            .and_then(|()| match pending.is_empty() && !sub.is_empty() {
                // The map's write-back synced nothing: the bitmaps still need it.
                true => st
                    .sync()
                    .map_err(|e| (true, Self::io_err(path, "sync partial-block bitmaps", 0, e))),
                false => Ok(()),
            });
        let res = res.and_then(|()| self.journal_full_done().map_err(|e| (true, e)));
        match res {
            Ok(()) => {
                self.top.sub.committed(&sub);
                self.synced.store(covers, SeqCst);
                Ok(())
            }
            Err((failed_sync, e)) => {
                // Only a failed sync loses writes the kernel may have dropped: that is
                // what poisons. A write that found no space can simply be tried again.
                if failed_sync {
                    self.poisoned.store(true, SeqCst);
                }
                self.top.map.redirty(&pending);
                self.top.sub.redirty(&sub);
                Err(e)
            }
        }
    }
}
