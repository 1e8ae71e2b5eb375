//! Receiving WRITE payloads without letting them pin memory.
//!
//! A payload is staged whole, and applied only once it has all arrived, when the server-wide
//! write budget has room for it; a payload cut short is then never applied. With no room
//! (the budget is held by other payloads, stalled ones perhaps, or the payload is over half
//! of it), the payload goes to the backend as it arrives, in [`PASS_PIECE`] pieces (offsets
//! relative to the request, so aligned requests stay aligned), through one pooled buffer.
//! So staged payloads never exceed the budget, a payload that stops arriving holds its
//! budget share or one piece until the payload timeout, and a budget used up makes nobody
//! wait. (NBD promises no atomicity: like a crash, a passed-through write that is never
//! answered may be applied in part.)

use std::io::{self, Read};

use crate::budget::Held;
use crate::reply::{BufPool, DATA_ALIGN};
use crate::{Backend, BackendError};

/// Piece of a payload written to the backend at once when it cannot be staged: one
/// copy-on-write block at the default block size.
pub(crate) const PASS_PIECE: usize = 64 << 10;

/// A received payload, ready to be applied by the request's worker (after the connection's
/// input is free): staged bytes, or the outcome of passing it through.
pub(crate) enum Received<'c> {
    Staged {
        /// The payload is `data[at..at + len]`.
        data: Vec<u8>,
        at: usize,
        len: usize,
        /// Its share of the write budget, freed with it.
        held: Held<'c>,
    },
    Written(Result<(), BackendError>),
}

impl Received<'_> {
    /// Applies a staged payload at `offset`; frees its memory and budget before returning, so
    /// the reply never waits with them held.
    pub fn finish(
        self,
        b: &dyn Backend,
        offset: u64,
        fua: bool,
        pool: &BufPool,
    ) -> Result<(), BackendError> {
        match self {
            Received::Staged {
                data,
                at,
                len,
                held,
            } => {
                let res = b.write(offset, &data[at..at + len], fua);
                pool.put(data);
                drop(held);
                res
            }
            Received::Written(res) => res,
        }
    }
}

/// Reads a `len`-byte payload for `offset`, staged within `held`'s budget if it has room,
/// written through otherwise. An error (EOF, the payload deadline) means the payload is
/// incomplete: the connection must end and the request goes unanswered.
pub(crate) fn receive<'c, R: Read>(
    r: &mut R,
    b: &dyn Backend,
    pool: &BufPool,
    held: Held<'c>,
    offset: u64,
    len: u32,
    fua: bool,
) -> io::Result<Received<'c>> {
    let len = len as usize;
    // No room: the hold goes (`stage` gave it back).
    if let Ok(staged) = stage(r, pool, held, len, b.writes_in_place()) {
        return staged;
    }
    // Told to the backend for as long as pieces may arrive, however this ends.
    struct Pieces<'b>(&'b dyn Backend);
    impl Drop for Pieces<'_> {
        fn drop(&mut self) {
            self.0.pieces_end();
        }
    }
    b.pieces_begin();
    let _pieces = Pieces(b);
    // Exactly one piece, never a larger pooled buffer: it is held outside the budget.
    let mut piece = vec![0; PASS_PIECE.min(len)];
    let (mut done, mut res) = (0usize, Ok(()));
    while done < len {
        let n = (len - done).min(piece.len());
        r.read_exact(&mut piece[..n])?;
        // After a failure the rest is only read, to keep the stream in sync.
        if res.is_ok() {
            res = b.write(offset + done as u64, &piece[..n], fua);
        }
        done += n;
    }
    Ok(Received::Written(res))
}

/// Stages a `len`-byte payload whole if `held` can grow by it (else gives `held` back,
/// nothing read). With `align`, a payload of whole 4 KiB pages starts on a page boundary,
/// so direct I/O can write it where it is.
pub(crate) fn stage<'c, R: Read>(
    r: &mut R,
    pool: &BufPool,
    mut held: Held<'c>,
    len: usize,
    align: bool,
) -> Result<io::Result<Received<'c>>, Held<'c>> {
    let slack = if align && len.is_multiple_of(DATA_ALIGN) {
        DATA_ALIGN
    } else {
        0
    };
    if !held.try_grow(len + slack) {
        return Err(held);
    }
    let mut data = held.buffer(pool, len + slack);
    let at = data.as_ptr().align_offset(DATA_ALIGN).min(slack);
    if let Err(e) = r.read_exact(&mut data[at..at + len]) {
        pool.put(data);
        return Ok(Err(e));
    }
    Ok(Ok(Received::Staged {
        data,
        at,
        len,
        held,
    }))
}
