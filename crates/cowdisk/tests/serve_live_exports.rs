//! Exports added to and removed from a running server through its control socket: a
//! read-only export of a live snapshot, removal that waits for or closes its clients,
//! and refusals that leave the server as it was.

#[path = "../../cowdisk-nbd/tests/client/mod.rs"]
mod client;
#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use common::{have_tool, run, run_ok, TempDir};
use live_common::*;

fn names(v: &serde_json::Value) -> Vec<String> {
    v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn add_and_remove_exports_live() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let snap1 = t.0.join("snap1.cow");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let sock = control_socket(&vm1);
    let uri = srv.uri("vm1.cow");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 0 1M", &uri],
        60,
    );
    cowdisk_ok(&["snapshot", s(&vm1), s(&snap1), "-q"]);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xcd 0 64k", &uri],
        60,
    );
    let v = cowdisk_json(&["exports", s(&sock), "--add", s(&snap1), "--read-only"]);
    assert_eq!(names(&v), ["vm1.cow", "snap1.cow"]);
    assert_eq!(v["exports"][1]["read_only"], true);
    let suri = srv.uri("snap1.cow");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xab 0 1M", &suri],
        60,
    );
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &suri],
        60,
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("wrote"),
        "read-only"
    );
    // Refusals: a second export of the same name, a missing image, the served top again.
    let o = cowdisk(&["exports", s(&sock), "--add", s(&snap1), "--read-only"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("duplicate"),
        "{o:?}"
    );
    let o = cowdisk(&["exports", s(&sock), "--add", s(&t.0.join("none.cow"))]);
    assert_eq!(o.status.code(), Some(1));
    let o = cowdisk(&["exports", s(&sock), "--add", s(&vm1), "--name", "again"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use"),
        "{o:?}"
    );
    let o = cowdisk(&["exports", s(&sock), "--remove", "nope"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no export"),
        "{o:?}"
    );
    // Removal waits for connected clients (here: times out, the export is gone anyway).
    let mut c = client::Client::connect(srv.addr);
    c.handshake("snap1.cow", true, &[]);
    let o = cowdisk(&[
        "exports",
        s(&sock),
        "--remove",
        "snap1.cow",
        "--timeout",
        "1",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("still connected"),
        "{o:?}"
    );
    assert_eq!(c.read(0, 4096), vec![0xab; 4096], "its client goes on");
    drop(c);
    let o = run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read 0 4k", &suri],
        60,
    );
    assert!(!o.status.success(), "no new clients of a removed export");
    // Added again, then removed closing its clients.
    cowdisk_ok(&["exports", s(&sock), "--add", s(&snap1), "--read-only"]);
    let mut c = client::Client::connect(srv.addr);
    c.handshake("snap1.cow", true, &[]);
    let v = cowdisk_json(&["exports", s(&sock), "--remove", "snap1.cow", "--close"]);
    assert_eq!(names(&v), ["vm1.cow"]);
    assert!(c.is_closed(), "its connection was closed");
    // A writable image added live gets its control socket beside it: commands on it
    // reach this server; once removed, its lock and socket are gone.
    let vm2 = t.0.join("vm2.cow");
    cowdisk_ok(&[
        "create",
        s(&vm2),
        "--backing",
        s(&t.0.join("base.cow")),
        "-q",
    ]);
    cowdisk_ok(&["exports", s(&sock), "--add", s(&vm2)]);
    assert!(control_socket(&vm2).exists());
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 64k",
            &srv.uri("vm2.cow"),
        ],
        60,
    );
    cowdisk_ok(&["snapshot", s(&vm2), s(&t.0.join("vm2s.cow")), "-q"]);
    assert_eq!(
        cowdisk_json(&["stats", s(&vm2)])["exports"][0]["snapshots"],
        1
    );
    cowdisk_ok(&["exports", s(&sock), "--remove", "vm2.cow"]);
    assert!(!control_socket(&vm2).exists());
    let info = cowdisk_json(&["info", s(&vm2)]);
    assert_eq!(info["depth"], 3, "opened offline: the server let it go");
    // The served image never noticed.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xcd 0 64k",
            "-c",
            "read -P 0xab 64k 960k",
            &uri,
        ],
        60,
    );
    assert!(srv.stop().success());
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
}
