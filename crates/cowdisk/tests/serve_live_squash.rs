//! Online squash: `cowdisk squash` on a served image merges its sealed layers while a
//! client writes, swaps the served chain, leaves the old layer files untouched, and a live
//! snapshot after it still works; the server killed at the commit point leaves a chain
//! that opens, checks clean and reads the same.

#[path = "../../cowdisk-nbd/tests/client/mod.rs"]
mod client;
#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::{have_tool, run_ok, TempDir};
use live_common::*;

const SLOTS: u64 = 64;
const SLOT: u64 = 4096;

fn block(i: u64) -> Vec<u8> {
    (i + 1).to_le_bytes().repeat(SLOT as usize / 8)
}

/// The disk after writes `0..n`.
fn expected(n: u64, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    for i in n.saturating_sub(SLOTS)..n {
        let off = ((i % SLOTS) * SLOT) as usize;
        v[off..off + SLOT as usize].copy_from_slice(&block(i));
    }
    v
}

#[test]
fn online_squash_while_a_client_writes() {
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
                c.write((i % SLOTS) * SLOT, &block(i));
                i += 1;
                acked.store(i, SeqCst);
                if i % 97 == 0 {
                    // Reads go on through the swap and see every acknowledged write.
                    let j = i - 1;
                    assert_eq!(c.read((j % SLOTS) * SLOT, SLOT as u32), block(j));
                }
            }
        })
    };
    let wait = |n: u64| {
        while acked.load(SeqCst) < n {
            std::thread::yield_now();
        }
    };
    let mut olds = Vec::new();
    for n in 0..4 {
        wait((n + 1) * 40);
        let snap = t.0.join(format!("snap{n}.cow"));
        cowdisk_ok(&["snapshot", s(&vm1), s(&snap), "-q"]);
        olds.push(snap);
    }
    olds.push(t.0.join("base.cow"));
    let before: Vec<Vec<u8>> = olds.iter().map(|p| std::fs::read(p).unwrap()).collect();
    // A client following what changed since snap1: its bitmap names that layer.
    let mut bm = client::Client::connect(srv.addr);
    bm.handshake("vm1.cow", true, &["qemu:dirty-bitmap:snap1.cow"]);
    let st = bm.block_status(0, 0, 1 << 20);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].0, 3, "the dirty-bitmap context");
    // Rate-limited (generously: the test asserts behaviour, not time).
    let sq = cowdisk_json(&["squash", s(&vm1), "--rate", "256M"]);
    assert_eq!(sq["layers_merged"], 5, "{sq}");
    let merged = sq["squashed"]["path"].as_str().unwrap().to_string();
    assert!(merged.starts_with(s(&vm1)), "{merged}");
    let info = cowdisk_json(&["info", s(&vm1)]);
    assert_eq!(
        info["depth"], 2,
        "the served chain is the squashed one: {info}"
    );
    wait(acked.load(SeqCst) + 50);
    // A live snapshot after the swap (the top file is open twice now).
    let after = t.0.join("after.cow");
    cowdisk_ok(&["snapshot", s(&vm1), s(&after), "-q"]);
    assert_eq!(cowdisk_json(&["info", s(&vm1)])["depth"], 3);
    wait(acked.load(SeqCst) + 50);
    stop.store(true, SeqCst);
    writer.join().expect("every write and read succeeded");
    let total = acked.load(SeqCst);
    assert!(srv.stop().success());
    for (p, b) in olds.iter().zip(&before) {
        assert!(std::fs::read(p).unwrap() == *b, "{} changed", p.display());
    }
    assert!(content(&vm1, &t.0) == expected(total, 4 << 20));
    let check = cowdisk_json(&["check", s(&vm1)]);
    assert_eq!(check["result"], "clean", "{check}");
}

/// A server killed at every step of an online squash (each failpoint of `squash`):
/// the chain is the old one or the squashed one, opens, checks clean and reads the same.
#[test]
fn online_squash_killed_at_every_step() {
    if !have_tool("qemu-io") {
        return;
    }
    let steps = [
        "squash.after_first_block",
        "squash.after_temp",
        "squash.after_seal",
        "squash.after_rename",
        "squash.after_repoint",
    ];
    for step in steps {
        let t = TempDir::new();
        let vm1 = chain(&t.0, "4M");
        let fp = [("COWDISK_FAILPOINT", step)];
        let mut srv = Serve::start(&vm1, &[], &fp);
        let uri = srv.uri("vm1.cow");
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0xab 0 1M", &uri],
            60,
        );
        cowdisk_ok(&["snapshot", s(&vm1), s(&t.0.join("snap1.cow")), "-q"]);
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xcd 512k 1M",
                "-c",
                "flush",
                &uri,
            ],
            60,
        );
        assert!(!cowdisk(&["squash", s(&vm1)]).status.success(), "{step}");
        assert_eq!(
            srv.wait_exit(30).and_then(|s| s.code()),
            Some(137),
            "{step}"
        );
        drop(srv);
        let check = cowdisk_json(&["check", s(&vm1)]);
        assert_eq!(check["result"], "clean", "{step}: {check}");
        let depth = cowdisk_json(&["info", s(&vm1)])["depth"].as_u64();
        let squashed = step == "squash.after_repoint";
        let want_depth = if squashed { 2 } else { 3 };
        assert_eq!(depth, Some(want_depth), "{step}");
        let mut want = vec![0u8; 4 << 20];
        want[..1 << 20].fill(0xab);
        want[512 << 10..(512 << 10) + (1 << 20)].fill(0xcd);
        assert!(content(&vm1, &t.0) == want, "{step}: content");
    }
}
