//! Transmission phase: a few threads per connection take turns reading the next request and
//! each runs the request it read against the backend (a request alone in flight that will
//! wait on the device runs without waking the next reader first; READs of direct I/O already
//! buffered behind one run together, [`batch`]); replies go out whole, in any order, through
//! the connection's outbox.
//!
//! Memory is bounded by in-flight budgets ([`crate::budget`]): per connection (request count
//! and bytes, taken before a payload is read), and server-wide for read buffers (taken before
//! one is filled; shared, as are the buffers) and for staged WRITE payloads
//! ([`crate::payload`]), so many clients at once do not multiply memory. Reads a backend
//! serves zero-copy (`sendfile`) need no buffer and take no read-buffer bytes.

use std::io::{self, BufRead, Read, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::budget::{Budget, Cost, Held, SharedBytes};
use crate::export::Export;
use crate::gather;
use crate::handshake::Session;
use crate::payload::{self, Received};
use crate::reply::{BufPool, Replier, DATA_ALIGN, READ_HEADROOM};
use crate::stream::Deadline;
use crate::table::{Activity, Busy};
use crate::validate::{validate, ConnPolicy, Op, Verdict};
use crate::wire::{self, cmd, Request};
use crate::{Backend, BackendError, Limits, ReadPiece};

mod batch;
mod status;
mod writes;

/// Request bytes read from the socket at once.
const READ_BUFFER: usize = 16 * 1024;

/// Read pieces a worker has room for without allocating (a request spanning more grows it),
/// so zero-copy reads allocate nothing per request.
const PIECES: usize = 64;

/// Most extents sent per context in one reply; the client asks again for the rest.
const MAX_EXTENTS: usize = 1 << 16;

/// Most blocks (of the backend's preferred size) one BLOCK_STATUS query covers.
const STATUS_BLOCKS: u64 = 4096;

/// Memory one extent takes while a BLOCK_STATUS reply is built: the backend's list (and a
/// backend's own, e.g. the engine's), the clamped copy, two contexts' pairs, the encoding.
const STATUS_EXTENT_BYTES: usize = 128;

struct Job<'c> {
    req: Request,
    op: Op,
    /// A WRITE's received payload.
    payload: Option<Received<'c>>,
    /// The connection budget the request holds until it is dropped (also on a panic).
    cost: Cost<'c>,
}

/// What every connection shares: the buffer pool and the server-wide byte budgets.
pub(crate) struct ServerIo {
    pub pool: BufPool,
    /// Read buffers in flight.
    pub read_bytes: SharedBytes,
    /// WRITE payload pieces staged in memory.
    pub write_bytes: SharedBytes,
}

/// What a connection is served with, besides its streams and session.
pub(crate) struct ConnCx<'a> {
    pub export: &'a Export,
    pub limits: &'a Limits,
    /// Must make blocked reads return (called when a reply cannot be written).
    pub abort: &'a (dyn Fn() + Sync),
    pub io: &'a ServerIo,
    /// Marks requests in flight, so the connection is evicted only while idle.
    pub activity: &'a Activity,
}

/// Shared per-connection state used by the reader and the workers.
struct Conn<'a, W: Write> {
    export: &'a Export,
    session: Session,
    out: Replier<'a, W>,
    budget: Budget,
    io: &'a ServerIo,
    activity: &'a Activity,
    payload_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// This connection's shares of the server-wide budgets (only changed under their locks).
    read_share: AtomicUsize,
    write_share: AtomicUsize,
    /// How long the last request took to run, in nanoseconds (`u64::MAX` before the first).
    last_run_ns: AtomicU64,
    keep_input_after: Range<Duration>,
    /// The backend planned a read as direct pieces: READs already buffered are then run
    /// together ([`batch`]).
    direct_reads: AtomicBool,
    /// The backend may take WRITEs in place: those already buffered run together ([`writes`]).
    direct_writes: bool,
}

