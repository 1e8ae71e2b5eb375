//! Serves a block device through Linux's ublk driver: `/dev/ublkbN` whose requests this
//! process answers over io_uring, without a network protocol in between (compare NBD,
//! where the kernel and the server talk through a socket).
//!
//! ```text
//!   file system / fio ──> /dev/ublkbN ──(ublk_drv, io_uring commands)──> queue threads
//!                                                                          │
//!                                                        [`Target`] (the engine's disk)
//! ```
//!
//! The kernel side is driven by the `libublk` crate (ublk-org/libublk-rs): device
//! creation and removal through `/dev/ublk-control`, one thread per hardware queue, each
//! with its own io_uring on `/dev/ublkcN`. The engine is synchronous: by default a queue's
//! thread runs its requests in turn through [`Target`]'s calls; with
//! [`Options::threads`] above 1, worker threads run them in parallel, and a request that
//! arrives alone still runs on the queue thread, without a hand-off.
//!
//! This is the one crate of the workspace that may use `unsafe` (the kernel interface);
//! today it needs none of its own: libublk owns the shared buffers and rings, and this
//! crate reaches the request buffers through libublk's safe slices.

#![deny(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;

mod device;
mod pool;
mod request;

pub use device::{remove_dead, serve, Stop};
pub use request::Request;

/// A disk as the block device sees it: the calls ublk requests become. Implementations
/// do their own locking (queues call in parallel) and must not panic on bad input: a
/// request out of range is a [`Failure::Invalid`].
pub trait Target: Send + Sync + 'static {
    /// Size in bytes (the device gets the whole 512-byte sectors of it).
    fn size(&self) -> u64;
    /// Writes, discards and write-zeroes are refused (the device is made read-only).
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Failure>;
    /// Writes `data` at `offset`; with `fua`, durable when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), Failure>;
    /// Makes every write completed before it durable.
    fn flush(&self) -> Result<(), Failure>;
    /// The range may read back as zeros and its space be released.
    fn discard(&self, offset: u64, len: u64) -> Result<(), Failure>;
    /// The range reads as zeros afterwards; `may_unmap` allows releasing its space.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Failure>;
}

/// Why a request failed, as the block layer is told (an errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An I/O error (`EIO`).
    Io,
    /// No space left for the data (`ENOSPC`, the block layer's `BLK_STS_NOSPC`).
    NoSpace,
    /// The disk is read-only (`EROFS`).
    ReadOnly,
    /// A malformed request, e.g. out of range (`EINVAL`).
    Invalid,
    /// An operation the target does not do (`EOPNOTSUPP`).
    NotSupported,
}

impl Failure {
    /// The negative errno the request completes with.
    pub fn errno(self) -> i32 {
        -match self {
            Failure::Io => libc::EIO,
            Failure::NoSpace => libc::ENOSPC,
            Failure::ReadOnly => libc::EROFS,
            Failure::Invalid => libc::EINVAL,
            Failure::NotSupported => libc::EOPNOTSUPP,
        }
    }
}

/// How the device is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hardware queues, each served by one thread (1-32).
    pub queues: u16,
    /// Requests each queue may have outstanding (1-1024).
    pub depth: u16,
    /// Threads running each queue's requests (1-64); with 1, the queue thread runs them
    /// one after the other.
    pub threads: u16,
    /// Largest request in bytes (a multiple of 4096; each queue holds `depth` buffers of
    /// this size).
    pub max_io_bytes: u32,
    /// Granularity advertised for discards (a power of two, at least 4096): the engine's
    /// block size, so file systems send discards it can turn into whiteouts.
    pub discard_granularity: u32,
}

impl Default for Options {
    /// One queue per CPU (at most 8), 64 requests each answered in turn by the queue's
    /// own thread (worker threads were slower in the emulated guest benchmark, where
    /// every hand-off is expensive), 512 KiB requests: kernel nbd
    /// caps requests at 64 KiB, and larger ones are what ublk gains most on.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Options {
            queues: u16::try_from(cpus.min(8)).unwrap_or(1),
            depth: 64,
            threads: 1,
            max_io_bytes: 512 << 10,
            discard_granularity: 4096,
        }
    }
}

/// The device made, as the `started` callback of [`serve`] sees it.
#[derive(Debug, Clone)]
pub struct Device {
    /// The driver's device number N.
    pub id: u32,
    /// `/dev/ublkbN`.
    pub path: PathBuf,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The driver is not there (not Linux, or `ublk_drv` not loaded).
    #[error("no /dev/ublk-control: the ublk driver is not loaded (modprobe ublk_drv; Linux 6.0 or later)")]
    NoDriver,
    /// Bad [`Options`].
    #[error("invalid ublk options: {0}")]
    Options(&'static str),
    /// The disk's size is not usable as a device (under one sector).
    #[error("the disk is too small for a block device ({0} bytes)")]
    TooSmall(u64),
    /// The driver refused to add or start the device.
    #[error("ublk: cannot {op} the device: {source}")]
    Driver {
        /// What was asked.
        op: &'static str,
        /// The driver's errno, or libublk's own failure.
        #[source]
        source: std::io::Error,
    },
    /// [`remove_dead`] on a device that is not dead.
    #[error("ublk device {id} is not dead (its server, PID {pid}, or a recovery owns it): stop that server instead")]
    NotDead {
        /// The device number.
        id: u32,
        /// The server the driver records for it.
        pid: i32,
    },
    /// The final flush after the device was removed failed: writes may not be durable.
    #[error("flushing the disk after removing the device failed ({0:?})")]
    Flush(Failure),
}

impl ServeError {
    /// A libublk failure as an OS error: libublk reports the driver's answers as
    /// negative errnos, which say more than its own messages ("other failure").
    pub(crate) fn driver(op: &'static str, e: libublk::UblkError) -> ServeError {
        use libublk::UblkError as U;
        let source = match e {
            U::OtherError(n) | U::UringIOError(n) if n < 0 => std::io::Error::from_raw_os_error(-n),
            U::IOError(e) => e,
            e => std::io::Error::other(e.to_string()),
        };
        ServeError::Driver { op, source }
    }
}

/// A handle the queue threads share.
pub(crate) type SharedTarget = Arc<dyn Target>;
