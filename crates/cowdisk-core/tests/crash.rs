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

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{pattern, seed, SimChain};
use cowdisk_core::sim::{CrashMode, FailPlan, SimStorage, SimWorld};
use cowdisk_core::{Access, CopyUp, Disk, IoError, IoErrorKind, Storage, WriteFlags, ZeroFlags};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
        fua: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zeroes {
        off: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    },
    Flush,
}

impl Op {
    fn commits(&self) -> bool {
        matches!(
            self,
            Op::Flush | Op::Write { fua: true, .. } | Op::Zeroes { fua: true, .. }
        )
    }
}

/// Durable images of a 2-layer chain (file 0 = sealed base, file 1 = empty top).
struct Start {
    base: Vec<u8>,
    top: Vec<u8>,
    size: u64,
    bs: u64,
    /// What the disk reads as at the start.
    content: Vec<u8>,
    /// Copy-ups take the in-kernel path (`SimWorld::kernel_copy`).
    kernel_copy: bool,
    /// How the disk brings blocks held below into the top.
    copy_up: CopyUp,
}

impl Start {
    fn new(blocks: u64, bs: u32, seed: u64) -> Start {
        let mut rng = StdRng::seed_from_u64(seed);
        let size = blocks * u64::from(bs);
        let world = SimWorld::new();
        let mut chain = SimChain::new(world.clone(), size, bs);
        let mut content = vec![0u8; size as usize];
        {
            let d = chain.open(Access::ReadWrite);
            for b in 0..blocks {
                // Most blocks hold data in the base; some stay holes.
                if rng.gen_bool(0.75) {
                    let r = &mut content
                        [(b * u64::from(bs)) as usize..((b + 1) * u64::from(bs)) as usize];
                    pattern(rng.gen(), r);
                    d.write(b * u64::from(bs), r, WriteFlags::default())
                        .unwrap();
                }
            }
            d.flush().unwrap();
        }
        chain.push_layer();
        assert_eq!(world.live(0), world.durable(0));
        assert_eq!(world.live(1), world.durable(1));
        Start {
            base: world.durable(0),
            top: world.durable(1),
            size,
            bs: u64::from(bs),
            content,
            kernel_copy: false,
            // A world with kernel copies shares extents: copy-ups go the kernel's way.
            copy_up: CopyUp::Share,
        }
    }

    fn world(&self) -> Arc<SimWorld> {
        let w = SimWorld::new();
        w.from_bytes(self.base.clone());
        w.from_bytes(self.top.clone());
        w.kernel_copy(self.kernel_copy);
        w
    }
}

fn open(world: &Arc<SimWorld>, copy_up: CopyUp) -> Result<Disk, cowdisk_core::OpenError> {
    let top: Arc<SimStorage> = world.file(1);
    let base: Arc<SimStorage> = world.file(0);
    let d = Disk::open_storages(
        (top as Arc<dyn Storage>, "top".into()),
        vec![(base as Arc<dyn Storage>, "base".into())],
        Access::ReadWrite,
    )?;
    d.set_copy_up(copy_up);
    Ok(d)
}

#[derive(Clone)]
struct Oracle {
    bs: u64,
    cur: Vec<u8>,
    durable: Vec<u8>,
    /// Per block: values written since the last completed flush.
    since: Vec<Vec<Vec<u8>>>,
    /// The unit a crash keeps whole: the block, or with partial blocks the sub-block (a
    /// write over sub-blocks the top holds and ones it does not lands in place in the
    /// first, and in the second only once its bitmap is durable: as on a disk, unflushed
    /// writes are whole per sector, not per request).
    unit: u64,
}

impl Oracle {
    fn new(start: &Start) -> Oracle {
        let blocks = start.size / start.bs;
        let unit = match start.copy_up {
            CopyUp::Partial => (start.bs / 32).max(4096),
            _ => start.bs,
        };
        Oracle {
            unit,
            bs: start.bs,
            cur: start.content.clone(),
            durable: start.content.clone(),
            since: vec![Vec::new(); blocks as usize],
        }
    }
    fn block(v: &[u8], bs: u64, b: u64) -> &[u8] {
        &v[(b * bs) as usize..((b + 1) * bs) as usize]
    }
    fn apply(&mut self, op: &Op) {
        let (off, len) = match *op {
            Op::Write { off, len, seed, .. } => {
                pattern(seed, &mut self.cur[off as usize..(off + len) as usize]);
                (off, len)
            }
            Op::Discard { off, len } | Op::Zeroes { off, len, .. } => {
                self.cur[off as usize..(off + len) as usize].fill(0);
                (off, len)
            }
            Op::Flush => return,
        };
        for b in off / self.bs..(off + len).div_ceil(self.bs) {
            let v = Self::block(&self.cur, self.bs, b).to_vec();
            self.since[b as usize].push(v);
        }
    }
    fn commit(&mut self) {
        self.durable.clone_from(&self.cur);
        self.since.iter_mut().for_each(Vec::clear);
    }

