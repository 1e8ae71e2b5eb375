//! Content checks against an independent reference: the same writes go to a cowdisk
//! chain (engine API) and to a raw file (qemu-io); `cowdisk export` must equal the raw
//! file across snapshots, discards, squashes, flatten, import and reset, and no lower
//! layer may change.

mod cli_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cli_common::*;
use test_support::have_tool;
use Op::{Discard, Write};

const SIZE: u64 = 8 << 20;
const K: u64 = 1024;
const M: u64 = 1 << 20;

fn hashes(paths: &[PathBuf]) -> BTreeMap<PathBuf, String> {
    paths.iter().map(|p| (p.clone(), hash(p))).collect()
}

fn assert_unchanged(before: &BTreeMap<PathBuf, String>) {
    for (p, h) in before {
        assert_eq!(&hash(p), h, "lower layer {} changed", p.display());
    }
}

fn check_clean(image: &Path) {
    let o = run(&["check", &image.display().to_string()]);
    assert_eq!(code(&o), 0, "check: {}{}", stdout(&o), stderr(&o));
}

#[test]
fn chain_with_snapshots_discards_squash_flatten_import_reset() {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    let t = Tmp::new("content");
    let img = t.p("vm.cow");
    let reference = t.p("ref.raw");
    make_ref(&reference, SIZE);
    ok(&[
        "create",
        &t.s("vm.cow"),
        "--size",
        "8M",
        "--block-size",
        "64K",
    ]);
    apply_both(
        &img,
        &reference,
        &[
            Write(M, 64 * K, 0xab),
            Write(100, 5000, 0x11),
            Write(3 * M + 7, 200 * K, 0x22),
        ],
    );
    assert_same(&t, &img, &reference, "a");

    ok(&["snapshot", &t.s("vm.cow"), &t.s("s1.cow")]);
    let mut lowers = vec![t.p("s1.cow")];
    let h1 = hashes(&lowers);
    assert_same(&t, &img, &reference, "after-s1");
    // Partial overwrite (copy-up), discard of lower data, a partial discard, new data.
    apply_both(
        &img,
        &reference,
        &[
            Write(M + 10 * K, 4 * K, 0xcd),
            Discard(3 * M, 128 * K),
            Discard(100, 1000),
            Write(7 * M, 64 * K, 0x33),
        ],
    );
    assert_same(&t, &img, &reference, "b");

    ok(&["snapshot", &t.s("vm.cow"), &t.s("s2.cow")]);
    lowers.push(t.p("s2.cow"));
    let h2 = hashes(&lowers);
    let ref_s2 = t.p("ref-s2.raw");
    std::fs::copy(&reference, &ref_s2).unwrap();
    apply_both(
        &img,
        &reference,
        &[
            Write(0, 64 * K, 0x44),
            Discard(7 * M, 64 * K),
            Write(5 * M + 3, 3, 0x55),
        ],
    );
    assert_same(&t, &img, &reference, "c");
    assert_unchanged(&h1);
    assert_unchanged(&h2);

    ok(&["snapshot", &t.s("vm.cow"), &t.s("s3.cow")]);
    lowers.push(t.p("s3.cow"));
    let all = hashes(&lowers);
    assert_eq!(json(&["info", &t.s("vm.cow"), "--json"])["depth"], 4);
    check_clean(&img);

    // Squash the two layers just below the top, then everything.
    let out = ok(&["squash", &t.s("vm.cow"), "--layers", "2"]);
    assert!(out.contains("Squashed 2"), "{out}");
    assert_eq!(json(&["info", &t.s("vm.cow"), "--json"])["depth"], 3);
    assert_same(&t, &img, &reference, "squash2");
    check_clean(&img);
    assert_unchanged(&all);
    ok(&["squash", &t.s("vm.cow")]);
    let v = json(&["info", &t.s("vm.cow"), "--json"]);
    assert_eq!(v["depth"], 2);
    let squashed = PathBuf::from(v["layers"][1]["path"].as_str().unwrap());
    assert!(squashed
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("vm.cow.squash-"));
    assert_eq!(v["layers"][1]["state"], "sealed");
    assert_same(&t, &img, &reference, "squash-all");
    check_clean(&img);
    assert_unchanged(&all);
    fails(&["squash", &t.s("vm.cow"), "--layers", "2"], "only 1 layer");

    // Flatten: standalone, same content; zero blocks not stored.
    ok(&["flatten", &t.s("vm.cow"), &t.s("flat.cow")]);
    let f = json(&["info", &t.s("flat.cow"), "--json"]);
    assert_eq!(f["depth"], 1);
    assert_same(&t, &t.p("flat.cow"), &reference, "flat");
    let map = json(&["map", &t.s("flat.cow"), "--json"]);
    for e in map.as_array().unwrap() {
        assert_ne!(
            e["state"], "zero",
            "flatten must not store whiteouts: {map}"
        );
    }
    fails(
        &["flatten", &t.s("vm.cow"), &t.s("flat.cow")],
        "already exists",
    );

    // Import the reference: same content, sparse; no progress bar when stderr is not a terminal.
    let o = run(&["import", &t.s("ref.raw"), &t.s("quiet.cow")]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
    ok(&[
        "import",
        &reference.display().to_string(),
        &t.s("imp.cow"),
        "--block-size",
        "4K",
    ]);
    assert_same(&t, &t.p("imp.cow"), &reference, "import");
    let iv = json(&["info", &t.s("imp.cow"), "--json"]);
    assert_eq!(iv["block_size"], 4096);
    let data = iv["layers"][0]["data_blocks"].as_u64().unwrap();
    assert!(data < 200, "import stored zero blocks: {data}");
    check_clean(&t.p("imp.cow"));

    // Export leaves holes.
    ok(&["export", &t.s("flat.cow"), &t.s("out.raw")]);
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(t.p("out.raw")).unwrap().blocks() * 512;
    assert!(used < 2 * M, "export is not sparse: {used} bytes used");
    fails(
        &["export", &t.s("flat.cow"), &t.s("out.raw")],
        "already exists",
    );

    // Reset: back to the last snapshot's content (s3 = state "c").
    apply_image(&img, &[Write(2 * M, 64 * K, 0x66)]);
    ok(&["reset", &t.s("vm.cow")]);
    assert_same(&t, &img, &reference, "reset");
    assert_unchanged(&all);
    // The s2 snapshot alone still holds state "b".
    ok(&["create", &t.s("from-s2.cow"), "--backing", &t.s("s2.cow")]);
    assert_same(&t, &t.p("from-s2.cow"), &ref_s2, "s2");
}

#[test]
fn import_odd_size_and_export_roundtrip() {
    let t = Tmp::new("odd");
    let raw = t.p("odd.raw");
    let mut bytes = vec![0u8; 100_000];
    bytes[5] = 1;
    bytes[99_999] = 2;
    std::fs::write(&raw, &bytes).unwrap();
    ok(&["import", &raw.display().to_string(), &t.s("odd.cow")]);
    let v = json(&["info", &t.s("odd.cow"), "--json"]);
    assert_eq!(v["virtual_size"], 100_352); // rounded up to 512
    ok(&["export", &t.s("odd.cow"), &t.s("back.raw")]);
    let back = std::fs::read(t.p("back.raw")).unwrap();
    assert_eq!(&back[..100_000], &bytes[..]);
    assert!(back[100_000..].iter().all(|&x| x == 0));
    fails(
        &["import", &t.s("missing.raw"), &t.s("x.cow")],
        "missing.raw",
    );
    std::fs::write(t.p("empty.raw"), b"").unwrap();
    fails(&["import", &t.s("empty.raw"), &t.s("x.cow")], "empty");
    assert!(!t.p("x.cow").exists());
}
