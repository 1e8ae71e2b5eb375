//! Header updates of an open disk's top, made through the engine so the disk stays
//! coherent with its file: sealing it (the two steps of a snapshot) and repointing its
//! parent (squash). Each is one atomic A/B header write (FORMAT.md §Header).

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Mutex;

use super::{lock, Disk};
use crate::error::OpenError;
use crate::format::{Header, LayerState, ParentRef};
use crate::layer::{commit_seal, prepare_seal, verify_seal_digest, write_header, LoadedHeader};

/// The top's current header and the slot it is in.
pub(crate) struct TopHeader {
    cur: Mutex<LoadedHeader>,
}

impl TopHeader {
    pub(crate) fn new(loaded: LoadedHeader) -> TopHeader {
        TopHeader {
            cur: Mutex::new(loaded),
        }
    }
    pub(crate) fn get(&self) -> Header {
        lock(&self.cur).header.clone()
    }
}

impl Disk {
    /// First step of sealing the top: flushes, then computes and stores its block CRCs
    /// and returns the seal digest a child records. Nothing changes what the disk reads or
    /// whether it takes writes; the caller must not write before [`Disk::commit_seal`].
    pub fn prepare_seal(&self) -> Result<u32, OpenError> {
        self.check_header_writable()?;
        self.fill_partial_blocks()?;
        self.flush()?;
        let h = self.top.header.get();
        prepare_seal(&*self.top.storage, &self.top.path, &h, &self.top.map)
    }

    /// Second step: marks the top sealed with `digest` (the commit point of a snapshot).
    /// The disk refuses writes from then on.
    pub fn commit_seal(&self, digest: u32) -> Result<(), OpenError> {
        self.check_header_writable()?;
        let mut cur = lock(&self.top.header.cur);
        let h = commit_seal(&*self.top.storage, &self.top.path, &cur, digest)?;
        self.sealed.store(true, SeqCst);
        cur.slot = 1 - cur.slot;
        cur.header = h;
        Ok(())
    }

    /// Points the top at another parent holding the same content (a squashed or moved
    /// copy of its chain). The open disk keeps reading its current chain, which reads
    /// the same.
    pub fn set_parent(&self, parent: ParentRef) -> Result<Header, OpenError> {
        self.check_header_writable()?;
        self.rewrite_header(|h| h.parent = Some(parent))
    }

    /// Rewrites the top's header with `change` applied: one A/B write and a sync.
    pub(super) fn rewrite_header(
        &self,
        change: impl FnOnce(&mut Header),
    ) -> Result<Header, OpenError> {
        let mut cur = lock(&self.top.header.cur);
        let mut h = cur.header.clone();
        change(&mut h);
        let slot = write_header(&*self.top.storage, &self.top.path, &cur, &h)?;
        h.generation = cur.header.generation + 1;
        *cur = LoadedHeader {
            header: h.clone(),
            slot,
            other_slot_damaged: None,
        };
        Ok(h)
    }

    /// Checks a sealed top's seal digest against its map and stored block CRCs (what
    /// opening a layer as a parent checks; a top is not checked at open).
    pub fn verify_top_seal(&self) -> Result<(), OpenError> {
        let h = self.top.header.get();
        verify_seal_digest(&*self.top.storage, &self.top.path, &h, &self.top.map)
    }

    fn check_header_writable(&self) -> Result<(), OpenError> {
        let sealed = self.top.header.get().state == LayerState::Sealed;
        if self.is_read_only() || sealed {
            return Err(OpenError::Sealed {
                path: self.top.path.clone(),
            });
        }
        Ok(())
    }
}