impl<W: Write> Conn<'_, W> {
    /// Takes server-wide read-buffer bytes, given back when the guard drops (also on a
    /// panic). Only reads that need a buffer take them: zero-copy reads hold no memory.
    fn read_buffer_bytes(&self, bytes: usize) -> Held<'_> {
        self.io.read_bytes.acquire(bytes, &self.read_share)
    }
}

/// Serves requests until `DISC`, EOF, a protocol violation or a dead socket, then waits for
/// every accepted request to be answered.
pub(crate) fn serve<W: Write + AsFd + Send>(
    r: Deadline<'_>,
    w: W,
    session: Session,
    cx: &ConnCx<'_>,
) {
    let (export, limits) = (cx.export, cx.limits);
    let conn = Conn {
        export,
        session,
        out: Replier::new(w, session.structured, cx.abort),
        budget: Budget::new(limits.max_in_flight, limits.max_in_flight_bytes),
        io: cx.io,
        activity: cx.activity,
        payload_timeout: limits.payload_timeout,
        idle_timeout: limits.idle_timeout,
        read_share: AtomicUsize::new(0),
        write_share: AtomicUsize::new(0),
        last_run_ns: AtomicU64::new(u64::MAX),
        keep_input_after: limits.keep_input_after.clone(),
        direct_reads: AtomicBool::new(false),
        direct_writes: export.backend.writes_in_place(),
    };
    let policy = ConnPolicy {
        size: export.backend.size(),
        read_only: export.backend.is_read_only(),
        structured: session.structured,
        contexts: session.contexts,
        max_payload: limits.max_payload,
        max_drain: limits.max_drain.max(limits.max_payload),
    };
    // Pipelined requests arrive back to back: read them in as few syscalls as possible.
    let input = Mutex::new(Input {
        r: io::BufReader::with_capacity(READ_BUFFER, r),
        done: false,
    });
    thread::scope(|sc| {
        // This thread serves too, so a connection costs `workers_per_connection` threads and
        // still works if none can be spawned.
        for _ in 1..limits.workers_per_connection.max(1) {
            let pieces = Vec::with_capacity(PIECES);
            let _ = thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(sc, || follower(&conn, &input, &policy, pieces));
        }
        follower(&conn, &input, &policy, Vec::with_capacity(PIECES));
    });
}

/// The connection's request stream, read by one thread at a time.
struct Input<'s> {
    r: io::BufReader<Deadline<'s>>,
    /// It ended (EOF, `DISC`, a protocol violation, a failed reply).
    done: bool,
}

/// Leader/follower: whichever thread holds the input reads the next request, releases the
/// input to the next waiting thread and runs the request itself. A request never changes
/// threads, so it costs no wake-up on its path (a reader handing jobs to workers cost one
/// context switch per request, a third of small-write throughput on 2 CPUs).
///
/// A READ or WRITE alone in flight may keep the input while it runs instead (see
/// [`keeps_input`]), which saves that wake-up where it costs more than it gains.
fn follower<'a, W: Write + AsFd>(
    conn: &Conn<'a, W>,
    input: &Mutex<Input<'_>>,
    policy: &ConnPolicy,
    mut pieces: Vec<ReadPiece<'a>>,
) {
    let mut kept = None;
    // Made when this thread first runs a batch.
    let mut ring = None;
    loop {
        let mut guard = match kept.take() {
            Some(g) => g,
            // Poisoned: a thread panicked mid-request, so where the stream stands is unknown.
            None => match input.lock() {
                Ok(g) => g,
                Err(_) => return,
            },
        };
        let Input { r, done } = &mut *guard;
        if *done {
            return;
        }
        // The request counts as in flight until its reply is written (`busy` outlives it).
        let Some((job, busy)) = next_job(r, conn, policy) else {
            *done = true;
            return;
        };
        // READs (WRITEs) already buffered behind this one run together where the backend
        // reads (writes) with direct I/O.
        let write = match job.op {
            Op::Read { .. } if conn.direct_reads.load(Ordering::Relaxed) => Some(false),
            Op::Write { fua: false, .. } if conn.direct_writes => Some(true),
            _ => None,
        };
        if let Some((write, second)) =
            write.and_then(|w| Some((w, buffered_behind(r, conn, policy, w)?)))
        {
            let mut jobs = vec![(job, busy), second];
            while jobs.len() < batch::MAX_BATCH {
                match buffered_behind(r, conn, policy, write) {
                    Some(j) => jobs.push(j),
                    None => break,
                }
            }
            drop(guard);
            if write {
                writes::run(conn, jobs, &mut ring, &mut pieces);
            } else {
                batch::run(conn, jobs, &mut ring, &mut pieces);
            }
            continue;
        }
        if keeps_input(&job, r, conn) {
            kept = Some(guard);
        } else {
            drop(guard);
        }
        let start = Instant::now();
        run_guarded(conn, job, &mut pieces);
        let ran = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        conn.last_run_ns.store(ran, Ordering::Relaxed);
        drop(busy);
    }
}

