//! F5: an NBD-like request sequence against the engine on simulated storage, compared
//! with a flat in-memory model; then a power loss, a reopen, and the durability check
//! of RELIABILITY.md §4 (the approach of crates/cowdisk-core/tests/crash.rs).
//!
//! Input: `config:u8 crash:u8 mode:u8 seed:u64`, then requests of `op:u8 off:u32
//! len:u16 seed:u8` until the input ends (at most [`MAX_OPS`]). `config` picks the
//! geometry (1 to 16 blocks of 4 or 8 KiB, the last block possibly short) and whether a
//! sealed base lies under the top; `crash` either loses power before a sync or makes
//! an I/O call fail (see `plan`).

use std::path::PathBuf;
use std::sync::Arc;

use cowdisk_core::sim::{CrashMode, FailPlan, SimWorld};
use cowdisk_core::{
    Access, Disk, IoError, IoErrorKind, OpenError, ReadStorage, Storage, WriteFlags, ZeroFlags,
};

use crate::input::Input;
use crate::start::{self, pattern, Start};

/// Requests per input: enough for interesting interleavings, short enough to stay fast.
pub const MAX_OPS: usize = 64;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write { seed: u64 },
    Zeroes { no_hole: bool, fast: bool },
    Discard,
    Flush,
    Read,
    Reopen,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
    fua: bool,
}

impl Op {
    /// `op` bits: 0-2 kind, 3 block-aligned, 4 FUA, 5 NO_HOLE, 6 FAST_ZERO.
    fn decode(inp: &mut Input, size: u64, bs: u64, i: usize) -> Op {
        let op = inp.u8();
        let mut off = u64::from(inp.u32()) % size;
        let mut len = 1 + u64::from(inp.u16()) % (2 * bs);
        let seed = u64::from(inp.u8());
        if op & 8 != 0 {
            off -= off % bs;
            len = len.div_ceil(bs) * bs;
        }
        len = len.min(size - off);
        let kind = match op & 7 {
            0 | 1 => Kind::Write {
                seed: seed << 32 | i as u64,
            },
            2 => Kind::Zeroes {
                no_hole: op & 32 != 0,
                fast: op & 64 != 0,
            },
            3 => Kind::Discard,
            4 => Kind::Flush,
            5 => Kind::Read,
            _ => Kind::Reopen,
        };
        Op {
            kind,
            off,
            len,
            fua: op & 16 != 0,
        }
    }
}

/// The flat model: what the disk reads now, what it must read after power loss, and
/// per block every value written since the last completed flush.
struct Model {
    bs: u64,
    cur: Vec<u8>,
    durable: Vec<u8>,
    since: Vec<Vec<Vec<u8>>>,
}

/// How much a crash mode lets a block with writes in flight vary (as in crash.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// All-or-nothing: the durable value or one written since.
    Exact,
    /// Reordered, never garbled: each byte from the durable value or a write since.
    Bytes,
    /// Garbage possible where writes were in flight.
    Loose,
}

impl Model {
    fn new(s: &Start) -> Model {
        // The unit a crash keeps whole: the block, or inside a partial block (the
        // engine's default) the sub-block, as in crash.rs and reliability rule R2.
        let unit = (s.bs / 32).clamp(4096, s.bs);
        Model {
            bs: unit,
            cur: s.content.clone(),
            durable: s.content.clone(),
            since: vec![Vec::new(); s.content.len().div_ceil(unit as usize)],
        }
    }
    fn block(&self, v: &[u8], b: u64) -> std::ops::Range<usize> {
        let s = (b * self.bs) as usize;
        s..(s + self.bs as usize).min(v.len())
    }
    fn apply(&mut self, op: &Op) {
        let r = op.off as usize..(op.off + op.len) as usize;
        match op.kind {
            Kind::Write { seed } => pattern(seed, &mut self.cur[r]),
            Kind::Zeroes { .. } | Kind::Discard => self.cur[r].fill(0),
            Kind::Flush | Kind::Read | Kind::Reopen => return,
        }
        for b in op.off / self.bs..(op.off + op.len).div_ceil(self.bs) {
            let v = self.cur[self.block(&self.cur, b)].to_vec();
            self.since[b as usize].push(v);
        }
    }
    /// After a process kill (the page cache survives, the engine's unflushed in-memory
    /// map does not), each block reads its durable value or one written since, as after
    /// a power loss that kept every write. What it reads becomes the current value; the
    /// values written since stay possible after a later power loss.
    /// A read error (injected faults) is returned, a disallowed value panics.
    fn restart(&mut self, disk: &Disk) -> Result<(), String> {
        for b in 0..self.since.len() as u64 {
            let r = self.block(&self.cur, b);
            let mut got = vec![0u8; r.len()];
            if let Err(e) = disk.read(r.start as u64, &mut got) {
                return Err(format!("read block {b} after a restart: {e}"));
            }
            if let Err(e) = self.check(b, &got, Level::Exact) {
                panic!("after a restart: {e}");
            }
            self.cur[r].copy_from_slice(&got);
        }
        Ok(())
    }
    fn commit(&mut self) {
        self.durable.clone_from(&self.cur);
        self.since.iter_mut().for_each(Vec::clear);
    }
    fn check(&self, b: u64, got: &[u8], level: Level) -> Result<(), String> {
        let d = &self.durable[self.block(&self.durable, b)];
        let w = &self.since[b as usize];
        if got == d {
            return Ok(());
        }
        if w.is_empty() {
            return Err(format!(
                "block {b}: no write since its last flush, yet it changed"
            ));
        }
        let ok = match level {
            Level::Loose => true,
            _ if w.iter().any(|v| v == got) => true,
            Level::Exact => false,
            Level::Bytes => {
                (0..got.len()).all(|i| got[i] == d[i] || w.iter().any(|v| v[i] == got[i]))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "block {b} reads bytes never written to it ({level:?}, {} writes since)",
                w.len()
            ))
        }
    }
}

