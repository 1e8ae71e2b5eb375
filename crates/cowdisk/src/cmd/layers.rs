//! `snapshot`, `reset`, `rebase`, `squash`: thin wrappers over [`crate::ops`] that
//! report what was done.

use std::path::Path;

use crate::error::Result;
use crate::ops;
use crate::output::print_lines;

/// `snapshot IMAGE SNAPSHOT`.
pub fn snapshot(image: &Path, snap: &Path) -> Result<()> {
    ops::snapshot::snapshot(image, snap)?;
    print_lines(&[format!(
        "Snapshot {} taken; {} continues over it",
        snap.display(),
        image.display()
    )]);
    Ok(())
}

/// `reset IMAGE`.
pub fn reset(image: &Path) -> Result<()> {
    ops::reset::reset(image)?;
    print_lines(&[format!(
        "Reset {}: its changes were discarded",
        image.display()
    )]);
    Ok(())
}

/// `rebase IMAGE --backing NEWPATH`.
pub fn rebase(image: &Path, backing: &Path) -> Result<()> {
    ops::rebase::rebase(image, backing)?;
    print_lines(&[format!(
        "Rebased {} onto {}",
        image.display(),
        backing.display()
    )]);
    Ok(())
}

/// `squash IMAGE [--layers N]`.
pub fn squash(image: &Path, layers: Option<u32>, show: bool) -> Result<()> {
    let s = ops::squash::squash(image, layers, show)?;
    print_lines(&[format!(
        "Squashed {} layer(s) below {} into {}; the old layer files were not changed",
        s.merged,
        image.display(),
        s.path.display()
    )]);
    Ok(())
}
