//! Zero-copy reads: a backend that answers `read_pieces` with file ranges and zeros is sent with
//! `sendfile`, byte for byte what `read` would return, in simple and structured replies; a
//! piece the file cannot fill drops the connection instead of sending short or padded data.
//! Staged pieces (bytes a cache may drop) go out only if the backend still vouches for
//! them after they were read; otherwise `read` supplies those bytes. Direct pieces (files
//! opened for direct I/O) are read into the reply, many requests' at once, and where one
//! cannot be read `read` supplies the request.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use client::{Client, TestServer};
use cowdisk_nbd::wire::{cmd, errno};
use cowdisk_nbd::{Backend, BackendError, BackendErrorKind, Extent, Limits, ReadPiece, ZeroFlags};

const PIECE: u64 = 4096;
const SIZE: u64 = 256 * PIECE;

/// Read-only export over a file: piece `i` is data at file offset `(i * 7 % 256) * PIECE`
/// (scrambled, so a wrong offset shows), or zeros for every third piece.
struct FileBackend {
    file: File,
    lie: Lie,
    /// Plans `ReadPiece::Staged`; every other piece names wrong bytes and is refused by
    /// `staged_valid` (an eviction happened after the plan).
    staged: bool,
    /// Plans `ReadPiece::Direct` for aligned reads (and, if it does not lie, `File` for every
    /// fourth piece, so that some plans mix them), and nothing for others.
    direct: bool,
}

/// How a broken backend may plan a read.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Lie {
    /// Correct pieces.
    No,
    /// File pieces past the end of the file.
    PastEnd,
    /// Pieces that add up to less than the request.
    Short,
}

impl FileBackend {
    fn new(lie: Lie) -> Arc<FileBackend> {
        Self::with(lie, false, false)
    }

    fn with(lie: Lie, staged: bool, direct: bool) -> Arc<FileBackend> {
        // Tests run in parallel: one name each (the file is unlinked once open).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("cowdisk-zc-{}-{n}", std::process::id()));
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        std::fs::remove_file(&path).unwrap();
        Arc::new(FileBackend {
            file: f,
            lie,
            staged,
            direct,
        })
    }

    /// (is zeros, file offset) of the piece holding virtual offset `o`.
    fn place(&self, o: u64) -> (bool, u64) {
        let i = o / PIECE;
        let file_off = (i * 7 % 256) * PIECE + o % PIECE;
        (
            i % 3 == 2,
            if self.lie == Lie::PastEnd {
                file_off + SIZE
            } else {
                file_off
            },
        )
    }

    fn expected(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.read(offset, &mut out).unwrap();
        out
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        SIZE
    }
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let mut o = offset;
        let mut done = 0;
        while done < buf.len() {
            let n = (PIECE - o % PIECE).min((buf.len() - done) as u64) as usize;
            let (zero, f) = self.place(o);
            if zero {
                buf[done..done + n].fill(0);
            } else {
                self.file
                    .read_exact_at(&mut buf[done..done + n], f % SIZE)
                    .map_err(|e| BackendError::new(BackendErrorKind::Io, e.to_string()))?;
            }
            done += n;
            o += n as u64;
        }
        Ok(())
    }
    fn read_pieces<'a>(
        &'a self,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece<'a>>,
    ) -> Result<bool, BackendError> {
        if self.direct && !(offset.is_multiple_of(PIECE) && len.is_multiple_of(PIECE)) {
            return Ok(false);
        }
        let mut o = offset;
        while o < offset + len {
            let n = (PIECE - o % PIECE).min(offset + len - o);
            let (zero, f) = self.place(o);
            let stale = (o / PIECE) % 2 == 1;
            out.push(if zero {
                ReadPiece::Zeros(n)
            } else if self.direct && !(self.lie == Lie::No && (o / PIECE) % 4 == 3) {
                ReadPiece::Direct {
                    fd: self.file.as_fd(),
                    offset: f,
                    len: n,
                }
            } else if self.staged {
                ReadPiece::Staged {
                    fd: self.file.as_fd(),
                    offset: if stale { (f + PIECE) % SIZE } else { f },
                    len: n,
                    tag: u64::from(stale),
                    token: 7,
                }
            } else {
                ReadPiece::File {
                    fd: self.file.as_fd(),
                    offset: f,
                    len: n,
                }
            });
            o += n;
        }
        if self.lie == Lie::Short {
            out.pop();
        }
        Ok(true)
    }
    fn staged_valid(&self, tag: u64, token: u64) -> bool {
        tag == 0 && token == 7
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "read-only"))
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "read-only"))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), BackendError> {
        Err(BackendError::new(BackendErrorKind::ReadOnly, "read-only"))
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BackendError> {
        out.push(Extent {
            length: len.min(SIZE - offset),
            zero: false,
            hole: false,
            depth: 1,
        });
        Ok(())
    }
}

fn reads_match(structured: bool) {
    reads_match_with(FileBackend::new(Lie::No), structured);
}

