//! The on-disk layer format, v1: the only module that knows byte offsets.
//!
//! Every integer is little-endian (byteorder `LittleEndian`); nothing depends on the
//! host's endianness or word size. `FORMAT.md` beside this crate is the byte-level
//! spec; the constants below mirror it one to one.
//!
//! ```text
//! 0        4096       8192                 crc_offset        data_offset
//! | hdr A  | hdr B    | map pages (A,B)... | block CRCs ...   | block 0 | block 1 | ...
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::FormatError;

/// File magic, first 8 bytes of each header slot.
pub const MAGIC: [u8; 8] = *b"COWDISK\0";
/// Major version: a different major is refused.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version: higher minors are accepted (they only add compatible features).
pub const VERSION_MINOR: u16 = 0;

/// Size of one header slot; there are two (A at 0, B at 4096).
pub const HEADER_SLOT: u64 = 4096;
/// Size of one map page slot.
pub const PAGE_SIZE: u64 = 4096;
/// Where the map area starts.
pub const MAP_OFFSET: u64 = 2 * HEADER_SLOT;
/// Bytes of a map page used by its own header (magic, index, sequence, CRC).
pub const PAGE_HEADER: usize = 32;
/// Allocation entries per map page (2 bits each).
pub const ENTRIES_PER_PAGE: u64 = ((PAGE_SIZE as usize - PAGE_HEADER) * 4) as u64;
/// Map page magic.
pub const PAGE_MAGIC: [u8; 4] = *b"CDMP";

/// Smallest block size (4 KiB).
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size (1 MiB).
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default block size (64 KiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest virtual size: 2^50 bytes (1 PiB). Bounds map and file arithmetic far below
/// u64 overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 50;
/// Most blocks in a layer (16 TiB at 4 KiB blocks, 256 TiB at 64 KiB): bounds the in-memory
/// map at 1 GiB, so a crafted header cannot make an open allocate tens of GiB.
pub const MAX_BLOCKS: u64 = 1 << 32;
/// Longest parent reference, bytes.
pub const MAX_PARENT_PATH: usize = 1024;

/// Most layers a chain may have (the top included).
pub const MAX_CHAIN_DEPTH: usize = 4096;

// Header field offsets (see FORMAT.md).
const H_MAGIC: usize = 0;
const H_MAJOR: usize = 8;
const H_MINOR: usize = 10;
const H_SLOT_SIZE: usize = 12;
const H_GENERATION: usize = 16;
const H_INCOMPAT: usize = 24;
const H_COMPAT: usize = 32;
const H_AUTOCLEAR: usize = 40;
const H_UUID: usize = 48;
const H_VIRTUAL_SIZE: usize = 64;
const H_BLOCK_SIZE: usize = 72;
const H_STATE: usize = 76;
const H_FLAGS: usize = 80;
const H_MAP_OFFSET: usize = 88;
const H_MAP_PAGES: usize = 96;
const H_CRC_OFFSET: usize = 104;
const H_DATA_OFFSET: usize = 112;
const H_SEAL_DIGEST: usize = 120;
const H_PARENT_UUID: usize = 128;
const H_PARENT_DIGEST: usize = 144;
const H_PARENT_LEN: usize = 148;
const H_PARENT_PATH: usize = 152;
const H_CRC: usize = HEADER_SLOT as usize - 4;

/// Incompatible feature bits this version understands (none yet): an image with any
/// other bit set is refused, because reading it without the feature would be wrong.
pub const SUPPORTED_INCOMPAT: u64 = 0;
/// Compatible feature: the sealed layer carries per-block CRC32s of its data.
pub const COMPAT_BLOCK_CRCS: u64 = 1;
/// Names of known incompatible feature bits, for error messages (none yet). Compatible
/// bits have their own namespace: bit 0 here is not `COMPAT_BLOCK_CRCS`.
const INCOMPAT_FEATURE_NAMES: &[(u64, &str)] = &[];

/// Header flag: the layer must be checked before it is written or sealed (set by tools that
/// find it inconsistent; cowdisk itself only clears it, in `check --repair`).
pub const FLAG_NEEDS_CHECK: u32 = 1;

/// Whether a layer may still change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerState {
    /// The top of a chain: takes writes.
    Writable,
    /// Immutable: a parent of other layers.
    Sealed,
}

/// A 128-bit layer identity (random, version 4 layout).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A new random UUID.
    pub fn random() -> Uuid {
        let mut b: [u8; 16] = rand::random();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }
    /// True for the all-zero UUID (meaning "no parent").
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        for (i, x) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// How a child names its parent: a relative path plus the identity it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// Path relative to the child's folder (validated by [`validate_reference`]).
    pub path: String,
    /// The parent's UUID.
    pub uuid: Uuid,
    /// The parent's seal digest when the child was made.
    pub digest: u32,
}

