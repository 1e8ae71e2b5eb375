//! `cowdisk serve --ublk`: the image as a local block device through the kernel's ublk
//! driver (crate `cowdisk-ublk`), served by the same [`DiskBackend`] as an NBD export, so
//! requests take the same write gate, are counted the same way, and fail the same way.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use cowdisk_core::{Access, Disk, LowerCache};
use cowdisk_nbd::{Backend, BackendError, BackendErrorKind, ZeroFlags};
use cowdisk_ublk::{Failure, Options, Stop, Target as UblkTarget};

use super::{process, start_control, DiskBackend, LiveDisk, ServeArgs};
use crate::control::state::Target;
use crate::error::{Error, Result};

/// The NBD backend seen as a ublk target: the engine's semantics come through unchanged
/// (FLUSH is the engine's durable flush, DISCARD and WRITE_ZEROES become whiteouts).
struct Device(DiskBackend);

fn failure(e: BackendError) -> Failure {
    // The backend already logged an I/O error's details on stderr.
    match e.kind {
        BackendErrorKind::NoSpace => Failure::NoSpace,
        BackendErrorKind::ReadOnly => Failure::ReadOnly,
        BackendErrorKind::Invalid => Failure::Invalid,
        BackendErrorKind::NotSupported => Failure::NotSupported,
        // Io, and kinds added later: the safe answer.
        _ => Failure::Io,
    }
}

impl UblkTarget for Device {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), Failure> {
        self.0.read(offset, buf).map_err(failure)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::result::Result<(), Failure> {
        self.0.write(offset, data, fua).map_err(failure)
    }
    fn flush(&self) -> std::result::Result<(), Failure> {
        self.0.flush().map_err(failure)
    }
    fn discard(&self, offset: u64, len: u64) -> std::result::Result<(), Failure> {
        self.0.trim(offset, len, false).map_err(failure)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> std::result::Result<(), Failure> {
        // REQ_NOUNMAP is NBD's NO_HOLE: the range stays allocated.
        let flags = ZeroFlags {
            fua: false,
            no_hole: !may_unmap,
            fast: false,
        };
        self.0.write_zeroes(offset, len, flags).map_err(failure)
    }
}

/// Attaches the one image as /dev/ublkbN until SIGINT/SIGTERM, then removes the device
/// and flushes. The image is opened and locked as by NBD `serve` (a writable image once),
/// with its control socket beside it.
pub fn run(args: &ServeArgs) -> Result<()> {
    let [image] = args.images.as_slice() else {
        return Err(Error::invalid(
            Path::new("--ublk"),
            "attaches exactly one image",
        ));
    };
    // Before the image is opened: without the driver there is nothing to lock it for.
    if !Path::new("/dev/ublk-control").exists() {
        return Err(Error::invalid(
            image,
            cowdisk_ublk::ServeError::NoDriver.to_string(),
        ));
    }
    let access = if args.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let cache = Arc::new(LowerCache::new());
    let disk = Disk::open(
        image,
        &crate::open_options().access(access).cache(cache.clone()),
    )?;
    disk.prepare_journal();
    let live = Arc::new(LiveDisk::new(disk, image.clone(), cache.clone()));
    let name = super::export_name(image);
    let targets = vec![Target {
        name,
        live: live.clone(),
    }];
    let controls = start_control(args, targets, None, cache)?;
    let stop = Stop::new();
    let on_signal = stop.clone();
    process::stop_on_signals(move || on_signal.request())?;
    let mut opts = Options {
        discard_granularity: live.current().block_size().max(4096),
        ..Options::default()
    };
    opts.queues = args.queues.unwrap_or(opts.queues);
    opts.depth = args.queue_depth.unwrap_or(opts.depth);
    opts.threads = args.threads.unwrap_or(opts.threads);
    let device = Arc::new(Device(DiskBackend::live(live.clone())));
    let res = cowdisk_ublk::serve(device, &opts, &stop, |dev| {
        // The ready line: scripts read the device path from it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", dev.path.display());
        let _ = out.flush();
    });
    controls.remove_sockets();
    let res = res.map_err(|e| Error::invalid(image, e.to_string()));
    res.and(super::close_journals(&[live]))
}

/// Arguments of `cowdisk ublk-remove`.
#[derive(Debug, clap::Args)]
pub struct UblkRemoveArgs {
    /// The device number N of /dev/ublkcN.
    pub id: u32,
}

/// `cowdisk ublk-remove N`.
pub fn remove(args: &UblkRemoveArgs) -> Result<()> {
    let dev = format!("/dev/ublkc{}", args.id);
    cowdisk_ublk::remove_dead(args.id).map_err(|e| Error::invalid(Path::new(&dev), e.to_string()))
}
