//! Sending [`ReadPiece::Staged`] pieces: bytes a backend keeps in a file that may drop them
//! (a host cache that evicts). They are read into a pipe first (`splice`, which takes
//! references to the file's pages, no copy), the backend is asked whether they were still
//! good when read, and only then do they go on to the socket; if not, the pipe is emptied
//! and the backend's `read` supplies those bytes instead. So a reply never carries bytes
//! an eviction replaced, and most of them never pass through user space.

use std::cell::RefCell;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};

use crate::{Backend, BackendError};

/// Most bytes staged at once: the pipe's size where the kernel allows it (the default
/// `pipe-max-size` is 1 MiB), else its default of 64 KiB.
const PIPE_BYTES: usize = 1 << 20;

/// A thread's pipe and its capacity, made on its first staged piece.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

thread_local! {
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// A staged piece: `len` bytes of `fd` at `offset`, standing for the disk's bytes at
/// `at`, good if `backend.staged_valid(tag, token)` holds after they were read.
pub(crate) struct Staged<'a> {
    pub fd: BorrowedFd<'a>,
    pub offset: u64,
    pub len: u64,
    pub tag: u64,
    pub token: u64,
    pub at: u64,
}

/// Sends the piece's bytes to `w`, checked chunk by chunk. An error means the reply is
/// cut short (the caller drops the connection: its header is already out).
pub(crate) fn send<W: Write + AsFd>(w: &mut W, p: &Staged<'_>, b: &dyn Backend) -> io::Result<()> {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // No pipe (out of descriptors, say): the bytes go the checked way instead.
            *slot = new_pipe().ok();
        }
        let Some(pipe) = slot.as_ref() else {
            return copy(w, p, b, 0, p.len);
        };
        let res = send_through(pipe, w, p, b);
        if res.is_err() {
            // It may hold bytes of this reply: the next one must start from an empty pipe.
            *slot = None;
        }
        res
    })
}

fn send_through<W: Write + AsFd>(
    pipe: &Pipe,
    w: &mut W,
    p: &Staged<'_>,
    b: &dyn Backend,
) -> io::Result<()> {
    let mut done = 0u64;
    while done < p.len {
        let n = (p.len - done).min(pipe.capacity as u64);
        match fill(pipe, p.fd, p.offset + done, n as usize) {
            Ok(k) if k > 0 && b.staged_valid(p.tag, p.token) => {
                drain_to(pipe, w.as_fd(), k)?;
                done += k as u64;
            }
            staged => {
                // Evicted meanwhile, or the file ends: what the pipe holds is not sent.
                discard(pipe, staged.unwrap_or(0))?;
                copy(w, p, b, done, n)?;
                done += n;
            }
        }
    }
    Ok(())
}

/// Bytes the copying way moves at once: a small buffer, as this memory is not counted in
/// any budget (every connection thread may be here at once after an eviction).
const COPY_BYTES: u64 = 64 * 1024;

/// Sends `n` bytes of the piece from `from` on as the backend's `read` gives them.
fn copy<W: Write>(w: &mut W, p: &Staged<'_>, b: &dyn Backend, from: u64, n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; n.min(COPY_BYTES) as usize];
    let mut done = 0u64;
    while done < n {
        let k = (n - done).min(buf.len() as u64) as usize;
        b.read(p.at + from + done, &mut buf[..k])
            .map_err(backend_io)?;
        w.write_all(&buf[..k])?;
        done += k as u64;
    }
    Ok(())
}

fn new_pipe() -> io::Result<Pipe> {
    let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
    // A smaller pipe only means more chunks.
    let capacity = fcntl_setpipe_size(&write, PIPE_BYTES)
        .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
    Ok(Pipe {
        read,
        write,
        capacity: capacity.max(4096),
    })
}

