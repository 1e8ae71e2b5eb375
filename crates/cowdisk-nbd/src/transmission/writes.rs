//! WRITEs already buffered behind the one just read, run together through io_uring where
//! the backend lets the server write them in place with direct I/O (`serve --cache=none`).
//!
//! As for READs ([`super::batch`]): handing the input on per request cost a wake-up each,
//! and each thread then slept in its own `pwrite`, so at most one write per thread was in
//! flight. Here the thread holding the input takes every WRITE already wholly in the
//! buffer, lets the input go once, and has them all in flight on its ring. The backend
//! holds each target's place (the block's lock, the write gate) until its write is back.

use std::io::{self, BufRead, Write};
use std::os::fd::AsFd;
use std::panic::{self, AssertUnwindSafe};

use cowdisk_ring::{Batch, Piece, Ring};

use super::{run_guarded, Conn, Job};
use crate::budget::Held;
use crate::payload::{self, Received};
use crate::reply::DATA_ALIGN;
use crate::stream::Deadline;
use crate::table::Busy;
use crate::validate::{ConnPolicy, Op};
use crate::wire::{self, cmd, Request};
use crate::{Backend, ReadPiece, WriteTarget};

/// The next request if it is a WRITE without FUA wholly in the buffer, payload included,
/// that may run now (valid, within the budgets, the connection not evicted); it is then
/// taken from the buffer with its payload staged. Anything else stays for the next reader,
/// and nothing here waits.
pub(super) fn next_buffered<'c, W: Write>(
    r: &mut io::BufReader<Deadline<'_>>,
    conn: &'c Conn<'_, W>,
    policy: &ConnPolicy,
) -> Option<(Job<'c>, Busy<'c>)> {
    let (req, op) = super::batch::buffered_request(r, conn, policy, cmd::WRITE)?;
    let Op::Write {
        len, fua: false, ..
    } = op
    else {
        return None;
    };
    if r.buffer().len() < wire::REQUEST_LEN + len as usize {
        return None;
    }
    let cost = conn.budget.try_acquire(len as usize)?;
    let held = conn.io.write_bytes.none(&conn.write_share);
    // The payload is in the buffer: staging copies it, and fails only for want of budget.
    let mut rest = &r.buffer()[wire::REQUEST_LEN..];
    let pool = &conn.io.pool;
    let Ok(Ok(staged)) = payload::stage(&mut rest, pool, held, len as usize, true) else {
        return None;
    };
    let busy = conn.activity.begin()?;
    r.consume(wire::REQUEST_LEN + len as usize);
    let job = Job {
        req,
        op,
        payload: Some(staged),
        cost,
    };
    Some((job, busy))
}

/// A WRITE on the ring: what its reply needs once its write is back.
struct InFlight<'a, 'c> {
    req: Request,
    offset: u64,
    /// Let go (finished) as soon as the write is back.
    target: Option<Box<dyn WriteTarget<'a> + 'a>>,
    /// Where the payload is in its buffer (which the ring has meanwhile).
    at: usize,
    len: usize,
    _held: Held<'c>,
    _job: Job<'c>,
    _busy: Busy<'c>,
}

impl InFlight<'_, '_> {
    fn finish(&mut self, written: bool) {
        if let Some(t) = self.target.take() {
            t.finish(written);
        }
    }
}

/// Runs `jobs` (WRITEs): those the backend gives targets for through `ring` (made on first
/// use), the others one by one as usual once the ring's are answered and their targets let
/// go (a target may hold what those wait for).
pub(super) fn run<'a, 'c, W: Write + AsFd>(
    conn: &'c Conn<'a, W>,
    jobs: Vec<(Job<'c>, Busy<'c>)>,
    ring_slot: &mut Option<Ring>,
    pieces: &mut Vec<ReadPiece<'a>>,
) {
    let Some((ring, jobs)) = super::batch::ring_or_run(conn, jobs, ring_slot, pieces) else {
        return;
    };
    let b: &'a dyn Backend = &*conn.export.backend;
    let mut rest = Vec::new();
    let mut flying: Vec<Option<InFlight<'a, 'c>>> = Vec::with_capacity(jobs.len());
    let mut batch = ring.batch();
    for (job, busy) in jobs {
        if let Some(not_on_ring) = to_ring(b, &mut batch, &mut flying, job, busy) {
            rest.push(not_on_ring);
        }
    }
    let submitted = batch.submit();
    let (ring_ok, again) = answer(conn, ring, &mut flying, submitted);
    if !ring_ok {
        // Dropping the ring waits for what it has in flight; their payloads go with it.
        *ring_slot = None;
        for mut f in flying.iter_mut().filter_map(Option::take) {
            f.finish(false);
            conn.out.error(&f.req, wire::errno::EIO, "internal error");
        }
    }
    // Every target of the batch is let go now: the backend takes the same locks.
    for (f, buf) in again {
        match b.write(f.offset, &buf[f.at..f.at + f.len], false) {
            Ok(()) => conn.out.ok(&f.req),
            Err(e) => conn.out.backend_error(&f.req, &e),
        }
        conn.io.pool.put(buf);
    }
    for (job, _busy) in rest {
        run_guarded(conn, job, pieces);
    }
}

