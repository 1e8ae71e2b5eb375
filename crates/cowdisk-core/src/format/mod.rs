//! The on-disk layer format, v1: the byte offsets and encodings of headers and map pages.
//!
//! Every integer is little-endian (byteorder `LittleEndian`); nothing depends on the
//! host's endianness or word size. `FORMAT.md` beside this crate is the byte-level
//! spec; the constants below mirror it one to one.
//!
//! ```text
//! 0        4096       8192                 crc_offset        data_offset
//! | hdr A  | hdr B    | map pages (A,B)... | block CRCs ...   | block 0 | block 1 | ...
//! ```

use crate::error::FormatError;

mod header;
pub mod journal;
mod page;

pub use header::{validate_reference, Header};
pub use page::{
    decode_page, decode_sub_page, encode_page, encode_sub_page, DigestBuilder, PageSlot,
};

/// File magic, first 8 bytes of each header slot.
pub const MAGIC: [u8; 8] = *b"COWDISK\0";
/// Major version: a different major is refused.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version: higher minors are accepted (they only add compatible features).
pub const VERSION_MINOR: u16 = 1;

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
const H_DATA_OFFSET: usize = 112;
const H_SEAL_DIGEST: usize = 120;
const H_PARENT_UUID: usize = 128;
const H_PARENT_DIGEST: usize = 144;
const H_PARENT_LEN: usize = 148;
const H_PARENT_PATH: usize = 152;
const H_CRC: usize = HEADER_SLOT as usize - 4;

/// Incompatible feature bits this version understands: an image with any other bit set
/// is refused, because reading it without the feature would be wrong.
pub const SUPPORTED_INCOMPAT: u64 = INCOMPAT_FLUSH_JOURNAL;
/// Incompatible feature: flushes acknowledged since the top's last full flush live in
/// its flush journal (`TOP.journal`, FORMAT.md §Flush journal) until a writable open
/// replays them. Set only while the journal holds records of this header's generation.
pub const INCOMPAT_FLUSH_JOURNAL: u64 = 1;
/// Compatible feature: the sealed layer carries per-block CRC32s of its data.
pub const COMPAT_BLOCK_CRCS: u64 = 1;
/// Compatible feature (1.1): the file ends in A/B pages of partial-block bitmaps, after
/// the data area. Readers without it ignore the area; a top that holds partial blocks
/// has map entries of value 3, which they refuse.
pub const COMPAT_SUB_BLOCKS: u64 = 2;
/// Partial-block bitmap page magic.
pub const SUB_PAGE_MAGIC: [u8; 4] = *b"CDSB";
/// Bitmaps (one `u32` per block) per bitmap page.
pub const SUB_PER_PAGE: u64 = (PAGE_SIZE - PAGE_HEADER as u64) / 4;
/// Names of known incompatible feature bits, for error messages. Compatible bits have
/// their own namespace: bit 0 here is not `COMPAT_BLOCK_CRCS`.
const INCOMPAT_FEATURE_NAMES: &[(u64, &str)] = &[(INCOMPAT_FLUSH_JOURNAL, "flush_journal")];

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
    /// Partial-block bitmap pages after the data area, each with an A and a B slot
    /// (0 without [`COMPAT_SUB_BLOCKS`]).
    pub sub_pages: u64,
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
            sub_pages: 0,
        })
    }
    /// The same layout with the partial-block bitmap area ([`COMPAT_SUB_BLOCKS`]).
    pub fn with_sub_blocks(mut self) -> Geometry {
        self.sub_pages = self.blocks.div_ceil(SUB_PER_PAGE);
        self
    }
    /// The same layout without it.
    pub fn without_sub_blocks(mut self) -> Geometry {
        self.sub_pages = 0;
        self
    }
    /// The end of the data area.
    pub fn data_end(&self) -> u64 {
        self.data_offset + self.blocks * u64::from(self.block_size)
    }
    /// The length every layer file of this geometry has.
    pub fn file_len(&self) -> u64 {
        self.data_end() + self.sub_pages * 2 * PAGE_SIZE
    }
    /// File offset of bitmap page `p`, slot `s` (0 = A, 1 = B).
    pub fn sub_page_offset(&self, p: u64, s: usize) -> u64 {
        self.data_end() + (p * 2 + s as u64) * PAGE_SIZE
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
    /// Bytes of one sub-block, the unit a partial block holds: 4 KiB, or a 32nd of a
    /// block larger than 128 KiB (its bitmap is one `u32`).
    pub fn sub_size(&self) -> usize {
        (self.block_size as usize / 32).max(MIN_BLOCK_SIZE as usize)
    }
    /// The bitmap of a partial block `b` holding every one of its sub-blocks.
    pub fn sub_full(&self, b: u64) -> u32 {
        let n = self.block_len(b).div_ceil(self.sub_size());
        if n >= 32 {
            u32::MAX
        } else {
            (1u32 << n) - 1
        }
    }
    /// File offset of map page `p`, slot `s` (0 = A, 1 = B).
    pub fn page_offset(&self, p: u64, s: usize) -> u64 {
        MAP_OFFSET + (p * 2 + s as u64) * PAGE_SIZE
    }
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
    /// Writable tops only (format 1.1): this layer holds the sub-blocks its bitmap names
    /// (stored in the block's CRC entry); the rest fall through to the layer below.
    Partial = 3,
}

#[cfg(test)]
mod tests {
    use super::header::*;
    use super::*;
    use byteorder::{ByteOrder, LittleEndian as LE};

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
        LE::write_u64(&mut b[H_INCOMPAT..], 2);
        let crc = crc32fast::hash(&b[..H_CRC]);
        LE::write_u32(&mut b[H_CRC..], crc);
        assert_eq!(
            Header::decode(&b),
            Err(FormatError::UnknownIncompatFeatures("bit 1".into()))
        );
    }

    #[test]
    fn absent_runs_digest_as_zero_bytes() {
        for n in [0u64, 1, 31, 32, 1000, 4097, 100_003] {
            let g = Geometry::new(1 << 20, 4096).unwrap();
            let mut a = DigestBuilder::new(&Uuid([3; 16]), &g);
            let mut b = DigestBuilder::new(&Uuid([3; 16]), &g);
            a.absent(n);
            for _ in 0..n {
                b.block(BlockState::Absent, 0);
            }
            assert_eq!(a.finish(), b.finish(), "{n}");
        }
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
