//! Formatting for people (sizes, tables) and for programs (JSON, schemas in README.md).

use std::io::Write;

use cowdisk_core::{ExtentState, LayerState};

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

/// Prints a JSON value (pretty, newline-terminated) to stdout.
pub fn print_json(v: &serde_json::Value) {
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
