//! Crash-safe layer operations. Each one writes new files under temporary names,
//! syncs them, and makes the change visible with one atomic step (a rename or an A/B
//! header replace), so a crash leaves the old chain or the new one, never a mix.
//! [`recover()`] finishes or undoes a snapshot interrupted between its steps; run it
//! before opening an image.

pub mod builder;
pub mod rebase;
pub mod recover;
pub mod reset;
pub mod snapshot;
pub mod squash;
pub mod temp;

use std::path::{Path, PathBuf};

use cowdisk_core::folder_of;

pub use recover::{recover, replay_journal, Recovery};

/// The deterministic name of a snapshot's new top while it is being installed:
/// `.NAME.pending-snapshot` beside the image.
pub fn pending_snapshot_path(image: &Path) -> PathBuf {
    folder_of(image).join(format!(".{}.pending-snapshot", file_name(image)))
}

/// The file name of `path` (lossy), for building sibling names.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// True if something exists at `path` (a dangling symlink counts).
pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}
