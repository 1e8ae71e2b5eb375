//! Errors of the remote layer code. Every message names the object (as `s3://bucket/key`)
//! or the configuration field, and never an endpoint URL, a signature or a credential:
//! signed URLs carry the access key id, so they are never formatted into a message.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Something went wrong talking to the store or with what it returned.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// A location that is not a usable `s3://BUCKET/KEY`.
    #[error("{url}: bad s3 URL: {reason}")]
    BadUrl {
        /// The text (bounded, control characters replaced).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Configuration from the environment or the shared config files.
    #[error("s3 configuration: {field}: {reason}")]
    Config {
        /// The variable, file or field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store answered with an error status.
    #[error("{object}: {op}: the store answered HTTP {status}{}", status_hint(*status, code.as_deref()))]
    Status {
        /// The object.
        object: String,
        /// What we tried (GET, PUT, ...).
        op: &'static str,
        /// HTTP status.
        status: u16,
        /// The S3 error code from the body, if any.
        code: Option<String>,
    },
    /// The object does not exist.
    #[error("{object}: no such object")]
    NotFound {
        /// The object.
        object: String,
    },
    /// An object that was there at open is missing: a store coming back up (its data
    /// servers not ready yet) answers like this, so it is retried until the deadline.
    #[error("{object}: missing from the store, although it was there at open")]
    Vanished {
        /// The object.
        object: String,
    },
    /// The request did not complete (connection refused, reset, TLS, DNS).
    #[error("{object}: {op}: {reason}")]
    Transport {
        /// The object.
        object: String,
        /// What we tried.
        op: &'static str,
        /// The cause, without any URL.
        reason: String,
    },
    /// The store's TLS certificate was refused (not retried).
    #[error("{object}: TLS: {reason} (certificates are verified; SSL_CERT_FILE names extra trusted ones)")]
    Tls {
        /// The object.
        object: String,
        /// The verifier's reason.
        reason: String,
    },
    /// Retries went on until the deadline.
    #[error("{object}: {op}: no answer within the {secs} s deadline ({last})")]
    Deadline {
        /// The object.
        object: String,
        /// What we tried.
        op: &'static str,
        /// The deadline.
        secs: u64,
        /// The last failure seen.
        last: String,
    },
    /// The object is not a valid layer object, or not the one expected.
    #[error("{object}: {reason}")]
    BadObject {
        /// The object.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// A local file operation.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What we tried.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A layer file problem found by the engine.
    #[error(transparent)]
    Layer(#[from] cowdisk_core::OpenError),
}

impl RemoteError {
    /// A local I/O error.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> RemoteError {
        RemoteError::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// A malformed or unexpected object.
    pub fn bad_object(object: impl ToString, reason: impl Into<String>) -> RemoteError {
        RemoteError::BadObject {
            object: object.to_string(),
            reason: reason.into(),
        }
    }

    /// Worth retrying: the store may answer next time (5xx, 429, transport). A missing
    /// object is retried only where it is known to exist ([`RemoteError::Vanished`]).
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Status { status, .. } => *status >= 500 || *status == 429,
            RemoteError::Transport { .. } | RemoteError::Vanished { .. } => true,
            _ => false,
        }
    }

    /// As an `io::Error` for the storage traits (the message is kept).
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            RemoteError::NotFound { .. } => io::ErrorKind::NotFound,
            RemoteError::Deadline { .. } => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self.to_string())
    }
}

/// The S3 error code, or for a bodiless answer (HEAD) what the status usually means.
fn status_hint(status: u16, code: Option<&str>) -> String {
    match (code, status) {
        (Some(c), _) => format!(" ({c})"),
        (None, 401 | 403) => " (access denied: check the credentials and their rights)".into(),
        _ => String::new(),
    }
}

/// Result with [`RemoteError`].
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;
