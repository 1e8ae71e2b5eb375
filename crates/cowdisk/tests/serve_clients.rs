//! The NBD crate's real-client checks (nbdinfo, qemu-img, qemu-io, nbdcopy, fio,
//! nbd-client, nbdsh negatives) run against `cowdisk serve` on a two-layer chain.

#[path = "../../cowdisk-nbd/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::{checks, Endpoint, ServerConfig};

/// Builds an empty base and a writable top over it, and serves the top.
fn cowdisk_serve(cfg: &ServerConfig, ep: &Endpoint, dir: &Path) -> Command {
    let bin = env!("CARGO_BIN_EXE_cowdisk");
    let base = dir.join("base.cow");
    let top = dir.join("top.cow");
    let ok = |args: &[&std::ffi::OsStr]| {
        let st = Command::new(bin).args(args).status().expect("run cowdisk");
        assert!(st.success(), "cowdisk {args:?} failed");
    };
    ok(&[
        "create".as_ref(),
        base.as_os_str(),
        "--size".as_ref(),
        cfg.size.to_string().as_ref(),
    ]);
    ok(&[
        "create".as_ref(),
        top.as_os_str(),
        "--backing".as_ref(),
        base.as_os_str(),
    ]);
    let mut c = Command::new(bin);
    c.arg("serve").arg(&top);
    if cfg.read_only {
        c.arg("--read-only");
    }
    match ep {
        Endpoint::Tcp => c.args(["--listen", "127.0.0.1:0"]),
        Endpoint::Unix(p) => c.arg("--socket").arg(p),
    };
    c
}

#[test]
fn nbdinfo_size_list_map() {
    checks::nbdinfo(cowdisk_serve);
}

#[test]
fn qemu_img_and_qemu_io() {
    checks::qemu(cowdisk_serve);
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    checks::nbdcopy(cowdisk_serve);
}

#[test]
fn fio_verify() {
    checks::fio(cowdisk_serve);
}

#[test]
fn nbd_client_list() {
    checks::nbd_client_list(cowdisk_serve);
}

#[test]
fn negative_requests_via_libnbd() {
    checks::negative(cowdisk_serve);
}

#[test]
fn unix_socket_clients() {
    checks::unix_socket(cowdisk_serve);
}
