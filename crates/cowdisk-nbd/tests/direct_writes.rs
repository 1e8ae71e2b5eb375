//! WRITEs in place: a backend that gives write targets has WRITEs already buffered written
//! by the server itself, many at once through io_uring, each target held until its write is
//! back. A target whose write fails is let go, and the WRITE then goes to `write`; a target
//! refused, an unaligned WRITE or one with FUA goes to `write` as usual. Two connections
//! whose targets share locks never wait for each other while holding one.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use client::{Client, TestServer};
use cowdisk_nbd::wire::cmd;
use cowdisk_nbd::{
    Backend, BackendError, BackendErrorKind, Extent, Limits, WriteTarget, ZeroFlags,
};

const PAGE: u64 = 4096;
const PAGES: u64 = 512;
const SIZE: u64 = PAGES * PAGE;
/// Fewer locks than pages, so unrelated pages share one (as the engine's stripes do).
const LOCKS: usize = 8;

/// A writable export over a file, page `i` at file offset `(i * 7 % PAGES) * PAGE`
/// (scrambled, so a target's wrong offset shows).
struct PlaceBackend {
    file: File,
    /// Opened read-only: a target through it fails to write.
    read_only: File,
    locks: Vec<Mutex<()>>,
    /// Targets for pages whose index is a multiple of this write through `read_only`.
    fail_every: u64,
    written_in_place: AtomicU64,
    failed_in_place: AtomicU64,
    written_by_write: AtomicU64,
    /// `write` fails for a range holding this page (none: `u64::MAX`).
    bad_page: AtomicU64,
}

impl PlaceBackend {
    fn new(fail_every: u64) -> Arc<PlaceBackend> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, SeqCst);
        let path = std::env::temp_dir().join(format!("cowdisk-dw-{}-{n}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(SIZE).unwrap();
        let read_only = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        Arc::new(PlaceBackend {
            file,
            read_only,
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
            fail_every,
            written_in_place: AtomicU64::new(0),
            failed_in_place: AtomicU64::new(0),
            written_by_write: AtomicU64::new(0),
            bad_page: AtomicU64::new(u64::MAX),
        })
    }

    fn file_offset(o: u64) -> u64 {
        (o / PAGE * 7 % PAGES) * PAGE + o % PAGE
    }

    fn lock(&self, page: u64) -> MutexGuard<'_, ()> {
        self.locks[page as usize % LOCKS].lock().unwrap()
    }

    /// The virtual disk's bytes, in order.
    fn contents(&self) -> Vec<u8> {
        let mut out = vec![0u8; SIZE as usize];
        self.read(0, &mut out).unwrap();
        out
    }
}

struct Target<'a> {
    b: &'a PlaceBackend,
    fd: BorrowedFd<'a>,
    offset: u64,
    _lock: MutexGuard<'a, ()>,
}

impl<'a> WriteTarget<'a> for Target<'a> {
    fn fd(&self) -> BorrowedFd<'a> {
        self.fd
    }
    fn offset(&self) -> u64 {
        self.offset
    }
    fn finish(self: Box<Self>, written: bool) {
        let n = if written {
            &self.b.written_in_place
        } else {
            &self.b.failed_in_place
        };
        n.fetch_add(1, SeqCst);
    }
}

