//! Opening a chain: the top by its path, each parent by the reference in its child,
//! every link validated before the disk is used.
//!
//! Parent references are resolved with `openat2(RESOLVE_BENEATH)` against the child's
//! folder, so a crafted reference cannot reach outside it (symlinks that stay beneath
//! are followed). Cycles are caught by (device, inode) and by UUID; depth is bounded.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::disk::{Access, Disk, Lower, LowerLayer, Top};
use crate::error::OpenError;
use crate::format::{Header, LayerState, FLAG_NEEDS_CHECK};
use crate::layer::{load_map, read_header, stored_digest};
use crate::map::AllocMap;
use crate::storage::{FileStorage, Storage};

/// Most layers a chain may have (the top included).
pub const MAX_DEPTH: usize = 4096;

/// Shares resolved lower chains between disks opened in one process, keyed by the
/// identity of the first sealed layer: clones of one base cost one copy of its map.
#[derive(Default)]
pub struct LowerCache {
    inner: Mutex<HashMap<(u64, u64), Weak<Lower>>>,
}

impl LowerCache {
    /// An empty cache.
    pub fn new() -> LowerCache {
        LowerCache::default()
    }
    fn get(&self, key: (u64, u64)) -> Option<Arc<Lower>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .and_then(Weak::upgrade)
    }
    fn put(&self, key: (u64, u64), lower: &Arc<Lower>) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(key, Arc::downgrade(lower));
    }
}

/// How to open a disk.
#[derive(Clone)]
pub struct OpenOptions {
    access: Access,
    cache: Option<Arc<LowerCache>>,
    force_share: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            access: Access::ReadWrite,
            cache: None,
            force_share: false,
        }
    }
}

impl OpenOptions {
    /// Read-write, no cache.
    pub fn new() -> OpenOptions {
        OpenOptions::default()
    }
    /// Sets the access mode.
    pub fn access(mut self, access: Access) -> OpenOptions {
        self.access = access;
        self
    }
    /// Shares lower chains through `cache`.
    pub fn cache(mut self, cache: Arc<LowerCache>) -> OpenOptions {
        self.cache = Some(cache);
        self
    }
    /// Opens read-only without taking any lock, so an image in use by a writer can
    /// be inspected (like `qemu-img -U`). Header and map updates are A/B-atomic, so
    /// a concurrent flush is seen as before or after; data may be mid-write. Has no
    /// effect on read-write opens, which always lock.
    pub fn force_share(mut self) -> OpenOptions {
        self.force_share = true;
        self
    }
    fn locking(&self) -> bool {
        !(self.force_share && self.access == Access::ReadOnly)
    }
}

fn open_flags(access: Access) -> OFlags {
    let rw = match access {
        Access::ReadWrite => OFlags::RDWR,
        Access::ReadOnly => OFlags::RDONLY,
    };
    // NONBLOCK so a FIFO planted as a layer cannot hang the open; it is then refused.
    rw | OFlags::CLOEXEC | OFlags::NONBLOCK
}

