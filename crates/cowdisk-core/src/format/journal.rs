//! Flush-journal records (FORMAT.md §Flush journal). The journal is a side file,
//! `TOP.journal`, written from offset 0 in batches, one per flush: records back to
//! back, each a 64-byte header followed by `len` bytes of data, the batch padded with
//! zeros to a multiple of [`BATCH_ALIGN`] (a torn write of the next batch then cannot
//! reach a sector of this one). A record counts only if it carries the top's UUID,
//! the epoch (the generation of the header that set `INCOMPAT_FLUSH_JOURNAL`), the next
//! sequence number and a CRC over header and data: the first record that fails ends the
//! journal, so a torn tail and a previous epoch's leftovers are never replayed.

use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::Uuid;

/// Record magic.
pub const RECORD_MAGIC: [u8; 4] = *b"CDJR";
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 64;
/// Every batch starts at a multiple of this.
pub const BATCH_ALIGN: u64 = 4096;

const R_MAGIC: usize = 0;
const R_KIND: usize = 4;
const R_UUID: usize = 8;
const R_EPOCH: usize = 24;
const R_SEQ: usize = 32;
const R_BLOCK: usize = 40;
const R_OFFSET: usize = 48;
const R_LEN: usize = 52;
const R_BITS: usize = 56;
const R_CRC: usize = 60;

/// What a record's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Bytes `offset..offset + len` of a data block.
    Data,
    /// Whole sub-blocks of a partial block: those in `bits` hold data (the others in
    /// the range are filler and are not replayed), and become part of its bitmap.
    Partial,
}

/// One record's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The top layer's UUID.
    pub uuid: Uuid,
    /// The header generation that opened this journal epoch.
    pub epoch: u64,
    /// 0 for the epoch's first record, then one more each.
    pub seq: u64,
    /// The block the data belongs to.
    pub block: u64,
    /// Data or partial.
    pub kind: RecordKind,
    /// Byte offset within the block.
    pub offset: u32,
    /// Bytes of data following the header.
    pub len: u32,
    /// Partial: the sub-blocks of the range the record holds (0 for data).
    pub bits: u32,
}

impl Record {
    /// Encodes the header with the CRC over it and `data` (which must be `len` bytes).
    pub fn encode(&self, data: &[u8]) -> [u8; RECORD_HEADER] {
        debug_assert_eq!(data.len(), self.len as usize);
        let mut b = [0u8; RECORD_HEADER];
        b[R_MAGIC..R_MAGIC + 4].copy_from_slice(&RECORD_MAGIC);
        b[R_KIND] = match self.kind {
            RecordKind::Data => 1,
            RecordKind::Partial => 2,
        };
        b[R_UUID..R_UUID + 16].copy_from_slice(&self.uuid.0);
        LE::write_u64(&mut b[R_EPOCH..], self.epoch);
        LE::write_u64(&mut b[R_SEQ..], self.seq);
        LE::write_u64(&mut b[R_BLOCK..], self.block);
        LE::write_u32(&mut b[R_OFFSET..], self.offset);
        LE::write_u32(&mut b[R_LEN..], self.len);
        LE::write_u32(&mut b[R_BITS..], self.bits);
        let crc = record_crc(&b, data);
        LE::write_u32(&mut b[R_CRC..], crc);
        b
    }

    /// Decodes a header's fields, or `None` if it is not a record (bad magic or kind,
    /// non-zero reserved bytes). The CRC is checked once the data is read:
    /// [`Record::verify`].
    pub fn decode(b: &[u8; RECORD_HEADER]) -> Option<Record> {
        if b[R_MAGIC..R_MAGIC + 4] != RECORD_MAGIC || b[R_KIND + 1..R_UUID] != [0; 3] {
            return None;
        }
        let kind = match b[R_KIND] {
            1 => RecordKind::Data,
            2 => RecordKind::Partial,
            _ => return None,
        };
        let mut uuid = Uuid::default();
        uuid.0.copy_from_slice(&b[R_UUID..R_UUID + 16]);
        Some(Record {
            uuid,
            epoch: LE::read_u64(&b[R_EPOCH..]),
            seq: LE::read_u64(&b[R_SEQ..]),
            block: LE::read_u64(&b[R_BLOCK..]),
            kind,
            offset: LE::read_u32(&b[R_OFFSET..]),
            len: LE::read_u32(&b[R_LEN..]),
            bits: LE::read_u32(&b[R_BITS..]),
        })
    }

    /// True if the header's CRC matches it and `data`.
    pub fn verify(b: &[u8; RECORD_HEADER], data: &[u8]) -> bool {
        LE::read_u32(&b[R_CRC..]) == record_crc(b, data)
    }
}

/// The journal file of the top at `top`: its path with `.journal` appended.
pub fn journal_path(top: &Path) -> PathBuf {
    let mut p = top.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

fn record_crc(b: &[u8; RECORD_HEADER], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..R_CRC]);
    h.update(data);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            uuid: Uuid([7; 16]),
            epoch: 9,
            seq: 3,
            block: 1 << 40,
            kind: RecordKind::Partial,
            offset: 4096,
            len: 8,
            bits: 0b10,
        }
    }

    #[test]
    fn round_trip_and_crc_covers_data() {
        let r = rec();
        let data = [5u8; 8];
        let b = r.encode(&data);
        assert_eq!(Record::decode(&b), Some(r));
        assert!(Record::verify(&b, &data));
        assert!(!Record::verify(&b, &[5, 5, 5, 5, 5, 5, 5, 4]));
        let mut bad = b;
        bad[R_SEQ] ^= 1;
        assert!(!Record::verify(&bad, &data));
    }

    #[test]
    fn zeros_and_unknown_kinds_are_not_records() {
        assert_eq!(Record::decode(&[0; RECORD_HEADER]), None);
        let mut b = rec().encode(&[0; 8]);
        b[R_KIND] = 3;
        assert_eq!(Record::decode(&b), None);
        let mut b = rec().encode(&[0; 8]);
        b[R_KIND + 1] = 1;
        assert_eq!(Record::decode(&b), None);
    }
}
