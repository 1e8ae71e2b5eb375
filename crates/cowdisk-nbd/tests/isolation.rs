//! Server-wide memory bounds must not couple clients: one that stops reading its replies
//! stalls only itself, and a backend call that panics is still answered (EIO) while the
//! connection keeps working.

mod client;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{cmd, errno};
use cowdisk_nbd::{Backend, BackendError, Extent, Limits, ZeroFlags};

const MIB: u64 = 1 << 20;

#[test]
fn a_client_that_never_reads_replies_does_not_stall_others() {
    let mem: Arc<dyn Backend> = Arc::new(MemBackend::new(64 * MIB));
    // Few workers, so a coupling bug would show at once.
    let mut limits = Limits::default();
    limits.workers_per_connection = 2;
    let srv = TestServer::start(vec![("m", mem)], limits);
    let mut stuck = Client::connect(srv.addr);
    stuck.handshake("m", true, &[]);
    // Far more reply bytes than socket buffers hold; never read back.
    for i in 0..64u64 {
        stuck.send_request(0, cmd::READ, (i % 32) * MIB, MIB as u32, &[]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let mut ok = Client::connect(srv.addr);
    ok.handshake("m", true, &[]);
    for i in 0..200u64 {
        ok.write(i * 4096, &[7u8; 4096]);
        assert_eq!(ok.read(i * 4096, 4096), vec![7u8; 4096]);
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "other client stalled: {:?}",
        start.elapsed()
    );
    drop(stuck);
    drop(ok);
    srv.stop().expect("clean stop");
}

/// Panics on reads at offset 0; otherwise a MemBackend.
struct Panicky {
    inner: MemBackend,
    panicked: AtomicBool,
}

impl Backend for Panicky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.inner.preferred_block_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        if offset == 0 {
            self.panicked.store(true, Ordering::SeqCst);
            panic!("injected backend panic");
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), BackendError> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BackendError> {
        self.inner.block_status(offset, len, out)
    }
}

#[test]
fn a_panicking_backend_call_is_answered_eio_and_workers_survive() {
    let p = Arc::new(Panicky {
        inner: MemBackend::new(8 * MIB),
        panicked: AtomicBool::new(false),
    });
    let backend: Arc<dyn Backend> = p.clone();
    let srv = TestServer::start(vec![("p", backend)], one_worker());
    let mut c = Client::connect(srv.addr);
    c.handshake("p", false, &[]);
    // Several panics with a single worker: each is answered, and the worker keeps going.
    for _ in 0..3 {
        assert_eq!(c.errno(0, cmd::READ, 0, 512, &[]), errno::EIO);
    }
    assert!(p.panicked.load(Ordering::SeqCst));
    c.write(4096, &[9u8; 512]);
    assert_eq!(c.read(4096, 512), vec![9u8; 512]);
    drop(c);
    srv.stop().expect("clean stop");
}

fn one_worker() -> Limits {
    let mut l = Limits::default();
    l.workers_per_connection = 1;
    l
}
