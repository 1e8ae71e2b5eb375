//! Transmission phase. Per connection, the connection's thread reads and validates requests
//! (and write payloads) and a writer thread sends replies; a server-wide pool of workers runs
//! the backend calls for every connection. Threads and I/O buffers thus scale with the CPUs,
//! not with the number of clients, and since workers never touch sockets, a client that stops
//! reading replies stalls only its own writer.
//!
//! Memory is bounded by a per-connection in-flight budget (request count and payload bytes)
//! taken before a payload is read or a request is queued, and given back once its reply has
//! been written.

use std::io::{self, Read, Write};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use crate::export::{Export, ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID};
use crate::handshake::Session;
use crate::reply::{self, BufPool, Bytes, Msg, READ_HEADROOM};
use crate::validate::{validate, Geometry, Op, Verdict};
use crate::wire::{self, cmd, state, Request};
use crate::{Backend, BackendError, BackendErrorKind, Extent, Limits};

/// Request bytes read from the socket at once.
const READ_BUFFER: usize = 64 * 1024;

/// Most extents sent per context in one reply; the client asks again for the rest.
const MAX_EXTENTS: usize = 1 << 16;

struct Job {
    req: Request,
    op: Op,
    payload: Vec<u8>,
    cost: usize,
}

/// Counts requests and bytes in flight; `acquire` blocks while the budget is used up.
struct Budget {
    used: Mutex<(usize, usize)>,
    freed: Condvar,
    max_count: usize,
    max_bytes: usize,
}

impl Budget {
    fn acquire(&self, bytes: usize) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        // A single request larger than the byte budget may run alone.
        while u.0 >= self.max_count || (u.0 > 0 && u.1 + bytes > self.max_bytes) {
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        u.0 += 1;
        u.1 += bytes;
    }
    fn release(&self, bytes: usize) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        u.0 = u.0.saturating_sub(1);
        u.1 = u.1.saturating_sub(bytes);
        self.freed.notify_all();
    }
    /// Waits until every accepted request has been answered.
    fn wait_idle(&self) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while u.0 > 0 {
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
        }
    }
}

type Task = Box<dyn FnOnce() + Send + 'static>;

/// The server-wide worker pool and the buffers its tasks use.
pub(crate) struct Workers {
    tx: Mutex<Option<mpsc::Sender<Task>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    pool: Arc<BufPool>,
}

impl Workers {
    /// Starts `n` workers (0 = two per CPU, at least 4).
    pub fn start(n: usize) -> Arc<Workers> {
        let n = if n == 0 {
            thread::available_parallelism()
                .map_or(2, |p| p.get())
                .saturating_mul(2)
                .max(4)
        } else {
            n
        };
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for _ in 0..n {
            let rx = rx.clone();
            let spawned = thread::Builder::new()
                .name("nbd-worker".into())
                .spawn(move || loop {
                    let task = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match task {
                        // A panicking backend call still gets its reply (see `Answer`); the worker lives on.
                        Ok(task) => drop(panic::catch_unwind(AssertUnwindSafe(task))),
                        Err(_) => return,
                    }
                });
            if let Ok(h) = spawned {
                handles.push(h);
            }
        }
        // Without any worker, tasks run inline on the connection's thread.
        let tx = if handles.is_empty() { None } else { Some(tx) };
        Arc::new(Workers {
            tx: Mutex::new(tx),
            handles: Mutex::new(handles),
            pool: Arc::new(BufPool::new(2 * n + 8)),
        })
    }

