//! Idle connections must not deny service: when the connection table is full, the connection
//! idle the longest makes room for a new client, and one with a request in flight is kept.
//! An idle timeout, when set, closes idle connections only.

mod client;

use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, HookedReads, TestServer};
use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::wire::cmd;
use cowdisk_nbd::{Backend, Limits};

const MIB: u64 = 1 << 20;

fn wait_for(flag: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn idle_connections_cannot_lock_new_clients_out() {
    let (entered, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (e, r) = (entered.clone(), release.clone());
    let backend: Arc<dyn Backend> = Arc::new(HookedReads {
        inner: MemBackend::new(8 * MIB),
        hook: Box::new(move || {
            e.store(true, Ordering::SeqCst);
            wait_for(&r);
        }),
        network: false,
    });
    let mut limits = Limits::default();
    limits.max_connections = 8;
    let srv = TestServer::start(vec![("m", backend)], limits);

    // The oldest connection has a request in flight: busy, so never evicted.
    let mut busy = Client::connect(srv.addr);
    busy.handshake("m", false, &[]);
    busy.write(0, &[5u8; 4096]);
    let cookie = busy.send_request(0, cmd::READ, 0, 4096, &[]);
    wait_for(&entered);

    // Five times more idle connections than the table holds, each past the handshake.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut c = Client::connect(srv.addr);
        c.handshake("m", false, &[]);
        idle.push(c);
    }

    // A new client is served at once.
    let start = Instant::now();
    let mut good = Client::connect(srv.addr);
    good.handshake("m", false, &[]);
    good.write(8192, &[1u8; 4096]);
    assert_eq!(good.read(8192, 4096), vec![1u8; 4096]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "new client waited {:?}",
        start.elapsed()
    );

    // The longest-idle connections made room; the most recent ones are still open.
    assert!(idle[0].is_closed(), "oldest idle connection still open");
    let last = idle.last_mut().expect("idle connections");
    last.write(12288, &[2u8; 512]);
    assert_eq!(last.read(12288, 512), vec![2u8; 512]);

    // The busy connection kept its slot, and its request is answered.
    release.store(true, Ordering::SeqCst);
    let reply = busy.read_reply();
    assert_eq!((reply.cookie(), reply.errno()), (cookie, 0));
    assert_eq!(busy.read(4096, 512), vec![0u8; 512]);
    drop((busy, idle, good));
    srv.stop().expect("clean stop");
}

/// Waits (≤ 10 s, the client's read timeout) for the server to close the connection.
fn closed_by_server(c: &mut Client) -> bool {
    let mut b = [0u8; 1];
    match c.stream().read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn an_idle_timeout_closes_idle_connections_only() {
    let backend: Arc<dyn Backend> = Arc::new(HookedReads {
        inner: MemBackend::new(8 * MIB),
        // A read far slower than the idle timeout.
        hook: Box::new(|| std::thread::sleep(Duration::from_millis(1500))),
        network: false,
    });
    let mut limits = Limits::default();
    limits.idle_timeout = Some(Duration::from_millis(300));
    let srv = TestServer::start(vec![("m", backend)], limits);
    let mut idle = Client::connect(srv.addr);
    idle.handshake("m", false, &[]);
    let mut busy = Client::connect(srv.addr);
    busy.handshake("m", false, &[]);
    assert_eq!(
        busy.read(0, 512),
        vec![0u8; 512],
        "closed while a request ran"
    );
    assert!(closed_by_server(&mut idle), "idle connection left open");
    assert!(
        closed_by_server(&mut busy),
        "connection idle after its read left open"
    );
    srv.stop().expect("clean stop");
}
