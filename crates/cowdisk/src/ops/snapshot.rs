//! `snapshot IMAGE SNAP`: IMAGE's content becomes the sealed layer SNAP and IMAGE
//! continues as a fresh empty top over it, under the same path.
//!
//! Steps (each durable before the next; [`super::recover()`] completes or undoes them):
//! 1. flush IMAGE; compute its block CRCs and seal digest (`Disk::prepare_seal`);
//! 2. write the new top to `.IMAGE.pending-snapshot` (parent = SNAP with IMAGE's UUID
//!    and that digest), sync it and the folder;
//! 3. seal IMAGE (`Disk::commit_seal`, an atomic A/B header replace): the commit point;
//! 4. hard-link IMAGE to SNAP, sync the folder;
//! 5. rename the pending file over IMAGE, sync the folder.

use std::path::{Path, PathBuf};

use cowdisk_core::create::{reference_for, sync_folder};
use cowdisk_core::layer::{create_on, NewLayer};
use cowdisk_core::{folder_of, Disk, FileStorage, Header, ParentRef, ReferenceStyle};

use super::{exists, pending_snapshot_path, recover};
use crate::error::{Error, Result};
use crate::failpoint;

/// What a snapshot made.
#[derive(Debug)]
pub struct Snapshotted {
    /// The sealed layer, now at SNAP (the image's old top, sealed).
    pub sealed: Header,
    /// The image's new empty writable top.
    pub top: Header,
}

/// Takes the snapshot. On failure the image is left as it was (or, after the commit
/// point, the snapshot is completed by recovery).
pub fn snapshot(image: &Path, snap: &Path) -> Result<Snapshotted> {
    if exists(snap) {
        return Err(Error::invalid(snap, "already exists"));
    }
    let disk = Disk::open(image, &crate::open_options())?;
    let (reference, pending) = plan(&disk, image, snap)?;
    let res = steps(&disk, image, snap, &pending, reference, &mut || Ok(()));
    drop(disk);
    if res.is_err() && exists(&pending) {
        // Roll back, or forward if the seal made it: the chain stays consistent.
        let _ = recover(image);
    }
    res
}

/// Checks that `snap` can be taken of `image` (open as `disk`); returns the parent
/// reference the new top records and the pending top's path. Changes nothing.
pub(crate) fn plan(disk: &Disk, image: &Path, snap: &Path) -> Result<(String, PathBuf)> {
    if exists(snap) {
        return Err(Error::invalid(snap, "already exists"));
    }
    let reference = reference_for(image, snap, ReferenceStyle::Relative)?;
    let pending = pending_snapshot_path(image);
    if disk.depth() > 1
        && folder_of(image).canonicalize().ok() != folder_of(snap).canonicalize().ok()
    {
        // SNAP is a hard link of IMAGE, so it keeps IMAGE's parent reference, which may be
        // relative to IMAGE's folder: from another folder it would not resolve.
        return Err(Error::invalid(
            snap,
            "must be in the same folder as the image, whose parent reference is relative to it",
        ));
    }
    if exists(&pending) {
        return Err(Error::invalid(
            &pending,
            "a snapshot of this image is already in progress",
        ));
    }
    Ok((reference, pending))
}

/// The steps of the module doc. `before_rename` runs once SNAP exists (sealed) and the
/// pending top is complete, just before it is renamed over IMAGE: a live snapshot opens
/// the new top there, so that a failure to open it leaves the rename undone (recovery
/// completes it at the next start).
pub(crate) fn steps(
    disk: &Disk,
    image: &Path,
    snap: &Path,
    pending: &Path,
    reference: String,
    before_rename: &mut dyn FnMut() -> Result<()>,
) -> Result<Snapshotted> {
    let digest = disk.prepare_seal()?;
    let h = disk.top_header();
    let new_top = NewLayer {
        virtual_size: h.geometry.virtual_size,
        block_size: h.geometry.block_size,
        parent: Some(ParentRef {
            path: reference,
            uuid: h.uuid,
            digest,
        }),
    }
    .header(image)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(pending)
        .map_err(|e| Error::os(pending, "create", e))?;
    create_on(&FileStorage::new(file), pending, &new_top)?;
    sync_folder(&folder_of(pending))?;
    failpoint::hit("snapshot.after_pending");
    disk.commit_seal(digest)?;
    let sealed = disk.top_header();
    failpoint::hit("snapshot.after_seal");
    std::fs::hard_link(image, snap).map_err(|e| Error::os(snap, "link snapshot", e))?;
    sync_folder(&folder_of(snap))?;
    failpoint::hit("snapshot.after_link");
    before_rename()?;
    std::fs::rename(pending, image)
        .map_err(|e| Error::os(image, "rename new top into place", e))?;
    sync_folder(&folder_of(image))?;
    failpoint::hit("snapshot.after_rename");
    Ok(Snapshotted {
        sealed,
        top: new_top,
    })
}
