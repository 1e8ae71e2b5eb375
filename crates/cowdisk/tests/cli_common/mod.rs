//! Helpers shared by the CLI tests: temp folders, running the built binary, JSON,
//! file hashes, and a qemu-io raw reference. Tool lookup and the CI rule for missing
//! tools come from the `test-support` crate.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cowdisk_core::{Disk, OpenOptions, WriteFlags};

pub const BIN: &str = env!("CARGO_BIN_EXE_cowdisk");

/// A temp folder removed on drop.
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(name: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("cowdisk-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary. "in use" failures are retried for a moment: a child spawned by a
/// parallel test may briefly hold an inherited descriptor (and so our flock) between
/// its fork and exec. Tests that expect "in use" still see it after the retries.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut tries = 0;
    loop {
        let mut c = Command::new(BIN);
        c.args(args)
            .stdin(Stdio::null())
            .env_remove("COWDISK_FAILPOINT");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("run cowdisk");
        tries += 1;
        let busy =
            o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("in use");
        // Up to ~5 s: under full-suite load (fio, qemu, many children) a sibling's
        // fork-to-exec window can outlast a shorter wait.
        if busy && tries < 100 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        return o;
    }
}

pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs and asserts success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "cowdisk {args:?} failed ({:?}): {}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// Runs, expects exit 1 with a one-line `cowdisk: ...` message containing `needle`.
pub fn fails(args: &[&str], needle: &str) -> String {
    let o = run(args);
    let e = stderr(&o);
    assert_eq!(
        code(&o),
        1,
        "cowdisk {args:?}: expected exit 1, got {:?}: {e}",
        o.status
    );
    assert!(e.starts_with("cowdisk: "), "message format: {e:?}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(e.contains(needle), "{e:?} should contain {needle:?}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("valid JSON")
}

/// SHA-256 of a file (via sha256sum).
pub fn hash(p: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    assert!(o.status.success(), "sha256sum {}: {:?}", p.display(), o);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A small chain in `t`: `base.cow` (1 MiB, 4 KiB blocks, blocks 0-1 filled with
/// `base_byte`, sealed) under the writable `vm.cow` (block 4 filled with `top_byte`).
pub fn small_chain(t: &Tmp, base_byte: u8, top_byte: u8) {
    ok(&[
        "create",
        &t.s("base.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    apply_image(&t.p("base.cow"), &[Op::Write(0, 8192, base_byte)]);
    ok(&["create", &t.s("vm.cow"), "--backing", &t.s("base.cow")]);
    apply_image(&t.p("vm.cow"), &[Op::Write(4 * 4096, 4096, top_byte)]);
}

/// One change applied both to a cowdisk image and to the raw reference.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Write `len` bytes of `pattern` at `off`.
    Write(u64, u64, u8),
    /// Discard (zero) `len` bytes at `off`.
    Discard(u64, u64),
}

/// Applies ops to the image through the engine and flushes.
pub fn apply_image(image: &Path, ops: &[Op]) {
    let disk = open_rw(image);
    for op in ops {
        match *op {
            Op::Write(off, len, p) => disk
                .write(off, &vec![p; len as usize], WriteFlags::default())
                .unwrap(),
            Op::Discard(off, len) => disk.discard(off, len, WriteFlags::default()).unwrap(),
        }
    }
    disk.flush().unwrap();
}

/// Applies ops to a raw file with qemu-io (the independent reference).
pub fn apply_ref(raw: &Path, ops: &[Op]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for op in ops {
        let cmd = match *op {
            Op::Write(off, len, p) => format!("write -P {p:#x} {off} {len}"),
            Op::Discard(off, len) => format!("write -z {off} {len}"),
        };
        c.arg("-c").arg(cmd);
    }
    let o = c.arg(raw).output().expect("qemu-io");
    assert!(
        o.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Applies ops to both.
pub fn apply_both(image: &Path, raw: &Path, ops: &[Op]) {
    apply_image(image, ops);
    apply_ref(raw, ops);
}

/// A zero-filled raw reference of `size` bytes.
pub fn make_ref(raw: &Path, size: u64) {
    let f = std::fs::File::create(raw).unwrap();
    f.set_len(size).unwrap();
}

/// Exports `image` to a fresh raw file and asserts it equals `reference` (qemu-img compare).
pub fn assert_same(t: &Tmp, image: &Path, reference: &Path, tag: &str) {
    let out = t.p(&format!("export-{tag}.raw"));
    let _ = std::fs::remove_file(&out);
    ok(&[
        "export",
        &image.display().to_string(),
        &out.display().to_string(),
    ]);
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(reference)
        .arg(&out)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "{tag}: export differs from reference: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    std::fs::remove_file(&out).unwrap();
}

/// Opens a disk read-write, retrying briefly on `Locked`: a `cowdisk` child spawned
/// by a parallel test can hold an inherited descriptor (and so our lock) between its
/// fork and exec.
pub fn open_rw(p: &Path) -> Disk {
    open_with(p, OpenOptions::new())
}

/// Like [`open_rw`], read-only.
pub fn open_ro(p: &Path) -> Disk {
    open_with(p, OpenOptions::new().access(cowdisk_core::Access::ReadOnly))
}

fn open_with(p: &Path, o: OpenOptions) -> Disk {
    for _ in 0..200 {
        match Disk::open(p, &o) {
            Err(cowdisk_core::OpenError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
    panic!("{} stays locked", p.display());
}
