//! Helpers of the live-disk tests: a `cowdisk serve` process on 127.0.0.1, the CLI, and
//! raw requests on a control socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_cowdisk");
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1 << 20;

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn cowdisk(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cowdisk")
}

pub fn cowdisk_ok(args: &[&str]) -> String {
    let o = cowdisk(args);
    assert!(
        o.status.success(),
        "cowdisk {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn cowdisk_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&cowdisk_ok(&a)).expect("json output")
}

/// A base of `size` and a writable `vm1.cow` over it, in `dir`; returns vm1's path.
pub fn chain(dir: &Path, size: &str) -> PathBuf {
    let base = dir.join("base.cow");
    let top = dir.join("vm1.cow");
    cowdisk_ok(&["create", s(&base), "--size", size, "-q"]);
    cowdisk_ok(&["create", s(&top), "--backing", s(&base), "-q"]);
    top
}

/// The virtual disk's bytes, through `cowdisk export` (offline: the server must be gone
/// or the image a sealed snapshot).
pub fn content(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("content.raw");
    let _ = std::fs::remove_file(&raw);
    cowdisk_ok(&["export", s(image), s(&raw), "-q"]);
    let v = std::fs::read(&raw).expect("read export");
    let _ = std::fs::remove_file(&raw);
    v
}

/// A `cowdisk serve` process on 127.0.0.1; SIGKILLed on drop.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Serve {
    pub fn start(image: &Path, extra: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg(image)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve announces itself");
        // "cowdisk: serving NAMES at 127.0.0.1:PORT (nbd://...)"
        let addr = line
            .split(" at ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Serve { child, addr }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// SIGTERM (flushes every export), then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait serve")
    }

    /// Waits up to `secs` for the server to exit by itself.
    pub fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        for _ in 0..secs * 20 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The control socket `serve` makes beside `image`.
pub fn control_socket(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap().to_str().unwrap();
    image.with_file_name(format!(".{name}.control"))
}

/// Sends raw bytes on a new control connection and reads one reply line.
pub fn control_raw(sock: &Path, bytes: &[u8]) -> serde_json::Value {
    let mut c = UnixStream::connect(sock).expect("connect control socket");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // A server that refuses the connection ("busy") replies and closes at once, maybe
    // before the request is sent: its reply is still there to read.
    if let Err(e) = c.write_all(bytes) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "send request: {e}"
        );
    }
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).expect("read reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

/// Sends one request (a JSON value) and returns the reply.
pub fn control(sock: &Path, req: &serde_json::Value) -> serde_json::Value {
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    control_raw(sock, &line)
}
