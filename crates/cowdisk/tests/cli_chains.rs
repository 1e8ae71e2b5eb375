//! Chains that span folders: relative references that survive moving the whole tree,
//! absolute references, image roots, and references to things that are not the parent.

mod cli_common;

use cli_common::*;
use cowdisk_core::{create_child_with, ReferenceStyle};

/// images/base.cow under vms/vm1/disk.cow, base blocks 0-1 = 7, top block 4 = 9.
fn tree(t: &Tmp) -> (String, String) {
    std::fs::create_dir_all(t.p("tree/images")).unwrap();
    std::fs::create_dir_all(t.p("tree/vms/vm1")).unwrap();
    let base = t.s("tree/images/base.cow");
    let top = t.s("tree/vms/vm1/disk.cow");
    ok(&["create", &base, "--size", "1M", "--block-size", "4K"]);
    apply_image(std::path::Path::new(&base), &[Op::Write(0, 8192, 7)]);
    ok(&["create", &top, "--backing", &base]);
    apply_image(std::path::Path::new(&top), &[Op::Write(4 * 4096, 4096, 9)]);
    (base, top)
}

fn assert_content(top: &std::path::Path) {
    let d = open_ro(top);
    let mut b = vec![0u8; 5 * 4096];
    d.read(0, &mut b).unwrap();
    assert!(b[..8192].iter().all(|&x| x == 7));
    assert!(b[8192..4 * 4096].iter().all(|&x| x == 0));
    assert!(b[4 * 4096..].iter().all(|&x| x == 9));
}

#[test]
fn sibling_folders_survive_moving_the_tree() {
    let t = Tmp::new("chains-sibling");
    let (_, top) = tree(&t);
    let v = json(&["info", &top, "--json"]);
    assert_eq!(
        v["layers"][0]["parent"]["reference"],
        "../../images/base.cow"
    );
    assert_content(std::path::Path::new(&top));
    std::fs::rename(t.p("tree"), t.p("moved")).unwrap();
    let moved = t.s("moved/vms/vm1/disk.cow");
    assert_content(std::path::Path::new(&moved));
    assert_eq!(code(&run(&["check", &moved])), 0);
}

#[test]
fn absolute_references_survive_moving_the_child() {
    let t = Tmp::new("chains-abs");
    std::fs::create_dir_all(t.p("images")).unwrap();
    std::fs::create_dir_all(t.p("vms")).unwrap();
    let base = t.p("images/base.cow");
    ok(&[
        "create",
        &t.s("images/base.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    apply_image(&base, &[Op::Write(0, 8192, 7)]);
    let top = t.p("vms/disk.cow");
    create_child_with(&top, &base, ReferenceStyle::Absolute).unwrap();
    apply_image(&top, &[Op::Write(4 * 4096, 4096, 9)]);
    let v = json(&["info", &t.s("vms/disk.cow"), "--json"]);
    let reference = v["layers"][0]["parent"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reference.starts_with('/'), "{reference}");
    std::fs::create_dir_all(t.p("elsewhere")).unwrap();
    std::fs::rename(&top, t.p("elsewhere/disk.cow")).unwrap();
    assert_content(&t.p("elsewhere/disk.cow"));
    assert_eq!(code(&run(&["check", &t.s("elsewhere/disk.cow")])), 0);
}

#[test]
fn image_roots_confine_references() {
    let t = Tmp::new("chains-roots");
    let (_, top) = tree(&t);
    let before = hash(&t.p("tree/vms/vm1/disk.cow"));
    // The parent lies in tree/images, outside a root of tree/vms: refused by every
    // command that opens the chain, by flag and by environment.
    let vms = t.s("tree/vms");
    fails(
        &["info", &top, "--image-root", &vms],
        "outside every image root",
    );
    let o = run(&["check", &top, "--image-root", &vms]);
    assert_eq!(code(&o), 2);
    assert!(
        stdout(&o).contains("outside every image root"),
        "{}",
        stdout(&o)
    );
    let o = run_env(&["info", &top], &[("COWDISK_IMAGE_ROOT", &vms)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("outside every image root"),
        "{}",
        stderr(&o)
    );
    assert_eq!(hash(&t.p("tree/vms/vm1/disk.cow")), before);
    // Inside a root (one of several): accepted.
    let roots = format!("{}:{}", t.s("nowhere"), t.s("tree/images"));
    std::fs::create_dir_all(t.p("nowhere")).unwrap();
    let o = run_env(&["info", &top, "--json"], &[("COWDISK_IMAGE_ROOT", &roots)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    ok(&["info", &top, "--image-root", &t.s("tree")]);
    assert_eq!(
        code(&run(&["check", &top, "--image-root", &t.s("tree")])),
        0
    );
}

/// Points `top`'s parent reference at `target` (keeping the recorded UUID and digest)
/// through the engine's rebase rules' own header writer: a crafted image.
fn retarget(top: &std::path::Path, target: &str) {
    use cowdisk_core::layer::{read_header, write_header};
    let (f, _) = cowdisk_core::open_layer_file(top, cowdisk_core::Access::ReadWrite, true).unwrap();
    let st = cowdisk_core::FileStorage::new(f);
    let loaded = read_header(&st, top).unwrap();
    let mut h = loaded.header.clone();
    h.parent.as_mut().unwrap().path = target.to_string();
    write_header(&st, top, &loaded, &h).unwrap();
}

#[test]
fn references_to_other_things_are_refused() {
    let t = Tmp::new("chains-other");
    let (_, top) = tree(&t);
    let topp = t.p("tree/vms/vm1/disk.cow");
    std::fs::write(t.p("plain.txt"), b"not a layer at all, just text").unwrap();
    let fifo = t.p("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    ok(&[
        "create",
        &t.s("other.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
    ]);
    ok(&["create", &t.s("x.cow"), "--backing", &t.s("other.cow")]);
    for (target, want) in [
        (t.s("plain.txt"), "bad magic"),
        (fifo.display().to_string(), "not a regular file"),
        ("/dev/null".to_string(), "not a regular file"),
        (t.s("other.cow"), "expects"),
    ] {
        retarget(&topp, &target);
        let before = hash(&topp);
        fails(&["info", &top], want);
        fails(&["map", &top], want);
        assert_eq!(code(&run(&["check", &top])), 2, "{target}");
        assert_eq!(hash(&topp), before, "{target}: the top changed");
    }
}

/// Issue 10, defect 4: three 15 TiB layers of 4 KiB blocks (a few KiB on disk) once
/// took 1-4 GB to open and aborted under a memory limit. Memory now follows what the
/// layers hold, and a cap refuses with a clear error instead of aborting.
#[test]
fn huge_sparse_chains_open_in_little_memory() {
    let t = Tmp::new("chains-huge");
    ok(&[
        "create",
        &t.s("a.cow"),
        "--size",
        "15T",
        "--block-size",
        "4K",
    ]);
    ok(&["create", &t.s("b.cow"), "--backing", &t.s("a.cow")]);
    ok(&["create", &t.s("c.cow"), "--backing", &t.s("b.cow")]);
    let bin = env!("CARGO_BIN_EXE_cowdisk");
    for cmd in ["info", "map", "check"] {
        // 600 MB of address space: the old engine needed 4 GB for `info`.
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v 600000; exec {bin} {cmd} {}",
                t.s("c.cow")
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd}: {:?} {}", o.status, stderr(&o));
    }
    let o = run(&["info", &t.s("c.cow"), "--max-metadata", "16M"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("--max-metadata"), "{}", stderr(&o));
}