/// Puts `job` on the ring if it is a staged WRITE whose payload starts aligned and the
/// backend gives it a target; gives it back, payload and all, otherwise.
fn to_ring<'a, 'c>(
    b: &'a dyn Backend,
    batch: &mut Batch<'_, 'a>,
    flying: &mut Vec<Option<InFlight<'a, 'c>>>,
    mut job: Job<'c>,
    busy: Busy<'c>,
) -> Option<(Job<'c>, Busy<'c>)> {
    let Op::Write { offset, .. } = job.op else {
        return Some((job, busy));
    };
    let (data, at, len, held) = match job.payload.take() {
        Some(Received::Staged {
            data,
            at,
            len,
            held,
        }) if (data.as_ptr() as usize + at).is_multiple_of(DATA_ALIGN) => (data, at, len, held),
        // A payload written through as it arrived carries its outcome: keep it.
        other => {
            job.payload = other;
            return Some((job, busy));
        }
    };
    // Only the first may wait: this thread holds the others' targets meanwhile.
    let wait = flying.is_empty();
    let target = panic::catch_unwind(AssertUnwindSafe(|| {
        b.write_target(offset, len as u32, wait)
    }))
    .ok()
    .flatten();
    let pushed = match target {
        Some(target) => {
            let piece = Piece {
                fd: target.fd(),
                offset: target.offset(),
                at,
                len,
            };
            match batch.push_write(data, &[piece], flying.len() as u64) {
                Ok(()) => Ok(target),
                Err(data) => {
                    target.finish(false);
                    Err(data)
                }
            }
        }
        None => Err(data),
    };
    match pushed {
        Ok(target) => {
            flying.push(Some(InFlight {
                req: job.req,
                offset,
                target: Some(target),
                at,
                len,
                _held: held,
                _job: job,
                _busy: busy,
            }));
            None
        }
        Err(data) => {
            job.payload = Some(Received::Staged {
                data,
                at,
                len,
                held,
            });
            Some((job, busy))
        }
    }
}

/// A WRITE whose ring write failed, with its payload: written again by the backend.
type Again<'a, 'c> = (InFlight<'a, 'c>, Vec<u8>);

/// Answers each WRITE on the ring as its write comes back, those back together with one
/// system call, and lets go of its target; returns those whose write failed, to be written
/// again once every target of the batch is let go. `false` if the ring failed: what is
/// left in `flying` may still be in flight.
fn answer<'a, 'c, W: Write + AsFd>(
    conn: &Conn<'_, W>,
    ring: &mut Ring,
    flying: &mut [Option<InFlight<'a, 'c>>],
    submitted: io::Result<()>,
) -> (bool, Vec<Again<'a, 'c>>) {
    let mut again = Vec::new();
    let mut failed = submitted.is_err();
    while !failed && ring.pending() > 0 {
        let mut done = Vec::new();
        failed = ring
            .wait(|tag, buf, res| {
                let Some(mut f) = flying.get_mut(tag as usize).and_then(Option::take) else {
                    return;
                };
                // Before the reply: the write is then the next flush's.
                f.finish(res.is_ok());
                if res.is_ok() {
                    conn.io.pool.put(buf);
                    done.push(f);
                } else {
                    again.push((f, buf));
                }
            })
            .is_err();
        conn.out.ok_all(done.iter().map(|f| &f.req));
    }
    (!failed, again)
}
