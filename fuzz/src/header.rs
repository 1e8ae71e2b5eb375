//! F1: one header slot through `Header::decode`.
//!
//! Input: `flags:u8` then the slot's bytes (zero-padded to 4096). Flag bit 0 re-seals
//! the slot's CRC so mutations reach the field checks; the unpadded bytes are also
//! decoded as they are, for the truncated and bad-CRC paths.

use cowdisk_core::format::{validate_reference, Header, HEADER_SLOT, MAX_PARENT_PATH};

use crate::input::Input;

const SLOT: usize = HEADER_SLOT as usize;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let raw = inp.rest();
    if let Ok(h) = Header::decode(raw) {
        check(&h);
    }
    let mut slot = raw[..raw.len().min(SLOT)].to_vec();
    slot.resize(SLOT, 0);
    if flags & 1 != 0 {
        let crc = crc32fast::hash(&slot[..SLOT - 4]);
        slot[SLOT - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(h) = Header::decode(&slot) {
        check(&h);
    }
}

/// What a decoded header promises the rest of the engine.
fn check(h: &Header) {
    let g = &h.geometry;
    let bs = u64::from(g.block_size);
    assert!(g.block_size.is_power_of_two());
    assert!(
        g.blocks > 0
            && g.blocks
                .checked_mul(bs)
                .is_some_and(|n| n >= g.virtual_size)
    );
    assert!(g
        .crc_offset
        .checked_add(g.blocks * 4)
        .is_some_and(|e| e <= g.data_offset));
    let last = g.block_offset(g.blocks - 1);
    assert_eq!(
        last.checked_add(bs),
        Some(g.data_end()),
        "blocks end at the data area's end"
    );
    assert_eq!(
        g.data_end().checked_add(g.sub_pages * 8192),
        Some(g.file_len()),
        "the bitmap pages end at the file's end"
    );
    assert!(g.block_len(g.blocks - 1) > 0);
    if let Some(p) = &h.parent {
        assert!(p.path.len() <= MAX_PARENT_PATH);
        assert_eq!(validate_reference(&p.path), Ok(()));
    }
    let again = Header::decode(&h.encode()).expect("an encoded header decodes");
    assert_eq!(&again, h, "decode(encode(h)) == h");
}
