//! Power-loss and fault-injection tests over `SimWorld` (docs/reliability.md, rows P2-P4,
//! P8, P9, E1-E3).
//!
//! Every test runs a workload on a 2-layer chain (sealed base + writable top) and keeps
//! a durable-value oracle: per block the last durable value D and the values W written
//! since. A flush (or FUA command) that returned before the power failed makes every
//! earlier write durable (D := current, W := []). After the crash the chain must open,
//! and:
//! - `DropAll` / `KeepAll`: every block reads as a member of {D} ∪ W;
//! - `RandomSubset` / `Torn`: blocks with writes in flight may hold anything (a write
//!   may be dropped, kept, reordered or turned to garbage), but every block with no
//!   write since its last completed flush reads exactly D: that is what data-before-map
//!   ordering and the A/B map page slots protect;
//! - the base layer's bytes are unchanged, and the recovered disk takes writes and
//!   flushes that survive a reopen.
//!
//! `COWDISK_SEED` sets the seed of the random parts (printed).

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::crash::{
    enumerate_crashes, exec, open, run, verify, workload, Level, Op, Oracle, Start,
};
use common::seed;
use cowdisk_core::sim::{CrashMode, FailPlan};
use cowdisk_core::{CopyUp, IoError, IoErrorKind, WriteFlags};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

#[test]
fn every_sync_point_of_three_workloads() {
    let salt = seed("every_sync_point_of_three_workloads");
    let mut total = 0;
    let mut random = 0;
    let per_point = 30;
    let cases: [(&str, u64, u32, usize, bool); 3] = [
        ("mixed 4K", 16, 4096, 200, false),
        ("trim/zero heavy 4K", 16, 4096, 200, true),
        ("mixed 8K, 24 blocks", 24, 8192, 150, false),
    ];
    for (i, (name, blocks, bs, n, zero_heavy)) in cases.into_iter().enumerate() {
        let start = Start::new(blocks, bs, 1000 + i as u64);
        // Fixed workloads (seed i) so every run covers the same sync points; the crash
        // images' randomness rotates with the printed seed.
        let ops = workload(i as u64, n, start.size, start.bs, zero_heavy);
        let c = enumerate_crashes(name, &start, &ops, per_point, salt.wrapping_add(i as u64));
        total += c;
        random += c - c / (2 + 4 * per_point) * 2;
    }
    println!("{total} crash images checked, {random} of them random (subset/torn)");
    assert!(random >= 10_000, "only {random} random crash points");
}

/// The same crash matrix with copy-ups through the in-kernel path (`copy_file_range`
/// on XFS and btrfs): power lost between the copy and the map write that exposes it,
/// and everywhere else, leaves every block old or new, never a copied block without
/// its map or a map without its copied block.
#[test]
fn every_sync_point_with_kernel_copy_ups() {
    let salt = seed("every_sync_point_with_kernel_copy_ups");
    let mut start = Start::new(64, 16384, 2000);
    start.kernel_copy = true;
    let ops = workload(7, 200, start.size, start.bs, false);
    let (world, _) = run(&start, &ops, None);
    assert!(
        world.kernel_copies() > 20,
        "{} kernel copies",
        world.kernel_copies()
    );
    let c = enumerate_crashes("kernel copy 16K", &start, &ops, 10, salt);
    println!(
        "{} kernel copies, {c} crash images checked",
        world.kernel_copies()
    );
}

/// The same matrix with partial blocks (`CopyUp::Partial`, 4 sub-blocks per block):
/// power lost between a sub-block's data and the bitmap and map entry that expose it,
/// torn between the bitmap page and the map page, and everywhere else, leaves every
/// block old or new.
#[test]
fn every_sync_point_with_partial_blocks() {
    let salt = seed("every_sync_point_with_partial_blocks");
    let mut start = Start::new(32, 16384, 3000);
    start.copy_up = CopyUp::Partial;
    let ops = workload(11, 200, start.size, start.bs, false);
    let c = enumerate_crashes("partial 16K", &start, &ops, 10, salt);
    println!("{c} crash images checked");
    let mut start = Start::new(16, 8192, 3001);
    start.copy_up = CopyUp::Partial;
    let ops = workload(12, 150, start.size, start.bs, true);
    enumerate_crashes("partial 8K, trim/zero heavy", &start, &ops, 10, salt ^ 1);
}

