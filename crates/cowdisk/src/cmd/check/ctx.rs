//! Where `check` puts its findings: the report, and which layer they are about.

use std::path::PathBuf;

use super::{Finding, Report, Severity};

/// Where findings go, and about which layer.
pub(super) struct Ctx<'a> {
    pub report: &'a mut Report,
    /// The layer file.
    pub file: PathBuf,
    pub depth: usize,
    pub repairable: bool,
}

impl Ctx<'_> {
    /// Records a finding; returns its index.
    pub fn add(&mut self, severity: Severity, kind: &'static str, message: String) -> usize {
        self.report.findings.push(Finding {
            file: self.file.clone(),
            depth: self.depth,
            severity,
            kind,
            message,
            repaired: false,
        });
        self.report.findings.len() - 1
    }
    /// Marks finding `i` as repaired.
    pub fn repaired(&mut self, i: usize) {
        self.report.findings[i].repaired = true;
    }
}