    /// Checks a block read after a crash against what `level` allows, unit by unit.
    fn check(&self, b: u64, got: &[u8], level: Level) -> Result<(), String> {
        let d = Self::block(&self.durable, self.bs, b);
        let u = self.unit as usize;
        for k in 0..got.len() / u {
            let r = k * u..(k + 1) * u;
            let w: Vec<Vec<u8>> = self.since[b as usize]
                .iter()
                .map(|v| v[r.clone()].to_vec())
                .collect();
            self.check_unit(b, &got[r.clone()], &d[r.clone()], &w, level)
                .map_err(|e| format!("{e} (bytes {}..{} of the block)", r.start, r.end))?;
        }
        Ok(())
    }

    fn check_unit(
        &self,
        b: u64,
        got: &[u8],
        d: &[u8],
        w: &[Vec<u8>],
        level: Level,
    ) -> Result<(), String> {
        if got == d {
            return Ok(());
        }
        if w.is_empty() {
            return Err(format!(
                "block {b} had no write since its last flush but does not read its durable value"
            ));
        }
        match level {
            Level::Loose => Ok(()),
            _ if w.iter().any(|v| v == got) => Ok(()),
            Level::Exact => Err(format!(
                "block {b} reads neither its durable value nor any of the {} values written since",
                w.len()
            )),
            Level::Bytes => match (0..got.len()).find(|&i| got[i] != d[i] && w.iter().all(|v| v[i] != got[i])) {
                None => Ok(()),
                Some(i) => Err(format!(
                    "block {b} byte {i} = {:#04x} was never written there (durable {:#04x}; {} writes since)",
                    got[i],
                    d[i],
                    w.len()
                )),
            },
        }
    }
}

/// How much a crash mode lets a block with writes in flight vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// All-or-nothing modes: D or a member of W.
    Exact,
    /// Reordering without garbage: every byte comes from D or some member of W.
    Bytes,
    /// Garbage possible: anything (blocks without writes in flight must still read D).
    Loose,
}

fn exec(disk: &Disk, op: &Op) -> Result<(), IoError> {
    match *op {
        Op::Write {
            off,
            len,
            seed,
            fua,
        } => {
            let mut data = vec![0u8; len as usize];
            pattern(seed, &mut data);
            disk.write(off, &data, WriteFlags { fua })
        }
        Op::Discard { off, len } => disk.discard(off, len, WriteFlags::default()),
        Op::Zeroes {
            off,
            len,
            no_hole,
            fua,
        } => disk.write_zeroes(
            off,
            len,
            ZeroFlags {
                fua,
                no_hole,
                fast: false,
            },
        ),
        Op::Flush => disk.flush(),
    }
}

/// A random workload of `n` ops over a disk of `size` bytes, block size `bs`.
fn workload(seed: u64, n: usize, size: u64, bs: u64, zero_heavy: bool) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = size / bs;
    let mut ops = Vec::with_capacity(n);
    for i in 0..n {
        let b = rng.gen_range(0..blocks);
        let (off, len) = match rng.gen_range(0..3) {
            0 => {
                let a = rng.gen_range(0..bs);
                (b * bs + a, rng.gen_range(1..=bs - a))
            }
            1 => (b * bs, bs * rng.gen_range(1..=2.min(blocks - b))),
            _ => {
                let off = rng.gen_range(0..size);
                (off, rng.gen_range(1..=(size - off).min(2 * bs)))
            }
        };
        let r = rng.gen_range(0..100);
        let (z1, z2) = if zero_heavy { (40, 70) } else { (65, 80) };
        let op = if r < z1 {
            Op::Write {
                off,
                len,
                seed: seed ^ (i as u64 + 1) << 20,
                fua: rng.gen_bool(0.05),
            }
        } else if r < z2 {
            if rng.gen_bool(0.5) {
                Op::Discard { off, len }
            } else {
                Op::Zeroes {
                    off,
                    len,
                    no_hole: rng.gen_bool(0.3),
                    fua: rng.gen_bool(0.05),
                }
            }
        } else if r < 90 {
            Op::Write {
                off,
                len,
                seed: seed ^ (i as u64 + 1) << 20 ^ 1,
                fua: false,
            }
        } else {
            Op::Flush
        };
        ops.push(op);
    }
    ops
}

