//! Reads and writes in flight together through io_uring, for `serve --cache=none`.
//!
//! Direct I/O blocks a thread per read or write, so serving a client's 16 requests at once
//! took 16 threads and a wake-up each. A [`Ring`] has them all in flight from one thread: one
//! system call submits a batch and another reaps what finished.
//!
//! The API is safe: a [`Ring`] owns each request's buffer from [`Batch::push`] (or
//! [`Batch::push_write`]) until it comes back from [`Ring::wait`], so nothing else can touch
//! memory the kernel reads or writes, and dropping a ring with requests in flight waits for
//! them (or, if the kernel will not say, leaks their buffers rather than free memory it may
//! still use).

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types, IoUring};

/// One read (or write) of a request: `len` bytes of `fd` at `offset`, into (or from) the
/// buffer at `at`.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    pub fd: BorrowedFd<'a>,
    pub offset: u64,
    pub at: usize,
    pub len: usize,
}

/// A buffer with its reads (or writes) in flight.
struct Slot {
    buf: Vec<u8>,
    tag: u64,
    /// Reads of this buffer still in flight.
    left: usize,
    err: Option<io::Error>,
}

/// An io_uring instance for direct reads and writes, used by one thread at a time.
pub struct Ring {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Reads submitted or queued and not yet reaped: at most `capacity`, so that every
    /// completion has room in the completion queue.
    in_flight: usize,
    capacity: usize,
}

/// Longest read one entry asks for (the kernel's limit for one read is a little under 2 GiB).
const MAX_PIECE: usize = 1 << 30;

impl Ring {
    /// A ring with room for `entries` requests in flight.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::new(entries)?;
        let capacity = ring.params().sq_entries() as usize;
        Ok(Ring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            capacity,
        })
    }

    /// Reads the ring still has room for.
    pub fn room(&self) -> usize {
        self.capacity - self.in_flight
    }

    /// Buffers whose requests have not all come back from [`Ring::wait`].
    pub fn pending(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts a batch of requests submitted together; `'a` is how long their files stay open.
    pub fn batch<'a>(&mut self) -> Batch<'_, 'a> {
        Batch {
            ring: self,
            submitted: false,
            _fds: PhantomData,
        }
    }

    /// Waits until at least one buffer has all its requests back (if any is pending), then
    /// calls `done` with the tag, buffer and outcome of each buffer that has. A short read
    /// or write is an error (`UnexpectedEof`).
    pub fn wait(&mut self, mut done: impl FnMut(u64, Vec<u8>, io::Result<()>)) -> io::Result<()> {
        let mut finished = Vec::new();
        while finished.is_empty() && self.pending() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.reap(&mut finished);
        }
        for s in finished {
            let res = s.err.map_or(Ok(()), Err);
            done(s.tag, s.buf, res);
        }
        Ok(())
    }

    /// Takes the completions the kernel has posted; buffers with every read back move to
    /// `finished`.
    fn reap(&mut self, finished: &mut Vec<Slot>) {
        for cqe in self.ring.completion() {
            self.in_flight -= 1;
            let ud = cqe.user_data();
            let (idx, want) = ((ud >> 32) as usize, (ud & 0xffff_ffff) as i64);
            let Some(Some(slot)) = self.slots.get_mut(idx) else {
                continue;
            };
            let res = i64::from(cqe.result());
            if slot.err.is_none() && res != want {
                slot.err = Some(if res < 0 {
                    io::Error::from_raw_os_error(-res as i32)
                } else {
                    io::ErrorKind::UnexpectedEof.into()
                });
            }
            slot.left -= 1;
            if slot.left == 0 {
                if let Some(s) = self.slots[idx].take() {
                    self.free.push(idx);
                    finished.push(s);
                }
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let mut finished = Vec::new();
        while self.pending() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.reap(&mut finished),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The kernel may still write into them: never free them.
                    for s in self.slots.drain(..).flatten() {
                        std::mem::forget(s.buf);
                    }
                    return;
                }
            }
        }
    }
}

