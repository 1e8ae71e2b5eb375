//! Map page slots and the seal digest (FORMAT.md §Allocation map, §Block CRCs).

use byteorder::{ByteOrder, LittleEndian as LE};

use super::*;

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
    decode_slot(b, index, PAGE_MAGIC)
}

/// Classifies a partial-block bitmap page slot (the map page layout, magic `CDSB`).
pub fn decode_sub_page(b: &[u8], index: u64) -> PageSlot {
    decode_slot(b, index, SUB_PAGE_MAGIC)
}

/// Builds a partial-block bitmap page slot: header, then `bitmaps` (a `u32` per block).
pub fn encode_sub_page(out: &mut [u8], index: u64, sequence: u64, bitmaps: &[u8]) {
    encode_slot(out, index, sequence, bitmaps, SUB_PAGE_MAGIC)
}

fn decode_slot(b: &[u8], index: u64, magic: [u8; 4]) -> PageSlot {
    debug_assert_eq!(b.len(), PAGE_SIZE as usize);
    if b.iter().all(|&x| x == 0) {
        return PageSlot::Empty;
    }
    if b[0..4] != magic {
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
    encode_slot(out, index, sequence, entries, PAGE_MAGIC)
}

fn encode_slot(out: &mut [u8], index: u64, sequence: u64, entries: &[u8], magic: [u8; 4]) {
    out.fill(0);
    out[0..4].copy_from_slice(&magic);
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
    /// Adds `n` absent blocks at once (their contribution is one zero byte each), in
    /// time logarithmic in `n`: a huge empty layer costs no more to seal or open.
    pub fn absent(&mut self, n: u64) {
        static ZEROS: std::sync::OnceLock<Vec<crc32fast::Hasher>> = std::sync::OnceLock::new();
        // ZEROS[k]: a hasher fed 2^k zero bytes.
        let zeros = ZEROS.get_or_init(|| {
            let mut one = crc32fast::Hasher::new();
            one.update(&[0]);
            let mut v = vec![one];
            for k in 1..64 {
                let mut h = v[k - 1].clone();
                h.combine(&v[k - 1]);
                v.push(h);
            }
            v
        });
        for (k, z) in zeros.iter().enumerate() {
            if n >> k & 1 == 1 {
                self.0.combine(z);
            }
        }
    }
    /// The digest.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}
