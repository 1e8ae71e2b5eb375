//! Formatting for people (sizes, tables) and for programs (JSON, schemas in README.md).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cowdisk_core::{ExtentState, Header, LayerState};
use serde_json::{json, Value};

/// A byte count for people: `512 B`, `64 KiB`, `1.5 GiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = n as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// `"writable"` or `"sealed"`.
pub fn state_name(s: LayerState) -> &'static str {
    match s {
        LayerState::Writable => "writable",
        LayerState::Sealed => "sealed",
    }
}

/// `"data"`, `"zero"` or `"hole"`.
pub fn extent_name(s: ExtentState) -> &'static str {
    match s {
        ExtentState::Data => "data",
        ExtentState::Zero => "zero",
        ExtentState::Hole => "hole",
    }
}

/// Bytes a file occupies on disk (0 if it cannot be stat'ed): what `info` reports as
/// `allocated_bytes`.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// The layer object shared by `info --json` and every command that makes or changes a
/// layer (README "JSON output"), so one parser reads them all.
pub fn layer_json(path: &Path, h: &Header) -> Value {
    json!({
        "path": path.display().to_string(),
        "uuid": h.uuid.to_string(),
        "state": state_name(h.state),
        "virtual_size": h.geometry.virtual_size,
        "block_size": h.geometry.block_size,
        "seal_digest": (h.state == LayerState::Sealed).then(|| format!("{:08x}", h.seal_digest)),
        "parent": h.parent.as_ref().map(|p| json!({
            "reference": p.path,
            "uuid": p.uuid.to_string(),
            "seal_digest": format!("{:08x}", p.digest),
        })),
        "allocated_bytes": allocated_bytes(path),
    })
}

/// Prints `json` if asked for JSON, else the human `lines`.
pub fn report(json_out: bool, json: impl FnOnce() -> Value, lines: &[String]) {
    if json_out {
        print_json(&json());
    } else {
        print_lines(lines);
    }
}

/// Prints a JSON value (pretty, newline-terminated) to stdout.
pub fn print_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into());
    let _ = writeln!(out, "{s}");
}

/// Prints lines to stdout, ignoring a closed pipe.
pub fn print_lines(lines: &[String]) {
    let mut out = std::io::stdout().lock();
    for l in lines {
        if writeln!(out, "{l}").is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
        assert_eq!(human_size(3 << 29), "1.50 GiB");
    }
}
