//! The NBD backend over a served image ([`LiveDisk`]): maps requests and errors between
//! the two crates, takes the write gate for requests that change the disk and counts them.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, RwLockReadGuard};
use std::time::Instant;

use cowdisk_core::{Disk, ExtentState, InPlace, IoError, IoErrorKind, Uuid, WriteFlags};
use cowdisk_nbd::{
    Backend, BackendError, BackendErrorKind, DirtyExtent, Extent, ReadPiece, WriteTarget, ZeroFlags,
};

use crate::cmd::diff::{changed, sealed_layers};

use super::live::LiveDisk;
use super::stats::Op;

/// Adapts a served image to the NBD server's backend trait.
pub struct DiskBackend {
    live: Arc<LiveDisk>,
    /// Layers named by dirty-bitmap keys: the key is the index. Grows only by layers of
    /// the chain a client asked for, each once.
    checkpoints: Mutex<Vec<Uuid>>,
}

impl DiskBackend {
    /// Serves an open disk (no live changes other than through this backend).
    pub fn new(disk: Disk) -> DiskBackend {
        let image = disk.top_path().to_path_buf();
        let cache = Arc::new(cowdisk_core::LowerCache::new());
        DiskBackend::live(Arc::new(LiveDisk::new(disk, image, cache)))
    }

    /// Wraps a served image whose chain the control socket may change.
    pub fn live(live: Arc<LiveDisk>) -> DiskBackend {
        DiskBackend {
            live,
            checkpoints: Mutex::new(Vec::new()),
        }
    }

    /// The disk requests go to now (it changes at a live snapshot).
    fn disk(&self) -> &Disk {
        self.live.current()
    }

    /// Runs a request that changes the disk or makes it durable under the write gate,
    /// and counts it.
    fn gated(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce(&Disk) -> Result<(), IoError>,
    ) -> Result<(), BackendError> {
        let start = Instant::now();
        let res = {
            let _gate = self.live.write_gate();
            f(self.disk())
        };
        self.live.stats.record(op, bytes, start, res.is_ok());
        res.map_err(nbd_err)
    }
}

/// A WRITE the server does in place: the engine's [`InPlace`] under the write gate, so a
/// live snapshot waits for it like for any write.
struct Target<'a> {
    inner: InPlace<'a>,
    _gate: RwLockReadGuard<'a, ()>,
    live: &'a LiveDisk,
    start: Instant,
    len: u64,
}

impl<'a> WriteTarget<'a> for Target<'a> {
    fn fd(&self) -> BorrowedFd<'a> {
        self.inner.fd()
    }
    fn offset(&self) -> u64 {
        self.inner.offset()
    }
    fn finish(self: Box<Self>, written: bool) {
        let Target {
            inner,
            live,
            start,
            len,
            ..
        } = *self;
        inner.finish(written);
        // One not written is counted by the `write` that follows.
        if written {
            live.stats.record(Op::Write, len, start, true);
        }
    }
}

fn nbd_err(e: IoError) -> BackendError {
    let kind = match e.kind() {
        IoErrorKind::Invalid => BackendErrorKind::Invalid,
        IoErrorKind::ReadOnly => BackendErrorKind::ReadOnly,
        IoErrorKind::NoSpace => BackendErrorKind::NoSpace,
        IoErrorKind::NotSupported => BackendErrorKind::NotSupported,
        IoErrorKind::Io => BackendErrorKind::Io,
    };
    // The client learns what failed, not where: layer paths stay on the server, whose
    // stderr gets the whole message for an I/O error (rare, and what an admin must see).
    let message = match kind {
        BackendErrorKind::Io => {
            eprintln!("cowdisk: serve: {e}");
            "I/O error on the image (details in the server's log)".to_string()
        }
        BackendErrorKind::NoSpace => "no space left for the image's top layer".to_string(),
        _ => e.to_string(),
    };
    BackendError::new(kind, message)
}