/// The next request if it is a READ (a WRITE without FUA) wholly in the buffer that may
/// run now; nothing here waits.
fn buffered_behind<'c, W: Write>(
    r: &mut io::BufReader<Deadline<'_>>,
    conn: &'c Conn<'_, W>,
    policy: &ConnPolicy,
    write: bool,
) -> Option<(Job<'c>, Busy<'c>)> {
    if write {
        writes::next_buffered(r, conn, policy)
    } else {
        batch::next_buffered_read(r, conn, policy)
    }
}

/// Whether the thread that read `job` runs it still holding the input: a plain READ or
/// WRITE alone in flight, with no byte of another waiting, on a backend that does not wait
/// on the network, after a request that waited on the device
/// ([`Limits::keep_input_after`]). A request sent meanwhile waits for it, hence the bounds.
///
/// Measured on a 2-CPU VM at queue depth 1: under O_DIRECT, where each read sleeps in the
/// device, keeping ran random reads at 1.4x; from the page cache it ran them at 0.6x,
/// as there the thread woken by the hand-off keeps the other CPU from a deep halt just
/// before the next request reaches it.
fn keeps_input<W: Write>(
    job: &Job<'_>,
    r: &io::BufReader<Deadline<'_>>,
    conn: &Conn<'_, W>,
) -> bool {
    let last = Duration::from_nanos(conn.last_run_ns.load(Ordering::Relaxed));
    matches!(job.op, Op::Read { .. } | Op::Write { fua: false, .. })
        && conn.keep_input_after.contains(&last)
        && r.buffer().is_empty()
        && conn.activity.alone()
        && !conn.export.backend.may_wait_on_network()
        // The one check that costs a system call.
        && !r.get_ref().readable_now()
}

/// Reads requests until one must run; answers invalid ones on the way. `None` ends the
/// connection (EOF, `DISC`, lost framing, a failed reply, a half-read payload, eviction).
fn next_job<'c, W: Write>(
    r: &mut io::BufReader<Deadline<'_>>,
    conn: &'c Conn<'_, W>,
    policy: &ConnPolicy,
) -> Option<(Job<'c>, Busy<'c>)> {
    let mut hdr = [0u8; wire::REQUEST_LEN];
    while !conn.out.failed() {
        wait_for_request(r, conn)?;
        r.read_exact(&mut hdr).ok()?;
        // Evicted while idle: too late to serve this request, it will not run.
        let busy = conn.activity.begin()?;
        // Bad magic: framing is lost, hang up.
        let req = Request::parse(&hdr)?;
        let op = match validate(&req, policy) {
            Verdict::Disconnect | Verdict::Run(Op::Disc) => return None,
            Verdict::Error(e) => {
                if req.kind == cmd::WRITE {
                    r.get_mut().set(Some(conn.payload_timeout));
                    let drained = drain(r, u64::from(req.length));
                    r.get_mut().set(None);
                    drained.ok()?;
                }
                conn.out.error(&req, e, "");
                continue;
            }
            Verdict::Run(op) => op,
        };
        let cost = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len as usize,
            _ => 0,
        };
        // Waiting here holds the input, which is what a full budget should do: stop reading.
        let cost = conn.budget.acquire(cost);
        let mut payload = None;
        if let Op::Write { offset, len, fua } = op {
            let held = conn.io.write_bytes.none(&conn.write_share);
            let b = &*conn.export.backend;
            // The whole payload must arrive in time: a stalled one is not waited for forever.
            r.get_mut().set(Some(conn.payload_timeout));
            let received = payload::receive(r, b, &conn.io.pool, held, offset, len, fua);
            r.get_mut().set(None);
            // Half a payload is never answered (the client went away or stalled).
            payload = Some(received.ok()?);
        }
        let job = Job {
            req,
            op,
            payload,
            cost,
        };
        return Some((job, busy));
    }
    None
}