/// Random workloads (seeded by the run seed) at random crash points.
#[test]
fn random_workloads_random_crash_points() {
    let s = seed("random_workloads_random_crash_points");
    let mut rng = StdRng::seed_from_u64(s);
    let mut checked = 0;
    for w in 0..20 {
        let mut start = Start::new(
            rng.gen_range(4..=16),
            [4096, 8192, 16384][rng.gen_range(0..3)],
            rng.gen(),
        );
        if rng.gen_bool(0.5) {
            start.copy_up = CopyUp::Partial;
        }
        let ops = workload(
            rng.gen(),
            rng.gen_range(20..120),
            start.size,
            start.bs,
            rng.gen_bool(0.3),
        );
        let (world, _) = run(&start, &ops, None);
        let syncs = world.syncs();
        for _ in 0..10 {
            let k = rng.gen_range(0..syncs.max(1));
            let (world, oracle) = run(&start, &ops, Some(k));
            for _ in 0..5 {
                let seed = rng.gen();
                let (mode, level) = match rng.gen_range(0..5) {
                    0 => (CrashMode::DropAll, Level::Exact),
                    1 => (CrashMode::RandomSubset(seed), Level::Loose),
                    2 => (CrashMode::Torn { sector: 512, seed }, Level::Loose),
                    3 => (CrashMode::Reorder(seed), Level::Bytes),
                    _ => (CrashMode::Torn { sector: 4096, seed }, Level::Loose),
                };
                let after = world.after_crash(mode);
                if let Err(e) = verify(&start, &after, &oracle, level, true) {
                    panic!("workload {w}, crash before sync {k}, {mode:?}: {e} (COWDISK_SEED={s})");
                }
                checked += 1;
            }
        }
    }
    println!("{checked} crash images checked");
}

/// P9: every sequence of up to 3 ops on a 2-layer, 4-block chain, crashed at every
/// sync point (CrashMonkey/ACE bound: most crash bugs need at most 3 ops).
#[test]
fn bounded_exhaustive_three_ops() {
    let bs = 4096u64;
    let start = Start::new(4, 4096, 77);
    // Block 0..3 of the base: data or hole as Start chose; make the alphabet cover a
    // data block and a hole if the base has both.
    let mut alphabet = vec![Op::Flush];
    for b in 0..3u64 {
        let o = b * bs;
        let seed = 0x1000 + b;
        alphabet.push(Op::Write {
            off: o + 100,
            len: 300,
            seed,
            fua: false,
        });
        alphabet.push(Op::Write {
            off: o,
            len: bs,
            seed: seed + 16,
            fua: false,
        });
        alphabet.push(Op::Write {
            off: o + 1000,
            len: 10,
            seed: seed + 32,
            fua: true,
        });
        alphabet.push(Op::Discard { off: o, len: bs });
        alphabet.push(Op::Zeroes {
            off: o + 512,
            len: 1024,
            no_hole: false,
            fua: false,
        });
    }
    let mut seqs: Vec<Vec<Op>> = Vec::new();
    for a in &alphabet {
        seqs.push(vec![*a]);
        for b in &alphabet {
            seqs.push(vec![*a, *b]);
            for c in &alphabet {
                seqs.push(vec![*a, *b, *c]);
            }
        }
    }
    let mut checked = 0;
    for (i, ops) in seqs.iter().enumerate() {
        // Distinct data per position so W members are distinguishable.
        let ops: Vec<Op> = ops
            .iter()
            .enumerate()
            .map(|(j, op)| match *op {
                Op::Write {
                    off,
                    len,
                    seed,
                    fua,
                } => Op::Write {
                    off,
                    len,
                    seed: seed * 7 + j as u64,
                    fua,
                },
                o => o,
            })
            .collect();
        let (world, _) = run(&start, &ops, None);
        for k in 0..world.syncs() {
            let (world, oracle) = run(&start, &ops, Some(k));
            let seed = i as u64 * 64 + k;
            for (mode, level) in [
                (CrashMode::DropAll, Level::Exact),
                (CrashMode::KeepAll, Level::Exact),
                (CrashMode::Reorder(seed), Level::Bytes),
                (CrashMode::Torn { sector: 512, seed }, Level::Loose),
            ] {
                let after = world.after_crash(mode);
                if let Err(e) = verify(&start, &after, &oracle, level, false) {
                    panic!("ops {ops:?}, crash before sync {k}, {mode:?}: {e}");
                }
                checked += 1;
            }
        }
    }
    println!("{} sequences, {checked} crash images checked", seqs.len());
    assert!(checked > 10_000);
}

/// Result of one fault-injected run.
struct FaultOutcome {
    injected: bool,
}

