//! Listening, accepting, per-connection threads and orderly shutdown.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use crate::budget::SharedBytes;
use crate::error::ServerError;
use crate::export::{Export, Exports};
use crate::handshake::{self, Outcome};
use crate::live_exports::{ExportTable, ExportsHandle};
use crate::reply::BufPool;
use crate::shutdown::{RunState, Shared, ShutdownHandle};
use crate::stream::{Deadline, Stream};
use crate::table::{Activity, Table};
use crate::{transmission, Backend, Limits};

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are whole messages; Nagle would only delay them.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Self::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// Builds a [`Server`]: exports first, then listeners.
#[derive(Default)]
pub struct ServerBuilder {
    exports: Vec<Export>,
    default: Option<String>,
    listeners: Vec<Listener>,
    limits: Limits,
}

impl ServerBuilder {
    /// Adds an export. Names must be unique, non-empty and at most
    /// [`Limits::max_export_name`] bytes.
    pub fn export(self, name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        self.export_with_description(name, None::<String>, backend)
    }

    /// Adds an export with a description shown by `LIST` and `INFO_DESCRIPTION`.
    pub fn export_with_description(
        mut self,
        name: impl Into<String>,
        description: Option<impl Into<String>>,
        backend: Arc<dyn Backend>,
    ) -> Self {
        self.exports.push(Export {
            name: name.into(),
            description: description.map(Into::into),
            backend,
        });
        self
    }

    /// Export selected by an empty name. Without it, an empty name selects the only export
    /// when there is exactly one.
    pub fn default_export(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// Replaces the resource limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves on a bound TCP listener (bind to loopback unless exposure is intended).
    pub fn tcp_listener(mut self, l: TcpListener) -> Self {
        self.listeners.push(Listener::Tcp(l));
        self
    }

    /// Serves on a bound Unix socket listener. The caller owns the socket file (creation,
    /// permissions, removal).
    pub fn unix_listener(mut self, l: UnixListener) -> Self {
        self.listeners.push(Listener::Unix(l));
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<Server, ServerError> {
        if self.exports.is_empty() {
            return Err(ServerError::Config("no export".into()));
        }
        for (i, e) in self.exports.iter().enumerate() {
            if e.name.is_empty() || e.name.len() > self.limits.max_export_name {
                return Err(ServerError::Config(format!(
                    "export name {:?} is empty or too long",
                    e.name
                )));
            }
            if self.exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ServerError::Config(format!(
                    "duplicate export {:?}",
                    e.name
                )));
            }
        }
        let default = match &self.default {
            None => None,
            Some(d) => Some(
                self.exports
                    .iter()
                    .position(|e| &e.name == d)
                    .ok_or_else(|| ServerError::Config(format!("unknown default export {d:?}")))?,
            ),
        };
        for l in &self.listeners {
            match l {
                Listener::Tcp(l) => l.set_nonblocking(true),
                Listener::Unix(l) => l.set_nonblocking(true),
            }
            .map_err(ServerError::Io)?;
        }
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(ServerError::Io)?;
        wake_tx.set_nonblocking(true).map_err(ServerError::Io)?;
        wake_rx.set_nonblocking(true).map_err(ServerError::Io)?;
        let io = Arc::new(transmission::ServerIo {
            // Enough free buffers for every worker of a few busy connections.
            pool: BufPool::new(4 * self.limits.workers_per_connection.max(1) + 8),
            read_bytes: SharedBytes::new(self.limits.max_total_in_flight_bytes),
            write_bytes: SharedBytes::new(self.limits.max_total_write_bytes),
        });
        Ok(Server {
            io,
            exports: Arc::new(ExportTable::new(
                Exports::new(self.exports, default),
                self.limits.max_export_name,
            )),
            listeners: self.listeners,
            limits: Arc::new(self.limits),
            shared: Arc::new(Shared {
                shutting_down: AtomicBool::new(false),
                wake_tx,
                wake_rx,
                state: Mutex::new(RunState::Idle),
                finished: Condvar::new(),
                table: Table::new(),
            }),
        })
    }
}

/// An NBD server over a fixed set of exports and listeners.
pub struct Server {
    exports: Arc<ExportTable>,
    listeners: Vec<Listener>,
    limits: Arc<Limits>,
    shared: Arc<Shared>,
    io: Arc<transmission::ServerIo>,
}

impl Server {
    /// Starts a builder.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// A handle that adds and removes exports while the server runs.
    pub fn exports_handle(&self) -> ExportsHandle {
        ExportsHandle {
            table: self.exports.clone(),
            shared: self.shared.clone(),
        }
    }

