//! `cowdisk serve` under pressure from clients: idle connections beyond --max-connections do
//! not lock new clients out, and stalled WRITE payloads keep the server's memory within
//! --write-budget while a real client (qemu-io) is still served.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{have_tool, run_ok, TempDir};

const MIB: u64 = 1 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_cowdisk");

/// `cowdisk serve` of a fresh 64 MiB image on a Unix socket; killed on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    fn start(dir: &Path, extra: &[&str]) -> Serve {
        let img = dir.join("p.cow");
        let st = Command::new(BIN)
            .args([
                "create".as_ref(),
                img.as_os_str(),
                "--size".as_ref(),
                "64M".as_ref(),
            ])
            .status()
            .expect("run cowdisk create");
        assert!(st.success(), "cowdisk create failed");
        let socket = dir.join("p.sock");
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg(&img)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn cowdisk serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30));
        assert!(
            matches!(&line, Ok(l) if l.contains("serving")),
            "serve not ready: {line:?}"
        );
        Serve { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Resident memory of the server process, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("server's /proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kib * 1024
    }

    /// A connection through the handshake (fixed newstyle, NO_ZEROES, EXPORT_NAME "").
    #[allow(clippy::big_endian_bytes)] // NBD's wire format is big-endian
    fn connect(&self) -> UnixStream {
        let mut st = UnixStream::connect(&self.socket).expect("connect");
        st.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut greet = [0u8; 18];
        st.read_exact(&mut greet).expect("greeting");
        st.write_all(&3u32.to_be_bytes()).expect("flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
        opt.extend_from_slice(&0u32.to_be_bytes()); // the default export
        st.write_all(&opt).expect("option");
        let mut info = [0u8; 10];
        st.read_exact(&mut info).expect("export info");
        st
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (≤ 30 s) for the server to close `st`.
fn assert_closed(st: &mut UnixStream, what: &str) {
    let mut b = [0u8; 1];
    match st.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("{what}: connection still open ({other:?})"),
    }
}

fn qemu_io_write_read(uri: &str, offset: &str) {
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x5a {offset} 1M"),
            "-c",
            &format!("read -P 0x5a {offset} 1M"),
            uri,
        ],
        60,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn idle_connections_do_not_lock_new_clients_out() {
    if !have_tool("qemu-io") {
        return;
    }
    let d = TempDir::new();
    let srv = Serve::start(&d.0, &["--max-connections", "4"]);
    // Four times the table's size, each past the handshake, then silent.
    let mut idle: Vec<UnixStream> = (0..16).map(|_| srv.connect()).collect();
    qemu_io_write_read(&srv.uri(), "0");
    assert_closed(&mut idle[0], "longest-idle connection");
}

#[test]
#[allow(clippy::big_endian_bytes)] // NBD's wire format is big-endian
fn stalled_writes_keep_server_memory_within_the_write_budget() {
    if !have_tool("qemu-io") {
        return;
    }
    let d = TempDir::new();
    let srv = Serve::start(&d.0, &["--write-budget", "16M", "--payload-timeout", "3"]);
    let base = srv.rss();
    let chunk = vec![0xabu8; MIB as usize];
    let mut stalled = Vec::new();
    for i in 0..12u64 {
        let mut st = srv.connect();
        // 32 MiB writes and 4 MiB ones (small enough to be staged), all 4 KiB short.
        let len = if i % 2 == 0 { 32 * MIB } else { 4 * MIB };
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes()); // flags
        req.extend_from_slice(&1u16.to_be_bytes()); // WRITE
        req.extend_from_slice(&i.to_be_bytes()); // cookie
        req.extend_from_slice(&0u64.to_be_bytes()); // offset
        req.extend_from_slice(&(len as u32).to_be_bytes());
        st.write_all(&req).expect("header");
        let mut left = len - 4096;
        while left > 0 {
            let n = left.min(MIB) as usize;
            st.write_all(&chunk[..n]).expect("payload");
            left -= n as u64;
        }
        stalled.push(st);
    }
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(srv.rss().saturating_sub(base));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "serve RSS growth with 12 stalled writes: {} KiB",
        peak / 1024
    );
    assert!(
        peak < 16 * MIB + 32 * MIB,
        "12 stalled writes (216 MiB of payload) grew the server's RSS by {} MiB",
        peak / MIB
    );
    // A real client is served while they hang on, then they time out.
    qemu_io_write_read(&srv.uri(), "40M");
    for st in &mut stalled {
        assert_closed(st, "stalled write");
    }
}

#[test]
fn idle_timeout_closes_idle_connections() {
    if !have_tool("qemu-io") {
        return;
    }
    let d = TempDir::new();
    let srv = Serve::start(&d.0, &["--idle-timeout", "1"]);
    let mut idle = srv.connect();
    qemu_io_write_read(&srv.uri(), "1M");
    assert_closed(&mut idle, "connection idle past --idle-timeout");
}
