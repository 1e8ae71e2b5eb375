//! `cowdisk serve`: exports images over NBD.
//!
//! Every image is opened once and shared by all of its connections (so a flush on one
//! connection covers writes from all of them: multi-conn). Images over the same base
//! share the base's resolved lower chain through one [`LowerCache`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cowdisk_core::{Access, Disk, LowerCache};
use cowdisk_nbd::Server;

use crate::error::Error;
use crate::size::parse_size;

pub(crate) mod adapter;
mod generations;
pub(crate) mod live;
mod metrics;
pub(crate) mod process;
mod reuse;
pub mod stats;
mod ublk;

pub use adapter::DiskBackend;
pub use live::LiveDisk;
pub use ublk::{remove as ublk_remove, UblkRemoveArgs};

use crate::control::handlers;
use crate::control::server as control_server;
use crate::control::state::{Control, Target};

/// Default TCP address: loopback only unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Arguments of `cowdisk serve`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  cowdisk serve disk.cow --socket /tmp/disk.sock\n  \
nbdinfo 'nbd+unix:///?socket=/tmp/disk.sock'\n  cowdisk serve vm1.cow vm2.cow --listen 127.0.0.1:0\n  \
cowdisk serve --ublk vm1.cow      # prints /dev/ublkbN; kill -TERM flushes and removes it\n\n\
Memory for request data stays below, whatever clients do:\n  \
max(read-budget, 32M) + write-budget + max-connections x 272K + (4 x threads + 8) x 1M\n\
(defaults, 2 CPUs: 32M + 64M + 34M + 24M = 154M), plus about 16K of stack per\n\
thread (max-connections x threads of them)."
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
    /// Threads per connection that run requests (1-64; default 4, 12 with --cache=none).
    /// Requests of one connection run in parallel up to this many; more help only when the
    /// storage itself waits, as direct I/O and frequent flushes on a disk do. With --ublk:
    /// worker threads per queue (default 1: the queue's own thread answers its requests in
    /// turn; in the emulated guest benchmark more were slower).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// Connections served at once (1-65536). When all are taken, the connection idle the
    /// longest is closed to admit a new client (never one with a request in flight: nothing
    /// answered is lost); if every one is busy, the new client is turned away.
    #[arg(long, value_name = "N", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// Close a connection idle this many seconds (no request in flight, none arriving;
    /// 1-86400). By default idle connections stay open until the table is full.
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub idle_timeout: Option<u64>,
    /// Seconds a WRITE's data may take to arrive once its request has (1-3600); a connection
    /// that takes longer is closed and that write left unanswered.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub payload_timeout: u64,
    /// Memory for WRITE data waiting to be applied, all connections together (default 64M).
    /// A write that does not fit goes to the image as it arrives, in 64K pieces.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub write_budget: Option<u64>,
    /// Memory for READ and BLOCK_STATUS replies being built, all connections together
    /// (default 4M per CPU, at least 8M). Reads served straight from the image files
    /// (sendfile) need none.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub read_budget: Option<u64>,
    /// Control socket (JSON lines, docs/control.md; mode 0600). By default one beside each
    /// image, `.IMAGE.control`, through which `cowdisk snapshot`, `info`, `map`, `stats`
    /// on a served image reach this server.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Attach the image as a local block device through the kernel's ublk driver instead
    /// of serving NBD: prints the device (/dev/ublkbN) on stdout once it exists; SIGTERM
    /// or SIGINT flushes and removes it. Linux with ublk_drv loaded (/dev/ublk-control),
    /// as root. One image.
    #[arg(long, conflicts_with_all = ["listen", "socket", "export_name"])]
    pub ublk: bool,
    /// (--ublk) Hardware queues, each served by its own thread (1-32; default: one per
    /// CPU, at most 8).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=32))]
    pub queues: Option<u16>,
    /// (--ublk) Requests each queue may have outstanding (1-1024; default 64).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub queue_depth: Option<u16>,
    /// Serve the export counters in Prometheus text format at http://HOST:PORT/metrics
    /// (off by default; port 0 picks a free one, printed on stderr).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Host page cache for the layer files: writeback (default) or none (O_DIRECT, as
    /// `qemu-nbd --cache=none`: the guest's cache is the only one; reads no longer go
    /// out by sendfile, copy-ups go through a buffer). Local layer files only; the file
    /// system must support direct I/O.
    #[arg(long, value_enum, default_value = "writeback", value_name = "MODE")]
    pub cache: CacheMode,
    /// What the first write smaller than a block does to a block held below: partial
    /// (default; the top holds only the 4 KiB sub-blocks written, the rest reads from below
    /// until the top is sealed, as qcow2's subclusters), copy (the top gets its own copy of
    /// the whole block) or share (as copy, but on XFS with reflink and btrfs the top shares
    /// the block's extents with the layer below: BENCHMARKS.md).
    #[arg(long, value_enum, default_value = "partial", value_name = "MODE")]
    pub copy_up: CopyUpMode,
    /// Flush journal beside each image (IMAGE.journal, written out to its size when the
    /// server starts and removed when it stops): SIZE, off (or 0), or auto (the default):
    /// 64M, but none on tmpfs or ramfs, whose sync writes nothing so the journal would
    /// only add a copy, and none where 64M is more than 1/16 of the file system's free
    /// space. A client's FLUSH whose writes since the last full flush all went into
    /// blocks the top already held (not all whole-block overwrites, unless the journal
    /// holds records) is made durable by one sync of the journal instead of the image,
    /// whose sync would allocate the holes those writes filled and write small
    /// overwrites back scattered (BENCHMARKS.md); the journal fills, or any other change,
    /// and the next FLUSH is a full one, as is one with more than 16M to journal (the
    /// most memory it takes, per image, with its list of changed ranges). A writable open
    /// replays what a crash left in it.
    #[arg(long, value_name = "SIZE|auto|off", default_value = "auto", value_parser = parse_journal)]
    pub flush_journal: JournalArg,
}

