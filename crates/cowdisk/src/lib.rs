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

/// Where parents come from in this process: confined to the image roots, if any.
static SOURCE: OnceLock<Arc<dyn LayerSource>> = OnceLock::new();
/// The cap on an open chain's metadata memory (`--max-metadata`).
static MAX_METADATA: OnceLock<u64> = OnceLock::new();

/// Confines every parent reference to `roots` (from `--image-root` and
/// `COWDISK_IMAGE_ROOT`) for the rest of the process. No roots: unconfined.
pub fn set_image_roots(roots: &[PathBuf]) -> error::Result<()> {
    if !roots.is_empty() {
        let _ = SOURCE.set(Arc::new(LocalFiles::confined(roots)?));
    }
    Ok(())
}

/// The process's layer source (for walks outside `Disk::open`, such as `check`).
pub fn layer_source() -> Arc<dyn LayerSource> {
    match SOURCE.get() {
        Some(s) => s.clone(),
        None => Arc::new(LocalFiles::new()),
    }
}

/// The options every command opens chains with: the process's layer source.
pub fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    if let Some(&m) = MAX_METADATA.get() {
        o = o.metadata_limit(m);
    }
    match SOURCE.get() {
        Some(s) => o.source(s.clone()),
        None => o,
    }
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
    match set_image_roots(&image_roots(&cli)).and_then(|()| cmd::dispatch(&cli)) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cowdisk: {e}");
            EXIT_ERROR
        }
    }
}
