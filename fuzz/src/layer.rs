//! F2: map pages and a whole layer opened from bytes.
//!
//! Input: one sparse layer image ([`crate::image::decode`]). Its map page slots go
//! through `decode_page`; then the file is opened as a one-layer chain on simulated
//! storage, read-only, and (flag bit 7) read-write, and walked.

use std::path::PathBuf;
use std::sync::Arc;

use cowdisk_core::format::{decode_page, PageSlot, PAGE_MAGIC, PAGE_SIZE};
use cowdisk_core::sim::SimWorld;
use cowdisk_core::{Access, Disk, Storage};

use crate::image;
use crate::input::Input;
use crate::walk::walk;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut layer = image::decode(&mut inp);
    image::fix(&mut layer.image, layer.flags, None);
    pages(&layer.image);
    let writable = layer.flags & 0x80 != 0;
    let access = if writable {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let world = SimWorld::new();
    let st: Arc<dyn Storage> = world.from_bytes(layer.image);
    if let Ok(disk) = Disk::open_storages((st, PathBuf::from("top")), Vec::new(), access) {
        walk(&disk, 1, writable);
    }
}

/// Every 4 KiB page after the header slots, decoded at its position's index.
fn pages(image: &[u8]) {
    let page = PAGE_SIZE as usize;
    for (i, b) in image.chunks_exact(page).enumerate().skip(2) {
        let index = (i as u64 - 2) / 2;
        let slot = decode_page(b, index);
        if b[0..4] != PAGE_MAGIC {
            assert!(
                !matches!(slot, PageSlot::Valid { .. }),
                "no magic, not valid"
            );
        }
        if b.iter().all(|&x| x == 0) {
            assert_eq!(slot, PageSlot::Empty);
        }
    }
}
