//! The storage interface the server drives: one shared object per export.

use std::os::fd::BorrowedFd;

use thiserror::Error;

/// What a backend failure means to the client; each kind maps to one NBD errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// I/O or sync failure, corrupt metadata (`EIO`).
    Io,
    /// The storage under the export is full (`ENOSPC`).
    NoSpace,
    /// The export cannot be written (`EPERM`).
    ReadOnly,
    /// The request is not acceptable to the backend, e.g. misaligned (`EINVAL`).
    Invalid,
    /// A `FAST_ZERO` request would not be fast; nothing was changed (`ENOTSUP`).
    NotSupported,
}

impl BackendErrorKind {
    /// The NBD error number sent to the client for this kind.
    pub fn errno(self) -> u32 {
        use crate::wire::errno;
        match self {
            Self::Io => errno::EIO,
            Self::NoSpace => errno::ENOSPC,
            Self::ReadOnly => errno::EPERM,
            Self::Invalid => errno::EINVAL,
            Self::NotSupported => errno::ENOTSUP,
        }
    }
}

/// A failed backend operation.
#[derive(Debug, Clone, Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// Category, which decides the errno on the wire.
    pub kind: BackendErrorKind,
    /// Human-readable detail; may be sent to the client in a structured error chunk.
    pub message: String,
}

impl BackendError {
    /// Builds an error of `kind` with a message.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Flags of a `WRITE_ZEROES` request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must be durable before the reply.
    pub fua: bool,
    /// Keep the range allocated (do not punch a hole).
    pub no_hole: bool,
    /// Fail with [`BackendErrorKind::NotSupported`] at once, changing nothing, unless zeroing is
    /// faster than writing zeros.
    pub fast: bool,
}

/// One run of bytes with the same allocation state, as reported by [`Backend::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; must be non-zero.
    pub length: u64,
    /// Reads return zeros (`base:allocation` `NBD_STATE_ZERO`).
    pub zero: bool,
    /// The range uses no storage (`base:allocation` `NBD_STATE_HOLE`); only meaningful with `zero`.
    pub hole: bool,
    /// `qemu:allocation-depth`: 0 unallocated, 1 top layer, 2 first backing layer, ...
    pub depth: u32,
}

/// One run of bytes of a dirty bitmap (`qemu:dirty-bitmap:NAME`), as reported by
/// [`Backend::dirty_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    /// Length in bytes; must be non-zero.
    pub length: u64,
    /// The bytes may have changed since the bitmap's checkpoint (wire flag 1).
    pub dirty: bool,
}

/// Where part of a read's bytes are (see [`Backend::read_pieces`]).
#[derive(Debug, Clone, Copy)]
pub enum ReadPiece<'a> {
    /// This many bytes of zeros.
    Zeros(u64),
    /// `len` bytes of an open file at file offset `offset`.
    File {
        /// The file.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes of a file at `offset` that are good only if
    /// [`Backend::staged_valid`] accepts `tag` and `token` after they were read (a cache
    /// that may drop them meanwhile). The server reads them into a pipe, asks, and sends
    /// them on, or, if not, sends what [`Backend::read`] returns for them instead.
    Staged {
        /// The file.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Opaque to the server (the backend's own key).
        tag: u64,
        /// Opaque to the server.
        token: u64,
    },
    /// `len` bytes of a file opened for direct I/O at `offset`, both multiples of 4096:
    /// the server reads them into an aligned buffer (several requests' at once through
    /// io_uring) instead of sending them with `sendfile(2)`.
    Direct {
        /// The file, opened with `O_DIRECT`.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl ReadPiece<'_> {
    /// The bytes of the read this piece stands for.
    pub(crate) fn bytes(&self) -> u64 {
        match *self {
            ReadPiece::Zeros(n)
            | ReadPiece::File { len: n, .. }
            | ReadPiece::Staged { len: n, .. }
            | ReadPiece::Direct { len: n, .. } => n,
        }
    }
}

/// A WRITE the server does itself with direct I/O, many in flight at once through io_uring
/// ([`Backend::write_target`]): `len` bytes from an aligned buffer to [`WriteTarget::fd`]
/// at [`WriteTarget::offset`]. The backend holds whatever keeps that place right for the
/// write until [`WriteTarget::finish`].
pub trait WriteTarget<'a> {
    /// The file, opened with `O_DIRECT`.
    fn fd(&self) -> BorrowedFd<'a>;
    /// Where in the file the bytes go.
    fn offset(&self) -> u64;
    /// Ends the write: `written` says whether every byte reached the file. One that did
    /// not is then sent to [`Backend::write`], which reports the cause if it fails again.
    fn finish(self: Box<Self>, written: bool);
}

