//! Stale temp files in the image's folder: what a killed `import`, `flatten` or
//! `export` left (`ops::temp`). Leaks; `--repair` removes those nobody holds.

use std::path::Path;

use cowdisk_core::folder_of;

use super::{Finding, Report, Severity};
use crate::error::Result;
use crate::failpoint;
use crate::ops::temp;

/// Adds a `stale_temp_file` leak for each unlocked temp file beside `image`; removes
/// them when `repair`.
pub(super) fn check_temps(report: &mut Report, image: &Path, repair: bool) -> Result<()> {
    for s in temp::stale_in(&folder_of(image), None) {
        let removed = repair && temp::remove_if_stale(&s.path)?;
        if removed {
            failpoint::hit("check.repair.after_temp");
        }
        report.findings.push(Finding {
            file: s.path,
            depth: 0,
            severity: Severity::Leak,
            kind: "stale_temp_file",
            message: format!(
                "temp file of an interrupted `{}` into {} ({} bytes); the next `{}` to that \
file removes it",
                s.tag, s.target, s.len, s.tag
            ),
            repaired: removed,
        });
    }
    Ok(())
}
