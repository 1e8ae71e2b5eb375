//! Harness for testing an NBD server *process* with real clients (nbdinfo, qemu-img, qemu-io,
//! nbdcopy, fio, nbd-client, nbdsh/python3-libnbd).
//!
//! The server command is a parameter ([`Factory`]) so the same checks can run against the
//! `memserve` example and later against `cowdisk serve IMAGE`. The server must print one line
//! on stdout once it listens; for TCP it must contain `127.0.0.1:PORT`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the server under test must export.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Export size in bytes.
    pub size: u64,
    /// Serve read-only.
    pub read_only: bool,
}

/// Where the server must listen.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `127.0.0.1:0`; the port is read from the server's ready line.
    Tcp,
    /// A Unix socket at this path (inside a private temp dir).
    Unix(PathBuf),
}

/// Builds the command that starts a server for `cfg` on `ep`; `dir` is a private scratch dir.
pub type Factory = fn(cfg: &ServerConfig, ep: &Endpoint, dir: &Path) -> Command;

/// The `memserve` example, built by `cargo test` next to the test binaries.
pub fn memserve(cfg: &ServerConfig, ep: &Endpoint, _dir: &Path) -> Command {
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/memserve");
    assert!(
        bin.exists(),
        "{} missing: run cargo test (builds examples)",
        bin.display()
    );
    let mut c = Command::new(bin);
    c.arg(cfg.size.to_string());
    if cfg.read_only {
        c.arg("--read-only");
    }
    match ep {
        Endpoint::Tcp => c.args(["--listen", "127.0.0.1:0"]),
        Endpoint::Unix(p) => c.arg("--socket").arg(p),
    };
    c
}

// One copy of the tool lookup and the fail-in-CI rule for every suite.
pub use test_support::have_tool;

/// True if the libnbd Python bindings are importable by Debian's python3.
pub fn have_python_nbd() -> bool {
    if !have_tool("python3") {
        return false;
    }
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    test_support::require(ok, "python3-libnbd (import nbd)")
}

/// Runs `prog args` under coreutils `timeout` (SIGKILL 5 s after SIGTERM); returns its output.
/// `PATH` starts with /usr/bin so Debian's python3 is used by nbdsh.
pub fn run(prog: &str, args: &[&str], secs: u64) -> Output {
    let path = format!(
        "/usr/bin:/usr/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), prog])
        .args(args)
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {prog}: {e}"))
}

/// Like [`run`], but panics with the output unless the command succeeded; returns stdout.
pub fn run_ok(prog: &str, args: &[&str], secs: u64) -> String {
    let o = run(prog, args, secs);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A private temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("cowdisk-nbd-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How clients reach the server.
#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(u16),
    Unix(PathBuf),
}

/// A running server process; killed on drop.
pub struct RunningServer {
    child: Option<Child>,
    pub addr: Addr,
    pub dir: TempDir,
}

impl RunningServer {
    /// Starts the server and waits (≤ 30 s) for its ready line.
    pub fn start(factory: Factory, cfg: &ServerConfig, unix: bool) -> Self {
        let dir = TempDir::new();
        let ep = if unix {
            Endpoint::Unix(dir.0.join("nbd.sock"))
        } else {
            Endpoint::Tcp
        };
        let mut cmd = factory(cfg, &ep, &dir.0);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = Self {
            child: Some(child),
            addr: Addr::Tcp(0),
            dir,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server printed no ready line within 30 s");
        server.addr = match ep {
            Endpoint::Unix(p) => Addr::Unix(p),
            Endpoint::Tcp => {
                let port = line
                    .split_whitespace()
                    .find_map(|t| t.strip_prefix("127.0.0.1:"))
                    .and_then(|p| {
                        p.trim_end_matches(|c: char| !c.is_ascii_digit())
                            .parse()
                            .ok()
                    })
                    .unwrap_or_else(|| panic!("no 127.0.0.1:PORT in ready line {line:?}"));
                Addr::Tcp(port)
            }
        };
        server.wait_connectable();
        server
    }

    fn wait_connectable(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = match &self.addr {
                Addr::Tcp(p) => TcpStream::connect(("127.0.0.1", *p)).is_ok(),
                Addr::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            };
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "server not connectable");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// URI of the default export (empty name).
    pub fn uri(&self) -> String {
        match &self.addr {
            Addr::Tcp(p) => format!("nbd://127.0.0.1:{p}/"),
            Addr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }

    /// TCP port (panics for Unix servers).
    pub fn port(&self) -> u16 {
        match self.addr {
            Addr::Tcp(p) => p,
            Addr::Unix(_) => panic!("not a TCP server"),
        }
    }

    /// Sends SIGTERM and waits (≤ 20 s) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("child");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `len` bytes of a deterministic pseudo-random pattern with some zero runs.
pub fn pattern_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(64 * 1024).enumerate() {
        if i % 3 == 1 {
            continue; // leave zero runs, so sparse handling is exercised
        }
        for b in chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(path, v).expect("write pattern file");
}

pub mod checks;