/// Checks that an opened layer file is regular and takes the lock: none for `None`,
/// exclusive for a writer, shared for a reader.
fn check_and_lock(
    file: File,
    path: &Path,
    lock: Option<Access>,
) -> Result<(File, (u64, u64)), OpenError> {
    let meta = file
        .metadata()
        .map_err(|e| OpenError::io(path, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    match lock {
        None => {}
        Some(Access::ReadOnly) => lock_shared(&file, path)?,
        Some(Access::ReadWrite) => file.try_lock().map_err(|e| lock_error(path, e))?,
    }
    Ok((file, (meta.dev(), meta.ino())))
}

fn lock_error(path: &Path, e: std::fs::TryLockError) -> OpenError {
    match e {
        std::fs::TryLockError::WouldBlock => OpenError::Locked {
            path: path.to_path_buf(),
        },
        std::fs::TryLockError::Error(e) => OpenError::io(path, "lock", e),
    }
}

/// Opens a layer file by path (a top, or a parent being sealed or checked) with the lock
/// `access` implies.
pub fn open_layer_file(path: &Path, access: Access) -> Result<(File, (u64, u64)), OpenError> {
    let fd = rustix::fs::open(path, open_flags(access), Mode::empty())
        .map_err(|e| OpenError::io(path, "open", e.into()))?;
    check_and_lock(File::from(fd), path, Some(access))
}

/// Opens a layer read-only without any lock (for `--force-share` inspection).
pub fn open_layer_file_unlocked(path: &Path) -> Result<(File, (u64, u64)), OpenError> {
    let fd = rustix::fs::open(path, open_flags(Access::ReadOnly), Mode::empty())
        .map_err(|e| OpenError::io(path, "open", e.into()))?;
    check_and_lock(File::from(fd), path, None)
}

/// Loads the top layer from storage.
fn load_top(storage: Arc<dyn Storage>, path: &Path, access: Access) -> Result<Top, OpenError> {
    let loaded = read_header(&*storage, path)?;
    let header = loaded.header;
    if access == Access::ReadWrite {
        if header.state == LayerState::Sealed {
            return Err(OpenError::Sealed {
                path: path.to_path_buf(),
            });
        }
        if header.flags & FLAG_NEEDS_CHECK != 0 {
            return Err(OpenError::NeedsCheck {
                path: path.to_path_buf(),
            });
        }
    }
    let (map, _) = load_map(&*storage, path, &header.geometry)?;
    Ok(Top {
        storage,
        path: path.to_path_buf(),
        header,
        map,
    })
}

/// The rules a parent must meet for its child (FORMAT.md §Chain), from the headers alone:
/// the identity the child recorded, sealed, same block size, not larger than the child.
fn check_link(
    header: &Header,
    path: &Path,
    child: &Header,
    child_path: &Path,
) -> Result<(), OpenError> {
    let Some(pref) = &child.parent else {
        return Err(OpenError::chain(child_path, "has no parent reference"));
    };
    if header.uuid != pref.uuid {
        return Err(OpenError::chain(
            child_path,
            format!(
                "parent {} has UUID {}, expected {} (replaced?)",
                path.display(),
                header.uuid,
                pref.uuid
            ),
        ));
    }
    if header.state != LayerState::Sealed {
        return Err(OpenError::chain(path, "parent layer is not sealed"));
    }
    if header.seal_digest != pref.digest {
        return Err(OpenError::chain(
            child_path,
            format!(
                "parent {} changed since this layer was created (seal digest mismatch)",
                path.display()
            ),
        ));
    }
    if header.geometry.block_size != child.geometry.block_size {
        return Err(OpenError::chain(
            child_path,
            format!(
                "block size {} differs from parent {}'s {}",
                child.geometry.block_size,
                path.display(),
                header.geometry.block_size
            ),
        ));
    }
    if header.geometry.virtual_size > child.geometry.virtual_size {
        return Err(OpenError::chain(
            child_path,
            format!("parent {} is larger than its child", path.display()),
        ));
    }
    Ok(())
}

/// Validates the link from `child` to its parent `parent` and loads the parent.
fn load_lower(
    storage: Arc<dyn Storage>,
    path: &Path,
    child: &Header,
    child_path: &Path,
) -> Result<(LowerLayer, AllocMap), OpenError> {
    let header = read_header(&*storage, path)?.header;
    check_link(&header, path, child, child_path)?;
    let (map, _) = load_map(&*storage, path, &header.geometry)?;
    let actual = stored_digest(&*storage, path, &header, &map)?;
    if actual != header.seal_digest {
        return Err(OpenError::Format {
            path: path.to_path_buf(),
            source: crate::error::FormatError::SealDigest {
                stored: header.seal_digest,
                actual,
            },
        });
    }
    let counts = map.counts();
    Ok((
        LowerLayer::new(storage, path.to_path_buf(), header, counts),
        map,
    ))
}

impl Disk {
    /// Opens the chain whose top is `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Disk, OpenError> {
        let path = path.as_ref();
        let (file, top_id) = if opts.locking() {
            open_layer_file(path, opts.access)?
        } else {
            open_layer_file_unlocked(path)?
        };
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        let top = load_top(storage, path, opts.access)?;
        let lower = match &top.header.parent {
            None => Arc::new(Lower::empty()),
            Some(_) => open_lowers(path, &top.header, top_id, opts)?,
        };
        Ok(Disk::assemble(top, lower, opts.access))
    }

    /// Opens a chain from storages (top first) without paths or locks: for tests and
    /// tools that build layers in memory. Links are validated as for files.
    pub fn open_storages(
        top: (Arc<dyn Storage>, PathBuf),
        lowers: Vec<(Arc<dyn Storage>, PathBuf)>,
        access: Access,
    ) -> Result<Disk, OpenError> {
        if lowers.len() + 1 > MAX_DEPTH {
            return Err(OpenError::chain(
                &top.1,
                format!("chain too deep (more than {MAX_DEPTH} layers)"),
            ));
        }
        let top = load_top(top.0, &top.1, access)?;
        let mut child = top.header.clone();
        let mut child_path = top.path.clone();
        let mut layers = Vec::new();
        let mut maps = Vec::new();
        let mut seen = HashSet::from([top.header.uuid]);
        for (st, p) in lowers {
            let (l, m) = load_lower(st, &p, &child, &child_path)?;
            if !seen.insert(l.header.uuid) {
                return Err(OpenError::chain(
                    &p,
                    "chain loop: the same layer appears twice",
                ));
            }
            child = l.header.clone();
            child_path = p;
            layers.push(l);
            maps.push(m);
        }
        if child.parent.is_some() {
            return Err(OpenError::chain(&child_path, "parent layer not given"));
        }
        let lower = Lower::new(layers, &maps, top.header.geometry.blocks);
        Ok(Disk::assemble(top, Arc::new(lower), access))
    }
}

/// Follows parent references from a top layer, each resolved against its child's
/// folder with `openat2(RESOLVE_BENEATH)`: the one place that turns a reference from an
/// untrusted header into an open file. Used to open chains and by `check`.
pub struct ParentWalker {
    dir_fd: rustix::fd::OwnedFd,
    dir_display: PathBuf,
}

/// A parent opened by [`ParentWalker::open_parent`]: not yet checked or locked.
pub struct OpenedParent {
    /// The file, opened read-only and non-blocking.
    pub file: File,
    /// Its path for messages (relative to the top's folder as the user named it).
    pub path: PathBuf,
    /// (device, inode), for loop detection.
    pub id: (u64, u64),
}

impl ParentWalker {
    /// Starts at the folder of `top_path`.
    pub fn new(top_path: &Path) -> Result<ParentWalker, OpenError> {
        let top_dir = match top_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir_fd = rustix::fs::open(
            &top_dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| OpenError::io(&top_dir, "open folder", e.into()))?;
        Ok(ParentWalker {
            dir_fd,
            dir_display: top_dir,
        })
    }

    /// The display path `reference` would have.
    pub fn display(&self, reference: &str) -> PathBuf {
        if self.dir_display == Path::new(".") {
            PathBuf::from(reference)
        } else {
            self.dir_display.join(reference)
        }
    }

    /// Opens the parent that `child_path` names by `reference`, then moves into the
    /// parent's folder, since the parent's own reference is relative to it. Fails on
    /// an escaping reference, a missing file, or anything but a regular file.
    pub fn open_parent(
        &mut self,
        child_path: &Path,
        reference: &str,
    ) -> Result<OpenedParent, OpenError> {
        let path = self.display(reference);
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        let fd = rustix::fs::openat2(
            &self.dir_fd,
            reference,
            open_flags(Access::ReadOnly),
            Mode::empty(),
            how,
        )
        .map_err(|e| match e {
            rustix::io::Errno::XDEV => OpenError::chain(
                child_path,
                format!("parent reference {reference:?} escapes the folder"),
            ),
            e => OpenError::ParentMissing {
                child: child_path.to_path_buf(),
                parent: path.clone(),
                source: e.into(),
            },
        })?;
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| OpenError::io(&path, "stat", e))?;
        if !meta.file_type().is_file() {
            return Err(OpenError::NotRegular { path });
        }
        if let Some((sub, _)) = reference.rsplit_once('/') {
            let dir = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            self.dir_fd = rustix::fs::openat2(&self.dir_fd, sub, dir, Mode::empty(), how)
                .map_err(|e| OpenError::io(self.display(sub), "open folder", e.into()))?;
            self.dir_display = self.dir_display.join(sub);
        }
        Ok(OpenedParent {
            file,
            path,
            id: (meta.dev(), meta.ino()),
        })
    }
}

