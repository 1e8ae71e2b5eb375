//! Where layers come from: the layer-source seam.
//!
//! A parent reference is an untrusted string from a child's header. A [`LayerSource`]
//! turns it into read-only storage plus an identity for the shared lower cache, and takes
//! the lock a lower layer holds while in use. One source exists today, [`LocalFiles`];
//! another kind of parent (an object in a bucket) plugs in beside it.
//!
//! What keeps a crafted reference from reading host files is the identity check, not the
//! folder: the reference must name a regular file (device nodes and FIFOs are refused
//! before they are opened for reading), with cowdisk's magic, and with the UUID and seal
//! digest the child recorded ([`super::walk`] checks those before reading anything else).
//! Hosts that serve images they did not build confine references to image roots.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::disk::Access;
use crate::error::OpenError;
use crate::storage::{FileStorage, ReadStorage};

/// The identity of an open layer: the key of the shared lower cache and of loop detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerId {
    /// A local file, by (device, inode).
    File {
        /// Device number.
        dev: u64,
        /// Inode number.
        ino: u64,
    },
    /// An object in a bucket (cowdisk-remote), by a hash of its location: objects are
    /// immutable and named by content, so the location is the identity.
    Object {
        /// Hash of `s3://bucket/key`.
        key: u64,
    },
}

/// A parent opened by a [`LayerSource`]: checked to be the right kind of object, locked
/// if asked, nothing read from it yet.
pub struct OpenedLayer {
    /// Read-only access to its bytes.
    pub storage: Arc<dyn ReadStorage>,
    /// Its path for messages and for resolving its own parent reference.
    pub path: PathBuf,
    /// Identity for the lower cache and loop detection.
    pub id: LayerId,
}

/// Resolves parent references into read-only layers.
pub trait LayerSource: Send + Sync {
    /// Opens the parent that the layer at `child` names by `reference`. Fails on an
    /// unusable reference, a missing object, or anything but a regular layer object;
    /// reads none of its bytes and takes no lock.
    fn open_parent(&self, child: &Path, reference: &str) -> Result<OpenedLayer, OpenError>;

    /// Takes the shared lock a lower layer holds while in use (after the walk made sure
    /// it is not already in the chain, whose top may hold it exclusively).
    fn lock_shared(&self, layer: &OpenedLayer) -> Result<(), OpenError>;
}

/// Parents as local files: relative references resolve against the child's folder,
/// absolute ones as they are. With image roots, every reference must resolve beneath one
/// of them (`openat2(RESOLVE_BENEATH)`: symlinks that leave the root are refused too).
#[derive(Default)]
pub struct LocalFiles {
    roots: Vec<Root>,
}

struct Root {
    dir: OwnedFd,
    path: PathBuf,
}

impl LocalFiles {
    /// References may name any local file that passes the identity check.
    pub fn new() -> LocalFiles {
        LocalFiles::default()
    }

    /// Confines every reference to `roots` (none: no confinement).
    pub fn confined(roots: &[PathBuf]) -> Result<LocalFiles, OpenError> {
        let roots = roots
            .iter()
            .map(|r| {
                let path = r
                    .canonicalize()
                    .map_err(|e| OpenError::io(r, "resolve image root", e))?;
                let dir = rustix::fs::open(
                    &path,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| OpenError::io(r, "open image root", e.into()))?;
                Ok(Root { dir, path })
            })
            .collect::<Result<_, OpenError>>()?;
        Ok(LocalFiles { roots })
    }

    /// The path `reference` names from the layer at `child`, for messages and opening.
    fn target(child: &Path, reference: &str) -> PathBuf {
        let dir = folder_of(child);
        if reference.starts_with('/') || dir == Path::new(".") {
            PathBuf::from(reference)
        } else {
            dir.join(reference)
        }
    }

    /// Opens `target` with `O_PATH` beneath the first root that lexically holds it.
    fn open_confined(&self, child: &Path, reference: &str) -> Result<OwnedFd, OpenError> {
        let dir = folder_of(child)
            .canonicalize()
            .map_err(|e| OpenError::io(folder_of(child), "resolve folder", e))?;
        let full = normalize(&if reference.starts_with('/') {
            PathBuf::from(reference)
        } else {
            dir.join(reference)
        });
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        for root in &self.roots {
            let Ok(rel) = full.strip_prefix(&root.path) else {
                continue;
            };
            let rel = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rel
            };
            return rustix::fs::openat2(&root.dir, rel, path_flags(), Mode::empty(), how).map_err(
                |e| match e {
                    rustix::io::Errno::XDEV => outside(child, reference),
                    e => missing(child, Self::target(child, reference), e),
                },
            );
        }
        Err(outside(child, reference))
    }
}

