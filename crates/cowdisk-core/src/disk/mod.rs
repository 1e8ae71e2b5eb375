//! The open virtual disk: a writable (or read-only) top over a shared, resolved chain
//! of sealed layers. All methods take `&self`; the type is `Send + Sync`.
//!
//! # Range validation
//! Every request is checked once here: `offset + len` must not overflow and must be
//! within the virtual size, or the call fails with [`IoError::OutOfRange`] and
//! nothing is read or written. Zero-length requests succeed and do nothing.
//!
//! # Durability
//! Data is written in place at the block's fixed offset; the map entry that exposes it
//! is published in memory only after the data write returned. `flush` takes the dirty
//! map pages, syncs the data, writes the pages into their inactive A/B slots and
//! syncs again: a map entry is never durable before its data (FORMAT.md §Crash). A
//! flush syncs nothing when no write, zero or discard completed since the last one that
//! succeeded (a concurrent flush may have covered it while it waited).

mod copyup;
mod flush;
mod header;
mod inplace;
mod journal;
mod lower;
mod partial;
mod read;
mod replay;
mod scratch;
mod types;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

pub use inplace::InPlace;
pub(crate) use lower::verified_index_bytes;
pub use lower::{Lower, LowerLayer};
pub use types::{Access, CopyUp, Extent, ExtentState, LayerInfo, ReadPiece, WriteFlags, ZeroFlags};

pub(crate) use header::TopHeader;
pub use journal::{journal_path, JournalOpener};

use crate::error::IoError;
use crate::format::{BlockState, Geometry, Header, LayerState};
use crate::map::{AllocMap, BlockCounts};
use crate::resolve::{block_kind, Mapping, MappingKind};
use crate::storage::{ReadStorage, Storage};

/// Lock stripes serialising writers per block (copy-up must not race a write).
const STRIPES: usize = 1024;

/// The top layer, open.
pub(crate) struct Top {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) path: PathBuf,
    pub(crate) header: TopHeader,
    pub(crate) map: AllocMap,
    /// Bitmaps of the partial blocks.
    pub(crate) sub: crate::sub::SubMap,
}

/// An open chain.
pub struct Disk {
    top: Top,
    /// A sealed top's blocks are checked against their CRCs like a parent's.
    sealed_top: Option<LowerLayer>,
    lower: Arc<Lower>,
    geometry: Geometry,
    access: Access,
    stripes: Box<[Mutex<()>]>,
    flush_lock: Mutex<()>,
    poisoned: AtomicBool,
    /// Set once the top was sealed through [`Disk::commit_seal`].
    sealed: AtomicBool,
    /// Serialises copy-up writes. The kernel serialises buffered writes to one file anyway
    /// (the inode lock), and its waiters spin while the owner allocates and copies a block;
    /// waiting here instead leaves the CPU to threads reading and verifying the next blocks
    /// (a quarter less server CPU per first write on tmpfs).
    copy_lock: Mutex<()>,
    /// Copy-up may go through `copy_file_range` (cleared once the kernel refuses it).
    kernel_copy: AtomicBool,
    /// [`CopyUp`], as its `u8`.
    copy_mode: std::sync::atomic::AtomicU8,
    /// The top is on a file system whose `copy_file_range` shares extents (XFS, btrfs).
    reflink_likely: bool,
    /// Blocks copied up from a lower layer since the disk was opened (for statistics).
    copy_ups: std::sync::atomic::AtomicU64,
    /// Flush generations: `changes` counts completed write, zero and discard requests;
    /// `synced` is the count the last successful flush covered. A flush with nothing new
    /// to cover, or one a concurrent flush already covered, syncs nothing (a guest's
    /// journal sends many flushes, often back to back).
    changes: std::sync::atomic::AtomicU64,
    synced: std::sync::atomic::AtomicU64,
    /// Where client flushes may go instead of a full flush (off unless set).
    journal: journal::Journal,
}

/// Merges adjacent mappings of one kind before handing them on.
struct Runs {
    run: Option<Mapping>,
}

