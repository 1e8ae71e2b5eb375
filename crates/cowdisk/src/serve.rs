//! `cowdisk serve`: exports images over NBD.
//!
//! Every image is opened once and shared by all of its connections (so a flush on one
//! connection covers writes from all of them: multi-conn). Images over the same base
//! share the base's resolved lower chain through one [`LowerCache`].

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cowdisk_core::{Access, Disk, ExtentState, IoError, IoErrorKind, LowerCache, WriteFlags};
use cowdisk_nbd::{Backend, BackendError, BackendErrorKind, Extent, ReadPiece, Server, ZeroFlags};

use crate::error::Error;

/// Default TCP address: loopback only unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Arguments of `cowdisk serve`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  cowdisk serve disk.cow --socket /tmp/disk.sock\n  \
nbdinfo 'nbd+unix:///?socket=/tmp/disk.sock'\n  cowdisk serve vm1.cow vm2.cow --listen 127.0.0.1:0"
)]
pub struct ServeArgs {
    /// Images to export (each as an export named after its file name).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// TCP address to listen on (default 127.0.0.1:10809; port 0 picks a free one).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Unix socket to listen on (created with mode 0600; must not exist yet).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Refuse writes (the top layer is opened read-only too).
    #[arg(long)]
    pub read_only: bool,
    /// Export name (only with a single image).
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// Threads per connection that read and run requests (1-64). Requests of one connection
    /// run in parallel up to this many; more help only when the storage itself waits.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

/// Adapts an open [`Disk`] to the NBD server's backend trait.
pub struct DiskBackend {
    disk: Disk,
}

impl DiskBackend {
    /// Wraps a disk.
    pub fn new(disk: Disk) -> DiskBackend {
        DiskBackend { disk }
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
        self.disk.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.disk.block_size()
    }
    fn is_read_only(&self) -> bool {
        self.disk.is_read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.disk.read(offset, buf).map_err(nbd_err)
    }
    fn read_pieces<'a>(
        &'a self,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece<'a>>,
    ) -> Result<bool, BackendError> {
        let complete = self
            .disk
            .read_pieces(offset, len, |p| {
                out.push(match p {
                    cowdisk_core::ReadPiece::Zeros(n) => ReadPiece::Zeros(n),
                    cowdisk_core::ReadPiece::File { fd, offset, len } => {
                        ReadPiece::File { fd, offset, len }
                    }
                })
            })
            .map_err(nbd_err)?;
        if !complete {
            out.clear();
        }
        Ok(complete)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.disk
            .write(offset, data, WriteFlags { fua })
            .map_err(nbd_err)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.disk.flush().map_err(nbd_err)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.disk
            .discard(offset, len, WriteFlags { fua })
            .map_err(nbd_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), BackendError> {
        let flags = cowdisk_core::ZeroFlags {
            fua: f.fua,
            no_hole: f.no_hole,
            fast: f.fast,
        };
        self.disk.write_zeroes(offset, len, flags).map_err(nbd_err)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), BackendError> {
        // Cap the work per request: clients (nbdinfo) ask for ~4 GiB and accept less.
        let len = len
            .min(1 << 30)
            .min(self.disk.size() - offset.min(self.disk.size()));
        let mut exts = Vec::new();
        self.disk
            .block_status(offset, len, &mut exts)
            .map_err(nbd_err)?;
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
}

fn export_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Binds a unix socket with mode 0600, refusing an existing path.
fn bind_unix(path: &Path) -> crate::error::Result<UnixListener> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::invalid(
            path,
            "already exists (refusing to replace it)",
        ));
    }
    // The umask makes the socket 0600 from the moment it exists (no chmod window).
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let res = UnixListener::bind(path);
    rustix::process::umask(old);
    res.map_err(|e| Error::os(path, "bind", e))
}

/// Runs the server until SIGINT/SIGTERM, then flushes every export. The caller has run
/// recovery on every image.
pub fn run(args: &ServeArgs) -> crate::error::Result<()> {
    if args.export_name.is_some() && args.images.len() != 1 {
        return Err(Error::invalid(
            Path::new("--export-name"),
            "needs exactly one image",
        ));
    }
    let access = if args.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let cache = Arc::new(LowerCache::new());
    let mut limits = cowdisk_nbd::Limits::default();
    limits.workers_per_connection = usize::from(args.threads);
    let mut builder = Server::builder().limits(limits);
    let mut names = Vec::new();
    for img in &args.images {
        let disk = Disk::open(
            img,
            &crate::open_options().access(access).cache(cache.clone()),
        )?;
        let name = args.export_name.clone().unwrap_or_else(|| export_name(img));
        if names.contains(&name) {
            return Err(Error::invalid(
                img,
                format!("export name {name:?} is used twice"),
            ));
        }
        names.push(name.clone());
        builder = builder.export(name, Arc::new(DiskBackend::new(disk)));
    }
    if names.len() == 1 {
        builder = builder.default_export(names[0].clone());
    }
    let socket = args.socket.clone();
    let address = if let Some(path) = &socket {
        builder = builder.unix_listener(bind_unix(path)?);
        format!(
            "{} (nbd+unix:///?socket={})",
            path.display(),
            path.display()
        )
    } else {
        let addr = args.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let l = TcpListener::bind(addr).map_err(|e| Error::os(Path::new(addr), "bind", e))?;
        let local = l
            .local_addr()
            .map_err(|e| Error::os(Path::new(addr), "local address", e))?;
        builder = builder.tcp_listener(l);
        format!("{local} (nbd://{local}/)")
    };
    let server = builder
        .build()
        .map_err(|e| Error::invalid(Path::new("serve"), e.to_string()))?;
    let handle = server.shutdown_handle();
    let signal_err = |e| Error::os(Path::new("serve"), "install signal handlers", e);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(signal_err)?;
    // A write past RLIMIT_FSIZE must fail with EFBIG (mapped to ENOSPC), not kill us.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .map_err(signal_err)?;
    let sig_handle = handle.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            sig_handle.request();
        }
    });
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "cowdisk: serving {} at {address}", names.join(", "));
        let _ = out.flush();
    }
    let res = server
        .serve()
        .map_err(|e| Error::invalid(Path::new("serve"), e.to_string()));
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    res
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