/// Block size, block count and the fixed regions they imply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes the virtual disk holds.
    pub virtual_size: u64,
    /// Bytes per block (power of two).
    pub block_size: u32,
    /// Blocks (the last may be partial).
    pub blocks: u64,
    /// Map pages (each has an A and a B slot).
    pub map_pages: u64,
    /// Start of the per-block CRC area.
    pub crc_offset: u64,
    /// Start of block 0's data.
    pub data_offset: u64,
}

impl Geometry {
    /// Computes the canonical layout, or says which field is out of range.
    pub fn new(virtual_size: u64, block_size: u32) -> Result<Geometry, FormatError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(FormatError::Field {
                field: "block_size",
                value: Some(block_size.into()),
                reason: "must be a power of two from 4 KiB to 1 MiB",
            });
        }
        if virtual_size == 0 || !virtual_size.is_multiple_of(512) || virtual_size > MAX_VIRTUAL_SIZE
        {
            return Err(FormatError::Field {
                field: "virtual_size",
                value: Some(virtual_size),
                reason: "must be a non-zero multiple of 512 up to 1 PiB",
            });
        }
        let bs = u64::from(block_size);
        // Bounded by MAX_VIRTUAL_SIZE, so none of this can overflow.
        let blocks = virtual_size.div_ceil(bs);
        if blocks > MAX_BLOCKS {
            return Err(FormatError::Field {
                field: "virtual_size",
                value: Some(virtual_size),
                reason: "is more than 2^32 blocks at this block size",
            });
        }
        let map_pages = blocks.div_ceil(ENTRIES_PER_PAGE);
        let crc_offset = MAP_OFFSET + map_pages * 2 * PAGE_SIZE;
        let crc_len = (blocks * 4).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let data_offset = (crc_offset + crc_len).div_ceil(bs) * bs;
        Ok(Geometry {
            virtual_size,
            block_size,
            blocks,
            map_pages,
            crc_offset,
            data_offset,
        })
    }
    /// The length every layer file of this geometry has.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.blocks * u64::from(self.block_size)
    }
    /// File offset of block `b`'s data.
    pub fn block_offset(&self, b: u64) -> u64 {
        self.data_offset + b * u64::from(self.block_size)
    }
    /// Bytes of block `b` inside the virtual disk (the last block may be short).
    pub fn block_len(&self, b: u64) -> usize {
        let bs = u64::from(self.block_size);
        (self.virtual_size - b * bs).min(bs) as usize
    }
    /// File offset of map page `p`, slot `s` (0 = A, 1 = B).
    pub fn page_offset(&self, p: u64, s: usize) -> u64 {
        MAP_OFFSET + (p * 2 + s as u64) * PAGE_SIZE
    }
}

/// One decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Minor version of the writer.
    pub minor: u16,
    /// Which of the two slots is newer.
    pub generation: u64,
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
            compat: 0,
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
        LE::write_u64(&mut b[H_INCOMPAT..], 0);
        LE::write_u64(&mut b[H_COMPAT..], self.compat);
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
        let geometry = Geometry::new(virtual_size, block_size)?;
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
        let mut parent_uuid = Uuid::default();
        parent_uuid
            .0
            .copy_from_slice(&b[H_PARENT_UUID..H_PARENT_UUID + 16]);
        let parent_len = usize::from(LE::read_u16(&b[H_PARENT_LEN..]));
        let parent = if parent_len == 0 {
            if !parent_uuid.is_nil() {
                return Err(field_text("parent_uuid", "set without a parent path"));
            }
            None
        } else {
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
            Some(ParentRef {
                path,
                uuid: parent_uuid,
                digest: LE::read_u32(&b[H_PARENT_DIGEST..]),
            })
        };
        let generation = LE::read_u64(&b[H_GENERATION..]);
        if generation == u64::MAX {
            // The next update would wrap to 0 and lose to the other slot.
            return Err(field("generation", generation, "is at its maximum"));
        }
        Ok(Header {
            minor,
            generation,
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

/// State of one block in one layer's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// Not in this layer: falls through to the layer below.
    Absent = 0,
    /// This layer holds the block's data.
    Data = 1,
    /// Whiteout: reads as zeros and hides every lower layer.
    Zero = 2,
}

/// What one map page slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageSlot {
    /// All zeros: never written (sparse hole). Sequence 0, every entry absent.
    Empty,
    /// A valid page with this sequence number (its entries follow [`PAGE_HEADER`]).
    Valid {
        /// Higher wins between the A and B slot.
        sequence: u64,
    },
    /// Magic, index or CRC wrong: a torn write or damage.
    Invalid(&'static str),
}

/// Classifies a page slot; when valid, its entries are the bytes after [`PAGE_HEADER`].
pub fn decode_page(b: &[u8], index: u64) -> PageSlot {
    debug_assert_eq!(b.len(), PAGE_SIZE as usize);
    if b.iter().all(|&x| x == 0) {
        return PageSlot::Empty;
    }
    if b[0..4] != PAGE_MAGIC {
        return PageSlot::Invalid("bad page magic");
    }
    if u64::from(LE::read_u32(&b[4..8])) != index {
        return PageSlot::Invalid("page index does not match its position");
    }
    let stored = LE::read_u32(&b[16..20]);
    if stored != page_crc(b) {
        return PageSlot::Invalid("page CRC mismatch");
    }
    match LE::read_u64(&b[8..16]) {
        // The next flush would wrap to 0 and lose to the other slot.
        u64::MAX => PageSlot::Invalid("page sequence at its maximum"),
        sequence => PageSlot::Valid { sequence },
    }
}

/// Builds a page slot: header, then `entries` (the packed 2-bit map bytes).
pub fn encode_page(out: &mut [u8], index: u64, sequence: u64, entries: &[u8]) {
    out.fill(0);
    out[0..4].copy_from_slice(&PAGE_MAGIC);
    LE::write_u32(&mut out[4..8], index as u32);
    LE::write_u64(&mut out[8..16], sequence);
    out[PAGE_HEADER..PAGE_HEADER + entries.len()].copy_from_slice(entries);
    let crc = page_crc(out);
    LE::write_u32(&mut out[16..20], crc);
}

/// CRC over the page with its CRC field taken as zero.
fn page_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..16]);
    h.update(&[0; 4]);
    h.update(&b[20..]);
    h.finalize()
}

