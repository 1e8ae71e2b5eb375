//! Repointing a top at its parent after the parent moved (`rebase`), under the same
//! rules as opening: the new path must be the very layer the top recorded.

use std::path::Path;

use super::source::open_layer_file;
use super::walk::check_link;
use super::OpenOptions;
use crate::create::{reference_for, ReferenceStyle};
use crate::disk::{Access, Disk};
use crate::error::OpenError;
use crate::format::{Header, LayerState, ParentRef};
use crate::layer::{read_header, write_header};
use crate::storage::FileStorage;

/// Points the writable top `image` at `new_parent` (referenced in `style`). Refused,
/// with nothing written, unless `new_parent` is the layer the top recorded (UUID and
/// seal digest, the digest verified against its contents) and its own chain opens.
/// The header is replaced atomically (A/B slots); no other byte changes.
pub fn rebase(
    image: &Path,
    new_parent: &Path,
    style: ReferenceStyle,
    opts: &OpenOptions,
) -> Result<Header, OpenError> {
    let invalid = |path: &Path, reason: &str| OpenError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let (file, _) = open_layer_file(image, Access::ReadWrite, true)?;
    let st = FileStorage::new(file);
    let loaded = read_header(&st, image)?;
    let h = &loaded.header;
    if h.state == LayerState::Sealed {
        return Err(invalid(
            image,
            "is sealed (only a writable top can be rebased; lower layers are never written)",
        ));
    }
    let Some(old) = &h.parent else {
        return Err(invalid(image, "has no parent to rebase"));
    };
    let reference = reference_for(image, new_parent, style)?;
    // The new parent opened as the top of its own chain: every link below it checked.
    let parent = Disk::open(new_parent, &opts.clone().access(Access::ReadOnly))?;
    check_link(&parent.top_header(), new_parent, h, image)?;
    parent.verify_top_seal()?;
    drop(parent);
    let new = ParentRef {
        path: reference,
        uuid: old.uuid,
        digest: old.digest,
    };
    let mut header = h.clone();
    header.parent = Some(new);
    write_header(&st, image, &loaded, &header)?;
    header.generation += 1;
    Ok(header)
}
