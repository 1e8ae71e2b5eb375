//! The chain walk and the rules for each link: the one place that follows parent
//! references from an untrusted header. The opener, `check` and `rebase` all use it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::source::{LayerId, LayerSource, OpenedLayer};
use crate::error::{FormatError, OpenError};
use crate::format::{Header, LayerState, Uuid, MAGIC};
use crate::layer::{read_header, LoadedHeader};
use crate::storage::ReadStorage;

/// Most layers a chain may have (the top included).
pub const MAX_DEPTH: usize = crate::format::MAX_CHAIN_DEPTH;

/// A way a parent fails the rules for its child (FORMAT.md §Chain).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LinkError {
    /// Not the layer the child recorded.
    #[error("parent {} has UUID {found}, but the child expects {expected} (replaced?)", parent.display())]
    Uuid {
        /// The parent file.
        parent: PathBuf,
        /// Its UUID.
        found: Uuid,
        /// The UUID the child recorded.
        expected: Uuid,
    },
    /// Not sealed, so it may change under its children.
    #[error("parent {} is not sealed", parent.display())]
    NotSealed {
        /// The parent file.
        parent: PathBuf,
    },
    /// The right layer, but changed since the child was made.
    #[error("parent {} changed since this layer was created (seal digest mismatch)", parent.display())]
    Digest {
        /// The parent file.
        parent: PathBuf,
    },
    /// Blocks of another size.
    #[error("block size {child} differs from parent {}'s {found}", parent.display())]
    BlockSize {
        /// The parent file.
        parent: PathBuf,
        /// The parent's block size.
        found: u32,
        /// The child's block size.
        child: u32,
    },
    /// Larger than the child.
    #[error("parent {} is larger than its child", parent.display())]
    Larger {
        /// The parent file.
        parent: PathBuf,
    },
}

/// Every rule `parent` breaks for `child`, from the headers alone: the identity the child
/// recorded, sealed, same block size, not larger than the child.
pub fn link_problems(parent: &Header, parent_path: &Path, child: &Header) -> Vec<LinkError> {
    let p = || parent_path.to_path_buf();
    let mut v = Vec::new();
    if let Some(pref) = &child.parent {
        if parent.uuid != pref.uuid {
            v.push(LinkError::Uuid {
                parent: p(),
                found: parent.uuid,
                expected: pref.uuid,
            });
        } else if parent.state == LayerState::Sealed && parent.seal_digest != pref.digest {
            v.push(LinkError::Digest { parent: p() });
        }
    }
    if parent.state != LayerState::Sealed {
        v.push(LinkError::NotSealed { parent: p() });
    }
    if parent.geometry.block_size != child.geometry.block_size {
        v.push(LinkError::BlockSize {
            parent: p(),
            found: parent.geometry.block_size,
            child: child.geometry.block_size,
        });
    }
    if parent.geometry.virtual_size > child.geometry.virtual_size {
        v.push(LinkError::Larger { parent: p() });
    }
    v
}

/// The first rule `parent` breaks for `child`, as the error that names the child.
pub fn check_link(
    parent: &Header,
    parent_path: &Path,
    child: &Header,
    child_path: &Path,
) -> Result<(), OpenError> {
    match link_problems(parent, parent_path, child).into_iter().next() {
        None => Ok(()),
        Some(e) => Err(OpenError::chain(child_path, e.to_string())),
    }
}

/// Why the walk stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkStop {
    /// The reference does not resolve (missing, escaping, unusable).
    Missing,
    /// The reference names something that is not a regular file.
    NotRegular,
    /// A layer appears twice.
    Loop,
    /// More than [`MAX_DEPTH`] layers.
    TooDeep,
    /// The parent's header cannot be read or is not a cowdisk header.
    Header,
}

/// A layer reached by the walk: opened, its header read, its link to its child judged.
pub struct WalkedLayer {
    /// Depth in the chain (1 = the top's parent).
    pub depth: usize,
    /// Path for messages.
    pub path: PathBuf,
    /// Its bytes, read-only.
    pub storage: Arc<dyn ReadStorage>,
    /// Identity for the lower cache.
    pub id: LayerId,
    /// The header as read.
    pub loaded: LoadedHeader,
    /// Rules it breaks for its child (empty if the link is good).
    pub link: Vec<LinkError>,
}

