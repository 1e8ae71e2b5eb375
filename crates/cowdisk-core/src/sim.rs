//! A crash- and fault-simulating storage world for tests (docs/reliability.md, "Crash simulator").
//!
//! Each file keeps a `live` image (what reads see) and a `durable` image (what survives
//! power loss), plus the writes since its last sync. A world can lose power just before
//! its k-th sync, fail its N-th I/O call, and produce post-crash images that drop,
//! keep, garble or tear the unsynced writes.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, SeedableRng};

use crate::storage::{Copied, ReadStorage, Storage};

#[derive(Debug, Clone)]
enum Pending {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { off: u64, len: u64 },
}

#[derive(Debug, Clone, Default)]
struct FileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

/// When I/O calls fail.
#[derive(Debug, Clone, Copy)]
pub struct FailPlan {
    /// 0-based index of the first failing call (counted over all files).
    pub call: u64,
    /// errno to return (e.g. 5 = EIO, 28 = ENOSPC).
    pub errno: i32,
    /// Keep failing every later call too.
    pub sticky: bool,
    /// Only sync calls count and fail.
    pub syncs_only: bool,
}

#[derive(Debug, Default)]
struct World {
    files: Vec<FileState>,
    syncs: u64,
    calls: u64,
    crash_at: Option<u64>,
    crashed: bool,
    fail: Option<FailPlan>,
    /// Files copy ranges between them as the kernel would (see [`SimWorld::kernel_copy`]).
    kernel_copy: bool,
    /// Ranges copied that way.
    kernel_copies: u64,
}

/// What happens to writes that were not synced when the power failed.
#[derive(Debug, Clone, Copy)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropAll,
    /// Every unsynced write survives (a process kill: the page cache survives).
    KeepAll,
    /// Each unsynced write is kept, dropped, or replaced by garbage.
    RandomSubset(u64),
    /// Each unsynced write, punch or length change is independently kept or dropped,
    /// never garbled: the device reordered its cache. Every sector then holds a value
    /// that was written to it, which lets an oracle check sectors exactly.
    Reorder(u64),
    /// Each sector touched by an unsynced write is old, new or garbage.
    Torn {
        /// Sector size (512 or 4096).
        sector: u64,
        /// RNG seed.
        seed: u64,
    },
}

/// A set of simulated files sharing one power supply.
#[derive(Debug, Default)]
pub struct SimWorld {
    inner: Mutex<World>,
}

/// One simulated file.
#[derive(Debug)]
pub struct SimStorage {
    world: Arc<SimWorld>,
    id: usize,
}

impl SimWorld {
    /// A new world with no files.
    pub fn new() -> Arc<SimWorld> {
        Arc::new(SimWorld::default())
    }
    fn lock(&self) -> MutexGuard<'_, World> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Adds an empty file.
    pub fn create(self: &Arc<Self>) -> Arc<SimStorage> {
        self.from_bytes(Vec::new())
    }
    /// Adds a file with durable contents `bytes`.
    pub fn from_bytes(self: &Arc<Self>, bytes: Vec<u8>) -> Arc<SimStorage> {
        let mut w = self.lock();
        w.files.push(FileState {
            live: bytes.clone(),
            durable: bytes,
            pending: Vec::new(),
        });
        Arc::new(SimStorage {
            world: self.clone(),
            id: w.files.len() - 1,
        })
    }
    /// Power fails just before sync number `k` (0-based, over all files) takes effect.
    pub fn crash_before_sync(&self, k: u64) {
        self.lock().crash_at = Some(k);
    }
    /// Files copy ranges between them themselves, and say they share extents (as XFS
    /// and btrfs do): copy-ups then take the engine's in-kernel path, whose copied
    /// ranges are unsynced writes like any other until a sync.
    pub fn kernel_copy(&self, on: bool) {
        self.lock().kernel_copy = on;
    }
    /// Ranges copied by [`Storage::copy_range_from`] so far.
    pub fn kernel_copies(&self) -> u64 {
        self.lock().kernel_copies
    }
    /// Injects I/O failures.
    pub fn fail(&self, plan: Option<FailPlan>) {
        self.lock().fail = plan;
    }
    /// Syncs performed so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }
    /// I/O calls so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }
    /// True once the simulated power failure happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }
    /// The live bytes of file `id`.
    pub fn live(&self, id: usize) -> Vec<u8> {
        self.lock().files[id].live.clone()
    }
    /// The durable bytes of file `id`.
    pub fn durable(&self, id: usize) -> Vec<u8> {
        self.lock().files[id].durable.clone()
    }

    /// A new world holding what every file would contain after power loss now.
    pub fn after_crash(&self, mode: CrashMode) -> Arc<SimWorld> {
        let w = self.lock();
        let mut files = Vec::new();
        for (i, f) in w.files.iter().enumerate() {
            let img = crash_image(f, mode, i as u64);
            files.push(FileState {
                live: img.clone(),
                durable: img,
                pending: Vec::new(),
            });
        }
        Arc::new(SimWorld {
            inner: Mutex::new(World {
                files,
                kernel_copy: w.kernel_copy,
                ..World::default()
            }),
        })
    }