fn world_of(s: &Start) -> Arc<SimWorld> {
    let w = SimWorld::new();
    if let Some(base) = &s.base {
        w.from_bytes(base.clone());
    }
    w.from_bytes(s.top.clone());
    w
}

fn open(world: &Arc<SimWorld>, s: &Start) -> Result<Disk, OpenError> {
    let top_id = usize::from(s.base.is_some());
    let top: Arc<dyn Storage> = world.file(top_id);
    let lowers = match s.base {
        Some(_) => vec![(
            world.file(0) as Arc<dyn ReadStorage>,
            PathBuf::from("base.cow"),
        )],
        None => Vec::new(),
    };
    Disk::open_storages((top, PathBuf::from("top.cow")), lowers, Access::ReadWrite)
}

/// What one request did.
enum Outcome {
    Done,
    /// A fast zero declined: the disk is unchanged, as NBD's `FAST_ZERO` promises.
    Declined,
    /// It failed: the error's kind (none for a failed reopen) and text.
    Failed(Option<IoErrorKind>, String),
}

/// Runs one request; reads are compared with the model at once.
fn exec(disk: &mut Disk, op: &Op, model: &Model, world: &Arc<SimWorld>, s: &Start) -> Outcome {
    let res: Result<(), IoError> = match op.kind {
        Kind::Write { seed } => {
            let mut data = vec![0u8; op.len as usize];
            pattern(seed, &mut data);
            disk.write(op.off, &data, WriteFlags { fua: op.fua })
        }
        Kind::Zeroes { no_hole, fast } => {
            let flags = ZeroFlags {
                fua: op.fua,
                no_hole,
                fast,
            };
            match disk.write_zeroes(op.off, op.len, flags) {
                Err(IoError::NotFast) if fast => return Outcome::Declined,
                r => r,
            }
        }
        Kind::Discard => disk.discard(op.off, op.len, WriteFlags { fua: op.fua }),
        Kind::Flush => disk.flush(),
        Kind::Read => {
            let mut got = vec![0u8; op.len as usize];
            disk.read(op.off, &mut got).map(|()| {
                let want = &model.cur[op.off as usize..(op.off + op.len) as usize];
                assert!(got == want, "{op:?} differs from the model");
            })
        }
        // A process kill and restart; see `Model::restart`.
        Kind::Reopen => match open(world, s) {
            Ok(d) => {
                *disk = d;
                Ok(())
            }
            Err(e) => return Outcome::Failed(None, format!("reopen: {e}")),
        },
    };
    match res {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Failed(Some(e.kind()), e.to_string()),
    }
}

