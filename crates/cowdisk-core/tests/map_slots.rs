//! Damaged map slots as `AllocMap::load` reports them (FORMAT.md, "Damaged slots"): only a
//! slot that claims exactly the predecessor of the sequence in use is provably the older
//! copy; any other damaged slot may hold a newer flush, and the entries it records beyond
//! the slot in use are listed when its header is intact.

mod common;

use std::path::Path;

use common::*;
use cowdisk_core::layer::load_map;
use cowdisk_core::sim::SimWorld;
use cowdisk_core::{Access, BlockState, Geometry, SlotFinding, WriteFlags};

const BS: u32 = 4096;
const SIZE: u64 = 20 * BS as u64;

/// Two flushes: slot A (sequence 1) holds data in blocks 0-2; slot B (sequence 2) also in
/// block 5, and block 1 became a whiteout.
fn image() -> Vec<u8> {
    let world = SimWorld::new();
    let chain = SimChain::new(world.clone(), SIZE, BS);
    let d = chain.open(Access::ReadWrite);
    d.write(0, &[0x11; 3 * BS as usize], WriteFlags::default())
        .unwrap();
    d.flush().unwrap();
    d.write(
        5 * u64::from(BS),
        &[0x22; BS as usize],
        WriteFlags::default(),
    )
    .unwrap();
    d.discard(u64::from(BS), u64::from(BS), WriteFlags::default())
        .unwrap();
    d.flush().unwrap();
    drop(d);
    world.live(0)
}

/// The one slot finding of `img`.
fn finding(img: Vec<u8>) -> SlotFinding {
    let st = Frozen::whole(img);
    let g = Geometry::new(SIZE, BS).unwrap();
    let (_, mut f) = load_map(&*st, Path::new("img"), &g).unwrap();
    assert_eq!(f.len(), 1, "{f:?}");
    f.remove(0)
}

#[test]
fn newest_slot_damaged_after_its_flush() {
    let img = image();
    assert_eq!(active_page_slot(&img, 0), 1);
    let mut b = img.clone();
    b[page_offset(0, 1) + 16] ^= 1; // one bit of the CRC field
    let f = finding(b);
    assert_eq!((f.page, f.slot), (0, 1));
    assert!(f.maybe_newer);
    assert_eq!(f.claimed_sequence, Some(2));
    assert_eq!(f.current_sequence, Some(1));
    let e = f.beyond_current.unwrap();
    assert_eq!((e.data, e.zero), (1, 1));
    assert_eq!(e.examples, [(1, BlockState::Zero), (5, BlockState::Data)]);

    // Its header unreadable: still possibly newer, nothing listed.
    let mut b = img.clone();
    b[page_offset(0, 1)] ^= 1;
    let f = finding(b);
    assert!(f.maybe_newer);
    assert_eq!((f.claimed_sequence, f.beyond_current), (None, None));
}

#[test]
fn older_slot_damaged_is_provably_older() {
    let img = image();
    let mut b = img.clone();
    b[page_offset(0, 0) + 100] ^= 1; // an entry byte: the sequence stays readable
    let f = finding(b);
    assert_eq!(f.slot, 0);
    assert!(!f.maybe_newer);
    assert_eq!((f.claimed_sequence, f.current_sequence), (Some(1), Some(2)));

    // Damage in the older slot's sequence field: it can no longer be shown older.
    let mut b = img.clone();
    b[page_offset(0, 0) + 8] ^= 4;
    assert!(finding(b).maybe_newer);
}
