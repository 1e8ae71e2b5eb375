//! A request alone in flight that follows one which waited on the device runs on the thread
//! that read it, keeping the connection's input (no hand-off to wake another thread); one
//! that follows a slow request, or on a backend that waits on the network, hands the input
//! on, so a request sent while it runs is answered first.
#![allow(clippy::big_endian_bytes)]

mod client;

use std::sync::Arc;
use std::thread::sleep;
use std::time::Duration;

use client::{Client, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::cmd;
use cowdisk_nbd::{Backend, BackendError, Extent, Limits, ZeroFlags};

const SIZE: u64 = 1 << 20;

/// Reads at offset 0 take 300 ms; under 64 KiB 2 ms, like a device; above, no time.
struct Device {
    inner: MemBackend,
    network: bool,
}

impl Backend for Device {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.inner.preferred_block_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn may_wait_on_network(&self) -> bool {
        self.network
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        match offset {
            0 => sleep(Duration::from_millis(300)),
            1..65536 => sleep(Duration::from_millis(2)),
            _ => {}
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, o: u64, d: &[u8], f: bool) -> Result<(), BackendError> {
        self.inner.write(o, d, f)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
    fn trim(&self, o: u64, l: u64, f: bool) -> Result<(), BackendError> {
        self.inner.trim(o, l, f)
    }
    fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> Result<(), BackendError> {
        self.inner.write_zeroes(o, l, f)
    }
    fn block_status(&self, o: u64, l: u64, out: &mut Vec<Extent>) -> Result<(), BackendError> {
        self.inner.block_status(o, l, out)
    }
}

fn connect(network: bool) -> (TestServer, Client) {
    let b = Arc::new(Device {
        inner: MemBackend::new(SIZE),
        network,
    });
    // Debug builds and busy CI machines: "from memory" may take well over 25 µs.
    let mut limits = Limits::default();
    limits.keep_input_after = Duration::from_millis(1)..Duration::from_millis(100);
    let srv = TestServer::start(vec![("d", b)], limits);
    let mut c = Client::connect(srv.addr);
    c.handshake("d", false, &[]);
    (srv, c)
}

/// Sends a READ at `offset`, then after 50 ms (so the server finds nothing else pending
/// when it reads the READ) a WRITE; returns whether the WRITE was answered first.
fn write_overtakes_read_at(c: &mut Client, offset: u64) -> bool {
    // The replies before were read: let their threads finish with them, so the READ is
    // alone in flight.
    sleep(Duration::from_millis(20));
    let read = c.send_request(0, cmd::READ, offset, 4096, &[]);
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
    let (_srv, mut c) = connect(false);
    // After a read that waited on the device, a lone read keeps the input, so a request
    // sent while it runs waits for it.
    assert_eq!(c.read(4096, 4096), vec![0u8; 4096]);
    assert!(!write_overtakes_read_at(&mut c, 0));
    // After a read served from memory: handed on, the write goes first.
    assert_eq!(c.read(65536, 4096), vec![0u8; 4096]);
    assert!(write_overtakes_read_at(&mut c, 0));
    // After the read of 300 ms, answered last: handed on too.
    assert!(write_overtakes_read_at(&mut c, 0));
    assert_eq!(c.read(8192, 4), b"late".to_vec());
}

#[test]
fn on_a_backend_that_waits_on_the_network_requests_never_keep_the_input() {
    let (_srv, mut c) = connect(true);
    assert_eq!(c.read(4096, 4096), vec![0u8; 4096]);
    assert!(write_overtakes_read_at(&mut c, 0));
}
