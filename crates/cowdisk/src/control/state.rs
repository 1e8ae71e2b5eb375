//! What a control socket acts on: the served exports, the sockets made for them, and
//! the command dispatcher. The server (`super::server`) and the commands
//! (`super::handlers`, `super::exports`) both build on it and on nothing of each other
//! but what they are handed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use cowdisk_core::LowerCache;
use cowdisk_nbd::ExportsHandle;
use serde_json::Value;

use super::Failure;
use crate::serve::live::LiveDisk;

/// One export as the control interface sees it.
pub struct Target {
    /// The export's NBD name.
    pub name: String,
    /// The served image.
    pub live: Arc<LiveDisk>,
}

/// Everything a control socket can act on.
pub struct Control {
    /// The exports, in the order they were given to `serve` or added.
    exports: RwLock<Vec<Arc<Target>>>,
    /// Adds and removes exports of the NBD server; `None` for a ublk device (`serve
    /// --ublk`), which has no NBD exports.
    pub(crate) handle: Option<ExportsHandle>,
    /// Shares lower chains between the server's disks.
    pub(crate) cache: Arc<LowerCache>,
    /// Runs a command (the control server calls it; [`super::handlers::run`] in `serve`).
    pub(crate) run: Dispatch,
    /// Control sockets made, with the export each one addresses by default.
    sockets: Mutex<Vec<(Option<String>, PathBuf)>>,
}

impl Control {
    /// The control state of a server serving `exports` through `handle`, whose
    /// commands `run` carries out.
    pub fn new(
        exports: Vec<Target>,
        handle: Option<ExportsHandle>,
        cache: Arc<LowerCache>,
        run: Dispatch,
    ) -> Control {
        Control {
            exports: RwLock::new(exports.into_iter().map(Arc::new).collect()),
            handle,
            cache,
            run,
            sockets: Mutex::new(Vec::new()),
        }
    }

    /// Records a control socket made at `path` for `default` (by
    /// [`super::server::open_socket`]), to remove with its export or at exit.
    pub(crate) fn add_socket(&self, default: Option<String>, path: &Path) {
        lock(&self.sockets).push((default, path.to_path_buf()));
    }

    /// True if `serve --control PATH` made one socket for all exports.
    pub fn single_socket(&self) -> bool {
        lock(&self.sockets).iter().any(|(d, _)| d.is_none())
    }

    /// True while export `name` is served.
    pub fn has_export(&self, name: &str) -> bool {
        self.list().iter().any(|t| t.name == name)
    }

    /// Removes the sockets made for export `name` (after it was removed): their
    /// listeners see it gone at the next connection, which this makes.
    fn close_sockets_of(&self, name: &str) {
        let mut socks = lock(&self.sockets);
        socks.retain(|(d, p)| {
            if d.as_deref() != Some(name) {
                return true;
            }
            let _ = std::os::unix::net::UnixStream::connect(p);
            let _ = std::fs::remove_file(p);
            false
        });
    }

    /// Removes every control socket file (at exit).
    pub fn remove_sockets(&self) {
        for (_, p) in lock(&self.sockets).drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The exports now served.
    pub fn list(&self) -> Vec<Arc<Target>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn push(&self, t: Target) {
        self.exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(t));
    }

    pub(crate) fn drop_export(&self, name: &str) {
        self.exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| t.name != name);
        self.close_sockets_of(name);
    }
}

/// A command's `result`, or why it failed.
pub type Reply = Result<Value, Failure>;

/// Runs one command: the control state, the export a request naming none addresses, the
/// command and the whole request.
pub type Dispatch = fn(&Arc<Control>, Option<&str>, &str, &Value) -> Reply;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
