//! Live disks: the control socket of `cowdisk serve` (info, map, stats, exports through the
//! server) and live snapshots (and squashes) taken while clients write, checked against the
//! writes each client saw acknowledged.

#[path = "../../cowdisk-nbd/tests/client/mod.rs"]
mod client;
#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::{have_tool, run_ok, TempDir};
use live_common::*;
use serde_json::json;

#[test]
fn served_image_answers_info_map_stats_and_exports_through_its_server() {
    if !have_tool("qemu-io") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "8M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let sock = control_socket(&vm1);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -z -u 512k 64k",
            &srv.uri("vm1.cow"),
        ],
        60,
    );
    // What the server answers is what the offline command prints.
    let info = cowdisk_json(&["info", s(&vm1)]);
    assert_eq!(info["image"], s(&vm1));
    assert_eq!(info["depth"], 2);
    assert_eq!(info["layers"][0]["data_blocks"], 15);
    assert_eq!(info["layers"][0]["whiteout_blocks"], 1);
    let map = cowdisk_json(&["map", s(&vm1)]);
    assert_eq!(map[0]["state"], "data");
    assert_eq!(map[0]["length"], 512 * KIB);
    assert_eq!(map[1]["state"], "zero");
    assert_eq!(map[0]["depth"], 0);
    assert!(cowdisk_ok(&["info", s(&vm1)]).contains("whiteout blocks: 1"));
    let stats = cowdisk_json(&["stats", s(&vm1)]);
    let e = &stats["exports"][0];
    assert_eq!(e["name"], "vm1.cow");
    assert!(e["writes"].as_u64().unwrap() >= 1, "{e}");
    assert_eq!(e["bytes_written"], MIB);
    assert_eq!(e["whiteouts"], 1);
    assert_eq!(e["errors"], 0);
    assert!(e["latency_us"]["p99"].as_u64().unwrap() >= 1);
    let ex = cowdisk_json(&["exports", s(&sock)]);
    assert_eq!(ex["exports"][0]["name"], "vm1.cow");
    assert_eq!(ex["exports"][0]["read_only"], false);
    assert_eq!(ex["exports"][0]["virtual_size"], 8 * MIB);
    // -U still reads the files, not the server.
    let u = cowdisk_json(&["info", "-U", s(&vm1)]);
    assert_eq!(u["depth"], 2);
    assert!(srv.stop().success());
    assert!(!sock.exists(), "the control socket is removed at exit");
    // Without a server the commands run offline again; stats needs one.
    assert_eq!(cowdisk_json(&["info", s(&vm1)])["depth"], 2);
    let o = cowdisk(&["stats", s(&vm1)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not being served"));
}

#[test]
fn stale_control_socket_is_replaced_and_commands_fall_back_offline() {
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let sock = control_socket(&vm1);
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    assert!(sock.exists(), "a killed server leaves its socket");
    // Nobody answers there: the CLI works on the files.
    assert_eq!(cowdisk_json(&["info", s(&vm1)])["depth"], 2);
    let mut srv = Serve::start(&vm1, &[], &[]);
    let r = control(&sock, &json!({"command": "exports"}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(srv.stop().success());
}

/// As many live snapshots as the issue asks for, under qd1 writes.
const SNAPSHOTS: u64 = 50;
const SLOTS: u64 = 64;
const SLOT: usize = 4096;

/// Write `i` puts stamp `i + 1` in every word of slot `i % SLOTS`.
fn stamp_block(i: u64) -> Vec<u8> {
    (i + 1).to_le_bytes().repeat(SLOT / 8)
}

/// The number of writes `k` such that `bytes` is exactly writes `0..k` applied in order;
/// panics if no prefix matches (a torn block, a lost or extra write).
fn prefix_len(bytes: &[u8], tag: &str) -> u64 {
    let mut stamps = Vec::new();
    for j in 0..SLOTS as usize {
        let b = &bytes[j * SLOT..(j + 1) * SLOT];
        let w = u64::from_le_bytes(b[..8].try_into().unwrap());
        assert!(b.chunks(8).all(|c| c == &b[..8]), "{tag}: slot {j} torn");
        stamps.push(w);
    }
    let k = stamps.iter().copied().max().unwrap_or(0);
    for (j, &w) in stamps.iter().enumerate() {
        // The last write below k that went to slot j, if any.
        let expect = (0..k)
            .rev()
            .find(|i| i % SLOTS == j as u64)
            .map_or(0, |i| i + 1);
        assert_eq!(w, expect, "{tag}: slot {j} is not the prefix of {k} writes");
    }
    k
}

#[test]
fn live_snapshots_hold_exactly_the_writes_acknowledged_before_them() {
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), srv.addr);
        std::thread::spawn(move || {
            let mut c = client::Client::connect(addr);
            c.handshake("vm1.cow", true, &[]);
            let mut i = 0;
            while !stop.load(SeqCst) {
                c.write((i % SLOTS) * SLOT as u64, &stamp_block(i));
                i += 1;
                acked.store(i, SeqCst);
            }
        })
    };
    let mut taken = Vec::new();
    for n in 0..SNAPSHOTS {
        while acked.load(SeqCst) < (n + 1) * 25 {
            std::thread::yield_now();
        }
        let snap = t.0.join(format!("snap{n}.cow"));
        let before = acked.load(SeqCst);
        cowdisk_ok(&["snapshot", s(&vm1), s(&snap), "-q"]);
        let after = acked.load(SeqCst);
        taken.push((snap, before, after));
    }
    stop.store(true, SeqCst);
    writer.join().expect("writer saw every write succeed");
    let total = acked.load(SeqCst);
    let info = cowdisk_json(&["info", s(&vm1)]);
    assert_eq!(info["depth"], SNAPSHOTS + 2, "live snapshots over base");
    assert!(srv.stop().success());
    let mut last = 0;
    for (snap, before, after) in &taken {
        let tag = snap.display().to_string();
        let k = prefix_len(&content(snap, &t.0), &tag);
        assert!(
            *before <= k && k <= after + 1,
            "{tag}: holds {k} writes; {before} were acknowledged before it, {after} when it returned"
        );
        assert!(k >= last, "{tag}: snapshots go forward");
        last = k;
    }
    assert_eq!(prefix_len(&content(&vm1, &t.0), "vm1"), total);
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
}

