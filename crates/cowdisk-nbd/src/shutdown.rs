//! What the server's threads share to stop in order: the shutdown flag, the wake-up
//! channel of the accept loop, the run state, and the live connections.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    Idle,
    Serving,
    Done,
}

pub(crate) struct Shared {
    pub(crate) shutting_down: AtomicBool,
    pub(crate) wake_tx: UnixStream,
    pub(crate) wake_rx: UnixStream,
    pub(crate) state: Mutex<RunState>,
    pub(crate) finished: Condvar,
    /// Live connections, so shutdown can end their blocking reads.
    pub(crate) table: Table,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops a running [`Server`](crate::Server); cheap to clone and usable from any thread
/// (e.g. the binary's signal-handling thread).
#[derive(Clone)]
pub struct ShutdownHandle {
    pub(crate) shared: Arc<Shared>,
}

impl ShutdownHandle {
    /// Asks the server to stop without waiting: accepting stops, clients' blocking reads end,
    /// requests already received are still answered.
    pub fn request(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // A full pipe already holds a wake-up, so a failed write loses nothing.
        let _ = (&self.shared.wake_tx).write(&[1]);
    }

    /// Stops the server and waits until [`Server::serve`](crate::Server::serve) has
    /// answered in-flight requests and flushed every writable export. Returns at once if
    /// `serve` is not running. Must not be called from a [`Backend`](crate::Backend) method
    /// (it would wait for itself).
    pub fn shutdown(&self) {
        self.request();
        let mut st = self.shared.state();
        while *st == RunState::Serving {
            st = self
                .shared
                .finished
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether shutdown was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }
}
