//! The tool's error type. Every message names the file it is about, so `main` prints
//! it as `cowdisk: <file>: <cause>`.

use std::path::{Path, PathBuf};

use cowdisk_core::{IoError, OpenError};
use thiserror::Error;

/// Why a command failed.
#[derive(Debug, Error)]
pub enum Error {
    /// Opening, creating or validating a layer or chain failed (names its file).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// I/O on an open disk failed.
    #[error("{}: {}", path.display(), source)]
    Disk {
        /// The image.
        path: PathBuf,
        /// What failed.
        #[source]
        source: IoError,
    },
    /// An OS call on a file failed.
    #[error("{}: {op}: {source}", path.display())]
    Os {
        /// The file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error whose message already names its file.
    #[error(transparent)]
    Named(IoError),
    /// Object storage: a remote layer, the store or its configuration (names the
    /// object or the setting).
    #[error(transparent)]
    Remote(#[from] cowdisk_remote::RemoteError),
    /// The request cannot be done (bad argument, wrong state).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// An I/O error on an open disk, attributed to `path` unless it names its own file.
    pub fn disk(path: &Path, source: IoError) -> Error {
        match source {
            // These already start with their file.
            IoError::Storage { .. } | IoError::Poisoned { .. } | IoError::Checksum { .. } => {
                Error::Named(source)
            }
            source => Error::Disk {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    /// An OS error on `path`.
    pub fn os(path: &Path, op: &'static str, source: std::io::Error) -> Error {
        Error::Os {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// A refused request about `path`.
    pub fn invalid(path: &Path, reason: impl Into<String>) -> Error {
        Error::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Result of a command.
pub type Result<T> = std::result::Result<T, Error>;
