//! `rebase IMAGE --backing NEWPATH`: repoints the top's parent reference after the
//! parent file moved. Refused unless NEWPATH is the same layer (UUID and seal digest
//! as recorded, digest verified against its contents) and its own chain opens. The
//! header is replaced atomically (A/B slots); no other byte changes.

use std::path::Path;

use cowdisk_core::chain::open_layer_file;
use cowdisk_core::create::reference_for;
use cowdisk_core::layer::{load_map, read_header, stored_digest, write_header};
use cowdisk_core::{Access, Disk, FileStorage, Header, LayerState, OpenOptions, ParentRef};

use crate::error::{Error, Result};

/// Repoints the parent reference; returns the image's new header.
pub fn rebase(image: &Path, new_parent: &Path) -> Result<Header> {
    let (file, _) = open_layer_file(image, Access::ReadWrite)?;
    let st = FileStorage::new(file);
    let loaded = read_header(&st, image)?;
    let h = &loaded.header;
    if h.state == LayerState::Sealed {
        return Err(Error::invalid(
            image,
            "is sealed (only a writable top can be rebased; lower layers are never written)",
        ));
    }
    let Some(old) = &h.parent else {
        return Err(Error::invalid(image, "has no parent to rebase"));
    };
    // The cheapest refusal first, before reading the new parent's map and CRCs.
    let reference = reference_for(image, new_parent)?;
    let (pfile, _) = open_layer_file(new_parent, Access::ReadOnly)?;
    let pst = FileStorage::new(pfile);
    let ph = read_header(&pst, new_parent)?.header;
    if ph.uuid != old.uuid {
        return Err(Error::invalid(
            new_parent,
            format!(
                "is layer {}, but {} expects its parent to be {}",
                ph.uuid,
                image.display(),
                old.uuid
            ),
        ));
    }
    if ph.state != LayerState::Sealed {
        return Err(Error::invalid(new_parent, "is not sealed"));
    }
    if ph.seal_digest != old.digest {
        return Err(Error::invalid(
            new_parent,
            "seal digest differs from the one recorded in the image (changed since)",
        ));
    }
    if ph.geometry.block_size != h.geometry.block_size
        || ph.geometry.virtual_size > h.geometry.virtual_size
    {
        return Err(Error::invalid(
            new_parent,
            "geometry does not fit the image",
        ));
    }
    let (pmap, _) = load_map(&pst, new_parent, &ph.geometry)?;
    let actual = stored_digest(&pst, new_parent, &ph, &pmap)?;
    if actual != ph.seal_digest {
        return Err(Error::invalid(
            new_parent,
            "contents do not match its seal digest",
        ));
    }
    drop(pst);
    // Its own chain must open before we point at it.
    drop(Disk::open(
        new_parent,
        &OpenOptions::new().access(Access::ReadOnly),
    )?);
    let mut new = h.clone();
    new.parent = Some(ParentRef {
        path: reference,
        uuid: old.uuid,
        digest: old.digest,
    });
    write_header(&st, image, &loaded, &new)?;
    Ok(new)
}
