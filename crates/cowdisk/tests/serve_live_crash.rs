//! A served image's server killed (exit 137, as `kill -9`) at every step of a live
//! snapshot: the chain opens, checks clean, and reads as before the snapshot (which held
//! every flushed write); the snapshot, if it exists, holds them too.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use common::{have_tool, run_ok, TempDir};
use live_common::*;

const STEPS: [&str; 4] = [
    "snapshot.after_pending",
    "snapshot.after_seal",
    "snapshot.after_link",
    "snapshot.after_rename",
];

#[test]
fn live_snapshot_killed_at_every_step() {
    if !have_tool("qemu-io") {
        return;
    }
    // Every step the snapshot code names is covered here.
    let src = include_str!("../src/ops/snapshot.rs");
    let named = src.matches("failpoint::hit(\"snapshot.").count();
    assert_eq!(named, STEPS.len(), "a snapshot step without a crash test");
    for step in STEPS {
        let t = TempDir::new();
        let vm1 = chain(&t.0, "4M");
        let snap = t.0.join("snap1.cow");
        let mut srv = Serve::start(&vm1, &[], &[("COWDISK_FAILPOINT", step)]);
        let uri = srv.uri("vm1.cow");
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "flush", &uri],
            60,
        );
        let o = cowdisk(&["snapshot", s(&vm1), s(&snap)]);
        assert!(!o.status.success(), "{step}: the server died mid-snapshot");
        let st = srv.wait_exit(30).expect("server exits at the failpoint");
        assert_eq!(st.code(), Some(137), "{step}");
        drop(srv);
        let mut expect = vec![0u8; 4 << 20];
        expect[..1 << 20].fill(0xab);
        // The next command finishes or undoes the snapshot, then checks.
        let check = cowdisk_json(&["check", s(&vm1)]);
        assert!(
            check["result"] == "clean" || check["result"] == "leaks",
            "{step}: {check}"
        );
        assert!(content(&vm1, &t.0) == expect, "{step}: image content");
        let depth = cowdisk_json(&["info", s(&vm1)])["depth"].as_u64().unwrap();
        if snap.exists() {
            assert_eq!(depth, 3, "{step}: the snapshot was completed");
            assert!(content(&snap, &t.0) == expect, "{step}: snapshot content");
            let c = cowdisk_json(&["check", s(&snap)]);
            assert_eq!(c["result"], "clean", "{step}: {c}");
        } else {
            assert_eq!(depth, 2, "{step}: the snapshot was undone");
        }
        // And the image serves and takes a live snapshot again.
        let mut srv = Serve::start(&vm1, &[], &[]);
        let uri = srv.uri("vm1.cow");
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0xcd 1M 64k", &uri],
            60,
        );
        let snap2 = t.0.join("snap2.cow");
        cowdisk_ok(&["snapshot", s(&vm1), s(&snap2), "-q"]);
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "read -P 0xcd 1M 64k",
                &uri,
            ],
            60,
        );
        assert!(srv.stop().success());
    }
}
