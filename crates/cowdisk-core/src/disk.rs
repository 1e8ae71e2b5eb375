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
//! syncs again: a map entry is never durable before its data (FORMAT.md §Crash).

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::IoError;
use crate::format::{BlockState, Geometry, Header, LayerState};
use crate::map::AllocMap;
use crate::resolve::{block_kind, LowerOwner, Mapping, MappingKind, ResolvedMap};
use crate::storage::Storage;

/// Lock stripes serialising writers per block (copy-up must not race a write).
const STRIPES: usize = 1024;

/// Scratch buffers shared by every thread and every disk in the process, so requests do not
/// allocate and memory follows how many copies run at once, not how many threads or clones a
/// server has (a pool per disk kept a few blocks per clone: 8 clones reading a fresh base held
/// 8 times the buffers of one).
struct ScratchPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Free scratch buffers kept per pool (about the number of CPUs that copy at once).
const SCRATCH_KEPT: usize = 8;

/// Bytes read at once when verifying a block without keeping it: a page, so the dozens of
/// threads a server with many clients has verify without holding much memory (16 KiB pieces
/// held ~180 KiB more at the peak of 8 clones reading a fresh base; throughput the same).
const VERIFY_PIECE: usize = 4 * 1024;

/// Block buffers for copy-up, and page buffers for verification: two pools, so a burst of
/// verifications cannot fill the pool with pages and leave every copy-up allocating a block.
static BLOCK_SCRATCH: ScratchPool = ScratchPool {
    free: Mutex::new(Vec::new()),
};
static PIECE_SCRATCH: ScratchPool = ScratchPool {
    free: Mutex::new(Vec::new()),
};

impl ScratchPool {
    /// Runs `f` with a zero-initialised-once buffer of exactly `len` bytes.
    fn with<R>(&self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let taken = {
            let mut free = lock(&self.free);
            let pos = free.iter().position(|b| b.len() >= len);
            pos.map(|i| free.swap_remove(i))
        };
        let mut buf = taken.unwrap_or_else(|| vec![0u8; len]);
        let r = f(&mut buf[..len]);
        let mut free = lock(&self.free);
        if free.len() < SCRATCH_KEPT {
            free.push(buf);
        }
        r
    }
}

/// Where part of a read comes from (see [`Disk::read_pieces`]).
#[derive(Debug, Clone, Copy)]
pub enum ReadPiece<'a> {
    /// This many bytes of zeros.
    Zeros(u64),
    /// `len` bytes of an open layer file at file offset `offset`.
    File {
        /// The layer file.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A sealed layer below the top, kept open for reads.
pub struct LowerLayer {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) path: PathBuf,
    pub(crate) header: Header,
    pub(crate) data_blocks: u64,
    pub(crate) zero_blocks: u64,
    /// One bit per block: its data was checked against its stored CRC once. Sealed
    /// layers never change, so once is enough; shared by every disk using the layer.
    pub(crate) verified: Box<[AtomicU64]>,
}

impl LowerLayer {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        path: PathBuf,
        header: Header,
        counts: (u64, u64),
    ) -> LowerLayer {
        let words = header.geometry.blocks.div_ceil(64) as usize;
        // Without stored CRCs there is nothing to verify against.
        let init = if header.compat & crate::format::COMPAT_BLOCK_CRCS != 0 {
            0
        } else {
            u64::MAX
        };
        LowerLayer {
            storage,
            path,
            header,
            data_blocks: counts.0,
            zero_blocks: counts.1,
            verified: (0..words).map(|_| AtomicU64::new(init)).collect(),
        }
    }

    fn is_verified(&self, b: u64) -> bool {
        self.verified[(b / 64) as usize].load(SeqCst) & (1 << (b % 64)) != 0
    }

    /// Compares `data` (block `b`'s bytes, its virtual length) with the stored CRC.
    /// A mismatch is an error, never bad bytes or a fall-through (docs/reliability.md, I5).
    fn verify(&self, b: u64, data: &[u8]) -> Result<(), IoError> {
        self.verify_crc(b, crc32fast::hash(data))
    }

    /// As [`LowerLayer::verify`], with the CRC of the block's bytes already computed.
    fn verify_crc(&self, b: u64, actual: u32) -> Result<(), IoError> {
        let g = &self.header.geometry;
        let stored = crate::layer::stored_block_crc(&*self.storage, g, b)
            .map_err(|e| Disk::io_err(&self.path, "read block CRC", g.crc_offset + b * 4, e))?;
        if stored != actual {
            return Err(IoError::Checksum {
                path: self.path.clone(),
                block: b,
                stored,
                actual,
            });
        }
        self.verified[(b / 64) as usize].fetch_or(1 << (b % 64), SeqCst);
        Ok(())
    }
}