    fn submit(&self, task: Task) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match &*tx {
            Some(tx) => {
                if let Err(mpsc::SendError(task)) = tx.send(task) {
                    task();
                }
            }
            None => {
                drop(tx);
                let _ = panic::catch_unwind(AssertUnwindSafe(task));
            }
        }
    }

    /// Lets queued tasks finish and joins the workers.
    pub fn stop(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let handles: Vec<_> = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

/// What a connection's tasks share: owned, since tasks outlive no connection but run on
/// threads that are not the connection's.
struct Conn {
    backend: Arc<dyn Backend>,
    session: Session,
    tx: mpsc::Sender<Msg>,
    pool: Arc<BufPool>,
}

impl Conn {
    fn push(&self, bytes: Bytes, cost: usize) {
        // The writer outlives every sender, so this cannot fail while tasks exist.
        let _ = self.tx.send(Msg {
            bytes,
            release: cost,
        });
    }
}

/// Serves requests until `DISC`, EOF, a protocol violation or a dead socket, then waits for
/// every accepted request to be answered. `abort` must make blocked reads on `r` return (it is
/// called when a reply cannot be written).
pub(crate) fn serve<R: Read, W: Write + Send>(
    mut r: R,
    w: W,
    session: Session,
    export: &Export,
    limits: &Limits,
    abort: &(dyn Fn() + Sync),
    workers: &Workers,
) {
    let budget = Budget {
        used: Mutex::new((0, 0)),
        freed: Condvar::new(),
        max_count: limits.max_in_flight.max(1),
        max_bytes: limits.max_in_flight_bytes,
    };
    let failed = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Msg>();
    let conn = Arc::new(Conn {
        backend: export.backend.clone(),
        session,
        tx,
        pool: workers.pool.clone(),
    });
    let geo = Geometry {
        size: export.backend.size(),
        read_only: export.backend.is_read_only(),
        structured: session.structured,
        contexts: session.contexts,
        max_payload: limits.max_payload,
        max_drain: limits.max_drain.max(limits.max_payload),
    };
    let (budget, failed) = (&budget, &failed);
    thread::scope(move |sc| {
        let pool = &*workers.pool;
        let release = |cost| budget.release(cost);
        let spawned = thread::Builder::new()
            .name("nbd-writer".into())
            .spawn_scoped(sc, move || {
                reply::writer(w, rx, failed, abort, pool, &release)
            });
        if spawned.is_err() {
            return;
        }
        // Pipelined requests arrive back to back: read them in as few syscalls as possible.
        let mut r = io::BufReader::with_capacity(READ_BUFFER, &mut r);
        reader(&mut r, &conn, budget, failed, &geo, workers);
        budget.wait_idle();
        // The last sender goes with `conn` once no task holds it: the writer then ends.
        drop(conn);
    });
}

fn reader<R: Read>(
    r: &mut R,
    conn: &Arc<Conn>,
    budget: &Budget,
    failed: &AtomicBool,
    geo: &Geometry,
    workers: &Workers,
) {
    let mut hdr = [0u8; wire::REQUEST_LEN];
    while !failed.load(Ordering::SeqCst) {
        if r.read_exact(&mut hdr).is_err() {
            return;
        }
        let Some(req) = Request::parse(&hdr) else {
            return; // Bad magic: framing is lost, hang up.
        };
        let op = match validate(&req, geo) {
            Verdict::Disconnect | Verdict::Run(Op::Disc) => return,
            Verdict::Error(e) => {
                if req.kind == cmd::WRITE && drain(r, u64::from(req.length)).is_err() {
                    return;
                }
                // Error replies count against the budget too, so a client that never reads
                // cannot make them pile up.
                budget.acquire(0);
                conn.push(reply::error(conn.session.structured, &req, e, ""), 0);
                continue;
            }
            Verdict::Run(op) => op,
        };
        let cost = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len as usize,
            _ => 0,
        };
        budget.acquire(cost);
        let mut payload = Vec::new();
        if let Op::Write { len, .. } = op {
            payload = conn.pool.get(len as usize);
            if r.read_exact(&mut payload).is_err() {
                // Half a payload is never applied (the client went away).
                conn.pool.put(payload);
                budget.release(cost);
                return;
            }
        }
        let job = Job {
            req,
            op,
            payload,
            cost,
        };
        let c = conn.clone();
        workers.submit(Box::new(move || run(&c, job)));
    }
}

/// Reads and discards `len` bytes through a small fixed buffer.
fn drain<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied == len {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// Guarantees every accepted request exactly one reply, even if the backend panics.
struct Answer<'a> {
    conn: &'a Conn,
    req: Request,
    cost: usize,
    done: bool,
}

impl Answer<'_> {
    fn send(mut self, bytes: Bytes) {
        self.done = true;
        self.conn.push(bytes, self.cost);
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if !self.done {
            let e = reply::error(
                self.conn.session.structured,
                &self.req,
                wire::errno::EIO,
                "internal error",
            );
            self.conn.push(e, self.cost);
        }
    }
}

