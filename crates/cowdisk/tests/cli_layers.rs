//! snapshot, reset, rebase: refusals (nothing written) and rebase after a move.

mod cli_common;

use cli_common::*;
use cowdisk_core::WriteFlags;

fn write(p: &std::path::Path, off: u64, byte: u8) {
    let d = open_rw(p);
    d.write(off, &[byte; 4096], WriteFlags::default()).unwrap();
    d.flush().unwrap();
}

#[test]
fn snapshot_refusals() {
    let t = Tmp::new("snap-ref");
    ok(&["create", &t.s("a.cow"), "--size", "1M"]);
    ok(&["create", &t.s("b.cow"), "--size", "1M"]);
    let ha = hash(&t.p("a.cow"));
    fails(
        &["snapshot", &t.s("a.cow"), &t.s("b.cow")],
        "already exists",
    );
    assert_eq!(hash(&t.p("a.cow")), ha);
    ok(&["create", &t.s("c.cow"), "--backing", &t.s("b.cow")]);
    let hb = hash(&t.p("b.cow"));
    fails(&["snapshot", &t.s("b.cow"), &t.s("s.cow")], "sealed");
    fails(&["reset", &t.s("b.cow")], "sealed");
    assert_eq!(hash(&t.p("b.cow")), hb);
    fails(&["snapshot", &t.s("nope.cow"), &t.s("s.cow")], "nope.cow");
    std::fs::create_dir(t.p("sub")).unwrap();
    ok(&["snapshot", &t.s("a.cow"), &t.s("sub/s.cow")]);
    assert_eq!(
        json(&["info", &t.s("a.cow"), "--json"])["layers"][0]["parent"]["reference"],
        "sub/s.cow"
    );
    assert_eq!(std::fs::read_dir(&t.0).unwrap().count(), 4);
    // With a parent, a snapshot in a subfolder would carry a parent reference that is
    // relative to the image's folder, and neither file would open: refused, nothing written.
    let hc = hash(&t.p("c.cow"));
    fails(
        &["snapshot", &t.s("c.cow"), &t.s("sub/c1.cow")],
        "same folder",
    );
    assert_eq!(hash(&t.p("c.cow")), hc);
    assert!(!t.p("sub/c1.cow").exists());
    ok(&["info", &t.s("c.cow")]);
}

#[test]
fn reset_discards_top_changes() {
    let t = Tmp::new("reset");
    ok(&[
        "create",
        &t.s("base.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    write(&t.p("base.cow"), 0, 1);
    ok(&["create", &t.s("vm.cow"), "--backing", &t.s("base.cow")]);
    write(&t.p("vm.cow"), 0, 2);
    write(&t.p("vm.cow"), 8192, 3);
    ok(&["reset", &t.s("vm.cow")]);
    let v = json(&["info", &t.s("vm.cow"), "--json"]);
    assert_eq!(v["layers"][0]["data_blocks"], 0);
    assert_eq!(v["depth"], 2);
    let d = open_rw(&t.p("vm.cow"));
    let mut b = [0u8; 4096];
    d.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    d.read(8192, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn rebase_after_move() {
    let t = Tmp::new("rebase");
    ok(&[
        "create",
        &t.s("base.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    write(&t.p("base.cow"), 0, 7);
    ok(&["create", &t.s("vm.cow"), "--backing", &t.s("base.cow")]);
    write(&t.p("vm.cow"), 4096, 8);
    std::fs::create_dir(t.p("images")).unwrap();
    std::fs::rename(t.p("base.cow"), t.p("images/base.cow")).unwrap();
    fails(&["info", &t.s("vm.cow")], "base.cow");
    // A different layer with the same name is refused; nothing written.
    ok(&[
        "create",
        &t.s("other.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    ok(&["create", &t.s("x.cow"), "--backing", &t.s("other.cow")]);
    let before = hash(&t.p("vm.cow"));
    fails(
        &["rebase", &t.s("vm.cow"), "--backing", &t.s("other.cow")],
        "expects",
    );
    fails(
        &["rebase", &t.s("vm.cow"), "--backing", &t.s("missing.cow")],
        "missing.cow",
    );
    assert_eq!(hash(&t.p("vm.cow")), before);
    fails(
        &[
            "rebase",
            &t.s("other.cow"),
            "--backing",
            &t.s("images/base.cow"),
        ],
        "sealed",
    );
    ok(&["create", &t.s("solo.cow"), "--size", "1M"]);
    fails(
        &[
            "rebase",
            &t.s("solo.cow"),
            "--backing",
            &t.s("images/base.cow"),
        ],
        "no parent",
    );
    let base = hash(&t.p("images/base.cow"));
    ok(&[
        "rebase",
        &t.s("vm.cow"),
        "--backing",
        &t.s("images/base.cow"),
    ]);
    let v = json(&["info", &t.s("vm.cow"), "--json"]);
    assert_eq!(v["layers"][0]["parent"]["reference"], "images/base.cow");
    let d = open_rw(&t.p("vm.cow"));
    let mut b = [0u8; 8192];
    d.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 7) && b[4096..].iter().all(|&x| x == 8));
    drop(d);
    assert_eq!(hash(&t.p("images/base.cow")), base);
    assert_eq!(code(&run(&["check", &t.s("vm.cow")])), 0);
}
