//! READs already buffered behind the one just read, run together through io_uring where
//! the backend reads them with direct I/O (`serve --cache=none`).
//!
//! Handing the input from thread to thread cost a wake-up per request, one after the other,
//! and each thread then slept in its own read: on a fast device qemu-nbd, which has all of
//! them in flight from one thread, served more. Here the thread holding the input takes
//! every READ whose header is already in the buffer, lets the input go once, and has their
//! direct reads in flight at the same time on its own ring.

use std::io::{self, BufRead, Write};
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};

use cowdisk_ring::{Piece, Ring};

use super::{aligned_skip, answer_read, pieces_len, run_guarded, Conn, Job};
use crate::budget::Held;
use crate::reply::{DATA_ALIGN, READ_HEADROOM};
use crate::stream::Deadline;
use crate::table::Busy;
use crate::validate::{validate, ConnPolicy, Op, Verdict};
use crate::wire::{self, cmd, Request};
use crate::{Backend, ReadPiece};

/// Most READs taken at once.
pub(super) const MAX_BATCH: usize = 32;

/// Requests a thread's ring has in flight at most.
const RING_ENTRIES: u32 = 64;

/// The next request if it is a READ wholly in the buffer that may run now (valid, within the
/// budget, the connection not evicted); it is then taken from the buffer. Anything else
/// stays for the next reader, and nothing here waits.
pub(super) fn next_buffered_read<'c, W: Write>(
    r: &mut io::BufReader<Deadline<'_>>,
    conn: &'c Conn<'_, W>,
    policy: &ConnPolicy,
) -> Option<(Job<'c>, Busy<'c>)> {
    let (req, op) = buffered_request(r, conn, policy, cmd::READ)?;
    let Op::Read { len, .. } = op else {
        return None;
    };
    let cost = conn.budget.try_acquire(len as usize)?;
    let busy = conn.activity.begin()?;
    r.consume(wire::REQUEST_LEN);
    let job = Job {
        req,
        op,
        payload: None,
        cost,
    };
    Some((job, busy))
}

/// The header of the next request in the buffer, if it is of `kind` and valid (it stays in
/// the buffer).
pub(super) fn buffered_request<W: Write>(
    r: &io::BufReader<Deadline<'_>>,
    conn: &Conn<'_, W>,
    policy: &ConnPolicy,
    kind: u16,
) -> Option<(Request, Op)> {
    let hdr: [u8; wire::REQUEST_LEN] = r.buffer().get(..wire::REQUEST_LEN)?.try_into().ok()?;
    let req = Request::parse(&hdr)?;
    if req.kind != kind || conn.out.failed() {
        return None;
    }
    match validate(&req, policy) {
        Verdict::Run(op) => Some((req, op)),
        _ => None,
    }
}

/// A READ on the ring: what its reply needs once its reads are back.
struct InFlight<'c> {
    req: Request,
    offset: u64,
    len: u32,
    /// Where the reply starts in the buffer (its data then starts aligned).
    skip: usize,
    _held: Held<'c>,
    _job: Job<'c>,
    _busy: Busy<'c>,
}

/// The thread's ring, made on first use, with `jobs` back; without one (the kernel refused
/// it), runs `jobs` one by one as usual instead.
pub(super) fn ring_or_run<'r, 'a, 'c, W: Write + AsFd>(
    conn: &'c Conn<'a, W>,
    jobs: Vec<(Job<'c>, Busy<'c>)>,
    ring_slot: &'r mut Option<Ring>,
    pieces: &mut Vec<ReadPiece<'a>>,
) -> Option<(&'r mut Ring, Vec<(Job<'c>, Busy<'c>)>)> {
    if ring_slot.is_none() {
        *ring_slot = Ring::new(RING_ENTRIES).ok();
    }
    let Some(ring) = ring_slot.as_mut() else {
        for (job, _busy) in jobs {
            run_guarded(conn, job, pieces);
        }
        return None;
    };
    Some((ring, jobs))
}

