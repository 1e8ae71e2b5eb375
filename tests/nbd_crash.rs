//! The engine on the crash-simulating storage, behind the real NBD server, driven by a
//! hand-written client over three connections (N10, N11, P2 through NBD): a FLUSH on any
//! connection makes writes acknowledged on every connection durable; after the power
//! fails at a random sync point, the chain reopens and every block reads as its last
//! durable value or a value written after it.

#[path = "../crates/cowdisk-nbd/tests/client/mod.rs"]
mod client;

use std::path::PathBuf;
use std::sync::Arc;

use client::{Client, TestServer};
use cowdisk::serve::DiskBackend;
use cowdisk_core::layer::{create_on, seal, NewLayer};
use cowdisk_core::sim::{CrashMode, SimWorld};
use cowdisk_core::{Access, Disk, ParentRef, Storage, WriteFlags};
use cowdisk_nbd::wire::cmd;
use cowdisk_nbd::Limits;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const BLOCKS: u64 = 32;
const SIZE: u64 = BS * BLOCKS;

/// Base (file 0) with a pattern in every other block, sealed; empty top (file 1).
fn build(world: &Arc<SimWorld>) -> Vec<u8> {
    let base = world.create();
    let h = NewLayer {
        virtual_size: SIZE,
        block_size: BS as u32,
        parent: None,
    }
    .header("base".as_ref())
    .unwrap();
    create_on(&*base, "base".as_ref(), &h).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    {
        let d =
            Disk::open_storages((base.clone(), "base".into()), vec![], Access::ReadWrite).unwrap();
        for b in (0..BLOCKS).step_by(2) {
            let data = vec![b as u8 + 1; BS as usize];
            d.write(b * BS, &data, WriteFlags::default()).unwrap();
            model[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
        }
        d.flush().unwrap();
    }
    let (uuid, digest) = seal(&*base, "base".as_ref()).unwrap();
    let top = world.create();
    let parent = Some(ParentRef {
        path: "base".into(),
        uuid,
        digest,
    });
    let h = NewLayer {
        virtual_size: SIZE,
        block_size: BS as u32,
        parent,
    }
    .header("top".as_ref())
    .unwrap();
    create_on(&*top, "top".as_ref(), &h).unwrap();
    model
}

fn open(world: &Arc<SimWorld>, access: Access) -> Disk {
    let top: Arc<dyn Storage> = world.file(1);
    let base: Arc<dyn Storage> = world.file(0);
    Disk::open_storages(
        (top, PathBuf::from("top")),
        vec![(base, PathBuf::from("base"))],
        access,
    )
    .unwrap()
}

#[test]
fn flush_on_another_connection_survives_power_loss() {
    let mut failures = 0;
    for seed in std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(0..60u64, |s: u64| s..s + 1)
    {
        let world = SimWorld::new();
        let initial = build(&world);
        let base_before = world.live(0);
        let crash_at = world.syncs() + (seed % 9);
        world.crash_before_sync(crash_at);
        let disk = open(&world, Access::ReadWrite);
        let srv = TestServer::start(
            vec![("top", Arc::new(DiskBackend::new(disk)))],
            Limits::default(),
        );
        let mut conns: Vec<Client> = (0..3)
            .map(|_| {
                let mut c = Client::connect(srv.addr);
                c.handshake("top", true, &[]);
                c
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Per block: last durable value, and values written since.
        let mut durable: Vec<Vec<u8>> = (0..BLOCKS)
            .map(|b| initial[(b * BS) as usize..((b + 1) * BS) as usize].to_vec())
            .collect();
        let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); BLOCKS as usize];
        let mut live = durable.clone();
        for _ in 0..40 {
            let c = rng.gen_range(0..3);
            match rng.gen_range(0..10) {
                0..=5 => {
                    let b = rng.gen_range(0..BLOCKS);
                    let off = rng.gen_range(0..BS - 512);
                    let len = rng.gen_range(1..=(BS - off).min(1024));
                    let fill: u8 = rng.gen();
                    conns[c].write(b * BS + off, &vec![fill; len as usize]);
                    live[b as usize][off as usize..(off + len) as usize].fill(fill);
                    since[b as usize].push(live[b as usize].clone());
                }
                6 => {
                    let b = rng.gen_range(0..BLOCKS);
                    assert_eq!(
                        conns[c].errno(0, cmd::WRITE_ZEROES, b * BS, BS as u32, &[]),
                        0
                    );
                    live[b as usize].fill(0);
                    since[b as usize].push(live[b as usize].clone());
                }
                _ => {
                    assert_eq!(conns[c].errno(0, cmd::FLUSH, 0, 0, &[]), 0);
                    // The flush is durable only if the power was still on when it returned.
                    if !world.crashed() {
                        durable = live.clone();
                        since.iter_mut().for_each(Vec::clear);
                    }
                }
            }
        }
        drop(conns);
        srv.stop().unwrap();
        for mode in [
            CrashMode::DropAll,
            CrashMode::KeepAll,
            CrashMode::RandomSubset(seed),
        ] {
            let after = world.after_crash(mode);
            assert_eq!(
                after.live(0),
                base_before,
                "seed {seed}: base layer written"
            );
            let disk = open(&after, Access::ReadOnly);
            for b in 0..BLOCKS {
                let mut got = vec![0u8; BS as usize];
                disk.read(b * BS, &mut got).unwrap();
                let exact = got == durable[b as usize] || since[b as usize].contains(&got);
                // A garbled in-flight write may leave garbage in its own block only; every
                // block with no write since its last durable flush must read exactly.
                let ok = match mode {
                    CrashMode::RandomSubset(_) => exact || !since[b as usize].is_empty(),
                    _ => exact,
                };
                if !ok {
                    failures += 1;
                    let uniq = |v: &[u8]| {
                        let mut u: Vec<u8> = v.to_vec();
                        u.sort();
                        u.dedup();
                        u
                    };
                    eprintln!(
                        "seed {seed} mode {mode:?}: block {b} reads neither its durable nor a later value: got {:?} durable {:?} since {:?} top state {:?}",
                        uniq(&got),
                        uniq(&durable[b as usize]),
                        since[b as usize].iter().map(|v| uniq(v)).collect::<Vec<_>>(),
                        disk.top_state(b)
                    );
                }
            }
        }
    }
    assert_eq!(failures, 0);
}
