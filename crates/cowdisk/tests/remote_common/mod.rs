//! Helpers for the remote-layer CLI tests: a SeaweedFS environment, a local chain,
//! serving and comparing.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use test_support::s3server::{S3Server, BUCKET};

use crate::cli_common::*;

pub const MIB: u64 = 1 << 20;

/// The server's environment plus a cache folder.
pub struct Env(pub Vec<(String, String)>);

impl Env {
    pub fn new(s: &S3Server, cache: &Path) -> Env {
        let mut v = s.env();
        v.push(("COWDISK_CACHE_DIR".into(), cache.display().to_string()));
        Env(v)
    }
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
    pub fn run(&self, args: &[&str]) -> Output {
        run_env(args, &self.pairs())
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "cowdisk {args:?}: {}", stderr(&o));
        stdout(&o)
    }
    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON")
    }
    /// Expects exit 1 and one `cowdisk: ` line containing `needle`.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let o = self.run(args);
        let e = stderr(&o);
        assert_eq!(code(&o), 1, "cowdisk {args:?}: {e}");
        assert!(
            e.starts_with("cowdisk: ") && e.trim_end().lines().count() == 1,
            "{e:?}"
        );
        assert!(
            e.contains(needle) && !e.contains("panicked"),
            "{e:?} lacks {needle:?}"
        );
        e
    }
    pub fn serve(&self, images: &[&Path], socket: &Path, extra: &[&str]) -> Running {
        let mut c = Command::new(BIN);
        c.arg("serve")
            .args(images)
            .arg("--socket")
            .arg(socket)
            .args(extra);
        for (k, v) in &self.0 {
            c.env(k, v);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..300 {
            if socket.exists() {
                return Running(child);
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("serve exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop(Running(child));
        panic!("serve did not start");
    }
}

/// A child process (`serve`, `push`), killed when dropped: also when a test fails before
/// it stops it, so a failed assertion leaves no server behind.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills it (SIGKILL, as `kill -9`) and waits for it.
pub fn stop(c: Running) {
    drop(c);
}

pub fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// qemu-img compare of a raw file and an NBD export.
pub fn compare(raw: &Path, nbd: &str) -> bool {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(raw)
        .arg(nbd)
        .output()
        .unwrap();
    o.status.success()
}

/// l1 ← l2 ← l3 (sealed) ← top.cow (writable, empty), 512 MiB virtual; exports the
/// content to local.raw.
pub fn chain(t: &Tmp) {
    let big = |n: u64, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    ok(&["create", &t.s("l1.cow"), "--size", "512M"]);
    write(
        &t.p("l1.cow"),
        &[(0, big(4 * MIB, 1)), (300 * MIB, big(MIB, 2))],
    );
    ok(&["create", &t.s("l2.cow"), "--backing", &t.s("l1.cow")]);
    write(&t.p("l2.cow"), &[(MIB + 512, big(100_000, 3))]);
    ok(&["create", &t.s("l3.cow"), "--backing", &t.s("l2.cow")]);
    write(&t.p("l3.cow"), &[(400 * MIB, big(2 * MIB, 4))]);
    ok(&["create", &t.s("top.cow"), "--backing", &t.s("l3.cow")]);
    ok(&["export", &t.s("top.cow"), &t.s("local.raw")]);
}

pub fn write(image: &Path, w: &[(u64, Vec<u8>)]) {
    let d = cowdisk_core::Disk::open(image, &cowdisk_core::OpenOptions::new()).unwrap();
    for (off, data) in w {
        d.write(*off, data, cowdisk_core::WriteFlags::default())
            .unwrap();
    }
    d.flush().unwrap();
}

pub fn push(env: &Env, t: &Tmp, prefix: &str) -> (String, Value) {
    let v = env.json(&[
        "push",
        &t.s("top.cow"),
        &format!("s3://{BUCKET}/{prefix}"),
        "--json",
    ]);
    (v["url"].as_str().unwrap().to_string(), v)
}

/// Allocated bytes of the cache files under `dir`.
pub fn cached_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.join("v2"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.metadata().unwrap().blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}
