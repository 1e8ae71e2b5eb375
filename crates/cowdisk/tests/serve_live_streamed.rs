//! Live snapshots while every WRITE is too large for the write budget, so the server
//! applies each one in pieces as it arrives: no snapshot falls between two pieces of a
//! write (each holds whole writes only, exactly those acknowledged before it plus perhaps
//! the one in flight).

#[path = "../../cowdisk-nbd/tests/client/mod.rs"]
mod client;
#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;
mod live_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::TempDir;
use live_common::*;

const SLOTS: u64 = 8;
/// Four 64K pieces per write.
const SLOT: usize = 256 << 10;

fn stamp(i: u64) -> Vec<u8> {
    (i + 1).to_le_bytes().repeat(SLOT / 8)
}

/// `k` such that `bytes` holds exactly writes `0..k`; panics on a write found in part.
fn prefix_len(bytes: &[u8], tag: &str) -> u64 {
    let words: Vec<u64> = (0..SLOTS as usize)
        .map(|j| {
            let b = &bytes[j * SLOT..(j + 1) * SLOT];
            assert!(
                b.chunks(8).all(|c| c == &b[..8]),
                "{tag}: write in slot {j} split"
            );
            u64::from_le_bytes(b[..8].try_into().unwrap())
        })
        .collect();
    let k = words.iter().copied().max().unwrap_or(0);
    for (j, &w) in words.iter().enumerate() {
        let expect = (0..k)
            .rev()
            .find(|i| i % SLOTS == j as u64)
            .map_or(0, |i| i + 1);
        assert_eq!(w, expect, "{tag}: slot {j}");
    }
    k
}

#[test]
fn live_snapshots_never_split_a_write_applied_in_pieces() {
    let t = TempDir::new();
    let vm1 = chain(&t.0, "4M");
    // Half the budget is 32K per connection: every 256K write is passed through.
    let mut srv = Serve::start(&vm1, &["--write-budget", "64K"], &[]);
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), srv.addr);
        std::thread::spawn(move || {
            let mut c = client::Client::connect(addr);
            c.handshake("vm1.cow", true, &[]);
            let mut i = 0;
            while !stop.load(SeqCst) {
                c.write((i % SLOTS) * SLOT as u64, &stamp(i));
                i += 1;
                acked.store(i, SeqCst);
            }
        })
    };
    let mut taken = Vec::new();
    for n in 0..12 {
        while acked.load(SeqCst) < (n + 1) * 6 {
            std::thread::yield_now();
        }
        let snap = t.0.join(format!("p{n}.cow"));
        let before = acked.load(SeqCst);
        cowdisk_ok(&["snapshot", s(&vm1), s(&snap), "-q"]);
        taken.push((snap, before, acked.load(SeqCst)));
    }
    stop.store(true, SeqCst);
    writer.join().expect("every write succeeded");
    let total = acked.load(SeqCst);
    assert!(srv.stop().success());
    for (snap, before, after) in &taken {
        let tag = snap.display().to_string();
        let k = prefix_len(&content(snap, &t.0), &tag);
        assert!(
            *before <= k && k <= after + 1,
            "{tag}: {k} writes, {before}..={after} acked"
        );
    }
    assert_eq!(prefix_len(&content(&vm1, &t.0), "vm1"), total);
}