    /// Storage handle for file `id`.
    pub fn file(self: &Arc<Self>, id: usize) -> Arc<SimStorage> {
        Arc::new(SimStorage {
            world: self.clone(),
            id,
        })
    }
}

fn apply(img: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write { off, data } => {
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(l) => {
            let l = *l as usize;
            if l > img.len() {
                // Zeroed allocation + memcpy: far faster than `resize` in debug builds.
                img.append(&mut vec![0; l - img.len()]);
            } else {
                img.truncate(l);
            }
        }
        Pending::Punch { off, len } => {
            let s = (*off as usize).min(img.len());
            let e = ((*off + *len) as usize).min(img.len());
            img[s..e].fill(0);
        }
    }
}

fn crash_image(f: &FileState, mode: CrashMode, salt: u64) -> Vec<u8> {
    let mut img = f.durable.clone();
    match mode {
        CrashMode::DropAll => {}
        CrashMode::KeepAll => f.pending.iter().for_each(|p| apply(&mut img, p)),
        CrashMode::Reorder(seed) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9e37_79b9));
            for p in &f.pending {
                if rng.gen_bool(0.5) {
                    apply(&mut img, p);
                }
            }
        }
        CrashMode::RandomSubset(seed) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9e37_79b9));
            for p in &f.pending {
                match rng.gen_range(0..3) {
                    0 => apply(&mut img, p),
                    1 => {}
                    _ => {
                        if let Pending::Write { off, data } = p {
                            let garbage: Vec<u8> = (0..data.len()).map(|_| rng.gen()).collect();
                            apply(
                                &mut img,
                                &Pending::Write {
                                    off: *off,
                                    data: garbage,
                                },
                            );
                        } else {
                            apply(&mut img, p);
                        }
                    }
                }
            }
        }
        CrashMode::Torn { sector, seed } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ salt.wrapping_mul(0x9e37_79b9));
            for p in &f.pending {
                let Pending::Write { off, data } = p else {
                    if rng.gen_bool(0.5) {
                        apply(&mut img, p);
                    }
                    continue;
                };
                let end = off + data.len() as u64;
                let mut s = off / sector * sector;
                while s < end {
                    let a = s.max(*off);
                    let b = (s + sector).min(end);
                    let piece = &data[(a - off) as usize..(b - off) as usize];
                    match rng.gen_range(0..3) {
                        0 => apply(
                            &mut img,
                            &Pending::Write {
                                off: a,
                                data: piece.to_vec(),
                            },
                        ),
                        1 => {}
                        _ => {
                            // Garbage over the whole sector, as a torn device write leaves it.
                            let g: Vec<u8> = (0..sector).map(|_| rng.gen()).collect();
                            apply(&mut img, &Pending::Write { off: s, data: g });
                        }
                    }
                    s += sector;
                }
            }
        }
    }
    img
}

impl SimStorage {
    /// This file's index in its world.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Counts a call and applies the failure plan.
    fn enter(&self, is_sync: bool) -> io::Result<MutexGuard<'_, World>> {
        let mut w = self.world.lock();
        if let Some(plan) = w.fail {
            if !plan.syncs_only || is_sync {
                let n = w.calls;
                w.calls += 1;
                if n == plan.call || (plan.sticky && n > plan.call) {
                    return Err(io::Error::from_raw_os_error(plan.errno));
                }
            }
        } else {
            w.calls += 1;
        }
        Ok(w)
    }

    fn record(&self, w: &mut World, p: Pending) {
        let crashed = w.crashed;
        let f = &mut w.files[self.id];
        apply(&mut f.live, &p);
        if !crashed {
            f.pending.push(p);
        }
    }
}

impl ReadStorage for SimStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let w = self.enter(false)?;
        let live = &w.files[self.id].live;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        if end > live.len() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of file",
            ));
        }
        buf.copy_from_slice(&live[offset as usize..end as usize]);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let w = self.world.lock();
        Ok(w.files[self.id].live.len() as u64)
    }
}

impl Storage for SimStorage {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut w = self.enter(false)?;
        self.record(
            &mut w,
            Pending::Write {
                off: offset,
                data: buf.to_vec(),
            },
        );
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut w = self.enter(false)?;
        self.record(&mut w, Pending::SetLen(len));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut w = self.enter(true)?;
        if w.crashed {
            return Ok(());
        }
        if w.crash_at == Some(w.syncs) {
            w.crashed = true;
            return Ok(());
        }
        w.syncs += 1;
        let f = &mut w.files[self.id];
        f.durable = f.live.clone();
        f.pending.clear();
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut w = self.enter(false)?;
        self.record(&mut w, Pending::Punch { off: offset, len });
        Ok(())
    }
    fn copy_range_from(
        &self,
        src: &dyn ReadStorage,
        from: u64,
        to: u64,
        len: u64,
    ) -> io::Result<Copied> {
        {
            let mut w = self.world.lock();
            if !w.kernel_copy {
                return Ok(Copied::Refused);
            }
            w.kernel_copies += u64::from(len > 0);
        }
        let mut data = vec![0u8; len as usize];
        src.read_at(&mut data, from)?;
        self.write_at(&data, to)?;
        Ok(Copied::Done)
    }
    fn shares_extents(&self) -> bool {
        self.world.lock().kernel_copy
    }
}