#[test]
fn fio_verify_with_live_snapshots_and_squashes() {
    if !have_tool("fio") {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "32M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let uri = srv.uri("vm1.cow");
    let done = Arc::new(AtomicBool::new(false));
    let fio = {
        let done = done.clone();
        std::thread::spawn(move || {
            let o = common::run(
                "fio",
                &[
                    "--name=live",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--numjobs=2",
                    "--iodepth=16",
                    "--size=16M",
                    "--offset_increment=16M",
                    "--loops=3",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    // No verify state files in the crate folder.
                    "--verify_state_save=0",
                    "--group_reporting",
                ],
                600,
            );
            done.store(true, SeqCst);
            o
        })
    };
    let (mut n, mut squashes) = (0, 0);
    while !done.load(SeqCst) && n < 40 {
        if n % 4 == 3 {
            // Online squash of the layers below the top, in the middle of the run.
            cowdisk_ok(&["squash", s(&vm1), "-q"]);
            squashes += 1;
        } else {
            let snap = t.0.join(format!("snap{n}.cow"));
            cowdisk_ok(&["snapshot", s(&vm1), s(&snap), "-q"]);
        }
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = fio.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("err= 0"),
        "fio failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(n >= 2, "snapshots were taken while fio ran ({n})");
    eprintln!("{n} chain changes during fio, {squashes} of them squashes");
    let stats = cowdisk_json(&["stats", s(&vm1)]);
    assert_eq!(stats["exports"][0]["errors"], 0, "{stats}");
    assert!(srv.stop().success());
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
}

#[test]
fn readers_see_the_same_disk_across_live_snapshots() {
    if !(have_tool("nbdcopy") && have_tool("qemu-io")) {
        return;
    }
    let t = TempDir::new();
    let vm1 = chain(&t.0, "32M");
    let mut srv = Serve::start(&vm1, &[], &[]);
    let uri = srv.uri("vm1.cow");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 0 16M",
            "-c",
            "write -P 0x3d 20M 4M",
            &uri,
        ],
        60,
    );
    let mut want = vec![0u8; 32 << 20];
    want[..16 << 20].fill(0x5c);
    want[20 << 20..24 << 20].fill(0x3d);
    let stop = Arc::new(AtomicBool::new(false));
    let snapper = {
        let (stop, vm1, dir) = (stop.clone(), vm1.clone(), t.0.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(SeqCst) && n < 30 {
                let snap = dir.join(format!("r{n}.cow"));
                cowdisk_ok(&["snapshot", s(&vm1), s(&snap), "-q"]);
                n += 1;
            }
            n
        })
    };
    // Whole-disk copies (zero-copy reads, 4 connections) while the chain changes under them.
    let out = t.0.join("copy.raw");
    for _ in 0..4 {
        let _ = std::fs::remove_file(&out);
        run_ok("nbdcopy", &[&uri, s(&out)], 120);
        assert!(
            std::fs::read(&out).unwrap() == want,
            "a copy read something else"
        );
    }
    stop.store(true, SeqCst);
    let n = snapper.join().unwrap();
    assert!(n >= 1);
    let stats = cowdisk_json(&["stats", s(&vm1)]);
    assert_eq!(stats["exports"][0]["errors"], 0, "{stats}");
    assert!(srv.stop().success());
}
