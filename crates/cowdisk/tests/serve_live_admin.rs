//! More of a served image's administration through its server: `reset` (and a kill in
//! the middle of it), and the Prometheus endpoint of `serve --metrics`.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use common::{have_tool, run_ok, TempDir};
use live_common::*;

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run_ok("qemu-io", &args, 60);
}

#[test]
fn reset_of_a_served_image_goes_through_its_server() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let uri = srv.uri("vm1.cow");
    qemu_io(&uri, &["write -P 0xab 0 1M"]);
    cowdisk_ok(&["snapshot", s(&vm1), s(&t.0.join("snap1.cow")), "-q"]);
    qemu_io(&uri, &["write -P 0xcd 0 512k"]);
    let r = cowdisk_json(&["reset", s(&vm1)]);
    assert_eq!(r["image"]["state"], "writable", "{r}");
    assert_eq!(r["image"]["parent"]["reference"], "snap1.cow", "{r}");
    // The export reads the snapshot again and takes writes.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 1M",
            "write -P 0xee 2M 64k",
            "read -P 0xee 2M 64k",
        ],
    );
    let info = cowdisk_json(&["info", s(&vm1)]);
    assert_eq!(info["layers"][0]["data_blocks"], 1, "{info}");
    assert!(srv.stop().success());
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
    let mut want = vec![0u8; 4 << 20];
    want[..1 << 20].fill(0xab);
    want[2 << 20..(2 << 20) + (64 << 10)].fill(0xee);
    assert!(content(&vm1, &t.0) == want);

    // Killed after writing the new top, before the rename: the old top stays.
    let fp = [("COWDISK_FAILPOINT", "reset.after_temp")];
    let mut srv = Serve::start(&vm1, &[], &fp);
    assert!(!cowdisk(&["reset", s(&vm1)]).status.success());
    assert_eq!(srv.wait_exit(30).and_then(|s| s.code()), Some(137));
    drop(srv);
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
    assert!(content(&vm1, &t.0) == want);
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut srv = Serve::start(&vm1, &["--metrics", &addr], &[]);
    qemu_io(
        &srv.uri("vm1.cow"),
        &["write -P 1 0 64k", "read 0 64k", "flush"],
    );
    let page = get(&addr, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(
        page.contains("cowdisk_writes_total{export=\"vm1.cow\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("cowdisk_bytes_written_total{export=\"vm1.cow\"} 65536"),
        "{page}"
    );
    assert!(page.contains("cowdisk_latency_us{export=\"vm1.cow\",quantile=\"0.99\"}"));
    assert!(get(&addr, "/").starts_with("HTTP/1.1 404"));
    // A peer that sends garbage and hangs up costs nothing.
    let mut g = TcpStream::connect(&addr).unwrap();
    let _ = g.write_all(&[0xff; 20000]);
    drop(g);
    assert!(get(&addr, "/metrics").starts_with("HTTP/1.1 200 OK"));
    assert!(srv.stop().success());
}

#[test]
fn check_of_a_served_image_goes_through_its_server() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let uri = srv.uri("vm1.cow");
    // Unflushed writes: the check flushes first, so they are no "unreferenced" leak.
    qemu_io(&uri, &["write -P 0xab 0 1M"]);
    cowdisk_ok(&["snapshot", s(&vm1), s(&t.0.join("snap1.cow")), "-q"]);
    qemu_io(&uri, &["write -P 0xcd 128k 64k", "write -z -u 0 64k"]);
    let o = cowdisk(&["check", s(&vm1), "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["result"], "clean", "{v}");
    assert_eq!(v["image"], s(&vm1));
    assert_eq!(v["layers_checked"], 3);
    assert!(cowdisk_ok(&["check", s(&vm1)]).contains("No errors found"));
    // Repair writes the top: not done behind the server's back.
    let o = cowdisk(&["check", s(&vm1), "--repair"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    qemu_io(
        &uri,
        &[
            "read -P 0 0 64k",
            "read -P 0xcd 128k 64k",
            "write -P 1 1M 4k",
        ],
    );
    assert!(srv.stop().success());
}

#[test]
fn explicit_control_socket_and_default_paths_taken() {
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let ctl = t.0.join("ctl.sock");
    let mut srv = Serve::start(&vm1, &["--control", s(&ctl)], &[]);
    assert!(!control_socket(&vm1).exists(), "only the socket asked for");
    let v = cowdisk_json(&["exports", s(&ctl)]);
    assert_eq!(v["exports"][0]["name"], "vm1.cow");
    // The CLI does not find this server by the image's path: the files are in use.
    let o = cowdisk(&["info", s(&vm1)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    assert!(srv.stop().success());
    assert!(!ctl.exists());
    // An explicit path that is not a socket is refused; nothing is served.
    std::fs::write(&ctl, b"keep").unwrap();
    let o = cowdisk(&[
        "serve",
        s(&vm1),
        "--listen",
        "127.0.0.1:0",
        "--control",
        s(&ctl),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a socket"));
    // A default path taken by something else: served without it, which is left alone.
    std::fs::write(control_socket(&vm1), b"keep").unwrap();
    let mut srv = Serve::start(&vm1, &[], &[]);
    assert!(srv.stop().success());
    assert_eq!(std::fs::read(control_socket(&vm1)).unwrap(), b"keep");
    assert_eq!(std::fs::read(&ctl).unwrap(), b"keep");
}

/// Descriptors the process holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn chain_changes_cost_the_server_one_descriptor_each() {
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let pid = srv.child.id();
    let before = fds(pid);
    for n in 0..60 {
        cowdisk_ok(&["snapshot", s(&vm1), s(&t.0.join(format!("s{n}.cow"))), "-q"]);
    }
    cowdisk_ok(&["squash", s(&vm1), "-q"]);
    cowdisk_ok(&["reset", s(&vm1), "-q"]);
    let after = fds(pid);
    // Each change keeps its new top open; the parents are shared, never reopened (which
    // would grow with the square of the changes and hit the descriptor limit).
    assert!(after <= before + 62 + 4, "{before} -> {after} descriptors");
    assert_eq!(cowdisk_json(&["info", s(&vm1)])["depth"], 2);
    assert!(srv.stop().success());
}
