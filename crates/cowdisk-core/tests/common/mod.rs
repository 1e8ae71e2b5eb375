//! Shared helpers for the engine test suites: seeds, chains on simulated storage, a
//! frozen in-memory storage that refuses writes, and a header/map editor that re-seals
//! checksums (thin-provisioning-tools damage-generator style).
#![allow(dead_code)] // each suite uses a different subset

pub mod crash;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cowdisk_core::layer::{self, NewLayer};
use cowdisk_core::sim::{SimStorage, SimWorld};
use cowdisk_core::{Access, Disk, ParentRef, ReadStorage, Storage};

/// The seed for a randomized test: `COWDISK_SEED` if set, else a fresh one. Printed so
/// a failure can be replayed (`cargo test` shows stdout of failing tests).
pub fn seed(test: &str) -> u64 {
    let s = match std::env::var("COWDISK_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("COWDISK_SEED={v:?} is not a u64")),
        Err(_) => rand::random(),
    };
    println!("{test}: seed {s} (replay with COWDISK_SEED={s})");
    s
}

/// A cheap deterministic byte pattern (xorshift), so data generation stays fast in debug.
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A digest of a file image, enough to notice a changed lower layer.
pub fn hash(bytes: &[u8]) -> u64 {
    (u64::from(crc32fast::hash(bytes)) << 32) ^ bytes.len() as u64
}

/// True if every byte is zero (memcmp-speed even in debug builds).
pub fn is_zero(bytes: &[u8]) -> bool {
    const Z: [u8; 4096] = [0; 4096];
    bytes.chunks(4096).all(|c| c == &Z[..c.len()])
}

/// A chain of layers on one [`SimWorld`], bottom first; the last one is the top.
pub struct SimChain {
    /// The world holding every file.
    pub world: Arc<SimWorld>,
    /// Layer storages and names, bottom first.
    pub layers: Vec<(Arc<SimStorage>, PathBuf)>,
    /// Virtual size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

impl SimChain {
    /// A single writable layer.
    pub fn new(world: Arc<SimWorld>, size: u64, block_size: u32) -> SimChain {
        let st = world.create();
        let path = PathBuf::from("l0");
        let h = NewLayer {
            virtual_size: size,
            block_size,
            parent: None,
        }
        .header(&path)
        .unwrap();
        layer::create_on(&*st, &path, &h).unwrap();
        SimChain {
            world,
            layers: vec![(st, path)],
            size,
            block_size,
        }
    }

    /// Number of layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Storages in the order `Disk::open_storages` wants: top, then lowers top-most first.
    #[allow(clippy::type_complexity)]
    pub fn storages(
        &self,
    ) -> (
        (Arc<dyn Storage>, PathBuf),
        Vec<(Arc<dyn ReadStorage>, PathBuf)>,
    ) {
        let mut it = self.layers.iter().rev();
        let (s, p) = it.next().unwrap();
        let top = (s.clone() as Arc<dyn Storage>, p.clone());
        let lowers = it
            .map(|(s, p)| (s.clone() as Arc<dyn ReadStorage>, p.clone()))
            .collect();
        (top, lowers)
    }

    /// Opens the chain.
    pub fn open(&self, access: Access) -> Disk {
        let (top, lowers) = self.storages();
        Disk::open_storages(top, lowers, access).unwrap()
    }

    /// Seals the top (no disk may be open) and puts a new empty writable top over it.
    pub fn push_layer(&mut self) {
        let (st, path) = self.layers.last().unwrap().clone();
        {
            // Sealing needs whole blocks: partial ones are filled from below first.
            let d = self.open(Access::ReadWrite);
            d.fill_partial_blocks().unwrap();
            d.flush().unwrap();
        }
        let (uuid, digest) = layer::seal(&*st, &path).unwrap();
        let new = self.world.create();
        let npath = PathBuf::from(format!("l{}", self.layers.len()));
        let parent = ParentRef {
            path: path.to_string_lossy().into_owned(),
            uuid,
            digest,
        };
        let h = NewLayer {
            virtual_size: self.size,
            block_size: self.block_size,
            parent: Some(parent),
        }
        .header(&npath)
        .unwrap();
        layer::create_on(&*new, &npath, &h).unwrap();
        self.layers.push((new, npath));
    }

    /// Live bytes of every layer below the top, bottom first.
    pub fn lower_hashes(&self) -> Vec<u64> {
        self.layers[..self.layers.len() - 1]
            .iter()
            .map(|(s, _)| hash(&self.world.live(s.id())))
            .collect()
    }
}

/// Read-only bytes as a storage: every mutating call fails and is counted, so a test
/// can prove an open wrote nothing. `len` may be shorter than the bytes (truncation
/// without copying).
pub struct Frozen {
    bytes: Arc<Vec<u8>>,
    len: usize,
    /// Mutating calls attempted.
    pub writes: AtomicU64,
}

impl Frozen {
    /// The first `len` bytes of `bytes`.
    pub fn new(bytes: Arc<Vec<u8>>, len: usize) -> Arc<Frozen> {
        assert!(len <= bytes.len());
        Arc::new(Frozen {
            bytes,
            len,
            writes: AtomicU64::new(0),
        })
    }
    /// All of `bytes`.
    pub fn whole(bytes: Vec<u8>) -> Arc<Frozen> {
        let n = bytes.len();
        Frozen::new(Arc::new(bytes), n)
    }
    fn refuse(&self) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "frozen test storage",
        ))
    }
}

