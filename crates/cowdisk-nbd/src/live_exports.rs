//! Exports added and removed while the server runs ([`ExportsHandle`]).
//!
//! The table is replaced as a whole: a connection negotiates against the table it
//! started with, and once it enters transmission on an export it checks that the export
//! is still in the current table (removal updates the table first, then closes the
//! connections on it), so no connection outlives the removal of its export.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::error::ServerError;
use crate::export::{Export, Exports};
use crate::shutdown::Shared;
use crate::Backend;

/// The current exports.
pub(crate) struct ExportTable {
    cur: RwLock<Arc<Exports>>,
    max_name: usize,
}

impl ExportTable {
    pub fn new(exports: Exports, max_name: usize) -> ExportTable {
        ExportTable {
            cur: RwLock::new(Arc::new(exports)),
            max_name,
        }
    }

    /// The table as it is now.
    pub fn current(&self) -> Arc<Exports> {
        self.cur.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(
        &self,
        f: impl FnOnce(&Exports) -> Result<Exports, ServerError>,
    ) -> Result<(), ServerError> {
        let mut cur = self.cur.write().unwrap_or_else(|e| e.into_inner());
        let next = f(&cur)?;
        *cur = Arc::new(next);
        Ok(())
    }
}

/// What to do with the clients of an export being removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveClients {
    /// Wait up to this long for them to disconnect; fail (export already removed for new
    /// clients) if some are still there.
    Wait(Duration),
    /// Close their connections (requests in flight are answered or cut, as on eviction).
    Close,
}

/// Adds and removes exports of a running server (from [`crate::Server::exports_handle`]).
#[derive(Clone)]
pub struct ExportsHandle {
    pub(crate) table: Arc<ExportTable>,
    pub(crate) shared: Arc<Shared>,
}

impl ExportsHandle {
    /// Names of the exports now served.
    pub fn names(&self) -> Vec<String> {
        self.table
            .current()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Serves `backend` as export `name` from now on.
    pub fn add(&self, name: &str, backend: Arc<dyn Backend>) -> Result<(), ServerError> {
        if name.is_empty() || name.len() > self.table.max_name {
            return Err(ServerError::Config(format!(
                "export name {name:?} is empty or too long"
            )));
        }
        self.table.replace(|cur| {
            if cur.iter().any(|e| e.name == name) {
                return Err(ServerError::Config(format!("duplicate export {name:?}")));
            }
            Ok(cur.with(Export {
                name: name.to_string(),
                description: None,
                backend,
            }))
        })
    }

    /// Stops serving export `name`: new clients no longer find it, and its clients are
    /// waited for or closed; then its backend is flushed. Returns the backend and how
    /// many connections were closed.
    pub fn remove(
        &self,
        name: &str,
        clients: RemoveClients,
    ) -> Result<(Arc<dyn Backend>, usize), ServerError> {
        let mut backend = None;
        self.table.replace(|cur| {
            backend = cur
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.backend.clone());
            if backend.is_none() {
                return Err(ServerError::Config(format!("no export {name:?}")));
            }
            Ok(cur.without(name))
        })?;
        let backend = backend.ok_or_else(|| ServerError::Config(format!("no export {name:?}")))?;
        let table = &self.shared.table;
        let (closed, deadline) = match clients {
            RemoveClients::Close => (
                table.close_export(name),
                Instant::now() + Duration::from_secs(30),
            ),
            RemoveClients::Wait(d) => (0, Instant::now() + d),
        };
        while table.count_export(name) > 0 {
            if Instant::now() >= deadline {
                return Err(ServerError::Config(format!(
                    "export {name:?} removed, but {} client(s) are still connected",
                    table.count_export(name)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !backend.is_read_only() {
            backend.flush().map_err(|source| ServerError::Flush {
                export: name.to_string(),
                source,
            })?;
        }
        Ok((backend, closed))
    }
}
