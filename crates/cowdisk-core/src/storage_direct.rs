//! Layer files read and written with `O_DIRECT` (`serve --cache=none`): the host keeps no
//! second page cache under the guest's own.
//!
//! Direct I/O needs file offsets, lengths and memory aligned to the device's logical
//! block. The engine's requests are not always aligned (a client's 512-byte write, a piece
//! of a block), so those go through an aligned bounce buffer, and an unaligned write reads
//! the 4 KiB pages it covers in part, changes them and writes them back. Every write takes
//! the locks of the 64 KiB stripes it touches first, so a read-modify-write never puts
//! back stale bytes over a concurrent write to another part of the same page.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{FileStorage, ReadStorage, Storage};

/// Alignment of direct I/O: 4 KiB covers devices with 512-byte and 4 KiB sectors.
pub const DIRECT_ALIGN: u64 = 4096;

/// Write locks, by 64 KiB stripe of the file (hashed).
const STRIPES: usize = 256;
const STRIPE_BYTES: u64 = 64 * 1024;

/// A layer file opened for direct I/O.
pub struct DirectStorage {
    /// The same file with `O_DIRECT`; `inner`'s own descriptor keeps its lock and serves
    /// the calls that move no data (length, holes, allocation, sync).
    file: File,
    inner: Inner,
    stripes: Box<[Mutex<()>]>,
}

enum Inner {
    Top(FileStorage),
    Lower(Arc<dyn ReadStorage>),
}

impl DirectStorage {
    /// The top layer `file`, switched to direct I/O (its lock is on the same open file).
    pub fn top(file: File) -> io::Result<DirectStorage> {
        let direct = file.try_clone()?;
        set_direct(&direct)?;
        Ok(DirectStorage::with(
            direct,
            Inner::Top(FileStorage::new(file)),
        ))
    }

    /// A sealed layer opened by a source; `None` if it has no file (a remote layer).
    /// Reopens the file, so that the source's descriptor (and the lock on it) is
    /// untouched.
    pub fn lower(storage: Arc<dyn ReadStorage>) -> Option<io::Result<DirectStorage>> {
        let fd = storage.fd()?;
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        Some(
            File::open(path)
                .and_then(|f| set_direct(&f).map(|()| f))
                .map(|f| DirectStorage::with(f, Inner::Lower(storage))),
        )
    }

    fn with(file: File, inner: Inner) -> DirectStorage {
        DirectStorage {
            file,
            inner,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    fn plain(&self) -> &dyn ReadStorage {
        match &self.inner {
            Inner::Top(f) => f,
            Inner::Lower(s) => &**s,
        }
    }

    /// Locks the stripes `[start, end)` touches, in one order (no deadlock).
    fn lock(&self, start: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = (start / STRIPE_BYTES..end.div_ceil(STRIPE_BYTES))
            .map(|s| (s % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

fn set_direct(f: &File) -> io::Result<()> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let fl = fcntl_getfl(f)?;
    fcntl_setfl(f, fl | OFlags::DIRECT).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            "the file system does not support direct I/O (--cache=none)",
        )
    })
}

/// The aligned window around `[off, off + len)`.
fn window(off: u64, len: usize) -> (u64, u64) {
    let start = off / DIRECT_ALIGN * DIRECT_ALIGN;
    let end = (off + len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    (start, end)
}

fn aligned(off: u64, buf: &[u8]) -> bool {
    off.is_multiple_of(DIRECT_ALIGN)
        && (buf.len() as u64).is_multiple_of(DIRECT_ALIGN)
        && (buf.as_ptr() as u64).is_multiple_of(DIRECT_ALIGN)
}

/// A heap buffer whose usable part starts on an aligned address.
struct Bounce {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize) -> io::Result<Bounce> {
        let buf = vec![0u8; len + DIRECT_ALIGN as usize];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN as usize);
        if start > DIRECT_ALIGN as usize {
            return Err(io::Error::other("no aligned buffer for direct I/O"));
        }
        Ok(Bounce { buf, start, len })
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Reads into `buf` from `off` until it is full or the file ends; the bytes read.
fn read_upto(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl ReadStorage for DirectStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if aligned(offset, buf) {
            return self.file.read_exact_at(buf, offset);
        }
        let (start, end) = window(offset, buf.len());
        let mut b = Bounce::new((end - start) as usize)?;
        let n = read_upto(&self.file, b.get(), start)?;
        let from = (offset - start) as usize;
        if n < from + buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&b.get()[from..from + buf.len()]);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.plain().len()
    }

    fn allocated_bytes(&self) -> u64 {
        self.plain().allocated_bytes()
    }

    fn data_after(&self, offset: u64) -> io::Result<Option<u64>> {
        self.plain().data_after(offset)
    }

    /// The layer's own descriptor, for its lock and identity. Bytes do not move through it
    /// (see [`ReadStorage::moves_data_by_fd`]).
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.plain().fd()
    }

    /// No `sendfile` or `copy_file_range` from a direct file: they would go through the
    /// page cache this mode keeps empty.
    fn moves_data_by_fd(&self) -> bool {
        false
    }

    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}

impl Storage for DirectStorage {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = window(offset, buf.len());
        let _locks = self.lock(start, end);
        if aligned(offset, buf) {
            return self.file.write_all_at(buf, offset);
        }
        let mut b = Bounce::new((end - start) as usize)?;
        let a = DIRECT_ALIGN as usize;
        let w = b.get();
        let (from, to) = (
            (offset - start) as usize,
            (offset - start) as usize + buf.len(),
        );
        // Pages covered in part keep their other bytes (zeros past the end of the file).
        if from % a != 0 {
            read_upto(&self.file, &mut w[..a], start)?;
        }
        if to % a != 0 && (to / a != from / a || from % a == 0) {
            let last = w.len() - a;
            read_upto(&self.file, &mut w[last..], start + last as u64)?;
        }
        w[from..to].copy_from_slice(buf);
        self.file.write_all_at(w, start)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?.punch_hole(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?.allocate(offset, len)
    }
}

impl DirectStorage {
    fn writable(&self) -> io::Result<&FileStorage> {
        match &self.inner {
            Inner::Top(f) => Ok(f),
            Inner::Lower(_) => Err(io::Error::other("a sealed layer is never written")),
        }
    }
}
