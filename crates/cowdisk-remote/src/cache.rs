//! The host-wide block cache: one sparse file per layer object, named by the layer's
//! content (UUID and seal digest), so every process and every clone on the host that
//! reads the layer shares it, whatever bucket it came from.
//!
//! Block of rank *k* (its position among the layer's data blocks) lives at
//! `k × block_size`. There is no index to keep consistent: every read from the cache is
//! checked against the block's CRC from the object's metadata, so a block never written
//! (a hole reads as zeros), a torn write after a crash, or a region punched by another
//! process's eviction is simply a miss and is fetched again, never served. Writes are
//! not synced for the same reason: a lost write is a miss.
//!
//! Bounded: after every `limit / 16` bytes written by this process, the allocated size of
//! the cache folder is summed and, while it exceeds the limit, the least recently written
//! files are emptied with hole punches (not unlinked, so processes that have them open
//! keep sharing one file and see the punched blocks as misses).
//!
//! Warm reads skip the CRC: a process remembers which blocks it verified, and an
//! *eviction generation* (`v2.evictions` beside the folder, a seqlock across processes)
//! tells it when that memory may be stale. An evictor takes the file's lock, makes the
//! count odd, punches, makes it even. A block verified while the count read the same even
//! value before and after, and read later while the count still has that value, cannot
//! have been punched in between; otherwise the read is redone with the CRC. Other writes
//! to a cache file only ever store the same verified bytes, so they cannot change a block.
//! A block this process wrote, with the count the same even value before and after the
//! write, counts as verified too. Bytes sent by descriptor are checked the same way after
//! they were read into a pipe and before they leave it: a punch takes the pages out of
//! the file without changing them, and a refill writes new ones.
//!
//! Trust: the cache folder is created 0700. CRC-32 detects damage, not forgery, so the
//! folder must not be writable by anyone the host does not trust with its disks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::log::log;

/// Default bound of the cache folder.
pub const DEFAULT_CACHE_SIZE: u64 = 8 << 30;

/// The cache folder and its bound; shared by every layer in the process.
#[derive(Debug)]
pub struct CacheDir {
    root: PathBuf,
    limit: u64,
    written: AtomicU64,
    warned: AtomicBool,
    /// The last write failed (a full file system): readahead is pointless until one
    /// succeeds again.
    failing: AtomicBool,
    /// The eviction generation's file; `None` if it cannot be opened (then every cached
    /// read is checked against its CRC).
    generation: Option<File>,
    /// Held while this process evicts: the file lock is per open file, so it cannot tell
    /// this process's threads apart.
    evicting: Mutex<()>,
}

/// Where the cache lives when nothing says: `$COWDISK_CACHE_DIR`, else the user's cache
/// folder (`$XDG_CACHE_HOME/cowdisk`, `~/.cache/cowdisk`), else `/var/tmp/cowdisk-cache`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("COWDISK_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("cowdisk")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/cowdisk")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp/cowdisk-cache"))
}

impl CacheDir {
    /// A cache in `root` (created 0700 if missing) bounded to `limit` bytes.
    pub fn new(root: &Path, limit: u64) -> std::io::Result<Arc<CacheDir>> {
        let generation = root.join("v2.evictions");
        let root = root.join("v2");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        let generation = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(generation)
            .ok();
        Ok(Arc::new(CacheDir {
            root,
            limit,
            written: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            generation,
            evicting: Mutex::new(()),
        }))
    }

    /// The eviction generation if no eviction is under way (an even count), else `None`.
    /// An odd count left by an evictor that died is made even here (its lock is free).
    pub fn generation(&self) -> Option<u64> {
        let f = self.generation.as_ref()?;
        let g = read_count(f)?;
        if g % 2 == 0 {
            return Some(g);
        }
        let _evicting = self.evicting.try_lock().ok()?;
        let _lock = GenLock::try_new(f)?;
        let g = read_count(f)?;
        if g % 2 == 1 {
            f.write_all_at(&(g + 1).to_le_bytes(), 0).ok()?;
        }
        Some(g + g % 2)
    }