/// Waits for the next request's first byte. With an idle timeout, `None` once the connection
/// has been idle that long; requests still in flight (a slow flush) keep it open.
fn wait_for_request<W: Write>(
    r: &mut io::BufReader<Deadline<'_>>,
    conn: &Conn<'_, W>,
) -> Option<()> {
    let Some(idle) = conn.idle_timeout else {
        return Some(());
    };
    loop {
        r.get_mut().set(Some(idle));
        let res = r.fill_buf().map(|b| b.is_empty());
        r.get_mut().set(None);
        match res {
            Ok(false) => return Some(()),
            Err(e) if is_timeout(&e) && !conn.activity.is_idle() => {}
            // EOF, a dead socket, or idle too long.
            _ => return None,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
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

/// Runs a job; a panicking backend call still gets an `EIO` reply (its budget is freed as
/// the job unwinds).
fn run_guarded<'a, W: Write + AsFd>(
    conn: &Conn<'a, W>,
    job: Job<'_>,
    pieces: &mut Vec<ReadPiece<'a>>,
) {
    let req = job.req;
    if panic::catch_unwind(AssertUnwindSafe(|| run(conn, job, pieces))).is_err() {
        conn.out.error(&req, wire::errno::EIO, "internal error");
    }
}

fn run<'a, W: Write + AsFd>(conn: &Conn<'a, W>, job: Job<'_>, pieces: &mut Vec<ReadPiece<'a>>) {
    let b: &'a dyn Backend = &*conn.export.backend;
    let Job {
        req,
        op,
        payload,
        cost,
    } = job;
    let res = match op {
        Op::Read { offset, len } => return read(conn, &req, offset, len, pieces),
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            // At most one extent per block: a query of a bounded number of blocks bounds the
            // memory of its reply, held against the read budget until the reply is out. The
            // reply may cover less than asked; clients ask again for the rest.
            let bs = u64::from(b.preferred_block_size().max(512));
            let len = u64::from(len).min(STATUS_BLOCKS * bs);
            let extents = usize::try_from(len.div_ceil(bs) + 1).unwrap_or(usize::MAX);
            let _held = conn.read_buffer_bytes(extents.saturating_mul(STATUS_EXTENT_BYTES));
            match status::block_status(conn, offset, len, req_one) {
                Ok(contexts) => conn.out.block_status(&req, &contexts),
                Err(e) => conn.out.backend_error(&req, &e),
            }
            return;
        }
        Op::Write { offset, fua, .. } => {
            // The payload and its budgets are free before the reply, which a client that does
            // not read its replies may hold up.
            let r = payload.map_or(Ok(()), |p| p.finish(b, offset, fua, &conn.io.pool));
            drop(cost);
            r
        }
        Op::Flush if b.is_read_only() => Ok(()),
        Op::Flush => b.flush(),
        Op::Trim { offset, len, fua } => b.trim(offset, u64::from(len), fua),
        Op::Cache | Op::Disc => Ok(()),
        Op::WriteZeroes { offset, len, flags } => b.write_zeroes(offset, u64::from(len), flags),
    };
    match res {
        Ok(()) => conn.out.ok(&req),
        Err(e) => conn.out.backend_error(&req, &e),
    }
}