impl ReadStorage for Frozen {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        if end > self.len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len as u64)
    }
}

impl Storage for Frozen {
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        self.refuse()
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        self.refuse()
    }
    fn sync(&self) -> io::Result<()> {
        self.refuse()
    }
    fn punch_hole(&self, _: u64, _: u64) -> io::Result<()> {
        self.refuse()
    }
}

/// Header field offsets (FORMAT.md; mirrored here on purpose: a format change must
/// show up as a test change).
pub mod hdr {
    pub const MAJOR: usize = 8;
    pub const MINOR: usize = 10;
    pub const SLOT_SIZE: usize = 12;
    pub const GENERATION: usize = 16;
    pub const INCOMPAT: usize = 24;
    pub const UUID: usize = 48;
    pub const VIRTUAL_SIZE: usize = 64;
    pub const BLOCK_SIZE: usize = 72;
    pub const STATE: usize = 76;
    pub const FLAGS: usize = 80;
    pub const MAP_OFFSET: usize = 88;
    pub const MAP_PAGES: usize = 96;
    pub const CRC_OFFSET: usize = 104;
    pub const DATA_OFFSET: usize = 112;
    pub const SEAL_DIGEST: usize = 120;
    pub const PARENT_UUID: usize = 128;
    pub const PARENT_DIGEST: usize = 144;
    pub const PARENT_LEN: usize = 148;
    pub const PARENT_PATH: usize = 152;
    pub const CRC: usize = 4092;
    pub const SLOT: usize = 4096;
}

/// Edits header slot `slot` of a layer image with `f`, then recomputes its CRC.
pub fn edit_header(img: &mut [u8], slot: usize, f: impl FnOnce(&mut [u8])) {
    let b = &mut img[slot * hdr::SLOT..(slot + 1) * hdr::SLOT];
    f(b);
    reseal_header(b);
}

/// Recomputes the CRC of one 4096-byte header slot.
pub fn reseal_header(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..hdr::CRC]);
    b[hdr::CRC..hdr::CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Writes `v` little-endian at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
/// Writes `v` little-endian at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
/// Writes `v` little-endian at `off`.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
/// Reads a little-endian u32 at `off`.
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Sets the parent path of header slot `slot` (raw bytes, any length that fits) and
/// re-seals the CRC.
pub fn set_parent_path(img: &mut [u8], slot: usize, path: &[u8]) {
    edit_header(img, slot, |b| {
        put_u16(b, hdr::PARENT_LEN, path.len() as u16);
        let room = hdr::CRC - hdr::PARENT_PATH;
        b[hdr::PARENT_PATH..hdr::CRC].fill(0);
        b[hdr::PARENT_PATH..hdr::PARENT_PATH + path.len().min(room)]
            .copy_from_slice(&path[..path.len().min(room)]);
    });
}

/// Map page slot `slot` of page `page` starts here.
pub fn page_offset(page: u64, slot: usize) -> usize {
    (8192 + (page * 2 + slot as u64) * 4096) as usize
}

/// Recomputes a map page slot's CRC (field at 16..20, taken as zero while hashing).
pub fn reseal_page(img: &mut [u8], page: u64, slot: usize) {
    let o = page_offset(page, slot);
    let b = &mut img[o..o + 4096];
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..16]);
    h.update(&[0; 4]);
    h.update(&b[20..]);
    let crc = h.finalize();
    b[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// Sets entry `block` (within `page`) of a map page slot to `v` (2 bits) and re-seals.
pub fn set_map_entry(img: &mut [u8], page: u64, slot: usize, block: usize, v: u8) {
    let o = page_offset(page, slot) + 32 + block / 4;
    let shift = (block % 4) * 2;
    img[o] = (img[o] & !(3 << shift)) | ((v & 3) << shift);
    reseal_page(img, page, slot);
}

/// Index (0 = A, 1 = B) of the valid map page slot with the higher sequence.
pub fn active_page_slot(img: &[u8], page: u64) -> usize {
    let seq = |s: usize| {
        let o = page_offset(page, s);
        if img[o..o + 4] == *b"CDMP" {
            u64::from_le_bytes(img[o + 8..o + 16].try_into().unwrap())
        } else {
            0
        }
    };
    if seq(1) > seq(0) {
        1
    } else {
        0
    }
}
