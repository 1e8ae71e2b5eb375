//! The layer object: one sealed layer as one immutable object, holding its metadata and
//! only the blocks it holds (REMOTE.md in this crate, byte by byte).
//!
//! ```text
//! 0       4096          8192         8192+E        +4D           data_offset
//! | object | layer      | map        | data-block  | pad to 4 KiB | block | block | ...
//! | header | header     | entries    | CRCs (u32)  |              |  (data blocks in block order)
//! ```
//!
//! Every length follows from the object header's fields, and the object's length must be
//! exactly what they imply, so nothing is allocated from a size that the object's real
//! length does not back.

use byteorder::{ByteOrder, LittleEndian as LE};
use cowdisk_core::format::{Geometry, Header, LayerState, Uuid, HEADER_SLOT};
use cowdisk_core::BlockState;

use crate::error::{RemoteError, Result};

/// Object magic.
pub const OBJECT_MAGIC: [u8; 8] = *b"CDLAYOBJ";
/// Layout version; another major is refused.
pub const OBJECT_MAJOR: u16 = 1;
/// Size of the object header.
pub const OBJECT_HEADER: u64 = 4096;
/// Where the metadata (layer header, entries, CRCs) starts.
pub const META_OFFSET: u64 = OBJECT_HEADER;
/// Metadata beyond this is refused: it is held in memory (8 bytes per data block).
pub const MAX_META: u64 = 256 << 20;
/// Name suffix of layer objects.
pub const SUFFIX: &str = ".cdlayer";

/// The content name of a layer's object: two pushes of one layer meet at one name.
pub fn object_name(uuid: &Uuid, digest: u32) -> String {
    format!("{uuid}-{digest:08x}{SUFFIX}")
}

/// The decoded, validated object header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHeader {
    /// The layer's UUID.
    pub uuid: Uuid,
    /// The layer's seal digest.
    pub seal_digest: u32,
    /// The layer's geometry.
    pub geometry: Geometry,
    /// Blocks the layer holds data for.
    pub data_blocks: u64,
    /// Bytes of metadata at [`META_OFFSET`].
    pub meta_len: u64,
    /// Where the first data block starts.
    pub data_offset: u64,
    /// The whole object's length.
    pub object_len: u64,
    /// CRC-32 of the metadata.
    pub meta_crc: u32,
}

/// Bytes of map entries for `blocks` blocks (2 bits each).
pub fn entries_len(blocks: u64) -> u64 {
    blocks.div_ceil(4)
}

impl ObjectHeader {
    /// The header for a layer with `data_blocks` data blocks, the last block of the disk
    /// among them or not (it may be short).
    pub fn new(h: &Header, data_blocks: u64, last_is_data: bool, meta_crc: u32) -> ObjectHeader {
        let g = h.geometry;
        let meta_len = HEADER_SLOT + entries_len(g.blocks) + 4 * data_blocks;
        let data_offset = (META_OFFSET + meta_len).div_ceil(4096) * 4096;
        let short = if last_is_data {
            u64::from(g.block_size) - g.block_len(g.blocks - 1) as u64
        } else {
            0
        };
        ObjectHeader {
            uuid: h.uuid,
            seal_digest: h.seal_digest,
            geometry: g,
            data_blocks,
            meta_len,
            data_offset,
            object_len: data_offset + data_blocks * u64::from(g.block_size) - short,
            meta_crc,
        }
    }