/// Follows parent references from a top layer, one layer per step. Stops at the base,
/// or after yielding an error: a reference that does not resolve, a loop, a chain deeper
/// than [`MAX_DEPTH`], or a header that is not a cowdisk header. A parent whose header is
/// not the layer the child recorded is yielded with its `link` problems and nothing
/// else of it read; the caller decides whether to go on (`check`) or stop (the opener).
pub struct ChainWalk<'a> {
    source: &'a dyn LayerSource,
    lock: bool,
    seen_ids: HashSet<LayerId>,
    seen_uuids: HashSet<Uuid>,
    child: Option<(Header, PathBuf)>,
    depth: usize,
}

impl<'a> ChainWalk<'a> {
    /// Starts below the top layer at `top_path` (already open, with identity `top_id`).
    pub fn new(
        source: &'a dyn LayerSource,
        top_path: &Path,
        top: &Header,
        top_id: LayerId,
        lock: bool,
    ) -> ChainWalk<'a> {
        ChainWalk {
            source,
            lock,
            seen_ids: HashSet::from([top_id]),
            seen_uuids: HashSet::from([top.uuid]),
            child: Some((top.clone(), top_path.to_path_buf())),
            depth: 0,
        }
    }

    fn step(&mut self) -> Result<Option<WalkedLayer>, (WalkStop, OpenError)> {
        let Some((child, child_path)) = self.child.take() else {
            return Ok(None);
        };
        let Some(pref) = &child.parent else {
            return Ok(None);
        };
        if self.depth + 2 > MAX_DEPTH {
            let e = OpenError::chain(
                &child_path,
                format!("chain too deep (more than {MAX_DEPTH} layers)"),
            );
            return Err((WalkStop::TooDeep, e));
        }
        let opened = self
            .source
            .open_parent(&child_path, &pref.path)
            .map_err(|e| match e {
                OpenError::NotRegular { .. } => (WalkStop::NotRegular, e),
                e => (WalkStop::Missing, e),
            })?;
        if !self.seen_ids.insert(opened.id) {
            let path = &opened.path;
            let e = OpenError::chain(
                &child_path,
                format!("chain loop: {} is already in the chain", path.display()),
            );
            return Err((WalkStop::Loop, e));
        }
        if self.lock {
            self.source
                .lock_shared(&opened)
                .map_err(|e| (WalkStop::Missing, e))?;
        }
        let OpenedLayer { storage, path, id } = opened;
        let loaded = read_parent_header(&*storage, &path).map_err(|e| (WalkStop::Header, e))?;
        if !self.seen_uuids.insert(loaded.header.uuid) {
            let e = OpenError::chain(&path, "chain loop: the same layer UUID appears twice");
            return Err((WalkStop::Loop, e));
        }
        self.depth += 1;
        let link = link_problems(&loaded.header, &path, &child);
        self.child = Some((loaded.header.clone(), path.clone()));
        Ok(Some(WalkedLayer {
            depth: self.depth,
            path,
            storage,
            id,
            loaded,
            link,
        }))
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = Result<WalkedLayer, (WalkStop, OpenError)>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(l)) => Some(Ok(l)),
            Ok(None) => None,
            Err(e) => {
                self.child = None;
                Some(Err(e))
            }
        }
    }
}

/// Reads a parent's header only after its first bytes prove it a cowdisk layer, so a
/// reference to some other file reads no more than its magic.
fn read_parent_header(storage: &dyn ReadStorage, path: &Path) -> Result<LoadedHeader, OpenError> {
    let mut magic = [0u8; 8];
    let len = storage.len().map_err(|e| OpenError::io(path, "stat", e))?;
    if len < magic.len() as u64 {
        return read_header(storage, path);
    }
    storage
        .read_at(&mut magic, 0)
        .map_err(|e| OpenError::io(path, "read header", e))?;
    if magic != MAGIC {
        return Err(OpenError::Format {
            path: path.to_path_buf(),
            source: FormatError::BadMagic,
        });
    }
    read_header(storage, path)
}
