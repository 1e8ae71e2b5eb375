//! Header slots: encoding, decoding and validation of every field (FORMAT.md §Header).

use byteorder::{ByteOrder, LittleEndian as LE};

use super::*;
use crate::error::FormatError;

pub(super) const H_MAGIC: usize = 0;
pub(super) const H_MAJOR: usize = 8;
pub(super) const H_MINOR: usize = 10;
pub(super) const H_SLOT_SIZE: usize = 12;
pub(super) const H_GENERATION: usize = 16;
pub(super) const H_INCOMPAT: usize = 24;
pub(super) const H_COMPAT: usize = 32;
pub(super) const H_AUTOCLEAR: usize = 40;
pub(super) const H_UUID: usize = 48;
pub(super) const H_VIRTUAL_SIZE: usize = 64;
pub(super) const H_BLOCK_SIZE: usize = 72;
pub(super) const H_STATE: usize = 76;
pub(super) const H_FLAGS: usize = 80;
pub(super) const H_MAP_OFFSET: usize = 88;
pub(super) const H_MAP_PAGES: usize = 96;
pub(super) const H_CRC_OFFSET: usize = 104;

/// One decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Minor version of the writer.
    pub minor: u16,
    /// Which of the two slots is newer.
    pub generation: u64,
    /// Incompatible feature bits (only `INCOMPAT_FLUSH_JOURNAL` is known).
    pub incompat: u64,
    /// Compatible feature bits (unknown ones are kept and ignored).
    pub compat: u64,
    /// This layer's identity.
    pub uuid: Uuid,
    /// Layout.
    pub geometry: Geometry,
    /// Writable or sealed.
    pub state: LayerState,
    /// Header flags (`FLAG_NEEDS_CHECK`).
    pub flags: u32,
    /// Digest over map and block CRCs; meaningful once sealed.
    pub seal_digest: u32,
    /// The layer below, if any.
    pub parent: Option<ParentRef>,
}

impl Header {
    /// A fresh writable header (generation 1).
    pub fn new(geometry: Geometry, uuid: Uuid, parent: Option<ParentRef>) -> Header {
        Header {
            minor: VERSION_MINOR,
            generation: 1,
            incompat: 0,
            compat: if geometry.sub_pages > 0 {
                COMPAT_SUB_BLOCKS
            } else {
                0
            },
            uuid,
            geometry,
            state: LayerState::Writable,
            flags: 0,
            seal_digest: 0,
            parent,
        }
    }

