//! `serve --ublk` and `ublk-remove` on the host: argument checks, and the one-line error
//! where the kernel has no ublk driver. The device itself is tested in the guest
//! (tools/vm/tests/ublk-*.sh), since this host's kernel has no ublk_drv.

mod cli_common;

use cli_common::*;

#[test]
fn ublk_options_are_checked() {
    let t = Tmp::new("ublk-args");
    let a = t.s("a.cow");
    ok(&["create", &a, "--size", "1M"]);
    // Queue options mean nothing to an NBD server.
    fails(
        &["serve", &a, "--queues", "2", "--socket", &t.s("s.sock")],
        "only with --ublk",
    );
    assert!(!t.p("s.sock").exists());
    // An NBD listener makes no sense for a ublk device.
    let o = run(&["serve", "--ublk", &a, "--socket", &t.s("s.sock")]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    let b = t.s("b.cow");
    ok(&["create", &b, "--size", "1M"]);
    fails(&["serve", "--ublk", &a, &b], "exactly one image");
    let o = run(&["serve", "--ublk", &a, "--queues", "0"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn without_the_driver_serve_ublk_says_so_and_leaves_the_image_alone() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        // A host with the driver: only what cannot create a device.
        fails(&["ublk-remove", "4000"], "/dev/ublkc4000");
        return;
    }
    let t = Tmp::new("ublk-nodrv");
    let a = t.s("a.cow");
    ok(&["create", &a, "--size", "1M"]);
    fails(&["serve", "--ublk", &a], "ublk_drv");
    fails(&["ublk-remove", "0"], "ublk_drv");
    // Not locked, no control socket left.
    ok(&["check", &a]);
    let left: Vec<_> = std::fs::read_dir(t.p(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["a.cow"]);
}