/// Takes the shared lock every lower layer holds while it is in use.
pub fn lock_shared(file: &File, path: &Path) -> Result<(), OpenError> {
    file.try_lock_shared().map_err(|e| lock_error(path, e))
}

/// Walks parent references from `top`, validating each link.
fn open_lowers(
    top_path: &Path,
    top: &Header,
    top_id: (u64, u64),
    opts: &OpenOptions,
) -> Result<Arc<Lower>, OpenError> {
    let cache = opts.cache.as_deref();
    let mut walker = ParentWalker::new(top_path)?;
    let mut seen_ids = HashSet::from([top_id]);
    let mut seen_uuids = HashSet::from([top.uuid]);
    let mut child = top.clone();
    let mut child_path = top_path.to_path_buf();
    let mut layers = Vec::new();
    let mut maps = Vec::new();
    let mut first_id = None;
    while let Some(pref) = child.parent.clone() {
        if layers.len() + 1 >= MAX_DEPTH {
            return Err(OpenError::chain(
                &child_path,
                format!("chain too deep (more than {MAX_DEPTH} layers)"),
            ));
        }
        let OpenedParent {
            file,
            path: ppath,
            id,
        } = walker.open_parent(&child_path, &pref.path)?;
        if !seen_ids.insert(id) {
            return Err(OpenError::chain(
                &child_path,
                format!("chain loop: {} is already in the chain", ppath.display()),
            ));
        }
        if layers.is_empty() {
            first_id = Some(id);
            if let Some(hit) = cache.and_then(|c| c.get(id)) {
                // The same rules as a fresh load; on a mismatch the load below reports it.
                let fits = hit
                    .first_header()
                    .is_some_and(|h| check_link(h, &ppath, &child, &child_path).is_ok());
                if fits {
                    return Ok(hit);
                }
            }
        }
        if opts.locking() {
            lock_shared(&file, &ppath)?;
        }
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        let (l, m) = load_lower(storage, &ppath, &child, &child_path)?;
        if !seen_uuids.insert(l.header.uuid) {
            return Err(OpenError::chain(
                &ppath,
                "chain loop: the same layer UUID appears twice",
            ));
        }
        child = l.header.clone();
        child_path = ppath;
        layers.push(l);
        maps.push(m);
    }
    let lower = Arc::new(Lower::new(layers, &maps, top.geometry.blocks));
    if let (Some(c), Some(id)) = (cache, first_id) {
        c.put(id, &lower);
    }
    Ok(lower)
}