/// Streams the seal digest: identity, geometry, every block's state and, for data
/// blocks, the block's CRC. Computed when sealing, recomputed at open and by `check`.
pub struct DigestBuilder(crc32fast::Hasher);

impl DigestBuilder {
    /// Starts a digest for a layer.
    pub fn new(uuid: &Uuid, g: &Geometry) -> DigestBuilder {
        let mut h = crc32fast::Hasher::new();
        h.update(&uuid.0);
        h.update(&g.virtual_size.to_le_bytes());
        h.update(&g.block_size.to_le_bytes());
        DigestBuilder(h)
    }
    /// Adds the next block (blocks must come in order).
    pub fn block(&mut self, state: BlockState, crc: u32) {
        self.0.update(&[state as u8]);
        if state == BlockState::Data {
            self.0.update(&crc.to_le_bytes());
        }
    }
    /// Adds `n` absent blocks at once (their contribution is one zero byte each).
    pub fn absent(&mut self, mut n: u64) {
        const ZEROS: [u8; 1024] = [0; 1024];
        while n > 0 {
            let k = n.min(ZEROS.len() as u64);
            self.0.update(&ZEROS[..k as usize]);
            n -= k;
        }
    }
    /// The digest.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let g = Geometry::new(1 << 30, DEFAULT_BLOCK_SIZE).unwrap();
        let p = ParentRef {
            path: "base.cow".into(),
            uuid: Uuid::random(),
            digest: 7,
        };
        let h = Header::new(g, Uuid::random(), Some(p));
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn geometry_is_canonical() {
        let g = Geometry::new(10 << 20, 65536).unwrap();
        assert_eq!(g.blocks, 160);
        assert_eq!(g.map_pages, 1);
        assert_eq!(g.data_offset % 65536, 0);
        assert!(g.data_offset >= g.crc_offset + 640);
        assert!(Geometry::new(1 << 20, 3).is_err());
        assert!(Geometry::new(1 << 20, 0).is_err());
        assert!(Geometry::new(u64::MAX, 4096).is_err());
    }

    #[test]
    fn unknown_incompat_bit_is_named_by_number() {
        // Regression: incompatible bit 0 was reported as "block_crcs", the name of
        // compatible bit 0.
        let g = Geometry::new(1 << 20, DEFAULT_BLOCK_SIZE).unwrap();
        let mut b = Header::new(g, Uuid::random(), None).encode();
        LE::write_u64(&mut b[H_INCOMPAT..], 1);
        let crc = crc32fast::hash(&b[..H_CRC]);
        LE::write_u32(&mut b[H_CRC..], crc);
        assert_eq!(
            Header::decode(&b),
            Err(FormatError::UnknownIncompatFeatures("bit 0".into()))
        );
    }

    #[test]
    fn reference_syntax() {
        for bad in ["", "a\nb", "a//b", "x/", "a\0b"] {
            assert!(validate_reference(bad).is_err(), "{bad:?}");
        }
        // What these may reach is decided at open, by the identity check and image roots.
        for good in [
            "base.cow",
            "layers/base.cow",
            "../images/x",
            "/srv/images/x",
        ] {
            assert!(validate_reference(good).is_ok(), "{good:?}");
        }
    }
}
