//! Helpers shared by every cowdisk test suite (a dev-dependency only).
//!
//! The rule they enforce: a test that needs something the machine lacks (an external
//! client such as `qemu-io` or `nbdinfo`, a Python module, root) **fails** under CI
//! (`CI=true`) and only outside CI prints `SKIPPED: <why>` on stderr and returns early,
//! so a missing tool can never turn a CI run green silently.
#![forbid(unsafe_code)]

pub mod s3server;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Folders searched before `PATH`: the distribution's tools win over, say, a virtualenv's
/// `python3` earlier in `PATH`, which would lack the Debian `nbd` module.
const SYSTEM_DIRS: [&str; 5] = ["/usr/local/bin", "/usr/bin", "/usr/sbin", "/bin", "/sbin"];

/// True when running under CI: `CI` is set to anything but empty, `0` or `false`.
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

/// [`in_ci`]'s rule for a given value of `CI`.
fn ci_value(v: Option<&str>) -> bool {
    v.is_some_and(|v| !matches!(v, "" | "0" | "false"))
}

/// Says on stderr that a test was skipped (the test harness captures stdout only).
pub fn skipped(why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// Applies the rule to any prerequisite: returns `available`; when it is false, panics
/// under CI naming `what`, else prints a SKIPPED line.
pub fn require(available: bool, what: &str) -> bool {
    enforce(in_ci(), available, what)
}

/// [`require`] with the CI decision passed in (testable without touching the environment).
fn enforce(ci: bool, available: bool, what: &str) -> bool {
    if !available {
        assert!(!ci, "{what} is required in CI (CI=true) but missing");
        skipped(&format!("{what} missing"));
    }
    available
}

/// Where the executable `tool` is: the system folders first, then `PATH`.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    SYSTEM_DIRS
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True if the external tool `tool` is installed; if not, fails under CI, else prints a
/// SKIPPED line (the caller returns early).
pub fn have_tool(tool: &str) -> bool {
    require(find_tool(tool).is_some(), &format!("tool {tool}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        assert!(!ci_value(None));
        for off in ["", "0", "false"] {
            assert!(!ci_value(Some(off)), "{off:?}");
        }
        for on in ["true", "1", "yes"] {
            assert!(ci_value(Some(on)), "{on:?}");
        }
    }

    #[test]
    fn finds_a_tool_every_system_has_and_not_a_made_up_one() {
        let sh = find_tool("sh").expect("sh");
        assert!(sh.is_absolute() && sh.ends_with("sh"));
        assert_eq!(find_tool("cowdisk-no-such-tool-7f3a"), None);
    }

    #[test]
    fn present_prerequisite_passes_in_and_out_of_ci() {
        assert!(enforce(true, true, "anything"));
        assert!(enforce(false, true, "anything"));
    }

    #[test]
    fn missing_prerequisite_skips_outside_ci() {
        assert!(!enforce(
            false,
            false,
            "the rule's own test tool (not a real skip)"
        ));
    }

    #[test]
    #[should_panic(expected = "tool x is required in CI")]
    fn missing_prerequisite_fails_in_ci() {
        enforce(true, false, "tool x");
    }
}
