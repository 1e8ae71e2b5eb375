//! Reply writing (whole replies through the connection's [`Outbox`], so replies never
//! interleave) and a small buffer pool so steady-state I/O does not allocate per request.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::outbox::Outbox;
use crate::wire::{self, chunk, cmd, Request};
use crate::{Backend, BackendError, ReadPiece};

/// Space reserved in front of read data for the largest reply header (chunk header + offset),
/// so header and data go out in one write.
pub(crate) const READ_HEADROOM: usize = wire::CHUNK_HEADER_LEN + 8;

/// Alignment of the data in a READ buffer (direct I/O's, for 512-byte and 4 KiB sectors):
/// a buffer has this much slack so that its data can start on a boundary.
pub(crate) const DATA_ALIGN: usize = 4096;

/// One metadata context's part of a BLOCK_STATUS reply: its id and `(length, flags)` extents.
pub(crate) type ContextExtents = (u32, Vec<(u32, u32)>);

/// Longest error message sent in an `ERROR` chunk.
const MAX_ERROR_MESSAGE: usize = 256;

/// Serialises replies onto the socket.
pub(crate) struct Replier<'a, W> {
    out: Outbox<W>,
    structured: bool,
    failed: AtomicBool,
    abort: &'a (dyn Fn() + Sync),
}

/// The simple success reply to `req`.
fn ok_head(req: &Request) -> [u8; wire::SIMPLE_REPLY_LEN] {
    let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
    wire::simple_reply(&mut h, 0, req.cookie);
    h
}

impl<'a, W: Write> Replier<'a, W> {
    pub fn new(w: W, structured: bool, abort: &'a (dyn Fn() + Sync)) -> Self {
        Self {
            out: Outbox::new(w),
            structured,
            failed: AtomicBool::new(false),
            abort,
        }
    }

    /// Whether a reply could not be written (the connection is then being torn down).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Writes one complete reply (or leaves it to the thread writing now, see [`Outbox`]).
    pub fn send(&self, bytes: &[u8]) {
        if !self.failed() {
            let res = self.out.send(bytes);
            self.check(res);
        }
    }

    /// Runs `f` with the writer held, so one reply goes out whole.
    fn write_reply(&self, f: impl FnOnce(&mut W) -> io::Result<()>) {
        if !self.failed() {
            let res = self.out.write(f);
            self.check(res);
        }
    }

    /// A failed write marks the connection failed and wakes the reader, so no more work is
    /// accepted.
    fn check(&self, res: io::Result<()>) {
        if res.is_err() {
            self.failed.store(true, Ordering::Relaxed);
            (self.abort)();
        }
    }

    /// Writes the header of a successful READ reply of `len` bytes at `offset` at the end of
    /// `head` ([`READ_HEADROOM`] bytes) and returns where it starts.
    fn read_header(&self, req: &Request, offset: u64, len: u32, head: &mut [u8]) -> usize {
        if self.structured {
            let mut h = [0u8; wire::CHUNK_HEADER_LEN];
            // len is a validated payload length, far below u32::MAX - 8.
            wire::chunk_header(
                &mut h,
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                req.cookie,
                len.saturating_add(8),
            );
            let mut o = [0u8; 8];
            wire::write_u64(&mut o, offset);
            head[..wire::CHUNK_HEADER_LEN].copy_from_slice(&h);
            head[wire::CHUNK_HEADER_LEN..READ_HEADROOM].copy_from_slice(&o);
            0
        } else {
            let start = READ_HEADROOM - wire::SIMPLE_REPLY_LEN;
            head[start..READ_HEADROOM].copy_from_slice(&ok_head(req));
            start
        }
    }

    /// Simple success reply.
    pub fn ok(&self, req: &Request) {
        self.send(&ok_head(req));
    }