/// Moves up to `n` bytes of `fd` at `offset` into the empty pipe; the bytes moved: fewer
/// where the file ends, or where the pipe is full first (bytes not starting on a page
/// take one slot more than their size: never wait for room no one will make).
fn fill(pipe: &Pipe, fd: BorrowedFd<'_>, mut offset: u64, n: usize) -> io::Result<usize> {
    let mut k = 0;
    while k < n {
        match splice(
            fd,
            Some(&mut offset),
            &pipe.write,
            None,
            n - k,
            SpliceFlags::NONBLOCK,
        ) {
            Ok(0) => break,
            Err(rustix::io::Errno::AGAIN) if k > 0 => break,
            Ok(m) => k += m,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                // What did arrive must still be emptied out: report it through `discard`.
                return if k == 0 { Err(e.into()) } else { Ok(k) };
            }
        }
    }
    Ok(k)
}

/// Moves `n` bytes from the pipe to `out` (the socket).
fn drain_to(pipe: &Pipe, out: BorrowedFd<'_>, n: usize) -> io::Result<()> {
    let mut k = 0;
    while k < n {
        match splice(&pipe.read, None, out, None, n - k, SpliceFlags::empty()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => k += m,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Empties `n` bytes out of the pipe, unsent.
fn discard(pipe: &Pipe, mut n: usize) -> io::Result<()> {
    let mut scratch = [0u8; 16 * 1024];
    while n > 0 {
        let k = scratch.len().min(n);
        match rustix::io::read(&pipe.read, &mut scratch[..k]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(m) => n -= m,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn backend_io(e: BackendError) -> io::Error {
    io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendErrorKind, Extent, ZeroFlags};
    use std::fs::File;
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    /// A file whose `read` gives the file's bytes inverted, so a test sees which way
    /// bytes went; `valid` is what `staged_valid` answers.
    struct Inverted {
        file: File,
        valid: bool,
    }

    impl Backend for Inverted {
        fn size(&self) -> u64 {
            self.file.metadata().unwrap().len()
        }
        fn preferred_block_size(&self) -> u32 {
            4096
        }
        fn is_read_only(&self) -> bool {
            true
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            self.file
                .read_exact_at(buf, offset)
                .map_err(|e| BackendError::new(BackendErrorKind::Io, e.to_string()))?;
            buf.iter_mut().for_each(|x| *x = !*x);
            Ok(())
        }
        fn staged_valid(&self, _: u64, _: u64) -> bool {
            self.valid
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), BackendError> {
            unreachable!()
        }
        fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
            unreachable!()
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), BackendError> {
            unreachable!()
        }
        fn block_status(&self, _: u64, _: u64, _: &mut Vec<Extent>) -> Result<(), BackendError> {
            unreachable!()
        }
    }

    fn sent(valid: bool, offset: u64, len: u64) -> (Vec<u8>, Vec<u8>) {
        let path = std::env::temp_dir().join(format!(
            "cowdisk-staged-{}-{valid}-{offset}",
            std::process::id()
        ));
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let b = Inverted { file, valid };
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).unwrap();
            got
        });
        let p = Staged {
            fd: b.file.as_fd(),
            offset,
            len,
            tag: 0,
            token: 0,
            at: offset,
        };
        send(&mut tx, &p, &b).unwrap();
        drop(tx);
        let want = data[offset as usize..(offset + len) as usize].to_vec();
        (reader.join().unwrap(), want)
    }

    /// More than a pipe's worth, not starting on a page: several chunks, some cut short
    /// by a full pipe, and every byte arrives in order.
    #[test]
    fn vouched_bytes_arrive_whole_across_chunks() {
        let (got, want) = sent(true, 100, (2 << 20) + 12345);
        assert!(got == want);
    }

    /// Refused bytes never leave: the backend's `read` supplies them.
    #[test]
    fn refused_bytes_are_replaced_by_reads() {
        let (got, want) = sent(false, 7, (1 << 20) + 4096);
        let inverted: Vec<u8> = want.iter().map(|x| !x).collect();
        assert!(got == inverted);
    }
}