fn reads_match_with(b: Arc<FileBackend>, structured: bool) {
    let srv = TestServer::start(vec![("disk", b.clone())], Limits::default());
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", structured, &[]);
    let cases = [
        (0, 1),
        (0, PIECE),
        (PIECE - 3, 10),
        (2 * PIECE, PIECE),
        (2 * PIECE + 100, 3 * PIECE),
        (5, 40 * PIECE),
        (0, SIZE),
        (SIZE - 1, 1),
    ];
    for (off, len) in cases {
        let got = c.read(off, len as u32);
        assert_eq!(got, b.expected(off, len), "read {off}+{len}");
    }
    // Pipelined: replies may interleave only as whole replies.
    let reads: Vec<(u64, u64)> = (0..64u64)
        .map(|i| ((i * 12345) % (SIZE - 3 * PIECE), PIECE + i * 97))
        .collect();
    pipelined_reads_match(&mut c, &b, &reads, "pipelined");
}

/// Sends every read of `reads` before reading any reply; each reply holds what `read`
/// returns.
fn pipelined_reads_match(c: &mut Client, b: &FileBackend, reads: &[(u64, u64)], what: &str) {
    let mut cookies = Vec::new();
    for &(off, len) in reads {
        cookies.push((c.send_request(0, cmd::READ, off, len as u32, &[]), off, len));
    }
    for _ in 0..cookies.len() {
        let r = c.read_reply();
        let &(_, off, len) = cookies.iter().find(|k| k.0 == r.cookie()).unwrap();
        let data = match r {
            client::Reply::Simple { error: 0, data, .. } => data,
            client::Reply::Chunk { payload, .. } => payload[8..].to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(data, b.expected(off, len), "{what} read {off}+{len}");
    }
}

#[test]
fn sendfile_reads_match_simple_replies() {
    reads_match(false);
}

#[test]
fn sendfile_reads_match_structured_replies() {
    reads_match(true);
}

#[test]
fn staged_pieces_are_sent_only_while_the_backend_vouches_for_them() {
    reads_match_with(FileBackend::with(Lie::No, true, false), false);
    reads_match_with(FileBackend::with(Lie::No, true, false), true);
}

#[test]
fn piece_past_end_of_file_drops_the_connection() {
    let b = FileBackend::new(Lie::PastEnd);
    let srv = TestServer::start(vec![("disk", b)], Limits::default());
    let mut c = Client::connect(srv.addr);
    c.handshake("disk", false, &[]);
    c.send_request(0, cmd::READ, 0, 2 * PIECE as u32, &[]);
    // The header may go out before sendfile finds nothing to send; after it the connection
    // must end, never carry invented bytes.
    let mut got = Vec::new();
    let end = c.stream().read_to_end(&mut got);
    assert!(end.is_ok(), "the connection was not closed: {end:?}");
    assert!(
        got.len() < 16 + 2 * PIECE as usize,
        "a full reply of {} bytes was sent for data that does not exist",
        got.len()
    );
}

#[test]
fn pieces_short_of_the_request_get_eio_and_the_stream_stays_framed() {
    let b = FileBackend::new(Lie::Short);
    let srv = TestServer::start(vec![("disk", b.clone())], Limits::default());
    for structured in [false, true] {
        let mut c = Client::connect(srv.addr);
        c.handshake("disk", structured, &[]);
        assert_eq!(
            c.errno(0, cmd::READ, 0, 2 * PIECE as u32, &[]),
            errno::EIO,
            "structured: {structured}"
        );
        // The next request is answered normally: nothing stray was sent.
        assert_eq!(c.errno(0, cmd::FLUSH, 0, 0, &[]), 0);
    }
}

/// 64 aligned reads sent at once (so the server takes the buffered ones together) of
/// direct pieces and zeros (on the ring), some with file pieces too (read one by one from
/// their plan), in simple and structured replies; with pieces past the end of the file,
/// `read` supplies every request instead.
#[test]
fn direct_pieces_are_read_into_the_reply_even_many_at_once() {
    for lie in [Lie::No, Lie::PastEnd] {
        for structured in [false, true] {
            let b = FileBackend::with(lie, false, true);
            let srv = TestServer::start(vec![("disk", b.clone())], Limits::default());
            let mut c = Client::connect(srv.addr);
            c.handshake("disk", structured, &[]);
            // One alone first, then unaligned ones (not planned), then a burst.
            assert_eq!(c.read(PIECE, PIECE as u32), b.expected(PIECE, PIECE));
            assert_eq!(c.read(PIECE + 5, 100), b.expected(PIECE + 5, 100));
            for round in 0..4u64 {
                let reads: Vec<(u64, u64)> = (0..64u64)
                    .map(|i| ((i * 37 + round) % 200 * PIECE, (1 + i % 5) * PIECE))
                    .collect();
                pipelined_reads_match(&mut c, &b, &reads, &format!("{lie:?}"));
            }
        }
    }
}
