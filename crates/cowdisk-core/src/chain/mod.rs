//! Opening a chain: the top by its path, each parent through a [`LayerSource`] by the
//! reference in its child, every link validated before the disk is used.
//!
//! Cycles are caught by layer identity and by UUID; depth is bounded ([`MAX_DEPTH`]).

mod relink;
mod source;
mod walk;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

pub use relink::rebase;

pub use source::{folder_of, open_layer_file, LayerId, LayerSource, LocalFiles, OpenedLayer};
pub use walk::{check_link, link_problems, ChainWalk, LinkError, WalkStop, WalkedLayer, MAX_DEPTH};

use crate::disk::{
    verified_index_bytes, Access, CopyUp, Disk, JournalOpener, Lower, LowerLayer, Top, TopHeader,
};
use crate::error::OpenError;
use crate::format::{Header, LayerState, FLAG_NEEDS_CHECK};
use crate::layer::{load_map, read_header, verify_seal_digest};
use crate::map::AllocMap;
use crate::resolve::ResolvedMap;
use crate::storage::{FileStorage, ReadStorage, Storage};
use crate::storage_direct::DirectStorage;
use crate::sub::SubMap;

/// Shares resolved lower chains between disks opened in one process, keyed by the
/// identity of the first sealed layer: clones of one base cost one copy of its map.
#[derive(Default)]
pub struct LowerCache {
    inner: Mutex<HashMap<LayerId, Weak<Lower>>>,
}

impl LowerCache {
    /// An empty cache.
    pub fn new() -> LowerCache {
        LowerCache::default()
    }
    fn get(&self, key: LayerId) -> Option<Arc<Lower>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .and_then(Weak::upgrade)
    }
    fn put(&self, key: LayerId, lower: &Arc<Lower>) {
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
    source: Option<Arc<dyn LayerSource>>,
    metadata_limit: u64,
    copy_up: CopyUp,
    top_locked: bool,
    direct_io: bool,
    flush_journal: u64,
    flush_journal_auto: bool,
}

/// Default cap on the memory an open chain's metadata may take (maps, resolution,
/// verification bits): far above what real images need, far below what a crafted chain
/// of huge empty layers would ask.
pub const DEFAULT_METADATA_LIMIT: u64 = 1 << 30;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            access: Access::ReadWrite,
            cache: None,
            force_share: false,
            source: None,
            metadata_limit: DEFAULT_METADATA_LIMIT,
            copy_up: CopyUp::default(),
            top_locked: false,
            direct_io: false,
            flush_journal: 0,
            flush_journal_auto: false,
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
    /// Caps the memory the chain's metadata may take (default
    /// [`crate::DEFAULT_METADATA_LIMIT`]); a chain that would need more is refused at open.
    pub fn metadata_limit(mut self, bytes: u64) -> OpenOptions {
        self.metadata_limit = bytes;
        self
    }
    /// How copy-up moves blocks (default [`CopyUp::Partial`]): see [`Disk::set_copy_up`].
    pub fn copy_up(mut self, mode: CopyUp) -> OpenOptions {
        self.copy_up = mode;
        self
    }
    /// Where parents come from (default: [`LocalFiles`], unconfined).
    pub fn source(mut self, source: Arc<dyn LayerSource>) -> OpenOptions {
        self.source = Some(source);
        self
    }
    /// Confines every parent reference to `roots` (see [`LocalFiles::confined`]); no roots
    /// leaves references unconfined.
    pub fn image_roots(self, roots: &[PathBuf]) -> Result<OpenOptions, OpenError> {
        if roots.is_empty() {
            return Ok(self);
        }
        Ok(self.source(Arc::new(LocalFiles::confined(roots)?)))
    }
    /// Opens the top without locking it because the caller already holds its lock through
    /// another open file of the same process: a served image reopened in place (after a
    /// live squash) must never let the lock go, or another process could take the top
    /// between the two opens. Parents are locked as usual.
    pub fn top_locked_by_caller(mut self) -> OpenOptions {
        self.top_locked = true;
        self
    }
    /// Reads and writes layer files with `O_DIRECT` (`serve --cache=none`): no host page
    /// cache under the guest's; unaligned requests go through aligned buffers. Remote
    /// layers are unaffected. Opening fails on a file system without direct I/O.
    pub fn direct_io(mut self, on: bool) -> OpenOptions {
        self.direct_io = on;
        self
    }
    /// Lets client flushes ([`Disk::client_flush`]) go to a flush journal of `bytes`
    /// beside the top (`TOP.journal`, written out to that size by
    /// [`Disk::prepare_journal`], or else by the first flush that uses it; 0, the default,
    /// is off). Whatever this says, a writable open replays a journal a crash
    /// left, and a read-only one refuses it (unless `force_share`).
    pub fn flush_journal(mut self, bytes: u64) -> OpenOptions {
        self.flush_journal = bytes;
        self.flush_journal_auto = false;
        self
    }
    /// [`OpenOptions::flush_journal`] where it pays (the server's default): not on a file
    /// system that keeps files in memory (tmpfs, ramfs), whose sync writes nothing, so the
    /// journal would only add a copy; and not where `bytes` is more than 1/16 of the free
    /// space (with a warning), which is the guest's. Decided when the file would be made.
    pub fn flush_journal_auto(mut self, bytes: u64) -> OpenOptions {
        self.flush_journal = bytes;
        self.flush_journal_auto = true;
        self
    }
    fn locking(&self) -> bool {
        !(self.force_share && self.access == Access::ReadOnly)
    }
}