fn run(conn: &Conn, job: Job) {
    let Job {
        req,
        op,
        payload,
        cost,
    } = job;
    let answer = Answer {
        conn,
        req,
        cost,
        done: false,
    };
    let b = &*conn.backend;
    let sr = conn.session.structured;
    let req = &answer.req;
    let bytes = match op {
        Op::Read { offset, len } => {
            let mut buf = conn.pool.get(READ_HEADROOM + len as usize);
            match b.read(offset, &mut buf[READ_HEADROOM..]) {
                Ok(()) => reply::read_data(sr, req, offset, buf),
                Err(e) => {
                    conn.pool.put(buf);
                    reply::backend_error(sr, req, &e)
                }
            }
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => match block_status(conn, req, offset, len, req_one) {
            Ok(chunks) => Bytes::Buf(chunks, 0),
            Err(e) => reply::backend_error(sr, req, &e),
        },
        op => {
            let res = match op {
                Op::Write { offset, fua, .. } => b.write(offset, &payload, fua),
                Op::Flush if b.is_read_only() => Ok(()),
                Op::Flush => b.flush(),
                Op::Trim { offset, len, fua } => b.trim(offset, u64::from(len), fua),
                Op::WriteZeroes { offset, len, flags } => {
                    b.write_zeroes(offset, u64::from(len), flags)
                }
                _ => Ok(()),
            };
            match res {
                Ok(()) => reply::ok(req),
                Err(e) => reply::backend_error(sr, req, &e),
            }
        }
    };
    conn.pool.put(payload);
    answer.send(bytes);
}

/// Builds one `BLOCK_STATUS` chunk per selected context from one backend query.
fn block_status(
    conn: &Conn,
    req: &Request,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<u8>, BackendError> {
    let mut raw = Vec::new();
    conn.backend
        .block_status(offset, u64::from(len), &mut raw)?;
    let extents = clamp_extents(&raw, u64::from(len));
    if extents.is_empty() {
        return Err(BackendError::new(
            BackendErrorKind::Io,
            "backend returned no extents",
        ));
    }
    let contexts: Vec<u32> = conn.session.contexts.entries().map(|(id, _)| id).collect();
    let mut out = Vec::new();
    for (i, &id) in contexts.iter().enumerate() {
        let value = |e: &Extent| match id {
            BASE_ALLOCATION_ID => {
                // HOLE without ZERO would mean "undefined contents": only report it with ZERO.
                let zero = if e.zero { state::ZERO } else { 0 };
                let hole = if e.zero && e.hole { state::HOLE } else { 0 };
                zero | hole
            }
            ALLOCATION_DEPTH_ID => e.depth,
            _ => 0,
        };
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for e in &extents {
            let v = value(e);
            // Lengths are clamped to the request length, a u32, so the sum still fits.
            let l = u32::try_from(e.length).unwrap_or(u32::MAX);
            let full = pairs.len() >= MAX_EXTENTS;
            match pairs.last_mut() {
                Some(last) if last.1 == v => last.0 = last.0.saturating_add(l),
                _ if full => break,
                _ => pairs.push((l, v)),
            }
        }
        if req_one {
            pairs.truncate(1);
        }
        let flags = if i + 1 == contexts.len() {
            wire::chunk::FLAG_DONE
        } else {
            0
        };
        let payload_len = 4 + 8 * pairs.len();
        let mut hdr = [0u8; wire::CHUNK_HEADER_LEN];
        let plen = u32::try_from(payload_len).unwrap_or(u32::MAX);
        wire::chunk_header(&mut hdr, flags, wire::chunk::BLOCK_STATUS, req.cookie, plen);
        out.extend_from_slice(&hdr);
        wire::put_u32(&mut out, id);
        for (l, v) in pairs {
            wire::put_u32(&mut out, l);
            wire::put_u32(&mut out, v);
        }
    }
    Ok(out)
}

/// Drops empty extents and cuts the list at `len` bytes, so a misbehaving backend cannot make
/// the server send an invalid reply.
fn clamp_extents(raw: &[Extent], len: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(raw.len().min(MAX_EXTENTS));
    let mut total = 0u64;
    for e in raw {
        if total >= len {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let l = e.length.min(len - total);
        total += l;
        out.push(Extent { length: l, ..*e });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64) -> Extent {
        Extent {
            length,
            zero: false,
            hole: false,
            depth: 1,
        }
    }

    #[test]
    fn extents_are_clamped() {
        let got = clamp_extents(&[ext(0), ext(100), ext(1000)], 500);
        assert_eq!(got, vec![ext(100), ext(400)]);
        assert!(clamp_extents(&[ext(0)], 10).is_empty());
    }
}