/// `serve --flush-journal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalArg {
    /// The default size where the journal pays (`OpenOptions::flush_journal_auto`).
    Auto,
    /// Every FLUSH syncs the image.
    Off,
    /// A journal of this many bytes, wherever the image is.
    Size(u64),
}

/// The flush journal's size where `--flush-journal auto` makes one: what the
/// benchmarks measured (a 16M journal fills too soon to pay on ext4).
pub const AUTO_FLUSH_JOURNAL: u64 = 64 << 20;

fn parse_journal(s: &str) -> Result<JournalArg, String> {
    match s.trim() {
        "auto" => Ok(JournalArg::Auto),
        "off" => Ok(JournalArg::Off),
        _ => match parse_size(s)? {
            0 => Ok(JournalArg::Off),
            n => Ok(JournalArg::Size(n)),
        },
    }
}

/// `serve --copy-up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CopyUpMode {
    /// The top holds only the sub-blocks written until it is sealed.
    Partial,
    /// The top gets its own copy of each block.
    Copy,
    /// Share extents with the layer below where the file system can.
    Share,
}

/// `serve --cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// The host's page cache holds layer data (fast rereads, zero-copy reads).
    Writeback,
    /// O_DIRECT on every layer file.
    #[value(name = "none")]
    NoCache,
}

/// The server's limits from the command line.
fn limits(args: &ServeArgs) -> cowdisk_nbd::Limits {
    let mut limits = cowdisk_nbd::Limits::default();
    // Direct I/O waits for the device on every request, so a connection needs threads to
    // keep requests in flight; but fewer than a client's usual 16, so that the requests
    // left waiting are read from the buffer by a thread as it finishes instead of every
    // thread sleeping in turn on the socket (measured, BENCHMARKS.md: 1.14-1.30x qemu-nbd
    // at 12, 0.84-1.04x at 16).
    let threads = match args.cache {
        CacheMode::Writeback => 4,
        CacheMode::NoCache => 12,
    };
    limits.workers_per_connection = usize::from(args.threads.unwrap_or(threads));
    limits.max_connections = args.max_connections as usize;
    limits.payload_timeout = Duration::from_secs(args.payload_timeout);
    limits.idle_timeout = args.idle_timeout.map(Duration::from_secs);
    // Beyond the address space means no limit at all; saturating says so.
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    if let Some(n) = args.write_budget {
        limits.max_total_write_bytes = size(n);
    }
    if let Some(n) = args.read_budget {
        limits.max_total_in_flight_bytes = size(n);
    }
    limits
}