impl Backend for PlaceBackend {
    fn size(&self) -> u64 {
        SIZE
    }
    fn preferred_block_size(&self) -> u32 {
        PAGE as u32
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        for (i, b) in buf.iter_mut().enumerate() {
            let mut one = [0u8];
            let o = Self::file_offset(offset + i as u64);
            self.file.read_exact_at(&mut one, o).unwrap();
            *b = one[0];
        }
        Ok(())
    }
    /// One page, aligned; refused for every fifth page.
    fn write_target(
        &self,
        offset: u64,
        len: u32,
        wait: bool,
    ) -> Option<Box<dyn WriteTarget<'_> + '_>> {
        let page = offset / PAGE;
        if !offset.is_multiple_of(PAGE) || u64::from(len) != PAGE || page % 5 == 4 {
            return None;
        }
        let m = &self.locks[page as usize % LOCKS];
        let lock = if wait {
            m.lock().unwrap()
        } else {
            match m.try_lock() {
                Ok(g) => g,
                Err(TryLockError::WouldBlock) => return None,
                Err(TryLockError::Poisoned(_)) => panic!("poisoned"),
            }
        };
        let file = if self.fail_every > 0 && page.is_multiple_of(self.fail_every) {
            &self.read_only
        } else {
            &self.file
        };
        Some(Box::new(Target {
            b: self,
            fd: file.as_fd(),
            offset: Self::file_offset(offset),
            _lock: lock,
        }))
    }
    fn writes_in_place(&self) -> bool {
        true
    }
    /// Waits for each page's lock: called with a target of the same lock still held, it
    /// would wait forever.
    fn write(&self, offset: u64, data: &[u8], _: bool) -> Result<(), BackendError> {
        let bad = self.bad_page.load(SeqCst);
        if (offset / PAGE..(offset + data.len() as u64).div_ceil(PAGE)).contains(&bad) {
            return Err(BackendError::new(BackendErrorKind::Io, "bad page"));
        }
        let mut pos = 0;
        while pos < data.len() {
            let o = offset + pos as u64;
            let n = ((PAGE - o % PAGE) as usize).min(data.len() - pos);
            let _g = self.lock(o / PAGE);
            self.file
                .write_all_at(&data[pos..pos + n], Self::file_offset(o))
                .unwrap();
            pos += n;
        }
        self.written_by_write.fetch_add(1, SeqCst);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), BackendError> {
        Ok(())
    }
    fn block_status(&self, _: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), BackendError> {
        out.push(Extent {
            length: len,
            zero: false,
            hole: false,
            depth: 1,
        });
        Ok(())
    }
}

/// A server for `b`. A deadlocked one could not be stopped, so it is left to end with the
/// test process, and its clients give up after a minute.
fn start(b: &Arc<PlaceBackend>) -> std::net::SocketAddr {
    start_with(b, Limits::default())
}

fn start_with(b: &Arc<PlaceBackend>, limits: Limits) -> std::net::SocketAddr {
    let srv = TestServer::start(vec![("disk", b.clone())], limits);
    let addr = srv.addr;
    std::mem::forget(srv);
    addr
}

/// Deterministic bytes for write `i` of a round.
fn pattern(round: u64, i: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|k| ((round * 131 + i * 31 + k * 7) % 251) as u8 + 1)
        .collect()
}

/// Sends `writes` (offset, data, flags) before reading any reply; every reply must be OK.
fn pipelined_writes(c: &mut Client, writes: &[(u64, Vec<u8>, u16)]) {
    let limit = Some(Duration::from_secs(60));
    c.stream().set_read_timeout(limit).unwrap();
    for (off, data, flags) in writes {
        c.send_request(*flags, cmd::WRITE, *off, data.len() as u32, data);
    }
    for _ in 0..writes.len() {
        assert_eq!(c.read_reply().errno(), 0);
    }
}

/// One round: 64 WRITEs to distinct pages, mostly whole aligned pages, some unaligned,
/// two pages long or with FUA; applied to `model` too.
fn round_of_writes(round: u64, first_page: u64, model: &mut [u8]) -> Vec<(u64, Vec<u8>, u16)> {
    (0..64u64)
        .map(|i| {
            // 2 pages apart, so even two-page writes never overlap within a round.
            let page = first_page + (i * 2 * 37 + round * 11) % 128 * 2;
            let (off, len, flags) = match i % 16 {
                3 => (page * PAGE + 100, 300, 0),
                7 => (page * PAGE, 2 * PAGE as usize, 0),
                11 => (
                    page * PAGE,
                    PAGE as usize,
                    cowdisk_nbd::wire::cmd_flags::FUA,
                ),
                _ => (page * PAGE, PAGE as usize, 0),
            };
            let data = pattern(round, i, len);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            (off, data, flags)
        })
        .collect()
}