/// Runs `ops` on a fresh copy of `start`, losing power before sync `crash` if given.
/// Stops after the op during which the power failed.
fn run(start: &Start, ops: &[Op], crash: Option<u64>) -> (Arc<SimWorld>, Oracle) {
    let world = start.world();
    if let Some(k) = crash {
        world.crash_before_sync(k);
    }
    let disk = open(&world, start.copy_up).unwrap();
    let mut oracle = Oracle::new(start);
    for (i, op) in ops.iter().enumerate() {
        exec(&disk, op).unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
        oracle.apply(op);
        if world.crashed() {
            break;
        }
        if op.commits() {
            oracle.commit();
        }
    }
    (world, oracle)
}

/// Opens the post-crash chain and checks it against the oracle; then checks the
/// recovered disk still takes writes that survive a flush and reopen.
fn verify(
    start: &Start,
    after: &Arc<SimWorld>,
    oracle: &Oracle,
    level: Level,
    recover: bool,
) -> Result<(), String> {
    if after.live(0) != start.base {
        return Err("the sealed base layer changed".into());
    }
    let disk = open(after, start.copy_up)
        .map_err(|e| format!("chain does not open after the crash: {e}"))?;
    let mut buf = vec![0u8; start.bs as usize];
    for b in 0..start.size / start.bs {
        disk.read(b * start.bs, &mut buf)
            .map_err(|e| format!("read block {b}: {e}"))?;
        oracle.check(b, &buf, level)?;
    }
    if recover {
        // New writes after recovery: every other block partially, then flush + reopen.
        let mut expect = vec![0u8; start.size as usize];
        disk.read(0, &mut expect)
            .map_err(|e| format!("read all: {e}"))?;
        for b in (0..start.size / start.bs).step_by(2) {
            let off = b * start.bs + 7;
            disk.write(off, &[0xa5; 100], WriteFlags::default())
                .map_err(|e| format!("write after recovery: {e}"))?;
            expect[off as usize..off as usize + 100].fill(0xa5);
        }
        disk.flush()
            .map_err(|e| format!("flush after recovery: {e}"))?;
        drop(disk);
        let disk = open(after, start.copy_up).map_err(|e| format!("reopen after recovery: {e}"))?;
        let mut got = vec![0u8; start.size as usize];
        disk.read(0, &mut got)
            .map_err(|e| format!("read after recovery: {e}"))?;
        if got != expect {
            return Err("writes flushed after recovery did not survive a reopen".into());
        }
    }
    Ok(())
}

/// P2/P3/P4/P8: every sync point of a workload, each crashed in several ways.
/// Returns the number of crash images checked.
fn enumerate_crashes(
    name: &str,
    start: &Start,
    ops: &[Op],
    seeds_per_point: u64,
    salt: u64,
) -> u64 {
    let (world, _) = run(start, ops, None);
    let syncs = world.syncs();
    assert!(syncs > 10, "{name}: workload has only {syncs} sync points");
    let mut checked = 0;
    for k in 0..syncs {
        let (world, oracle) = run(start, ops, Some(k));
        assert!(world.crashed(), "{name}: no crash at sync {k} of {syncs}");
        let mut modes = vec![
            (CrashMode::DropAll, Level::Exact),
            (CrashMode::KeepAll, Level::Exact),
        ];
        for s in 0..seeds_per_point {
            let seed = salt ^ (k << 32) ^ s;
            modes.push((CrashMode::Reorder(seed), Level::Bytes));
            modes.push((CrashMode::RandomSubset(seed), Level::Loose));
            modes.push((CrashMode::Torn { sector: 4096, seed }, Level::Loose));
            modes.push((CrashMode::Torn { sector: 512, seed }, Level::Loose));
        }
        for (i, (mode, level)) in modes.into_iter().enumerate() {
            let after = world.after_crash(mode);
            // The full recovery round trip on a subset keeps the run short.
            let recover = i < 6;
            if let Err(e) = verify(start, &after, &oracle, level, recover) {
                panic!(
                    "{name}: crash before sync {k} of {syncs}, {mode:?}: {e} (COWDISK_SEED={salt})"
                );
            }
            checked += 1;
        }
    }
    checked
}

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
    let disk = open(&world, start.copy_up).unwrap();
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
        match std::panic::catch_unwind(|| open(&world, start.copy_up).map(drop)) {
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
