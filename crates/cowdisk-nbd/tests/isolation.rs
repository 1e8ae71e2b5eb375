//! Server-wide memory bounds must not couple clients: one that stops reading its replies
//! stalls only itself, and a backend call that panics is still answered (EIO) while the
//! connection keeps working.

mod client;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, HookedReads, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{cmd, errno};
use cowdisk_nbd::{Backend, Limits};

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

#[test]
fn a_panicking_backend_call_is_answered_eio_and_workers_survive() {
    let panicked = Arc::new(AtomicBool::new(false));
    let flag = panicked.clone();
    let backend: Arc<dyn Backend> = Arc::new(HookedReads {
        inner: MemBackend::new(8 * MIB),
        hook: Box::new(move || {
            flag.store(true, Ordering::SeqCst);
            panic!("injected backend panic");
        }),
        network: false,
    });
    let srv = TestServer::start(vec![("p", backend)], one_worker());
    let mut c = Client::connect(srv.addr);
    c.handshake("p", false, &[]);
    // Several panics with a single worker: each is answered, and the worker keeps going.
    for _ in 0..3 {
        assert_eq!(c.errno(0, cmd::READ, 0, 512, &[]), errno::EIO);
    }
    assert!(panicked.load(Ordering::SeqCst));
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