/// A READ of the batch that does not go on the ring, with its plan if it has one.
type Rest<'a, 'c> = (Job<'c>, Busy<'c>, Option<Vec<ReadPiece<'a>>>);

/// Runs `jobs` (READs): those the backend plans as direct pieces and zeros through `ring`
/// (made on first use), the others one by one as usual, after the ring's are answered (they
/// may wait for budget the ring's hold).
pub(super) fn run<'a, 'c, W: Write + AsFd>(
    conn: &'c Conn<'a, W>,
    jobs: Vec<(Job<'c>, Busy<'c>)>,
    ring_slot: &mut Option<Ring>,
    pieces: &mut Vec<ReadPiece<'a>>,
) {
    let Some((ring, jobs)) = ring_or_run(conn, jobs, ring_slot, pieces) else {
        return;
    };
    let mut rest: Vec<Rest<'a, 'c>> = Vec::new();
    let b: &'a dyn Backend = &*conn.export.backend;
    let mut flying: Vec<Option<InFlight<'c>>> = Vec::with_capacity(jobs.len());
    let mut batch = ring.batch();
    for (job, busy) in jobs {
        let Op::Read { offset, len } = job.op else {
            rest.push((job, busy, None));
            continue;
        };
        pieces.clear();
        let planned = panic::catch_unwind(AssertUnwindSafe(|| {
            b.read_pieces(offset, u64::from(len), pieces)
        }));
        let req = job.req;
        match planned {
            Ok(Err(e)) => {
                conn.out.backend_error(&req, &e);
                continue;
            }
            Err(_) => {
                conn.out.error(&req, wire::errno::EIO, "internal error");
                continue;
            }
            Ok(Ok(true)) if pieces_len(pieces) == Some(u64::from(len)) => {}
            // Not planned (or planned wrong): the usual path plans it again.
            Ok(Ok(_)) => {
                rest.push((job, busy, None));
                continue;
            }
        }
        let buf_len = READ_HEADROOM + len as usize + DATA_ALIGN;
        let mut held = conn.io.read_bytes.none(&conn.read_share);
        // Never wait for read-buffer budget here: the ring's buffers may be what holds it.
        if !held.try_grow(buf_len) {
            rest.push((job, busy, Some(pieces.clone())));
            continue;
        }
        let buf = held.buffer(&conn.io.pool, buf_len);
        let skip = aligned_skip(&buf);
        let data = skip + READ_HEADROOM;
        let Some(ring_pieces) = ring_pieces(pieces, data, buf.as_ptr() as usize + data) else {
            conn.io.pool.put(buf);
            rest.push((job, busy, Some(pieces.clone())));
            continue;
        };
        // The pooled buffer is zeroed: zero pieces need nothing more.
        match batch.push(buf, &ring_pieces, flying.len() as u64) {
            Ok(()) => flying.push(Some(InFlight {
                req,
                offset,
                len,
                skip,
                _held: held,
                _job: job,
                _busy: busy,
            })),
            Err(buf) => {
                conn.io.pool.put(buf);
                rest.push((job, busy, Some(pieces.clone())));
            }
        }
    }
    let submitted = batch.submit();
    if !answer(conn, ring, &mut flying, submitted) {
        *ring_slot = None;
    }
    answer_rest(conn, rest, pieces);
}

/// Answers the READs of a batch that did not go on the ring. One already planned is
/// answered from its plan: planning it again would count it twice in the backend's
/// statistics.
fn answer_rest<'a, W: Write + AsFd>(
    conn: &Conn<'a, W>,
    rest: Vec<Rest<'a, '_>>,
    pieces: &mut Vec<ReadPiece<'a>>,
) {
    for (job, _busy, plan) in rest {
        match (plan, job.op) {
            (Some(plan), Op::Read { offset, len }) => {
                let req = job.req;
                let ran = panic::catch_unwind(AssertUnwindSafe(|| {
                    answer_read(conn, &req, offset, len, &plan, Ok(true))
                }));
                if ran.is_err() {
                    conn.out.error(&req, wire::errno::EIO, "internal error");
                }
            }
            _ => run_guarded(conn, job, pieces),
        }
    }
}

/// The ring reads of a plan whose data starts at index `data` of the buffer, at address
/// `addr`: its direct pieces, each at an aligned address; `None` if it has other pieces than
/// those and zeros (or only zeros, which need no ring).
fn ring_pieces<'a>(pieces: &[ReadPiece<'a>], data: usize, addr: usize) -> Option<Vec<Piece<'a>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    for p in pieces {
        let len = usize::try_from(p.bytes()).ok()?;
        match *p {
            ReadPiece::Zeros(_) => {}
            ReadPiece::Direct { fd, offset, .. } if (addr + pos).is_multiple_of(DATA_ALIGN) => out
                .push(Piece {
                    fd,
                    offset,
                    at: data + pos,
                    len,
                }),
            _ => return None,
        }
        pos += len;
    }
    (!out.is_empty()).then_some(out)
}

/// Answers each READ on the ring as its reads come back; one whose reads failed is read again
/// by the backend, which names the cause if it fails too. `false` if the ring failed (it
/// must then be dropped, which waits for what it has in flight).
fn answer<W: Write + AsFd>(
    conn: &Conn<'_, W>,
    ring: &mut Ring,
    flying: &mut [Option<InFlight<'_>>],
    submitted: io::Result<()>,
) -> bool {
    let b = &*conn.export.backend;
    // READs whose reads came back together, answered together (one system call).
    let mut done: Vec<(InFlight<'_>, Vec<u8>)> = Vec::new();
    let mut failed = submitted.is_err();
    while !failed && ring.pending() > 0 {
        failed = ring
            .wait(|tag, mut buf, res| {
                let Some(f) = flying.get_mut(tag as usize).and_then(Option::take) else {
                    return;
                };
                if res.is_ok() {
                    done.push((f, buf));
                    return;
                }
                let area = &mut buf[f.skip..f.skip + READ_HEADROOM + f.len as usize];
                match b.read(f.offset, &mut area[READ_HEADROOM..]) {
                    Ok(()) => conn.out.read_data(&f.req, f.offset, area),
                    Err(e) => conn.out.backend_error(&f.req, &e),
                }
                conn.io.pool.put(buf);
            })
            .is_err();
        send_done(conn, &mut done);
    }
    if failed {
        // The ring cannot say when its reads end: the requests are read again without it,
        // and the ring keeps their buffers until it is dropped.
        for f in flying.iter_mut().filter_map(Option::take) {
            let mut buf = vec![0u8; READ_HEADROOM + f.len as usize];
            match b.read(f.offset, &mut buf[READ_HEADROOM..]) {
                Ok(()) => conn.out.read_data(&f.req, f.offset, &mut buf),
                Err(e) => conn.out.backend_error(&f.req, &e),
            }
        }
    }
    !failed
}

/// Answers the READs in `done` with one write, then frees their buffers and budgets.
fn send_done<W: Write + AsFd>(conn: &Conn<'_, W>, done: &mut Vec<(InFlight<'_>, Vec<u8>)>) {
    let mut replies: Vec<(Request, u64, &mut [u8])> = done
        .iter_mut()
        .map(|(f, buf)| {
            let area = &mut buf[f.skip..f.skip + READ_HEADROOM + f.len as usize];
            (f.req, f.offset, area)
        })
        .collect();
    conn.out.read_data_all(&mut replies);
    drop(replies);
    for (_f, buf) in done.drain(..) {
        conn.io.pool.put(buf);
    }
}
