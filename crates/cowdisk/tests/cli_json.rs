//! `--json` of every command that makes or changes something: the printed paths,
//! UUIDs, digests and sizes must be what the files hold (`info --json`, `stat`, the
//! raw bytes), and every layer object has the shape `info --json` uses.

mod cli_common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cli_common::*;
use serde_json::Value;
use Op::Write;

const K: u64 = 1024;

/// Keys of the layer object every command prints (README "JSON output").
const LAYER_KEYS: [&str; 8] = [
    "allocated_bytes",
    "block_size",
    "parent",
    "path",
    "seal_digest",
    "state",
    "uuid",
    "virtual_size",
];

/// `info --json` of `image`, layer `i` (0 = top).
fn info_layer(image: &Path, i: usize) -> Value {
    let v = json(&["info", &image.display().to_string(), "--json"]);
    v["layers"][i].clone()
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Asserts a command's layer object has the common shape and agrees with `info`'s
/// view of the same layer (identity, geometry, parent link, file usage).
fn assert_layer(obj: &Value, info: &Value, path: &Path) {
    let keys: Vec<&str> = obj
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, LAYER_KEYS, "layer object keys: {obj}");
    assert_eq!(obj["path"], path.display().to_string());
    for k in [
        "uuid",
        "state",
        "virtual_size",
        "block_size",
        "seal_digest",
        "parent",
    ] {
        assert_eq!(
            obj[k], info[k],
            "{k}: command printed {obj}, info says {info}"
        );
    }
    assert_eq!(obj["allocated_bytes"], allocated(path), "{obj}");
}

#[test]
fn create_reports_the_new_layer_and_its_parent_link() {
    let t = Tmp::new("json-create");
    let base = json(&[
        "create",
        &t.s("base.cow"),
        "--size",
        "1M",
        "--block-size",
        "4K",
        "--json",
    ]);
    let b = &base["image"];
    assert_layer(b, &info_layer(&t.p("base.cow"), 0), &t.p("base.cow"));
    assert_eq!(b["virtual_size"], 1 << 20);
    assert_eq!(b["block_size"], 4096);
    assert_eq!(b["state"], "writable");
    assert_eq!(b["parent"], Value::Null);
    apply_image(&t.p("base.cow"), &[Write(0, 8 * K, 0x11)]);
    let vm = json(&[
        "create",
        &t.s("vm.cow"),
        "--backing",
        &t.s("base.cow"),
        "--json",
    ]);
    let v = &vm["image"];
    assert_layer(v, &info_layer(&t.p("vm.cow"), 0), &t.p("vm.cow"));
    // create --backing sealed base: the link holds base's (unchanged) UUID and new digest.
    let base_now = info_layer(&t.p("base.cow"), 0);
    assert_eq!(base_now["state"], "sealed");
    assert_eq!(base_now["uuid"], b["uuid"]);
    assert_eq!(v["parent"]["uuid"], base_now["uuid"]);
    assert_eq!(v["parent"]["seal_digest"], base_now["seal_digest"]);
    assert_eq!(v["parent"]["reference"], "base.cow");
    assert_eq!(v["virtual_size"], b["virtual_size"]);
}

#[test]
fn snapshot_reports_the_sealed_layer_and_the_new_top() {
    let t = Tmp::new("json-snapshot");
    small_chain(&t, 0x11, 0x22);
    let old_top = info_layer(&t.p("vm.cow"), 0);
    let s = json(&["snapshot", &t.s("vm.cow"), &t.s("snap.cow"), "--json"]);
    assert_layer(&s["image"], &info_layer(&t.p("vm.cow"), 0), &t.p("vm.cow"));
    assert_layer(
        &s["snapshot"],
        &info_layer(&t.p("vm.cow"), 1),
        &t.p("snap.cow"),
    );
    // The snapshot is the old top, sealed; the new top points at it.
    assert_eq!(s["snapshot"]["uuid"], old_top["uuid"]);
    assert_eq!(s["snapshot"]["state"], "sealed");
    assert_ne!(s["image"]["uuid"], old_top["uuid"]);
    assert_eq!(s["image"]["parent"]["uuid"], s["snapshot"]["uuid"]);
    assert_eq!(
        s["image"]["parent"]["seal_digest"],
        s["snapshot"]["seal_digest"]
    );
}

