//! The `cowdisk` command-line tool as a library: argument parsing ([`cli`]), one
//! module per command group ([`cmd`]), the crash-safe layer operations ([`ops`]),
//! the NBD server ([`serve`]), human/JSON formatting ([`output`]) and a terminal
//! progress bar ([`progress`]).
//!
//! ```text
//!   main.rs ── run() ── cli::Cli (clap) ── cmd::dispatch ── ops::recover (once per image)
//!                                              │
//!                      ┌───────────────────────┴──────────────────────┐
//!   cmd::{create, inspect, check, layers, transfer}                 serve ── cowdisk-nbd
//!                      │                                              │
//!   ops::{snapshot, reset, rebase, squash, builder}                   │
//!                      │                                              │
//!                 cowdisk-core ◄──────────────────────────────────────┘
//! ```
//!
//! Exit codes: 0 success; 1 error (message on stderr as `cowdisk: <file>: <cause>`);
//! `check` adds 2 (corruption found), 3 (problems found and all repaired) and
//! 4 (only harmless leaks found, nothing repaired).
#![forbid(unsafe_code)]

pub mod cli;
pub mod cmd;
pub mod control;
pub mod error;
pub mod failpoint;
pub mod ops;
pub mod output;
pub mod progress;
pub mod serve;
pub mod size;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cowdisk_core::{LayerSource, LocalFiles, OpenOptions};
use cowdisk_remote::{RemoteOptions, RemoteSource, S3Url};

pub use error::Error;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: the command failed (or `check` could not run).
pub const EXIT_ERROR: i32 = 1;
/// Exit code of `check`: corruption found (and not repaired).
pub const EXIT_CORRUPT: i32 = 2;
/// Exit code of `check`: problems were found and all of them repaired.
pub const EXIT_REPAIRED: i32 = 3;
/// Exit code of `check`: only harmless leaks found (no `--repair` given).
pub const EXIT_LEAKS: i32 = 4;

/// Where parents come from in this process: local files and `s3://` objects, confined
/// to the image roots, if any. One per process, so every clone shares remote fetches.
static SOURCE: OnceLock<Arc<RemoteSource>> = OnceLock::new();
/// The cap on an open chain's metadata memory (`--max-metadata`).
static MAX_METADATA: OnceLock<u64> = OnceLock::new();

/// Confines every parent reference to `roots` (from `--image-root` and
/// `COWDISK_IMAGE_ROOT`) for the rest of the process. No roots: unconfined.
pub fn set_image_roots(roots: &[PathBuf]) -> error::Result<()> {
    set_sources(roots, RemoteOptions::default())
}

/// Sets the process's layer source: `roots` (folders and `s3://BUCKET/PREFIX` entries)
/// confine local and remote references; `remote` says how remote layers are read.
pub fn set_sources(roots: &[PathBuf], mut remote: RemoteOptions) -> error::Result<()> {
    let (s3, local): (Vec<&PathBuf>, Vec<&PathBuf>) = roots
        .iter()
        .partition(|r| cowdisk_remote::is_remote(&r.to_string_lossy()));
    remote.roots = s3
        .iter()
        .map(|r| S3Url::parse(&r.to_string_lossy(), true))
        .collect::<Result<_, _>>()?;
    remote.confined = !roots.is_empty();
    let local: Vec<PathBuf> = local.into_iter().cloned().collect();
    let files: Arc<dyn LayerSource> = match (local.is_empty(), roots.is_empty()) {
        (true, true) => Arc::new(LocalFiles::new()),
        // Only remote roots: no local reference is inside one.
        (true, false) => Arc::new(cowdisk_remote::source::NoLocal),
        (false, _) => Arc::new(LocalFiles::confined(&local)?),
    };
    let _ = SOURCE.set(Arc::new(RemoteSource::new(files, remote)));
    Ok(())
}

/// The process's source, with remote layers reachable.
pub fn remote_source() -> Arc<RemoteSource> {
    SOURCE
        .get_or_init(|| {
            let local: Arc<dyn LayerSource> = Arc::new(LocalFiles::new());
            Arc::new(RemoteSource::new(local, RemoteOptions::default()))
        })
        .clone()
}

