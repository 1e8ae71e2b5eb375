//! One layer file: choosing the valid header slot, creating, sealing, verifying.

use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{FormatError, IoError, OpenError};
use crate::format::{
    BlockState, DigestBuilder, Geometry, Header, LayerState, ParentRef, Uuid, COMPAT_BLOCK_CRCS,
    FLAG_NEEDS_CHECK, HEADER_SLOT, PAGE_SIZE,
};
use crate::map::{AllocMap, LoadError, SlotFinding};
use crate::storage::{ReadStorage, Storage};

/// A header as read from a file, with which slot it came from.
#[derive(Debug, Clone)]
pub struct LoadedHeader {
    /// The newest valid header.
    pub header: Header,
    /// Its slot (0 = A, 1 = B).
    pub slot: usize,
    /// The other slot is non-empty but invalid (a torn update or damage).
    pub other_slot_damaged: Option<FormatError>,
}

fn fmt_err(path: &Path, source: FormatError) -> OpenError {
    OpenError::Format {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads both header slots and returns the newest valid one, after checking the file
/// is long enough for everything the header describes.
pub fn read_header(storage: &dyn ReadStorage, path: &Path) -> Result<LoadedHeader, OpenError> {
    let len = storage.len().map_err(|e| OpenError::io(path, "stat", e))?;
    if len < 2 * HEADER_SLOT {
        // Decode what is there so a wrong magic is reported as such, not as "short".
        let mut b = vec![0u8; len.min(HEADER_SLOT) as usize];
        storage
            .read_at(&mut b, 0)
            .map_err(|e| OpenError::io(path, "read header", e))?;
        if b.len() >= 8 && b[..8] != crate::format::MAGIC {
            return Err(fmt_err(path, FormatError::BadMagic));
        }
        return Err(fmt_err(
            path,
            FormatError::Truncated {
                what: "header",
                needed: 2 * HEADER_SLOT,
                len,
            },
        ));
    }
    let mut b = vec![0u8; 2 * HEADER_SLOT as usize];
    storage
        .read_at(&mut b, 0)
        .map_err(|e| OpenError::io(path, "read header", e))?;
    let (a, bslot) = b.split_at(HEADER_SLOT as usize);
    let decoded = [decode_slot(a), decode_slot(bslot)];
    let pick = match (&decoded[0], &decoded[1]) {
        (Some(Ok(x)), Some(Ok(y))) => {
            if y.generation > x.generation {
                1
            } else {
                0
            }
        }
        (Some(Ok(_)), _) => 0,
        (_, Some(Ok(_))) => 1,
        (Some(Err(e)), _) => return Err(fmt_err(path, e.clone())),
        (None, Some(Err(e))) => return Err(fmt_err(path, e.clone())),
        (None, None) => return Err(fmt_err(path, FormatError::BadMagic)),
    };
    let header = match &decoded[pick] {
        Some(Ok(h)) => h.clone(),
        _ => unreachable!("picked slot is valid"),
    };
    let other_slot_damaged = match &decoded[1 - pick] {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    };
    let need = header.geometry.file_len();
    if len < need {
        return Err(fmt_err(
            path,
            FormatError::Truncated {
                what: "data area",
                needed: need,
                len,
            },
        ));
    }
    Ok(LoadedHeader {
        header,
        slot: pick,
        other_slot_damaged,
    })
}

/// `None` for an all-zero (never written) slot.
fn decode_slot(b: &[u8]) -> Option<Result<Header, FormatError>> {
    if b.iter().all(|&x| x == 0) {
        None
    } else {
        Some(Header::decode(b))
    }
}

/// Loads the map of a layer whose header was read.
pub fn load_map(
    storage: &dyn ReadStorage,
    path: &Path,
    g: &Geometry,
) -> Result<(AllocMap, Vec<SlotFinding>), OpenError> {
    AllocMap::load(storage, g).map_err(|e| match e {
        LoadError::Io(e) => OpenError::io(path, "read allocation map", e),
        LoadError::Format(f) => fmt_err(path, f),
    })
}

/// Reads and validates the partial-block bitmaps of `map`'s partial blocks (what opening
/// the layer as a top does, without clearing anything); returns how many blocks are partial.
pub fn check_partial_bitmaps(
    storage: &dyn ReadStorage,
    path: &Path,
    g: &Geometry,
    map: &AllocMap,
) -> Result<u64, OpenError> {
    let (sub, _) = crate::sub::SubMap::load(storage, g, map, false)
        .map_err(|e| OpenError::io(path, "read partial-block bitmaps", e))?
        .map_err(|f| fmt_err(path, f))?;
    Ok(sub.live_blocks().len() as u64)
}

/// Writes a new empty layer onto empty storage: header slot A, sparse length, sync.
pub fn create_on(storage: &dyn Storage, path: &Path, header: &Header) -> Result<(), OpenError> {
    let g = &header.geometry;
    storage
        .set_len(0)
        .map_err(|e| OpenError::io(path, "truncate", e))?;
    storage
        .set_len(g.file_len())
        .map_err(|e| OpenError::io(path, "set length", e))?;
    storage
        .write_at(&header.encode(), 0)
        .map_err(|e| OpenError::io(path, "write header", e))?;
    storage.sync().map_err(|e| OpenError::io(path, "sync", e))?;
    Ok(())
}

/// Replaces the header atomically: the new version (generation + 1) goes into the
/// slot not holding the current one, then a sync. Returns the slot written.
pub fn write_header(
    storage: &dyn Storage,
    path: &Path,
    current: &LoadedHeader,
    new: &Header,
) -> Result<usize, OpenError> {
    let journal = crate::format::INCOMPAT_FLUSH_JOURNAL;
    if current.header.incompat & new.incompat & journal != 0 {
        // Its records name the current generation: a new one would orphan them.
        return Err(OpenError::Journal {
            path: crate::format::journal::journal_path(path),
            reason: format!(
                "holds flushed writes of {}: open it writable to replay them first",
                path.display()
            ),
        });
    }
    let mut h = new.clone();
    h.generation = current.header.generation + 1;
    let slot = 1 - current.slot;
    storage
        .write_at(&h.encode(), slot as u64 * HEADER_SLOT)
        .map_err(|e| OpenError::io(path, "write header", e))?;
    storage
        .sync()
        .map_err(|e| OpenError::io(path, "sync header", e))?;
    Ok(slot)
}

/// Computes each data block's CRC, writes the CRC pages that cover data blocks, syncs,
/// and returns the seal digest. Pages without data blocks are left as they are (holes):
/// readers use the stored CRC of data blocks only, so sealing costs time in proportion
/// to the data, not the virtual size. Harmless on a writable layer (the area is only
/// read once sealed), so a snapshot can record the digest in the new child before the
/// seal is committed.
pub fn prepare_seal(
    storage: &dyn Storage,
    path: &Path,
    header: &Header,
    map: &AllocMap,
) -> Result<u32, OpenError> {
    let g = &header.geometry;
    if let Some(block) = map.first_partial() {
        // Its CRC entry holds a bitmap, and below a child it would read in part.
        return Err(fmt_err(
            path,
            FormatError::MapEntry {
                block,
                reason: "partial block: open the chain and fill it before sealing",
            },
        ));
    }
    let mut block = vec![0u8; g.block_size as usize];
    let digest = digest_over_crcs(header, map, |first, n, crcs| {
        crcs.fill(0);
        for b in first..first + n {
            if map.get(b) == BlockState::Data {
                let len = g.block_len(b);
                let off = g.block_offset(b);
                storage
                    .read_at(&mut block[..len], off)
                    .map_err(|e| OpenError::io(path, "read block", e))?;
                let crc = crc32fast::hash(&block[..len]);
                LE::write_u32(&mut crcs[((b - first) * 4) as usize..], crc);
            }
        }
        storage
            .write_at(crcs, g.crc_offset + first * 4)
            .map_err(|e| OpenError::io(path, "write block CRCs", e))
    })?;
    storage.sync().map_err(|e| OpenError::io(path, "sync", e))?;
    Ok(digest)
}

/// Marks the layer sealed with `digest` (from [`prepare_seal`]).
pub fn commit_seal(
    storage: &dyn Storage,
    path: &Path,
    current: &LoadedHeader,
    digest: u32,
) -> Result<Header, OpenError> {
    let mut h = current.header.clone();
    h.state = LayerState::Sealed;
    h.seal_digest = digest;
    h.compat |= COMPAT_BLOCK_CRCS;
    write_header(storage, path, current, &h)?;
    h.generation = current.header.generation + 1;
    Ok(h)
}

/// Seals a writable layer (both steps). Returns its identity for children.
pub fn seal(storage: &dyn Storage, path: &Path) -> Result<(Uuid, u32), OpenError> {
    let loaded = read_header(storage, path)?;
    if loaded.header.state == LayerState::Sealed {
        return Ok((loaded.header.uuid, loaded.header.seal_digest));
    }
    if loaded.header.flags & FLAG_NEEDS_CHECK != 0 {
        // Sealing would freeze whatever is wrong into a digest children trust.
        return Err(OpenError::NeedsCheck {
            path: path.to_path_buf(),
        });
    }
    let (map, _) = load_map(storage, path, &loaded.header.geometry)?;
    let digest = prepare_seal(storage, path, &loaded.header, &map)?;
    commit_seal(storage, path, &loaded, digest)?;
    Ok((loaded.header.uuid, digest))
}

/// Recomputes a sealed layer's digest from its map and stored block CRCs (no data
/// reads, so open stays proportional to metadata).
pub fn stored_digest(
    storage: &dyn ReadStorage,
    path: &Path,
    header: &Header,
    map: &AllocMap,
) -> Result<u32, OpenError> {
    let g = &header.geometry;
    digest_over_crcs(header, map, |first, _, crcs| {
        storage
            .read_at(crcs, g.crc_offset + first * 4)
            .map_err(|e| OpenError::io(path, "read block CRCs", e))
    })
}

/// The seal digest, walking the block-CRC area in runs of 1024 blocks (one CRC page): a run
/// without data blocks feeds the digest from the map alone; for the others `crcs` first
/// provides the run's CRC entries (computes and writes, or reads them).
fn digest_over_crcs(
    header: &Header,
    map: &AllocMap,
    mut crcs: impl FnMut(u64, u64, &mut [u8]) -> Result<(), OpenError>,
) -> Result<u32, OpenError> {
    let g = &header.geometry;
    let mut digest = DigestBuilder::new(&header.uuid, g);
    let per = PAGE_SIZE / 4;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    // Runs of blocks no map page holds are fed at once: a huge empty layer costs little.
    let mut unheld = 0;
    for chunk in 0..g.blocks.div_ceil(per) {
        let first = chunk * per;
        let n = (g.blocks - first).min(per);
        if map.unheld(first, n) {
            unheld += n;
            continue;
        }
        digest.absent(std::mem::take(&mut unheld));
        if !map.any_data(first, n) {
            map.digest_states(&mut digest, first, n);
            continue;
        }
        let run = &mut buf[..(n * 4) as usize];
        crcs(first, n, run)?;
        for b in first..first + n {
            let state = map.get(b);
            let crc = if state == BlockState::Data {
                LE::read_u32(&run[((b - first) * 4) as usize..])
            } else {
                0
            };
            digest.block(state, crc);
        }
    }
    digest.absent(unheld);
    Ok(digest.finish())
}

/// Checks a sealed layer's digest against its map and stored block CRCs (no data reads).
pub fn verify_seal_digest(
    storage: &dyn ReadStorage,
    path: &Path,
    header: &Header,
    map: &AllocMap,
) -> Result<(), OpenError> {
    let actual = stored_digest(storage, path, header, map)?;
    if actual != header.seal_digest {
        return Err(fmt_err(
            path,
            FormatError::SealDigest {
                stored: header.seal_digest,
                actual,
            },
        ));
    }
    Ok(())
}

/// Reads the stored CRC of data block `b` of a sealed layer.
fn stored_block_crc(storage: &dyn ReadStorage, g: &Geometry, b: u64) -> std::io::Result<u32> {
    let mut x = [0u8; 4];
    storage.read_at(&mut x, g.crc_offset + b * 4)?;
    Ok(LE::read_u32(&x))
}

/// The one sealed-block verification: compares `actual`, the CRC of data block `b`'s
/// bytes (its length in this layer's virtual size), with the CRC stored at sealing. A
/// mismatch is an error, never bad bytes or a fall-through (docs/reliability.md).
pub fn verify_block_crc(
    storage: &dyn ReadStorage,
    path: &Path,
    g: &Geometry,
    b: u64,
    actual: u32,
) -> Result<(), IoError> {
    let stored = stored_block_crc(storage, g, b).map_err(|e| IoError::Storage {
        path: path.to_path_buf(),
        op: "read block CRC",
        offset: g.crc_offset + b * 4,
        source: e,
    })?;
    if stored != actual {
        return Err(IoError::Checksum {
            path: path.to_path_buf(),
            block: b,
            stored,
            actual,
        });
    }
    Ok(())
}

/// Reads data block `b` of a sealed layer into `buf` (at least its length) and verifies
/// it; returns the block's bytes.
pub fn read_verified_block<'b>(
    storage: &dyn ReadStorage,
    path: &Path,
    g: &Geometry,
    b: u64,
    buf: &'b mut [u8],
) -> Result<&'b [u8], IoError> {
    let n = g.block_len(b);
    let off = g.block_offset(b);
    storage
        .read_at(&mut buf[..n], off)
        .map_err(|e| IoError::Storage {
            path: path.to_path_buf(),
            op: "read block",
            offset: off,
            source: e,
        })?;
    verify_block_crc(storage, path, g, b, crc32fast::hash(&buf[..n]))?;
    Ok(&buf[..n])
}

/// Parameters for a new layer.
#[derive(Debug, Clone)]
pub struct NewLayer {
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Block size, bytes.
    pub block_size: u32,
    /// Parent link, if any.
    pub parent: Option<ParentRef>,
}

impl NewLayer {
    /// Builds the header for a new layer with a fresh UUID. The parent reference must
    /// pass [`crate::format::validate_reference`] (it is what a reader will check, and
    /// an overlong one would not fit the header slot).
    pub fn header(&self, path: &Path) -> Result<Header, OpenError> {
        // Every new layer can hold partial blocks while it is a top.
        let g = Geometry::new(self.virtual_size, self.block_size)
            .map_err(|e| fmt_err(path, e))?
            .with_sub_blocks();
        if let Some(p) = &self.parent {
            crate::format::validate_reference(&p.path).map_err(|why| OpenError::Invalid {
                path: path.to_path_buf(),
                reason: format!("parent reference {why}"),
            })?;
        }
        Ok(Header::new(g, Uuid::random(), self.parent.clone()))
    }
}