/// Either power fails before a sync, or (high bit of `crash`) the storage fails: the
/// `crash & 63`-th I/O call after open (only syncs counted with bit 6), with ENOSPC
/// or EIO (`mode` bit 6), once or from then on (`mode` bit 7), as RELIABILITY.md E1-E3.
fn plan(world: &SimWorld, crash: u8, mode: u8) -> Option<i32> {
    if crash & 0x80 != 0 {
        let errno = if mode & 0x40 != 0 { 28 } else { 5 };
        world.fail(Some(FailPlan {
            call: world.calls() + u64::from(crash & 0x3f),
            errno,
            sticky: mode & 0x80 != 0,
            syncs_only: crash & 0x40 != 0,
        }));
        return Some(errno);
    }
    if crash > 0 {
        world.crash_before_sync(u64::from(crash) - 1);
    }
    None
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let config = inp.u8();
    let crash = inp.u8();
    let mode_byte = inp.u8();
    let mode_seed = inp.u64();
    let bs: u32 = if config & 16 != 0 { 8192 } else { 4096 };
    let blocks = u64::from(config & 15) + 1;
    // Geometry clamped to 16 blocks: the model and the simulated files live in memory.
    let size = (blocks * u64::from(bs) - u64::from((config >> 5) & 3) * 512).max(512);
    let s = start::get(size, bs, config & 128 != 0);
    let world = world_of(&s);
    let mut disk = open(&world, &s).unwrap_or_else(|e| panic!("fresh chain: {e}"));
    let fault = plan(&world, crash, mode_byte);
    let mut model = Model::new(&s);
    // FUZZ_TRACE=1 when replaying a finding prints the decoded requests.
    let trace = std::env::var_os("FUZZ_TRACE").is_some();
    if trace {
        eprintln!(
            "size {size} bs {bs} base {} crash {crash:#x} mode {mode_byte:#x}",
            s.base.is_some()
        );
    }
    for i in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let op = Op::decode(&mut inp, size, s.bs, i);
        if trace {
            eprintln!("{i}: {op:?}");
        }
        match exec(&mut disk, &op, &model, &world, &s) {
            Outcome::Done => {}
            Outcome::Declined => continue,
            Outcome::Failed(kind, e) => {
                let Some(errno) = fault else {
                    panic!("{op:?} failed on healthy storage: {e}")
                };
                let want = if errno == 28 {
                    IoErrorKind::NoSpace
                } else {
                    IoErrorKind::Io
                };
                assert!(
                    kind.is_none_or(|k| k == want),
                    "{op:?}: {e} is not {want:?}"
                );
                // A failed request may or may not have taken effect.
                model.apply(&op);
                world.fail(None);
                break;
            }
        }
        if matches!(op.kind, Kind::Reopen) {
            if let Err(e) = model.restart(&disk) {
                assert!(fault.is_some(), "{e}");
                world.fail(None);
                break;
            }
        }
        model.apply(&op);
        if world.crashed() {
            break;
        }
        if matches!(op.kind, Kind::Flush) || op.fua && !matches!(op.kind, Kind::Read | Kind::Reopen)
        {
            model.commit();
        }
    }
    world.fail(None);
    drop(disk);
    let (mode, level) = crash_mode(mode_byte, mode_seed);
    let after = world.after_crash(mode);
    if let Err(e) = verify(&s, &after, &model, level) {
        panic!("after {mode:?}: {e}");
    }
}

fn crash_mode(b: u8, seed: u64) -> (CrashMode, Level) {
    match b % 6 {
        0 => (CrashMode::DropAll, Level::Exact),
        1 => (CrashMode::KeepAll, Level::Exact),
        2 => (CrashMode::Reorder(seed), Level::Bytes),
        3 => (CrashMode::RandomSubset(seed), Level::Loose),
        4 => (CrashMode::Torn { sector: 512, seed }, Level::Loose),
        _ => (CrashMode::Torn { sector: 4096, seed }, Level::Loose),
    }
}

/// After power loss: the base is untouched, the chain opens, every block reads a value
/// the model allows, and the recovered disk keeps a flushed write across a reopen.
fn verify(s: &Start, after: &Arc<SimWorld>, model: &Model, level: Level) -> Result<(), String> {
    if let Some(base) = &s.base {
        if after.live(0) != *base {
            return Err("the sealed base layer changed".into());
        }
    }
    let disk = open(after, s).map_err(|e| format!("chain does not open: {e}"))?;
    let mut all = vec![0u8; s.size as usize];
    for b in 0..s.size.div_ceil(model.bs) {
        let r = model.block(&all, b);
        let got = &mut all[r.clone()];
        disk.read(r.start as u64, got)
            .map_err(|e| format!("read block {b}: {e}"))?;
        model.check(b, got, level)?;
    }
    // Recovery: a partial write into every other block, flushed, survives a reopen.
    for b in (0..s.size.div_ceil(s.bs)).step_by(2) {
        let off = b * s.bs + 7;
        let n = 100.min(s.size.saturating_sub(off)) as usize;
        if n == 0 {
            continue;
        }
        disk.write(off, &[0xa5; 100][..n], WriteFlags::default())
            .map_err(|e| format!("write after recovery: {e}"))?;
        all[off as usize..off as usize + n].fill(0xa5);
    }
    disk.flush()
        .map_err(|e| format!("flush after recovery: {e}"))?;
    drop(disk);
    let disk = open(after, s).map_err(|e| format!("reopen after recovery: {e}"))?;
    let mut got = vec![0u8; s.size as usize];
    disk.read(0, &mut got)
        .map_err(|e| format!("read after recovery: {e}"))?;
    if got != all {
        return Err("writes flushed after recovery did not survive a reopen".into());
    }
    Ok(())
}