impl Runs {
    fn add<E>(
        &mut self,
        m: Mapping,
        f: &mut impl FnMut(Mapping) -> Result<(), E>,
    ) -> Result<(), E> {
        match &mut self.run {
            Some(r) if r.kind == m.kind && r.offset + r.len == m.offset => r.len += m.len,
            _ => {
                if let Some(r) = self.run.replace(m) {
                    f(r)?;
                }
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Disk {
    /// The lock stripe of block `b`: held by whatever writes or changes the block's state.
    fn stripe(&self, b: u64) -> &Mutex<()> {
        &self.stripes[(b % STRIPES as u64) as usize]
    }

    pub(crate) fn assemble(top: Top, lower: Arc<Lower>, access: Access) -> Disk {
        let header = top.header.get();
        let geometry = header.geometry;
        let sealed_top = (header.state == LayerState::Sealed).then(|| {
            LowerLayer::new(
                top.storage.clone(),
                top.path.clone(),
                header,
                BlockCounts::default(),
            )
        });
        let reflink = top.storage.shares_extents();
        if access == Access::ReadWrite {
            // Pages written before this open may have one slot only; reserve the other
            // now, while it is likely free, so later flushes need no space. Best effort:
            // a page left without is reserved by the next write that changes it.
            for p in top.map.held_pages().collect::<Vec<_>>() {
                let off = geometry.page_offset(p, 0);
                if top
                    .storage
                    .allocate(off, 2 * crate::format::PAGE_SIZE)
                    .is_ok()
                {
                    top.map.set_page_space_ready(p);
                }
            }
        }
        Disk {
            top,
            sealed_top,
            lower,
            geometry,
            access,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush_lock: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            copy_lock: Mutex::new(()),
            kernel_copy: AtomicBool::new(true),
            copy_mode: std::sync::atomic::AtomicU8::new(CopyUp::default().to_u8()),
            reflink_likely: reflink,
            copy_ups: std::sync::atomic::AtomicU64::new(0),
            // The first flush always syncs: a process before this one may have left
            // writes it acknowledged but never flushed.
            changes: std::sync::atomic::AtomicU64::new(1),
            synced: std::sync::atomic::AtomicU64::new(0),
            journal: journal::Journal::default(),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.virtual_size
    }
    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.geometry.block_size
    }
    /// Layout of the top layer.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    /// True if opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.access == Access::ReadOnly
    }
    /// The top layer's current header.
    pub fn top_header(&self) -> Header {
        self.top.header.get()
    }
    /// The top layer's path.
    pub fn top_path(&self) -> &Path {
        &self.top.path
    }
    /// Names the top by another path to the same file: a live snapshot opens the new top
    /// under its pending name and then renames it over the image (messages and `info`
    /// must name the image).
    pub fn set_top_path(&mut self, path: PathBuf) {
        self.journal_renamed(&path);
        self.top.path = path;
    }
    /// Number of layers (top included).
    pub fn depth(&self) -> usize {
        self.lower.layers.len() + 1
    }
    /// The shared lower chain.
    pub fn lower(&self) -> &Arc<Lower> {
        &self.lower
    }
    /// State of block `b` in the top layer.
    pub fn top_state(&self, b: u64) -> BlockState {
        self.top.map.get(b)
    }
    /// Chooses how copy-up moves a block (see [`CopyUp`]).
    pub fn set_copy_up(&self, mode: CopyUp) {
        self.copy_mode.store(mode.to_u8(), SeqCst);
    }
    /// How copy-up moves a block.
    pub fn copy_up_mode(&self) -> CopyUp {
        CopyUp::from_u8(self.copy_mode.load(SeqCst))
    }
    /// Blocks copied up from a lower layer since the disk was opened.
    pub fn copy_ups(&self) -> u64 {
        self.copy_ups.load(SeqCst)
    }
    /// True once a sync failed: no flush succeeds until the disk is reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(SeqCst)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geometry.virtual_size => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset,
                len,
                size: self.geometry.virtual_size,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), IoError> {
        if self.access == Access::ReadOnly || self.sealed.load(SeqCst) {
            return Err(IoError::ReadOnly);
        }
        if self.poisoned.load(SeqCst) {
            return Err(IoError::Poisoned {
                path: self.top.path.clone(),
            });
        }
        Ok(())
    }

    /// Storage, path and data-area offset of the layer at `depth` (layers of different
    /// virtual sizes have different metadata sizes, hence their own data offset).
    fn storage_at(&self, depth: u32) -> (&dyn ReadStorage, &Path, u64) {
        if depth == 0 {
            (
                &*self.top.storage,
                &self.top.path,
                self.geometry.data_offset,
            )
        } else {
            let l = &self.lower.layers[depth as usize - 1];
            (&*l.storage, &l.path, l.header.geometry.data_offset)
        }
    }

    fn io_err(path: &Path, op: &'static str, offset: u64, source: std::io::Error) -> IoError {
        IoError::Storage {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }

    /// How many blocks from `b` (itself unallocated) are surely unallocated too: up to the
    /// end of the top's map page and of the resolved chunk, where either holds nothing.
    fn unheld_run(&self, b: u64) -> u64 {
        // The lower chunk first: in a fragmented chain it holds something, and one block
        // is all there is to skip.
        let low = self.lower.resolved.unheld_until(b);
        if low <= b {
            return 1;
        }
        let top = self.top.map.unheld_until(b);
        top.min(low).min(self.geometry.blocks).max(b + 1) - b
    }

    /// Calls `f` with maximal runs of `[offset, offset + len)` that read the same way.
    /// Drives reads, block status, `map` and allocation depth.
    pub fn resolve<E>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Mapping) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<IoError>,
    {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.geometry.block_size);
        let end = offset + len;
        let mut b = offset / bs;
        let mut runs = Runs { run: None };
        // The top's map page is looked up once per page, not once per block.
        let (mut page_no, mut page) = (u64::MAX, None);
        while b * bs < end {
            let p = b / crate::format::ENTRIES_PER_PAGE;
            if p != page_no {
                (page_no, page) = (p, self.top.map.page_words(p));
            }
            let mut top = AllocMap::state_in(page, b);
            if top == BlockState::Partial {
                let bits = self.top.sub.bits(b);
                // Its bitmap may have been forgotten since it stopped being partial.
                top = self.top.map.get(b);
                if top == BlockState::Partial {
                    let below = block_kind(top, || self.lower.resolved.get(b));
                    let mut add = |m| runs.add(m, &mut f);
                    self.resolve_partial(b, bits, below, offset, end, &mut add)?;
                    b += 1;
                    continue;
                }
            }
            let kind = block_kind(top, || self.lower.resolved.get(b));
            // A region no layer holds is skipped as a whole, not block by block.
            let step = match kind {
                MappingKind::Unallocated => self.unheld_run(b),
                _ => 1,
            };
            let start = (b * bs).max(offset);
            let stop = ((b + step) * bs).min(end);
            runs.add(
                Mapping {
                    offset: start,
                    len: stop - start,
                    kind,
                },
                &mut f,
            )?;
            b += step;
        }
        if let Some(r) = runs.run {
            f(r)?;
        }
        Ok(())
    }

    /// The runs of partial block `b` within `[offset, end)`: its sub-blocks from the top,
    /// the others as `below` (what the layers under it read as).
    fn resolve_partial<E>(
        &self,
        b: u64,
        bits: u32,
        below: MappingKind,
        offset: u64,
        end: u64,
        f: &mut dyn FnMut(Mapping) -> Result<(), E>,
    ) -> Result<(), E> {
        let sub = self.geometry.sub_size() as u64;
        let base = b * u64::from(self.geometry.block_size);
        let stop_all = (base + self.geometry.block_len(b) as u64).min(end);
        let mut s = (offset.max(base) - base) / sub;
        while base + s * sub < stop_all {
            let mine = bits >> s & 1 == 1;
            let mut t = s + 1;
            while base + t * sub < stop_all && (bits >> t & 1 == 1) == mine {
                t += 1;
            }
            let start = (base + s * sub).max(offset);
            let stop = (base + t * sub).min(stop_all);
            let kind = if mine {
                MappingKind::Data { depth: 0 }
            } else {
                below
            };
            f(Mapping {
                offset: start,
                len: stop - start,
                kind,
            })?;
            s = t;
        }
        Ok(())
    }

    /// Appends extents covering `[offset, offset + len)`, merged where state and owner agree.
    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), IoError> {
        self.resolve(offset, len, |m| {
            let (state, depth) = match m.kind {
                MappingKind::Data { depth } => (ExtentState::Data, Some(depth)),
                MappingKind::Zero { depth } => (ExtentState::Zero, Some(depth)),
                MappingKind::Unallocated => (ExtentState::Hole, None),
            };
            match out.last_mut() {
                Some(e)
                    if e.state == state && e.depth == depth && e.offset + e.length == m.offset =>
                {
                    e.length += m.len;
                }
                _ => out.push(Extent {
                    offset: m.offset,
                    length: m.len,
                    state,
                    depth,
                }),
            }
            Ok::<(), IoError>(())
        })
    }

    /// Information about every layer, top first.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let mut v = vec![LayerInfo::from_header(
            &self.top.path,
            &self.top.header.get(),
            self.top.map.counts(),
            &*self.top.storage,
        )];
        for l in &self.lower.layers {
            v.push(LayerInfo::from_header(
                &l.path,
                &l.header,
                l.counts,
                &*l.storage,
            ));
        }
        v
    }

    /// The top's allocation map (for tools that copy or seal it).
    pub fn top_map(&self) -> &AllocMap {
        &self.top.map
    }
    /// The top's storage.
    pub fn top_storage(&self) -> &Arc<dyn Storage> {
        &self.top.storage
    }
}
