//! Rolls an interrupted snapshot forward or back.
//!
//! A snapshot of `IMAGE` into `SNAP` goes: write the new top as `.IMAGE.pending-snapshot`
//! (parent = `SNAP`, expecting IMAGE's UUID and seal digest), sync; seal `IMAGE`;
//! hard-link `IMAGE` to `SNAP`; rename the pending file over `IMAGE`. The seal is the
//! commit point: if `IMAGE` is sealed with the UUID and digest the pending file
//! expects, the snapshot is completed (link, rename); otherwise the pending file is
//! deleted and `IMAGE` is as it was. Stray temp files of `reset` and `squash` are
//! removed too. Nothing is done while another process holds `IMAGE`'s lock.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cowdisk_core::create::sync_folder;
use cowdisk_core::folder_of;
use cowdisk_core::format::INCOMPAT_FLUSH_JOURNAL;
use cowdisk_core::layer::read_header;
use cowdisk_core::open_layer_file;
use cowdisk_core::{Access, Disk, FileStorage, LayerState, OpenError};

use super::{exists, file_name, pending_snapshot_path};
use crate::error::{Error, Result};

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was pending.
    Nothing,
    /// An interrupted snapshot was completed; the snapshot file is named.
    RolledForward(PathBuf),
    /// An interrupted snapshot was undone.
    RolledBack,
    /// Only stray temp files were removed.
    Cleaned,
    /// Another process holds the image; left alone.
    Busy,
}

fn stray_temps(image: &Path) -> Vec<PathBuf> {
    let name = file_name(image);
    let Ok(rd) = std::fs::read_dir(folder_of(image)) else {
        return Vec::new();
    };
    let prefixes = [format!(".{name}.reset-"), format!(".{name}.squash-")];
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.ends_with(".tmp") && prefixes.iter().any(|p| n.starts_with(p.as_str())))
                .then(|| e.path())
        })
        .collect()
}

/// Replays the flush journal a crash left beside `image` (`serve --flush-journal`): a
/// writable open does it and retires the journal, whose file then goes. Returns the
/// journal replayed, `None` if there was nothing to replay or another process holds the
/// image (its server replays at its own open). Cheap when there is no journal file.
pub fn replay_journal(image: &Path) -> Result<Option<PathBuf>> {
    let journal = cowdisk_core::journal_path(image);
    if !exists(&journal) {
        return Ok(None);
    }
    let live = std::fs::File::open(image)
        .ok()
        .and_then(|f| read_header(&FileStorage::new(f), image).ok())
        .is_some_and(|l| l.header.incompat & INCOMPAT_FLUSH_JOURNAL != 0);
    if !live {
        return Ok(None);
    }
    match Disk::open(image, &crate::open_options()) {
        Ok(d) => drop(d),
        Err(OpenError::Locked { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    std::fs::remove_file(&journal).map_err(|e| Error::os(&journal, "remove", e))?;
    Ok(Some(journal))
}

/// Finishes or undoes an interrupted snapshot of `image` and removes stray temp
/// files. Cheap when nothing is pending (a stat and a folder listing, no lock).
pub fn recover(image: &Path) -> Result<Recovery> {
    let pending = pending_snapshot_path(image);
    let temps = stray_temps(image);
    if !exists(&pending) && temps.is_empty() {
        return Ok(Recovery::Nothing);
    }
    if !exists(image) {
        return Ok(Recovery::Nothing);
    }
    let (file, _) = match open_layer_file(image, Access::ReadWrite, true) {
        Ok(x) => x,
        Err(OpenError::Locked { .. }) => return Ok(Recovery::Busy),
        Err(e) => return Err(e.into()),
    };
    // Holding the lock: nobody else is mid-operation on this image.
    for t in stray_temps(image) {
        let _ = std::fs::remove_file(t);
    }
    if !exists(&pending) {
        return Ok(Recovery::Cleaned);
    }
    let st = FileStorage::new(file);
    let img = read_header(&st, image)?.header;
    let dir = folder_of(image);
    let pend = std::fs::File::open(&pending)
        .map_err(|e| Error::os(&pending, "open", e))
        .and_then(|f| Ok(read_header(&FileStorage::new(f), &pending)?.header));
    let forward = match &pend {
        Ok(p) => {
            img.state == LayerState::Sealed
                && p.parent
                    .as_ref()
                    .is_some_and(|r| r.uuid == img.uuid && r.digest == img.seal_digest)
        }
        Err(_) => false,
    };
    if !forward {
        if img.state == LayerState::Sealed {
            if let Err(e) = &pend {
                // The pending top was synced before the seal, so this is damage, not a crash.
                return Err(Error::invalid(
                    image,
                    format!(
                        "sealed with an unreadable pending snapshot top {}: {e}",
                        pending.display()
                    ),
                ));
            }
        }
        std::fs::remove_file(&pending).map_err(|e| Error::os(&pending, "remove", e))?;
        sync_folder(&dir)?;
        return Ok(Recovery::RolledBack);
    }
    let Some(pref) = pend.ok().and_then(|p| p.parent) else {
        return Err(Error::invalid(
            image,
            "pending snapshot vanished during recovery",
        ));
    };
    let snap = dir.join(&pref.path);
    let img_meta = st
        .file()
        .metadata()
        .map_err(|e| Error::os(image, "stat", e))?;
    match snap.symlink_metadata() {
        Ok(m) if m.dev() == img_meta.dev() && m.ino() == img_meta.ino() => {}
        Ok(_) => {
            return Err(Error::invalid(
                &snap,
                format!(
                    "exists but is not the sealed {}; cannot complete the interrupted snapshot",
                    image.display()
                ),
            ))
        }
        Err(_) => {
            std::fs::hard_link(image, &snap).map_err(|e| Error::os(&snap, "link snapshot", e))?;
            sync_folder(&folder_of(&snap))?;
        }
    }
    std::fs::rename(&pending, image)
        .map_err(|e| Error::os(image, "rename new top into place", e))?;
    sync_folder(&dir)?;
    Ok(Recovery::RolledForward(snap))
}