/// Pipelined WRITEs, in simple and structured sessions: the content is exactly the writes,
/// many went in place, and with failing targets those were written again by `write`.
#[test]
fn writes_in_flight_together_land_where_asked() {
    for fail_every in [0, 3] {
        for structured in [false, true] {
            let b = PlaceBackend::new(fail_every);
            let mut c = Client::connect(start(&b));
            c.handshake("disk", structured, &[]);
            let mut model = vec![0u8; SIZE as usize];
            for round in 0..8 {
                let writes = round_of_writes(round, 0, &mut model);
                pipelined_writes(&mut c, &writes);
            }
            assert!(
                b.contents() == model,
                "content differs (fail_every {fail_every})"
            );
            let (ok, failed) = (
                b.written_in_place.load(SeqCst),
                b.failed_in_place.load(SeqCst),
            );
            assert!(ok > 0, "no WRITE went in place");
            if fail_every > 0 {
                assert!(failed > 0, "no target failed");
            } else {
                assert_eq!(failed, 0);
            }
            // Every WRITE was written once, in place or by `write` (a failed one twice).
            let by_write = b.written_by_write.load(SeqCst);
            assert_eq!(
                ok + by_write,
                8 * 64,
                "ok {ok} failed {failed} by write {by_write}"
            );
        }
    }
}

/// Two connections writing their own pages, whose locks they share, at once: neither
/// waits for a lock while holding another's, so both finish.
#[test]
fn connections_sharing_locks_never_wait_holding_one() {
    let b = PlaceBackend::new(0);
    let addr = start(&b);
    let (tx, rx) = std::sync::mpsc::channel();
    for half in 0..2u64 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            c.handshake("disk", false, &[]);
            let mut model = vec![0u8; SIZE as usize];
            for round in 0..20 {
                let writes = round_of_writes(round, half * 256, &mut model);
                let writes: Vec<_> = writes.into_iter().filter(|w| w.0 < SIZE).collect();
                pipelined_writes(&mut c, &writes);
            }
            tx.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a connection did not finish: a deadlock");
    }
    assert!(b.written_in_place.load(SeqCst) > 0);
}

/// A WRITE too large to stage is written through as it arrives; when a WRITE buffered
/// behind it runs together with it, its reply still tells how that went (an error here).
#[test]
fn a_write_passed_through_keeps_its_outcome_in_a_batch() {
    let b = PlaceBackend::new(0);
    b.bad_page.store(101, SeqCst);
    // A connection stages at most half, 10 KiB: a 4 KiB payload with its 4 KiB of slack,
    // not an 8 KiB one.
    let mut limits = Limits::default();
    limits.max_total_write_bytes = 20 << 10;
    limits.max_total_in_flight_bytes = 20 << 10;
    let mut c = Client::connect(start_with(&b, limits));
    c.handshake("disk", false, &[]);
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let big = [7u8; 2 * PAGE as usize];
    for round in 0..20u64 {
        let small = pattern(round, 0, PAGE as usize);
        // Both fit the server's 16 KiB input buffer at once.
        let cookies = c.send_requests(&[
            (0, cmd::WRITE, 100 * PAGE, 2 * PAGE as u32, &big),
            (0, cmd::WRITE, 200 * PAGE, PAGE as u32, &small),
        ]);
        for _ in 0..2 {
            let r = c.read_reply();
            let want = if r.cookie() == cookies[0] {
                cowdisk_nbd::wire::errno::EIO
            } else {
                0
            };
            assert_eq!(r.errno(), want, "round {round}");
        }
    }
    assert!(b.written_in_place.load(SeqCst) > 0, "no batch formed");
}
