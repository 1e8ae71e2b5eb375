//! Creating layer files crash-safely: write a temp file beside the target, sync it,
//! rename it into place without replacing anything, sync the folder.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::chain::{folder_of, open_layer_file};
use crate::disk::Access;
use crate::error::OpenError;
use crate::format::{validate_reference, Header, ParentRef, Uuid};
use crate::layer::{create_on, load_map, read_header, seal, NewLayer};
use crate::storage::FileStorage;

/// Syncs a folder so a rename or new name in it is durable.
pub fn sync_folder(dir: &Path) -> Result<(), OpenError> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| OpenError::io(dir, "open folder", e.into()))?;
    File::from(fd)
        .sync_all()
        .map_err(|e| OpenError::io(dir, "sync folder", e))
}

/// A temp path beside `path` that stray-file cleanup can recognise.
pub fn temp_path(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    folder_of(path).join(format!(".{name}.{tag}-{}.tmp", Uuid::random()))
}

/// Renames `from` to `to`, failing if `to` exists, then syncs the folder.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<(), OpenError> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| OpenError::io(to, "rename into place", e.into()))?;
    sync_folder(&folder_of(to))
}

/// Writes `header` as a new empty layer at a temp path and syncs it; returns the temp
/// path (the caller renames it into place).
pub fn write_temp_layer(path: &Path, header: &Header, tag: &str) -> Result<PathBuf, OpenError> {
    let tmp = temp_path(path, tag);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| OpenError::io(&tmp, "create", e))?;
    let st = FileStorage::new(file);
    if let Err(e) = create_on(&st, &tmp, header) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Creates a standalone writable image at `path`; fails if `path` exists.
pub fn create_image(path: &Path, virtual_size: u64, block_size: u32) -> Result<Header, OpenError> {
    let header = NewLayer {
        virtual_size,
        block_size,
        parent: None,
    }
    .header(path)?;
    install(path, &header)?;
    Ok(header)
}

fn install(path: &Path, header: &Header) -> Result<(), OpenError> {
    if path.symlink_metadata().is_ok() {
        return Err(OpenError::Invalid {
            path: path.to_path_buf(),
            reason: "already exists".into(),
        });
    }
    let tmp = write_temp_layer(path, header, "create")?;
    rename_noreplace(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// How a child names its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReferenceStyle {
    /// Relative to the child's folder (`../images/base.cow`): survives moving the whole
    /// tree that holds both.
    #[default]
    Relative,
    /// The parent's absolute path: survives moving the child alone.
    Absolute,
}

/// The reference a child at `child` uses for `parent`, in `style`.
pub fn reference_for(
    child: &Path,
    parent: &Path,
    style: ReferenceStyle,
) -> Result<String, OpenError> {
    let abs = |p: &Path| -> Result<PathBuf, OpenError> {
        let dir = folder_of(p)
            .canonicalize()
            .map_err(|e| OpenError::io(folder_of(p), "resolve folder", e))?;
        Ok(dir.join(p.file_name().unwrap_or_default()))
    };
    let unusable = || OpenError::Invalid {
        path: parent.to_path_buf(),
        reason: "unusable parent path".into(),
    };
    let p = abs(parent)?;
    let r = match style {
        ReferenceStyle::Absolute => p.to_str().ok_or_else(unusable)?.to_string(),
        ReferenceStyle::Relative => {
            let c = folder_of(&abs(child)?);
            let common = c
                .components()
                .zip(p.components())
                .take_while(|(a, b)| a == b)
                .count();
            let mut parts: Vec<String> = vec!["..".into(); c.components().count() - common];
            for comp in p.components().skip(common) {
                match comp {
                    Component::Normal(n) => parts.push(n.to_str().ok_or_else(unusable)?.into()),
                    _ => return Err(unusable()),
                }
            }
            parts.join("/")
        }
    };
    validate_reference(&r).map_err(|why| OpenError::Invalid {
        path: parent.to_path_buf(),
        reason: format!("parent reference {why}"),
    })?;
    Ok(r)
}

/// Creates an empty writable layer at `path` over `parent`, sealing `parent` first if it
/// is writable (this needs its exclusive lock, so it must not be in use).
pub fn create_child(path: &Path, parent: &Path) -> Result<Header, OpenError> {
    create_child_with(path, parent, ReferenceStyle::Relative)
}

/// As [`create_child`], naming the parent in `style`.
pub fn create_child_with(
    path: &Path,
    parent: &Path,
    style: ReferenceStyle,
) -> Result<Header, OpenError> {
    create_child_opts(path, parent, style, &crate::OpenOptions::new())
}

/// As [`create_child_with`]; a writable `parent` holding partial blocks is opened with
/// `opts` (its chain's layer source) to fill them before it is sealed.
pub fn create_child_opts(
    path: &Path,
    parent: &Path,
    style: ReferenceStyle,
    opts: &crate::OpenOptions,
) -> Result<Header, OpenError> {
    if path.symlink_metadata().is_ok() {
        return Err(OpenError::Invalid {
            path: path.to_path_buf(),
            reason: "already exists".into(),
        });
    }
    let reference = reference_for(path, parent, style)?;
    let (uuid, digest, geometry) = {
        let (file, _) = open_layer_file(parent, Access::ReadOnly, true)?;
        let st = FileStorage::new(file);
        let h = read_header(&st, parent)?.header;
        if h.state == crate::format::LayerState::Sealed {
            (h.uuid, h.seal_digest, h.geometry)
        } else {
            drop(st);
            let (file, _) = open_layer_file(parent, Access::ReadWrite, true)?;
            let mut st = FileStorage::new(file);
            if load_map(&st, parent, &h.geometry)?
                .0
                .first_partial()
                .is_some()
            {
                // A sealed layer holds whole blocks: fill partial ones from below first
                // (the disk takes the exclusive lock itself).
                drop(st);
                let d = crate::Disk::open(parent, opts)?;
                d.fill_partial_blocks()?;
                d.flush()?;
                drop(d);
                st = FileStorage::new(open_layer_file(parent, Access::ReadWrite, true)?.0);
            }
            let (u, d) = seal(&st, parent)?;
            (u, d, h.geometry)
        }
    };
    let header = NewLayer {
        virtual_size: geometry.virtual_size,
        block_size: geometry.block_size,
        parent: Some(ParentRef {
            path: reference,
            uuid,
            digest,
        }),
    }
    .header(path)?;
    install(path, &header)?;
    Ok(header)
}
