//! Flushes sync only what is new: a guest's journal sends many flushes, often back to
//! back, and each fdatasync costs a round trip to the disk.
mod common;

use std::sync::Arc;

use common::SimChain;
use cowdisk_core::sim::SimWorld;
use cowdisk_core::{Access, WriteFlags, ZeroFlags};

#[test]
fn flushes_sync_only_what_is_new() {
    let world = SimWorld::new();
    let mut chain = SimChain::new(world.clone(), 64 * 16384, 16384);
    {
        let d = chain.open(Access::ReadWrite);
        d.write(0, &[7; 16384], WriteFlags::default()).unwrap();
        d.flush().unwrap();
    }
    chain.push_layer();
    let d = chain.open(Access::ReadWrite);
    let syncs = || world.syncs();

    // The first flush after opening syncs even with nothing written: a process before
    // this one may have acknowledged writes it never flushed.
    let s = syncs();
    d.flush().unwrap();
    assert!(syncs() > s, "first flush after open synced nothing");

    let s = syncs();
    d.flush().unwrap();
    d.flush().unwrap();
    assert_eq!(syncs(), s, "flushes with nothing written synced");

    // A copy-up: data, then the map page exposing it (two syncs).
    d.write(100, &[1; 10], WriteFlags::default()).unwrap();
    let s = syncs();
    d.flush().unwrap();
    assert_eq!(syncs() - s, 2);
    let s = syncs();
    d.flush().unwrap();
    assert_eq!(syncs(), s);

    // A rewrite of a top block changes no map page: one sync.
    d.write(200, &[2; 10], WriteFlags::default()).unwrap();
    let s = syncs();
    d.flush().unwrap();
    assert_eq!(syncs() - s, 1);

    // Zeroing and discarding count as writes; FUA flushes at once.
    d.write_zeroes(0, 512, ZeroFlags::default()).unwrap();
    let s = syncs();
    d.flush().unwrap();
    assert_eq!(syncs() - s, 1);
    d.discard(16384, 16384, WriteFlags::default()).unwrap();
    let s = syncs();
    d.flush().unwrap();
    assert!(syncs() > s, "discard not flushed");
    let s = syncs();
    d.write(300, &[3; 10], WriteFlags { fua: true }).unwrap();
    assert_eq!(syncs() - s, 1);
    d.flush().unwrap();
    assert_eq!(syncs() - s, 1);
}

#[test]
fn concurrent_flushes_cover_every_write_before_them() {
    let world = SimWorld::new();
    let mut chain = SimChain::new(world.clone(), 64 * 16384, 16384);
    chain.push_layer();
    let d = Arc::new(chain.open(Access::ReadWrite));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let off = (u64::from(t) * 16 + i % 16) * 16384 + i * 8;
                    d.write(off, &[t + 1; 8], WriteFlags::default()).unwrap();
                    d.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Everything acknowledged before a completed flush is durable: drop whatever was
    // not synced and read it back.
    let after = world.after_crash(cowdisk_core::sim::CrashMode::DropAll);
    let c2 = SimChain {
        world: after.clone(),
        layers: (chain.layers.iter())
            .map(|(st, p)| (after.file(st.id()), p.clone()))
            .collect(),
        ..chain
    };
    let d2 = c2.open(Access::ReadWrite);
    for t in 0..4u8 {
        for i in 0..50u64 {
            let off = (u64::from(t) * 16 + i % 16) * 16384 + i * 8;
            let mut b = [0u8; 8];
            d2.read(off, &mut b).unwrap();
            assert_eq!(b, [t + 1; 8], "thread {t} write {i} lost");
        }
    }
}