fn outside(child: &Path, reference: &str) -> OpenError {
    OpenError::chain(
        child,
        format!("parent reference {reference:?} leads outside every image root"),
    )
}

fn missing(child: &Path, parent: PathBuf, e: rustix::io::Errno) -> OpenError {
    OpenError::ParentMissing {
        child: child.to_path_buf(),
        parent,
        source: e.into(),
    }
}

/// `O_PATH`: opens nothing for I/O, so a device node or FIFO is never really opened.
fn path_flags() -> OFlags {
    OFlags::PATH | OFlags::CLOEXEC
}

impl LayerSource for LocalFiles {
    fn lock_shared(&self, layer: &OpenedLayer) -> Result<(), OpenError> {
        Self::lock_fd(layer)
    }

    fn open_parent(&self, child: &Path, reference: &str) -> Result<OpenedLayer, OpenError> {
        if reference.contains("://") {
            return Err(OpenError::chain(
                child,
                format!("parent reference {reference:?} names no local file (no source for it)"),
            ));
        }
        let path = Self::target(child, reference);
        let handle = if self.roots.is_empty() {
            rustix::fs::open(&path, path_flags(), Mode::empty())
                .map_err(|e| missing(child, path.clone(), e))?
        } else {
            self.open_confined(child, reference)?
        };
        let (file, id) = reopen_regular(&handle, &path)?;
        Ok(OpenedLayer {
            storage: Arc::new(FileStorage::new(file)),
            path,
            id,
        })
    }
}

impl LocalFiles {
    fn lock_fd(layer: &OpenedLayer) -> Result<(), OpenError> {
        let Some(fd) = layer.storage.fd() else {
            return Ok(());
        };
        use rustix::fs::FlockOperation;
        rustix::fs::flock(fd, FlockOperation::NonBlockingLockShared).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                OpenError::Locked {
                    path: layer.path.clone(),
                }
            } else {
                OpenError::io(&layer.path, "lock", e.into())
            }
        })
    }
}

/// Checks that an `O_PATH` handle is a regular file, then opens that same file (not the
/// path again, so nothing can be swapped in between) read-only.
fn reopen_regular(handle: &OwnedFd, path: &Path) -> Result<(File, LayerId), OpenError> {
    let st = rustix::fs::fstat(handle).map_err(|e| OpenError::io(path, "stat", e.into()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let proc = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd = rustix::fs::open(proc.as_str(), open_flags(Access::ReadOnly), Mode::empty())
        .map_err(|e| OpenError::io(path, "open", e.into()))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| OpenError::io(path, "stat", e))?;
    Ok((
        file,
        LayerId::File {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Lexically removes `.` and resolves `..` (for matching against image roots; the open
/// itself is then confined by the kernel).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The folder holding `path` ("." for a bare file name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub(crate) fn open_flags(access: Access) -> OFlags {
    let rw = match access {
        Access::ReadWrite => OFlags::RDWR,
        Access::ReadOnly => OFlags::RDONLY,
    };
    // NONBLOCK so a FIFO planted as a layer cannot hang the open; it is then refused.
    rw | OFlags::CLOEXEC | OFlags::NONBLOCK
}

fn lock_error(path: &Path, e: std::fs::TryLockError) -> OpenError {
    match e {
        std::fs::TryLockError::WouldBlock => OpenError::Locked {
            path: path.to_path_buf(),
        },
        std::fs::TryLockError::Error(e) => OpenError::io(path, "lock", e),
    }
}

/// Takes the shared lock every lower layer holds while it is in use.
pub(crate) fn lock_shared(file: &File, path: &Path) -> Result<(), OpenError> {
    file.try_lock_shared().map_err(|e| lock_error(path, e))
}

/// Opens a layer file by path (a top, or a layer being sealed or checked) with the lock
/// `access` implies, or none with `lock == false`. Refuses anything but a regular file.
pub fn open_layer_file(
    path: &Path,
    access: Access,
    lock: bool,
) -> Result<(File, LayerId), OpenError> {
    let fd = rustix::fs::open(path, open_flags(access), Mode::empty())
        .map_err(|e| OpenError::io(path, "open", e.into()))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| OpenError::io(path, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    match (lock, access) {
        (false, _) => {}
        (true, Access::ReadOnly) => lock_shared(&file, path)?,
        (true, Access::ReadWrite) => file.try_lock().map_err(|e| lock_error(path, e))?,
    }
    let id = LayerId::File {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((file, id))
}
