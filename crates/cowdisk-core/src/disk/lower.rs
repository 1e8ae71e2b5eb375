//! The sealed layers below the top: kept open for reads, resolved once, each block
//! verified once, shared between disks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use crate::error::IoError;
use crate::format::{Header, COMPAT_BLOCK_CRCS};
use crate::layer::verify_block_crc;
use crate::map::{AllocMap, BlockCounts};
use crate::resolve::{LowerOwner, ResolvedMap};
use crate::storage::ReadStorage;

/// A sealed layer below the top, kept open for reads.
pub struct LowerLayer {
    pub(crate) storage: Arc<dyn ReadStorage>,
    pub(crate) path: PathBuf,
    pub(crate) header: Header,
    /// Its map's counts (no partial blocks: a sealed layer holding one is refused).
    pub(crate) counts: BlockCounts,
    /// One bit per block, in chunks made on first use: its data was checked against its
    /// stored CRC once. Sealed layers never change, so once is enough; shared by every
    /// disk using the layer.
    verified: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// Without stored CRCs there is nothing to verify against; a storage that verifies
    /// every read itself (a remote layer) needs no second check.
    no_check: bool,
}

/// Words (64 blocks each) per chunk of verified bits.
const VERIFIED_CHUNK: u64 = 1024;

/// Memory a layer's verified-bit index costs per block, before any chunk is made.
pub(crate) fn verified_index_bytes(blocks: u64) -> u64 {
    blocks.div_ceil(64 * VERIFIED_CHUNK) * 24
}

impl LowerLayer {
    pub(crate) fn new(
        storage: Arc<dyn ReadStorage>,
        path: PathBuf,
        header: Header,
        counts: BlockCounts,
    ) -> LowerLayer {
        let chunks = header.geometry.blocks.div_ceil(64 * VERIFIED_CHUNK) as usize;
        let no_check = header.compat & COMPAT_BLOCK_CRCS == 0 || storage.verifies_reads();
        LowerLayer {
            storage,
            path,
            no_check,
            header,
            counts,
            verified: (0..chunks).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The layer's path as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layer's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The layer's storage (so a process can reuse what it has open, not reopen it).
    pub fn storage(&self) -> &Arc<dyn ReadStorage> {
        &self.storage
    }

    pub(crate) fn is_verified(&self, b: u64) -> bool {
        let (c, w) = ((b / 64) / VERIFIED_CHUNK, (b / 64) % VERIFIED_CHUNK);
        self.no_check
            || self.verified[c as usize]
                .get()
                .is_some_and(|ws| ws[w as usize].load(SeqCst) & (1 << (b % 64)) != 0)
    }

    /// Compares `data` (block `b`'s bytes, its virtual length) with the stored CRC.
    pub(crate) fn verify(&self, b: u64, data: &[u8]) -> Result<(), IoError> {
        self.verify_crc(b, crc32fast::hash(data))
    }

    /// As [`LowerLayer::verify`], with the CRC of the block's bytes already computed.
    pub(crate) fn verify_crc(&self, b: u64, actual: u32) -> Result<(), IoError> {
        verify_block_crc(&*self.storage, &self.path, &self.header.geometry, b, actual)?;
        let (c, w) = ((b / 64) / VERIFIED_CHUNK, (b / 64) % VERIFIED_CHUNK);
        let ws = self.verified[c as usize]
            .get_or_init(|| (0..VERIFIED_CHUNK).map(|_| AtomicU64::new(0)).collect());
        ws[w as usize].fetch_or(1 << (b % 64), SeqCst);
        Ok(())
    }

    /// Reads data block `b` (the length this layer gives it) into the front of `buf`,
    /// verified against its stored CRC unless that was done before.
    pub fn read_block(&self, b: u64, buf: &mut [u8]) -> Result<usize, IoError> {
        let g = &self.header.geometry;
        let n = g.block_len(b);
        let off = g.block_offset(b);
        self.storage
            .read_at(&mut buf[..n], off)
            .map_err(|e| IoError::Storage {
                path: self.path.clone(),
                op: "read block",
                offset: off,
                source: e,
            })?;
        if !self.is_verified(b) {
            self.verify(b, &buf[..n])?;
        }
        Ok(n)
    }
}

/// The sealed part of a chain, resolved once. Shared between disks with the same base
/// (through [`crate::LowerCache`]) so clones cost one copy of it.
pub struct Lower {
    pub(crate) layers: Vec<LowerLayer>,
    pub(crate) resolved: ResolvedMap,
}

impl Lower {
    /// Builds the resolved chain from loaded layers (top-most first) and their maps.
    pub(crate) fn new(layers: Vec<LowerLayer>, maps: &[AllocMap], blocks: u64) -> Lower {
        let refs: Vec<&AllocMap> = maps.iter().collect();
        Lower {
            resolved: ResolvedMap::build(blocks, &refs),
            layers,
        }
    }
    /// An empty chain (a standalone top).
    pub(crate) fn empty() -> Lower {
        Lower {
            layers: Vec::new(),
            resolved: ResolvedMap::default(),
        }
    }
    /// The first layer's header (the direct parent of the top).
    pub fn first_header(&self) -> Option<&Header> {
        self.layers.first().map(|l| &l.header)
    }
    /// The layers, top-most first (index `i` is depth `i + 1`).
    pub fn layers(&self) -> &[LowerLayer] {
        &self.layers
    }
    /// Which lower layer answers block `b`: the one owner lookup.
    pub fn owner(&self, b: u64) -> LowerOwner {
        self.resolved.get(b)
    }
    /// Calls `f` for every block some lower layer holds (data or whiteout), in order,
    /// with its owner; costs nothing for regions no layer holds.
    pub fn for_each_owned<E>(
        &self,
        f: impl FnMut(u64, LowerOwner) -> Result<(), E>,
    ) -> Result<(), E> {
        self.resolved.for_each_owned(f)
    }
}
