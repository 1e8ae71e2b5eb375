//! The power-loss harness of the crash suites (crash.rs, crash_journal.rs): a 2-layer
//! start, random workloads, a run that loses power before a chosen sync, and the
//! durable-value oracle that checks every block after it (see crash.rs).

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{pattern, SimChain};
use cowdisk_core::sim::{CrashMode, SimStorage, SimWorld};
use std::path::Path;

use cowdisk_core::{Access, CopyUp, Disk, IoError, JournalOpener, Storage, WriteFlags, ZeroFlags};

#[derive(Debug, Clone, Copy)]
pub enum Op {
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
    pub fn commits(&self) -> bool {
        matches!(
            self,
            Op::Flush | Op::Write { fua: true, .. } | Op::Zeroes { fua: true, .. }
        )
    }
}

/// Durable images of a 2-layer chain (file 0 = sealed base, file 1 = empty top).
pub struct Start {
    pub base: Vec<u8>,
    pub top: Vec<u8>,
    pub size: u64,
    pub bs: u64,
    /// What the disk reads as at the start.
    pub content: Vec<u8>,
    /// Copy-ups take the in-kernel path (`SimWorld::kernel_copy`).
    pub kernel_copy: bool,
    /// How the disk brings blocks held below into the top.
    pub copy_up: CopyUp,
    /// Bytes of the flush journal (file 2 of the world; 0: none), which `Op::Flush`
    /// and FUA then go through.
    pub journal: u64,
}

impl Start {
    pub fn new(blocks: u64, bs: u32, seed: u64) -> Start {
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
            journal: 0,
        }
    }

    pub fn world(&self) -> Arc<SimWorld> {
        let w = SimWorld::new();
        w.from_bytes(self.base.clone());
        w.from_bytes(self.top.clone());
        if self.journal > 0 {
            w.create();
        }
        w.kernel_copy(self.kernel_copy);
        w
    }
}

pub fn open(world: &Arc<SimWorld>, start: &Start) -> Result<Disk, cowdisk_core::OpenError> {
    let top: Arc<SimStorage> = world.file(1);
    let base: Arc<SimStorage> = world.file(0);
    let journal = (start.journal > 0).then(|| {
        let w = world.clone();
        let opener: JournalOpener = Arc::new(move |_: &Path, _| Ok(w.file(2) as Arc<dyn Storage>));
        (opener, start.journal)
    });
    let d = Disk::open_storages_journaled(
        (top as Arc<dyn Storage>, "top".into()),
        vec![(base as Arc<dyn Storage>, "base".into())],
        Access::ReadWrite,
        journal,
    )?;
    d.set_copy_up(start.copy_up);
    Ok(d)
}

#[derive(Clone)]
pub struct Oracle {
    pub bs: u64,
    pub cur: Vec<u8>,
    pub durable: Vec<u8>,
    /// Per block: values written since the last completed flush.
    pub since: Vec<Vec<Vec<u8>>>,
    /// The unit a crash keeps whole: the block, or with partial blocks the sub-block (a
    /// write over sub-blocks the top holds and ones it does not lands in place in the
    /// first, and in the second only once its bitmap is durable: as on a disk, unflushed
    /// writes are whole per sector, not per request).
    pub unit: u64,
}

impl Oracle {
    pub fn new(start: &Start) -> Oracle {
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
    pub fn block(v: &[u8], bs: u64, b: u64) -> &[u8] {
        &v[(b * bs) as usize..((b + 1) * bs) as usize]
    }
    pub fn apply(&mut self, op: &Op) {
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
    pub fn commit(&mut self) {
        self.durable.clone_from(&self.cur);
        self.since.iter_mut().for_each(Vec::clear);
    }

    /// Checks a block read after a crash against what `level` allows, unit by unit.
    pub fn check(&self, b: u64, got: &[u8], level: Level) -> Result<(), String> {
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

    pub fn check_unit(
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
pub enum Level {
    /// All-or-nothing modes: D or a member of W.
    Exact,
    /// Reordering without garbage: every byte comes from D or some member of W.
    Bytes,
    /// Garbage possible: anything (blocks without writes in flight must still read D).
    Loose,
}

pub fn exec(disk: &Disk, op: &Op) -> Result<(), IoError> {
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
        // The same as `flush` without a journal.
        Op::Flush => disk.client_flush(),
    }
}

/// A random workload of `n` ops over a disk of `size` bytes, block size `bs`.
pub fn workload(seed: u64, n: usize, size: u64, bs: u64, zero_heavy: bool) -> Vec<Op> {
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
pub fn run(start: &Start, ops: &[Op], crash: Option<u64>) -> (Arc<SimWorld>, Oracle) {
    let world = start.world();
    if let Some(k) = crash {
        world.crash_before_sync(k);
    }
    let disk = open(&world, start).unwrap();
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
pub fn verify(
    start: &Start,
    after: &Arc<SimWorld>,
    oracle: &Oracle,
    level: Level,
    recover: bool,
) -> Result<(), String> {
    if after.live(0) != start.base {
        return Err("the sealed base layer changed".into());
    }
    let disk =
        open(after, start).map_err(|e| format!("chain does not open after the crash: {e}"))?;
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
        let disk = open(after, start).map_err(|e| format!("reopen after recovery: {e}"))?;
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
pub fn enumerate_crashes(
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
