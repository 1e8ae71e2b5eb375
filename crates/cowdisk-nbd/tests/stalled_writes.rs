//! WRITE payloads that stop arriving must not pin server memory: many connections each
//! stalling just short of the end of a payload (32 MiB, or 4 MiB: small enough to be staged)
//! leave the server's memory within its write budget, a well-behaved client keeps being
//! served, and the stalled connections are closed after the payload timeout. (Its own test
//! binary: it measures the process's RSS.)

mod client;

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::{cmd, Request};
use cowdisk_nbd::{Backend, Limits};

const MIB: u64 = 1 << 20;

/// Resident memory of this process (server and clients alike), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kib * 1024
}

/// Sends a WRITE of `len` bytes at 0 but only `sent` bytes of its payload.
fn stall_write(c: &mut Client, len: u32, sent: u64, chunk: &[u8]) {
    let hdr = Request {
        flags: 0,
        kind: cmd::WRITE,
        cookie: 1,
        offset: 0,
        length: len,
    };
    let s = c.stream();
    s.write_all(&hdr.encode()).unwrap();
    let mut left = sent;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
}

#[test]
fn stalled_write_payloads_stay_within_the_write_budget() {
    let mem = MemBackend::new(64 * MIB);
    // Allocate every block first, so the backend's own memory does not grow below.
    let chunk = vec![0u8; MIB as usize];
    for i in 0..64 {
        mem.fill(i * MIB, &chunk).unwrap();
    }
    let mem: Arc<dyn Backend> = Arc::new(mem);
    let mut limits = Limits::default();
    limits.max_total_write_bytes = 16 * MIB as usize;
    limits.payload_timeout = Duration::from_secs(2);
    let srv = TestServer::start(vec![("m", mem)], limits);

    let base = rss();
    let mut stalled = Vec::new();
    for i in 0..16 {
        let mut c = Client::connect(srv.addr);
        c.handshake("m", false, &[]);
        let len = if i % 2 == 0 { 32 * MIB } else { 4 * MIB };
        stall_write(&mut c, len as u32, len - 4096, &chunk);
        stalled.push(c);
    }
    // Let the server take in what the sockets still buffer.
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(rss().saturating_sub(base));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("RSS growth with 16 stalled writes: {} KiB", peak / 1024);
    // The write budget, plus a 64 KiB piece per connection and slack for threads.
    assert!(
        peak < 16 * MIB + 16 * MIB,
        "16 stalled writes (288 MiB of payload) grew the RSS by {} MiB",
        peak / MIB
    );

    // A well-behaved client is served while they hang on.
    let start = Instant::now();
    let mut good = Client::connect(srv.addr);
    good.handshake("m", false, &[]);
    for i in 0..8u8 {
        let data = vec![i; MIB as usize];
        good.write(40 * MIB, &data);
        assert!(good.read(40 * MIB, MIB as u32) == data, "read back {i}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "good client took {:?}",
        start.elapsed()
    );

    // The stalled payloads time out: their connections are closed, the writes unanswered.
    for c in &mut stalled {
        let s = c.stream();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("stalled connection still open: {other:?}"),
        }
    }
    drop((good, stalled));
    srv.stop().expect("clean stop");
}
