//! F4: arbitrary client bytes against the NBD server (handshake, then transmission).
//!
//! The server has no public entry point for an in-process stream, so the harness runs
//! a real [`Server`] on a Unix socket (one per fuzzing process; AFL's persistent mode
//! reuses it) over in-memory backends. Each input is one connection: the client
//! writes the input, closes its sending side and reads until the server hangs up. A
//! server that keeps the connection open after the client's EOF is a finding (panic
//! with a message), like a panic in any server thread (the AFL hook aborts on those).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cowdisk_nbd::mem::MemBackend;
use cowdisk_nbd::{wire, Limits, Server};

/// Size of the writable export: a few blocks keep replies small.
pub const DISK_SIZE: u64 = 1 << 20;
/// How long the server may take to hang up after the client's EOF. Generous: the
/// machine is shared, and a real hang shows as a wait that never ends.
const HANG_UP: Duration = Duration::from_secs(5);

fn socket() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cowdisk-fuzz-nbd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket folder");
        let path = dir.join("sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut limits = Limits::default();
        // Bounded so one input cannot make the server allocate much or wait long.
        limits.max_payload = 1 << 20;
        limits.max_drain = 2 << 20;
        limits.handshake_timeout = Duration::from_secs(2);
        limits.reply_timeout = Duration::from_secs(2);
        limits.max_in_flight_bytes = 4 << 20;
        limits.max_total_in_flight_bytes = 8 << 20;
        let rw = MemBackend::new(DISK_SIZE);
        rw.fill(4096, &[0xab; 8192]).expect("fill");
        let ro = MemBackend::new(64 * 1024)
            .with_block_size(512)
            .read_only(true);
        let server = Server::builder()
            .export_with_description("disk", Some("fuzz target"), Arc::new(rw))
            .export("ro", Arc::new(ro))
            .default_export("disk")
            .limits(limits)
            .unix_listener(listener)
            .build()
            .expect("server");
        std::thread::spawn(move || server.serve());
        path
    })
}

/// Runs one input as one client connection.
pub fn run(data: &[u8]) {
    let conn = UnixStream::connect(socket()).expect("connect");
    conn.set_read_timeout(Some(HANG_UP)).expect("timeout");
    let mut tx = conn.try_clone().expect("clone");
    let input = data.to_vec();
    // Written from another thread: the server may reply while the input is still
    // arriving, and neither side may block the other on a full socket buffer.
    let writer = std::thread::spawn(move || {
        let _ = tx.write_all(&input);
        let _ = tx.shutdown(Shutdown::Write);
    });
    let mut rx = &conn;
    let mut buf = [0u8; 64 * 1024];
    // The first bytes every client gets: NBDMAGIC, IHAVEOPT, handshake flags.
    let mut head = Vec::new();
    loop {
        match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let k = n.min(18 - head.len().min(18));
                head.extend_from_slice(&buf[..k]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("server kept the connection open {HANG_UP:?} after the client's EOF")
            }
            // A reset is how a server may drop a client it refuses.
            Err(_) => break,
        }
    }
    writer.join().expect("writer thread");
    if head.len() == 18 {
        assert_eq!(head[..18], wire::greeting(), "the greeting comes first");
    }
}
