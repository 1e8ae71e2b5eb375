//! Receiving WRITE payloads without letting them pin memory.
//!
//! A payload is staged in memory, a piece of at most [`WRITE_PIECE`] at a time, only while
//! the server-wide write budget has room for the piece; a full piece goes to the backend
//! before more is read. With no room, bytes go to the backend straight from the
//! connection's receive buffer as they arrive. So a payload that stops arriving holds at
//! most one piece, all staged pieces together stay within the budget, and a budget used up
//! by stalled payloads slows other writers to small pieces but makes nobody wait. (NBD
//! promises no atomicity: like a crash, a write that is never answered may be applied in
//! part.)

use std::io::{self, BufRead, BufReader, Read};

use crate::budget::Held;
use crate::reply::BufPool;
use crate::{Backend, BackendError};

/// Largest piece of a payload staged at once (and what a pooled buffer holds).
pub(crate) const WRITE_PIECE: usize = 1 << 20;

/// What is left of a received payload once it has all arrived: the last staged piece (not
/// yet written, so the request's worker writes it after the connection's input is free) or
/// the failure of an earlier piece.
pub(crate) struct Tail<'c> {
    offset: u64,
    data: Vec<u8>,
    held: Held<'c>,
    failed: Option<BackendError>,
}

impl Tail<'_> {
    /// Writes the last piece unless an earlier one failed; frees its memory and budget
    /// before returning, so the reply never waits with them held.
    pub fn finish(self, b: &dyn Backend, fua: bool, pool: &BufPool) -> Result<(), BackendError> {
        let Tail {
            offset,
            data,
            held,
            failed,
        } = self;
        let res = match failed {
            Some(e) => Err(e),
            None if data.is_empty() => Ok(()),
            None => b.write(offset, &data, fua),
        };
        pool.put(data);
        drop(held);
        res
    }

    /// Writes the staged piece (unless a piece failed already) and empties it.
    fn write_piece(&mut self, b: &dyn Backend, fua: bool, pool: &BufPool) {
        if self.failed.is_none() {
            self.failed = b.write(self.offset, &self.data, fua).err();
        }
        self.offset += self.data.len() as u64;
        pool.put(std::mem::take(&mut self.data));
        self.held.shrink(usize::MAX);
    }

    /// Writes bytes that were not staged; after a failure they are only discarded.
    fn write_through(&mut self, b: &dyn Backend, bytes: &[u8], fua: bool) {
        if self.failed.is_none() {
            self.failed = b.write(self.offset, bytes, fua).err();
        }
        self.offset += bytes.len() as u64;
    }
}

/// Reads a `len`-byte payload for `offset`; every piece but the last is written on the way,
/// each with the request's `fua`. An error (EOF, the payload deadline) means the payload is
/// incomplete: the connection must end, and the request goes unanswered.
pub(crate) fn receive<'c, R: Read>(
    r: &mut BufReader<R>,
    b: &dyn Backend,
    pool: &BufPool,
    held: Held<'c>,
    offset: u64,
    len: u32,
    fua: bool,
) -> io::Result<Tail<'c>> {
    let mut tail = Tail {
        offset,
        data: Vec::new(),
        held,
        failed: None,
    };
    let mut left = len as usize;
    while left > 0 {
        if !tail.data.is_empty() {
            // A full piece, with more to come.
            tail.write_piece(b, fua, pool);
        }
        let piece = left.min(WRITE_PIECE);
        if tail.held.try_grow(piece) {
            tail.data = pool.get(piece);
            r.read_exact(&mut tail.data)?;
            left -= piece;
            continue;
        }
        // No room: pass what has arrived straight through, a receive buffer at a time.
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(left);
        tail.write_through(b, &buf[..n], fua);
        r.consume(n);
        left -= n;
    }
    Ok(tail)
}