/// The sealed part of a chain, resolved once. Shared between disks with the same base
/// (through [`crate::LowerCache`]) so clones cost one copy of it.
pub struct Lower {
    pub(crate) layers: Vec<LowerLayer>,
    pub(crate) resolved: ResolvedMap,
}

impl Lower {
    /// Builds the resolved chain from loaded layers (top-most first) and their maps.
    pub(crate) fn new(layers: Vec<LowerLayer>, maps: &[AllocMap], blocks: u64) -> Lower {
        let refs: Vec<&AllocMap> = maps.iter().collect();
        Lower {
            resolved: ResolvedMap::build(blocks, &refs),
            layers,
        }
    }
    /// An empty chain (a standalone top).
    pub(crate) fn empty() -> Lower {
        Lower {
            layers: Vec::new(),
            resolved: ResolvedMap::default(),
        }
    }
    /// The first layer's header (the direct parent of the top).
    pub fn first_header(&self) -> Option<&Header> {
        self.layers.first().map(|l| &l.header)
    }
}

/// Flags for a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: durable before return.
    pub fua: bool,
}

/// Options for zeroing a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Durable before return.
    pub fua: bool,
    /// Keep blocks allocated (write zeros instead of whiteouts).
    pub no_hole: bool,
    /// Fail with [`IoError::NotFast`] unless it can be done by metadata alone.
    pub fast: bool,
}

/// What an extent reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Stored data.
    Data,
    /// A whiteout: reads zeros, uses no data space.
    Zero,
    /// No layer holds it: reads zeros.
    Hole,
}

/// A run of blocks with one state and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Virtual offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it reads as.
    pub state: ExtentState,
    /// Depth of the owning layer (0 = top); `None` for holes.
    pub depth: Option<u32>,
}

/// Whether the disk takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Exclusive lock on the top; writes allowed.
    ReadWrite,
    /// Shared lock; writes refused with [`IoError::ReadOnly`].
    ReadOnly,
}

