//! `cowdisk serve`: exports images over NBD.
//!
//! Every image is opened once and shared by all of its connections (so a flush on one
//! connection covers writes from all of them: multi-conn). Images over the same base
//! share the base's resolved lower chain through one [`LowerCache`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cowdisk_core::{Access, Disk, LowerCache, OpenOptions};
use cowdisk_nbd::Server;

use crate::error::Error;

mod adapter;
mod process;

pub use adapter::DiskBackend;

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

fn export_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
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
        let disk = Disk::open(img, &OpenOptions::new().access(access).cache(cache.clone()))?;
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
        builder = builder.unix_listener(process::bind_unix(path)?);
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
    process::stop_on_signals(server.shutdown_handle())?;
    process::announce(&names, &address);
    let res = server
        .serve()
        .map_err(|e| Error::invalid(Path::new("serve"), e.to_string()));
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    res
}