    /// Simple success replies to `reqs`, sent together as one buffer.
    pub fn ok_all<'r>(&self, reqs: impl IntoIterator<Item = &'r Request>) {
        let all: Vec<u8> = reqs.into_iter().flat_map(ok_head).collect();
        if !all.is_empty() {
            self.send(&all);
        }
    }

    /// Error reply: a structured `ERROR` chunk where a simple reply is forbidden (READ with
    /// structured replies) or would be odd (BLOCK_STATUS), a simple reply otherwise.
    pub fn error(&self, req: &Request, errno: u32, message: &str) {
        if self.structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS) {
            let msg = truncate(message, MAX_ERROR_MESSAGE).as_bytes();
            let mut out = Vec::with_capacity(wire::CHUNK_HEADER_LEN + 6 + msg.len());
            let mut h = [0u8; wire::CHUNK_HEADER_LEN];
            // msg.len() ≤ MAX_ERROR_MESSAGE, so both casts are lossless.
            let plen = 6 + msg.len() as u32;
            wire::chunk_header(&mut h, chunk::FLAG_DONE, chunk::ERROR, req.cookie, plen);
            out.extend_from_slice(&h);
            wire::put_u32(&mut out, errno);
            wire::put_u16(&mut out, msg.len() as u16);
            out.extend_from_slice(msg);
            self.send(&out);
        } else {
            let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
            wire::simple_reply(&mut h, errno, req.cookie);
            self.send(&h);
        }
    }

    /// Error reply for a failed backend call.
    pub fn backend_error(&self, req: &Request, e: &BackendError) {
        self.error(req, e.kind.errno(), &e.message);
    }

    /// Successful BLOCK_STATUS reply: one chunk per metadata context with its
    /// `(length, flags)` extents, the last one marked done.
    pub fn block_status(&self, req: &Request, contexts: &[ContextExtents]) {
        let mut out = Vec::new();
        for (i, (id, extents)) in contexts.iter().enumerate() {
            let flags = if i + 1 == contexts.len() {
                chunk::FLAG_DONE
            } else {
                0
            };
            let mut h = [0u8; wire::CHUNK_HEADER_LEN];
            // Callers cap the extents per context far below u32::MAX / 8.
            let plen = u32::try_from(4 + 8 * extents.len()).unwrap_or(u32::MAX);
            wire::chunk_header(&mut h, flags, chunk::BLOCK_STATUS, req.cookie, plen);
            out.extend_from_slice(&h);
            wire::put_u32(&mut out, *id);
            for &(len, state) in extents {
                wire::put_u32(&mut out, len);
                wire::put_u32(&mut out, state);
            }
        }
        self.send(&out);
    }

    /// Successful READ replies, sent together: each `(request, offset, buf)` as for
    /// [`Replier::read_data`].
    pub fn read_data_all(&self, replies: &mut [(Request, u64, &mut [u8])]) {
        if self.failed() || replies.is_empty() {
            return;
        }
        let slices: Vec<&[u8]> = replies
            .iter_mut()
            .map(|(req, offset, buf)| self.read_reply(req, *offset, buf))
            .collect();
        let res = self.out.send_all(&slices);
        self.check(res);
    }

    /// Successful READ reply; `buf` holds [`READ_HEADROOM`] spare bytes followed by the data.
    pub fn read_data(&self, req: &Request, offset: u64, buf: &mut [u8]) {
        let reply = self.read_reply(req, offset, buf);
        self.send(reply);
    }

    /// Writes the header of a READ reply into the spare bytes at the front of `buf` (as for
    /// [`Replier::read_data`]) and returns the whole reply.
    fn read_reply<'b>(&self, req: &Request, offset: u64, buf: &'b mut [u8]) -> &'b [u8] {
        // The data length is a validated payload length, far below u32::MAX.
        let len = u32::try_from(buf.len().saturating_sub(READ_HEADROOM)).unwrap_or(u32::MAX);
        let start = self.read_header(req, offset, len, &mut buf[..READ_HEADROOM]);
        &buf[start..]
    }
}

impl<W: Write + AsFd> Replier<'_, W> {
    /// Successful READ reply sent from files with `sendfile(2)`: the header, then every piece,
    /// holding the writer throughout. A failure after the header can no longer be answered
    /// with an error, so the connection is dropped: the client never takes part of a reply
    /// for data.
    pub fn read_pieces(
        &self,
        req: &Request,
        offset: u64,
        len: u32,
        pieces: &[ReadPiece<'_>],
        b: &dyn Backend,
    ) {
        let mut head = [0u8; READ_HEADROOM];
        let start = self.read_header(req, offset, len, &mut head);
        self.write_reply(|w| {
            w.write_all(&head[start..])?;
            send_pieces(w, pieces, offset, b)
        });
    }
}

/// Zeros for `ReadPiece::Zeros`, from a static so they cost no allocation.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Sends the pieces of the read at `at` (the disk offset the first one stands for).
fn send_pieces<W: Write + AsFd>(
    w: &mut W,
    pieces: &[ReadPiece<'_>],
    mut at: u64,
    b: &dyn Backend,
) -> io::Result<()> {
    for p in pieces {
        let here = at;
        at += p.bytes();
        match *p {
            ReadPiece::Staged {
                fd,
                offset,
                len,
                tag,
                token,
            } => {
                let s = crate::staged::Staged {
                    fd,
                    offset,
                    len,
                    tag,
                    token,
                    at: here,
                };
                crate::staged::send(w, &s, b)?;
            }
            // Read into a buffer by the caller, never sent from the file (see `gather`).
            ReadPiece::Direct { .. } => {
                return Err(io::Error::other(
                    "a direct piece cannot be sent from its file",
                ))
            }
            ReadPiece::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(ZEROS.len() as u64) as usize;
                    w.write_all(&ZEROS[..k])?;
                    n -= k as u64;
                }
            }
            ReadPiece::File {
                fd,
                mut offset,
                len,
            } => {
                let mut left = len;
                while left > 0 {
                    let chunk = left.min(1 << 30) as usize;
                    match rustix::fs::sendfile(w.as_fd(), fd, Some(&mut offset), chunk) {
                        // The file is shorter than the backend said: never pad with garbage.
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => left -= n as u64,
                        Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Server-wide free list of I/O buffers, so steady-state I/O does not allocate and buffer
/// memory does not grow with the number of connections; larger ones are freed.
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
}

/// A 1 MiB READ with its header and the slack that aligns its data.
const POOL_MAX_CAPACITY: usize = (1 << 20) + READ_HEADROOM + DATA_ALIGN;

impl BufPool {
    /// A pool keeping at most `max_buffers` free buffers.
    pub fn new(max_buffers: usize) -> BufPool {
        BufPool {
            free: Mutex::new(Vec::new()),
            max_buffers,
        }
    }

    /// A zero-filled buffer of exactly `len` bytes (callers bound `len` first).
    pub fn get(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let pos = free.iter().position(|b| b.capacity() >= len);
            pos.map(|i| free.swap_remove(i))
        };
        match reused {
            Some(mut b) => {
                b.clear();
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOL_MAX_CAPACITY {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max_buffers {
            free.push(buf);
        }
    }
}
