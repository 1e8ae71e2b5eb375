//! `check IMAGE [--repair]`: walks the chain from the top without trusting it, and
//! reports every finding with its file and layer depth.
//!
//! Findings are errors (corruption: the disk may read wrong, or the chain does not
//! open, or flushed writes may be lost) or leaks (harmless: damaged *older* header or
//! map slots left by a torn update, space allocated for unreferenced blocks, bytes past
//! the layout's end, stale temp files). `--repair` only writes a writable top layer
//! (and removes stale temp files), only makes changes that do not alter what the disk
//! reads (rewrite an older slot from the valid one, punch unreferenced blocks, truncate
//! trailing bytes) and clears the needs-check flag when nothing else is wrong. Data a
//! damaged newer map slot may reference is kept (and the top flagged needs-check)
//! unless `--discard-unreferenced` is given. Lower layers are never written.

mod ctx;
mod layer;
mod slots;
mod temps;

pub use layer::check_chain_with;

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::Result;

use crate::{EXIT_CORRUPT, EXIT_LEAKS, EXIT_OK, EXIT_REPAIRED};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Corruption: content may read wrong or the chain does not open.
    Error,
    /// Harmless: wasted space or a stale inactive copy.
    Leak,
}

/// One problem found.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The layer file.
    pub file: PathBuf,
    /// Depth in the chain (0 = top).
    pub depth: usize,
    /// Error or leak.
    pub severity: Severity,
    /// Stable machine-readable kind (see README "JSON output").
    pub kind: &'static str,
    /// Human description.
    pub message: String,
    /// True if `--repair` fixed it.
    pub repaired: bool,
}

/// The outcome of a check.
#[derive(Debug, Default)]
pub struct Report {
    /// Layers examined.
    pub layers_checked: usize,
    /// Data blocks whose CRC was verified.
    pub blocks_verified: u64,
    /// Everything found.
    pub findings: Vec<Finding>,
    /// Layers that are objects in a bucket (their blocks were fetched to be verified).
    pub remote_layers: Vec<String>,
}

impl Report {
    /// The exit code: 2 if an error is left, 3 if all problems were repaired,
    /// 4 if only leaks were found (none repaired), 0 if clean.
    pub fn exit_code(&self) -> i32 {
        let open = |s: Severity| self.findings.iter().any(|f| f.severity == s && !f.repaired);
        if open(Severity::Error) {
            EXIT_CORRUPT
        } else if open(Severity::Leak) {
            EXIT_LEAKS
        } else if self.findings.iter().any(|f| f.repaired) {
            EXIT_REPAIRED
        } else {
            EXIT_OK
        }
    }

    fn result_name(&self) -> &'static str {
        match self.exit_code() {
            EXIT_CORRUPT => "corrupt",
            EXIT_LEAKS => "leaks",
            EXIT_REPAIRED => "repaired",
            _ => "clean",
        }
    }
}

/// What `check` may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `--repair`: fix what can be fixed without changing what the disk reads.
    pub repair: bool,
    /// `--discard-unreferenced`: with `repair`, also give up writes a damaged newer map
    /// slot may have recorded.
    pub discard_unreferenced: bool,
    /// Show a progress bar.
    pub show: bool,
}

/// The finding kind for a damaged map slot that may be newer than the one in use.
pub const MAP_SLOT_NEWER: &str = "map_slot_newer";

/// Runs the check and prints the report; returns the exit code.
pub fn run(image: &Path, opts: &Options, json_out: bool) -> Result<i32> {
    let report = layer::check_chain(image, opts)?;
    let (doc, lines, code) = render(&report, &image.display().to_string(), opts.repair);
    crate::output::report(json_out, || doc, &lines);
    Ok(code)
}

/// What `check` prints about `report` (on `image`): the JSON document, the human lines
/// and the exit code. Also answers `check` on a served image through its server.
pub fn render(report: &Report, image: &str, repair: bool) -> (serde_json::Value, Vec<String>, i32) {
    let code = report.exit_code();
    let findings: Vec<_> = report
            .findings
            .iter()
            .map(|f| {
                json!({
                    "file": f.file.display().to_string(),
                    "depth": f.depth,
                    "severity": match f.severity { Severity::Error => "error", Severity::Leak => "leak" },
                    "kind": f.kind,
                    "message": f.message,
                    "repaired": f.repaired,
                })
            })
            .collect();
    let doc = json!({
            "image": image,
            "result": report.result_name(),
            "exit_code": code,
            "layers_checked": report.layers_checked,
            "blocks_verified": report.blocks_verified,
            "errors": report.findings.iter().filter(|f| f.severity == Severity::Error && !f.repaired).count(),
            "leaks": report.findings.iter().filter(|f| f.severity == Severity::Leak && !f.repaired).count(),
            "repaired": report.findings.iter().filter(|f| f.repaired).count(),
            "findings": findings,
            "remote_layers": report.remote_layers,
    });
    let mut lines = Vec::new();
    for f in &report.findings {
        let sev = match (f.severity, f.repaired) {
            (_, true) => "repaired",
            (Severity::Error, false) => "ERROR",
            (Severity::Leak, false) => "leak",
        };
        lines.push(format!(
            "{sev}: {} (layer {}): {}",
            f.file.display(),
            f.depth,
            f.message
        ));
    }
    lines.push(match code {
        EXIT_OK => format!(
            "No errors found: {} layer(s), {} data block(s) verified.",
            report.layers_checked, report.blocks_verified
        ),
        EXIT_REPAIRED => "All problems found were repaired.".to_string(),
        // Repair only ever writes a writable top (depth 0).
        EXIT_LEAKS if !repair && report.findings.iter().any(|f| f.depth == 0) => {
            "Only leaks found (harmless); run with --repair to reclaim them.".to_string()
        }
        EXIT_LEAKS => "Only leaks found (harmless), in layers --repair never writes.".to_string(),
        _ if report
            .findings
            .iter()
            .any(|f| f.kind == MAP_SLOT_NEWER && !f.repaired) =>
        {
            "Corruption found: flushed writes may be lost (map_slot_newer). --repair keeps \
the data involved and flags the image; --repair --discard-unreferenced accepts the loss."
                .to_string()
        }
        _ => "Corruption found.".to_string(),
    });
    (doc, lines, code)
}