#[test]
fn reset_and_rebase_report_the_rewritten_top() {
    let t = Tmp::new("json-reset-rebase");
    small_chain(&t, 0x11, 0x22);
    let old_top = info_layer(&t.p("vm.cow"), 0);
    let r = json(&["reset", &t.s("vm.cow"), "--json"]);
    let now = info_layer(&t.p("vm.cow"), 0);
    assert_layer(&r["image"], &now, &t.p("vm.cow"));
    assert_ne!(r["image"]["uuid"], old_top["uuid"], "reset makes a new top");
    assert_eq!(r["image"]["parent"], old_top["parent"]);
    assert_eq!(now["data_blocks"], 0);

    std::fs::create_dir(t.p("sub")).unwrap();
    std::fs::rename(t.p("base.cow"), t.p("sub/base.cow")).unwrap();
    let rb = json(&[
        "rebase",
        &t.s("vm.cow"),
        "--backing",
        &t.s("sub/base.cow"),
        "--json",
    ]);
    assert_layer(&rb["image"], &info_layer(&t.p("vm.cow"), 0), &t.p("vm.cow"));
    assert_eq!(rb["image"]["parent"]["reference"], "sub/base.cow");
    assert_eq!(
        rb["image"]["uuid"], r["image"]["uuid"],
        "rebase keeps the layer"
    );
}

#[test]
fn squash_reports_the_merged_layer_and_what_it_holds() {
    let t = Tmp::new("json-squash");
    small_chain(&t, 0x11, 0x22);
    ok(&["snapshot", &t.s("vm.cow"), &t.s("snap.cow")]);
    let s = json(&["squash", &t.s("vm.cow"), "--json"]);
    let path = Path::new(s["squashed"]["path"].as_str().unwrap()).to_path_buf();
    let merged = info_layer(&t.p("vm.cow"), 1);
    assert_layer(&s["squashed"], &merged, &path);
    assert_layer(&s["image"], &info_layer(&t.p("vm.cow"), 0), &t.p("vm.cow"));
    assert_eq!(s["image"]["parent"]["uuid"], s["squashed"]["uuid"]);
    assert_eq!(s["layers_merged"], 2);
    // Blocks 0, 1 (base) and 4 (vm) hold data.
    assert_eq!(s["data_blocks"], 3);
    assert_eq!(s["data_blocks"], merged["data_blocks"]);
    assert_eq!(s["bytes_written"], 3 * 4096);
}

#[test]
fn import_flatten_export_report_sizes_and_bytes() {
    let t = Tmp::new("json-transfer");
    // 3 data blocks of 4K around a zero block, then a partial tail: 13000 bytes.
    let mut raw = vec![0u8; 13000];
    raw[..4096].fill(1);
    raw[8192..12288].fill(2);
    raw[12288..].fill(3);
    std::fs::write(t.p("in.raw"), &raw).unwrap();
    let i = json(&[
        "import",
        &t.s("in.raw"),
        &t.s("img.cow"),
        "--block-size",
        "4K",
        "--json",
    ]);
    assert_layer(
        &i["image"],
        &info_layer(&t.p("img.cow"), 0),
        &t.p("img.cow"),
    );
    assert_eq!(i["source"], t.s("in.raw"));
    assert_eq!(i["source_size"], 13000);
    assert_eq!(i["image"]["virtual_size"], 13312, "rounded up to 512");
    assert_eq!(i["data_blocks"], 3);
    assert_eq!(
        i["data_blocks"],
        info_layer(&t.p("img.cow"), 0)["data_blocks"]
    );
    assert_eq!(i["bytes_written"], 4096 + 4096 + (13312 - 12288));

    let f = json(&["flatten", &t.s("img.cow"), &t.s("flat.cow"), "--json"]);
    assert_layer(
        &f["image"],
        &info_layer(&t.p("flat.cow"), 0),
        &t.p("flat.cow"),
    );
    assert_eq!(f["source"], t.s("img.cow"));
    assert_eq!(f["data_blocks"], 3);
    assert_eq!(f["bytes_written"], i["bytes_written"]);
    assert_eq!(f["image"]["parent"], Value::Null);

    let e = json(&["export", &t.s("flat.cow"), &t.s("out.raw"), "--json"]);
    let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "allocated_bytes",
            "bytes_written",
            "output",
            "source",
            "virtual_size"
        ]
    );
    assert_eq!(e["source"], t.s("flat.cow"));
    assert_eq!(e["output"], t.s("out.raw"));
    let out = std::fs::read(t.p("out.raw")).unwrap();
    assert_eq!(e["virtual_size"], out.len());
    assert_eq!(e["bytes_written"], i["bytes_written"]);
    assert_eq!(e["allocated_bytes"], allocated(&t.p("out.raw")));
    assert_eq!(&out[..13000], &raw[..], "exported content");
}

#[test]
fn failures_print_no_json() {
    let t = Tmp::new("json-fail");
    small_chain(&t, 0x11, 0x22);
    for args in [
        vec!["create", &t.s("vm.cow"), "--size", "1M", "--json"],
        vec!["snapshot", &t.s("vm.cow"), &t.s("base.cow"), "--json"],
        vec!["squash", &t.s("base.cow"), "--json"],
        vec!["export", &t.s("vm.cow"), &t.s("base.cow"), "--json"],
    ]
    .iter()
    .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&a);
        assert_eq!(code(&o), 1, "{a:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{a:?}: an error prints nothing on stdout");
        assert!(stderr(&o).starts_with("cowdisk: "), "{}", stderr(&o));
    }
}
