//! Errors, split by phase: decoding a layer (`FormatError`), opening or creating a
//! chain (`OpenError`, with the file and field), and I/O on an open disk (`IoError`).

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// A layer's bytes do not form a valid v1 layer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The file ends before a structure it must contain.
    #[error("file truncated: {what} needs {needed} bytes, file has {len}")]
    Truncated {
        /// The structure that does not fit.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Actual file length.
        len: u64,
    },
    /// Not a cowdisk layer.
    #[error("bad magic (not a cowdisk layer)")]
    BadMagic,
    /// A major version this build cannot read.
    #[error("unsupported format version {major}.{minor} (this build reads 1.x)")]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// Incompatible features we do not implement.
    #[error("unknown incompatible feature(s): {0}")]
    UnknownIncompatFeatures(String),
    /// Header checksum mismatch.
    #[error("header CRC mismatch (stored {stored:#010x}, computed {actual:#010x})")]
    HeaderCrc {
        /// CRC in the file.
        stored: u32,
        /// CRC of the bytes.
        actual: u32,
    },
    /// A header field is out of range.
    #[error("header field {field}{}: {reason}", value.map(|v| format!(" = {v}")).unwrap_or_default())]
    Field {
        /// Field name as in FORMAT.md.
        field: &'static str,
        /// Value found, where it is a number.
        value: Option<u64>,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Both slots of a map page are damaged.
    #[error("allocation map page {page} is damaged in both slots ({reason})")]
    MapPage {
        /// Page index.
        page: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// A map entry has the reserved value or lies beyond the last block.
    #[error("allocation map entry for block {block} is invalid ({reason})")]
    MapEntry {
        /// Block index.
        block: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// The sealed layer's map or block CRCs no longer match its seal digest.
    #[error("seal digest mismatch: header says {stored:#010x}, contents give {actual:#010x}")]
    SealDigest {
        /// Digest in the header.
        stored: u32,
        /// Digest of the contents.
        actual: u32,
    },
}

/// Why a chain or layer could not be opened or created. Every variant names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// An OS call on the file failed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid layer.
    #[error("{}: {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// Another process holds the lock.
    #[error("{}: in use (locked by another process)", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// Not a regular file.
    #[error("{}: not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// Write access asked of a sealed layer.
    #[error("{}: layer is sealed (read-only; it is the parent of other layers)", path.display())]
    Sealed {
        /// The file.
        path: PathBuf,
    },
    /// A top's flush journal holds records that must be replayed first, or cannot be.
    #[error("{}: {reason}", path.display())]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The layer needs `check --repair` before it may be written.
    #[error("{}: marked as needing a check; run `cowdisk check --repair`", path.display())]
    NeedsCheck {
        /// The file.
        path: PathBuf,
    },
    /// A parent does not match what the child recorded, or the chain is inconsistent.
    #[error("{}: {reason}", path.display())]
    Chain {
        /// The layer whose parent link is wrong.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The parent file could not be opened.
    #[error("{}: parent {}: {source}", child.display(), parent.display())]
    ParentMissing {
        /// The child naming the parent.
        child: PathBuf,
        /// The resolved parent path.
        parent: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// I/O on the open disk failed during a header update (e.g. the flush before a seal).
    #[error(transparent)]
    Disk(#[from] IoError),
    /// The chain's metadata would take more memory than allowed.
    #[error("{}: the chain's metadata needs {} MiB of memory so far, more than the limit of {} MiB (raise it with --max-metadata)", path.display(), needed >> 20, limit >> 20)]
    TooLarge {
        /// The layer at which the limit was passed.
        path: PathBuf,
        /// Bytes needed so far.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// Bad arguments to create.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl OpenError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> OpenError {
        OpenError::Io {
            path: path.into(),
            op,
            source,
        }
    }
    pub(crate) fn chain(path: impl Into<PathBuf>, reason: impl Into<String>) -> OpenError {
        OpenError::Chain {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Coarse class of an I/O error, for mapping to NBD error codes and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    /// Range outside the disk, or a malformed request.
    Invalid,
    /// A write to a read-only disk.
    ReadOnly,
    /// The file system under the top layer is full (ENOSPC, EDQUOT, EFBIG).
    NoSpace,
    /// Storage failed, metadata is corrupt, or the layer is poisoned.
    Io,
    /// A fast zero was asked but would not be fast.
    NotSupported,
}

/// An error from I/O on an open disk.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IoError {
    /// The request reaches past the end of the disk or overflows.
    #[error("request at offset {offset} length {len} is outside the disk (size {size})")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// The disk was opened read-only.
    #[error("disk is read-only")]
    ReadOnly,
    /// A fast zero could not be done by metadata alone.
    #[error("fast zero not possible for this range")]
    NotFast,
    /// A previous sync failed; nothing is acknowledged as durable any more.
    #[error("{}: an earlier sync failed; restart and run `cowdisk check`", path.display())]
    Poisoned {
        /// The top layer.
        path: PathBuf,
    },
    /// A sealed layer's block does not match the CRC recorded when it was sealed.
    #[error("{}: block {block} fails its checksum (stored {stored:#010x}, data gives {actual:#010x}); run `cowdisk check`", path.display())]
    Checksum {
        /// The sealed layer.
        path: PathBuf,
        /// Block index.
        block: u64,
        /// CRC recorded at seal time.
        stored: u32,
        /// CRC of the bytes now.
        actual: u32,
    },
    /// Storage I/O failed.
    #[error("{}: {op} at file offset {offset}: {source}", path.display())]
    Storage {
        /// The layer file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// File offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl IoError {
    /// The class of this error.
    pub fn kind(&self) -> IoErrorKind {
        match self {
            IoError::OutOfRange { .. } => IoErrorKind::Invalid,
            IoError::ReadOnly => IoErrorKind::ReadOnly,
            IoError::NotFast => IoErrorKind::NotSupported,
            IoError::Poisoned { .. } | IoError::Checksum { .. } => IoErrorKind::Io,
            IoError::Storage { source, .. } => {
                if is_no_space(source) {
                    IoErrorKind::NoSpace
                } else {
                    IoErrorKind::Io
                }
            }
        }
    }
}

/// ENOSPC, EDQUOT and EFBIG all mean "no room for this write".
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    ) || matches!(e.raw_os_error(), Some(28) | Some(122) | Some(27))
}
