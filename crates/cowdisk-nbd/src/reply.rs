//! Replies: pure builders, a per-connection writer thread that owns the socket's write side,
//! and the server-wide buffer pool.
//!
//! Workers never write to sockets: they hand finished replies to the connection's writer, so
//! a client that stops reading stalls only its own writer, never the shared workers.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use crate::wire::{self, chunk, cmd, Request};
use crate::BackendError;

/// Space reserved in front of read data for the largest reply header (chunk header + offset),
/// so header and data go out in one write.
pub(crate) const READ_HEADROOM: usize = wire::CHUNK_HEADER_LEN + 8;

/// Longest error message sent in an `ERROR` chunk.
const MAX_ERROR_MESSAGE: usize = 256;

/// One complete reply, ready for the wire.
pub(crate) enum Bytes {
    /// A simple reply (no payload).
    Simple([u8; wire::SIMPLE_REPLY_LEN]),
    /// A buffer whose bytes from `start` are the reply; returned to the pool once written.
    Buf(Vec<u8>, usize),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Simple(b) => b,
            Bytes::Buf(v, start) => &v[*start..],
        }
    }
}

/// A reply for the writer, and the in-flight budget it frees once written.
pub(crate) struct Msg {
    pub bytes: Bytes,
    /// The budget (bytes) the request took when accepted; one request's worth is freed.
    pub release: usize,
}

/// Simple success reply.
pub(crate) fn ok(req: &Request) -> Bytes {
    let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
    wire::simple_reply(&mut h, 0, req.cookie);
    Bytes::Simple(h)
}

/// Error reply: a structured `ERROR` chunk where a simple reply is forbidden (READ with
/// structured replies) or would be odd (BLOCK_STATUS), a simple reply otherwise.
pub(crate) fn error(structured: bool, req: &Request, errno: u32, message: &str) -> Bytes {
    if structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS) {
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
        Bytes::Buf(out, 0)
    } else {
        let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
        wire::simple_reply(&mut h, errno, req.cookie);
        Bytes::Simple(h)
    }
}

/// Error reply for a failed backend call.
pub(crate) fn backend_error(structured: bool, req: &Request, e: &BackendError) -> Bytes {
    error(structured, req, e.kind.errno(), &e.message)
}

/// Successful READ reply; `buf` holds [`READ_HEADROOM`] spare bytes followed by the data.
pub(crate) fn read_data(structured: bool, req: &Request, offset: u64, mut buf: Vec<u8>) -> Bytes {
    let data_len = buf.len().saturating_sub(READ_HEADROOM);
    if structured {
        let mut h = [0u8; wire::CHUNK_HEADER_LEN];
        // data_len ≤ the payload limit (validated), far below u32::MAX.
        let plen = u32::try_from(8 + data_len).unwrap_or(u32::MAX);
        wire::chunk_header(
            &mut h,
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            req.cookie,
            plen,
        );
        buf[..wire::CHUNK_HEADER_LEN].copy_from_slice(&h);
        let mut o = [0u8; 8];
        wire::write_u64(&mut o, offset);
        buf[wire::CHUNK_HEADER_LEN..READ_HEADROOM].copy_from_slice(&o);
        Bytes::Buf(buf, 0)
    } else {
        let start = READ_HEADROOM - wire::SIMPLE_REPLY_LEN;
        let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
        wire::simple_reply(&mut h, 0, req.cookie);
        buf[start..READ_HEADROOM].copy_from_slice(&h);
        Bytes::Buf(buf, start)
    }
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

/// Writes replies in the order they arrive until every sender is gone. Replies that are
/// already queued go out together (one flush, so pipelined clients cost fewer syscalls); the
/// buffer is flushed whenever the queue runs empty, so no reply waits. After a failed write it
/// stops writing (and aborts the connection) but keeps draining, so budget is still freed and
/// the connection can finish.
pub(crate) fn writer<W: Write>(
    w: W,
    rx: mpsc::Receiver<Msg>,
    failed: &AtomicBool,
    abort: &dyn Fn(),
    pool: &BufPool,
    release: &dyn Fn(usize),
) {
    let mut w = std::io::BufWriter::with_capacity(WRITE_BUFFER, w);
    let fail = |e: std::io::Error| {
        let _ = e;
        if !failed.swap(true, Ordering::SeqCst) {
            // Wake the reader so the connection ends instead of accepting more work.
            abort();
        }
    };
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::TryRecvError::Empty) => {
                if !failed.load(Ordering::SeqCst) {
                    if let Err(e) = w.flush() {
                        fail(e);
                    }
                }
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        if !failed.load(Ordering::SeqCst) {
            if let Err(e) = w.write_all(msg.bytes.as_slice()) {
                fail(e);
            }
        }
        if let Bytes::Buf(b, _) = msg.bytes {
            pool.put(b);
        }
        // The bytes are on the socket or in the bounded write buffer: the request is done.
        release(msg.release);
    }
    if !failed.load(Ordering::SeqCst) {
        if let Err(e) = w.flush() {
            fail(e);
        }
    }
}

/// Replies batched into one socket write (larger ones go straight through).
const WRITE_BUFFER: usize = 256 * 1024;

/// Server-wide free list of I/O buffers, so steady-state I/O does not allocate and memory
/// stays bounded by the number of workers, not of connections.
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
}

const POOL_MAX_CAPACITY: usize = (1 << 20) + READ_HEADROOM;

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

    /// Returns a buffer for reuse; large ones are freed so idle memory stays bounded.
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
