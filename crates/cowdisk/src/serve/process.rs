//! What serving needs from the process, kept out of the disk adapter: the socket file's
//! mode, signal handling and the ready line on stdout.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Binds a unix socket with mode 0600, refusing an existing path.
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
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

/// SIGINT and SIGTERM call `stop` (which asks the server to stop; it then flushes);
/// SIGXFSZ is ignored so a write past RLIMIT_FSIZE fails with EFBIG (reported to the client
/// as ENOSPC) instead of killing the server.
pub fn stop_on_signals(stop: impl FnOnce() + Send + 'static) -> Result<()> {
    let signal_err = |e| Error::os(Path::new("serve"), "install signal handlers", e);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(signal_err)?;
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(signal_err)?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop();
        }
    });
    Ok(())
}

/// The ready line: scripts and tests wait for it before connecting.
pub fn announce(names: &[String], address: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "cowdisk: serving {} at {address}", names.join(", "));
    let _ = out.flush();
}
