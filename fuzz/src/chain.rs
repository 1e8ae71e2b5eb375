//! F3: a chain of crafted layers, opened and read end to end on simulated storage.
//!
//! Input: `count:u8` (1 to 4 layers) then that many sparse images, bottom first. Each
//! layer's fix-ups run after the layer below is final, so [`image::FIX_LINK`] can
//! record the real identity of its parent. The chain opens read-only (or read-write with
//! flag bit 7 of the top) and is walked; the lower layers must not change.

use std::path::PathBuf;
use std::sync::Arc;

use cowdisk_core::sim::SimWorld;
use cowdisk_core::{Access, Disk, ReadStorage, Storage};

use crate::image;
use crate::input::Input;
use crate::walk::walk;

/// Most layers per input; four already reach every link rule and keep inputs small.
const MAX_LAYERS: usize = 4;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let count = usize::from(inp.u8()) % MAX_LAYERS + 1;
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut top_flags = 0;
    for _ in 0..count {
        let mut layer = image::decode(&mut inp);
        let below = files.last().and_then(|f| image::identity(f));
        image::fix(&mut layer.image, layer.flags, below);
        top_flags = layer.flags;
        files.push(layer.image);
    }
    let writable = top_flags & 0x80 != 0;
    let access = if writable {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let world = SimWorld::new();
    let mut storages: Vec<(Arc<dyn Storage>, PathBuf)> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let st: Arc<dyn Storage> = world.from_bytes(f.clone());
            (st, PathBuf::from(format!("l{i}")))
        })
        .collect();
    storages.reverse();
    let top = storages.remove(0);
    let lowers = storages
        .into_iter()
        .map(|(s, p)| (s as Arc<dyn ReadStorage>, p))
        .collect();
    if let Ok(disk) = Disk::open_storages(top, lowers, access) {
        walk(&disk, count, writable);
        drop(disk);
    }
    for (i, f) in files.iter().enumerate().take(count - 1) {
        assert!(world.live(i) == *f, "lower layer {i} changed");
    }
}