    /// Encodes into [`OBJECT_HEADER`] bytes, CRC last.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; OBJECT_HEADER as usize];
        b[0..8].copy_from_slice(&OBJECT_MAGIC);
        LE::write_u16(&mut b[8..10], OBJECT_MAJOR);
        LE::write_u32(&mut b[12..16], OBJECT_HEADER as u32);
        b[16..32].copy_from_slice(&self.uuid.0);
        LE::write_u32(&mut b[32..36], self.seal_digest);
        LE::write_u32(&mut b[36..40], self.geometry.block_size);
        LE::write_u64(&mut b[40..48], self.geometry.virtual_size);
        LE::write_u64(&mut b[48..56], self.data_blocks);
        LE::write_u64(&mut b[56..64], self.meta_len);
        LE::write_u64(&mut b[64..72], self.data_offset);
        LE::write_u64(&mut b[72..80], self.object_len);
        LE::write_u32(&mut b[80..84], self.meta_crc);
        let crc = crc32fast::hash(&b[..4092]);
        LE::write_u32(&mut b[4092..4096], crc);
        b
    }

    /// Decodes and validates `b` (the first [`OBJECT_HEADER`] bytes of an object whose
    /// length is `len`): magic, version, CRC, geometry, and every derived length.
    pub fn decode(b: &[u8], len: u64, object: &str) -> Result<ObjectHeader> {
        let bad = |r: &str| RemoteError::bad_object(object, r.to_string());
        if b.len() < OBJECT_HEADER as usize || b[0..8] != OBJECT_MAGIC {
            return Err(bad("not a cowdisk layer object (bad magic)"));
        }
        let major = LE::read_u16(&b[8..10]);
        if major != OBJECT_MAJOR {
            return Err(bad(&format!("unsupported layer object version {major}")));
        }
        if LE::read_u32(&b[4092..4096]) != crc32fast::hash(&b[..4092]) {
            return Err(bad("object header CRC mismatch (damaged object)"));
        }
        let geometry = Geometry::new(LE::read_u64(&b[40..48]), LE::read_u32(&b[36..40]))
            .map_err(|e| bad(&format!("object header: {e}")))?;
        let data_blocks = LE::read_u64(&b[48..56]);
        if data_blocks > geometry.blocks {
            return Err(bad(
                "object header field data_blocks exceeds the block count",
            ));
        }
        let found = ObjectHeader {
            uuid: Uuid(b[16..32].try_into().expect("16 bytes")),
            seal_digest: LE::read_u32(&b[32..36]),
            geometry,
            data_blocks,
            meta_len: LE::read_u64(&b[56..64]),
            data_offset: LE::read_u64(&b[64..72]),
            object_len: LE::read_u64(&b[72..80]),
            meta_crc: LE::read_u32(&b[80..84]),
        };
        let mut h = Header::new(geometry, found.uuid, None);
        h.seal_digest = found.seal_digest;
        // Only the disk's last block may be short, so the length tells whether it is data.
        let expect = [false, true]
            .map(|last| ObjectHeader::new(&h, data_blocks, last, found.meta_crc))
            .into_iter()
            .find(|e| e.object_len == found.object_len);
        match expect {
            Some(e) if e == found => {}
            _ => {
                return Err(bad(
                    "object header lengths are inconsistent (damaged object)",
                ))
            }
        }
        if found.meta_len > MAX_META {
            return Err(bad(
                "metadata larger than 256 MiB is refused (memory bound)",
            ));
        }
        if len != found.object_len {
            return Err(bad(&format!(
                "object is {len} bytes, its header says {} (truncated or replaced)",
                found.object_len
            )));
        }
        Ok(found)
    }
}

/// A layer's metadata as held in memory: its header, map entries, and for each data
/// block (in block order) its number and CRC.
#[derive(Debug, Clone)]
pub struct LayerMeta {
    /// The object header.
    pub object: ObjectHeader,
    /// The layer header slot as stored (the parent reference names the parent's object).
    pub header_slot: Vec<u8>,
    /// The decoded layer header.
    pub header: Header,
    /// Packed 2-bit map entries.
    pub entries: Vec<u8>,
    /// Data block numbers, ascending: the position is the block's rank in the object.
    pub data: Vec<u32>,
    /// Each data block's CRC, by rank.
    pub crcs: Vec<u32>,
}

/// The 2-bit state of block `b` in packed `entries`.
pub fn entry(entries: &[u8], b: u64) -> u8 {
    (entries[(b / 4) as usize] >> (2 * (b % 4))) & 3
}

