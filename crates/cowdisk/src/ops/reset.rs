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
    let h = disk.top_header();
    let new = NewLayer {
        virtual_size: h.geometry.virtual_size,
        block_size: h.geometry.block_size,
        parent: h.parent.clone(),
    }
    .header(image)?;
    let tmp = write_temp_layer(image, &new, "reset")?;
    failpoint::hit("reset.after_temp");
    if let Err(e) = std::fs::rename(&tmp, image) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::os(image, "rename new top into place", e));
    }
    sync_folder(&folder_of(image))?;
    drop(disk);
    Ok(new)
}