    /// A handle that stops [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Local addresses of the TCP listeners (useful after binding port 0).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(l) => l.local_addr().ok(),
                Listener::Unix(_) => None,
            })
            .collect()
    }

    /// Accepts and serves connections until shutdown is requested, then stops accepting,
    /// ends idle reads, waits for every in-flight request to be answered, flushes every
    /// writable export and returns. The first flush failure is returned.
    pub fn serve(self) -> Result<(), ServerError> {
        *self.shared.state() = RunState::Serving;
        let mut handles = Vec::new();
        let result = self.accept_loop(&mut handles);
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // Reads end with EOF; replies to requests already received can still be written.
        self.shared.table.shutdown_reads();
        for h in handles {
            // A panicking connection thread has already lost its connection; keep going.
            let _ = h.join();
        }
        let flushed = self.flush_all();
        *self.shared.state() = RunState::Done;
        self.shared.finished.notify_all();
        result.and(flushed)
    }

    fn flush_all(&self) -> Result<(), ServerError> {
        let mut result = Ok(());
        for e in self.exports.current().iter() {
            if e.backend.is_read_only() {
                continue;
            }
            if let Err(source) = e.backend.flush() {
                if result.is_ok() {
                    result = Err(ServerError::Flush {
                        export: e.name.clone(),
                        source,
                    });
                }
            }
        }
        result
    }

    fn accept_loop(&self, handles: &mut Vec<JoinHandle<()>>) -> Result<(), ServerError> {
        let mut ready = vec![false; self.listeners.len()];
        while !self.shared.shutting_down.load(Ordering::SeqCst) {
            {
                let mut fds = Vec::with_capacity(1 + self.listeners.len());
                fds.push(PollFd::new(&self.shared.wake_rx, PollFlags::IN));
                for l in &self.listeners {
                    let fd = match l {
                        Listener::Tcp(l) => l.as_fd(),
                        Listener::Unix(l) => l.as_fd(),
                    };
                    fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
                }
                match poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(ServerError::Io(e.into())),
                }
                if !fds[0].revents().is_empty() {
                    let mut sink = [0u8; 64];
                    while matches!((&self.shared.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
                }
                for (r, fd) in ready.iter_mut().zip(&fds[1..]) {
                    *r = !fd.revents().is_empty();
                }
            }
            for (l, _) in self.listeners.iter().zip(&ready).filter(|(_, r)| **r) {
                loop {
                    match l.accept() {
                        Ok(s) => {
                            if let Some(h) = self.spawn_connection(s) {
                                handles.push(h);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                        // Out of fds or memory (EMFILE, ENFILE, ENOMEM) must not stop the
                        // server, nor spin: the pending connection keeps the listener
                        // readable, so wait a little before polling again.
                        Err(_) => {
                            thread::sleep(Duration::from_millis(50));
                            break;
                        }
                    }
                }
            }
            handles.retain(|h| !h.is_finished());
        }
        Ok(())
    }

    fn spawn_connection(&self, s: Stream) -> Option<JoinHandle<()>> {
        let shared = &self.shared;
        // Accepted sockets must block; the listener's non-blocking mode is not wanted here.
        s.set_nonblocking(false).ok()?;
        // Full of busy connections: dropping the new one closes it, so the cap holds even
        // under a connection flood.
        let (id, activity) = shared.table.admit(&s, self.limits.max_connections)?;
        let (table, limits, sh) = (self.exports.clone(), self.limits.clone(), shared.clone());
        let io = self.io.clone();
        let spawned = thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                // Frees the slot however the connection ends, a panic included.
                let _slot = Slot {
                    shared: &sh,
                    stream: &s,
                    id,
                };
                let exports = table.current();
                let cx = ConnEnv {
                    table: &table,
                    limits: &limits,
                    shutting_down: &sh.shutting_down,
                    io: &io,
                    activity: &activity,
                };
                connection(&s, &exports, &cx);
            });
        match spawned {
            Ok(h) => Some(h),
            Err(_) => {
                shared.table.remove(id);
                None
            }
        }
    }
}

/// A connection's place in the server: closed and given back when dropped.
struct Slot<'a> {
    shared: &'a Shared,
    stream: &'a Stream,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.stream.shutdown(Shutdown::Both);
        self.shared.table.remove(self.id);
    }
}

/// What a connection needs from the server besides its stream and export table.
struct ConnEnv<'a> {
    table: &'a ExportTable,
    limits: &'a Limits,
    shutting_down: &'a AtomicBool,
    io: &'a transmission::ServerIo,
    activity: &'a Activity,
}

fn connection(s: &Stream, exports: &Exports, env: &ConnEnv<'_>) {
    let (limits, shutting_down) = (env.limits, env.shutting_down);
    if shutting_down.load(Ordering::SeqCst) {
        return;
    }
    let _ = s.set_write_timeout(Some(limits.handshake_timeout));
    let cx = handshake::Context {
        exports,
        limits,
        shutting_down,
    };
    let outcome = handshake::negotiate(&mut Deadline::new(s, limits.handshake_timeout), &cx);
    let Ok(Outcome::Transmission(session)) = outcome else {
        return;
    };
    let export = exports.get(session.export);
    // Tag first, then look: a removal either sees the tag or is seen here.
    env.activity.set_export(&export.name);
    if !env.table.current().iter().any(|e| e.name == export.name) {
        return;
    }
    if s.set_read_timeout(None).is_err() || s.set_write_timeout(Some(limits.reply_timeout)).is_err()
    {
        return;
    }
    let abort = || s.shutdown(Shutdown::Both);
    let cx = transmission::ConnCx {
        export,
        limits,
        abort: &abort,
        io: env.io,
        activity: env.activity,
    };
    transmission::serve(Deadline::none(s), s, session, &cx);
}