impl Backend for DiskBackend {
    fn size(&self) -> u64 {
        self.disk().size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.disk().block_size()
    }
    fn is_read_only(&self) -> bool {
        self.disk().is_read_only()
    }
    fn may_wait_on_network(&self) -> bool {
        let lower = self.disk().lower();
        lower
            .layers()
            .iter()
            .any(|l| l.storage().may_wait_on_network())
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let start = Instant::now();
        let res = self.disk().read(offset, buf);
        let n = buf.len() as u64;
        self.live.stats.record(Op::Read, n, start, res.is_ok());
        res.map_err(nbd_err)
    }
    fn read_pieces<'a>(
        &'a self,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece<'a>>,
    ) -> Result<bool, BackendError> {
        let start = Instant::now();
        let (generation, disk) = self.live.current_indexed();
        let res = disk.read_pieces(offset, len, |p| {
            out.push(match p {
                cowdisk_core::ReadPiece::Zeros(n) => ReadPiece::Zeros(n),
                cowdisk_core::ReadPiece::File { fd, offset, len } => {
                    ReadPiece::File { fd, offset, len }
                }
                cowdisk_core::ReadPiece::Direct { fd, offset, len } => {
                    ReadPiece::Direct { fd, offset, len }
                }
                cowdisk_core::ReadPiece::Staged {
                    fd,
                    offset,
                    len,
                    depth,
                    token,
                } => ReadPiece::Staged {
                    fd,
                    offset,
                    len,
                    tag: (generation as u64) << 32 | u64::from(depth),
                    token,
                },
            })
        });
        let complete = match res {
            Ok(c) => c,
            Err(e) => {
                self.live.stats.record(Op::Read, len, start, false);
                return Err(nbd_err(e));
            }
        };
        if complete {
            self.live.stats.record(Op::Read, len, start, true);
        } else {
            // `read` follows and counts it.
            out.clear();
        }
        Ok(complete)
    }
    /// The tag names the disk the pieces came from (a live snapshot may have replaced
    /// it since, with other layer depths) and the layer in it.
    fn staged_valid(&self, tag: u64, token: u64) -> bool {
        let (generation, depth) = ((tag >> 32) as usize, tag as u32);
        self.live
            .disk_at(generation)
            .is_some_and(|d| d.staged_valid(depth, token))
    }
    fn write_target(
        &self,
        offset: u64,
        len: u32,
        wait: bool,
    ) -> Option<Box<dyn WriteTarget<'_> + '_>> {
        let start = Instant::now();
        let gate = if wait {
            self.live.write_gate()
        } else {
            self.live.try_write_gate()?
        };
        // The disk of now, under the gate: a snapshot cannot replace it meanwhile.
        let inner = self.disk().write_in_place(offset, len as usize, wait)?;
        Some(Box::new(Target {
            inner,
            _gate: gate,
            live: &self.live,
            start,
            len: u64::from(len),
        }))
    }
    fn writes_in_place(&self) -> bool {
        self.disk().writes_in_place()
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.gated(Op::Write, data.len() as u64, |d| {
            d.write(offset, data, WriteFlags { fua })
        })
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.gated(Op::Flush, 0, |d| d.client_flush())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.gated(Op::Whiteout, len, |d| {
            d.discard(offset, len, WriteFlags { fua })
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), BackendError> {
        let flags = cowdisk_core::ZeroFlags {
            fua: f.fua,
            no_hole: f.no_hole,
            fast: f.fast,
        };
        self.gated(Op::Whiteout, len, |d| d.write_zeroes(offset, len, flags))
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BackendError> {
        // Cap the work per request: clients (nbdinfo) ask for ~4 GiB and accept less.
        let start = Instant::now();
        let disk = self.disk();
        let len = len.min(1 << 30).min(disk.size() - offset.min(disk.size()));
        let mut exts = Vec::new();
        let res = disk.block_status(offset, len, &mut exts);
        self.live
            .stats
            .record(Op::BlockStatus, 0, start, res.is_ok());
        res.map_err(nbd_err)?;
        out.extend(exts.iter().map(|e| {
            let (zero, hole) = match e.state {
                ExtentState::Data => (false, false),
                // A whiteout uses no data space: reads zero, allocated as metadata only.
                ExtentState::Zero | ExtentState::Hole => (true, true),
            };
            Extent {
                length: e.length,
                zero,
                hole,
                depth: e.depth.map_or(0, |d| d + 1),
            }
        }));
        Ok(())
    }
    fn pieces_begin(&self) {
        self.live.streamed_writes(true);
    }
    fn pieces_end(&self) {
        self.live.streamed_writes(false);
    }
    fn dirty_bitmaps(&self) -> Vec<String> {
        sealed_layers(self.disk())
            .into_iter()
            .map(|c| c.name)
            .collect()
    }
    /// The key names the layer by identity (its UUID, through `DiskBackend::checkpoints`):
    /// a live snapshot or squash changes depths, and a connection must keep querying the
    /// layer it chose, or learn that it is gone, never silently another one.
    fn dirty_bitmap_key(&self, name: &str) -> Option<u64> {
        let c = sealed_layers(self.disk())
            .into_iter()
            .find(|c| c.name == name)?;
        let mut ids = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
        let i = match ids.iter().position(|u| *u == c.uuid) {
            Some(i) => i,
            None => {
                ids.push(c.uuid);
                ids.len() - 1
            }
        };
        Some(i as u64)
    }
    fn dirty_status(
        &self,
        key: u64,
        offset: u64,
        len: u64,
        out: &mut Vec<DirtyExtent>,
    ) -> Result<(), BackendError> {
        let disk = self.disk();
        let uuid = usize::try_from(key).ok().and_then(|k| {
            let ids = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
            ids.get(k).copied()
        });
        let since = uuid.and_then(|u| {
            sealed_layers(disk)
                .into_iter()
                .find(|c| c.uuid == u)
                .map(|c| c.depth)
        });
        let Some(since) = since else {
            return Err(BackendError::new(
                BackendErrorKind::Invalid,
                "that dirty bitmap's layer is no longer in the chain",
            ));
        };
        // Cap the work per request, as for block status.
        let len = len.min(1 << 30).min(disk.size() - offset.min(disk.size()));
        let mut exts = Vec::new();
        disk.block_status(offset, len, &mut exts).map_err(nbd_err)?;
        for e in &exts {
            let dirty = changed(e, since);
            match out.last_mut() {
                Some(last) if last.dirty == dirty => last.length += e.length,
                _ => out.push(DirtyExtent {
                    length: e.length,
                    dirty,
                }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_the_failure_without_server_paths() {
        let e = nbd_err(IoError::Checksum {
            path: "/srv/images/base.cow".into(),
            block: 3,
            stored: 1,
            actual: 2,
        });
        assert_eq!(e.kind, BackendErrorKind::Io);
        assert!(!e.message.contains("/srv"), "{}", e.message);
        let enospc = IoError::Storage {
            path: "/srv/images/top.cow".into(),
            op: "write",
            offset: 0,
            source: std::io::Error::from_raw_os_error(28),
        };
        let e = nbd_err(enospc);
        assert_eq!(e.kind, BackendErrorKind::NoSpace);
        assert!(!e.message.contains("/srv"), "{}", e.message);
        // Errors without a path keep their text.
        let e = nbd_err(IoError::OutOfRange {
            offset: 10,
            len: 10,
            size: 15,
        });
        assert_eq!(e.kind, BackendErrorKind::Invalid);
        assert!(e.message.contains("outside the disk"), "{}", e.message);
    }
}
