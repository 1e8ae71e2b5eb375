//! The errors of building and running a server.

use std::io;

use thiserror::Error;

use crate::BackendError;

/// Errors building or running a [`Server`](crate::Server).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable (no export, duplicate or over-long name, unknown default).
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// A listener or the wake-up channel failed.
    #[error("listener I/O failed")]
    Io(#[source] io::Error),
    /// The final flush of a writable export failed at shutdown.
    #[error("flushing export {export:?} failed (at shutdown or removal)")]
    Flush {
        /// Export name.
        export: String,
        /// Backend failure.
        #[source]
        source: BackendError,
    },
}
