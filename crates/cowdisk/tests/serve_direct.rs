//! `cowdisk serve --cache=none` (O_DIRECT layer files) with real clients: unaligned
//! qemu-io writes compared by `qemu-img compare` with the same writes on a raw file, fio
//! `verify=crc32c`, the layer files really open with O_DIRECT, the base unchanged, `check`
//! clean after SIGTERM; many reads in flight at once (run together through io_uring) read
//! back by `nbdcopy` exactly, and many writes in flight at once (written in place through
//! io_uring where the top holds the block) land exactly.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{have_tool, run, run_ok};

const BIN: &str = env!("CARGO_BIN_EXE_cowdisk");

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A folder on a disk file system (direct I/O needs one; /tmp may be tmpfs).
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = PathBuf::from(format!(
            "/var/tmp/cowdisk-direct-it-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Killed on drop (a failed assertion must not leave a server behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(image: &Path, sock: &Path) -> Child {
    let mut c = Command::new(BIN)
        .args(["serve", s(image), "--socket", s(sock), "--cache=none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("serving"), "serve: {line:?}");
    c
}

/// O_DIRECT flags of the files `pid` has open under `dir`.
fn direct_files(pid: u32, dir: &Path) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(t) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !t.starts_with(dir) || !t.to_string_lossy().ends_with(".cow") {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap_or(0);
        out.push((t.display().to_string(), flags & 0o40000 != 0));
    }
    out
}

/// `qemu-io -f raw` running `ops` on `target`.
fn qemu_io(ops: &[&str], target: &str) {
    let mut args = vec!["-f", "raw"];
    for op in ops {
        args.extend(["-c", *op]);
    }
    args.push(target);
    run_ok("qemu-io", &args, 60);
}

/// A raw model of `size` with `base_ops` done on it, imported as a base with a fresh top
/// over it: (folder, model, base, top).
fn model_chain(name: &str, size: &str, base_ops: &[&str]) -> (Dir, PathBuf, PathBuf, PathBuf) {
    let d = Dir::new(name);
    let (raw, base, top) = (
        d.0.join("model.raw"),
        d.0.join("base.cow"),
        d.0.join("top.cow"),
    );
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&raw), size],
        30,
    );
    qemu_io(base_ops, s(&raw));
    run_ok(BIN, &["import", "-q", s(&raw), s(&base)], 60);
    run_ok(BIN, &["create", s(&top), "--backing", s(&base)], 30);
    (d, raw, base, top)
}

#[test]
fn cache_none_serves_exact_content_with_direct_io() {
    for t in ["qemu-img", "qemu-io", "fio"] {
        if !have_tool(t) {
            return;
        }
    }
    let base_ops = ["write -P 0x11 0 8M", "write -P 0x22 20M 3M"];
    let (d, raw, base, top) = model_chain("content", "32M", &base_ops);
    let base_before = std::fs::read(&base).unwrap();

    let sock = d.0.join("nbd.sock");
    let mut srv = Killed(serve(&top, &sock));
    let srv = &mut srv.0;
    // Each layer has a direct descriptor for its bytes (a sealed layer also keeps the
    // one its source opened, which holds its lock).
    let files = direct_files(srv.id(), &d.0);
    for l in [&top, &base] {
        assert!(
            files.iter().any(|f| f.0 == s(l) && f.1),
            "{} open with O_DIRECT: {files:?}",
            l.display()
        );
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // Unaligned and sub-block writes over base data, holes and across block edges.
    let ops = [
        "write -P 0x33 1000 3000",
        "write -P 0x44 65535 2",
        "write -P 0x55 7M 1537",
        "write -P 0x66 20971010 700000",
        "write -z 24M 100000",
        "write -P 0x77 30M 4096",
        "discard 4M 64k",
    ];
    for target in [uri.as_str(), s(&raw)] {
        qemu_io(&ops, target);
    }
    // `discard` on a raw file may leave the bytes; the model is what the export says it
    // holds there: zeros.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -z 4M 64k", s(&raw)],
        60,
    );
    let o = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, s(&raw)],
        120,
    );
    assert!(
        o.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=16M",
            "--offset=8M",
            "--verify=crc32c",
            "--do_verify=1",
            // No state file in the test's working folder (the crate's source).
            "--verify_state_save=0",
        ],
        300,
    );
    assert!(
        o.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stop_and_check(srv, &base, &base_before, &top);
}

/// Stops `srv` with SIGTERM; the base then holds `base_before` and `check` finds the top
/// clean.
fn stop_and_check(srv: &mut Child, base: &Path, base_before: &[u8], top: &Path) {
    use rustix::process::{kill_process, Pid, Signal};
    kill_process(Pid::from_child(srv), Signal::TERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while srv.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::fs::read(base).unwrap() == base_before,
        "base unchanged"
    );
    run_ok(BIN, &["check", s(top)], 60);
}

