//! Log lines from the library (a damaged block, a cache that stopped working). The
//! binary decides where they go; until it does, they go to stderr, one line each.

use std::sync::OnceLock;

static SINK: OnceLock<fn(&str)> = OnceLock::new();

/// Sends every later log line to `sink` (first call wins).
pub fn set_log_sink(sink: fn(&str)) {
    let _ = SINK.set(sink);
}

/// Logs one line.
pub fn log(msg: &str) {
    match SINK.get() {
        Some(f) => f(msg),
        None => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "cowdisk: {msg}");
        }
    }
}
