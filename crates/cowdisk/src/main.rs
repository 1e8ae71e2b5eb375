//! The `cowdisk` binary: everything lives in the library (see `cowdisk::run`).
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(cowdisk::run());
}
