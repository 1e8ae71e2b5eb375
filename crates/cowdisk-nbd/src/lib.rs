//! NBD (network block device) server protocol for cowdisk.
//!
//! ```text
//!   listeners (TCP, Unix) ── server: accept, shutdown; table: connection cap, the
//!        │ per connection             longest-idle connection closed to admit a new one
//!        ▼
//!   handshake (fixed newstyle options) ──► transmission: N threads take turns reading;
//!                                          each runs what it read on the Backend (one per
//!                                          export), then replies (write / sendfile)
//!                                               │ validate (pure), budget (memory),
//!                                               │ payload (WRITE data), reply
//!                                               ▼
//!                                          wire (pure codec)
//! ```
//!
//! Implements fixed newstyle negotiation (`EXPORT_NAME`, `GO`, `INFO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST/SET_META_CONTEXT` with `base:allocation` and
//! `qemu:allocation-depth`), and every transmission command (`READ`, `WRITE`, `FLUSH`, `TRIM`,
//! `CACHE`, `WRITE_ZEROES`, `BLOCK_STATUS`, `DISC`) with simple and structured replies,
//! pipelined and answered out of order. No TLS, no extended headers.
//!
//! The library never prints, installs signal handlers or exits the process.
//!
//! ```no_run
//! use std::sync::Arc;
//! use cowdisk_nbd::{mem::MemBackend, Server};
//!
//! let server = Server::builder()
//!     .export("disk", Arc::new(MemBackend::new(64 << 20)))
//!     .tcp_listener(std::net::TcpListener::bind("127.0.0.1:0")?)
//!     .build()?;
//! let stop = server.shutdown_handle();
//! let t = std::thread::spawn(move || server.serve());
//! stop.shutdown(); // answers in-flight requests, flushes, then returns
//! t.join().expect("server thread")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod budget;
mod error;
mod export;
mod gather;
mod handshake;
mod limits;
mod live_exports;
pub mod mem;
mod outbox;
mod payload;
mod reply;
mod server;
mod shutdown;
mod staged;
mod stream;
mod table;
mod transmission;
mod validate;
pub mod wire;

pub use backend::{
    Backend, BackendError, BackendErrorKind, DirtyExtent, Extent, ReadPiece, WriteTarget, ZeroFlags,
};
pub use error::ServerError;
pub use limits::Limits;
pub use live_exports::{ExportsHandle, RemoveClients};
pub use server::{Server, ServerBuilder};
pub use shutdown::ShutdownHandle;