/// A block device exported over NBD.
///
/// One object serves every connection to its export, concurrently, so `flush` must make every
/// completed write durable no matter which connection sent it (this is what lets the server
/// advertise `CAN_MULTI_CONN`).
///
/// # Range validation
/// The server checks every range against [`Backend::size`] (with overflow checks) and the
/// payload limits before calling, so implementations receive only non-empty in-range requests.
/// They should still fail cleanly rather than panic on anything else.
pub trait Backend: Send + Sync {
    /// Export size in bytes; must not change while serving.
    fn size(&self) -> u64;
    /// Preferred I/O granularity, advertised as the `INFO_BLOCK_SIZE` preferred size; a power of
    /// two (other values are rounded to one the protocol accepts).
    fn preferred_block_size(&self) -> u32;
    /// Whether the export refuses writes; the server then answers them `EPERM` itself.
    fn is_read_only(&self) -> bool;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Zero-copy reads (optional): fills `out` with where the `len` bytes at `offset` are,
    /// after every check `read` makes, and returns `true`; the server then sends file ranges
    /// with `sendfile(2)` and needs no buffer. The pieces must stay readable and, for data the
    /// client did not change meanwhile, unchanged until the reply is sent. The default returns
    /// `false`: the server calls `read`.
    fn read_pieces<'a>(
        &'a self,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece<'a>>,
    ) -> Result<bool, BackendError> {
        let _ = (offset, len, out);
        Ok(false)
    }
    /// Whether the bytes of [`ReadPiece::Staged`] pieces with `tag` and `token` were
    /// good when read from their file (asked after reading them). Default: never.
    fn staged_valid(&self, tag: u64, token: u64) -> bool {
        let _ = (tag, token);
        false
    }
    /// Where the server may write the `len` bytes of a WRITE at `offset` itself (optional):
    /// a place in a file opened with `O_DIRECT`, after every check `write` makes, held for
    /// that write until [`WriteTarget::finish`]. With `wait` false the backend must not wait
    /// for anything another request may hold (the caller holds other targets). The default
    /// is `None`: the server calls `write`.
    fn write_target(
        &self,
        offset: u64,
        len: u32,
        wait: bool,
    ) -> Option<Box<dyn WriteTarget<'_> + '_>> {
        let _ = (offset, len, wait);
        None
    }
    /// Whether [`Backend::write_target`] may give targets (asked once per connection: the
    /// server then runs WRITEs already buffered together). Default: false.
    fn writes_in_place(&self) -> bool {
        false
    }
    /// Writes `data` at `offset`; with `fua` it is durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// Hint that the range is unused; its contents are unspecified until rewritten.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError>;
    /// Makes the range read back as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), BackendError>;
    /// Appends extents covering at least `[offset, offset+1)` and at most `[offset, offset+len)`,
    /// in order, contiguous.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BackendError>;
    /// A WRITE whose payload did not fit the write budget is about to reach [`Backend::write`]
    /// in pieces as it arrives; [`Backend::pieces_end`] follows when the last one was
    /// written or the payload was cut short. A backend that changes what it writes to (a
    /// live snapshot) can wait for such writes, so that none lands partly on each side.
    /// Default: nothing.
    fn pieces_begin(&self) {}
    /// See [`Backend::pieces_begin`].
    fn pieces_end(&self) {}
    /// Whether a request may wait on the network (a layer in an object store), for
    /// milliseconds where a local one takes microseconds. The server then never lets a
    /// request alone in flight keep the connection's input while it runs, so one slow
    /// fetch does not hold back requests sent behind it. Default: false.
    fn may_wait_on_network(&self) -> bool {
        false
    }
    /// Names of the dirty bitmaps offered as metadata contexts `qemu:dirty-bitmap:NAME`
    /// (qemu's semantics: flag 1 = changed since the bitmap's checkpoint). Default: none.
    fn dirty_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }
    /// A key for bitmap `name` that stays valid while the export serves (a connection keeps
    /// it from negotiation on), or `None` if there is no such bitmap.
    fn dirty_bitmap_key(&self, name: &str) -> Option<u64> {
        let _ = name;
        None
    }
    /// Appends extents covering at least `[offset, offset+1)` and at most
    /// `[offset, offset+len)`, in order, contiguous, saying which changed since the
    /// checkpoint of the bitmap with `key`.
    fn dirty_status(
        &self,
        key: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<DirtyExtent>,
    ) -> Result<(), BackendError> {
        let _ = (key, offset, len, out);
        Err(BackendError::new(
            BackendErrorKind::Invalid,
            "no dirty bitmaps on this export",
        ))
    }
}