    /// Encodes into one 4096-byte slot, CRC last.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SLOT as usize];
        let g = &self.geometry;
        b[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC);
        LE::write_u16(&mut b[H_MAJOR..], VERSION_MAJOR);
        LE::write_u16(&mut b[H_MINOR..], self.minor);
        LE::write_u32(&mut b[H_SLOT_SIZE..], HEADER_SLOT as u32);
        LE::write_u64(&mut b[H_GENERATION..], self.generation);
        LE::write_u64(&mut b[H_INCOMPAT..], self.incompat);
        // The bitmap area is part of the layout: its bit follows the geometry.
        let compat = match g.sub_pages {
            0 => self.compat & !COMPAT_SUB_BLOCKS,
            _ => self.compat | COMPAT_SUB_BLOCKS,
        };
        LE::write_u64(&mut b[H_COMPAT..], compat);
        LE::write_u64(&mut b[H_AUTOCLEAR..], 0);
        b[H_UUID..H_UUID + 16].copy_from_slice(&self.uuid.0);
        LE::write_u64(&mut b[H_VIRTUAL_SIZE..], g.virtual_size);
        LE::write_u32(&mut b[H_BLOCK_SIZE..], g.block_size);
        let state = match self.state {
            LayerState::Writable => 0,
            LayerState::Sealed => 1,
        };
        LE::write_u32(&mut b[H_STATE..], state);
        LE::write_u32(&mut b[H_FLAGS..], self.flags);
        LE::write_u64(&mut b[H_MAP_OFFSET..], MAP_OFFSET);
        LE::write_u64(&mut b[H_MAP_PAGES..], g.map_pages);
        LE::write_u64(&mut b[H_CRC_OFFSET..], g.crc_offset);
        LE::write_u64(&mut b[H_DATA_OFFSET..], g.data_offset);
        LE::write_u32(&mut b[H_SEAL_DIGEST..], self.seal_digest);
        if let Some(p) = &self.parent {
            b[H_PARENT_UUID..H_PARENT_UUID + 16].copy_from_slice(&p.uuid.0);
            LE::write_u32(&mut b[H_PARENT_DIGEST..], p.digest);
            LE::write_u16(&mut b[H_PARENT_LEN..], p.path.len() as u16);
            b[H_PARENT_PATH..H_PARENT_PATH + p.path.len()].copy_from_slice(p.path.as_bytes());
        }
        let crc = crc32fast::hash(&b[..H_CRC]);
        LE::write_u32(&mut b[H_CRC..], crc);
        b
    }

    /// Decodes and validates one slot. Checks run in the order a reader needs them:
    /// magic, version, CRC, features, then each field's range before any arithmetic.
    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SLOT as usize {
            return Err(FormatError::Truncated {
                what: "header",
                needed: HEADER_SLOT,
                len: b.len() as u64,
            });
        }
        if b[H_MAGIC..H_MAGIC + 8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let major = LE::read_u16(&b[H_MAJOR..]);
        let minor = LE::read_u16(&b[H_MINOR..]);
        if major != VERSION_MAJOR {
            return Err(FormatError::UnsupportedVersion { major, minor });
        }
        let stored = LE::read_u32(&b[H_CRC..]);
        let actual = crc32fast::hash(&b[..H_CRC]);
        if stored != actual {
            return Err(FormatError::HeaderCrc { stored, actual });
        }
        let slot = LE::read_u32(&b[H_SLOT_SIZE..]);
        if u64::from(slot) != HEADER_SLOT {
            return Err(field("header_size", slot.into(), "must be 4096"));
        }
        let incompat = LE::read_u64(&b[H_INCOMPAT..]);
        let unknown = incompat & !SUPPORTED_INCOMPAT;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatFeatures(
                incompat_feature_names(unknown),
            ));
        }
        let block_size = LE::read_u32(&b[H_BLOCK_SIZE..]);
        let virtual_size = LE::read_u64(&b[H_VIRTUAL_SIZE..]);
        let mut geometry = Geometry::new(virtual_size, block_size)?;
        if LE::read_u64(&b[H_COMPAT..]) & COMPAT_SUB_BLOCKS != 0 {
            geometry = geometry.with_sub_blocks();
        }
        let state = match LE::read_u32(&b[H_STATE..]) {
            0 => LayerState::Writable,
            1 => LayerState::Sealed,
            v => {
                return Err(field(
                    "state",
                    v.into(),
                    "must be 0 (writable) or 1 (sealed)",
                ))
            }
        };
        if state == LayerState::Sealed && incompat & INCOMPAT_FLUSH_JOURNAL != 0 {
            // A seal follows a full flush, which retires the journal.
            return Err(field(
                "incompat",
                incompat,
                "flush_journal on a sealed layer",
            ));
        }
        let check = |name, got: u64, want: u64| {
            if got == want {
                Ok(())
            } else {
                Err(field(
                    name,
                    got,
                    "does not match the layout implied by size and block size",
                ))
            }
        };
        check("map_offset", LE::read_u64(&b[H_MAP_OFFSET..]), MAP_OFFSET)?;
        check(
            "map_pages",
            LE::read_u64(&b[H_MAP_PAGES..]),
            geometry.map_pages,
        )?;
        check(
            "crc_offset",
            LE::read_u64(&b[H_CRC_OFFSET..]),
            geometry.crc_offset,
        )?;
        check(
            "data_offset",
            LE::read_u64(&b[H_DATA_OFFSET..]),
            geometry.data_offset,
        )?;
        let mut uuid = Uuid::default();
        uuid.0.copy_from_slice(&b[H_UUID..H_UUID + 16]);
        let parent = decode_parent(b)?;
        let generation = LE::read_u64(&b[H_GENERATION..]);
        if generation == u64::MAX {
            // The next update would wrap to 0 and lose to the other slot.
            return Err(field("generation", generation, "is at its maximum"));
        }
        Ok(Header {
            minor,
            generation,
            incompat,
            compat: LE::read_u64(&b[H_COMPAT..]),
            uuid,
            geometry,
            state,
            flags: LE::read_u32(&b[H_FLAGS..]),
            seal_digest: LE::read_u32(&b[H_SEAL_DIGEST..]),
            parent,
        })
    }
}

