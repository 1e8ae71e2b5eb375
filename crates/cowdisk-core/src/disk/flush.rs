//! The flush: data synced before the map pages that expose it (FORMAT.md §Crash).

use std::sync::atomic::Ordering::SeqCst;

use super::{lock, Access, Disk};
use crate::error::IoError;

impl Disk {
    /// Makes every write completed before this call durable. After a failed sync the
    /// disk is poisoned: this and every later flush fails.
    pub fn flush(&self) -> Result<(), IoError> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        let _f = lock(&self.flush_lock);
        if self.poisoned.load(SeqCst) {
            return Err(IoError::Poisoned {
                path: self.top.path.clone(),
            });
        }
        let pending = self.top.map.take_dirty();
        let st = &*self.top.storage;
        let res = st
            .sync()
            .map_err(|e| Self::io_err(&self.top.path, "sync data", 0, e))
            .and_then(|()| {
                self.top
                    .map
                    .write_back(st, &self.geometry, &pending)
                    .map_err(|e| Self::io_err(&self.top.path, "write allocation map", 0, e))
            });
        if res.is_err() {
            self.poisoned.store(true, SeqCst);
            self.top.map.redirty(&pending);
        }
        res
    }
}
