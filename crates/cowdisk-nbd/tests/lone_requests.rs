//! A request alone in flight that follows one which waited on the device runs on the thread
//! that read it, keeping the connection's input (no hand-off to wake another thread); one
//! that follows a slow request, or on a backend that waits on the network, hands the input
//! on, so a request sent while it runs is answered first.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::Duration;

use client::{Client, HookedReads, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::cmd;
use cowdisk_nbd::Limits;

/// A server whose reads at offset 0 take the returned number of milliseconds.
fn connect(network: bool) -> (TestServer, Client, Arc<AtomicU64>) {
    let ms = Arc::new(AtomicU64::new(0));
    let delay = ms.clone();
    let b = Arc::new(HookedReads {
        inner: MemBackend::new(1 << 20),
        hook: Box::new(move || sleep(Duration::from_millis(delay.load(Ordering::SeqCst)))),
        network,
    });
    // Debug builds and busy CI machines: "from memory" may take well over 25 µs.
    let mut limits = Limits::default();
    limits.keep_input_after = Duration::from_millis(1)..Duration::from_millis(100);
    let srv = TestServer::start(vec![("d", b)], limits);
    let mut c = Client::connect(srv.addr);
    c.handshake("d", false, &[]);
    (srv, c, ms)
}

/// A read that takes `ms` milliseconds.
fn read_taking(c: &mut Client, delay: &AtomicU64, ms: u64) {
    delay.store(ms, Ordering::SeqCst);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
}

/// Sends a READ of 300 ms, then after 50 ms (so the server finds nothing else pending
/// when it reads the READ) a WRITE; returns whether the WRITE was answered first.
fn write_overtakes_slow_read(c: &mut Client, delay: &AtomicU64) -> bool {
    delay.store(300, Ordering::SeqCst);
    // The replies before were read: let their threads finish with them, so the READ is
    // alone in flight.
    sleep(Duration::from_millis(20));
    let read = c.send_request(0, cmd::READ, 0, 4096, &[]);
    sleep(Duration::from_millis(50));
    let write = c.send_request(0, cmd::WRITE, 8192, 4, b"late");
    let first = c.read_reply().cookie();
    let second = c.read_reply().cookie();
    let mut got = [first, second];
    got.sort_unstable();
    let mut want = [read, write];
    want.sort_unstable();
    assert_eq!(got, want);
    first == write
}

#[test]
fn a_lone_read_keeps_the_input_only_after_a_device_wait() {
    let (_srv, mut c, delay) = connect(false);
    // After a read that waited on the device, a lone read keeps the input, so a request
    // sent while it runs waits for it.
    read_taking(&mut c, &delay, 2);
    assert!(!write_overtakes_slow_read(&mut c, &delay));
    // After a read served from memory: handed on, the write goes first.
    read_taking(&mut c, &delay, 0);
    assert!(write_overtakes_slow_read(&mut c, &delay));
    // After the read of 300 ms, answered last: handed on too.
    assert!(write_overtakes_slow_read(&mut c, &delay));
    assert_eq!(c.read(8192, 4), b"late".to_vec());
}

#[test]
fn on_a_backend_that_waits_on_the_network_requests_never_keep_the_input() {
    let (_srv, mut c, delay) = connect(true);
    read_taking(&mut c, &delay, 2);
    assert!(write_overtakes_slow_read(&mut c, &delay));
}
