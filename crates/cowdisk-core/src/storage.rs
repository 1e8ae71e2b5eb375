//! The narrow storage trait every layer sits on, and its file implementation.
//!
//! Six calls are all the engine needs from a file, so tests can swap in the
//! crash-simulating `SimStorage` (feature `sim`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

/// Zeros to write, as large as the largest block. Static and never written, so its pages
/// are the kernel's shared zero page: no memory per disk (a zeroed buffer per clone was
/// most of what an idle clone cost) and no allocation per write.
pub(crate) static ZERO_BLOCK: [u8; crate::format::MAX_BLOCK_SIZE as usize] =
    [0; crate::format::MAX_BLOCK_SIZE as usize];

/// Positional, exact reads from one layer file: all a sealed layer needs, so a source
/// of read-only layers (a file today, an object store next) implements no writes.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait ReadStorage: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Current length.
    fn len(&self) -> io::Result<u64>;
    /// Bytes actually allocated (for `info`); 0 where unknown.
    fn allocated_bytes(&self) -> u64 {
        0
    }
    /// The first offset at or after `offset` that may hold data (`None`: only holes
    /// follow), so metadata in never-written holes is skipped unread. Where holes are
    /// unknown every offset may hold data.
    fn data_after(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }
    /// The open file, for callers that move bytes without copying them (`sendfile`);
    /// `None` where there is no real file.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// True if callers may move this file's bytes by its descriptor (`sendfile`,
    /// `copy_file_range`) instead of reading them; false for direct I/O.
    fn moves_data_by_fd(&self) -> bool {
        true
    }
    /// The descriptor opened with `O_DIRECT` that this file's bytes are read through,
    /// where there is one (`serve --cache=none`).
    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// True if a read may wait on the network (an object store), taking milliseconds
    /// where a local file takes microseconds.
    fn may_wait_on_network(&self) -> bool {
        false
    }
    /// True if every read of a data block returns only bytes already checked against
    /// the block CRCs this storage presents (a source that verifies on arrival): the
    /// engine then does not read a whole block to check it again before a partial read.
    fn verifies_reads(&self) -> bool {
        false
    }
    /// A local file holding some of this storage's bytes (a cache), for reads that move
    /// bytes by descriptor: appends where the `len` bytes at `offset` are in it, as (file
    /// offset, length) runs, and returns that file and a token; `None`, appending nothing,
    /// when they are not all there now or a copy would cost less. What is read from the
    /// file is good only if [`ReadStorage::staged_valid`] accepts the token afterwards (a
    /// cache may drop bytes meanwhile); else read them again with `read_at`.
    fn staged(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Option<(BorrowedFd<'_>, u64)> {
        let _ = (offset, len, out);
        None
    }
    /// See [`ReadStorage::staged`].
    fn staged_valid(&self, token: u64) -> bool {
        let _ = token;
        false
    }
}

/// What [`Storage::copy_range_from`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Every byte.
    Done,
    /// Nothing: this storage will not copy from that one this way; do not ask again.
    Refused,
    /// Part (an unaligned rest the kernel would not share): copy the rest otherwise.
    Partly,
}

/// Positional, exact I/O on a writable layer file.
pub trait Storage: ReadStorage {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Sets the length (sparse extension).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write and punch durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a range; it reads as zeros afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reserves space for a range (without changing what it reads), so later writes into
    /// it need no allocation. Where that cannot be reserved, does nothing.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Copies `len` bytes of `src` at `from` to `to` in this file without moving them
    /// through the caller (`copy_file_range`, which shares the extents where
    /// [`Storage::shares_extents`]). By default nothing copies this way.
    fn copy_range_from(
        &self,
        src: &dyn ReadStorage,
        from: u64,
        to: u64,
        len: u64,
    ) -> io::Result<Copied> {
        let _ = (src, from, to, len);
        Ok(Copied::Refused)
    }
    /// True where [`Storage::copy_range_from`] shares extents instead of copying bytes,
    /// so a copy costs metadata only.
    fn shares_extents(&self) -> bool {
        false
    }
}

/// A real file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> FileStorage {
        FileStorage { file }
    }
    /// The file, for locking and metadata.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ReadStorage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
    fn data_after(&self, offset: u64) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(d) => Ok(Some(d)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            // No SEEK_DATA here: every offset may hold data.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(Some(offset)),
            Err(e) => Err(e.into()),
        }
    }
}

impl Storage for FileStorage {
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len) {
            // File systems that cannot reserve space allocate on write, as before.
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => Ok(()),
            r => r.map_err(Into::into),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    /// `copy_file_range`, resumed until done. A refusal before any byte moved means the
    /// kernel will not copy between these files; after some did, only that an unaligned
    /// rest could not be done this way.
    fn copy_range_from(
        &self,
        src: &dyn ReadStorage,
        mut from: u64,
        mut to: u64,
        len: u64,
    ) -> io::Result<Copied> {
        use rustix::io::Errno;
        let Some(sfd) = src.fd().filter(|_| src.moves_data_by_fd()) else {
            return Ok(Copied::Refused);
        };
        let (start, end) = (to, to + len);
        while to < end {
            let want = (end - to) as usize;
            match rustix::fs::copy_file_range(sfd, Some(&mut from), &self.file, Some(&mut to), want)
            {
                Ok(0) => return Ok(Copied::Partly),
                Ok(_) | Err(Errno::INTR) => {}
                Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => {
                    return Ok(if to == start {
                        Copied::Refused
                    } else {
                        Copied::Partly
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Copied::Done)
    }
    fn shares_extents(&self) -> bool {
        fs_magic(self.file.as_fd()).is_some_and(|m| matches!(m, XFS_MAGIC | BTRFS_MAGIC))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // File systems without hole punching still get zeros: write them.
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZERO_BLOCK.len() as u64) as usize;
                    self.file.write_all_at(&ZERO_BLOCK[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// What a storage's file system tells of itself, for choices that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsFacts {
    /// The file system keeps files in memory (tmpfs, ramfs): a sync writes nothing.
    pub in_memory: bool,
    /// Bytes an unprivileged writer may still allocate there.
    pub free: u64,
}

/// [`FsFacts`] of the file system under `st`; `None` without a file descriptor or where
/// the kernel does not say.
pub fn fs_facts(st: &dyn ReadStorage) -> Option<FsFacts> {
    let fd = st.fd()?;
    let magic = fs_magic(fd)?;
    let space = rustix::fs::fstatvfs(fd).ok()?;
    Some(FsFacts {
        in_memory: matches!(magic, TMPFS_MAGIC | RAMFS_MAGIC),
        free: space.f_bavail.saturating_mul(space.f_frsize),
    })
}

// File system magic numbers (statfs(2)).
const XFS_MAGIC: u64 = 0x5846_5342;
const BTRFS_MAGIC: u64 = 0x9123_683e;
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// The magic number of the file system under `fd`.
fn fs_magic(fd: BorrowedFd<'_>) -> Option<u64> {
    rustix::fs::fstatfs(fd).ok().map(|s| s.f_type as u64)
}
