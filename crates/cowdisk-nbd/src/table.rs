//! The connection table: live connections, whether each has a request in flight, and room
//! made for a new client by closing the connection idle the longest.
//!
//! A connection is idle while it has no request between header and reply: during the
//! handshake, and in transmission while it waits for the next request. Closing an idle
//! connection loses nothing: every request it sent has been answered, and a flush or FUA
//! it was answered for has already reached the disk.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::stream::Stream;

/// `busy` once the connection was closed to make room: it starts no request after that.
const EVICTED: usize = usize::MAX;

/// What one connection is doing, shared by its threads and the table.
pub(crate) struct Activity {
    /// Requests between header and reply, or [`EVICTED`].
    busy: AtomicUsize,
    /// When the connection last became idle, in nanoseconds since `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
    /// The export the connection chose, once it did (so removing an export finds them).
    export: Mutex<Option<String>>,
}

impl Activity {
    fn new(epoch: Instant) -> Activity {
        let a = Activity {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            epoch,
            export: Mutex::new(None),
        };
        a.touch();
        a
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(now, Ordering::SeqCst);
    }

    /// Marks a request as started (its header was read), until the guard drops after its
    /// reply. `None` once the connection was evicted: the request must not run.
    pub fn begin(&self) -> Option<Busy<'_>> {
        self.busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| match b {
                EVICTED => None,
                b => Some(b + 1),
            })
            .ok()?;
        Some(Busy(self))
    }

    /// Whether exactly one request is in flight (the caller's own).
    pub fn alone(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 1
    }

    /// Records the export the connection entered transmission on.
    pub fn set_export(&self, name: &str) {
        *self.export.lock().unwrap_or_else(|e| e.into_inner()) = Some(name.to_string());
    }

    fn is_on(&self, name: &str) -> bool {
        self.export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(name)
    }

    /// Whether no request is in flight.
    pub fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }

    /// Claims an idle connection for eviction; fails if a request is in flight.
    fn evict(&self) -> bool {
        self.busy
            .compare_exchange(0, EVICTED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// A request in flight on a connection (which therefore is not idle).
pub(crate) struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        // Stamped first, so a connection never looks idle since before its last reply.
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Entry {
    /// A clone, so the table can end the connection's blocking reads.
    stream: Stream,
    activity: Arc<Activity>,
}

/// Live connections by id.
pub(crate) struct Table {
    conns: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Table {
    pub fn new() -> Table {
        Table {
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection if there is room, closing the longest-idle one when the table holds
    /// `max` already; `None` if every connection is busy.
    pub fn admit(&self, s: &Stream, max: usize) -> Option<(u64, Arc<Activity>)> {
        let stream = s.try_clone().ok()?;
        let mut conns = self.lock();
        if conns.len() >= max {
            let mut idle: Vec<(u64, u64)> = conns
                .iter()
                .map(|(id, e)| (e.activity.idle_since.load(Ordering::SeqCst), *id))
                .collect();
            idle.sort_unstable();
            let victim = idle
                .into_iter()
                .find(|(_, id)| conns[id].activity.evict())
                .map(|(_, id)| id)?;
            if let Some(e) = conns.remove(&victim) {
                e.stream.shutdown(Shutdown::Both);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch));
        conns.insert(
            id,
            Entry {
                stream,
                activity: activity.clone(),
            },
        );
        Some((id, activity))
    }

    /// Removes a connection (no-op if it was evicted).
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes every connection on export `name`; returns how many.
    pub fn close_export(&self, name: &str) -> usize {
        let conns = self.lock();
        let on: Vec<&Entry> = conns.values().filter(|e| e.activity.is_on(name)).collect();
        for e in &on {
            e.stream.shutdown(Shutdown::Both);
        }
        on.len()
    }

    /// How many connections are on export `name`.
    pub fn count_export(&self, name: &str) -> usize {
        self.lock()
            .values()
            .filter(|e| e.activity.is_on(name))
            .count()
    }

    /// Ends every connection's reads (shutdown): replies can still be written.
    pub fn shutdown_reads(&self) {
        for e in self.lock().values() {
            e.stream.shutdown(Shutdown::Read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_connection_is_never_evicted() {
        let a = Activity::new(Instant::now());
        let busy = a.begin().expect("not evicted");
        assert!(!a.evict());
        drop(busy);
        assert!(a.evict());
        assert!(a.begin().is_none());
    }
}