/// Requests queued on a [`Ring`] and submitted together by [`Batch::submit`] (or when the
/// batch is dropped), while the files of their pieces are still open.
pub struct Batch<'r, 'a> {
    ring: &'r mut Ring,
    /// `submit` ran: dropping the batch then has nothing to hand over.
    submitted: bool,
    _fds: PhantomData<BorrowedFd<'a>>,
}

impl<'a> Batch<'_, 'a> {
    /// Queues the reads of `pieces` into `buf`, which the ring keeps until [`Ring::wait`]
    /// hands it back with `tag`. Refused, giving `buf` back, if a piece lies outside `buf`
    /// or the ring has no room for all of them.
    pub fn push(&mut self, buf: Vec<u8>, pieces: &[Piece<'a>], tag: u64) -> Result<(), Vec<u8>> {
        self.queue(buf, pieces, tag, false)
    }

    /// Queues writes of `pieces` from `buf`, as [`Batch::push`] queues reads. A short write
    /// is an error like a short read.
    pub fn push_write(
        &mut self,
        buf: Vec<u8>,
        pieces: &[Piece<'a>],
        tag: u64,
    ) -> Result<(), Vec<u8>> {
        self.queue(buf, pieces, tag, true)
    }

    fn queue(
        &mut self,
        buf: Vec<u8>,
        pieces: &[Piece<'a>],
        tag: u64,
        write: bool,
    ) -> Result<(), Vec<u8>> {
        let ring = &mut *self.ring;
        let fits = |p: &Piece<'_>| {
            p.len > 0
                && p.len <= MAX_PIECE
                && p.at.checked_add(p.len).is_some_and(|e| e <= buf.len())
        };
        if pieces.is_empty() || pieces.len() > ring.room() || !pieces.iter().all(fits) {
            return Err(buf);
        }
        let idx = ring.free.pop().unwrap_or_else(|| {
            ring.slots.push(None);
            ring.slots.len() - 1
        });
        let mut slot = Slot {
            buf,
            tag,
            left: pieces.len(),
            err: None,
        };
        let base = slot.buf.as_mut_ptr();
        for p in pieces {
            // `fits` bounds len by MAX_PIECE, so both casts are lossless.
            let (fd, at, len) = (types::Fd(p.fd.as_raw_fd()), base.wrapping_add(p.at), p.len);
            let entry = if write {
                opcode::Write::new(fd, at, len as u32)
                    .offset(p.offset)
                    .build()
            } else {
                opcode::Read::new(fd, at, len as u32)
                    .offset(p.offset)
                    .build()
            }
            .user_data(((idx as u64) << 32) | p.len as u64);
            if ring.ring.submission().is_full() {
                // Room in the ring counts submitted requests too, so a submit frees entries.
                if let Err(e) = ring.ring.submit() {
                    slot.err.get_or_insert(e);
                }
            }
            // SAFETY: the entry writes (or reads) `p.len` bytes at `base + p.at`, inside
            // `slot.buf` (checked by `fits`). The buffer moves into `ring.slots` below and
            // leaves it only in `reap`, once every one of its requests has completed, or is
            // leaked by `drop`; moving a Vec does not move its heap memory. The fd is open
            // for `'a`, which outlives this batch, and so until the submission that hands it
            // to the kernel.
            #[allow(unsafe_code)]
            let pushed = unsafe { ring.ring.submission().push(&entry) };
            if pushed.is_err() {
                // Cannot happen after the submit above; count the request as failed.
                slot.left -= 1;
                slot.err
                    .get_or_insert(io::Error::other("io_uring submission queue full"));
                continue;
            }
            ring.in_flight += 1;
        }
        if slot.left == 0 {
            // Nothing reached the ring: give the buffer back now.
            ring.free.push(idx);
            return Err(slot.buf);
        }
        ring.slots[idx] = Some(slot);
        Ok(())
    }

    /// Hands the queued requests to the kernel.
    pub fn submit(mut self) -> io::Result<()> {
        self.submitted = true;
        self.ring.ring.submit().map(|_| ())
    }
}

impl Drop for Batch<'_, '_> {
    fn drop(&mut self) {
        // An error here shows in `wait`, which submits again.
        if !self.submitted {
            let _ = self.ring.ring.submit();
        }
    }
}

#[cfg(test)]
mod tests;