/// The parent link of a header slot: none, or a valid reference with its identity.
fn decode_parent(b: &[u8]) -> Result<Option<ParentRef>, FormatError> {
    let mut parent_uuid = Uuid::default();
    parent_uuid
        .0
        .copy_from_slice(&b[H_PARENT_UUID..H_PARENT_UUID + 16]);
    let parent_len = usize::from(LE::read_u16(&b[H_PARENT_LEN..]));
    if parent_len == 0 {
        if !parent_uuid.is_nil() {
            return Err(field_text("parent_uuid", "set without a parent path"));
        }
        return Ok(None);
    }
    if parent_len > MAX_PARENT_PATH {
        return Err(field(
            "parent_path_len",
            parent_len as u64,
            "longer than 1024 bytes",
        ));
    }
    let raw = &b[H_PARENT_PATH..H_PARENT_PATH + parent_len];
    let path = std::str::from_utf8(raw)
        .map_err(|_| field_text("parent_path", "is not UTF-8"))?
        .to_string();
    validate_reference(&path).map_err(|reason| field_text("parent_path", reason))?;
    Ok(Some(ParentRef {
        path,
        uuid: parent_uuid,
        digest: LE::read_u32(&b[H_PARENT_DIGEST..]),
    }))
}

fn field(field: &'static str, value: u64, reason: &'static str) -> FormatError {
    FormatError::Field {
        field,
        value: Some(value),
        reason,
    }
}

/// A refused field whose value is not a number (a path, a UUID).
fn field_text(field: &'static str, reason: &'static str) -> FormatError {
    FormatError::Field {
        field,
        value: None,
        reason,
    }
}

fn incompat_feature_names(bits: u64) -> String {
    let mut names = Vec::new();
    for i in 0..64 {
        let bit = 1u64 << i;
        if bits & bit != 0 {
            match INCOMPAT_FEATURE_NAMES.iter().find(|(b, _)| *b == bit) {
                Some((_, n)) => names.push((*n).to_string()),
                None => names.push(format!("bit {i}")),
            }
        }
    }
    names.join(", ")
}

/// Checks a parent reference's syntax: a path (relative to the child's folder, or
/// absolute) or a source-specific name. What it may reach is decided when it is opened:
/// by the identity check and, where configured, image roots (chain::source).
pub fn validate_reference(path: &str) -> Result<(), &'static str> {
    // A parent in object storage (cowdisk-remote) is `s3://BUCKET/KEY`; after the scheme
    // the same rules apply, and only a layer source that knows the scheme resolves it.
    let path = path.strip_prefix("s3://").unwrap_or(path);
    if path.is_empty() {
        return Err("is empty");
    }
    if path.len() > MAX_PARENT_PATH {
        return Err("is longer than 1024 bytes");
    }
    if path.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    if path.ends_with('/') {
        return Err("names a folder");
    }
    if path.split('/').skip(1).any(str::is_empty) {
        return Err("has an empty component");
    }
    Ok(())
}
