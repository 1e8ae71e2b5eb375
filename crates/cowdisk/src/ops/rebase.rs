//! `rebase IMAGE --backing NEWPATH`: repoints the top's parent reference after the
//! parent file moved. The rules (same layer, digest verified, its own chain opens) are
//! the engine's: see [`cowdisk_core::rebase`].

use std::path::Path;

use cowdisk_core::{Header, ReferenceStyle};

use crate::error::Result;

/// Repoints the parent reference; returns the image's new header.
pub fn rebase(image: &Path, new_parent: &Path) -> Result<Header> {
    Ok(cowdisk_core::rebase(
        image,
        new_parent,
        ReferenceStyle::Relative,
        &crate::open_options(),
    )?)
}