/// E1/E2/E3: runs `ops` with the `k`-th I/O call after open failing with `errno`.
fn fault_run(
    start: &Start,
    ops: &[Op],
    k: u64,
    errno: i32,
    sticky: bool,
    syncs_only: bool,
) -> FaultOutcome {
    let world = start.world();
    let disk = open(&world, start).unwrap();
    let c0 = world.calls();
    world.fail(Some(FailPlan {
        call: c0 + k,
        errno,
        sticky,
        syncs_only,
    }));
    let mut oracle = Oracle::new(start);
    let ctx =
        format!("fault at call {k} (errno {errno}, sticky {sticky}, syncs only {syncs_only})");
    let mut injected = false;
    for (i, op) in ops.iter().enumerate() {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exec(&disk, op)))
            .unwrap_or_else(|_| panic!("{ctx}: op {i} {op:?} panicked"));
        oracle.apply(op);
        match res {
            Ok(()) => {
                if op.commits() {
                    oracle.commit();
                }
            }
            Err(e) => {
                injected = true;
                let want = if errno == ENOSPC {
                    IoErrorKind::NoSpace
                } else {
                    IoErrorKind::Io
                };
                assert_eq!(e.kind(), want, "{ctx}: op {i} {op:?}: {e}");
                let sync_failed = matches!(
                    &e,
                    IoError::Storage {
                        // A page write that fails is retried by the next flush; only a
                        // failed sync poisons (issue 10: ENOSPC is not an fsync failure).
                        op: "sync data" | "sync allocation map",
                        ..
                    }
                );
                assert!(
                    matches!(e, IoError::Storage { .. }),
                    "{ctx}: first error is not the storage error: {e}"
                );
                world.fail(None);
                if sync_failed {
                    // R5: fail-stop. Nothing is acknowledged as durable any more.
                    assert!(disk.is_poisoned(), "{ctx}: failed flush did not poison");
                    assert!(
                        matches!(disk.flush(), Err(IoError::Poisoned { .. })),
                        "{ctx}: flush after failed sync"
                    );
                    assert!(
                        disk.write(0, &[1], WriteFlags::default()).is_err(),
                        "{ctx}: write after failed sync"
                    );
                } else {
                    // A failed data write is that command's error only.
                    assert!(
                        !disk.is_poisoned(),
                        "{ctx}: a failed write poisoned the disk: {e}"
                    );
                    disk.flush()
                        .unwrap_or_else(|e| panic!("{ctx}: flush after a failed write: {e}"));
                }
                break;
            }
        }
    }
    world.fail(None);
    drop(disk);
    // Data flushed before the fault survives both a power loss and a restart.
    for (what, after) in [
        ("power loss", world.after_crash(CrashMode::DropAll)),
        ("restart", world.clone()),
    ] {
        if let Err(e) = verify(start, &after, &oracle, Level::Exact, false) {
            panic!("{ctx}: after {what}: {e}");
        }
    }
    FaultOutcome { injected }
}

#[test]
fn countdown_faults_every_call() {
    let start = Start::new(8, 4096, 5);
    let ops = workload(42, 100, start.size, start.bs, false);
    let mut runs = 0;
    for &(errno, sticky, syncs_only) in &[
        (EIO, false, false),
        (ENOSPC, false, false),
        (EIO, true, false),
        (ENOSPC, true, false),
        (EIO, false, true),
    ] {
        let mut k = 0;
        loop {
            let out = fault_run(&start, &ops, k, errno, sticky, syncs_only);
            runs += 1;
            if !out.injected {
                break;
            }
            k += 1;
        }
        assert!(
            k > 20 || (syncs_only && k > 5),
            "only {k} fault points for errno {errno}"
        );
        println!("errno {errno} sticky {sticky} syncs_only {syncs_only}: {k} fault points");
    }
    println!("{runs} fault runs");
}

/// Faults while opening: every I/O call of an open fails in turn; always a clean
/// `OpenError`, never a panic.
#[test]
fn countdown_faults_during_open() {
    let start = Start::new(8, 4096, 6);
    let mut k = 0;
    loop {
        let world = start.world();
        world.fail(Some(FailPlan {
            call: k,
            errno: EIO,
            sticky: false,
            syncs_only: false,
        }));
        match std::panic::catch_unwind(|| open(&world, &start).map(drop)) {
            Err(_) => panic!("open panicked with a fault at call {k}"),
            Ok(Ok(())) => break,
            Ok(Err(e)) => assert!(
                matches!(e, cowdisk_core::OpenError::Io { .. }),
                "fault at call {k}: {e}"
            ),
        }
        k += 1;
    }
    assert!(k > 3, "open made only {k} I/O calls");
}