/// The process's layer source (for walks outside `Disk::open`, such as `check`).
pub fn layer_source() -> Arc<dyn LayerSource> {
    remote_source()
}

/// Layer files opened with O_DIRECT (`serve --cache=none`), for the rest of the process.
static DIRECT_IO: OnceLock<bool> = OnceLock::new();

/// Sets whether chains are opened with direct I/O (once per process).
pub fn set_direct_io(on: bool) {
    let _ = DIRECT_IO.set(on);
}

/// Bytes of each top's flush journal (`serve --flush-journal`), and whether only where it
/// pays, for the rest of the process.
static FLUSH_JOURNAL: OnceLock<(u64, bool)> = OnceLock::new();

/// Sets the flush journal's size and whether it is made only where it pays
/// (`OpenOptions::flush_journal_auto`), once per process; 0 is off.
pub fn set_flush_journal(journal: (u64, bool)) {
    let _ = FLUSH_JOURNAL.set(journal);
}

/// How copy-up moves blocks (`serve --copy-up`), for the rest of the process.
static COPY_UP: OnceLock<cowdisk_core::CopyUp> = OnceLock::new();

/// Sets how copy-up moves blocks (once per process).
pub fn set_copy_up(mode: cowdisk_core::CopyUp) {
    let _ = COPY_UP.set(mode);
}

/// The options every command opens chains with: the process's layer source.
pub fn open_options() -> OpenOptions {
    // COWDISK_COPY_UP=buffer: copy-up always through a buffer, never copy_file_range (to
    // compare the two in benchmarks).
    let buffered = std::env::var_os("COWDISK_COPY_UP").is_some_and(|v| v == "buffer");
    let copy_up = match COPY_UP.get() {
        _ if buffered => cowdisk_core::CopyUp::Buffer,
        Some(&m) => m,
        None => cowdisk_core::CopyUp::default(),
    };
    let direct = DIRECT_IO.get().copied().unwrap_or(false);
    let mut o = OpenOptions::new().copy_up(copy_up).direct_io(direct);
    o = match FLUSH_JOURNAL.get().copied() {
        Some((bytes, true)) => o.flush_journal_auto(bytes),
        Some((bytes, false)) => o.flush_journal(bytes),
        None => o,
    };
    if let Some(&m) = MAX_METADATA.get() {
        o = o.metadata_limit(m);
    }
    o.source(layer_source())
}

/// How this invocation reads remote layers (`--cache-dir`, `--cache-size`,
/// `--remote-deadline`, `--record-trace`, `--prefetch`).
fn remote_options(cli: &cli::Cli) -> error::Result<RemoteOptions> {
    let mut o = RemoteOptions::default();
    if let Some(d) = &cli.remote.cache_dir {
        o.cache_dir = Some(d.clone());
    }
    if let Some(s) = cli.remote.cache_size {
        o.cache_size = s;
    }
    if let Some(s) = cli.remote.remote_deadline {
        o.fetch.deadline = std::time::Duration::from_secs(s);
    }
    if let Some(p) = &cli.remote.prefetch {
        o.prefetch = Some(Arc::new(cowdisk_remote::trace::Trace::load(p)?));
    }
    if let Some(p) = &cli.remote.record_trace {
        o.record = Some(Arc::new(cowdisk_remote::trace::TraceRecorder::create(p)?));
    }
    Ok(o)
}

/// The image roots named on the command line, then in `COWDISK_IMAGE_ROOT`.
fn image_roots(cli: &cli::Cli) -> Vec<PathBuf> {
    let mut roots = cli.image_roots.clone();
    if let Some(env) = std::env::var_os("COWDISK_IMAGE_ROOT") {
        roots.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    roots
}

/// Parses the process arguments, runs the command and returns the exit code.
pub fn run() -> i32 {
    let cli = match <cli::Cli as clap::Parser>::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    if let Some(m) = cli.max_metadata {
        let _ = MAX_METADATA.set(m);
    }
    let sources = remote_options(&cli).and_then(|o| set_sources(&image_roots(&cli), o));
    match sources.and_then(|()| cmd::dispatch(&cli)) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cowdisk: {e}");
            EXIT_ERROR
        }
    }
}