    /// The folder holding the cache files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens (creating it if needed) the cache file of the layer named `name`, sized for
    /// `len` bytes. `None` if the cache cannot be used (it is then bypassed, with one
    /// warning per process).
    pub fn open(self: &Arc<Self>, name: &str, len: u64) -> Option<CacheFile> {
        let path = self.root.join(format!("{name}.blocks"));
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|f| {
                if f.metadata()?.len() < len {
                    f.set_len(len)?;
                }
                Ok(f)
            });
        match r {
            Ok(file) => Some(CacheFile {
                dir: self.clone(),
                file,
            }),
            Err(e) => {
                self.warn(&format!(
                    "cache {}: {e}; reading without the cache",
                    path.display()
                ));
                None
            }
        }
    }

    fn warn(&self, msg: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log(msg);
        }
    }

    fn note_written(&self, n: u64) {
        let step = (self.limit / 16).max(1 << 20);
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        if (before + n) / step != before / step {
            self.enforce();
        }
    }

    /// Empties the least recently written cache files until the folder fits the limit.
    pub fn enforce(&self) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut files: Vec<(i64, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let ours = e.file_name().to_string_lossy().ends_with(".blocks");
                (m.is_file() && ours).then(|| (m.mtime(), m.blocks() * 512, e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= self.limit {
            return;
        }
        // Readers that skip the CRC must see that blocks may have gone: odd while punching.
        let Some(gen_file) = &self.generation else {
            return;
        };
        let _evicting = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let Some(_lock) = GenLock::new(gen_file) else {
            return;
        };
        let Some(g) = read_count(gen_file) else {
            return;
        };
        let odd = g | 1;
        if gen_file.write_all_at(&odd.to_le_bytes(), 0).is_err() {
            return;
        }
        files.sort();
        for (_, size, path) in files {
            if total <= self.limit {
                break;
            }
            if let Ok(f) = OpenOptions::new().write(true).open(&path) {
                if punch(&f, 0, f.metadata().map(|m| m.len()).unwrap_or(0)).is_ok() {
                    total = total.saturating_sub(size);
                }
            }
        }
        // If this write fails the count stays odd until a reader repairs it.
        let _ = gen_file.write_all_at(&(odd + 1).to_le_bytes(), 0);
    }
}

/// The count in the generation file (a missing or short file counts as 0).
fn read_count(f: &File) -> Option<u64> {
    let mut b = [0u8; 8];
    match f.read_at(&mut b, 0) {
        Ok(8) => Some(u64::from_le_bytes(b)),
        Ok(_) => Some(0),
        Err(_) => None,
    }
}

/// The generation file's exclusive lock, held while evicting (released on drop, or by
/// the kernel if the evictor dies).
struct GenLock<'a>(&'a File);

impl<'a> GenLock<'a> {
    fn new(f: &'a File) -> Option<Self> {
        use rustix::fs::{flock, FlockOperation};
        flock(f, FlockOperation::LockExclusive).ok()?;
        Some(GenLock(f))
    }

    fn try_new(f: &'a File) -> Option<Self> {
        use rustix::fs::{flock, FlockOperation};
        flock(f, FlockOperation::NonBlockingLockExclusive).ok()?;
        Some(GenLock(f))
    }
}

impl Drop for GenLock<'_> {
    fn drop(&mut self) {
        use rustix::fs::{flock, FlockOperation};
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

fn punch(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(
        f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        off,
        len,
    )?;
    Ok(())
}

/// One layer's cache file.
#[derive(Debug)]
pub struct CacheFile {
    dir: Arc<CacheDir>,
    file: File,
}

impl CacheFile {
    /// Reads the block at `off` into `buf` if the cache holds it intact (its CRC is
    /// `crc`); false on a miss, a torn entry or any read error.
    pub fn read(&self, buf: &mut [u8], off: u64, crc: u32) -> bool {
        self.file.read_exact_at(buf, off).is_ok() && crc32fast::hash(buf) == crc
    }

    /// A cheap guess whether the `len` bytes at `off` are cached: not all a hole (never
    /// written, or punched), by `SEEK_DATA`, without reading them. A guess only decides
    /// whether to look closer or to fetch: a wrong "no" costs a fetch, a wrong "yes" a
    /// CRC check that then fails.
    pub fn probably_holds(&self, off: u64, len: usize) -> bool {
        use rustix::fs::{seek, SeekFrom};
        match seek(&self.file, SeekFrom::Data(off)) {
            Ok(d) => d < off + len as u64,
            Err(rustix::io::Errno::NXIO) => false,
            Err(_) => true,
        }
    }

    /// Reads cached bytes at `off` without checking them: only for blocks this process
    /// verified under the current eviction generation (see the module's comment).
    pub fn read_trusted(&self, buf: &mut [u8], off: u64) -> bool {
        self.file.read_exact_at(buf, off).is_ok()
    }

    /// The folder's eviction generation (see [`CacheDir::generation`]).
    pub fn generation(&self) -> Option<u64> {
        self.dir.generation()
    }

    /// The cache file, for reads that move its bytes by descriptor (they must check the
    /// generation after reading, as [`CacheFile::read_trusted`]'s callers do).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Stores a verified block; failures (a full file system) only mean no caching.
    /// True if it was stored.
    pub fn write(&self, buf: &[u8], off: u64) -> bool {
        match self.file.write_all_at(buf, off) {
            Ok(()) => {
                self.dir.failing.store(false, Ordering::Relaxed);
                self.dir.note_written(buf.len() as u64);
                true
            }
            Err(e) => {
                self.dir.failing.store(true, Ordering::Relaxed);
                self.dir.warn(&format!(
                    "cache {}: {e}; fetching without caching",
                    self.dir.root.display()
                ));
                false
            }
        }
    }

    /// True while writes to the cache succeed (readahead has somewhere to go).
    pub fn healthy(&self) -> bool {
        !self.dir.failing.load(Ordering::Relaxed)
    }
}