impl LayerMeta {
    /// Encodes the metadata section for a layer (`header_slot` already rewritten).
    pub fn encode(header_slot: &[u8], entries: &[u8], crcs: &[u32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(header_slot.len() + entries.len() + 4 * crcs.len());
        m.extend_from_slice(header_slot);
        m.extend_from_slice(entries);
        for c in crcs {
            m.extend_from_slice(&c.to_le_bytes());
        }
        m
    }

    /// Decodes metadata `m` of the object described by `oh`: CRC, the layer header (the
    /// same layer as the object header says, sealed), entries, data ranks and CRCs.
    pub fn decode(oh: ObjectHeader, m: &[u8], object: &str) -> Result<LayerMeta> {
        let bad = |r: String| RemoteError::bad_object(object, r);
        if m.len() as u64 != oh.meta_len || crc32fast::hash(m) != oh.meta_crc {
            return Err(bad("metadata CRC mismatch (damaged object)".into()));
        }
        let slot = &m[..HEADER_SLOT as usize];
        let header = Header::decode(slot).map_err(|e| bad(format!("layer header: {e}")))?;
        if header.uuid != oh.uuid
            || header.seal_digest != oh.seal_digest
            || header.geometry != oh.geometry
        {
            return Err(bad(
                "layer header and object header describe different layers".into(),
            ));
        }
        if header.state != LayerState::Sealed {
            return Err(bad("layer is not sealed".into()));
        }
        let g = oh.geometry;
        let e_end = HEADER_SLOT as usize + entries_len(g.blocks) as usize;
        let entries = m[HEADER_SLOT as usize..e_end].to_vec();
        let mut data = Vec::with_capacity(oh.data_blocks as usize);
        for b in 0..g.blocks {
            match entry(&entries, b) {
                1 => data.push(b as u32),
                3 => return Err(bad(format!("map entry for block {b} is invalid"))),
                _ => {}
            }
        }
        for b in g.blocks..entries.len() as u64 * 4 {
            if entry(&entries, b) != 0 {
                return Err(bad("map entries set beyond the last block".into()));
            }
        }
        if data.len() as u64 != oh.data_blocks {
            return Err(bad(
                "map holds a different number of data blocks than the object".into(),
            ));
        }
        let last_is_data = data.last() == Some(&((g.blocks - 1) as u32));
        if ObjectHeader::new(&header, oh.data_blocks, last_is_data, oh.meta_crc).object_len
            != oh.object_len
        {
            return Err(bad("object length does not match its data blocks".into()));
        }
        let crcs = m[e_end..].chunks_exact(4).map(LE::read_u32).collect();
        Ok(LayerMeta {
            object: oh,
            header_slot: slot.to_vec(),
            header,
            entries,
            data,
            crcs,
        })
    }

    /// Block `b`'s state in this layer.
    pub fn state(&self, b: u64) -> BlockState {
        match entry(&self.entries, b) {
            1 => BlockState::Data,
            2 => BlockState::Zero,
            _ => BlockState::Absent,
        }
    }

    /// Block `b`'s rank among the data blocks, if it holds data.
    pub fn rank(&self, b: u64) -> Option<usize> {
        let b = u32::try_from(b).ok()?;
        self.data.binary_search(&b).ok()
    }

    /// Where the block of `rank` starts in the object, and its length.
    pub fn data_range(&self, rank: usize) -> (u64, usize) {
        let g = &self.object.geometry;
        let off = self.object.data_offset + rank as u64 * u64::from(g.block_size);
        (off, g.block_len(u64::from(self.data[rank])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowdisk_core::format::{Geometry, Header, LayerState, ParentRef, Uuid};

    /// A valid object header and metadata for a 1 MiB layer with blocks 0, 3 and the
    /// last (short: 1 MiB - 512 is not a block multiple) holding data, block 5 zero.
    fn sample() -> (Vec<u8>, Vec<u8>, u64) {
        let g = Geometry::new((1 << 20) - 512, 65536).unwrap();
        let mut h = Header::new(
            g,
            Uuid([7; 16]),
            Some(ParentRef {
                path: "parent.cdlayer".into(),
                uuid: Uuid([8; 16]),
                digest: 9,
            }),
        );
        h.state = LayerState::Sealed;
        h.seal_digest = 0x1234_5678;
        let mut entries = vec![0u8; entries_len(g.blocks) as usize];
        for (b, v) in [(0u64, 1u8), (3, 1), (5, 2), (g.blocks - 1, 1)] {
            entries[(b / 4) as usize] |= v << (2 * (b % 4));
        }
        let meta = LayerMeta::encode(&h.encode(), &entries, &[1, 2, 3]);
        let oh = ObjectHeader::new(&h, 3, true, crc32fast::hash(&meta));
        (oh.encode(), meta, oh.object_len)
    }

    #[test]
    fn round_trip() {
        let (oh, meta, len) = sample();
        let h = ObjectHeader::decode(&oh, len, "s3://b/x").unwrap();
        let m = LayerMeta::decode(h, &meta, "s3://b/x").unwrap();
        assert_eq!(m.data, [0, 3, 15]);
        assert_eq!(m.rank(3), Some(1));
        assert_eq!(m.state(5), BlockState::Zero);
        let (off, l) = m.data_range(2);
        assert_eq!(off + l as u64, len, "the short last block ends the object");
    }

    #[test]
    fn every_flipped_byte_and_wrong_length_is_a_clean_error() {
        let (oh, meta, len) = sample();
        for i in 0..oh.len() {
            let mut b = oh.clone();
            b[i] ^= 0x40;
            // Flips inside the CRC-covered range are caught; none may panic.
            if let Ok(h) = ObjectHeader::decode(&b, len, "s3://b/x") {
                let _ = LayerMeta::decode(h, &meta, "s3://b/x");
            }
            assert!(
                ObjectHeader::decode(&b, len, "s3://b/x").is_err(),
                "byte {i}"
            );
        }
        for l in [0, 1, len - 1, len + 1, u64::MAX] {
            assert!(
                ObjectHeader::decode(&oh, l, "s3://b/x").is_err(),
                "length {l}"
            );
        }
        let h = ObjectHeader::decode(&oh, len, "s3://b/x").unwrap();
        for i in (0..meta.len()).step_by(7) {
            let mut m = meta.clone();
            m[i] ^= 1;
            let e = LayerMeta::decode(h.clone(), &m, "s3://b/x")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("s3://b/x: "), "{e}");
        }
        assert!(LayerMeta::decode(h.clone(), &meta[..meta.len() - 1], "s3://b/x").is_err());
        // A short buffer or foreign bytes.
        assert!(ObjectHeader::decode(&oh[..100], len, "s3://b/x").is_err());
        assert!(ObjectHeader::decode(&[0xff; 4096], len, "s3://b/x").is_err());
    }
}