/// Loads the top layer from storage.
fn load_top(
    storage: Arc<dyn Storage>,
    path: &Path,
    access: Access,
) -> Result<(Top, Header), OpenError> {
    let loaded = read_header(&*storage, path)?;
    let header = loaded.header.clone();
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
    let sub = load_sub(&*storage, path, &header, &map, access)?;
    let top = Top {
        storage,
        path: path.to_path_buf(),
        header: TopHeader::new(loaded),
        map,
        sub,
    };
    Ok((top, header))
}

/// A sealed layer holds whole blocks only: partial ones are filled before sealing.
fn refuse_partial(path: &Path, map: &AllocMap) -> Result<(), OpenError> {
    match map.first_partial() {
        Some(block) => Err(OpenError::Format {
            path: path.to_path_buf(),
            source: crate::error::FormatError::MapEntry {
                block,
                reason: "partial block in a sealed layer",
            },
        }),
        None => Ok(()),
    }
}

/// The top's partial-block bitmaps. Opened to write, bitmaps a crash left for absent
/// blocks are cleared on disk first (crate::sub).
fn load_sub(
    storage: &dyn Storage,
    path: &Path,
    header: &Header,
    map: &AllocMap,
    access: Access,
) -> Result<SubMap, OpenError> {
    if header.state == LayerState::Sealed {
        refuse_partial(path, map)?;
    }
    let g = &header.geometry;
    let writable = access == Access::ReadWrite;
    let (sub, stale) = SubMap::load(storage, g, map, writable)
        .map_err(|e| OpenError::io(path, "read partial-block bitmaps", e))?
        .map_err(|source| OpenError::Format {
            path: path.to_path_buf(),
            source,
        })?;
    if writable {
        sub.clear_stale(storage, g, &stale)
            .map_err(|e| OpenError::io(path, "clear stale partial-block bitmaps", e))?;
    }
    Ok(sub)
}

/// Loads a walked parent whose link is good: its map, then its seal digest checked
/// against the map and stored block CRCs.
fn load_lower(
    storage: Arc<dyn ReadStorage>,
    path: &Path,
    header: Header,
) -> Result<(LowerLayer, AllocMap), OpenError> {
    let (map, _) = load_map(&*storage, path, &header.geometry)?;
    refuse_partial(path, &map)?;
    verify_seal_digest(&*storage, path, &header, &map)?;
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
        let lock_top = opts.locking() && !opts.top_locked;
        let (file, top_id) = open_layer_file(path, opts.access, lock_top)?;
        let storage: Arc<dyn Storage> = if opts.direct_io {
            Arc::new(DirectStorage::top(file).map_err(|e| OpenError::io(path, "open", e))?)
        } else {
            Arc::new(FileStorage::new(file))
        };
        let (top, header) = load_top(storage, path, opts.access)?;
        let mut budget = Budget::new(opts.metadata_limit);
        budget.add(path, top.map.memory_bytes() + top.sub.memory_bytes())?;
        let lower = match &header.parent {
            None => Arc::new(Lower::empty()),
            Some(_) => open_lowers(path, &header, top_id, opts, &mut budget)?,
        };
        let mut disk = Disk::assemble(top, lower, opts.access);
        disk.set_copy_up(opts.copy_up);
        disk.set_journal(
            Arc::new(open_journal_file),
            opts.flush_journal,
            opts.flush_journal_auto,
        );
        if !(opts.force_share && opts.access == Access::ReadOnly) {
            disk.replay_journal()?;
        }
        Ok(disk)
    }

    /// Opens a chain from storages (top first) without paths or locks: for tests and
    /// tools that build layers in memory. Links are validated as for files.
    pub fn open_storages(
        top: (Arc<dyn Storage>, PathBuf),
        lowers: Vec<(Arc<dyn ReadStorage>, PathBuf)>,
        access: Access,
    ) -> Result<Disk, OpenError> {
        Disk::open_storages_journaled(top, lowers, access, None)
    }

    /// [`Disk::open_storages`] with a flush journal: its opener and capacity (see
    /// [`OpenOptions::flush_journal`]). A journal the top's header names is replayed.
    pub fn open_storages_journaled(
        top: (Arc<dyn Storage>, PathBuf),
        lowers: Vec<(Arc<dyn ReadStorage>, PathBuf)>,
        access: Access,
        journal: Option<(JournalOpener, u64)>,
    ) -> Result<Disk, OpenError> {
        if lowers.len() + 1 > MAX_DEPTH {
            return Err(OpenError::chain(
                &top.1,
                format!("chain too deep (more than {MAX_DEPTH} layers)"),
            ));
        }
        let (top, header) = load_top(top.0, &top.1, access)?;
        let mut child = header.clone();
        let mut child_path = top.path.clone();
        let mut layers = Vec::new();
        let mut maps = Vec::new();
        let mut seen = HashSet::from([header.uuid]);
        for (st, p) in lowers {
            let header = read_header(&*st, &p)?.header;
            check_link(&header, &p, &child, &child_path)?;
            let (l, m) = load_lower(st, &p, header)?;
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
        let lower = Lower::new(layers, &maps, header.geometry.blocks);
        let mut disk = Disk::assemble(top, Arc::new(lower), access);
        if let Some((opener, capacity)) = journal {
            disk.set_journal(opener, capacity, false);
        }
        disk.replay_journal()?;
        Ok(disk)
    }
}

