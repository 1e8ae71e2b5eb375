//! The request and reply types of the disk API.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::format::Header;
use crate::map::BlockCounts;
use crate::storage::ReadStorage;

/// Where part of a read comes from (see [`crate::Disk::read_pieces`]).
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
    /// `len` bytes of a local file at `offset` that may stop holding them (a remote
    /// layer's host cache): good only if [`crate::Disk::staged_valid`] accepts `depth`
    /// and `token` after they were read from the file (into a pipe, say); otherwise read
    /// them with [`crate::Disk::read`].
    Staged {
        /// The file.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The layer (1: the first below the top).
        depth: u32,
        /// What the layer checks.
        token: u64,
    },
    /// `len` bytes of a layer file opened for direct I/O (`O_DIRECT`), at file offset
    /// `offset`: read them into memory aligned to [`crate::DIRECT_ALIGN`] (never `sendfile`,
    /// which would fill the page cache direct I/O keeps empty). `offset` and `len` are
    /// multiples of [`crate::DIRECT_ALIGN`].
    Direct {
        /// The layer file, opened with `O_DIRECT`.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// How a copy-up brings a block held below into the top ([`crate::OpenOptions::copy_up`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CopyUp {
    /// A first write smaller than the block writes only the sub-blocks it touches (4 KiB,
    /// or a 32nd of a block over 128 KiB) and the block becomes *partial*: the rest keeps
    /// reading from below until the top is sealed, which fills it (default). Costs the
    /// file system what was written and reads nothing below, like qcow2's subclusters.
    #[default]
    Partial,
    /// The top gets a copy of its own of the whole block. The kernel copies blocks already verified
    /// where its copy is a copy (ext4, tmpfs); on XFS and btrfs, where it would share the
    /// extents, a buffer does: measured faster there (BENCHMARKS.md, copy-up modes).
    Copy,
    /// Share the block's extents with the layer below where the file system can (XFS with
    /// reflink, btrfs): a first 4 KiB write then allocates about 4 KiB instead of a block,
    /// for extent metadata on every copy-up and flush. Elsewhere as `Copy`.
    Share,
    /// Always one buffered read, verification and write (for comparisons).
    Buffer,
}

impl CopyUp {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            CopyUp::Copy => 0,
            CopyUp::Share => 1,
            CopyUp::Buffer => 2,
            CopyUp::Partial => 3,
        }
    }
    pub(crate) fn from_u8(v: u8) -> CopyUp {
        match v {
            1 => CopyUp::Share,
            2 => CopyUp::Buffer,
            3 => CopyUp::Partial,
            _ => CopyUp::Copy,
        }
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
    /// Fail with [`crate::IoError::NotFast`] unless it can be done by metadata alone.
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
    /// Shared lock; writes refused with [`crate::IoError::ReadOnly`].
    ReadOnly,
}

/// A summary of one layer, for `info`.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// Path as opened.
    pub path: PathBuf,
    /// The header.
    pub header: Header,
    /// Blocks holding data, partial blocks included.
    pub data_blocks: u64,
    /// Of those, partial blocks (only a writable top has them): the top holds some of
    /// their 4 KiB sub-blocks, the rest read from below.
    pub partial_blocks: u64,
    /// Whiteout blocks.
    pub zero_blocks: u64,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
}

impl LayerInfo {
    pub(super) fn from_header(
        path: &Path,
        h: &Header,
        c: BlockCounts,
        st: &dyn ReadStorage,
    ) -> LayerInfo {
        LayerInfo {
            path: path.to_path_buf(),
            header: h.clone(),
            data_blocks: c.data,
            partial_blocks: c.partial,
            zero_blocks: c.zero,
            allocated_bytes: st.allocated_bytes(),
        }
    }
}