/// READ: zero-copy when the backend plans it, through a buffer otherwise.
fn read<'a, W: Write + AsFd>(
    conn: &Conn<'a, W>,
    req: &Request,
    offset: u64,
    len: u32,
    pieces: &mut Vec<ReadPiece<'a>>,
) {
    let b: &'a dyn Backend = &*conn.export.backend;
    pieces.clear();
    let planned = b.read_pieces(offset, u64::from(len), pieces);
    answer_read(conn, req, offset, len, pieces, planned);
}

/// Answers a READ the backend planned (`planned`, with `pieces` if `Ok(true)`).
fn answer_read<'a, W: Write + AsFd>(
    conn: &Conn<'a, W>,
    req: &Request,
    offset: u64,
    len: u32,
    pieces: &[ReadPiece<'a>],
    planned: Result<bool, BackendError>,
) {
    let b: &'a dyn Backend = &*conn.export.backend;
    match planned {
        // Pieces that do not add up to the request would break the stream's framing.
        Ok(true) if pieces_len(pieces) != Some(u64::from(len)) => conn.out.error(
            req,
            wire::errno::EIO,
            "backend planned a read of the wrong length",
        ),
        Ok(true) if gather::has_direct(pieces) => {
            conn.direct_reads.store(true, Ordering::Relaxed);
            // Where a piece cannot be read, the backend reads the request and names the cause.
            read_buffered(conn, req, offset, len, |data| {
                gather::read_into(b, offset, pieces, data).or_else(|_| b.read(offset, data))
            });
        }
        // Zero-copy: no buffer, one copy fewer.
        Ok(true) => conn.out.read_pieces(req, offset, len, pieces, b),
        Ok(false) => read_buffered(conn, req, offset, len, |data| b.read(offset, data)),
        Err(e) => conn.out.backend_error(req, &e),
    }
}

/// READ through a buffer filled by `fill`.
fn read_buffered<W: Write + AsFd>(
    conn: &Conn<'_, W>,
    req: &Request,
    offset: u64,
    len: u32,
    fill: impl FnOnce(&mut [u8]) -> Result<(), BackendError>,
) {
    // Room to start the data on a 4 KiB boundary: a backend reading with direct I/O then
    // reads straight into it instead of through a bounce buffer.
    let buf_len = READ_HEADROOM + len as usize + DATA_ALIGN;
    let mut held = conn.read_buffer_bytes(buf_len);
    let mut buf = held.buffer(&conn.io.pool, buf_len);
    let skip = aligned_skip(&buf);
    let area = &mut buf[skip..skip + READ_HEADROOM + len as usize];
    match fill(&mut area[READ_HEADROOM..]) {
        Ok(()) => conn.out.read_data(req, offset, area),
        Err(e) => conn.out.backend_error(req, &e),
    }
    conn.io.pool.put(buf);
}

/// Where in `buf` a reply must start so that its data, after [`READ_HEADROOM`] bytes of
/// header, begins on a [`DATA_ALIGN`] boundary.
fn aligned_skip(buf: &[u8]) -> usize {
    let data = buf.as_ptr() as usize + READ_HEADROOM;
    (DATA_ALIGN - data % DATA_ALIGN) % DATA_ALIGN
}

fn pieces_len(pieces: &[ReadPiece<'_>]) -> Option<u64> {
    pieces
        .iter()
        .try_fold(0u64, |n, p| n.checked_add(p.bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_data_starts_aligned_within_the_slack() {
        for len in [512, 4096, 65536] {
            let n = READ_HEADROOM + len + DATA_ALIGN;
            let buf = vec![0u8; n + 64];
            // Every start address a pooled buffer might have, in steps of one byte.
            for shift in 0..64 {
                let b = &buf[shift..shift + n];
                let skip = aligned_skip(b);
                assert!(skip + READ_HEADROOM + len <= b.len());
                assert_eq!((b.as_ptr() as usize + skip + READ_HEADROOM) % DATA_ALIGN, 0);
            }
        }
    }
}