fn export_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Runs the server until SIGINT/SIGTERM, then flushes every export. The caller has run
/// recovery on every image.
pub fn run(args: &ServeArgs) -> crate::error::Result<()> {
    crate::set_direct_io(args.cache == CacheMode::NoCache);
    crate::set_flush_journal(match args.flush_journal {
        JournalArg::Auto => (AUTO_FLUSH_JOURNAL, true),
        JournalArg::Off => (0, false),
        JournalArg::Size(n) => (n, false),
    });
    crate::set_copy_up(match args.copy_up {
        CopyUpMode::Partial => cowdisk_core::CopyUp::Partial,
        CopyUpMode::Copy => cowdisk_core::CopyUp::Copy,
        CopyUpMode::Share => cowdisk_core::CopyUp::Share,
    });
    if args.ublk {
        return ublk::run(args);
    }
    // clap's `requires` counts a flag's default as given, so the check is here.
    if args.queues.is_some() || args.queue_depth.is_some() {
        return Err(Error::invalid(
            Path::new("--queues/--queue-depth"),
            "only with --ublk",
        ));
    }
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
    let mut builder = Server::builder().limits(limits(args));
    let mut names = Vec::new();
    let mut targets = Vec::new();
    for img in &args.images {
        let disk = Disk::open(
            img,
            &crate::open_options().access(access).cache(cache.clone()),
        )?;
        disk.prepare_journal();
        let name = args.export_name.clone().unwrap_or_else(|| export_name(img));
        if names.contains(&name) {
            return Err(Error::invalid(
                img,
                format!("export name {name:?} is used twice"),
            ));
        }
        names.push(name.clone());
        let live = Arc::new(LiveDisk::new(disk, img.clone(), cache.clone()));
        builder = builder.export(name.clone(), Arc::new(DiskBackend::live(live.clone())));
        targets.push(Target { name, live });
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
    let controls = start_control(args, targets, Some(server.exports_handle()), cache)?;
    let shutdown = server.shutdown_handle();
    process::stop_on_signals(move || shutdown.request())?;
    process::announce(&names, &address);
    let res = server
        .serve()
        .map_err(|e| Error::invalid(Path::new("serve"), e.to_string()));
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    controls.remove_sockets();
    // What is served now: exports added live too, not those removed (retired then).
    let lives: Vec<_> = controls.list().iter().map(|t| t.live.clone()).collect();
    res.and(close_journals(&lives))
}

/// At exit, after the server's own flushes (client flushes, which may stay in a flush
/// journal): each image served then, given or added live, has its journal retired.
fn close_journals(lives: &[Arc<LiveDisk>]) -> crate::error::Result<()> {
    let mut res = Ok(());
    for live in lives {
        if let Err(e) = live.retire_journal() {
            res = Err(e);
        }
    }
    res
}

/// Binds the control sockets and answers them in the background; returns the paths
/// made, to remove at exit. A default socket that cannot be made (a read-only folder,
/// another read-only server of the same image) costs only the control interface, with
/// a warning; an explicit `--control` that cannot be made is an error.
fn start_control(
    args: &ServeArgs,
    exports: Vec<Target>,
    handle: Option<cowdisk_nbd::ExportsHandle>,
    cache: Arc<LowerCache>,
) -> crate::error::Result<Arc<Control>> {
    let images: Vec<(PathBuf, String)> = exports
        .iter()
        .map(|t| (t.live.image().to_path_buf(), t.name.clone()))
        .collect();
    let control = Arc::new(Control::new(exports, handle, cache, handlers::run));
    if let Some(addr) = &args.metrics {
        let local = metrics::start(addr, control.clone())?;
        eprintln!("cowdisk: metrics at http://{local}/metrics");
    }
    for (path, default) in control_server::socket_paths(&images, args.control.as_deref()) {
        let explicit = default.is_none();
        match control_server::open_socket(&control, &path, default) {
            Ok(()) => {}
            Err(e) if explicit => return Err(e),
            Err(e) => eprintln!("cowdisk: warning: no control socket: {e}"),
        }
    }
    Ok(control)
}