/// Whether `pid` has an io_uring instance open.
fn has_ring(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|t| t.to_string_lossy().contains("io_uring"))
}

/// `nbdcopy` of one connection with up to 32 requests of `size` in flight from `from` to
/// `to`; whether server `pid` had a ring open meanwhile.
fn nbdcopy_watching_ring(size: &str, from: &str, to: &str, pid: u32) -> bool {
    let mut c = Command::new("nbdcopy");
    c.args(["--no-extents", "-C", "1", "-R", "32"])
        .arg(format!("--request-size={size}"))
        .args([from, to]);
    watching_ring(c, pid)
}

/// Runs `c`, which must succeed; whether server `pid` had a ring open meanwhile (a thread's
/// ring lives as long as the connection: look while it is open).
fn watching_ring(mut c: Command, pid: u32) -> bool {
    let what = format!("{c:?}");
    let mut child = Killed(c.stderr(Stdio::piped()).spawn().unwrap());
    let mut ring = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        ring |= has_ring(pid);
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{what} hangs");
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "{what}: {status}: {err}");
    ring
}

/// Reads of one connection with up to 32 in flight, each made of direct pieces of the top
/// and the base, and zeros, across block edges: the server runs the buffered ones together
/// on a ring, and every byte read is the model's.
#[test]
fn many_direct_reads_in_flight_read_exact_content() {
    for t in ["qemu-img", "qemu-io", "nbdcopy"] {
        if !have_tool(t) {
            return;
        }
    }
    let base_ops = ["write -P 0x11 0 8M", "write -P 0x22 12M 5M"];
    let (d, raw, _base, top) = model_chain("in-flight", "24M", &base_ops);
    let top_ops = [
        "write -P 0x33 65536 4096",
        "write -P 0x44 1M 1M",
        "write -P 0x55 13M 70000",
        "write -P 0x66 16M 3M",
        "write -z 5M 64k",
    ];
    let sock = d.0.join("nbd.sock");
    let srv = Killed(serve(&top, &sock));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(&top_ops, &uri);
    qemu_io(&top_ops, s(&raw));
    let model = std::fs::read(&raw).unwrap();
    // 4 KiB reads (one piece each), and reads of 4 blocks (pieces of both layers and zeros
    // in one reply).
    let mut ran_together = false;
    for size in ["4096", "262144"] {
        let out = d.0.join(format!("copy-{size}.raw"));
        ran_together |= nbdcopy_watching_ring(size, &uri, s(&out), srv.0.id());
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), model.len());
        if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
            panic!(
                "request size {size}: byte {i} reads {:#x}, not {:#x}",
                got[i], model[i]
            );
        }
    }
    assert!(ran_together, "the reads never ran together on a ring");
}

/// Writes of one connection with up to 32 in flight, 4 KiB and 64 KiB, over blocks the top
/// holds (written in place, together on a ring), blocks only the base holds and blocks
/// nobody does (written as usual): fio reads back exactly what it wrote, the base keeps its
/// bytes and `check` finds the image clean after the server stops.
#[test]
fn many_direct_writes_in_flight_land_exactly() {
    for t in ["qemu-img", "qemu-io", "fio"] {
        if !have_tool(t) {
            return;
        }
    }
    let base_ops = ["write -P 0x11 0 8M", "write -P 0x22 12M 5M"];
    let (d, _raw, base, top) = model_chain("writes-in-flight", "24M", &base_ops);
    let base_before = std::fs::read(&base).unwrap();
    let sock = d.0.join("nbd.sock");
    let mut srv = Killed(serve(&top, &sock));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // The top holds 4M..14M whole.
    qemu_io(&["write -P 0x33 4M 10M"], &uri);
    // 4 KiB and 64 KiB writes with up to 32 in flight (no READ meanwhile: any ring is the
    // writes'), then every block read back and checked.
    let mut ran_together = false;
    for bs in ["4k", "64k"] {
        let mut ring = None;
        for verify in ["--do_verify=0", "--verify_only"] {
            let mut fio = Command::new("fio");
            fio.args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                &format!("--bs={bs}"),
                "--iodepth=32",
                "--size=24M",
                "--verify=crc32c",
                "--verify_state_save=0",
                verify,
            ]);
            let had = watching_ring(fio, srv.0.id());
            ring.get_or_insert(had);
        }
        ran_together |= ring == Some(true);
    }
    assert!(ran_together, "the writes never ran together on a ring");
    stop_and_check(&mut srv.0, &base, &base_before, &top);
}