/// Opens a top's flush journal file (never through a symbolic link); a new one is made
/// durable in its folder before any header names it.
fn open_journal_file(path: &Path, create: bool) -> std::io::Result<Arc<dyn Storage>> {
    use rustix::fs::{Mode, OFlags};
    let mut flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if create {
        flags |= OFlags::CREATE;
    }
    let file = std::fs::File::from(rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))?);
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if create {
        std::fs::File::open(folder_of(path))?.sync_all()?;
    }
    Ok(Arc::new(FileStorage::new(file)))
}

/// Memory an opening chain's metadata takes so far, against the limit.
struct Budget {
    used: u64,
    limit: u64,
}

impl Budget {
    fn new(limit: u64) -> Budget {
        Budget { used: 0, limit }
    }
    /// Counts `bytes` for the layer at `path`; refuses the chain past the limit.
    fn add(&mut self, path: &Path, bytes: u64) -> Result<(), OpenError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit {
            return Err(OpenError::TooLarge {
                path: path.to_path_buf(),
                needed: self.used,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// Walks parent references from `top`, validating each link, or takes the resolved
/// chain from the cache when its first layer is already open in this process.
fn open_lowers(
    top_path: &Path,
    top: &Header,
    top_id: LayerId,
    opts: &OpenOptions,
    budget: &mut Budget,
) -> Result<Arc<Lower>, OpenError> {
    let local;
    let source: &dyn LayerSource = match &opts.source {
        Some(s) => &**s,
        None => {
            local = LocalFiles::new();
            &local
        }
    };
    let cache = opts.cache.as_deref();
    let mut layers = Vec::new();
    let mut maps = Vec::new();
    let mut first_id = None;
    let mut child_path = top_path.to_path_buf();
    for step in ChainWalk::new(source, top_path, top, top_id, opts.locking()) {
        let l = step.map_err(|(_, e)| e)?;
        if let Some(e) = l.link.first() {
            return Err(OpenError::chain(&child_path, e.to_string()));
        }
        if layers.is_empty() {
            first_id = Some(l.id);
            // The same rules as a fresh load passed above; the cached chain is that layer's.
            let hit = cache.and_then(|c| c.get(l.id));
            if let Some(hit) = hit.filter(|h| h.first_header() == Some(&l.loaded.header)) {
                return Ok(hit);
            }
        }
        child_path = l.path.clone();
        let storage = match opts
            .direct_io
            .then(|| DirectStorage::lower(l.storage.clone()))
        {
            Some(Some(d)) => Arc::new(d.map_err(|e| OpenError::io(&l.path, "open", e))?),
            _ => l.storage,
        };
        let (layer, map) = load_lower(storage, &l.path, l.loaded.header)?;
        let blocks = layer.header.geometry.blocks;
        budget.add(&l.path, map.memory_bytes() + verified_index_bytes(blocks))?;
        layers.push(layer);
        maps.push(map);
    }
    budget.add(top_path, ResolvedMap::index_bytes(top.geometry.blocks))?;
    let lower = Arc::new(Lower::new(layers, &maps, top.geometry.blocks));
    if let (Some(c), Some(id)) = (cache, first_id) {
        c.put(id, &lower);
    }
    Ok(lower)
}
