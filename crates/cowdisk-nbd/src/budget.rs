//! In-flight budgets: what bounds the memory requests can hold.
//!
//! Per connection, [`Budget`] counts requests and their bytes (taken before a payload is
//! read, so a full budget stops the reading). Server-wide, one [`SharedBytes`] counts read
//! buffers and another staged WRITE payloads, so memory follows the budgets, not the number of
//! clients. A connection may hold at most half of a server-wide budget, so one that stalls
//! cannot starve the others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::reply::BufPool;

/// Counts requests and bytes in flight on one connection; `acquire` blocks while the budget
/// is used up.
pub(crate) struct Budget {
    /// Requests, bytes, and threads waiting in `acquire`.
    used: Mutex<(usize, usize, usize)>,
    freed: Condvar,
    max_count: usize,
    max_bytes: usize,
}

impl Budget {
    pub fn new(max_count: usize, max_bytes: usize) -> Budget {
        Budget {
            used: Mutex::new((0, 0, 0)),
            freed: Condvar::new(),
            max_count: max_count.max(1),
            max_bytes,
        }
    }

    /// Takes one request of `bytes`, given back when the guard drops (also on a panic).
    pub fn acquire(&self, bytes: usize) -> Cost<'_> {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        // A single request larger than the byte budget may run alone.
        while u.0 >= self.max_count || (u.0 > 0 && u.1 + bytes > self.max_bytes) {
            u.2 += 1;
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
            u.2 -= 1;
        }
        u.0 += 1;
        u.1 += bytes;
        Cost {
            budget: self,
            bytes,
        }
    }

    /// Takes one request of `bytes` if the budget has room now.
    pub fn try_acquire(&self, bytes: usize) -> Option<Cost<'_>> {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if u.0 >= self.max_count || (u.0 > 0 && u.1 + bytes > self.max_bytes) {
            return None;
        }
        u.0 += 1;
        u.1 += bytes;
        Some(Cost {
            budget: self,
            bytes,
        })
    }

    fn release(&self, bytes: usize) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        u.0 = u.0.saturating_sub(1);
        u.1 = u.1.saturating_sub(bytes);
        // A notify is a system call even with no one waiting: once per request added up
        // to a fifth of a small read's system calls.
        if u.2 > 0 {
            self.freed.notify_all();
        }
    }
}

/// Per-connection budget held by one request.
pub(crate) struct Cost<'c> {
    budget: &'c Budget,
    bytes: usize,
}

impl Drop for Cost<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Bytes in flight across all connections, for one kind of buffer.
pub(crate) struct SharedBytes {
    /// Bytes held, and threads waiting in `acquire`.
    used: Mutex<(usize, usize)>,
    freed: Condvar,
    max: usize,
}

impl SharedBytes {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> SharedBytes {
        SharedBytes {
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
            max,
        }
    }

    /// Bytes held now, by all connections.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn fits(&self, used: usize, held: usize, bytes: usize) -> bool {
        used + bytes <= self.max && held + bytes <= self.max / 2
    }

    /// Waits for `bytes` for a connection whose share is `share`. A single request larger
    /// than the budget (or than half of it) may run alone.
    pub fn acquire<'a>(&'a self, bytes: usize, share: &'a AtomicUsize) -> Held<'a> {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // `share` only changes under our lock, so this wait never blocks its releases.
            let h = share.load(Ordering::SeqCst);
            let over_all = u.0 > 0 && u.0 + bytes > self.max;
            let over_share = h > 0 && h + bytes > self.max / 2;
            if !over_all && !over_share {
                break;
            }
            u.1 += 1;
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
            u.1 -= 1;
        }
        u.0 += bytes;
        share.fetch_add(bytes, Ordering::SeqCst);
        Held {
            budget: self,
            share,
            bytes,
        }
    }

    /// An empty hold, grown with [`Held::try_grow`].
    pub fn none<'a>(&'a self, share: &'a AtomicUsize) -> Held<'a> {
        Held {
            budget: self,
            share,
            bytes: 0,
        }
    }

    fn try_take(&self, bytes: usize, share: &AtomicUsize) -> bool {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if !self.fits(u.0, share.load(Ordering::SeqCst), bytes) {
            return false;
        }
        u.0 += bytes;
        share.fetch_add(bytes, Ordering::SeqCst);
        true
    }

    fn release(&self, bytes: usize, share: &AtomicUsize) {
        if bytes == 0 {
            return;
        }
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        u.0 = u.0.saturating_sub(bytes);
        share.fetch_sub(bytes.min(share.load(Ordering::SeqCst)), Ordering::SeqCst);
        // Counted under the lock, which a waiter holds until it sleeps: no wake-up is
        // lost, and none is sent (a system call) when no one waits.
        let waiting = u.1 > 0;
        drop(u);
        if waiting {
            self.freed.notify_all();
        }
    }
}

/// Server-wide bytes held by one request, given back when dropped (also on a panic).
pub(crate) struct Held<'a> {
    budget: &'a SharedBytes,
    share: &'a AtomicUsize,
    bytes: usize,
}

impl Held<'_> {
    /// Takes `bytes` more if the budget has room now; never waits.
    pub fn try_grow(&mut self, bytes: usize) -> bool {
        let ok = self.budget.try_take(bytes, self.share);
        if ok {
            self.bytes += bytes;
        }
        ok
    }

    /// A zeroed buffer of `len` bytes, `len` being what this hold was taken for. A pooled
    /// buffer may be larger: its extra capacity is held too, or a buffer of the exact size is
    /// allocated instead, so what is held always covers the memory.
    pub fn buffer(&mut self, pool: &BufPool, len: usize) -> Vec<u8> {
        let buf = pool.get(len);
        let extra = buf.capacity().saturating_sub(len);
        if extra == 0 || self.try_grow(extra) {
            return buf;
        }
        pool.put(buf);
        vec![0; len]
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes, self.share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_growth_stay_within_the_budget() {
        let b = SharedBytes::new(100);
        let (one, two) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut a = b.none(&one);
        assert!(a.try_grow(50));
        // Over half the budget for one connection.
        assert!(!a.try_grow(1));
        let mut c = b.none(&two);
        assert!(c.try_grow(50));
        assert!(!c.try_grow(1));
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!((b.used(), one.load(Ordering::SeqCst)), (50, 0));
        drop(c);
        assert_eq!(b.used(), 0);
        // A read larger than the whole budget still runs, alone.
        let big = b.acquire(500, &one);
        assert_eq!(b.used(), 500);
        drop(big);
        assert_eq!(b.used(), 0);
    }

    /// Waiters are woken by the release they wait for (notifications are sent only when
    /// someone waits, so a lost one would hang): many threads, a budget of one.
    #[test]
    fn every_waiter_is_woken_by_releases() {
        use std::sync::atomic::AtomicUsize as Count;
        let conn = Budget::new(1, usize::MAX);
        let shared = SharedBytes::new(10);
        let done = Count::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let share = AtomicUsize::new(0);
                    for _ in 0..200 {
                        drop(conn.acquire(1));
                        let _h = shared.acquire(10, &share);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(done.load(Ordering::SeqCst), 1600);
        assert_eq!(shared.used(), 0);
        assert_eq!(shared.used.lock().unwrap().1, 0, "no waiter left counted");
    }
}