/// The top layer, open.
pub(crate) struct Top {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) path: PathBuf,
    pub(crate) header: Header,
    pub(crate) map: AllocMap,
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
    /// Serialises copy-up writes. The kernel serialises buffered writes to one file anyway
    /// (the inode lock), and its waiters spin while the owner allocates and copies a block;
    /// waiting here instead leaves the CPU to threads reading and verifying the next blocks
    /// (a quarter less server CPU per first write on tmpfs).
    copy_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Disk {
    pub(crate) fn assemble(top: Top, lower: Arc<Lower>, access: Access) -> Disk {
        let geometry = top.header.geometry;
        let sealed_top = (top.header.state == LayerState::Sealed).then(|| {
            LowerLayer::new(
                top.storage.clone(),
                top.path.clone(),
                top.header.clone(),
                (0, 0),
            )
        });
        Disk {
            top,
            sealed_top,
            lower,
            geometry,
            access,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush_lock: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            copy_lock: Mutex::new(()),
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
    /// The top layer's header.
    pub fn top_header(&self) -> &Header {
        &self.top.header
    }
    /// The top layer's path.
    pub fn top_path(&self) -> &Path {
        &self.top.path
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
        if self.access == Access::ReadOnly {
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
    fn storage_at(&self, depth: u32) -> (&dyn Storage, &Path, u64) {
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

    fn kind_of(&self, b: u64) -> MappingKind {
        block_kind(self.top.map.get(b), || self.lower.resolved.get(b))
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
        let mut run: Option<Mapping> = None;
        while b * bs < end {
            let kind = self.kind_of(b);
            let start = (b * bs).max(offset);
            let stop = ((b + 1) * bs).min(end);
            match &mut run {
                Some(r) if r.kind == kind => r.len += stop - start,
                _ => {
                    if let Some(r) = run.take() {
                        f(r)?;
                    }
                    run = Some(Mapping {
                        offset: start,
                        len: stop - start,
                        kind,
                    });
                }
            }
            b += 1;
        }
        if let Some(r) = run {
            f(r)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`. Never copies or writes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.resolve(offset, buf.len() as u64, |m| {
            let s = (m.offset - offset) as usize;
            let out = &mut buf[s..s + m.len as usize];
            match m.kind {
                MappingKind::Data { depth } => {
                    self.verify_run(depth, m.offset, m.len)?;
                    let (st, path, data_offset) = self.storage_at(depth);
                    let off = data_offset + m.offset;
                    st.read_at(out, off)
                        .map_err(|e| Self::io_err(path, "read", off, e))
                }
                _ => {
                    out.fill(0);
                    Ok(())
                }
            }
        })
    }

    /// Plans a read of `[offset, offset + len)` as pieces of layer files and zeros, for
    /// callers that send the bytes without copying them through memory (`sendfile`). Checks
    /// the range and verifies sealed blocks exactly as [`Disk::read`] does, so a piece is
    /// only ever good data. Returns `false` if a layer has no file
    /// descriptor (simulated storage): discard the pieces `f` got and use `read` then.
    ///
    /// The pieces stay valid while the disk lives: lower layers never change, and a top
    /// block keeps its file offset. Like `read`, a concurrent write or discard of the same
    /// range may be seen in part.
    pub fn read_pieces<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(ReadPiece<'a>),
    ) -> Result<bool, IoError> {
        let mut complete = true;
        self.resolve(offset, len, |m| {
            let piece = match m.kind {
                MappingKind::Data { depth } => {
                    self.verify_run(depth, m.offset, m.len)?;
                    let (st, _, data_offset) = self.storage_at(depth);
                    match st.fd() {
                        Some(fd) => ReadPiece::File {
                            fd,
                            offset: data_offset + m.offset,
                            len: m.len,
                        },
                        None => {
                            complete = false;
                            return Ok(());
                        }
                    }
                }
                _ => ReadPiece::Zeros(m.len),
            };
            f(piece);
            Ok::<(), IoError>(())
        })?;
        Ok(complete)
    }

    /// Writes `data` at `offset`, copying up partially written blocks from below.
    pub fn write(&self, offset: u64, data: &[u8], flags: WriteFlags) -> Result<(), IoError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let bs = u64::from(self.geometry.block_size);
        let mut pos = 0usize;
        while pos < data.len() {
            let voff = offset + pos as u64;
            let b = voff / bs;
            let within = (voff % bs) as usize;
            let n = (self.geometry.block_len(b) - within).min(data.len() - pos);
            self.write_block(b, within, &data[pos..pos + n])?;
            pos += n;
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_block(&self, b: u64, within: usize, chunk: &[u8]) -> Result<(), IoError> {
        let _g = lock(&self.stripes[(b % STRIPES as u64) as usize]);
        let top = &*self.top.storage;
        let path = &self.top.path;
        let off = self.geometry.block_offset(b);
        let blen = self.geometry.block_len(b);
        let state = self.top.map.get(b);
        if state == BlockState::Data {
            let o = off + within as u64;
            return top
                .write_at(chunk, o)
                .map_err(|e| Self::io_err(path, "write", o, e));
        }
        if within == 0 && chunk.len() == blen {
            // Covers the whole block: nothing below matters.
            top.write_at(chunk, off)
                .map_err(|e| Self::io_err(path, "write", off, e))?;
        } else {
            let lower = if state == BlockState::Absent {
                self.lower.resolved.get(b)
            } else {
                LowerOwner::Nothing
            };
            match lower {
                LowerOwner::Data(i) => self.copy_up(b, i, within, chunk)?,
                _ => {
                    // Starts from zeros. A crash may have left unreferenced bytes here,
                    // so clear the block before writing only our part.
                    top.punch_hole(off, u64::from(self.geometry.block_size))
                        .map_err(|e| Self::io_err(path, "punch hole", off, e))?;
                    let o = off + within as u64;
                    top.write_at(chunk, o)
                        .map_err(|e| Self::io_err(path, "write", o, e))?;
                }
            }
        }
        self.top.map.set(b, BlockState::Data);
        Ok(())
    }

    /// Checks every not-yet-verified block in a run of the sealed layer at `depth` (0: the
    /// top, if sealed) against its CRC; a writable top has nothing to check. Reads go through
    /// a small buffer in pieces: a zero-copy read needs the bytes only for their CRC, so it
    /// should not cost a block-sized buffer per thread.
    fn verify_run(&self, depth: u32, offset: u64, len: u64) -> Result<(), IoError> {
        let layer = match depth {
            0 => match &self.sealed_top {
                Some(l) => l,
                None => return Ok(()),
            },
            d => &self.lower.layers[d as usize - 1],
        };
        let g = &layer.header.geometry;
        let bs = u64::from(g.block_size);
        for b in offset / bs..(offset + len).div_ceil(bs) {
            if layer.is_verified(b) {
                continue;
            }
            let n = g.block_len(b);
            let off = g.block_offset(b);
            let piece = n.min(VERIFY_PIECE);
            let crc = PIECE_SCRATCH.with(piece, |s| {
                let mut h = crc32fast::Hasher::new();
                let mut done = 0;
                while done < n {
                    let k = piece.min(n - done);
                    let o = off + done as u64;
                    layer
                        .storage
                        .read_at(&mut s[..k], o)
                        .map_err(|e| Self::io_err(&layer.path, "read", o, e))?;
                    h.update(&s[..k]);
                    done += k;
                }
                Ok::<u32, IoError>(h.finalize())
            })?;
            layer.verify_crc(b, crc)?;
        }
        Ok(())
    }

    /// Copies block `b` from lower layer `i` into the top, with `chunk` applied. If the
    /// lower read fails nothing is written or allocated (docs/reliability.md, rule 3).
    fn copy_up(&self, b: u64, i: usize, within: usize, chunk: &[u8]) -> Result<(), IoError> {
        let blen = self.geometry.block_len(b);
        let off = self.geometry.block_offset(b);
        let layer = &self.lower.layers[i];
        let lower_off = layer.header.geometry.block_offset(b);
        BLOCK_SCRATCH.with(blen, |buf| {
            // A smaller parent's last block is short in its virtual size but whole in its
            // file (zeros past the end), so reading a full block there is in bounds.
            layer
                .storage
                .read_at(buf, lower_off)
                .map_err(|e| Self::io_err(&layer.path, "read for copy-up", lower_off, e))?;
            if !layer.is_verified(b) {
                // Bad lower data must not become "real" top data.
                // Its own length: within `blen`, as a parent is never larger than its child.
                layer.verify(b, &buf[..layer.header.geometry.block_len(b).min(blen)])?;
            }
            buf[within..within + chunk.len()].copy_from_slice(chunk);
            let _c = lock(&self.copy_lock);
            self.top
                .storage
                .write_at(buf, off)
                .map_err(|e| Self::io_err(&self.top.path, "copy-up write", off, e))
        })
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole blocks become whiteouts
    /// (or zero-filled data with `no_hole`); partial blocks get zeros written.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let bs = u64::from(self.geometry.block_size);
        let end = offset + len;
        if flags.fast
            && (flags.no_hole
                || !offset.is_multiple_of(bs)
                || (!end.is_multiple_of(bs) && end != self.size()))
        {
            return Err(IoError::NotFast);
        }
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let within = (pos % bs) as usize;
            let blen = self.geometry.block_len(b);
            let n = ((blen - within) as u64).min(end - pos) as usize;
            if n == blen && !flags.no_hole {
                self.whiteout_block(b)?;
            } else {
                self.zero_part(b, within, n)?;
            }
            pos += n as u64;
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Discard (TRIM): like `write_zeroes` without `no_hole`. Reads return zeros after.
    pub fn discard(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<(), IoError> {
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                fua: flags.fua,
                no_hole: false,
                fast: false,
            },
        )
    }

    fn whiteout_block(&self, b: u64) -> Result<(), IoError> {
        let _g = lock(&self.stripes[(b % STRIPES as u64) as usize]);
        match self.top.map.get(b) {
            BlockState::Zero => Ok(()),
            BlockState::Data => {
                let off = self.geometry.block_offset(b);
                self.top
                    .storage
                    .punch_hole(off, u64::from(self.geometry.block_size))
                    .map_err(|e| Self::io_err(&self.top.path, "punch hole", off, e))?;
                self.top.map.set(b, BlockState::Zero);
                Ok(())
            }
            BlockState::Absent => {
                // Only lower data needs hiding; anything else already reads zeros.
                if matches!(self.lower.resolved.get(b), LowerOwner::Data(_)) {
                    self.top.map.set(b, BlockState::Zero);
                }
                Ok(())
            }
        }
    }

    fn zero_part(&self, b: u64, within: usize, n: usize) -> Result<(), IoError> {
        let reads_zero = match self.top.map.get(b) {
            BlockState::Zero => true,
            BlockState::Data => false,
            BlockState::Absent => !matches!(self.lower.resolved.get(b), LowerOwner::Data(_)),
        };
        if reads_zero && n < self.geometry.block_len(b) {
            return Ok(());
        }
        self.write_block(b, within, &crate::storage::ZERO_BLOCK[..n])
    }

    /// Makes every write completed before this call durable. After a failed sync the
    /// disk is poisoned: this and every later flush fails.
    pub fn flush(&self) -> Result<(), IoError> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        let _f = lock(&self.flush_lock);
        if self.poisoned.load(SeqCst) {
            return Err(IoError::Poisoned {
                path: self.top.path.clone(),
            });
        }
        let pending = self.top.map.take_dirty();
        let st = &*self.top.storage;
        let res = st
            .sync()
            .map_err(|e| Self::io_err(&self.top.path, "sync data", 0, e))
            .and_then(|()| {
                self.top
                    .map
                    .write_back(st, &self.geometry, &pending)
                    .map_err(|e| Self::io_err(&self.top.path, "write allocation map", 0, e))
            });
        if res.is_err() {
            self.poisoned.store(true, SeqCst);
            self.top.map.redirty(&pending);
        }
        res
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
        let (data, zero) = self.top.map.counts();
        let mut v = vec![LayerInfo::from_header(
            &self.top.path,
            &self.top.header,
            data,
            zero,
            &*self.top.storage,
        )];
        for l in &self.lower.layers {
            v.push(LayerInfo::from_header(
                &l.path,
                &l.header,
                l.data_blocks,
                l.zero_blocks,
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

/// A summary of one layer, for `info`.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// Path as opened.
    pub path: PathBuf,
    /// The header.
    pub header: Header,
    /// Blocks holding data.
    pub data_blocks: u64,
    /// Whiteout blocks.
    pub zero_blocks: u64,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
}

impl LayerInfo {
    fn from_header(path: &Path, h: &Header, data: u64, zero: u64, st: &dyn Storage) -> LayerInfo {
        LayerInfo {
            path: path.to_path_buf(),
            header: h.clone(),
            data_blocks: data,
            zero_blocks: zero,
            allocated_bytes: st.allocated_bytes(),
        }
    }
}
