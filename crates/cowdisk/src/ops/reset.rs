//! `reset IMAGE`: replaces the top with a new empty layer over the same parent. The
//! new top is written and synced under a temp name, then renamed over IMAGE (atomic),
//! so a crash leaves the old top or the new one.

use std::path::Path;

use cowdisk_core::create::{sync_folder, write_temp_layer};
use cowdisk_core::folder_of;
use cowdisk_core::layer::NewLayer;
use cowdisk_core::{Disk, Header};

use crate::error::{Error, Result};
use crate::failpoint;

/// Discards the top's changes; returns the new top's header.
pub fn reset(image: &Path) -> Result<Header> {
    // Opening read-write takes the exclusive lock and validates the chain.
    let disk = Disk::open(image, &crate::open_options())?;
    let new = steps(&disk, image, &mut |_| Ok(()))?;
    drop(disk);
    Ok(new)
}

/// The steps of the module doc on `disk` (open from `image`). `before_rename` runs with
/// the complete new top under its temp name, just before the rename (a live reset opens
/// it there); if it fails, the temp file is removed and nothing changed.
pub(crate) fn steps(
    disk: &Disk,
    image: &Path,
    before_rename: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<Header> {
    let h = disk.top_header();
    let new = NewLayer {
        virtual_size: h.geometry.virtual_size,
        block_size: h.geometry.block_size,
        parent: h.parent.clone(),
    }
    .header(image)?;
    let tmp = write_temp_layer(image, &new, "reset")?;
    failpoint::hit("reset.after_temp");
    let res = before_rename(&tmp).and_then(|()| {
        std::fs::rename(&tmp, image).map_err(|e| Error::os(image, "rename new top into place", e))
    });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_folder(&folder_of(image))?;
    Ok(new)
}
