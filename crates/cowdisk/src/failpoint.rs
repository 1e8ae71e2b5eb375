//! Crash-test failpoints: `COWDISK_FAILPOINT=snapshot.after_seal cowdisk snapshot ...`
//! makes the process exit with status 137 (as if killed) when it reaches that step.
//! Used by the crash-safety tests; costs one environment lookup per step otherwise.

/// Exit status used when a failpoint fires (the status of a `kill -9`).
pub const FAILPOINT_EXIT: i32 = 137;

/// Exits the process if the environment names this failpoint.
pub fn hit(name: &str) {
    if let Some(v) = std::env::var_os("COWDISK_FAILPOINT") {
        if v == name {
            std::process::exit(FAILPOINT_EXIT);
        }
    }
}
